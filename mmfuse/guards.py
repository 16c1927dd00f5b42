"""Preconditions every entry point checks: unwrap, eval mode, inputs.

Shared by the folding API and re-parameterization, so both refuse the same
things with the same one-line errors.
"""
import copy
from typing import Any, Dict, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_map

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


def fresh_inputs(inputs: Tuple) -> Tuple:
    """A copy of the positional arguments ``inputs`` for one forward pass:
    every tensor in them (in tuples, lists, dicts, named tuples, ordered
    dicts, as deep as they go) cloned, every numpy array copied, and every
    MMEngine data element deep-copied (with the tensors it holds), each
    once however often it comes; anything else (a dataclass, any other
    object) is passed as it is.  A model that changes its input in place
    (``x.sub_(mean)``, a data sample's metainfo or instances) changes the
    copy: the caller's inputs stay as given, and every pass starts from
    the same input."""
    # Copies by the id of what they copy: deepcopy's memo, so that a
    # tensor both given and held by a data element is copied once.
    copies: Dict[int, Any] = {}

    def fresh(value: Any) -> Any:
        copied = copies.get(id(value))
        if copied is not None:
            return copied
        if isinstance(value, torch.Tensor):
            copied = copies[id(value)] = value.clone()
            return copied
        if isinstance(value, np.ndarray) or _is_data_element(value):
            return copy.deepcopy(value, copies)
        return value

    return tree_map(fresh, inputs)
