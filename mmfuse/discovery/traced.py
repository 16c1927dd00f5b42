"""Discovery with an example input: observe the data flow of a real forward.

The model runs once under a ``TorchFunctionMode`` that records, for every
tensor, which module call produced it and every operation outside a leaf
module that consumed it; global forward hooks, for the model's modules,
record leaf module calls and which parent called them.  Any Python control
flow is fine: what counts is what actually happened.  While a leaf runs the
mode is taken off the stack (what a leaf does inside is its own), so its
operations cost nothing extra.

It also notes the modules that were seen adding two values linear in one
earlier value, with a conv on the way (``sum_blocks``): the only ones in
which re-parameterization can find a sum of branches to merge.

A tensor is identified by ``(id, version)`` so an in-place operation makes a
new value, and every tensor seen is kept alive until the pass ends so ids
are not reused.  The model's parameters are never touched; the hooks are
removed when the pass ends.
"""
import contextlib
from collections import Counter, defaultdict
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules.module import (register_module_forward_hook,
                                     register_module_forward_pre_hook)

from torch.overrides import TorchFunctionMode

from ..guards import fresh_inputs
from ..layers import is_conv_layer, is_nonlinear_layer, is_norm_layer
from ..module_walk import find_submodule, walk_modules
from ..output_tree import tensors_in
from ..plan import CONCAT, POST, PRE, SUM
from .fx_tracer import (MODULE_INTERNALS, PLAIN_TYPES, holds_only_settings,
                        is_plain)
from .occurrence import Evidence, Occurrence, Site

__all__ = ['collect_traced_evidence', 'TracedForward']

#: Which global forward hooks take keyword arguments, by handle id.
_GLOBAL_HOOKS_WITH_KWARGS = getattr(torch.nn.modules.module,
                                    '_global_forward_hooks_with_kwargs', {})

Key = Tuple[int, int]

# Tensor functions that read metadata only: folding cannot change what they
# return, so they do not count as consumers (``type`` only without
# arguments: ``y.type(torch.float64)`` is a copy of ``y``).
_METADATA = {
    'dim', 'size', 'shape', 'dtype', 'device', 'numel', 'ndim', 'ndimension',
    'is_contiguous', 'requires_grad', '_version', 'is_cuda', 'layout',
    '__len__', 'stride', 'storage_offset', 'is_floating_point',
    'element_size', 'nelement', 'is_sparse', 'is_quantized', 'is_complex',
    'names', 'grad_fn', 'is_leaf', 'grad', 'data_ptr', 'is_mkldnn',
    'is_meta', 'is_nested', 'get_device', '__hash__', 'is_inference',
    'type', 'is_mps', 'is_xpu', 'is_cpu', 'output_nr', '_base', '_is_view',
    'is_sparse_csr', '__dlpack_device__', 'T_'
}
# Functions that read only the shape, dtype or device of every tensor
# argument, or of the one after ``self``.
_SHAPE_ONLY = {
    'zeros_like', 'ones_like', 'empty_like', 'new_zeros', 'new_ones',
    'new_empty', 'new_full'
}
_SHAPE_ONLY_OTHER = {'reshape_as', 'view_as', 'expand_as', 'type_as'}
_ADDS = {'add', '__add__', '__radd__'}
# Operations a sum of branches is made of: sums and differences, and
# products with (or quotients by) a constant.
_ADDITIVE = _ADDS | {
    'add_', '__iadd__', 'sub', 'sub_', '__sub__', '__rsub__', '__isub__',
    'rsub', 'subtract'
}
_SCALING = {
    'mul', 'mul_', '__mul__', '__rmul__', '__imul__', 'multiply', 'div',
    'div_', '__truediv__', '__itruediv__', 'true_divide', 'divide', 'neg',
    'neg_', '__neg__', 'negative'
}
_IN_PLACE_LINEAR = {
    name
    for name in _ADDITIVE | _SCALING
    if name.endswith('_') or name.startswith('__i')
}
_LINEAR_LEAVES = (nn.AvgPool2d, nn.Identity, nn.Dropout, nn.Dropout1d,
                  nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                  nn.FeatureAlphaDropout)
