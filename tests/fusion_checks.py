"""Shared checks: fuse a copy, compare with the unfused model."""
import copy
from typing import Iterable, Optional, Sequence, Tuple

import torch
from torch import nn

import mmfuse
from mmfuse.report import FusionReport
from mmfuse.testing import randomize_norm_stats
from mmfuse.verify import output_error


def fuse_and_compare(model: nn.Module,
                     inputs: Sequence,
                     traced: bool,
                     seed: int = 0) -> Tuple[nn.Module, Optional[FusionReport],
                                             float]:
    """Randomise norm stats, fuse a deep copy; return it, the report and
    the max relative error against the unfused model."""
    model = randomize_norm_stats(model.eval(), seed)
    with torch.no_grad():
        reference = model(*inputs)
    fused = copy.deepcopy(model)
    if traced:
        report = mmfuse.fuse_model(
            fused, tuple(inputs), reparameterize=False)
    else:
        report = None
        assert mmfuse.fuse_conv_bn(fused) is fused
    with torch.no_grad():
        _, rel = output_error(reference, fused(*inputs))
    return fused, report, rel


def identity_at(model: nn.Module, names: Iterable[str]) -> None:
    for name in names:
        assert isinstance(model.get_submodule(name), nn.Identity), name


def kept_at(model: nn.Module, names: Iterable[str]) -> None:
    for name in names:
        module = model.get_submodule(name)
        assert not isinstance(module, nn.Identity), name
