"""torch.fx tracing of one module's own forward, every submodule a call.

Both structure-only discovery and the generic re-parameterization read the
graph of a single module's ``forward`` in which every submodule call is one
``call_module`` node.  ``torch.fx.Tracer.trace`` gives that graph, but on
every trace it replaces ``nn.Module.__call__`` and ``nn.Module.__getattr__``
on the class and puts them back: four assignments of special methods on a
class that every module type derives from, each of which makes CPython
update the slots of every subclass.  With mmdet, mmseg and friends imported
that is over a thousand classes, about 0.3 ms per assignment, and the bulk
of the time of a structure-only fusion.

:class:`ModuleForwardTracer` builds the same graph without touching the
class: the submodules of the traced module are intercepted one by one
through their ``_compiled_call_impl`` slot (the per-instance hook that
``nn.Module.__call__`` consults first, as ``Module.compile`` uses it), and
put back afterwards: first only the children (and the entries of module
containers among them), and every submodule where the forward reaches
deeper.  A call of a module outside the traced one fails the trace, as it
does with ``torch.fx`` (calls other threads make of modules outside it
are left alone; tracing a module that another thread is running is not
supported, as with ``torch.fx``).  Which of several names a module
registered twice was called by cannot be told, with either tracer: the
graph names it by its first path, and callers treat such a call's site as
unknown.

Two differences from a stock trace: attributes and parameters are read as
their values (as with a ``getattr`` override that returns ``attr_val``),
and functions registered with ``torch.fx.wrap`` are traced through rather
than kept as calls.  Where this torch lacks the slot, or a submodule
overrides ``__call__``, the stock ``Tracer.trace`` runs instead.

A traced value is neither a tensor nor a list to ``isinstance``, whatever
it stands for: a forward whose own code tests the type of one
(``isinstance(x, torch.Tensor)``, ``isinstance(out, tuple)``) would be
traced down a way it may not take when run, so such a test fails the
trace (see :class:`_TracedValue`; no forward of the real models this is
tested on makes one).  ``type(x) is ...`` cannot be seen that way, so a
module is not traced where its forward, or a method of its class or a
function of the model's code that such code names, calls the builtin
``type`` (:func:`type_call_in`); one that reaches it otherwise
(``builtins.type``, ``getattr``, library code) stays an assumption, as
with torch.fx.

A forward that takes a list of tensors (DenseNet's ``DenseLayer``:
``assert isinstance(x, list)``, then ``torch.cat(x, 1)``) can be traced
with that argument a *symbolic list* (``list_args``): a list whose length
and items no Python code may read (see :class:`_SymbolicList`), so that the
graph holds for a list of any length.
"""
import bisect
import builtins
import copy
import dis
import functools
import gc
import heapq
import inspect
import operator
import os
import sys
import sysconfig
import threading
import types
import weakref
from typing import (Any, Collection, Dict, Iterator, List, Optional, Set,
                    Tuple)

import torch
from torch import fx, nn
from torch.fx import _symbolic_trace as fx_internals

from ..layers import is_conv_layer, is_norm_layer
from ..module_walk import unchanged_memo, walk_modules

__all__ = ['ModuleForwardTracer', 'trace_module_forward', 'TENSOR_METADATA']

_CALL = nn.Module.__call__
# ``nn.Module.__call__`` runs ``_compiled_call_impl`` when an instance has
# one: the interception point.
_HAS_CALL_SLOT = getattr(nn.Module, '_wrapped_call_impl', None) is _CALL \
    and hasattr(nn.Module, '_compiled_call_impl')


def _set_fx_tracing(value: bool) -> bool:
    """Set torch.fx's "is tracing" flag (read by ``is_fx_tracing()``);
    returns the old value."""
    setter = getattr(fx_internals, '_set_is_fx_tracing', None)
    if setter is not None:
        old = fx_internals._get_is_fx_tracing()
        setter(value)
        return old
    old = getattr(fx_internals, '_is_fx_tracing_flag', False)
    fx_internals._is_fx_tracing_flag = value
    return old


def _autocast_state() -> Tuple:
    """Whether ``torch.autocast`` is on, and in which dtype, on the CPU
    and on CUDA."""
    return tuple((torch.is_autocast_enabled(device),
                  torch.get_autocast_dtype(device))
                 for device in ('cpu', 'cuda'))


#: Whether autocast is on anywhere: one call (private, torch.autocast's
#: own), where :func:`_autocast_state` takes four.
_ANY_AUTOCAST = getattr(torch._C, '_is_any_autocast_enabled', None)


def _storage_pointer(value: Any) -> int:
    """Where a tensor's memory lies (0 for none: no tensor, no memory, a
    tensor whose storage cannot be read)."""
    if not isinstance(value, torch.Tensor) or nn.parameter.is_lazy(value):
        return 0
    try:
        return value.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, ValueError):
        return 0