_ROW_VIEWS = {'flatten', 'reshape', 'view'}
_SCALARS = (int, float, bool, str, type(None), torch.dtype, torch.device)

# The torch function mode stack (private torch API, in torch.overrides'
# own use); without it the recorder stays on the stack during leaves.
_POP_MODE = getattr(torch._C, '_pop_torch_function_stack', None)
_PUSH_MODE = getattr(torch._C, '_push_on_torch_function_stack', None)
_len_modes = getattr(torch._C, '_len_torch_function_stack', None)
_mode_at = getattr(torch._C, '_get_function_stack_at', None)
if None in (_PUSH_MODE, _len_modes, _mode_at):
    _POP_MODE = None


def _tensors_in(tree: Any) -> List[Tensor]:
    """Every tensor in ``tree``, depth first (lists, tuples and dicts
    walked here; anything else, a dataclass, a mapping, an object with
    attributes, by :func:`mmfuse.output_tree.tensors_in`)."""
    # The common cases first: a tensor, a tuple of one tensor.
    if isinstance(tree, Tensor):
        return [tree]
    if type(tree) is tuple and len(tree) == 1 and \
            isinstance(tree[0], Tensor):
        return [tree[0]]
    found: List[Tensor] = []
    pending = [tree]
    while pending:
        item = pending.pop()
        if isinstance(item, Tensor):
            found.append(item)
        elif isinstance(item, (list, tuple)):
            pending.extend(reversed(item))
        elif type(item) is dict:
            pending.extend(reversed(list(item.values())))
        elif not isinstance(item, _SCALARS):
            found.extend(tensors_in(item))
    return found


#: What a module's settings may also hold, besides numbers and strings.
_SETTINGS = (torch.dtype, torch.device)


def _eager():
    """A context in which compiled modules and functions run eagerly
    (``torch.compile``'s stance): the pass's global hooks must see every
    call, and dynamo would compile them (and fail on their state)."""
    stance = getattr(torch.compiler, 'set_stance', None)
    return stance('force_eager') if stance is not None else \
        contextlib.nullcontext()


def _version_key(tensor: Tensor) -> Key:
    """``(id, version)`` of a tensor: a new key after an in-place change."""
    try:
        return id(tensor), tensor._version
    except RuntimeError:  # inference tensors have no version counter
        return id(tensor), -1


def _may_be_linear(module: nn.Module) -> bool:
    """Whether a leaf module may compute a linear map of its input, as
    the generic merge sees it: convs, norms, average pools, identities and
    dropouts of ``torch.nn``, and any module defined elsewhere (which the
    merge traces) but mmcv's ``Swish`` (``x * sigmoid(x)``: YOLOX and
    EfficientNet run hundreds, whose residual sums were traced for
    nothing)."""
    return isinstance(module, _LINEAR_LEAVES) or is_conv_layer(module) or \
        (not type(module).__module__.startswith('torch.nn.')
         and not is_nonlinear_layer(module)) or is_norm_layer(module)


def _func_name(func) -> str:
    name = getattr(func, '__name__', '')
    if name in ('__get__', '__set__'):
        owner = getattr(func, '__self__', None)
        name = getattr(owner, '__name__', name)
    return name


def _batched(module: nn.Module, tensors: List[Tensor]) -> bool:
    """Whether a linear layer's or conv's input ``tensors`` have the
    channels of a norm next to it at dim 1: a linear layer's are 2-D (it
    maps the last dim), a conv's batched (two dims more than its kernel
    has: an unbatched ``(C, L)`` input to a Conv1d meets a BatchNorm1d on
    ``L``).  Read from the kernel size, not the weight, which a lazy conv
    does not have yet and a parametrized one computes.  Other modules'
    inputs are not judged here."""
    if isinstance(module, nn.Linear):
        return all(t.dim() == 2 for t in tensors)
    if is_conv_layer(module):
        kernel = getattr(module, 'kernel_size', None)
        return isinstance(kernel, tuple) and all(
            t.dim() == len(kernel) + 2 for t in tensors)
    return True


