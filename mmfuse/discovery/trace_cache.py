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
  ``None``);
* every other attribute has the same name, the same type, and compares
  equal (``==``; an attribute that cannot be compared counts as different).

Tensor values are left out on purpose: a forward whose Python control flow
branches on the values of its own parameters is outside what fusion can
keep right anyway (folding changes those values), and a trace of it would
hold for one set of values only.
"""
from collections import Counter
from typing import Dict, Hashable, List, Optional, Tuple

import torch
from torch import fx, nn

from ..module_walk import walk_modules
from .fx_tracer import trace_module_forward

__all__ = ['ModuleShape', 'TraceCache']

#: Entries of a module's ``__dict__`` described apart from the others.
_TENSORS_AND_CHILDREN = ('_parameters', '_buffers', '_modules')


def _tensor_shapes(tensors: Dict[str, Optional[torch.Tensor]]) -> Hashable:
    """``(name, type, shape, strides, dtype, device, layout,
    requires_grad)`` of each tensor (``(name, None)`` for ``None``)."""
    if not tensors:
        return ()
    return tuple(
        (name, None) if t is None else
        (name, type(t), t.shape,
         t.stride() if t.layout is torch.strided else None, t.dtype,
         t.device, t.layout, t.requires_grad) for name, t in tensors.items())


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
                        _tensor_shapes(state.get('_parameters')),
                        _tensor_shapes(state.get('_buffers'))))
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

    Only modules of a class that occurs more than once in the model are
    compared: for the others the comparison would cost time and never
    save a trace.  The cache holds the modules' attributes: keep it no
    longer than one discovery run.

    Args:
        model: The model whose modules will be traced.
    """

    def __init__(self, model: nn.Module):
        counts = Counter(type(m) for _, m in walk_modules(model))
        self.repeated = {kind for kind, count in counts.items() if count > 1}
        self.traces: Dict[Hashable, List[Tuple[ModuleShape, Optional[
            fx.Graph], Optional[Exception]]]] = {}

    def trace(self, module: nn.Module) -> fx.Graph:
        """The graph of ``module.forward`` (see ``trace_module_forward``),
        maybe the one traced for a module alike.

        Raises:
            Whatever tracing raised (for the module alike, too).
        """
        if type(module) not in self.repeated:
            return trace_module_forward(module)
        shape = ModuleShape(module)
        bucket = self.traces.setdefault(shape.key, [])
        for known, graph, error in bucket:
            if known.alike(shape):
                break
        else:
            try:
                graph, error = trace_module_forward(module), None
            except Exception as raised:  # fx raises many types on code
                graph, error = None, raised
            bucket.append((shape, graph, error))
        if error is not None:
            raise error
        return graph