class ModuleForwardTracer(fx.Tracer):
    """Traces ``root.forward`` with every submodule kept as a call.

    Args:
        root: The module whose forward is traced.
    """

    def __init__(self, root: nn.Module, list_args: Collection[str] = ()):
        # No autowrapping of ``math`` functions: it patches every global of
        # the traced code on each trace.
        super().__init__(autowrap_modules=(), autowrap_functions=())
        self.root_module = root
        self.list_args = frozenset(list_args)
        # What the forward tried to read of a symbolic list, and where it
        # tested the type of a traced value.
        self.list_reads: List[str] = []
        self.type_tests: List[str] = []
        # Reads of a traced value the trace refused (its truth, length,
        # items), kept in case the forward catches the error and goes on.
        self.refused_reads: List[str] = []
        # Operations recorded while the forward had ``torch.autocast``
        # otherwise than at the start (a context manager the graph does
        # not show), and that state.
        self.autocast_ops: List[str] = []
        self.autocast = _autocast_state()
        # The root's and its submodules' tensor attributes, ``(tensor,
        # path)`` by ``id``, once this trace has looked for one.
        self._submodule_attributes: Optional[Dict[int, Tuple[
            torch.Tensor, str]]] = None
        # ``get_attr`` proxies of parameters and buffers, by path.
        self.tensor_proxies: Dict[str, fx.Proxy] = {}
        # The convs and norms (ids) the forward used otherwise than by
        # calling them or reading their tensors (see :class:`_LayerStandIn`),
        # or asked for a tensor they do not have (``self.conv.bias is
        # None``): reads no node records.
        self.read_layers: Set[int] = set()
        # The stand-ins handed out for the convs and norms, by ``id``, and
        # the layer whose call a stand-in is making.
        self.stand_ins: Dict[int, '_LayerStandIn'] = {}
        self.calling: Optional[int] = None
        # Whether the model's code is running (not the tracer's own walks
        # of the module, which neither count nor get traced values).
        self.model_reads = True
        # Submodules (ids) the module's state also holds outside the
        # module tables (a plain list, a partial, a bound method).
        self.held_otherwise: Set[int] = set()
        # The root's parameters and buffers by where their memory lies
        # (made when first needed).
        self.state_storages: Optional[Dict[int, str]] = None
        # Every traced value made, weakly: one still alive after the trace
        # (but the tracer's own) was kept somewhere.
        self.made: List[weakref.ref] = []

    def kept_values(self) -> int:
        """How many traced values outlive the trace, the tracer's own
        ``get_attr`` proxies aside (after a garbage collection, where any
        seem to: a reference cycle of the model's code may hold some
        until then)."""
        def count() -> int:
            alive = [ref() for ref in self.made]
            own = {id(proxy) for proxy in self.tensor_proxies.values()}
            return sum(1 for value in alive
                       if value is not None and id(value) not in own)

        kept = count()
        if kept:
            gc.collect()
            kept = count()
        return kept

    def proxy(self, node: fx.Node) -> fx.Proxy:
        value = _TracedValue(node, self)
        self.made.append(weakref.ref(value))
        return value

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return m is not self.root_module

    def to_bool(self, obj: fx.Proxy) -> bool:
        flag = self.scalar_flag(obj)
        if flag is not None:
            return bool(flag)
        self.refused_reads.append('its truth value')
        return super().to_bool(obj)

    def scalar_flag(self, obj: fx.Proxy) -> Optional[torch.Tensor]:
        """The value of a one-element parameter or buffer that ``obj``
        stands for (itself, or its ``.item()``), which the forward may read
        as a flag or a number (``if self.flag``, ``float(self.alpha)``):
        the trace then holds for that value, and the trace cache tells
        modules apart by it (the floating point tensors of convs and
        norms aside, which are not read so).  ``None`` for anything
        else."""
        node = getattr(obj, 'node', None)
        if node is not None and node.op == 'call_method' and \
                node.target == 'item' and len(node.args) == 1 and \
                not node.kwargs:
            node = node.args[0]
        found = self.attribute_tensor(node)
        if found is None:
            return None
        owner, value = found
        if value.numel() != 1 or (
                value.is_floating_point() and
                (is_conv_layer(owner) or is_norm_layer(owner))):
            return None
        return value.detach()

    def attribute_tensor(self, node: Any
                         ) -> Optional[Tuple[nn.Module, torch.Tensor]]:
        """``(owner, tensor)`` of the parameter or buffer a ``get_attr``
        node reads, or ``None`` for any other node."""
        if not isinstance(node, fx.Node) or node.op != 'get_attr':
            return None
        owner_path, _, name = node.target.rpartition('.')
        owner = self.root
        for part in owner_path.split('.') if owner_path else ():
            # (Read past the trace's tables: not a read of the model's.)
            table = owner.__dict__.get('_modules') or {}
            owner = dict.get(table, part)
            if owner is None:
                return None
        for table in ('_parameters', '_buffers'):
            entries = owner.__dict__.get(table)
            if entries is not None and name in entries:
                value = dict.__getitem__(entries, name)
                if isinstance(value, torch.Tensor):
                    return owner, value
        return None

    def iter(self, obj: fx.Proxy):
        self.refused_reads.append('its items')
        return super().iter(obj)

    def keys(self, obj: fx.Proxy):
        self.refused_reads.append('its keys')
        return super().keys(obj)

    def tensor_proxy(self, path: str) -> fx.Proxy:
        """The ``get_attr`` proxy of the parameter or buffer at ``path``
        (one node per tensor)."""
        proxy = self.tensor_proxies.get(path)
        if proxy is None:
            proxy = self.tensor_proxies[path] = self.create_proxy(
                'get_attr', path, (), {})
        return proxy

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache):
        return attr_val

    def create_arg(self, a: Any) -> Any:
        # The usual arguments first: ``Tracer.create_arg`` tests every
        # argument for a parameter, buffer, module or constant before it
        # gets to a proxy or a number.
        kind = type(a)
        if kind is _TracedValue or kind is _SymbolicList:
            return a.node
        if kind in _PLAIN_ARGUMENTS:
            return a
        if kind is tuple:
            return tuple(self.create_arg(item) for item in a)
        if kind is dict and not a:
            return {}
        # (Walks the module's tables: as the tracer, not the model.)
        was, self.model_reads = self.model_reads, False
        try:
            if isinstance(a, torch.Tensor) and \
                    not isinstance(a, nn.Parameter):
                shared = self.state_sharing(a)
                if shared is not None:
                    raise fx.proxy.TraceError(
                        f'the forward uses a tensor that shares memory with '
                        f'{shared} (read past the trace: state_dict(), '
                        'detach())')
                if a not in self.tensor_attrs:
                    self._name_submodule_attribute(a)
            return super().create_arg(a)
        finally:
            self.model_reads = was

    def _name_submodule_attribute(self, tensor: torch.Tensor) -> None:
        """Give ``tensor`` its path in the graph (a ``get_attr`` node, not
        a constant) where it is a plain attribute of a submodule: a read
        of a conv's weight that a spectral or weight norm hook sets is a
        read of that conv's state.  The submodules' tensor attributes are
        read once per trace, at its first constant."""
        if self._submodule_attributes is None:
            self._submodule_attributes = {}
            # (The live tree, not a walk kept from before the trace: the
            # forward may have added modules.)
            for path, module in self.root.named_modules():
                for key, value in module.__dict__.items():
                    if type(value) not in PLAIN_TYPES and \
                            key not in MODULE_INTERNALS and \
                            isinstance(value, torch.Tensor):
                        self._submodule_attributes.setdefault(
                            id(value), (value,
                                        f'{path}.{key}' if path else key))
        known = self._submodule_attributes.get(id(tensor))
        if known is not None and known[0] is tensor:
            self.tensor_attrs[tensor] = known[1]

    def state_sharing(self, tensor: torch.Tensor) -> Optional[str]:
        """The path of a parameter or buffer of the root whose memory
        ``tensor`` shares (a ``detach()`` or ``state_dict()`` read of
        it, which the graph would hold as a constant), or ``None``."""
        if self.state_storages is None:
            # (The same for every trace of a discovery: no module changes.)
            memo = unchanged_memo('state storages')
            known = None if memo is None else memo.get(id(self.root))
            if known is not None and known[0] is self.root:
                self.state_storages = known[1]
            else:
                self.state_storages = self._state_storages()
                if memo is not None:
                    memo[id(self.root)] = (self.root, self.state_storages)
        pointer = _storage_pointer(tensor)
        return self.state_storages.get(pointer) if pointer else None

    def _state_storages(self) -> Dict[int, str]:
        """The root's parameters and buffers by where their memory lies."""
        storages: Dict[int, str] = {}
        for path, module in walk_modules(self.root):
            for table in ('_parameters', '_buffers'):
                # (Past the trace's tables, which hand out proxies.)
                entries = module.__dict__.get(table) or {}
                for name, value in (dict.items(entries) if isinstance(
                        entries, dict) else entries.items()):
                    pointer = _storage_pointer(value)
                    if pointer:
                        storages.setdefault(
                            pointer, f'{path}.{name}' if path else name)
        return storages

    def create_node(self, kind: str, target: Any, args: Tuple[Any, ...],
                    kwargs: Dict[str, Any], name: Optional[str] = None,
                    type_expr: Any = None) -> fx.Node:
        # Without the module-scope and stack-trace metadata that
        # ``TracerBase.create_node`` records: these graphs are read, never
        # run or exported.  For the same reason an operation's node is
        # named 'op', 'op_1', ... rather than after its target, and gets
        # its arguments after it is made: ``Graph.create_node`` scans
        # them for symbolic sizes to warn about (none come out of this
        # trace), which took a fifth of the time of a trace.
        if kind not in _OPERATIONS:
            return self.graph.create_node(kind, target, args, kwargs, name,
                                          type_expr)
        if self._autocast_changed():
            self.autocast_ops.append(str(getattr(target, '__name__',
                                                 target)))
        node = self.graph.create_node(kind, target, None, None, name or 'op',
                                      type_expr)
        if args:
            node.args = args
        if kwargs:
            node.kwargs = kwargs
        return node

    def _autocast_changed(self) -> bool:
        """Whether ``torch.autocast`` is otherwise than at the start of the
        trace (by one cheap call where it was off everywhere)."""
        if _ANY_AUTOCAST is not None and not any(
                enabled for enabled, _ in self.autocast):
            return _ANY_AUTOCAST()
        return _autocast_state() != self.autocast

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        names = _plain_parameters(root_fn) \
            if is_module and not concrete_args else None
        if names is None:
            fn, args = super().create_args_for_root(root_fn, is_module,
                                                    concrete_args)
        else:
            # What ``Tracer.create_args_for_root`` makes of such a forward
            # (the module, then a placeholder per parameter), without its
            # signature and pytree work: a fifth of a small module's trace.
            annotations = root_fn.__annotations__
            fn, args = root_fn, [self.root] + [
                self.create_proxy('placeholder', name, (), {},
                                  type_expr=annotations.get(name))
                for name in names
            ]
        if not self.list_args:
            return fn, args
        # One placeholder per parameter: only then is each argument the
        # parameter of its position.
        params = list(inspect.signature(root_fn).parameters.values())
        if concrete_args or len(params) != len(args) or any(
                p.kind is not p.POSITIONAL_OR_KEYWORD for p in params):
            raise fx.proxy.TraceError(
                'list arguments need a forward of plain parameters')
        args = list(args)
        for index, param in enumerate(params):
            if param.name in self.list_args:
                args[index] = _SymbolicList(args[index], self.list_reads)
        return fn, tuple(args)

    def trace(self,
              root: nn.Module,
              concrete_args: Optional[Dict[str, Any]] = None) -> fx.Graph:
        caller = type_call_in(type(root))
        if caller is not None:
            raise fx.proxy.TraceError(
                f'{caller} calls type() or id(), which a traced value or '
                'a stand-in for a layer would answer '
                'differently from the value it stands for')
        if not _HAS_CALL_SLOT or isinstance(root, fx.GraphModule):
            return self._stock_trace(root, concrete_args)
        # Most forwards call only their children (or the entries of a
        # ModuleList/ModuleDict/Sequential child): intercept those, and
        # only when the forward reaches deeper intercept every submodule.
        # The first pass may leave values on the module: the second starts
        # from its attributes as they were.
        state = dict(root.__dict__)
        graph = self._trace(root, concrete_args, _callable_children(root))
        if graph is None:
            root.__dict__.clear()
            root.__dict__.update(state)
            graph = self._trace(root, concrete_args, [
                (n, m) for n, m in root.named_modules() if m is not root
            ])
        if graph is None:
            raise NameError(f'{type(root).__name__}.forward calls a module '
                            'that is not one of its submodules')
        return graph

    def _stock_trace(self, root: nn.Module,
                     concrete_args: Optional[Dict[str, Any]]) -> fx.Graph:
        """``torch.fx.Tracer.trace``, failing as :meth:`_trace` does where
        the forward tested the type of a traced value."""
        if self.list_args:
            raise fx.proxy.TraceError('list arguments need the module '
                                      'call slot')
        self._start_checks()
        graph = super().trace(root, concrete_args)
        self._raise_for_refusals()
        return graph

    def _trace(self, root: nn.Module, concrete_args: Optional[Dict[str, Any]],
               submodules: List[Tuple[str, nn.Module]]) -> Optional[fx.Graph]:
        """The graph, or ``None`` when the forward called a module other
        than ``submodules``."""
        if any(type(m).__call__ is not _CALL for _, m in submodules):
            return self._stock_trace(root, concrete_args)
        self.root = root
        self.root_module_name = root._get_name()
        self.submodule_paths = {m: n for n, m in reversed(submodules)}
        self.graph = fx.Graph(tracer_cls=type(self))
        # Tensors stored as plain attributes of the module, by value: a
        # traced op reading one gets a ``get_attr`` node (other constants
        # get one too, under a generated name).
        self.tensor_attrs = {
            value: key
            for key, value in root.__dict__.items()
            if isinstance(value, torch.Tensor)
        }
        forward = type(root).forward
        # (Read before anything is set up that must be put back.)
        self.held_otherwise = _held_otherwise(root)
        saved = [(m, m.__dict__.get('_compiled_call_impl', _MISSING))
                 for _, m in submodules]
        for _, module in submodules:
            module.__dict__['_compiled_call_impl'] = self._intercept(module)
        # Parameters and buffers read by the forward are traced values
        # (``get_attr`` nodes), as with torch.fx: what the forward does with
        # them is in the graph, not done to the model's tensors, and a
        # Python decision on their values fails the trace.
        tables = _traced_tensor_tables(root, self)
        refused = []
        thread = threading.get_ident()
        handle = nn.modules.module.register_module_forward_pre_hook(
            lambda module, args: _refuse_call(module, refused, thread))
        was_tracing = _set_fx_tracing(True)
        self.list_reads.clear()
        self._start_checks()
        self.tensor_proxies.clear()
        self.read_layers.clear()
        self.stand_ins.clear()
        self.calling = None
        self.model_reads = True
        problems: List[str] = []
        watching = False
        try:
            if self.list_args:
                watching = _watch_code(problems)
            # Functions registered with ``torch.fx.wrap`` are traced
            # through, not kept as calls: the graph then shows what they
            # compute (or the trace fails), and wrapping them all costs
            # more than most traces.
            fn, args = self.create_args_for_root(forward, True,
                                                 concrete_args)
            returns = getattr(inspect.unwrap(forward), '__annotations__',
                              {}).get('return')
            self.create_node('output', 'output',
                             (self.create_arg(fn(*args)), ), {},
                             type_expr=returns)
        except _CallRefused:
            return None
        finally:
            if watching:
                sys.settrace(None)
            _set_fx_tracing(was_tracing)
            handle.remove()
            for state, name, table in tables:
                state[name] = table
            for module, old in saved:
                if old is _MISSING:
                    module.__dict__.pop('_compiled_call_impl', None)
                else:
                    module.__dict__['_compiled_call_impl'] = old
            self.submodule_paths = None
        # The forward may have caught the refusal and gone on another way.
        if refused:
            return None
        if self.list_reads:  # read a symbolic list, then went on
            raise fx.proxy.TraceError(
                f'the forward reads a list argument ({self.list_reads[0]})')
        self._raise_for_refusals()
        if problems:
            raise fx.proxy.TraceError(problems[0])
        self.graph.read_modules = self._read_modules(root)
        return self.graph

    def _read_modules(self, root: nn.Module) -> Tuple[str, ...]:
        """The paths of the convs and norms the forward used otherwise
        than by calling them, testing them by identity or reading their
        tensors (a node each): ``isinstance(self.bn, ...)``,
        ``self.bn.eps``, a hook registered on one, a walk of the modules
        below (see :class:`_LayerStandIn`); or asked for a tensor they do
        not have (``self.conv.bias is None``)."""
        # (A layer the module also holds outside its tables may be read
        # through that reference, which the trace does not see.)
        read = self.read_layers | self.held_otherwise
        if not read:
            return ()
        return tuple(path for path, module in walk_modules(root)
                     if id(module) in read and path)

    def stand_in(self, module: Any) -> Any:
        """What the model's code gets for ``module``, fetched from a
        module table: a conv's or norm's :class:`_LayerStandIn` (one per
        layer and trace), anything else itself."""
        if not self.model_reads or not isinstance(module, nn.Module):
            return module
        known = self.stand_ins.get(id(module))
        if known is not None:
            return known
        if not (is_conv_layer(module) or is_norm_layer(module)) or \
                type(module).__call__ is not _CALL:
            return module
        made = self.stand_ins[id(module)] = _LayerStandIn(module, self)
        return made

    def _start_checks(self) -> None:
        """Forget what the last trace refused, and take the autocast state
        this one starts from (see :meth:`_raise_for_refusals`)."""
        self.type_tests.clear()
        self.refused_reads.clear()
        self.autocast_ops.clear()
        self.autocast = _autocast_state()
        # (Read again by each trace: a forward may set attributes.)
        self._submodule_attributes = None

    def _raise_for_refusals(self) -> None:
        """Fail the trace where the forward tested the type of a traced
        value, went on after one refused a read (caught it), or ran
        operations under another ``torch.autocast`` (in another dtype than
        the graph would say)."""
        if self.autocast_ops:
            raise fx.proxy.TraceError(
                'the forward changes torch.autocast for some operations '
                f'({self.autocast_ops[0]}), which its graph does not show')
        if self.type_tests:
            raise fx.proxy.TraceError('the forward tests the type of a '
                                      f'traced value ({self.type_tests[0]})')
        if self.refused_reads:
            raise fx.proxy.TraceError(
                'the forward went on after a traced value refused a read '
                f'({self.refused_reads[0]})')

    def _intercept(self, module: nn.Module):
        # Every intercepted module is a leaf: one ``call_module`` node
        # (what ``Tracer.call_module`` makes of a leaf, without its scope
        # bookkeeping).  A call not made through the module's stand-in
        # reached it some other way (a plain list, a ``functools.partial``
        # made before): its node is marked ``unfetched``, a call a change
        # at the module's path would miss.  (Only convs and norms have
        # stand-ins, and only their calls' marks are read.)
        path = self.submodule_paths[module]
        key = id(module)

        def call(*args, **kwargs):
            proxy = self.create_proxy('call_module', path, args, kwargs)
            if self.calling != key or key in self.held_otherwise:
                proxy.node.meta['unfetched'] = True
            return proxy

        return call