class _OpCall:
    """One operation run outside any leaf module."""
    __slots__ = ('name', 'inputs', 'outputs', 'shapes_match', 'plain',
                 'channel_cat', 'rows_view')

    def __init__(self, name: str, inputs: List[Key], outputs: List[Key],
                 shapes_match: bool, plain: bool, channel_cat: bool):
        self.name = name
        self.inputs = inputs
        self.outputs = outputs
        self.shapes_match = shapes_match
        self.plain = plain
        # A torch.cat along dim 1, the channels a norm normalises.
        self.channel_cat = channel_cat
        # A reshape to 2-D that keeps the last dim: a linear layer's output
        # features become the channels of a BatchNorm1d.
        self.rows_view = False

    def describe(self) -> str:
        return f'operation {self.name}'


class _ModuleCall:
    """One call of a leaf module."""
    __slots__ = ('module', 'site', 'inputs', 'outputs', 'occurrence',
                 'channels_dim_ok', 'caller', 'order')

    def __init__(self, module: nn.Module, site: Site, inputs: List[Key],
                 caller: Optional[nn.Module] = None, order: int = 0):
        self.module = module
        # When it ran, among the calls and changes in place recorded.
        self.order = order
        self.site = site
        self.caller = caller
        self.inputs = inputs
        self.outputs: List[Key] = []
        self.occurrence: Optional[Occurrence] = None
        # A norm normalises dim 1; a linear layer maps the last dim: they
        # meet on the same channels only for 2-D tensors.
        self.channels_dim_ok = True

    def describe(self) -> str:
        return f'{type(self.module).__name__} call'


class _Output:
    """The model's output, as a consumer."""

    @staticmethod
    def describe() -> str:
        return 'the model output'


class _Write:
    """A change in place of a value after it was read (``y.relu_()`` once
    the norm read ``y``), as a consumer of the value as it was: once the
    norm is folded away its output is that value, and the change would
    reach it too."""

    def __init__(self, by: Any, order: int):
        self.by = by
        # When it happened, among the calls and changes recorded.
        self.order = order

    def describe(self) -> str:
        return f'a change in place by {self.by.describe()}'


class _KeptInState:
    """A value left in a module's attributes after the pass (read by a
    later call, or by a module it was not passed to), as a consumer."""

    def __init__(self, where: str):
        self.where = where

    def describe(self) -> str:
        return f'kept in {self.where}'


class _Recorder(TorchFunctionMode):

    def __init__(self, tracer: 'TracedForward'):
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tracer = self.tracer
        if tracer.busy or tracer.active_leaf is not None:
            return func(*args, **kwargs)
        name = _func_name(func)
        # An in-place sum or scaling: its inputs as they were before.
        before = [_version_key(t) for t in _tensors_in((args, kwargs))] \
            if name in _IN_PLACE_LINEAR else None
        out = func(*args, **kwargs)
        if (name in _METADATA and not (name == 'type' and
                                       (len(args) > 1 or kwargs))) or \
                name in _SHAPE_ONLY:
            return out
        if name in _SHAPE_ONLY_OTHER and len(args) == 2 and not kwargs:
            args = args[:1]
        tracer.record_op(name, args, kwargs, out, before)
        return out


