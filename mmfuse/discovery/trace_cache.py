"""One trace for modules alike: graphs shared by a network's repeated blocks.

A network repeats its blocks: HRNet-W18 has 104 ``BasicBlock`` modules of
four kinds, MobileOne-S0 43 blocks of 13.  Tracing is most of the cost of
structure-only discovery, and the graph of a block's forward (every
submodule a call, named by its path below the block) depends only on what
that forward can read: the block's class and the state of the block and of
every module below it.  Modules that are alike in all of that share one
trace.

Two modules are *alike* (:class:`ModuleShape`) when, module by module
through their subtrees, in the same order:

* the paths and classes are the same, and so is which paths hold the same
  module object;
* the parameters and buffers have the same names, and each the same type,
  shape, strides, dtype, device, layout and ``requires_grad`` (or both are
  ``None``), and which of them are one tensor (tied);
* the values of small tensors (at most 16 elements) and of integer and
  boolean ones (at most 1024) are the same: those are the flags and
  numbers a forward may read in Python (``if self.flag``,
  ``float(self.alpha)``), which its trace then holds as constants (the
  floating point tensors of convs and norms aside: weights and statistics,
  which fusion is there to change);
* every other attribute has the same name, the same type, and compares
  equal (``==``; an attribute that cannot be compared counts as different).

A module whose forward names a global or class attribute holding a dict,
list or set (state kept outside the module: ``RES[id(self)]``) is traced
on its own.  The values of larger floating point tensors (weights, norm
statistics) are not compared: a forward that reads them in Python, rather
than passing them to tensor operations (recorded as ``get_attr`` nodes,
read from each module), would share a trace made with another module's
values.
"""
from collections import Counter
from typing import Any, Dict, FrozenSet, Hashable, List, Optional, Tuple

import torch
from torch import fx, nn

from ..layers import is_conv_layer, is_norm_layer
from ..module_walk import unique_modules, walk_modules
from .fx_tracer import reads_shared_containers, trace_module_forward

__all__ = ['ModuleShape', 'TraceCache']

#: Entries of a module's ``__dict__`` described apart from the others.
_TENSORS_AND_CHILDREN = ('_parameters', '_buffers', '_modules')


#: Tensors of at most this many elements are compared by value too, and
#: so are integer and boolean tensors of at most ``_MAX_INDEX_VALUES``.
_MAX_SCALAR_VALUES = 16
_MAX_INDEX_VALUES = 1024


def _values(tensor: torch.Tensor, dtype: torch.dtype,
            module: nn.Module) -> Hashable:
    """The values of a small or an integer tensor of ``module``, which a
    forward may read as flags or numbers (``if self.flag``,
    ``float(self.alpha)``), baking them into its trace; ``()`` for other
    tensors, and for the floating point ones of convs and norms (weights
    and statistics, which fusion is there to change).  A tensor whose
    values cannot be read (meta, fake) gets a key equal to no other.

    Args:
        tensor: The tensor.
        dtype: Its dtype (already read by the caller).
        module: The module that holds it.
    """
    size = tensor.numel()
    if size > _MAX_INDEX_VALUES:  # most weights: no question asked
        return ()
    if dtype.is_floating_point or dtype.is_complex:
        if size > _MAX_SCALAR_VALUES or is_norm_layer(module) or \
                is_conv_layer(module):
            return ()
    try:
        if size == 1:  # a flag, a count (a norm's num_batches_tracked)
            return (tensor.item(), )
        return tuple(tensor.detach().reshape(-1).tolist())
    except (RuntimeError, NotImplementedError):
        return (object(), )


def _tensor_shapes(tensors: Dict[str, Optional[torch.Tensor]],
                   module: nn.Module, first_seen: Dict[int, Tuple[int, str]],
                   index: int) -> Hashable:
    """``(name, type, shape, strides, dtype, device, layout,
    requires_grad, values)`` of each tensor of ``module`` (``(name,
    None)`` for ``None``, ``(name, where)`` for a tensor met before in the
    walk, where ``first_seen`` records the module index and name of each
    tensor)."""
    if not tensors:
        return ()
    described = []
    for name, t in tensors.items():
        if t is None:
            described.append((name, None))
            continue
        where = first_seen.setdefault(id(t), (index, name))
        if where != (index, name):
            described.append((name, where))
            continue
        layout, dtype = t.layout, t.dtype
        described.append(
            (name, type(t), t.shape,
             t.stride() if layout is torch.strided else None, dtype,
             t.device, layout, t.requires_grad, _values(t, dtype, module)))
    return tuple(described)


