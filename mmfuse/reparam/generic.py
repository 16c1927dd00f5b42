"""The generic merge: prove with torch.fx that a block sums branches.

A block's own ``forward`` is traced with torch.fx, every child kept as a
call.  Reading the graph from the inputs, each value gets an *expression*
when it is provably a sum of branches of one source value: each branch a
chain of children that are each a linear map (a conv, a foldable norm, an
average pool, an identity or dropout in eval mode, or a child whose own
forward proves the same, such as ``nn.Sequential(conv, bn)`` or mmcv's
``ConvModule`` without activation), multiplied by constants (a learnable
scalar ``alpha`` read from the block, a number).  ``+``, ``-``, ``*`` and
``/`` by constants and ``+ 0`` combine expressions.  An intermediate value
joins an expression only if nothing else uses it.

A maximal expression with two or more branches, one of them a conv, becomes
one ``nn.Conv2d`` when the branch geometry allows
(:func:`mmfuse.reparam.merge.merge_geometry`).  Everything else the block
does (an activation or SE layer after the sum, a residual) stays as it was:
the block is rebuilt as ``nn.Sequential(conv, *kept children)`` when its
graph is then a chain of children, or as a ``torch.fx.GraphModule``
otherwise.

Tracing evaluates Python control flow on the block's attributes, and on
one-element parameters and buffers read as flags or numbers (``if
self.alpha:``): the graph is what the block computes with the values it
has now, which are the values the merge bakes in.  A block that changes
in place a value other operations read is not merged: the graph does not
order those reads.
"""
import inspect
import operator
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ..discovery.fx_tracer import trace_module_forward
from ..discovery.trace_cache import TraceCache
from ..layers import (fuses_conv_bn_on_the_fly, is_conv_layer,
                      is_mmcv_conv_module, is_norm_layer, is_stock_sequential,
                      norm_fold_problem, runs_class_forward)
from ..module_walk import has_children, walk_modules
from .branches import (Op, Term, _conv_problem, _pool_problem, build_conv,
                       conv_op, describe_term, merge_terms, norm_op, pool_op,
                       scale_op)
from .code_scan import forward_may_add
from .merge import ConvGeometry, MergeError

__all__ = ['BlockRewrite', 'GenericMerger', 'trace_block']

# (In place, ``out += y``, as well: whether the change is seen by another
# read is judged apart, by ``_changed_in_place``.)
_ADD = {operator.add, torch.add, operator.iadd}
_SUB = {operator.sub, torch.sub, operator.isub}
_MUL = {operator.mul, torch.mul, operator.imul}
_DIV = {operator.truediv, torch.div, operator.itruediv}
_NEG = {operator.neg, torch.neg}
_ADD_METHODS = {'add', '__add__', '__radd__'}
_SUB_METHODS = {'sub', '__sub__'}
_RSUB_METHODS = {'__rsub__'}
_MUL_METHODS = {'mul', '__mul__', '__rmul__'}
_DIV_METHODS = {'div', '__truediv__'}
_NEG_METHODS = {'neg', '__neg__'}
# The input of a chain of children analysed without a trace.
_CHAIN_INPUT = object()
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
             nn.AlphaDropout, nn.FeatureAlphaDropout)


@dataclass
class _Trace:
    graph: fx.Graph
    #: Values of the graph's ``get_attr`` nodes.
    values: Dict[fx.Node, Any]
    #: The placeholder of the block's input.
    input: fx.Node


def _resolve(root: nn.Module, target: str) -> Any:
    value = root
    for part in target.split('.'):
        value = getattr(value, part)
    return value


