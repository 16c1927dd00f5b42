"""Traces shared by modules alike: shared only where the graph must be the
same, and structure-only fusion stays right on blocks that differ."""
import numpy as np
import pytest
import torch
from torch import nn

from mmfuse.discovery import trace_cache
from mmfuse.discovery.trace_cache import ModuleShape, TraceCache

from fusion_checks import fuse_and_compare, identity_at, kept_at

X = torch.randn(2, 4, 9, 9, generator=torch.Generator().manual_seed(2))


class Block(nn.Module):
    """conv -> bn, and with ``reuse`` the conv output also feeds the sum
    (then the BN must stay)."""

    def __init__(self, reuse=False, channels=4):
        super().__init__()
        self.conv = nn.Conv2d(4, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.reuse = reuse

    def forward(self, x):
        y = self.conv(x)
        out = self.bn(y)
        if self.reuse is True:  # ``is``: 1 would not do
            out = out + y
        return out


def _count_traces(monkeypatch):
    calls = []
    original = trace_cache.trace_module_forward

    def counting(module, *args, **kwargs):
        calls.append(module)
        return original(module, *args, **kwargs)

    monkeypatch.setattr(trace_cache, 'trace_module_forward', counting)
    return calls


def test_blocks_alike_share_one_trace(monkeypatch):
    calls = _count_traces(monkeypatch)
    model = nn.Sequential(*[Block() for _ in range(5)])
    fused, _, rel = fuse_and_compare(model, (X, ), traced=False)
    assert rel < 1e-5
    identity_at(fused, [f'{i}.bn' for i in range(5)])
    assert len(calls) == 1


@pytest.mark.parametrize('other', [True, 1, 1.0, 'yes'])
def test_an_attribute_of_another_value_or_type_gets_its_own_trace(
        monkeypatch, other):
    """Blocks that differ only in ``reuse`` (False against True, 1, 1.0,
    'yes'): the BN of the block whose forward reuses the conv output stays,
    the others fold."""
    calls = _count_traces(monkeypatch)
    model = nn.Sequential(Block(), Block(reuse=other), Block())
    fused, _, rel = fuse_and_compare(model, (X, ), traced=False)
    assert rel < 1e-5
    identity_at(fused, ['0.bn', '2.bn'])
    if other is True:
        kept_at(fused, ['1.bn'])
    else:
        identity_at(fused, ['1.bn'])
    assert len(calls) == 2


def test_other_shapes_children_and_sharing_are_not_alike():
    base = ModuleShape(Block())
    assert base.key == ModuleShape(Block()).key
    assert base.alike(ModuleShape(Block()))
    assert base.key != ModuleShape(Block(channels=5)).key
    other_child = Block()
    other_child.bn = nn.SyncBatchNorm(4)
    assert base.key != ModuleShape(other_child).key
    frozen = Block()
    frozen.conv.weight.requires_grad_(False)
    assert base.key != ModuleShape(frozen).key
    # The same module under two names is another structure than two
    # modules alike.
    shared, separate = nn.Module(), nn.Module()
    conv = nn.Conv2d(2, 2, 1)
    shared.a, shared.b = conv, conv
    separate.a, separate.b = nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1)
    assert ModuleShape(shared).key != ModuleShape(separate).key


def test_an_attribute_that_cannot_be_compared_is_not_alike():
    first, second = Block(), Block()
    first.table = np.arange(3)
    second.table = np.arange(3)
    assert ModuleShape(first).key == ModuleShape(second).key
    assert not ModuleShape(first).alike(ModuleShape(second))


def test_a_trace_error_is_raised_for_every_module_alike():

    class Untraceable(nn.Module):

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            if self.conv(x).sum() > 0:  # control flow on a traced value
                return self.bn(self.conv(x))
            return x

    model = nn.Sequential(Untraceable(), Untraceable())
    cache = TraceCache(model)
    for block in model:
        with pytest.raises(Exception, match='control flow'):
            cache.trace(block)
    assert len(cache.traces) == 1


def test_equal_values_of_other_types_are_not_alike(monkeypatch):
    """``1 == True``, but the forward tests ``is True``: sharing the trace
    of the first block would fold the second's BN, which its forward
    reuses."""
    calls = _count_traces(monkeypatch)
    model = nn.Sequential(Block(reuse=1), Block(reuse=True))
    fused, _, rel = fuse_and_compare(model, (X, ), traced=False)
    assert rel < 1e-5
    identity_at(fused, ['0.bn'])
    kept_at(fused, ['1.bn'])
    assert len(calls) == 2


class FlagBlock(nn.Module):
    """conv -> bn where the buffer ``after`` is set, else bn -> conv (a
    padded conv: that BN must stay)."""

    def __init__(self, after: bool):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.register_buffer('after', torch.tensor(after))

    def forward(self, x):
        if self.after:
            return self.bn(self.conv(x))
        return self.conv(self.bn(x))


def test_blocks_whose_flag_buffers_differ_get_their_own_trace(monkeypatch):
    """The trace of the first block bakes in ``if self.after``: shared
    with the second it would fold a BN the second applies before its
    padded conv."""
    calls = _count_traces(monkeypatch)
    model = nn.Sequential(FlagBlock(True), FlagBlock(False), FlagBlock(True))
    fused, _, rel = fuse_and_compare(model, (X, ), traced=False)
    assert rel < 1e-5
    identity_at(fused, ['0.bn', '2.bn'])
    kept_at(fused, ['1.bn'])
    assert len(calls) == 2


def test_scalar_values_and_tied_tensors_tell_modules_apart():
    """A one-element parameter a forward may read as a number (``float(
    self.alpha)``), and which parameters are one tensor, are part of the
    key; the weights and statistics of convs and norms are not."""

    def scaled(alpha):
        block = Block()
        block.alpha = nn.Parameter(torch.tensor([alpha]))
        return block

    assert ModuleShape(scaled(0.5)).key == ModuleShape(scaled(0.5)).key
    assert ModuleShape(scaled(0.5)).key != ModuleShape(scaled(0.7)).key
    # Four-channel norms with other statistics, convs with other weights.
    first, second = Block(), Block()
    with torch.no_grad():
        second.bn.running_var.uniform_(0.5, 2.0)
        second.conv.weight.mul_(2.0)
    assert ModuleShape(first).key == ModuleShape(second).key
    tied, untied = nn.Module(), nn.Module()
    tied.a, tied.b = nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1)
    untied.a, untied.b = nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1)
    tied.b.weight = tied.a.weight
    assert ModuleShape(tied).key != ModuleShape(untied).key


def test_a_tensor_whose_values_cannot_be_read_is_not_alike():
    first, second = Block(), Block()
    for block in (first, second):
        block.register_buffer('flag', torch.empty(1, device='meta'))
    assert ModuleShape(first).key != ModuleShape(second).key
