"""Preconditions every entry point checks: unwrap, eval mode, inputs.

Shared by the folding API and re-parameterization, so both refuse the same
things with the same one-line errors.
"""
import copy
from typing import Any, Dict, Optional, Set, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from .module_walk import walk_modules

__all__ = [
    'FusionError', 'unwrap_model', 'is_wrapper', 'check_eval',
    'as_input_tuple', 'fresh_inputs'
]


class FusionError(ValueError):
    """A model or an argument mmfuse cannot fuse as asked."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DataParallel, DDP, an MMEngine model wrapper, an
    MMEngine test-time augmentation model (``BaseTTAModel``, which runs
    the model inside on each augmentation: MMEngine loads checkpoints into
    that one too) or ``torch.compile``'s wrapper (which compiles again
    after the fusion: its guards see the changed modules)."""
    while True:
        compiled = getattr(model, '_orig_mod', None)
        if type(model).__name__ == 'OptimizedModule' and \
                isinstance(compiled, nn.Module):
            model = compiled
            continue
        inner = getattr(model, 'module', None)
        if not isinstance(inner, nn.Module) or not is_wrapper(model):
            return model
        model = inner


def is_wrapper(model: nn.Module) -> bool:
    """Whether ``model`` wraps the model in its ``module`` attribute (see
    :func:`unwrap_model`; ``torch.compile``'s aside)."""
    if isinstance(model, (nn.DataParallel,
                          nn.parallel.DistributedDataParallel)):
        return True
    try:
        from mmengine.model import BaseTTAModel, is_model_wrapper
    except ImportError:  # mmengine is optional for plain torch use
        return False
    return is_model_wrapper(model) or isinstance(model, BaseTTAModel)


def check_eval(model: nn.Module, action: str = 'fusing') -> None:
    """Raise :class:`FusionError` naming a submodule in training mode."""
    for name, module in walk_modules(model):
        if module.training:
            where = f"'{name}'" if name else 'the model itself'
            raise FusionError(
                f'mmfuse: {where} ({type(module).__name__}) is in training '
                f'mode; call model.eval() before {action}')


def as_input_tuple(example_inputs: Any) -> Tuple:
    """``example_inputs`` as the tuple of positional arguments."""
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return (example_inputs, )


def _is_data_element(value: Any) -> bool:
    """Whether ``value`` is an MMEngine data element (``DetDataSample``,
    ``SegDataSample``, ...: what OpenMMLab models take beside images)."""
    try:
        from mmengine.structures import BaseDataElement
    except ImportError:  # mmengine is optional for plain torch use
        return False
    return isinstance(value, BaseDataElement)


def _storage_key(tensor: torch.Tensor) -> Optional[int]:
    """Which storage ``tensor`` lies in (views of one tensor share it;
    two tensors made over the same memory otherwise, ``from_numpy`` of
    an array and of a slice of it, do not), or ``None`` for a tensor
    without plain storage (sparse, nested, meta)."""
    if tensor.layout is not torch.strided or tensor.is_nested or \
            tensor.is_meta:
        return None
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    return storage._cdata if storage.data_ptr() else None


def _shared_storages(inputs: Tuple) -> Set[int]:
    """The storages (see :func:`_storage_key`) that more than one tensor
    of ``inputs`` (in tuples, lists, dicts) lies in."""
    seen: Dict[int, int] = {}
    shared = set()
    for leaf in tree_flatten(inputs)[0]:
        if isinstance(leaf, torch.Tensor):
            key = _storage_key(leaf)
            if key is None:
                continue
            first = seen.setdefault(key, id(leaf))
            if first != id(leaf):
                shared.add(key)
    return shared


def _view_copy(tensor: torch.Tensor, key: int,
               storages: Dict[int, Any]) -> torch.Tensor:
    """``tensor`` in a copy of its storage, made once for every tensor
    that lies in it (``storages``): views of one another stay so."""
    storage = storages.get(key)
    if storage is None:
        storage = storages[key] = tensor.untyped_storage().clone()
    with torch.no_grad():
        copied = torch.empty(0, dtype=tensor.dtype,
                             device=tensor.device).set_(
                                 storage, tensor.storage_offset(),
                                 tensor.size(), tensor.stride())
    if tensor.requires_grad:
        copied.requires_grad_()
    return copied


def fresh_inputs(inputs: Tuple) -> Tuple:
    """A copy of the positional arguments ``inputs`` for one forward pass:
    every tensor in them (in tuples, lists, dicts, named tuples, ordered
    dicts, as deep as they go) cloned, every numpy array copied, and every
    MMEngine data element deep-copied (with the tensors it holds), each
    once however often it comes; anything else (a dataclass, any other
    object) is passed as it is.  A model that changes its input in place
    (``x.sub_(mean)``, a data sample's metainfo or instances) changes the
    copy: the caller's inputs stay as given, and every pass starts from
    the same input.  Tensors given that share memory share it in the
    copy too (a copy of the memory they lie in, made once)."""
    # Copies by the id of what they copy: deepcopy's memo, so that a
    # tensor both given and held by a data element is copied once.
    copies: Dict[int, Any] = {}
    # Tensors given that share memory (``(b, b[1:])``) share it in the
    # copy too: a change of one through the other must show.
    shared = _shared_storages(inputs)
    storages: Dict[int, Any] = {}

    def fresh(value: Any) -> Any:
        copied = copies.get(id(value))
        if copied is not None:
            return copied
        if isinstance(value, torch.Tensor):
            key = _storage_key(value)
            if key is not None and key in shared:
                copied = _view_copy(value, key, storages)
            else:
                copied = value.clone()
            copies[id(value)] = copied
            return copied
        if isinstance(value, np.ndarray) or _is_data_element(value):
            return copy.deepcopy(value, copies)
        return value

    return tree_map(fresh, inputs)