def trace_block(module: nn.Module,
                defaults_fixed: bool,
                traces: Optional[TraceCache] = None
                ) -> Tuple[Optional[_Trace], str]:
    """Trace ``module.forward`` with torch.fx, children kept as calls.

    Args:
        module: The module.
        defaults_fixed: Whether parameters after the first may be fixed to
            their defaults (the module is then only analysed as called with
            one argument).
        traces: Traces to share with modules alike; the graph may then be
            shared too: copy it before changing it.

    Returns:
        ``(trace, '')``, or ``(None, reason)``.
    """
    try:
        params = list(inspect.signature(type(module).forward).parameters
                      .values())[1:]
    except (TypeError, ValueError) as error:
        return None, f'no signature: {error}'
    if not params or params[0].kind not in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD):
        return None, 'forward takes no positional input'
    concrete = {}
    for param in params[1:]:
        if not defaults_fixed:
            return None, 'forward takes more than one input'
        if param.default is inspect.Parameter.empty:
            return None, 'forward needs more than one input'
        concrete[param.name] = param.default
    try:
        graph = traces.trace(module, concrete or None) if traces is not None \
            else trace_module_forward(module, concrete or None)
        values = {
            node: _resolve(module, node.target)
            for node in graph.nodes if node.op == 'get_attr'
        }
    except Exception as error:  # fx raises many types on Python code
        first = str(error).strip().splitlines()
        detail = first[0][:120] if first else type(error).__name__
        return None, f'torch.fx cannot trace {type(module).__name__}.' \
            f'forward ({detail})'
    placeholders = [n for n in graph.nodes if n.op == 'placeholder']
    return _Trace(graph, values, placeholders[0]), ''


@dataclass
class _Expr:
    """A value proven to be a sum of branches of ``source``.

    Attributes:
        source: The value every branch reads.
        terms: The branches.
        nodes: The graph nodes computing it, the value's own included, none
            of them used outside it.
        parts: The operand nodes whose expressions it absorbed.
    """
    source: Optional[fx.Node]
    terms: List[Term]
    nodes: List[fx.Node] = field(default_factory=list)
    parts: List[fx.Node] = field(default_factory=list)


@dataclass
class BlockRewrite:
    """A block's deploy form.

    Attributes:
        module: The new module.
        structure: ``'conv'`` (the module is the merged conv),
            ``'sequential'`` or ``'graph'`` (a ``GraphModule``).
        layers: For ``'sequential'``: ``(name, origin)`` of each child, the
            origin the path of the kept child in the old block or ``None``
            for a merged conv.
        convs: One dict per merged conv: its name in the new module, its
            geometry and its branches.
        kept: Paths (in the new module) of the children kept from the old
            block.
    """
    module: nn.Module
    structure: str
    layers: List[Tuple[str, Optional[str]]]
    convs: List[Dict]
    kept: List[str]