class TracedForward:
    """Runs a model once and records its data flow.

    Args:
        model: The model, in eval mode.
        example_inputs: Positional arguments for ``model(*example_inputs)``.
    """

    def __init__(self, model: nn.Module, example_inputs: Tuple):
        self.model = model
        self.example_inputs = example_inputs
        self.busy = False
        self.active_leaf: Optional[_ModuleCall] = None
        self.stack: List[nn.Module] = []
        self.keep: List[Tensor] = []
        # The last key recorded of each tensor, by ``id``.
        self.last: Dict[int, Key] = {}
        self.producer: Dict[Key, Any] = {}
        self.consumers: Dict[Key, List[Any]] = defaultdict(list)
        self.leaf_calls: List[_ModuleCall] = []
        self.site_cache: Dict[Tuple[int, int], Site] = {}
        self.subtrees: Dict[int, List[Tuple[str, nn.Module]]] = {}
        self.modules = [m for _, m in walk_modules(model)]
        self.members = {id(m) for m in self.modules}
        # The recorder while it is taken off the mode stack for a leaf.
        self.recorder: Optional[_Recorder] = None
        self.paused = False
        # Conv and norm layers count as leaves even with children (e.g. a
        # parametrized weight): what they compute inside is theirs.
        self.leaves: Set[int] = set()
        # The parameters and buffers of convs and norms, by ``id``: an
        # operation outside the layer's own call that reads one (``F.conv2d
        # (x, self.conv.weight)``, ``self.bn.weight.view(...)``) uses the
        # layer's tensors as they are, which a fold would change.
        self.layer_tensors: Dict[int, nn.Module] = {}
        # The convs and norms, by ``id`` and in model order.
        self.layer_ids: Set[int] = set()
        self.layers: List[nn.Module] = []
        # Where each module registered only once in the whole model lies:
        # its one ``(parent, attr)`` (see ``resolve_site``).
        self.holders: Dict[int, Tuple[nn.Module, str]] = {}
        for m in self.modules:  # one pass for all of these
            children = m._modules
            if is_conv_layer(m) or is_norm_layer(m):
                self.leaves.add(id(m))
                self.layer_ids.add(id(m))
                self.layers.append(m)
                for table in (m._parameters, m._buffers):
                    for tensor in table.values():
                        if tensor is not None:
                            self.layer_tensors[id(tensor)] = m
            elif not any(child is not None for child in children.values()):
                self.leaves.add(id(m))
            for attr, child in children.items():
                if child is not None:
                    self.holders[id(child)] = (m, attr)
        self.read_layers: Dict[int, nn.Module] = {}
        # How many leaf calls and changes in place were recorded so far.
        self.order = 0
        # Convs and norms called inside a leaf's call, with the leaf's
        # class, by ``id``.
        self.nested_layers: Dict[int, Tuple[nn.Module, type]] = {}
        # Modules a caller outside them reached into (see ``note_reach``):
        # the ids of the modules called inside each, by its id.
        self.reached: Dict[int, Set[int]] = {}
        self.paths = Counter(
            id(module)
            for _, module in walk_modules(model, remove_duplicate=False))
        # ``key -> (source, through_conv)`` for a value that is linear in
        # an earlier value ``source`` (leaf convs, norms, pools and sums of
        # such), and whether a conv lies on the way; see ``sum_blocks``.
        self.linear: Dict[Key, Tuple[Key, bool]] = {}
        self.sum_blocks: Set[int] = set()
        self.output = None

    # -- bookkeeping -------------------------------------------------------
    def key(self, tensor: Tensor) -> Key:
        self.keep.append(tensor)
        key = self.last[id(tensor)] = _version_key(tensor)
        return key

    def keys(self, tree) -> List[Key]:
        return [self.key(t) for t in _tensors_in(tree)]

    def record_op(self,
                  name: str,
                  args,
                  kwargs,
                  out,
                  before: Optional[List[Key]] = None) -> None:
        self.busy = True
        try:
            in_tensors = _tensors_in(args)
            if kwargs:
                in_tensors += _tensors_in(kwargs)
            if not in_tensors:
                return
            for tensor in in_tensors:
                layer = self.layer_tensors.get(id(tensor))
                if layer is not None:
                    self.read_layers[id(layer)] = layer
            out_tensors = _tensors_in(out)
            previous = [self.last.get(id(t)) for t in in_tensors]
            inputs = [self.key(t) for t in in_tensors]
            outputs = [self.key(t) for t in out_tensors]
            plain = not kwargs and len(args) == 2 and len(in_tensors) == 2
            shapes_match = plain and len(out_tensors) == 1 and \
                in_tensors[0].shape == in_tensors[1].shape == \
                out_tensors[0].shape
            channel_cat = False
            if name == 'cat' and len(out_tensors) == 1:
                dim = args[1] if len(args) > 1 else kwargs.get('dim', 0)
                channel_cat = isinstance(dim, int) and \
                    dim % out_tensors[0].dim() == 1
            op = _OpCall(name, inputs, outputs, shapes_match, plain,
                         channel_cat)
            if name in _ROW_VIEWS and len(in_tensors) == 1 and \
                    len(out_tensors) == 1:
                source, result = in_tensors[0], out_tensors[0]
                op.rows_view = result.dim() == 2 and source.dim() >= 2 and \
                    result.shape[-1] == source.shape[-1]
            for key in inputs:
                self.consumers[key].append(op)
            self.note_writes(previous, inputs, op)
            for key in outputs:
                if key not in inputs:
                    self.producer[key] = op
            self.follow_linear(name, inputs if before is None else before,
                               outputs)
        finally:
            self.busy = False

    def note_writes(self, previous: List[Optional[Key]], now: List[Key],
                    by: Any) -> None:
        """Where a value was changed in place since it was last recorded
        (by ``by``, or by something the pass did not record before it),
        count the change as a consumer of the value as it was."""
        for before, after in zip(previous, now):
            if before is not None and before != after:
                self.order += 1
                self.consumers[before].append(_Write(by, self.order))

    def source(self, key: Key) -> Tuple[Key, bool]:
        """``(source, through_conv)`` of the value ``key`` (itself if it
        is not linear in an earlier value)."""
        return self.linear.get(key, (key, False))

    def follow_linear(self, name: str, inputs: List[Key],
                      outputs: List[Key]) -> None:
        """Follow sums and scalings of linear values, and take note of the
        modules running a sum of two values linear in one source with a
        conv on the way: a sum re-parameterization may merge.

        A superset of what it can merge is enough: any sum or scaling
        counts, whatever its constant (a tensor that no recorded call
        produced, such as a parameter, counts as a constant).
        """
        if len(outputs) != 1:
            return
        if name in _ADDITIVE and len(inputs) == 2:
            (left, left_conv), (right, right_conv) = map(self.source, inputs)
            if left != right:
                return
            if left_conv or right_conv:
                self.sum_blocks.update(id(m) for m in self.stack)
            self.linear[outputs[0]] = (left, left_conv or right_conv)
            return
        if name in _ADDITIVE | _SCALING:
            varying = [k for k in inputs if k in self.producer]
            if len(varying) == 1:
                self.linear[outputs[0]] = self.source(varying[0])

    def resolve_site(self, caller: Optional[nn.Module],
                     module: nn.Module) -> Site:
        """The ``(holder, attr)`` through which ``caller`` reached
        ``module``."""
        if caller is None:
            return None
        if self.paths[id(module)] == 1:
            # Reached by one path in the whole model (so are the modules on
            # it): the one name below ``caller`` if that lies on the path.
            holder = self.holders.get(id(module))
            if holder is None:  # the model itself
                return None
            above = holder[0]
            while above is not caller:
                if id(above) not in self.holders:
                    return None
                above = self.holders[id(above)][0]
            return holder
        cache_key = (id(caller), id(module))
        if cache_key in self.site_cache:
            return self.site_cache[cache_key]
        # The one name ``module`` has under ``caller``; a module registered
        # under several names there was called by one of them, and which
        # cannot be told: no site then.
        subtree = self.subtrees.get(id(caller))
        if subtree is None:
            subtree = self.subtrees[id(caller)] = list(
                caller.named_modules(remove_duplicate=False))
        found = [name for name, sub in subtree if sub is module and name]
        site: Site = None
        if len(found) == 1:
            parent, _, attr = found[0].rpartition('.')
            site = (find_submodule(caller, parent), attr)
        self.site_cache[cache_key] = site
        return site

    def note_reach(self, caller: nn.Module, module: nn.Module) -> None:
        """Note the modules ``caller`` reaches into to call ``module``: its
        holders (through module containers without a forward), unless
        ``caller`` holds it itself.  A merge of a module reached into must
        keep what is called from outside it."""
        holder = self.holders.get(id(module))
        while holder is not None and holder[0] is not caller and \
                isinstance(holder[0], (nn.ModuleList, nn.ModuleDict)):
            holder = self.holders.get(id(holder[0]))
        if holder is None or holder[0] is caller:
            return
        above = caller
        callers_holders = set()
        while above is not None:
            callers_holders.add(id(above))
            found = self.holders.get(id(above))
            above = found[0] if found is not None else None
        holder = self.holders.get(id(module))
        while holder is not None and id(holder[0]) not in callers_holders:
            self.reached.setdefault(id(holder[0]), set()).add(id(module))
            holder = self.holders.get(id(holder[0]))

    # -- hooks -------------------------------------------------------------
    def pre_hook(self, module: nn.Module, args) -> None:
        """Called before every module call in the process (a global hook,
        which sees no keyword arguments: ``post_hook`` reads those)."""
        if id(module) not in self.members:  # not the model's
            return
        caller = self.stack[-1] if self.stack else None
        self.stack.append(module)
        if self.active_leaf is not None:
            # Called by a leaf, whose forward is not followed (a module
            # without children holding a layer in a list): its data flow
            # there is not seen.
            if id(module) in self.layer_ids and \
                    module is not self.active_leaf.module:
                self.nested_layers.setdefault(
                    id(module), (module, type(self.active_leaf.module)))
            return
        if caller is not None:
            self.note_reach(caller, module)
        if id(module) not in self.leaves:
            return
        self.pause_recording()
        self.busy = True
        try:
            tensors = _tensors_in(args)
            previous = [self.last.get(id(t)) for t in tensors]
            self.order += 1
            call = _ModuleCall(module, self.resolve_site(caller, module),
                               [self.key(t) for t in tensors], caller,
                               self.order)
            self.note_writes(previous, call.inputs, call)
            call.channels_dim_ok = _batched(module, tensors)
            for key in call.inputs:
                self.consumers[key].append(call)
            self.active_leaf = call
            self.leaf_calls.append(call)
        finally:
            self.busy = False

    def post_hook(self, module: nn.Module, args, *rest) -> None:
        """Called after every module call in the process, with ``(kwargs,
        output)``; also after a call that raised, with ``(None, )`` (torch
        passes no keyword arguments then), so that a model that catches
        the error goes on being recorded."""
        if id(module) not in self.members:
            return
        kwargs, output = rest if len(rest) == 2 else ({}, rest[0])
        self.stack.pop()
        call = self.active_leaf
        if call is None or call.module is not module:
            return
        self.busy = True
        try:
            if kwargs:
                self.add_keyword_inputs(call, kwargs)
            call.outputs = self.keys(output)
            if len(call.inputs) == 1 and len(call.outputs) == 1 and \
                    _may_be_linear(module):
                source, conv = self.source(call.inputs[0])
                self.linear[call.outputs[0]] = (
                    source, conv or is_conv_layer(module))
            for key in call.outputs:
                self.producer[key] = call
        finally:
            self.busy = False
            self.active_leaf = None
            self.resume_recording()

    def add_keyword_inputs(self, call: _ModuleCall, kwargs: Dict) -> None:
        """Record the tensors a leaf got as keyword arguments, seen only
        after the call: as the last value of each recorded before the call
        (which it may have changed in place since) and as it is now."""
        tensors = _tensors_in(kwargs)
        for tensor in tensors:
            before = self.last.get(id(tensor))
            for key in (before, self.key(tensor)):
                if key is not None and key not in call.inputs:
                    call.inputs.append(key)
                    self.consumers[key].append(call)
        call.channels_dim_ok = call.channels_dim_ok and _batched(
            call.module, tensors)

    def pause_recording(self) -> None:
        """Take the recorder off the mode stack while a leaf runs, if it is
        on top (else its calls are passed through as they come)."""
        if _POP_MODE is not None and _len_modes() and \
                _mode_at(_len_modes() - 1) is self.recorder:
            _POP_MODE()
            self.paused = True

    def resume_recording(self) -> None:
        """Put the recorder back on the mode stack after a leaf."""
        if self.paused:
            _PUSH_MODE(self.recorder)
            self.paused = False

    # -- the pass ----------------------------------------------------------
    def run(self) -> Any:
        """Run the forward pass, recording; returns the model output."""
        handles = []
        self.recorder = _Recorder(self)
        try:
            handles.append(register_module_forward_pre_hook(self.pre_hook))
            handles.append(
                register_module_forward_hook(
                    self.post_hook, with_kwargs=True, always_call=True))
            inputs = fresh_inputs(self.example_inputs)
            tensors_before = self.layer_state()
            with torch.no_grad(), self.recorder, _eager():
                try:
                    self.output = self.model(*inputs)
                finally:  # in case a leaf's post hook did not run
                    self.resume_recording()
            self.note_replaced(tensors_before)
        finally:
            for handle in handles:
                handle.remove()
                # (torch's handle leaves the with_kwargs entry of a global
                # hook behind: torch.compile would warn of global hooks.)
                _GLOBAL_HOOKS_WITH_KWARGS.pop(handle.id, None)
            self.active_leaf = None
            self.recorder = None  # it refers back to this pass
            self.stack.clear()
        for key in self.keys(self.output):
            self.consumers[key].append(_Output())
        self.note_kept_in_state()
        return self.output

    def layer_state(self) -> List[Tuple]:
        """The parameters and buffers of every conv and norm, in the order
        of ``layers``: their names and ``id`` s, parameters first (a tensor
        that moves to the other table under its name is the same)."""
        return [(tuple(params) + tuple(buffers),
                 tuple(map(id, params.values())) +
                 tuple(map(id, buffers.values())))
                for params, buffers in ((m._parameters, m._buffers)
                                        for m in self.layers)]

    def note_replaced(self, before: List[Tuple]) -> None:
        """A layer whose parameters or buffers the forward set (``self.conv
        .weight = self.shared``): the next call would set them again over
        a fold's."""
        after = self.layer_state()
        for layer, was, now in zip(self.layers, before, after):
            if was != now:
                self.nested_layers.setdefault(id(layer), (layer, None))

    def note_kept_in_state(self) -> None:
        """A value the pass left in a module's attributes (``self.prev =
        y``, ``self.add.ref = y``) may be read later, by a call or a
        module it was not passed to: it counts as consumed there."""
        last = self.last
        # (Walked again: the pass may have added modules.)
        for path, module in walk_modules(self.model):
            for name, value in module.__dict__.items():
                # (The module's own tables, then most settings: ints,
                # flags, sizes.)
                kind = type(value)
                if kind in PLAIN_TYPES or name in MODULE_INTERNALS:
                    continue
                if kind is Tensor or kind is nn.Parameter:
                    key = last.get(id(value))
                    if key is not None:
                        self.consumers[key].append(_KeptInState(
                            f'{path}.{name}' if path else name))
                    continue
                if is_plain(value) or isinstance(value, nn.Module) or \
                        holds_only_settings(value, _SETTINGS):
                    continue
                for tensor in _tensors_in(value):
                    key = last.get(id(tensor))
                    if key is not None:
                        self.consumers[key].append(_KeptInState(
                            f'{path}.{name}' if path else name))

    def let_go(self) -> None:
        """Let go of every tensor the pass kept (all the model's
        intermediate values) once the evidence is read: the memory the
        folds allocate next can reuse theirs."""
        self.keep.clear()
        self.last.clear()

    # -- evidence ----------------------------------------------------------
    def only_consumer(self, key: Key, consumer) -> Optional[str]:
        """``None`` if ``consumer`` is the only consumer of ``key``, else
        what else consumes it."""
        others = [c for c in self.consumers.get(key, ()) if c is not consumer]
        if not others:
            return None
        return others[0].describe()

    def conv_sources(self, key: Key, consumer) -> Optional[List[_ModuleCall]]:
        """Conv calls whose output ``key`` is (one, or a plain sum), each
        consumed only on the way to ``consumer``."""
        if self.only_consumer(key, consumer) is not None:
            return None
        source = self.producer.get(key)
        if isinstance(source, _ModuleCall):
            if is_conv_layer(source.module) and len(source.outputs) == 1 \
                    and source.channels_dim_ok:
                return [source]
            return None
        if isinstance(source, _OpCall) and source.rows_view:
            inner = source.inputs[0]
            linear = self.producer.get(inner)
            if isinstance(linear, _ModuleCall) and \
                    isinstance(linear.module, nn.Linear) and \
                    len(linear.outputs) == 1 and \
                    self.only_consumer(inner, source) is None:
                return [linear]
            return None
        if isinstance(source, _OpCall) and source.name in _ADDS and \
                source.plain and source.shapes_match and \
                len(source.outputs) == 1 and \
                len(set(source.inputs)) == len(source.inputs):
            found = []
            for inner in source.inputs:
                convs = self.conv_sources(inner, source)
                if convs is None:
                    return None
                found.extend(convs)
            return found
        return None

    def concat_sources(self, key: Key,
                       consumer) -> Optional[List[_ModuleCall]]:
        """Conv calls whose outputs ``key`` concatenates along channels,
        in order, each consumed only by the concat."""
        source = self.producer.get(key)
        if self.only_consumer(key, consumer) is not None or \
                not isinstance(source, _OpCall) or not source.channel_cat \
                or len(set(source.inputs)) != len(source.inputs):
            return None
        convs = []
        for inner in source.inputs:
            conv = self.producer.get(inner)
            if not isinstance(conv, _ModuleCall) or \
                    not is_conv_layer(conv.module) or \
                    not conv.channels_dim_ok or len(conv.outputs) != 1 or \
                    self.only_consumer(inner, source) is not None:
                return None
            convs.append(conv)
        return convs

    def describe_source(self, key: Key, consumer) -> str:
        other = self.only_consumer(key, consumer)
        source = self.producer.get(key)
        if other is not None and isinstance(source, _ModuleCall) and \
                is_conv_layer(source.module):
            return f'its conv output is also used by {other}'
        if other is not None:
            return f'its input is also used by {other}'
        if source is None:
            return 'its input is not produced by a traced operation'
        if isinstance(source, _ModuleCall) and \
                is_conv_layer(source.module) and not source.channels_dim_ok:
            shape = 'that is not 2-D' if isinstance(
                source.module, nn.Linear) else 'without a batch dim'
            return (f'the {type(source.module).__name__} before it ran on '
                    f'an input {shape}: the norm\'s channels are not its '
                    'output channels')
        return f'input comes from {source.describe()}, not a conv'

    def evidence(self) -> Evidence:
        """Conv/norm occurrences and links observed in the pass."""
        evidence = Evidence(mode='traced')
        for layer in self.read_layers.values():
            # One use of it that no fold may change.
            evidence.occurrences.append(
                Occurrence(layer, None, reason='its parameters are used '
                           'outside a call of it'))
        for layer, leaf in self.nested_layers.values():
            evidence.occurrences.append(
                Occurrence(layer, None, reason='its parameters or buffers '
                           'are set by the forward' if leaf is None else
                           f'called inside a call of {leaf.__name__}, whose '
                           'forward the trace does not follow: data flow '
                           'not seen'))
        for call in self.leaf_calls:
            if is_conv_layer(call.module) or is_norm_layer(call.module):
                call.occurrence = Occurrence(call.module, call.site,
                                             caller=call.caller)
                evidence.occurrences.append(call.occurrence)
        norm_calls = [
            c for c in self.leaf_calls
            if c.occurrence is not None and is_norm_layer(c.module)
        ]
        pending = []
        for call in norm_calls:
            occ = call.occurrence
            if len(call.inputs) != 1 or len(call.outputs) != 1:
                occ.reason = 'called with several tensors'
                continue
            convs = self.conv_sources(call.inputs[0], call)
            kind = POST if convs is not None and len(convs) == 1 else SUM
            if convs is None:
                convs = self.concat_sources(call.inputs[0], call)
                kind = CONCAT
            if convs is None:
                pending.append(call)
                continue
            evidence.link(kind, occ, [c.occurrence for c in convs], 'traced')
        for call in pending:
            occ = call.occurrence
            out = call.outputs[0]
            users = self.consumers.get(out, [])
            # (Once folded, the norm's output is its input: neither may
            # change in place between the norm's call and the conv's.)
            if len(users) == 1 and isinstance(users[0], _ModuleCall) and \
                    users[0].occurrence is not None and \
                    is_conv_layer(users[0].module) and \
                    users[0].inputs == [out] and users[0].channels_dim_ok \
                    and not any(
                        isinstance(c, _Write)
                        and call.order < c.order < users[0].order
                        for c in self.consumers.get(call.inputs[0], ())):
                evidence.link(PRE, occ, [users[0].occurrence], 'traced')
            else:
                occ.reason = self.describe_source(call.inputs[0], call)
        return evidence


def collect_traced_evidence(model: nn.Module,
                            example_inputs: Tuple) -> Tuple[Evidence, Any]:
    """Run ``model(*example_inputs)`` once, recording its data flow.

    Returns:
        The evidence and the model's output (the reference for
        verification).
    """
    traced = TracedForward(model, example_inputs)
    output = traced.run()
    return traced.evidence(), output