_MISSING = object()


def _plain_parameters(function: Any) -> Optional[Tuple[str, ...]]:
    """The names of the parameters of a plain method after ``self``, or
    ``None`` unless every one is positional, without a default (no
    ``*args``, ``**kwargs``, keyword-only ones), and ``function`` is not
    a wrapper (``functools.wraps``)."""
    if not isinstance(function, types.FunctionType) or \
            function.__defaults__ is not None or \
            function.__kwdefaults__ is not None or \
            hasattr(function, '__wrapped__'):
        return None
    code = function.__code__
    if code.co_kwonlyargcount or code.co_argcount < 1 or \
            code.co_flags & (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS):
        return None
    return code.co_varnames[1:code.co_argcount]


#: Arguments that are their own graph argument.
_PLAIN_ARGUMENTS = frozenset({
    type(None), bool, int, float, complex, str, torch.dtype, torch.device,
    torch.layout, torch.memory_format
})
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)
#: Node kinds that are operations (named 'op...' in these graphs).
_OPERATIONS = frozenset({'call_module', 'call_function', 'call_method'})


class _TraceTable(dict):
    """A module's table (of parameters, buffers or submodules) during a
    trace: the model's code reads its entries through ``__getitem__``,
    also by iteration and by copying the table (a table of its own
    ``__iter__``: ``dict(table)`` and ``{**table}`` go through ``keys``
    and ``__getitem__``); the tracer's own walks (``model_reads`` off)
    read them as they are."""

    def __init__(self, table: Dict[str, Any], tracer: ModuleForwardTracer):
        super().__init__(table)
        self.tracer = tracer

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self else default

    def __iter__(self):
        return iter(dict.keys(self))

    def values(self):
        if not self.tracer.model_reads:
            return dict.values(self)
        return [self[name] for name in dict.keys(self)]

    def items(self):
        if not self.tracer.model_reads:
            return dict.items(self)
        return [(name, self[name]) for name in dict.keys(self)]

    def copy(self):
        return {name: self[name] for name in dict.keys(self)}