class GenericMerger:
    """Finds and merges the branch sums of blocks, one block at a time.

    One merger serves one pass over a model: it caches what it learns about
    each child (keeping the child alive, so ids are not reused), and shares
    traces between blocks alike.

    Args:
        model: The model of the pass, to share traces only between modules
            of classes it has more than once; ``None`` compares them all.
    """

    def __init__(self, model: Optional[nn.Module] = None):
        self._terms: Dict[int, Tuple[nn.Module, Optional[List[Term]]]] = {}
        self.reasons: List[Tuple[str, str]] = []
        self.traces = TraceCache(model)
        # Whether each module of the model's own a block calls may change
        # its input (traced once, for every block and graph that calls it).
        self.changers: Dict[int, Tuple[nn.Module, bool]] = {}

    # -- what one child computes ------------------------------------------
    def module_terms(self, module: nn.Module) -> Optional[List[Term]]:
        """The branches ``module(x)`` is, as a function of ``x``; ``None``
        when it is not provably a sum of branches."""
        cached = self._terms.get(id(module))
        if cached is not None:
            return cached[1]
        self._terms[id(module)] = (module, None)  # no recursion into itself
        terms = self._module_terms(module)
        self._terms[id(module)] = (module, terms)
        return terms

    def _module_terms(self, module: nn.Module) -> Optional[List[Term]]:
        if module._forward_hooks or module._forward_pre_hooks or \
                not runs_class_forward(module):
            return None
        if isinstance(module, nn.Conv2d):
            return None if _conv_problem(module) else [Term([conv_op(module)])]
        if is_norm_layer(module) and not has_children(module):
            if norm_fold_problem(module):
                return None
            return [Term([norm_op(module)])]
        if isinstance(module, nn.AvgPool2d):
            return None if _pool_problem(module) else [Term([pool_op(module)])]
        if type(module).forward is nn.Identity.forward:
            return [Term()]
        if isinstance(module, _DROPOUTS) and \
                type(module).forward in {c.forward for c in _DROPOUTS}:
            return [Term()] if not module.training else None
        if is_stock_sequential(module):
            return self._chain_terms(list(module._modules.values()))
        if isinstance(module, nn.Sequential):
            return None  # a Sequential that runs its children otherwise
        if is_mmcv_conv_module(module):
            return self._conv_module_terms(module)
        if type(module).__module__.startswith('torch.nn.'):
            return None
        trace, _ = trace_block(module, True, self.traces)
        if trace is None or _changes_its_input(
                trace.graph, module, memo=self.changers) or \
                _changed_in_place(trace.graph, module, self.changers):
            return None  # (``x *= 2`` is no scale: the caller's x changes)
        exprs = self._expressions(module, trace)
        output = [n for n in trace.graph.nodes if n.op == 'output'][0]
        result = output.args[0]
        if not isinstance(result, fx.Node):
            return None
        if result is trace.input:
            return [Term()]
        expr = exprs.get(result)
        if expr is None or expr.source is not trace.input:
            return None
        covered = set(expr.nodes) | {trace.input, output}
        for node in trace.graph.nodes:
            if node in covered or _is_guard(node):
                continue
            return None  # computes something besides the branches
        return expr.terms

    def _chain_terms(self, chain: List[Optional[nn.Module]]
                     ) -> Optional[List[Term]]:
        """The branches of ``chain[-1](...chain[0](x))`` (``None``
        entries skipped), as the trace of ``nn.Sequential.forward`` gives
        them."""
        expr = _Expr(_CHAIN_INPUT, [Term()])
        for child in chain:
            if child is not None:
                expr = self._apply(expr, self.module_terms(child))
            if expr is None:
                return None
        return expr.terms

    def _conv_module_terms(self, block: nn.Module) -> Optional[List[Term]]:
        """The branches of an mmcv ``ConvModule`` called with one input,
        read from its ``order`` as its stock forward runs them."""
        if block.__dict__.get('with_explicit_padding') or \
                fuses_conv_bn_on_the_fly(block):
            return None  # a padding layer, or conv and norm fused on the fly
        chain = []
        for layer in block.order:
            if layer == 'conv':
                chain.append(block.conv)
            elif layer == 'norm' and block.with_norm:
                chain.append(block.norm)
            elif layer == 'act' and block.with_activation:
                chain.append(block.activate)
        return self._chain_terms(chain)

    # -- expressions over a traced graph -----------------------------------
    def _operand(self, arg: Any, exprs: Dict[fx.Node, _Expr],
                 trace: _Trace) -> Optional[_Expr]:
        if isinstance(arg, fx.Node):
            if arg.op == 'get_attr':
                return None
            expr = exprs.get(arg)
            if expr is not None and len(arg.users) == 1:
                return _Expr(expr.source, expr.terms, list(expr.nodes),
                             [arg])
            return _Expr(arg, [Term()])
        if isinstance(arg, (int, float)) and not isinstance(arg, bool) \
                and arg == 0:
            return _Expr(None, [])
        return None

    @staticmethod
    def _constant(arg: Any, trace: _Trace) -> Tuple[Any, str, List]:
        """``(value, label, nodes)`` of a constant factor, or ``None``."""
        if isinstance(arg, (int, float)) and not isinstance(arg, bool):
            return float(arg), '', []
        if isinstance(arg, fx.Node) and arg.op == 'get_attr':
            value = trace.values.get(arg)
            if isinstance(value, Tensor) and value.is_floating_point():
                return value, str(arg.target), [arg]
        return None, '', []

    def _combine(self, left: Optional[_Expr], right: Optional[_Expr],
                 sign: float) -> Optional[_Expr]:
        if left is None or right is None:
            return None
        if left.source is not None and right.source is not None and \
                left.source is not right.source:
            return None
        terms = list(left.terms)
        if sign == 1:
            terms += right.terms
        else:
            terms += [t.then(scale_op(-1.0)) for t in right.terms]
        return _Expr(left.source if left.source is not None else
                     right.source, terms, left.nodes + right.nodes,
                     left.parts + right.parts)

    def _scaled(self, expr: Optional[_Expr], constant: Tuple[Any, str, List],
                invert: bool) -> Optional[_Expr]:
        value, label, nodes = constant
        if expr is None or value is None:
            return None
        if invert:
            if isinstance(value, Tensor):
                value = 1.0 / value.detach().to(torch.float64)
                label = f'1/{label}' if label else label
            elif value == 0:
                return None
            else:
                value = 1.0 / value
        op = scale_op(value, label)
        return _Expr(expr.source, [t.then(op) for t in expr.terms],
                     expr.nodes + nodes, expr.parts)

    def _apply(self, expr: Optional[_Expr],
               sub: Optional[List[Term]]) -> Optional[_Expr]:
        """``module(expr)`` for a module that is the branches ``sub``."""
        if expr is None or sub is None or expr.source is None:
            return None
        if len(sub) == 1:
            terms = [Term(list(t.ops)) for t in expr.terms]
            for op in sub[0].ops:
                if op.kind in ('conv', 'pool') and len(terms) != 1:
                    return None
                for index, term in enumerate(terms):
                    if op.kind == 'norm':
                        term.ops.append(
                            Op(op.kind, op.module, op.value, op.label,
                               op.shift and index == 0))
                    else:
                        term.ops.append(op)
        elif len(expr.terms) == 1:
            terms = [expr.terms[0].then(*t.ops) for t in sub]
        else:
            return None
        return _Expr(expr.source, terms, list(expr.nodes), expr.parts)

    def _node_expr(self, node: fx.Node, exprs: Dict[fx.Node, _Expr],
                   root: nn.Module, trace: _Trace) -> Optional[_Expr]:
        args, kwargs = node.args, node.kwargs
        if kwargs:
            return None
        operand = lambda arg: self._operand(arg, exprs, trace)  # noqa: E731
        constant = lambda arg: self._constant(arg, trace)  # noqa: E731
        expr = None
        if node.op == 'call_module' and len(args) == 1:
            sub = self.module_terms(root.get_submodule(node.target))
            expr = self._apply(operand(args[0]), sub)
        elif node.op in ('call_function', 'call_method') and args:
            target = node.target
            is_method = node.op == 'call_method'
            binary = len(args) == 2
            if binary and (target in _ADD_METHODS if is_method else
                           target in _ADD):
                expr = self._combine(operand(args[0]), operand(args[1]), 1)
            elif binary and (target in _SUB_METHODS if is_method else
                             target in _SUB):
                expr = self._combine(operand(args[0]), operand(args[1]), -1)
            elif binary and is_method and target in _RSUB_METHODS:
                expr = self._combine(operand(args[1]), operand(args[0]), -1)
            elif binary and (target in _MUL_METHODS if is_method else
                             target in _MUL):
                left, right = constant(args[0]), constant(args[1])
                if left[0] is not None and right[0] is None:
                    expr = self._scaled(operand(args[1]), left, False)
                elif right[0] is not None and left[0] is None:
                    expr = self._scaled(operand(args[0]), right, False)
            elif binary and (target in _DIV_METHODS if is_method else
                             target in _DIV):
                expr = self._scaled(operand(args[0]), constant(args[1]),
                                    True)
            elif len(args) == 1 and (target in _NEG_METHODS if is_method
                                     else target in _NEG):
                expr = self._scaled(operand(args[0]), (-1.0, '', []),
                                    False)
        if expr is None or expr.source is None:
            return None
        expr.nodes = expr.nodes + [node]
        return expr

    def _expressions(self, root: nn.Module,
                     trace: _Trace) -> Dict[fx.Node, _Expr]:
        exprs: Dict[fx.Node, _Expr] = {}
        for node in trace.graph.nodes:
            expr = self._node_expr(node, exprs, root, trace)
            if expr is not None:
                exprs[node] = expr
        return exprs

    # -- merging a block ---------------------------------------------------
    def rewrite(self, block: nn.Module,
                path: str = '') -> Tuple[Optional[BlockRewrite], List[str]]:
        """Merge the branch sums of ``block``.

        Args:
            block: The block; not changed.
            path: Its path, for reasons.

        Returns:
            ``(rewrite, reasons)``: the deploy form, or ``None`` when there is
            nothing to merge, and why candidate sums were left.
        """
        if is_stock_sequential(block) or is_mmcv_conv_module(block) or \
                not forward_may_add(block):
            return None, []  # runs its children one after the other
        trace, _ = trace_block(block, False, self.traces)
        if trace is None:
            return None, []
        changed = _changed_in_place(trace.graph, block, self.changers)
        if changed:
            return None, [f'the forward changes a value in place ({changed})'
                          ' that other operations read: the graph does not '
                          'show which read comes first']
        exprs = self._expressions(block, trace)
        absorbed = {p for e in exprs.values() for p in e.parts}
        names = {id(m): n for n, m in walk_modules(block) if n}
        reasons: List[str] = []
        merged: List[Tuple[fx.Node, _Expr, ConvGeometry, Tensor, Tensor]] = []

        def attempt(node: fx.Node) -> None:
            expr = exprs[node]
            if len(expr.terms) < 2 or not any(
                    op.kind == 'conv' for t in expr.terms for op in t.ops):
                return
            try:
                geometry, weight, bias = merge_terms(expr.terms)
            except MergeError as error:
                branches = ' + '.join(
                    describe_term(t, names) for t in expr.terms)
                reasons.append(f'{branches}: {error}')
                for part in expr.parts:
                    attempt(part)
                return
            merged.append((node, expr, geometry, weight, bias))

        for node, expr in exprs.items():
            if node not in absorbed:
                attempt(node)
        if not merged:
            return None, reasons
        return self._rebuild(block, trace, merged, names), reasons

    def _rebuild(self, block: nn.Module, trace: _Trace, merged: List,
                 names: Dict[int, str]) -> BlockRewrite:
        trace, merged = _copied(trace, merged)
        graph = trace.graph
        taken = {
            n.target
            for n in graph.nodes if n.op in ('call_module', 'get_attr')
        }
        convs: Dict[str, nn.Conv2d] = {}
        records = []
        replaced: Dict[fx.Node, fx.Node] = {}
        order = {n: i for i, n in enumerate(graph.nodes)}
        merged = sorted(merged, key=lambda item: order[item[0]])
        for node, expr, geometry, weight, bias in merged:
            name = _fresh_name('conv', taken)
            taken.add(name)
            convs[name] = build_conv(geometry, weight, bias)
            records.append({
                'name': name,
                'geometry': geometry.to_dict(),
                'branches': [describe_term(t, names) for t in expr.terms]
            })
            with graph.inserting_before(node):
                new = graph.call_module(
                    name, (replaced.get(expr.source, expr.source), ))
            node.replace_all_uses_with(new)
            replaced[node] = new
            dead = set(expr.nodes)
            for old in reversed(list(graph.nodes)):
                if old in dead and not old.users:
                    graph.erase_node(old)
        nodes = [n for n in graph.nodes
                 if not (n.op == 'placeholder' and not n.users)]
        modules = {name: conv for name, conv in convs.items()}
        chain = _chain(nodes, trace.input)
        # (A Sequential names each kept layer by its path, dots made
        # underscores: ``post.act`` and ``post_act`` would be one name.)
        if chain is not None and len(set(chain)) == len(chain) and len({
                target if target in convs else target.replace('.', '_')
                for target in chain
        }) == len(chain):
            layers = []
            children = OrderedDict()
            for target in chain:
                if target in convs:
                    children[target] = convs[target]
                    layers.append((target, None))
                    continue
                child = block.get_submodule(target)
                if type(child).forward is nn.Identity.forward and \
                        not child._forward_hooks and \
                        not child._forward_pre_hooks:
                    continue
                key = target.replace('.', '_')
                children[key] = child
                layers.append((key, target))
            if len(children) == 1 and layers[0][1] is None:
                conv = children[layers[0][0]]
                return BlockRewrite(conv, 'conv', layers, records, [])
            new_block = nn.Sequential(children)
            new_block.train(block.training)
            return BlockRewrite(new_block, 'sequential', layers, records,
                                [n for n, o in layers if o is not None])
        root: Dict[str, Any] = dict(modules)
        kept = []
        for node in graph.nodes:
            if node.op == 'call_module' and node.target not in convs:
                root[node.target] = block.get_submodule(node.target)
                kept.append(node.target)
            elif node.op == 'get_attr':
                root[node.target] = trace.values[node]
        graph.lint()
        new_block = fx.GraphModule(root, graph,
                                   class_name=f'{type(block).__name__}Deploy')
        new_block.train(block.training)
        return BlockRewrite(new_block, 'graph', [], records, kept)