def _tree_size(module: nn.Module, limit: int) -> int:
    """How many modules the tree under ``module`` has (``module`` too,
    each as often as it is registered), counted up to ``limit + 1``."""
    count = 0
    stack = [module]
    while stack and count <= limit:
        count += 1
        stack.extend(child for child in stack.pop()._modules.values()
                     if child is not None)
    return count


class ModuleShape:
    """What a module's forward can read of its subtree, tensor values
    aside, split into a hashable ``key`` and attributes compared with
    ``==`` (see the module docstring).

    Args:
        module: The root of the subtree.
    """

    def __init__(self, module: nn.Module):
        key: List[Hashable] = []
        self.attributes: List[Dict] = []
        first_path: Dict[int, int] = {}
        first_seen: Dict[int, Tuple[int, str]] = {}
        for index, (path, sub) in enumerate(
                walk_modules(module, remove_duplicate=False)):
            same_as = first_path.setdefault(id(sub), index)
            if same_as != index:
                key.append((path, same_as))
                continue
            state = sub.__dict__
            others = dict(state)
            for name in _TENSORS_AND_CHILDREN:
                others.pop(name, None)
            key.append((path, type(sub), tuple(others),
                        tuple(map(type, others.values())),
                        _tensor_shapes(state.get('_parameters'), sub,
                                       first_seen, index),
                        _tensor_shapes(state.get('_buffers'), sub,
                                       first_seen, index)))
            self.attributes.append(others)
        self.key = tuple(key)

    def alike(self, other: 'ModuleShape') -> bool:
        """Whether ``other``, whose key is equal, is alike."""
        try:
            return all(
                mine == theirs
                for mine, theirs in zip(self.attributes, other.attributes))
        except (ValueError, RuntimeError, TypeError):
            # An attribute that does not compare to a truth value (an
            # array, a tensor of several elements): not known to be alike.
            return False


class TraceCache:
    """Traces of module forwards for one model, shared by modules alike.

    With the model given, only modules of a class that occurs more than
    once in it, and with at most ``MAX_COMPARED`` modules in their subtree,
    are compared: for the others the comparison would cost more time than
    it can save (a module's graph grows with the calls its forward makes,
    its shape with its whole subtree).  The cache holds the modules'
    attributes: keep it no longer than one pass over the model.  The
    graphs it hands out may be handed out again: copy one before changing
    it.

    Args:
        model: The model whose modules will be traced, or ``None`` to
            compare every module traced.
    """

    #: Largest subtree (in modules) of a module compared with others.
    MAX_COMPARED = 64

    def __init__(self, model: Optional[nn.Module] = None):
        # Of the model's module classes, how many modules each has; and
        # whether each module asked about is compared (``None``: all).
        self.counts: Optional[Counter] = None
        self.compared: Dict[int, bool] = {}
        if model is not None:
            self.counts = Counter(map(type, unique_modules(model)))
        self.traces: Dict[Hashable, List[Tuple[ModuleShape, Optional[
            fx.Graph], Optional[Exception]]]] = {}

    def is_compared(self, module: nn.Module) -> bool:
        """Whether ``module``'s trace is looked for among those of modules
        alike: its class occurs more than once in the model, and its
        subtree has at most ``MAX_COMPARED`` modules (counted as often as
        they are registered)."""
        if self.counts is None:
            return True
        known = self.compared.get(id(module))
        if known is None:
            known = self.counts[type(module)] > 1 and \
                _tree_size(module, self.MAX_COMPARED) <= self.MAX_COMPARED \
                and not reads_shared_containers(type(module))
            self.compared[id(module)] = known
        return known

    def trace(self,
              module: nn.Module,
              concrete_args: Optional[Dict[str, Any]] = None,
              list_args: FrozenSet[str] = frozenset()) -> fx.Graph:
        """The graph of ``module.forward`` (see ``trace_module_forward``),
        maybe the one traced for a module alike.

        Args:
            module: The module.
            concrete_args: Arguments fixed to values; of modules alike
                (one class) these can only be the forward's defaults, so
                only their names tell traces apart.
            list_args: Parameters traced as lists of unknown length.

        Raises:
            Whatever tracing raised (for the module alike, too).
        """
        if not self.is_compared(module):
            return trace_module_forward(module, concrete_args, list_args)
        shape = ModuleShape(module)
        key = (shape.key, tuple(concrete_args or ()), list_args)
        bucket = self.traces.setdefault(key, [])
        for known, graph, error in bucket:
            if known.alike(shape):
                break
        else:
            try:
                graph = trace_module_forward(module, concrete_args,
                                             list_args)
                error = None
            except Exception as raised:  # fx raises many types on code
                graph, error = None, raised
            bucket.append((shape, graph, error))
        if error is not None:
            raise error
        return graph