class _TracedTensors(_TraceTable):
    """A module's ``_parameters`` or ``_buffers`` during a trace: an entry
    the model's code reads (``Module.__getattr__``, ``parameters()``,
    ``buffers()``, ``state_dict()``) is the tracer's ``get_attr`` proxy
    of it; a read of an entry that is ``None`` is noted
    (``ModuleForwardTracer.read_layers``)."""

    def __init__(self, table: Dict[str, Any], prefix: str,
                 tracer: ModuleForwardTracer, owner: nn.Module):
        super().__init__(table, tracer)
        self.prefix = prefix
        self.owner = id(owner)

    def __getitem__(self, name: str) -> Any:
        value = dict.__getitem__(self, name)
        if value is None:
            if self.tracer.model_reads:
                self.tracer.read_layers.add(self.owner)
            return None
        return self.tracer.tensor_proxy(self.prefix + name)


class _ModuleTable(_TraceTable):
    """A module's ``_modules`` during a trace: a conv or norm the model's
    code fetches of it comes as its :class:`_LayerStandIn`."""

    def __getitem__(self, name: str) -> Any:
        return self.tracer.stand_in(dict.__getitem__(self, name))


#: Attributes of a conv or linear layer that a fold keeps, and so does
#: the plain conv that replaces one transforming its weight.
_KEPT_LAYER_SETTINGS = frozenset({
    'in_channels', 'out_channels', 'kernel_size', 'stride', 'padding',
    'dilation', 'groups', 'padding_mode', 'transposed', 'output_padding',
    'in_features', 'out_features'
})


class _LayerStandIn:
    """A conv or norm below the traced module, as the model's code gets it
    in a trace: calling it calls the layer (a ``call_module`` node), and
    so does testing it by identity or truth (``if self.norm is not
    None``), which a fold does not change (a folded norm is an
    ``nn.Identity``); reading its parameters or buffers by name gives
    their traced values (``get_attr`` nodes), and reading a conv's
    geometry (``self.conv.out_channels``) its value.  Any other use
    (``isinstance(self.bn, ...)``, ``self.bn.eps``, a hook registered
    on it, a method called, an attribute set) is noted in the tracer's
    ``read_layers``: a fold would change what it reads.
    """

    # (Weakly referable, as a module is: a ``TypeError`` there would send
    # the forward another way.)
    __slots__ = ('_mmfuse_layer', '_mmfuse_tracer', '__weakref__')

    def __init__(self, layer: nn.Module, tracer: ModuleForwardTracer):
        object.__setattr__(self, '_mmfuse_layer', layer)
        object.__setattr__(self, '_mmfuse_tracer', tracer)

    def __call__(self, *args, **kwargs):
        layer = object.__getattribute__(self, '_mmfuse_layer')
        tracer = object.__getattribute__(self, '_mmfuse_tracer')
        outer, tracer.calling = tracer.calling, id(layer)
        try:
            return layer(*args, **kwargs)
        finally:
            tracer.calling = outer

    def __getattribute__(self, name: str) -> Any:
        layer = object.__getattribute__(self, '_mmfuse_layer')
        tracer = object.__getattribute__(self, '_mmfuse_tracer')
        if tracer.model_reads and not (
                name in layer._parameters or name in layer._buffers or
                (name in _KEPT_LAYER_SETTINGS and is_conv_layer(layer)) or
                # torch's own test that a module is one (``add_module``
                # of a ModuleList sliced, ``get_submodule``): the class
                # is all it gets.
                (name == '__class__' and _is_torch_code(
                    sys._getframe(1).f_code.co_filename))):
            tracer.read_layers.add(id(layer))
        return getattr(layer, name)

    def _mmfuse_read(self) -> nn.Module:
        """The layer, noted as read (by an operation of its own type:
        ``hash``, ``==``, ``str``)."""
        layer = object.__getattribute__(self, '_mmfuse_layer')
        object.__getattribute__(self, '_mmfuse_tracer').read_layers.add(
            id(layer))
        return layer

    # What Python asks of the type, past ``__getattribute__``: each is a
    # read (a set or dict of the real modules, a name printed).
    def __hash__(self) -> int:
        return hash(_LayerStandIn._mmfuse_read(self))

    def __eq__(self, other: Any) -> bool:
        layer = _LayerStandIn._mmfuse_read(self)
        return other is self or other is layer

    def __ne__(self, other: Any) -> bool:
        return not _LayerStandIn.__eq__(self, other)

    def __repr__(self) -> str:
        return repr(_LayerStandIn._mmfuse_read(self))

    def __str__(self) -> str:
        return str(_LayerStandIn._mmfuse_read(self))

    def __format__(self, spec: str) -> str:
        return format(_LayerStandIn._mmfuse_read(self), spec)

    def __dir__(self):
        return dir(_LayerStandIn._mmfuse_read(self))

    def __setattr__(self, name: str, value: Any) -> None:
        layer = object.__getattribute__(self, '_mmfuse_layer')
        object.__getattribute__(self, '_mmfuse_tracer').read_layers.add(
            id(layer))
        setattr(layer, name, value)

    def __delattr__(self, name: str) -> None:
        layer = object.__getattribute__(self, '_mmfuse_layer')
        object.__getattribute__(self, '_mmfuse_tracer').read_layers.add(
            id(layer))
        delattr(layer, name)


#: Types of plain values, tested exactly before anything else.
PLAIN_TYPES = frozenset({type(None), str, bytes, int, float, complex, bool})
#: Values whose attributes hold nothing of a model's: not looked into.
_PLAIN_VALUES = (type(None), torch.Tensor, str, bytes, int, float, complex,
                 bool, type, types.ModuleType, torch.dtype, torch.device)


def _held_otherwise(root: nn.Module) -> Set[int]:
    """The ids of the modules under ``root`` that the state of ``root``
    or of a module under it holds outside the module tables (``self.steps
    = [self.conv, self.bn]``, ``functools.partial(self.bn)``, a bound
    method, a lambda's closure, a plain object's attribute): a forward may
    call them without fetching them."""
    modules = walk_modules(root)
    members = {id(module) for _, module in modules}
    # What each module's state holds, kept while no module changes (the
    # traces of a discovery, each of which puts the state back).
    memo = unchanged_memo('held')
    if memo is None:
        memo = {}
    found: Set[int] = set()
    for _, module in modules:
        if module is not root and not module._modules:
            continue  # a leaf: its forward does not run in the trace
        held = memo.get(id(module))
        if held is None or held[0] is not module:
            held = memo[id(module)] = (module, [
                id(inner) for name, value in module.__dict__.items()
                if name not in MODULE_INTERNALS and not is_plain(value)
                for inner in modules_held_in(value)
            ])
        found.update(key for key in held[1] if key in members)
    return found


def is_plain(value: Any) -> bool:
    """Whether ``value`` holds nothing of a model's for certain: a number,
    a string, ``None``, a tuple of those (most of a module's settings)."""
    kind = type(value)
    return kind in PLAIN_TYPES or (kind is tuple and all(
        type(item) in PLAIN_TYPES for item in value))


def holds_only_settings(value: Any, also: Tuple[type, ...] = (),
                        depth: int = 3) -> bool:
    """Whether ``value`` is plainly settings, holding no module or tensor
    of a model's: a number, a string, ``None``, an instance of ``also``,
    or a tuple, list or dict of those (a config dict), ``depth`` levels
    deep; ``False`` where that is not plain."""
    kind = type(value)
    if kind in PLAIN_TYPES or (also and isinstance(value, also)):
        return True
    if depth <= 0:
        return False
    if kind is tuple or kind is list:
        return all(holds_only_settings(item, also, depth - 1)
                   for item in value)
    if isinstance(value, dict):
        return all(holds_only_settings(item, also, depth - 1)
                   for item in dict.values(value))
    return False


def modules_held_in(value: Any, depth: int = 4) -> List[nn.Module]:
    """The modules ``value`` is or holds, ``depth`` levels deep at most
    (see :func:`_held_values`)."""
    return _held_values(value, depth, nn.Module)


def _held_values(value: Any, depth: int, kind: type,
                 first: bool = False) -> List[Any]:
    """The instances of ``kind`` among ``value`` and what it holds,
    ``depth`` levels deep at most: in containers, partials, bound methods
    (one of a module gives the module), functions (their closures and
    defaults) and plain objects (their attributes).  Modules, traced
    values and plain values are given but not looked into.  With
    ``first``, the first found alone (nothing further is read)."""
    found = []
    pending = [(value, 0)]
    seen: Set[int] = set()
    while pending:
        item, level = pending.pop()
        if type(item) in PLAIN_TYPES:  # (most settings: at once)
            continue
        if isinstance(item, types.MethodType) and \
                isinstance(item.__self__, nn.Module):
            item = item.__self__
        if isinstance(item, kind):
            found.append(item)
            if first:
                break
        if level >= depth or id(item) in seen or isinstance(
                item, (nn.Module, fx.Proxy) + _PLAIN_VALUES):
            continue
        seen.add(id(item))
        level += 1
        pending.extend([(child, level) for child in _contents(item)])
    return found