def _copied(trace: _Trace, merged: List) -> Tuple[_Trace, List]:
    """A copy of ``trace``'s graph (which other blocks alike may share),
    with ``merged`` (``(node, expr, ...)`` entries) moved onto it."""
    graph = fx.Graph()
    nodes: Dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(trace.graph, nodes))
    expressions: Dict[int, _Expr] = {}

    def moved(expr: _Expr) -> _Expr:
        if id(expr) not in expressions:
            expressions[id(expr)] = _Expr(
                nodes.get(expr.source, expr.source), expr.terms,
                [nodes[n] for n in expr.nodes],
                [nodes[n] for n in expr.parts])
        return expressions[id(expr)]

    copy = _Trace(graph, {nodes[n]: v
                          for n, v in trace.values.items()},
                  nodes[trace.input])
    return copy, [(nodes[node], moved(expr)) + tuple(rest)
                  for node, expr, *rest in merged]


#: ``x += y`` and friends, and ``x[i] = y``: their first argument changed.
_IN_PLACE_OPERATORS = frozenset({
    operator.iadd, operator.isub, operator.imul, operator.itruediv,
    operator.ifloordiv, operator.imod, operator.ipow, operator.imatmul,
    operator.iand, operator.ior, operator.ixor, operator.ilshift,
    operator.irshift, operator.setitem
})


