"""Shared checks: fuse a copy, compare with the unfused model."""
import copy
from contextlib import contextmanager
from typing import (Any, Callable, Iterable, Iterator, Optional, Sequence,
                    Tuple)

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


@contextmanager
def doubled_output(target: nn.Module) -> Iterator[None]:
    """Within, a global forward hook doubles ``target``'s output: a change
    no discovery can see, which only verification catches."""

    def double(module, args, output):
        return output * 2 if module is target else output

    handle = nn.modules.module.register_module_forward_hook(double)
    try:
        yield
    finally:
        handle.remove()


class CoarseRounding(nn.Module):
    """``(x + offset) - offset``: float32 rounds ``x`` to a grid of
    ``2**-9`` there with the default offset 3e4 (``2**-7`` with 1e5),
    float64 keeps it (the rounding a float32 model's ops may amplify, as
    deformable convs do).  Outputs that differ by a float32 rounding
    before it may differ by a grid step after it."""

    def __init__(self, offset: float = 3e4):
        super().__init__()
        self.offset = offset

    def forward(self, x):
        return (x + self.offset) - self.offset


@contextmanager
def changed_where_marked(marker: str,
                         change: Callable[[Any], Any]) -> Iterator[None]:
    """Within, a global forward hook applies ``change`` to the output of
    every module that has a true attribute ``marker``: a change discovery
    cannot see, and one a deep copy of the model makes too (unlike
    :func:`doubled_output`, keyed to one module object)."""

    def hook(module, args, output):
        return change(output) if getattr(module, marker, False) else output

    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class RaisingLeaf(nn.Module):
    """A leaf whose forward always raises ``ValueError('leaf failed')``."""

    def forward(self, x):
        raise ValueError('leaf failed')


class RaisesAfterNorm(nn.Module):
    """conv -> bn -> a leaf that raises; with ``catch``, the error is
    caught and the conv output is used again after it (``bn(y) + y``)."""

    def __init__(self, catch: bool):
        super().__init__()
        self.catch = catch
        self.conv = nn.Conv2d(8, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.fails = RaisingLeaf()

    def forward(self, x):
        y = self.conv(x)
        z = self.bn(y)
        if not self.catch:
            return self.fails(z)
        try:
            self.fails(z)
        except ValueError:
            pass
        return z + y
