"""Discovery without an example input: prove data flow from structure.

Three kinds of structure count as proof, and registration order never does:

* ``nn.Sequential`` (with the stock forward): each child's output is the
  next child's only input;
* mmcv's ``ConvModule`` (with the stock forward): ``order`` says whether the
  norm runs right after or right before the conv;
* any other module whose own forward torch.fx can trace with every submodule
  kept as a leaf: the graph shows which call consumes which output.  A
  forward that takes a list of tensors (DenseNet's layers) and fails a
  plain trace is traced with that argument a list of unknown length,
  where the trace of the module holding it shows a list passed at every
  call (``traced_with_lists``).  A forward with optional parameters is not
  traced: a proxy stands for an argument given, so ``if scale is None``
  would take the way of a call that gives one, whatever the callers do.

Only modules that call a foldable norm are traced, and then the modules
with layers of their own that hold a linked conv or norm anywhere below
them (their calls of it, even reaching into a child, decide whether it is
folded in place, copied or left): a model without batch norms is not
traced at all.  A module registered under several names gets no call
site from a trace (the graph cannot tell which name was called).  The
model is never mutated.
"""
import dis
import inspect
import operator
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

import torch
from torch import fx, nn

from ..layers import (is_conv_layer, is_mmcv_conv_module, is_norm_layer,
                      is_stock_sequential, norm_fold_problem)
from ..module_walk import find_submodule, walk_modules
from ..plan import CONCAT, POST, PRE, SUM
from .fx_tracer import TENSOR_METADATA, class_namespaces
from .occurrence import Evidence, Occurrence
from .trace_cache import TraceCache

__all__ = ['collect_structural_evidence']


def _is_leaf_layer(module: nn.Module) -> bool:
    return is_conv_layer(module) or (is_norm_layer(module) and not any(
        True for _ in module.children()))


def _skips_norm(node: fx.Node) -> bool:
    """Whether a call of an mmcv ConvModule may skip its norm: passes
    ``norm`` (its third parameter) as anything but ``True``."""
    norm = node.kwargs.get('norm', node.args[2] if len(node.args) > 2
                           else True)
    return norm is not True


def _metadata_only(node: fx.Node) -> bool:
    """Whether a ``get_attr`` node's tensor is read for nothing but what
    it tells of itself (its dtype, device, shape: ``getattr`` nodes the
    tracer records), or not used at all."""
    return all(
        user.op == 'call_function' and user.target is getattr
        and len(user.args) == 2 and user.args[1] in TENSOR_METADATA
        for user in node.users)


def _resolve(root: nn.Module, target: str) -> Tuple[nn.Module, str]:
    """``(holder, attr)`` of the submodule at ``target`` under ``root``."""
    parent, _, attr = target.rpartition('.')
    holder = find_submodule(root, parent)
    return holder, attr


_OPTIONAL: Dict[Any, str] = {}