def _inplace_positions() -> Dict[Any, int]:
    """Where ``inplace`` lies among the positional arguments of the
    functions of ``torch.nn.functional`` that take one (``F.relu(x,
    True)``)."""
    positions = {}
    for name in dir(F):
        function = getattr(F, name)
        if not callable(function) or name.startswith('_'):
            continue
        try:
            params = list(inspect.signature(function).parameters)
        except (TypeError, ValueError):
            continue
        if 'inplace' in params:
            positions[function] = params.index('inplace')
    return positions


#: ``function -> position of its inplace argument``.
_INPLACE_POSITIONS = _inplace_positions()
#: Operations whose result may share memory with their first argument.
_VIEWS = frozenset({
    'view', 'reshape', 'getitem', '__getitem__', 'narrow', 'select',
    'transpose', 'permute', 't', 'squeeze', 'unsqueeze', 'flatten',
    'expand', 'split', 'chunk', 'unbind', 'contiguous', 'detach',
    'as_strided', 'view_as', 'reshape_as', 'expand_as', 'unflatten',
    'movedim', 'swapaxes', 'swapdims', 'type_as', 'to', 'float', 'double',
    'half', 'type', 'T', 'mT', 'data'
})


def _target_name(node: fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(
        target, '__name__', '')


def _mutates_first_argument(node: fx.Node,
                            block: nn.Module,
                            depth: int = 0,
                            memo: Optional[Dict[int, Tuple]] = None) -> bool:
    """Whether ``node`` changes its first argument in place: a method or
    function named ``..._`` or ``__i...__``, ``x[...] = v``, an
    ``inplace=True`` argument, or a child that may change its input
    (:func:`_may_change_input`: ``nn.ReLU(inplace=True)``)."""
    if not node.args:
        return False
    if node.op == 'call_module':
        return _may_change_input(
            block.get_submodule(node.target), depth, memo)
    if node.op not in ('call_method', 'call_function'):
        return False
    name = _target_name(node)
    return (name.endswith('_') and not name.endswith('__')) or \
        (name.startswith('__i') and name.endswith('__')) or \
        node.target in _IN_PLACE_OPERATORS or \
        node.kwargs.get('inplace') is True or \
        len(node.args) > _INPLACE_POSITIONS.get(node.target, 99) and \
        node.args[_INPLACE_POSITIONS[node.target]] is True


def _may_change_input(module: nn.Module,
                      depth: int = 0,
                      memo: Optional[Dict[int, Tuple]] = None) -> bool:
    """Whether a call of ``module`` may change its input in place: a leaf
    of torch's with ``inplace`` set (``nn.ReLU(inplace=True)``); a module
    of the model's own whose traced forward does (``x.clamp_()``), or
    that cannot be traced; not a conv, a norm, an mmcv ConvModule (its
    ``inplace`` is for the activation it runs on its own conv's output)
    or a plain Sequential none of whose modules the input reaches does
    (through modules that may return it: an Identity, a Dropout).
    ``memo`` keeps the answer for each module traced (by ``id``), for the
    other graphs that call it."""
    if is_conv_layer(module) or is_norm_layer(module) or \
            is_mmcv_conv_module(module):
        return False
    if not runs_class_forward(module):
        return True
    if is_stock_sequential(module):
        # The input reaches a child as long as the ones before it may
        # return it.
        for child in module._modules.values():
            if child is None:
                continue
            if _may_change_input(child, depth, memo):
                return True
            if not _may_return_input(child):
                return False
        return False
    if type(module).__module__.startswith('torch.nn.') and \
            not has_children(module):
        return getattr(module, 'inplace', False) is True
    if depth >= 4:
        return True
    known = None if memo is None else memo.get(id(module))
    if known is not None and known[0] is module:
        return known[1]
    try:
        graph = trace_module_forward(module)
        changes = _changes_its_input(graph, module, depth + 1, memo)
    except Exception:  # fx raises many types on Python code
        changes = True
    if memo is not None:  # (the module is kept: its id is not reused)
        memo[id(module)] = (module, changes)
    return changes


def _changed_values(node: fx.Node,
                    block: nn.Module,
                    depth: int = 0,
                    memo: Optional[Dict[int, Tuple]] = None) -> List[Any]:
    """What ``node`` changes in place: its first argument (see
    :func:`_mutates_first_argument`; each of a list of them, as
    ``torch._foreach_mul_([x], 0.5)`` takes), and what it writes into
    through ``out=`` (``torch.mul(x, 0.5, out=x)``)."""
    changed: List[Any] = []
    if node.op in ('call_method', 'call_function'):
        changed.append(node.kwargs.get('out'))
    if _mutates_first_argument(node, block, depth, memo):
        changed.append(node.args[0])
    return [
        value for item in changed
        for value in (item if isinstance(item, (tuple, list)) else [item])
        if value is not None
    ]


def _changes_its_input(graph: fx.Graph,
                       block: nn.Module,
                       depth: int = 0,
                       memo: Optional[Dict[int, Tuple]] = None) -> bool:
    """Whether the graph of ``block``'s forward changes the block's input
    (or a view of it) in place, which its caller sees."""
    return any(
        chain and chain[-1].op == 'placeholder' for node in graph.nodes
        for chain in (_alias_chain(value, block)
                      for value in _changed_values(node, block, depth, memo)))


def _alias_chain(value: Any, block: nn.Module) -> List[fx.Node]:
    """``value`` (if a node) and the values it may share memory with, back
    through views and children that may return their input: the last is
    where that memory came from (a placeholder: the block's input)."""
    chain: List[fx.Node] = []
    while isinstance(value, fx.Node):
        chain.append(value)
        if not _aliases_first_argument(value, block):
            break
        value = value.args[0] if value.args else None
    return chain


def _aliases_first_argument(node: fx.Node, block: nn.Module) -> bool:
    """Whether ``node``'s value may share memory with its first argument:
    a view (``x.view(...)``, ``x.data``), or a child that may return its
    input."""
    if node.op == 'call_module':
        return _may_return_input(block.get_submodule(node.target))
    if node.op not in ('call_method', 'call_function'):
        return False
    if node.target is getattr:
        return len(node.args) > 1 and node.args[1] in _VIEWS
    return _target_name(node) in _VIEWS


def _may_return_input(module: nn.Module) -> bool:
    """Whether a child's output may be its input itself (an identity, a
    dropout in eval mode, anything not known): not a conv's or a norm's,
    nor a ConvModule's or a plain Sequential's that ends in one."""
    if is_conv_layer(module) or is_norm_layer(module) or \
            is_mmcv_conv_module(module):
        return False
    if is_stock_sequential(module):
        children = [m for m in module._modules.values() if m is not None]
        return not children or _may_return_input(children[-1])
    return True


def _changed_in_place(graph: fx.Graph,
                      block: nn.Module,
                      memo: Optional[Dict[int, Tuple]] = None) -> str:
    """The first value the block changes in place while another
    operation also reads it (or a value sharing its memory: through views
    and children, which may return their input), by node name; ``''`` if
    none.  A merge reorders the reads of the block's values."""
    for node in graph.nodes:
        for value in _changed_values(node, block, memo=memo):
            aliases = _alias_chain(value, block)
            chain = set(aliases) | {node}
            if any(user not in chain for alias in aliases
                   for user in alias.users):
                what = _target_name(node) or str(node.target)
                return f'{what} of the block\'s input' \
                    if aliases[-1].op == 'placeholder' else what
    return ''


def _is_guard(node: fx.Node) -> bool:
    """A check torch.fx adds for an argument fixed to its default."""
    if node.op == 'placeholder':
        return True
    if node.op == 'call_function' and node.target is operator.eq:
        return all(u.op == 'call_function' and u.target is torch._assert
                   for u in node.users)
    return node.op == 'call_function' and node.target is torch._assert


def _chain(nodes: List[fx.Node], start: fx.Node) -> Optional[List[str]]:
    """The module targets of a graph that is ``output(m_n(...m_1(x)))``."""
    body = [n for n in nodes if n.op not in ('placeholder', 'output')]
    outputs = [n for n in nodes if n.op == 'output']
    placeholders = [n for n in nodes if n.op == 'placeholder']
    if placeholders != [start] or len(outputs) != 1:
        return None
    previous = start
    targets = []
    for node in body:
        if node.op != 'call_module' or node.args != (previous, ) or \
                node.kwargs:
            return None
        targets.append(node.target)
        previous = node
    if outputs[0].args != (previous, ) or not targets:
        return None
    return targets


def _fresh_name(base: str, taken) -> str:
    if base not in taken:
        return base
    index = 1
    while f'{base}{index}' in taken:
        index += 1
    return f'{base}{index}'