def _traced_tensor_tables(root: nn.Module, tracer: ModuleForwardTracer
                          ) -> List[Tuple[Dict[str, Any], str, Dict]]:
    """Give every module under ``root`` (``root`` too) tables of
    parameters and buffers that hand out traced values, and of submodules
    that hand out stand-ins; returns what to put back: ``(module.__dict__,
    name, table)``."""
    swapped = []
    for path, module in walk_modules(root):
        if isinstance(module, torch.jit.ScriptModule):
            continue  # its tables are the compiled module's own
        state = module.__dict__
        prefix = f'{path}.' if path else ''
        for name in ('_parameters', '_buffers'):
            table = state.get(name)
            if table:
                swapped.append((state, name, table))
                state[name] = _TracedTensors(table, prefix, tracer, module)
        table = state.get('_modules')
        if table:
            swapped.append((state, '_modules', table))
            state['_modules'] = _ModuleTable(table, tracer)
    return swapped


class _CallRefused(Exception):
    """A module that is not intercepted was called during a trace."""


def _refuse_call(module: nn.Module, refused: List[nn.Module],
                 thread: int) -> None:
    if threading.get_ident() != thread:
        return  # another thread running its own model: none of ours
    refused.append(module)
    raise _CallRefused(type(module).__name__)


def _callable_children(root: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(path, module)`` of the children of ``root`` and, through module
    containers, of their entries, in the pre-order ``named_modules`` walks
    them (so a module registered twice gets the path torch.fx gives it)."""
    found: List[Tuple[str, nn.Module]] = []

    def walk(prefix: str, module: nn.Module) -> None:
        for name, child in module._modules.items():
            if child is None:
                continue
            path = f'{prefix}.{name}' if prefix else name
            found.append((path, child))
            if isinstance(child, _CONTAINERS):
                walk(path, child)

    walk('', root)
    return found


def trace_module_forward(root: nn.Module,
                         concrete_args: Optional[Dict[str, Any]] = None,
                         list_args: Collection[str] = ()) -> fx.Graph:
    """The graph of ``root.forward``, every submodule a ``call_module``.

    The attributes of the module and of every module below it are put back
    afterwards, whatever the traced code stored on them (on itself, or on a
    child whose method it called).

    Args:
        root: The module.
        concrete_args: Parameters fixed to values.
        list_args: Parameters traced as lists of unknown length and items
            (:class:`_SymbolicList`): the graph holds for calls that pass
            a list there, and only for those.

    Raises:
        Whatever tracing raises on code torch.fx cannot trace;
        ``torch.fx.proxy.TraceError`` where the forward reads a list
        argument's length or items in Python, or where code it runs
        (outside torch, mmfuse and Python's library) may read the type of
        a value (``type``: the symbolic list's is not ``list``), or a
        tracer (debugger, coverage) is on (the code run is seen through
        ``sys.settrace``).
    """
    modes = _mode_reads(type(root))
    if modes:
        raise fx.proxy.TraceError(
            f'the forward reads a mode the trace cannot stand for '
            f'({", ".join(modes)}): it may run otherwise at inference')
    saved = [(module, dict(module.__dict__))
             for _, module in walk_modules(root)]
    # The contents of the containers among them (a cache dict, a list):
    # the forward may store traced values there.  (Not of leaves: their
    # forwards do not run in the trace.)
    contents = [(value, copy.copy(value)) for module, attributes in saved
                if module is root or module._modules
                for value in _containers(module, attributes)]
    # And those of the globals its code names (``FEATS.append(y)``), and
    # the attributes of its classes (``type(self).last = y``).
    contents.extend((value, copy.copy(value))
                    for value in _global_containers(type(root)))
    classes = [(cls, dict(cls.__dict__)) for cls in type(root).__mro__
               if not _is_library_class(cls)]
    try:
        tracer = ModuleForwardTracer(root, list_args)
        graph = tracer.trace(root, concrete_args)
        stored = _stored_traced_value(
            [(module, attributes) for module, attributes in saved
             if module is root or module._modules], contents) or \
            _class_traced_value(classes)
        if not stored and tracer.kept_values():
            stored = 'a place the trace does not see (a global, an ' \
                'attribute of a class or of an object)'
        if stored:
            raise fx.proxy.TraceError(
                f'the forward keeps a traced value in {stored}: whatever '
                'reads it later is not in the graph')
        return graph
    finally:
        for module, attributes in saved:
            module.__dict__.clear()
            module.__dict__.update(attributes)
        for container, content in contents:
            if isinstance(container, list):
                container[:] = content
            else:
                container.clear()
                container.update(content)
        for cls, attributes in classes:
            for name in set(cls.__dict__) - set(attributes):
                delattr(cls, name)
            for name, value in attributes.items():
                if cls.__dict__.get(name, _NOTHING) is not value:
                    setattr(cls, name, value)


_NOTHING = object()

#: Functions that read the grad, inference, autocast or fx-tracing mode:
#: a forward that names one may branch on it, and the mode of the trace
#: need not be that of the calls (``if torch.is_grad_enabled(): ...``).
#: (Names a flag may have too, ``is_tracing``, count only where they are
#: one of these functions: :data:`_MODE_FUNCTIONS`.)
_MODE_READS = frozenset({
    'is_grad_enabled', 'is_inference_mode_enabled', 'is_autocast_enabled',
    'is_autocast_cpu_enabled', 'get_autocast_dtype', 'get_autocast_gpu_dtype',
    'get_autocast_cpu_dtype', 'is_fx_tracing'
})


def _is_library_class(cls: type) -> bool:
    """Whether ``cls`` is ``object`` or one of torch's classes (whose
    attributes a forward does not set)."""
    return cls is object or cls.__module__.split('.')[0] == 'torch'


@functools.lru_cache(maxsize=4096)
def _global_names(code: types.CodeType) -> Tuple[str, ...]:
    """The names ``code`` and the code nested in it may read as globals
    (all its names: attributes too, which look up nothing)."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.update(_global_names(const))
    return tuple(sorted(names))


def _global_containers(cls: type) -> List[Any]:
    """The dicts, lists and sets held by the globals the code of ``cls``
    names (see :func:`_code_reads`), each once."""
    found: Dict[int, Any] = {}
    for scope, names in _code_reads(cls):
        for name in names:
            value = scope.get(name)
            if isinstance(value, (dict, list, set)):
                found.setdefault(id(value), value)
    return list(found.values())


def _code_reads(cls: type) -> List[Tuple[Dict[str, Any], Tuple[str, ...]]]:
    """The globals that a call of a ``cls`` module may read: ``(scope,
    names)`` (names as in :func:`_global_names`) of its ``forward``, of
    the methods and properties of its classes (torch's aside) that code
    names, and so on, and of the model's functions that code names (one
    step).  Kept while no module changes."""
    memo = unchanged_memo('code reads')
    known = None if memo is None else memo.get(cls)
    if known is not None:
        return known
    namespaces = class_namespaces(cls)
    pending = functions_in(getattr(cls, 'forward', None))
    found, seen, named_globals = [], set(), []
    while pending:
        function = pending.pop()
        if function.__code__ in seen:
            continue
        seen.add(function.__code__)
        names = _global_names(function.__code__)
        found.append((function.__globals__, names))
        for name in names:
            for namespace in namespaces:
                if name in namespace and name != '__init__':
                    pending.extend(functions_in(namespace[name]))
            named_globals.extend(
                value
                for value in functions_in(function.__globals__.get(name))
                if not _is_library_function(value))
    for function in named_globals:
        if function.__code__ not in seen:
            seen.add(function.__code__)
            found.append(
                (function.__globals__, _global_names(function.__code__)))
    if memo is not None:
        memo[cls] = found
    return found


def _is_library_function(function: types.FunctionType) -> bool:
    """Whether ``function`` is torch's or Python's own."""
    module = (function.__module__ or '').split('.')[0]
    return module in ('torch', 'builtins', 'functools', 'typing')


#: The functions :data:`_MODE_READS` names, where this torch has them.
_MODE_FUNCTIONS = {
    id(function)
    for function in (
        getattr(torch, 'is_grad_enabled', None),
        getattr(torch, 'is_inference_mode_enabled', None),
        getattr(torch, 'is_autocast_enabled', None),
        getattr(torch, 'get_autocast_dtype', None),
        getattr(torch.fx._symbolic_trace, 'is_fx_tracing', None),
        getattr(torch.compiler, 'is_compiling', None),
    ) if function is not None
}


def _mode_reads(cls: type) -> List[str]:
    """The reads of the grad, inference, autocast or tracing mode that the
    code of ``cls`` and the functions it names may make, by name or by
    another name for the same function (kept while no module
    changes)."""
    memo = unchanged_memo('mode reads')
    known = None if memo is None else memo.get(cls)
    if known is not None:
        return known
    found = set()
    for scope, names in _code_reads(cls):
        found.update(_MODE_READS.intersection(names))
        found.update(name for name in names
                     if id(scope.get(name)) in _MODE_FUNCTIONS)
    known = sorted(found)
    if memo is not None:
        memo[cls] = known
    return known


#: What a global or class attribute may be without being state a forward
#: keeps outside its module.
_NOT_STATE = (types.ModuleType, type, types.FunctionType,
              types.BuiltinFunctionType, functools.partial, nn.Module,
              staticmethod, classmethod, property) + _PLAIN_VALUES


def reads_shared_containers(cls: type) -> bool:
    """Whether the code of ``cls`` (see :func:`_code_reads`) names a
    global, or an attribute of a class of ``cls`` (torch's aside), that
    holds state: a container or an object with attributes of its own
    (``RES[id(self)]``, ``CONFIG.residual``), which a trace of another
    module of ``cls`` does not share."""
    memo = unchanged_memo('shared containers')
    known = None if memo is None else memo.get(cls)
    if known is not None:
        return known
    namespaces = class_namespaces(cls)
    found = any(
        value is not _NOTHING and not is_plain(value)
        and not isinstance(value, _NOT_STATE)
        for scope, names in _code_reads(cls) for name in names
        for value in (holder.get(name, _NOTHING)
                      for holder in [scope] + namespaces))
    if memo is not None:
        memo[cls] = found
    return found


def _class_traced_value(classes: List[Tuple[type, Dict[str, Any]]]) -> str:
    """Where a trace left a traced value in a class attribute it set or
    changed (``type(self).last = y``); ``''`` if nowhere."""
    for cls, attributes in classes:
        for name, value in cls.__dict__.items():
            if attributes.get(name, _NOTHING) is not value and \
                    _holds_traced_value(value):
                return f'{cls.__name__}.{name}'
    return ''


def _containers(module: nn.Module, attributes: Dict[str, Any]) -> List[Any]:
    """The dicts, lists and sets among ``module``'s ``attributes`` (its
    ``__dict__``, tables aside); which attributes those are is kept while
    no module changes (the traces of a discovery put the state back)."""
    memo = unchanged_memo('containers')
    known = None if memo is None else memo.get(id(module))
    if known is None or known[0] is not module:
        known = (module, [
            name for name, value in attributes.items()
            if isinstance(value, (dict, list, set))
            and name not in MODULE_INTERNALS
        ])
        if memo is not None:
            memo[id(module)] = known
    return [
        attributes[name] for name in known[1]
        if isinstance(attributes.get(name), (dict, list, set))
    ]


#: What ``nn.Module.__init__`` puts in a module's ``__dict__``: tables of
#: its own, not the model's state.
MODULE_INTERNALS = frozenset(nn.Module().__dict__)


def _stored_traced_value(saved: List[Tuple[nn.Module, Dict[str, Any]]],
                         contents: List[Tuple[Any, Any]]) -> str:
    """Where a trace left a traced value in a module's attributes, or in
    anything they hold (``self.cache['feat'] = y``, ``self.saved = [y]``);
    ``''`` if nowhere."""
    for module, _ in saved:
        for name, value in module.__dict__.items():
            if name not in MODULE_INTERNALS and not is_plain(value) and \
                    _holds_traced_value(value):
                return f'{type(module).__name__}.{name}'
    for container, _ in contents:
        if _holds_traced_value(container):
            return f'a {type(container).__name__} of a module or a global'
    return ''


def _holds_traced_value(value: Any, depth: int = 8) -> bool:
    """Whether ``value``, or what it holds (see :func:`_held_values`), is
    a traced value."""
    return bool(_held_values(value, depth, fx.Proxy, first=True))


def _contents(item: Any) -> List[Any]:
    """What a container, a partial (its function and arguments), a weak
    reference (what it refers to), a bound method (its object and
    function), a function (its defaults and what its closure refers to)
    or a plain object (its attributes) holds; ``[]`` for anything
    else."""
    if isinstance(item, dict):
        # Keys too (``{self.bn: 2.0}``), but weak references as keys (a
        # ``WeakKeyDictionary``: a registry that looks modules up by
        # identity, ``FLAGS[self]``, and holds none).
        return [*(key for key in item.keys()
                  if not isinstance(key, weakref.ref)), *item.values()]
    if isinstance(item, (list, tuple, set, frozenset)):
        return list(item)
    if isinstance(item, functools.partial):
        return [item.func, *item.args, *item.keywords.values()]
    if isinstance(item, weakref.ref):  # WeakMethod too
        target = item()
        return [] if target is None else [target]
    if isinstance(item, types.MethodType):
        return [item.__self__, item.__func__]
    if isinstance(item, types.FunctionType):
        # What a lambda or nested function refers to from outside.
        found = list(item.__defaults__ or ())
        found.extend((item.__kwdefaults__ or {}).values())
        for cell in item.__closure__ or ():
            try:
                found.append(cell.cell_contents)
            except ValueError:  # a cell not yet filled
                pass
        return found
    if not type(item).__dictoffset__:
        return []  # no attributes of its own (``__slots__``, builtins)
    try:  # (past a class's own __getattr__, which may raise anything)
        state = object.__getattribute__(item, '__dict__')
    except AttributeError:
        return []
    return list(state.values()) if isinstance(state, dict) else []


#: Where the tracer's own code lies (torch.fx, mmfuse): what it runs is
#: on its own behalf, never the model's.
_TRACER_CODE = tuple(
    os.path.dirname(os.path.abspath(module.__file__)) + os.sep
    for module in (fx, sys.modules[__name__.split('.')[0]]))
#: Library code that may run on the model's behalf (``torch.is_tensor``,
#: ``abc.__instancecheck__``, ``torch.utils._pytree``): the rest of torch
#: and Python's own library, not the packages installed into it.
_TORCH_CODE = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_STANDARD_LIBRARY = os.path.abspath(sysconfig.get_paths()['stdlib']) + os.sep
_INSTALLED = tuple({
    os.path.abspath(sysconfig.get_paths()[key]) + os.sep
    for key in ('purelib', 'platlib')
})
_KINDS: Dict[str, str] = {}


_IN_TORCH: Dict[str, bool] = {}


def _is_torch_code(filename: str) -> bool:
    """Whether ``filename`` is torch's own code."""
    known = _IN_TORCH.get(filename)
    if known is None:
        known = _IN_TORCH[filename] = not filename.startswith('<') and \
            os.path.abspath(filename).startswith(_TORCH_CODE)
    return known


def code_kind(filename: str) -> str:
    """``'tracer'``, ``'library'`` or ``'model'`` (see above) for the code
    of ``filename``."""
    kind = _KINDS.get(filename)
    if kind is None:
        path = filename if filename.startswith('<') else \
            os.path.abspath(filename)
        if path.startswith(_TRACER_CODE):
            kind = 'tracer'
        elif path.startswith('<frozen ') or path.startswith(_TORCH_CODE) or (
                path.startswith(_STANDARD_LIBRARY)
                and not path.startswith(_INSTALLED)):
            kind = 'library'
        else:
            kind = 'model'
        _KINDS[filename] = kind
    return kind


#: By class: ``(its forward, type_call_in's answer)``.
_TYPE_CALLS: 'weakref.WeakKeyDictionary[type, Tuple[Any, Optional[str]]]' \
    = weakref.WeakKeyDictionary()
_WRAPPERS = (staticmethod, classmethod, types.MethodType, property,
             functools.partial)


def functions_in(value: Any) -> List[types.FunctionType]:
    """The Python functions that calling or reading ``value`` may run: a
    function, what it wraps (``__wrapped__``, as ``functools.wraps``
    sets, and the functions in its closure), a method's, a static or class
    method's, a property's getter, a ``functools.partial``'s,
    ``partialmethod``'s or ``cached_property``'s."""
    found: List[types.FunctionType] = []
    seen: Set[int] = set()
    stack = [value]
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, (staticmethod, classmethod, types.MethodType)):
            stack.append(value.__func__)
        elif isinstance(value, property):
            stack.append(value.fget)
        elif isinstance(value, (functools.partial, functools.partialmethod,
                                functools.cached_property)):
            stack.append(value.func)
        elif isinstance(value, types.FunctionType):
            found.append(value)
            stack.append(value.__dict__.get('__wrapped__'))
            for cell in value.__closure__ or ():
                try:
                    content = cell.cell_contents
                except ValueError:  # a cell not filled yet
                    continue
                if isinstance(content, (types.FunctionType, ) + _WRAPPERS):
                    stack.append(content)
    return found


def class_namespaces(cls: type) -> List[Dict[str, Any]]:
    """The namespaces of ``cls`` and its bases but torch's and Python's
    own."""
    return [
        vars(base) for base in cls.__mro__
        if base.__module__.split('.')[0] not in ('torch', 'builtins')
    ]


def type_call_in(cls: type) -> Optional[str]:
    """Where the forward of ``cls`` may call the builtin ``type`` or
    ``id`` (also as ``builtins.type``, or ``object.__class__``).

    Read: the forward's code and the code nested in it, and, through the
    names that code uses, the attributes of that name of ``cls`` and its
    bases (but torch's), the globals of that name and the attributes of
    that name of modules and classes among them, and so on from their
    code (through decorators, closures, properties,
    ``functools.partial``).  Only the model's code (see
    :func:`code_kind`) is read.

    Returns:
        The qualified name of a function whose code loads a global that
        is the builtin ``type`` (under that name or another); ``None``
        where none does.
    """
    forward = inspect.getattr_static(cls, 'forward', None)
    known = _TYPE_CALLS.get(cls)
    if known is not None and known[0] is forward:
        return known[1]
    bases = class_namespaces(cls)
    # The code of the class's plain methods (not static or class ones).
    methods = {
        value.__code__
        for table in bases for value in table.values()
        if isinstance(value, types.FunctionType)
    }
    pending = functions_in(forward)
    found = None
    seen: Set[Any] = set()
    while pending and found is None:
        function = pending.pop()
        code = function.__code__
        if code in seen or code_kind(code.co_filename) != 'model':
            continue
        seen.add(code)
        scope = function.__globals__
        codes = [code]
        while codes and found is None:
            code = codes.pop()
            codes.extend(c for c in code.co_consts if hasattr(c, 'co_code'))
            # Names that are no identifiers are not the model's (pytest's
            # assertion rewriting puts ``@pytest_ar`` and its helpers in
            # every module it imports).
            names = [n for n in code.co_names if n.isidentifier()]
            # ``type`` under any global name (``kind_of = type``), loaded
            # as a global (not ``self.type``, an attribute).
            typed = {
                n
                for n in names if any(
                    _global_value(scope, n) is builtin
                    for builtin in (builtins.type, builtins.id))
            }
            # (``id(self)`` passes in a method's own code only: a helper's
            # or a lambda's first argument may be a layer's stand-in.)
            if typed and _calls_type_or_id(
                    code, typed, scope,
                    code is function.__code__ and code in methods):
                found = function.__qualname__
            # ``builtins.type(x)``, ``builtins.id(x)``, ``object.__class__
            # (x)`` (which is ``type``): by the names the code uses.
            if any(_global_value(scope, n) is builtins for n in names) and \
                    ('type' in names or 'id' in names) or \
                    '__class__' in names and \
                    _global_value(scope, 'object') is object and \
                    'object' in names:
                found = function.__qualname__
            # Modules and classes named: ``helpers.f(x)``,
            # ``Base.forward(self, x)``.
            holders = []
            for name in names:
                value = scope.get(name)
                if isinstance(value, types.ModuleType):
                    holders.append(vars(value))
                elif isinstance(value, type):
                    holders.extend(class_namespaces(value))
            for name in names:
                for table in bases + [scope] + holders:
                    value = table.get(name)
                    if isinstance(value, (types.FunctionType, ) + _WRAPPERS):
                        pending.extend(functions_in(value))
    _TYPE_CALLS[cls] = (forward, found)
    return found


def _calls_type_or_id(code: types.CodeType, names: Set[str],
                      scope: Dict[str, Any], method: bool) -> bool:
    """Whether ``code`` loads one of ``names`` (globals that are the
    builtin ``type`` or ``id``) as a global, but, in a ``method``'s code
    that never rebinds its first argument, to call ``id`` on that
    argument (``id(self)``: the module, never a stand-in)."""
    ops = [ins for ins in dis.get_instructions(code)
           if ins.opname not in ('CACHE', 'NOP', 'PRECALL')]
    first = code.co_varnames[0] if method and code.co_argcount else None
    if first is not None and any(
            ins.opname in ('STORE_FAST', 'DELETE_FAST')
            and ins.argval == first for ins in ops):
        first = None
    for index, ins in enumerate(ops):
        if ins.opname not in ('LOAD_GLOBAL', 'LOAD_NAME') or \
                ins.argval not in names:
            continue
        if _global_value(scope, ins.argval) is builtins.id and \
                first is not None and ops[index + 1:index + 3] and \
                ops[index + 1].opname == 'LOAD_FAST' and \
                ops[index + 1].argval == first and \
                len(ops) > index + 2 and \
                ops[index + 2].opname in ('CALL', 'CALL_FUNCTION') and \
                ops[index + 2].arg == 1:
            continue  # ``id(self)``
        return True
    return False


def _global_value(scope: Dict[str, Any], name: str) -> Any:
    """What the global ``name`` is to code whose globals are ``scope``: a
    builtin where the module binds no such name; ``None`` for none."""
    if name in scope:
        return scope[name]
    own = scope.get('__builtins__', builtins)
    return (own if isinstance(own, dict) else vars(own)).get(name)


def _model_code(frame: Any) -> Optional[Any]:
    """The frame of the model's code on whose behalf ``frame`` runs:
    ``frame`` itself, or the first one up the stack past library code
    (``torch.is_tensor`` and ``abc.__instancecheck__`` test types for
    their caller); ``None`` where the tracer's own code comes first."""
    while frame is not None:
        kind = code_kind(frame.f_code.co_filename)
        if kind == 'tracer':
            return None
        if kind == 'model':
            return frame
        frame = frame.f_back
    return None


def _recording_class(value: fx.Proxy) -> type:
    """``value.__class__`` of a traced value: its own class, after noting
    where the model's code asked (see :class:`_TracedValue`)."""
    frame = _model_code(sys._getframe(1))
    tests = getattr(value.tracer, 'type_tests', None)
    if frame is not None and tests is not None:
        tests.append(f'{frame.f_code.co_name} in {frame.f_code.co_filename}'
                     f', line {frame.f_lineno}')
    return type(value)


class _TracedValue(fx.Proxy):
    """A value in a module-forward trace: a proxy that remembers where the
    model's code tests its type.

    ``isinstance(x, cls)`` reads ``x.__class__`` when ``type(x)`` is not
    a subclass of ``cls`` (``torch.Tensor``, ``tuple``, an ABC): the model's
    code asking that of a traced value would take the way a proxy leads
    it, not the one the value it stands for would (a tensor is a
    ``torch.Tensor``, a proxy is not; ``x.shape`` is a tuple, its proxy
    is not).  Where the model's code asks (not torch's or mmfuse's, on
    their own behalf), the place is recorded and the trace fails when
    done.  Attributes of a traced value (``x.shape``) are traced values
    too.
    """

    __class__ = property(_recording_class)  # type: ignore[assignment]

    def __getattr__(self, name: str) -> fx.Proxy:
        return _traced_attribute(self, name)

    def __iter__(self) -> Iterator[fx.Proxy]:
        return _iterate(self, inspect.currentframe().f_back)

    def __len__(self) -> int:
        self.tracer.refused_reads.append('its length')
        return super().__len__()

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _PROXY_FIELDS:
            object.__setattr__(self, name, value)
            return
        # ``x.data = y`` changes the tensor in place; no node shows it.
        self.tracer.refused_reads.append(f'setting its attribute {name!r}')
        raise fx.proxy.TraceError(
            f'the forward sets attribute {name!r} of a traced value')

    def __float__(self) -> float:
        return float(self._scalar('float'))

    def __int__(self) -> int:
        return int(self._scalar('int'))

    def __index__(self) -> int:
        return self._scalar('index').__index__()

    def _scalar(self, what: str) -> torch.Tensor:
        flag = self.tracer.scalar_flag(self)
        if flag is None:
            self.tracer.refused_reads.append(f'its {what} value')
            raise fx.proxy.TraceError(
                f'a traced value is read as a Python number ({what})')
        return flag


#: What a traced value holds of its own (``fx.Proxy``'s, and a symbolic
#: list's).
_PROXY_FIELDS = frozenset({'node', 'tracer', '_mmfuse_reads'})


def _in_place_operator(function: Any):
    """A method for an augmented assignment (``x += y``): it is in place
    on a tensor, and a proxy without it would record ``x + y`` (as torch.fx
    does), hiding the change."""

    def in_place(self, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy('call_function', function,
                                        (self, other), {})

    in_place.__name__ = f'__{function.__name__}__'
    return in_place


for _function in (operator.iadd, operator.isub, operator.imul,
                  operator.itruediv, operator.ifloordiv, operator.imod,
                  operator.ipow, operator.imatmul, operator.iand,
                  operator.ior, operator.ixor, operator.ilshift,
                  operator.irshift):
    setattr(_TracedValue, f'__{_function.__name__}__',
            _in_place_operator(_function))
del _function


def _iterate(value: fx.Proxy, caller: Any) -> Iterator[fx.Proxy]:
    """What ``fx.Proxy.__iter__`` does (the items of an unpacking,
    ``a, b = x.chunk(2)``; else the tracer's ``iter``), without keeping a
    frame in a local: it kept its frame, and through it the forward's
    and their traced values, in a reference cycle until the garbage
    collector ran (see ``ModuleForwardTracer.kept_values``)."""
    try:
        code, last = caller.f_code, caller.f_lasti
    finally:
        del caller
    ops = list(dis.get_instructions(code))
    index = bisect.bisect_left([op.offset for op in ops], last) \
        if sys.version_info >= (3, 11) else last // 2
    if index < len(ops) and ops[index].opname == 'UNPACK_SEQUENCE':
        return iter([value[i] for i in range(ops[index].argval)])
    return value.tracer.iter(value)


class _TracedAttribute(fx.proxy.Attribute):
    """An attribute of a traced value (``x.shape``), which remembers type
    tests as :class:`_TracedValue` does."""

    __class__ = property(_recording_class)  # type: ignore[assignment]

    def __getattr__(self, name: str) -> fx.Proxy:
        return _traced_attribute(self, name)

    def __iter__(self) -> Iterator[fx.Proxy]:
        return _iterate(self, inspect.currentframe().f_back)

    def __len__(self) -> int:
        self.tracer.refused_reads.append('its length')
        return super().__len__()


#: What a parameter or buffer tells of itself, read as its value: a
#: forward may adapt to it (``x.to(self.conv.weight.dtype)``), and the
#: trace cache tells modules apart by it.
TENSOR_METADATA = frozenset({
    'dtype', 'device', 'shape', 'ndim', 'layout', 'is_cuda',
    'requires_grad', 'is_floating_point', 'size', 'dim', 'numel',
    'nelement', 'element_size', 'is_contiguous'
})


def _traced_attribute(value: fx.Proxy, name: str) -> Any:
    """Attribute ``name`` of a traced value.  A proxy has every attribute;
    what it stands for may not (``hasattr(x, 'aux')`` is false of a
    tensor): reading one that no tensor (or ``torch.Size``) has is
    refused, and fails the trace even if caught.  Of a parameter or
    buffer, what it tells of itself is its value (its dtype, its shape).
    """
    if name in TENSOR_METADATA:
        found = value.tracer.attribute_tensor(getattr(value, 'node', None))
        if found is not None:
            # The read stays in the graph (a ``getattr`` node, unused):
            # what it means for a fold is discovery's to say.
            value.tracer.create_proxy('call_function', builtins.getattr,
                                      (value, name), {})
            return getattr(found[1], name)
    if not (name.startswith('__') or hasattr(torch.Tensor, name)
            or hasattr(torch.Size, name)):
        value.tracer.refused_reads.append(f'its attribute {name!r}')
        raise AttributeError(f'a traced value has no attribute {name!r} '
                             'known to be there')
    return _TracedAttribute(value, name)


def _refusing(name: str):
    """A method of :class:`_SymbolicList` that fails the trace."""

    def refuse(self, *args, **kwargs):
        self._mmfuse_reads.append(name)
        raise fx.proxy.TraceError(
            f'a list argument of unknown length is read ({name})')

    refuse.__name__ = name
    return refuse


class _SymbolicList(list, _TracedValue):
    """A forward's list argument in a trace: its length and items unknown.

    To ``isinstance`` and ``__class__`` it is a list, as are the lists the
    forward is called with; to a torch function that takes it
    (``torch.cat(xs, 1)``) it is one traced value, the placeholder (what
    torch's argument parser finds in it is that placeholder's proxy, which
    sends the call to the tracer).  Whatever would read its length or
    items in Python (``len``, ``bool``, iteration, indexing, ``in``,
    comparisons, printing, ``xs + [y]``, ``[y] + xs``), change it, copy it,
    call it or use it as a tensor fails the trace, and is remembered in
    ``reads`` in case the forward catches the error and goes on.  (What
    it has of a proxy, ``node`` and ``tracer``, a list has not.)

    Args:
        proxy: The placeholder's proxy.
        reads: Where the names of refused reads go.
    """

    def __init__(self, proxy: fx.Proxy, reads: List[str]):
        list.__init__(self, (proxy, ))
        _TracedValue.__init__(self, proxy.node, proxy.tracer)
        self._mmfuse_reads = reads

    @property  # type: ignore[override]
    def __class__(self):
        return list

    def __getattr__(self, name: str):
        # Only for names neither a list nor this class has: a list has no
        # such attribute (a proxy would make one up).
        raise AttributeError(f"'list' object has no attribute '{name}'")

    __hash__ = None  # type: ignore[assignment]


_LIST_READS = {
    '__len__', '__iter__', '__reversed__', '__getitem__', '__setitem__',
    '__delitem__', '__contains__', '__bool__', '__call__', '__repr__',
    '__str__', '__format__', '__reduce__', '__reduce_ex__', '__copy__',
    '__deepcopy__', '__getstate__', '__setstate__', '__iadd__', '__imul__',
    '__radd__', '__rmul__', 'append', 'extend', 'insert', 'pop', 'remove',
    'clear', 'sort', 'reverse', 'copy', 'index', 'count', 'keys'
}
# A proxy's operators (``xs + [y]``, ``xs == ys``, ``-xs``, ...).
_LIST_READS.update(f'__{name}__' for name in fx.graph.magic_methods)
_LIST_READS.update(f'__r{name}__'
                   for name in fx.graph.reflectable_magic_methods)
_LIST_READS.update(f'__{name}__'
                   for name in getattr(fx.graph, 'inplace_methods', ()))
for _name in sorted(_LIST_READS):
    setattr(_SymbolicList, _name, _refusing(_name))
del _name


def _watch_code(problems: List[str]) -> bool:
    """From here on (until ``sys.settrace(None)``), note in ``problems``
    each Python function of the model's code that runs, and each of
    library code called on its behalf with a symbolic list among its
    arguments (``torch.utils._pytree.tree_flatten(xs)``; see
    :func:`_model_code`), that names a way to read a value's type or a
    list's length or items past the methods :class:`_SymbolicList`
    refuses (``type(xs)``, ``list.__len__(xs)``, ``operator.concat``,
    ``heapq``, ``copy``), also under another name (``kind_of = type``);
    returns ``True``.

    Raises:
        torch.fx.proxy.TraceError: A tracer (a debugger, coverage) is on
            (and is left on).
    """
    if sys.gettrace() is not None:
        raise fx.proxy.TraceError('a tracer is on: cannot watch the code '
                                  'a list argument meets')
    readers: Dict[Any, Collection[str]] = {}

    def watch(frame, event, arg):
        code = frame.f_code  # called for 'call' events only
        # (One lookup for most calls: most are the tracer's own, then
        # library code that names no way to read a list.)
        found = _KNOWN_READERS.get(code)
        if found is None:
            found = readers.get(code)
        if found is None:
            kind = code_kind(code.co_filename)
            found = () if kind == 'tracer' else \
                _list_readers(code, frame.f_globals)
            # Of the model's code, for this trace only (it may change
            # what its globals name); of torch's and Python's, for good.
            (readers if kind == 'model' else _KNOWN_READERS)[code] = found
        if not found:
            return  # no tracing within the function
        kind = code_kind(code.co_filename)
        if _model_code(frame) is None or (
                kind == 'library' and not any(
                    type(value) is _SymbolicList
                    for value in frame.f_locals.values())):
            return
        problems.append(f'{code.co_name} (in {code.co_filename}) may read '
                        'the type or length of a list argument '
                        f'({", ".join(sorted(found))})')

    sys.settrace(watch)
    return True


#: :func:`_list_readers` of the code of the tracer, torch and Python's
#: library met in traces, by code object (which those files' functions
#: keep for good).
_KNOWN_READERS: Dict[Any, Collection[str]] = {}


def _list_readers(code: Any, scope: Dict[str, Any]) -> Set[str]:
    """The names in ``code`` (its globals ``scope``) of ways to read a
    symbolic list's type or contents past its refusals."""
    names = set(code.co_names)
    found = names & _LIST_READING_NAMES
    found.update(name for name in names
                 if id(_global_value(scope, name)) in _LIST_READERS)
    return found


#: Names in code run on the model's behalf that may read a symbolic
#: list's type or contents past its refusals.
_LIST_READING_NAMES = frozenset({
    'type', '__len__', '__getitem__', '__iter__', '__reversed__',
    '__contains__', '__add__', '__iadd__', '__mul__', '__sizeof__', 'copy',
    'deepcopy', 'concat', 'iconcat', 'length_hint', 'getsizeof', 'heappop',
    'heappush', 'heappushpop', 'heapreplace', 'heapify', 'nlargest',
    'nsmallest'
})
#: The objects behind those names, by ``id`` (for other names of them).
_LIST_READERS = frozenset(
    id(reader) for reader in (
        type, list.__len__, list.__getitem__, list.__iter__,
        list.__reversed__, list.__contains__, list.__add__, list.__mul__,
        list.copy, operator.concat, operator.iconcat, operator.length_hint,
        sys.getsizeof, heapq.heappop, heapq.heappush, heapq.heappushpop,
        heapq.heapreplace, heapq.heapify, heapq.nlargest, heapq.nsmallest,
        copy.copy, copy.deepcopy))