def _optional_parameters(forward: Any) -> str:
    """The names of ``forward``'s parameters a call may leave out (with
    defaults, ``*args``, ``**kwargs``), joined; ``''`` for none (or no
    signature to read)."""
    names = _OPTIONAL.get(forward)
    if names is None:
        try:
            params = list(inspect.signature(forward).parameters.values())
        except (TypeError, ValueError):
            params = []
        names = _OPTIONAL[forward] = ', '.join(
            p.name for p in params[1:]
            if p.default is not p.empty
            or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
    return names


_NONE_TESTED: Dict[Any, str] = {}


def _none_tested_parameters(forward: Any) -> str:
    """The names of ``forward``'s parameters its own code (or a function
    nested in it, through a closure) compares with ``None`` (``if skip is
    None``), joined; ``''`` for none.  A caller may pass ``None`` there (a
    UNet decoder's first skip), which a traced value never is: the trace
    would take the other way."""
    names = _NONE_TESTED.get(forward)
    if names is None:
        code = getattr(inspect.unwrap(forward), '__code__', None)
        found: List[str] = []
        if code is not None:
            params = set(code.co_varnames[1:code.co_argcount +
                                          code.co_kwonlyargcount])
            _find_none_tests(code, params, False, found)
        names = _NONE_TESTED[forward] = ', '.join(found)
    return names


def _find_none_tests(code: Any, params: Set[str], closure_only: bool,
                     found: List[str]) -> None:
    """Add to ``found`` the names in ``params`` that ``code`` compares with
    ``None``: loaded as locals (unless ``closure_only``: in a nested
    function they are its closure's) or from a closure cell."""
    ops = list(dis.get_instructions(code))
    for index, op in enumerate(ops[:-1]):
        if op.opname == 'LOAD_DEREF' or (op.opname.startswith('LOAD_FAST')
                                         and not closure_only):
            loaded = op.argval if isinstance(op.argval, tuple) else \
                (op.argval, )
            name = loaded[-1]  # the value on top of the stack
        else:
            continue
        if name not in params or name in found:
            continue
        after = ops[index + 1:index + 3]
        before = ops[index - 1] if index else None
        tested = 'NONE' in after[0].opname or (
            after[0].opname == 'LOAD_CONST' and after[0].argval is None
            and len(after) > 1
            and after[1].opname in ('IS_OP', 'COMPARE_OP')) or (
                before is not None and before.opname == 'LOAD_CONST'
                and before.argval is None
                and after[0].opname in ('IS_OP', 'COMPARE_OP'))
        if tested:
            found.append(name)
    for const in code.co_consts:
        if hasattr(const, 'co_code'):
            captured = params & set(const.co_freevars)
            if captured:
                _find_none_tests(const, captured, True, found)


_CLASS_CODE: Dict[type, Tuple[frozenset, frozenset]] = {}


def _class_code(cls: type) -> Tuple[frozenset, frozenset]:
    """What the code of ``cls``'s methods (but ``__init__``), and of its
    bases' that are not torch's, names: every name it loads or reads as
    an attribute, and the keyword names its calls pass."""
    known = _CLASS_CODE.get(cls)
    if known is None:
        names: set = set()
        strings: set = set()
        stack = []
        for namespace in class_namespaces(cls):
            for name, value in namespace.items():
                function = getattr(value, '__func__', value)
                code = getattr(function, '__code__', None)
                if code is not None and name != '__init__':
                    stack.append(code)
        while stack:
            code = stack.pop()
            names.update(code.co_names)
            stack.extend(c for c in code.co_consts if hasattr(c, 'co_names'))
            strings.update(_keyword_names(code))
        known = _CLASS_CODE[cls] = (frozenset(names), frozenset(strings))
    return known


def _keyword_names(code: Any) -> Set[str]:
    """The keyword argument names of the calls ``code`` makes: the tuple
    of ``KW_NAMES`` (Python 3.11, 3.12), or the constant loaded right
    before ``CALL_KW`` (3.13 on) or ``CALL_FUNCTION_KW`` (up to 3.10)."""
    found: Set[str] = set()
    previous = None
    for op in dis.get_instructions(code):
        names = None
        if op.opname == 'KW_NAMES':
            # (Python 3.11's dis leaves argval unresolved: the constant.)
            names = code.co_consts[op.arg] if op.arg is not None and \
                op.arg < len(code.co_consts) else None
        elif op.opname in ('CALL_KW', 'CALL_FUNCTION_KW') and \
                previous is not None and previous.opname == 'LOAD_CONST':
            names = previous.argval
        if isinstance(names, tuple):
            found.update(n for n in names if isinstance(n, str))
        previous = op
    return found


def _names_in_class(cls: type) -> frozenset:
    """Every name the code of ``cls``'s methods (but ``__init__``), and of
    its bases' that are not torch's, loads or reads as an attribute."""
    return _class_code(cls)[0]


def _reads_a_proxy(error: Exception) -> bool:
    """Whether a failed trace tried to iterate over a traced value or
    take its ``len``: a list argument of unknown length would fail the
    same way (multi-level heads, ``for x in feats``), so tracing with one
    (and first the caller, to see what it passes) is not tried."""
    message = str(error)
    return (isinstance(error, fx.proxy.TraceError)
            and 'cannot be iterated' in message) or (
                isinstance(error, RuntimeError)
                and "'len' is not supported" in message)


class _StructuralCollector:

    def __init__(self, model: nn.Module):
        self.model = model
        self.evidence = Evidence(mode='structural')
        self.traces = TraceCache(model)
        # Path of each module (made when first needed), and the graphs of
        # the callers of modules traced with list arguments (``None``
        # where the trace failed).
        self.paths: Optional[Dict[int, str]] = None
        self.caller_graphs: Dict[int, Optional[fx.Graph]] = {}
        # Forwards traced with list arguments where a plain trace failed.
        self.list_forwards: Set[Any] = set()
        # mmcv ConvModules a traced forward calls with ``norm=False``.
        self.norm_skipped: Dict[int, nn.Module] = {}
        # The modules holding each module (made when first needed).
        self.parents: Optional[Dict[int, List[nn.Module]]] = None
        # ids of: every leaf conv and norm; the norms; the foldable ones;
        # modules registered under more than one name.
        self.leaf_layers, self.norms, self.foldable = set(), set(), set()
        seen, self.aliased = set(), set()
        for _, m in walk_modules(model, remove_duplicate=False):
            if id(m) in seen:
                self.aliased.add(id(m))
                continue
            seen.add(id(m))
            if not _is_leaf_layer(m):
                continue
            self.leaf_layers.add(id(m))
            if not is_conv_layer(m):
                self.norms.add(id(m))
                problem = self.evidence.norm_problems[id(m)] = \
                    norm_fold_problem(m)
                if problem is None:
                    self.foldable.add(id(m))

    def ancestors(self, module: nn.Module) -> List[nn.Module]:
        """Every module above ``module`` (through any of its names)."""
        if self.parents is None:
            self.parents = {}
            for _, holder in walk_modules(self.model):
                for child in holder._modules.values():
                    if child is not None:
                        self.parents.setdefault(id(child), []).append(holder)
        found: List[nn.Module] = []
        seen = set()
        stack = list(self.parents.get(id(module), ()))
        while stack:
            holder = stack.pop()
            if id(holder) in seen:
                continue
            seen.add(id(holder))
            found.append(holder)
            stack.extend(self.parents.get(id(holder), ()))
        return found

    def is_leaf(self, module: nn.Module) -> bool:
        return id(module) in self.leaf_layers

    def is_norm(self, module: nn.Module) -> bool:
        return id(module) in self.norms

    def direct_layers(self, module: nn.Module) -> Iterator[nn.Module]:
        """The convs and norms ``module``'s forward may call directly.

        Looks through module containers without a forward (``ModuleList``,
        ``ModuleDict``), whose children are called by this module's forward.
        """
        for child in module.children():
            if self.is_leaf(child):
                yield child
            elif isinstance(child, (nn.ModuleList, nn.ModuleDict)):
                yield from self.direct_layers(child)

    def occurrence(self, module: nn.Module, holder: nn.Module,
                   attr: str) -> Occurrence:
        occ = Occurrence(module, (holder, attr))
        self.evidence.occurrences.append(occ)
        return occ

    # -- nn.Sequential -----------------------------------------------------
    def sequential(self, seq: nn.Sequential) -> None:
        items = [(attr, m) for attr, m in seq._modules.items()
                 if m is not None]
        occs: List[Optional[Occurrence]] = []
        for attr, module in items:
            occs.append(
                self.occurrence(module, seq, attr)
                if self.is_leaf(module) else None)
        # Norms after a conv first, then norms before one: a conv between
        # two norms may absorb both.
        for index, occ in enumerate(occs):
            if occ is None or not self.is_norm(occ.module) or index == 0:
                continue
            prev = occs[index - 1]
            if prev is not None and is_conv_layer(prev.module):
                self.evidence.link(POST, occ, [prev], 'sequential')
        for index, occ in enumerate(occs):
            if occ is None or not self.is_norm(occ.module) or \
                    occ.link is not None or occ.reason is not None:
                continue
            nxt = occs[index + 1] if index + 1 < len(occs) else None
            if nxt is not None and is_conv_layer(nxt.module):
                self.evidence.link(PRE, occ, [nxt], 'sequential')
            else:
                before = type(items[index - 1][1]).__name__ \
                    if index > 0 else 'the Sequential input'
                occ.reason = f'follows {before} in a Sequential'

    # -- mmcv ConvModule ---------------------------------------------------
    def conv_module(self, block: nn.Module) -> None:
        conv = getattr(block, 'conv', None)
        if conv is None:
            return
        conv_occ = self.occurrence(conv, block, 'conv')
        if not getattr(block, 'with_norm', False):
            return
        norm_name = block.norm_name
        norm_occ = self.occurrence(getattr(block, norm_name), block, norm_name)
        passes_norm = next(
            (type(m).__name__ for m in self.ancestors(block)
             if 'norm' in _class_code(type(m))[1]), None)
        if passes_norm:
            # ``forward(x, activate=True, norm=True)``: a call that passes
            # norm=False uses the conv without the norm.
            norm_occ.reason = (f'{passes_norm} passes a norm= argument: its '
                               'ConvModule may run without the norm')
            return
        order = [layer for layer in block.order
                 if layer != 'act' or block.with_activation]
        conv_at, norm_at = order.index('conv'), order.index('norm')
        if norm_at == conv_at + 1:
            self.evidence.link(POST, norm_occ, [conv_occ], 'conv_module')
        elif conv_at == norm_at + 1 and not block.with_explicit_padding:
            self.evidence.link(PRE, norm_occ, [conv_occ], 'conv_module')
        elif conv_at == norm_at + 1:
            norm_occ.reason = ('runs before an explicit padding layer and '
                               'the conv')
        else:
            norm_occ.reason = (f'ConvModule order {tuple(block.order)}: an '
                               'activation lies between conv and norm')

    # -- anything torch.fx can trace ---------------------------------------
    def call_occurrence(self, root: nn.Module, path: str,
                        target: nn.Module) -> Occurrence:
        holder, attr = _resolve(root, path)
        occ = self.occurrence(target, holder, attr)
        if id(target) in self.aliased:
            # Registered under several names: which one the forward called
            # cannot be told from the graph.
            occ.site = None
        return occ

    def parameter_read(self, root: nn.Module, path: str,
                       metadata_only: bool = False) -> None:
        """A traced op used a tensor of a conv or norm outside a call of
        it (``F.conv2d(x, self.conv.weight)``, ``self.conv.forward(x)``):
        an unlinked use that keeps the layer from being folded in
        place.  A read of only its dtype, device or shape
        (``metadata_only``) keeps a norm (a fold leaves an Identity, which
        has none), not a conv."""
        owner_path, _, name = path.rpartition('.')
        if not owner_path:
            return
        try:
            owner = find_submodule(root, owner_path)
        except AttributeError:
            return  # not a submodule's tensor (a constant of the trace)
        if metadata_only and not self.is_norm(owner):
            return  # a conv that takes a fold keeps its tensors' kind
        if self.is_leaf(owner) and (name in owner._parameters
                                    or name in owner._buffers):
            occ = self.call_occurrence(root, owner_path, owner)
            occ.reason = 'its parameters are used outside a call of it'

    def traced(self, module: nn.Module) -> None:
        # A proxy stands for an argument given, and is never None: ``if
        # scale is None`` then takes the way of a call that gives one,
        # whatever the callers do.
        forward = type(module).forward
        for names, why in (
            (_optional_parameters(forward), 'takes optional arguments ({}):'
             ' whether a call gives them cannot be traced'),
            (_none_tested_parameters(forward), 'tests whether {} is None: '
             'a call may pass None, which a traced value never is')):
            if names:
                self.evidence.unproven.append(
                    (module, f'data flow not proven: {type(module).__name__}'
                     f'.forward {why.format(names)}'))
                return
        # A forward whose plain trace failed where a trace with list
        # arguments did (DenseNet's layers test ``isinstance(x, Tensor)``)
        # is traced with lists first at its other modules: the graph
        # holds for the calls the holder's trace shows, all of them.
        tried_lists = forward in self.list_forwards
        graph = self.traced_with_lists(module) if tried_lists else None
        try:
            if graph is None:
                graph = self.traces.trace(module)
        except Exception as error:  # fx raises many types on Python code
            graph = None if _reads_a_proxy(error) or tried_lists else \
                self.traced_with_lists(module)
            if graph is not None:
                self.list_forwards.add(forward)
            if graph is None:
                first = str(error).strip().splitlines()
                detail = first[0][:120] if first else type(error).__name__
                self.evidence.unproven.append(
                    (module, f'data flow not proven: torch.fx cannot trace '
                     f'{type(module).__name__}.forward ({detail})'))
                return
        occs: Dict[fx.Node, Occurrence] = {}
        for node in graph.nodes:
            if node.op == 'get_attr':
                self.parameter_read(module, node.target,
                                    _metadata_only(node))
                continue
            if node.op != 'call_module':
                continue
            target = find_submodule(module, node.target)
            if is_mmcv_conv_module(target) and _skips_norm(node):
                self.norm_skipped[id(target)] = target
            if not self.is_leaf(target):
                continue
            occ = self.call_occurrence(module, node.target, target)
            if node.meta.get('unfetched'):
                occ.reason = ('called through a reference other than its '
                              'attribute (a plain list, a partial): a fold '
                              'would not reach that call')
                continue
            occs[node] = occ
        pending = []
        for node, occ in occs.items():
            if not self.is_norm(occ.module):
                continue
            if len(node.args) != 1 or node.kwargs:
                occ.reason = 'called with extra arguments'
                continue
            convs = self._sources(node.args[0], occs)
            kind = POST if convs is not None and len(convs) == 1 else SUM
            if convs is None:
                convs = self._concat_sources(node.args[0], occs)
                kind = CONCAT
            if convs is None:
                pending.append((node, occ))
                continue
            self.evidence.link(kind, occ, [occs[c] for c in convs], 'fx')
        for node, occ in pending:
            users = list(node.users)
            if len(users) == 1 and users[0] in occs and \
                    is_conv_layer(occs[users[0]].module) and \
                    users[0].args == (node, ) and not users[0].kwargs:
                self.evidence.link(PRE, occ, [occs[users[0]]], 'fx')
            else:
                occ.reason = self._describe(node.args[0])

    @staticmethod
    def _sources(node, occs) -> Optional[List[fx.Node]]:
        """Conv nodes whose outputs ``node`` is (one, or a plain sum)."""
        if not isinstance(node, fx.Node) or len(node.users) != 1:
            return None
        if node in occs:
            if is_conv_layer(occs[node].module):
                return [node]
            return None
        is_add = (node.op == 'call_function' and node.target in
                  (operator.add, torch.add, operator.iadd)) or \
            (node.op == 'call_method' and node.target == 'add')
        if not is_add or len(node.args) != 2 or node.kwargs or \
                node.args[0] is node.args[1]:
            return None
        found = []
        for arg in node.args:
            inner = _StructuralCollector._sources(arg, occs)
            if inner is None:
                return None
            found.extend(inner)
        return found

    @staticmethod
    def _concat_sources(node, occs) -> Optional[List[fx.Node]]:
        """Conv nodes that ``node`` concatenates along dim 1, in order."""
        if not isinstance(node, fx.Node) or len(node.users) != 1 or \
                node.op != 'call_function' or node.target is not torch.cat:
            return None
        parts = node.args[0] if node.args else node.kwargs.get('tensors')
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get(
            'dim', 0)
        if dim != 1 or not isinstance(parts, (list, tuple)) or \
                len(set(parts)) != len(parts):
            return None
        for part in parts:
            if not isinstance(part, fx.Node) or part not in occs or \
                    not is_conv_layer(occs[part].module) or \
                    len(part.users) != 1:
                return None
        return list(parts)

    def traced_with_lists(self, module: nn.Module) -> Optional[fx.Graph]:
        """The graph of ``module.forward`` traced with the arguments its
        caller passes as lists taken as lists of unknown length (see
        ``trace_module_forward``), or ``None``.

        The caller is the module that holds ``module`` (through module
        containers): its own trace shows what each of its calls of
        ``module`` passes.  Only where every call passes a list at a
        position, and nothing but positional arguments, is the parameter
        there taken as a list; a module registered under several names is
        not tried (its calls cannot be told apart), nor one that a module
        above the caller may call itself (:meth:`reached_from_above`).
        """
        if id(module) in self.aliased:
            return None
        if self.paths is None:
            self.paths = {id(m): p for p, m in walk_modules(self.model)}
        path = self.paths.get(id(module))
        if not path:
            return None
        caller_path = path
        while True:
            caller_path = caller_path.rpartition('.')[0]
            caller = find_submodule(self.model, caller_path)
            if not isinstance(caller, (nn.ModuleList, nn.ModuleDict)) or \
                    not caller_path:
                break
        if isinstance(caller, (nn.ModuleList, nn.ModuleDict)):
            return None
        target = path[len(caller_path) + 1:] if caller_path else path
        if _optional_parameters(type(caller).forward) or \
                self.reached_from_above(caller_path, target):
            return None
        if id(caller) not in self.caller_graphs:
            try:
                self.caller_graphs[id(caller)] = self.traces.trace(caller)
            except Exception:  # fx raises many types on Python code
                self.caller_graphs[id(caller)] = None
        caller_graph = self.caller_graphs[id(caller)]
        if caller_graph is None:
            return None
        calls = [
            node for node in caller_graph.nodes
            if node.op == 'call_module' and node.target == target
        ]
        if not calls or any(node.kwargs for node in calls) or \
                len({len(node.args) for node in calls}) != 1:
            return None
        try:
            params = list(
                inspect.signature(type(module).forward).parameters)[1:]
        except (TypeError, ValueError):  # no signature to read
            return None
        lists = frozenset(
            params[index] for index in range(len(calls[0].args))
            if index < len(params) and all(
                isinstance(node.args[index], list) for node in calls))
        if not lists:
            return None
        try:
            return self.traces.trace(module, list_args=lists)
        except Exception:  # fx raises many types on Python code
            return None

    def reached_from_above(self, caller_path: str, target: str) -> bool:
        """Whether a module above the caller (at ``caller_path``) may call
        the module at ``target`` below the caller, or anything on the way,
        itself: whether the code of its class (any method but
        ``__init__``) names an attribute on that way past its own child
        (``self.block.layers[0](x)`` from the module holding ``block``).
        Those modules are not traced; their code is read instead."""
        parts = caller_path.split('.') if caller_path else []
        below = target.split('.')
        for depth in range(len(parts)):
            ancestor = find_submodule(self.model, '.'.join(parts[:depth]))
            deeper = {
                name
                for name in parts[depth + 1:] + below if not name.isdigit()
            }
            if deeper & _names_in_class(type(ancestor)):
                return True
        return False

    @staticmethod
    def _describe(source) -> str:
        if not isinstance(source, fx.Node):
            return 'input is not a traced value'
        if len(source.users) > 1:
            return 'its input is also used elsewhere'
        if source.op == 'call_module':
            return f'input comes from {source.target}, not a conv'
        target = getattr(source.target, '__name__', source.target)
        return f'input comes from {target}, not a conv'

    def run(self) -> Evidence:
        # Tracing is the cost: first the modules that call a foldable norm,
        # then the others with layers of their own, where they hold a
        # linked layer (their uses of it decide whether it is folded in
        # place, copied or left).
        pending = []
        for _, module in walk_modules(self.model):
            if not module._modules:
                continue  # a layer, an activation: calls nothing
            if isinstance(module, torch.jit.ScriptModule):
                continue  # compiled: neither traced nor read
            if is_stock_sequential(module):
                self.sequential(module)
            elif is_mmcv_conv_module(module):
                self.conv_module(module)
            elif not self.is_leaf(module) and not isinstance(
                    module, (nn.ModuleList, nn.ModuleDict)):
                layers = list(self.direct_layers(module))
                if any(id(m) in self.foldable for m in layers):
                    self.traced(module)
                elif layers:
                    pending.append(module)
        # A module that may call a linked layer (one of its own, or one it
        # reaches inside a child) is traced too, and its trace may link
        # more: repeat until nothing changes.
        while pending:
            holding = self.holders_of({
                id(occ.module)
                for occ in self.evidence.occurrences
                if occ.link is not None or occ.input_link is not None
            })
            ready = [m for m in pending if id(m) in holding]
            if not ready:
                break
            for module in ready:
                pending.remove(module)
                self.traced(module)
        for block in self.norm_skipped.values():
            self.unlink_norm_of(block)
        return self.evidence

    def unlink_norm_of(self, block: nn.Module) -> None:
        """An mmcv ConvModule called with ``norm=False`` somewhere: the
        link its ``order`` gave its norm holds only for the other calls,
        and its conv's output is used without the norm there."""
        norm = getattr(block, block.norm_name, None) \
            if getattr(block, 'with_norm', False) else None
        for occ in self.evidence.occurrences:
            if occ.module is not norm or occ.site is None or \
                    occ.site[0] is not block or occ.link is None:
                continue
            for conv in occ.link.convs:
                if conv.side(occ.link.kind) is occ.link:
                    if occ.link.kind == PRE:
                        conv.input_link = None
                    else:
                        conv.link = None
            occ.link = None
            occ.reason = ('its ConvModule is also called with norm=False: '
                          'the conv is used without the norm there')

    def holders_of(self, modules: Set[int]) -> Set[int]:
        """The ids of the modules that hold any of ``modules`` (ids)
        below them, under any of their names."""
        walk = walk_modules(self.model, remove_duplicate=False)
        by_path = dict(walk)
        found: Set[int] = set()
        seen_paths: Set[str] = set()
        for path, module in walk:
            if id(module) not in modules:
                continue
            while path:
                path = path.rpartition('.')[0]
                if path in seen_paths:
                    break  # and so are the paths above it
                seen_paths.add(path)
                found.add(id(by_path[path]))
        return found


def collect_structural_evidence(model: nn.Module) -> Evidence:
    """Prove conv/norm data flow in ``model`` from its structure alone."""
    return _StructuralCollector(model).run()
