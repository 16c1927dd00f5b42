"""Modules whose forward takes a list of tensors (DenseNet's DenseLayer).

Structure-only discovery traces such a module with the list argument as a
list of unknown length and items, where the module that holds it passes
it a list at every call: the graph then holds for every such call.  A
forward that reads the list's length or items in Python, or whose code
may read the type of a value, is not traced that way.
"""
from typing import List

import pytest
import torch
from torch import fx, nn

from fusion_checks import fuse_and_compare, identity_at, kept_at
from mmfuse import discover_folds
from mmfuse.discovery.fx_tracer import trace_module_forward
from torch.utils._pytree import tree_flatten


class ListLayer(nn.Module):
    """DenseNet's layer: BN-ReLU-conv1x1-BN-ReLU-conv3x3 over the concat of
    every feature map before it, which its caller passes as a list."""

    def __init__(self, channels: int, growth: int = 4):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, 8, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, growth, 3, padding=1, bias=False)
        self.act = nn.ReLU()

    def bottleneck(self, xs: List[torch.Tensor]) -> torch.Tensor:
        return self.conv1(self.act(self.norm1(torch.cat(xs, 1))))

    def forward(self, x):
        assert isinstance(x, list)
        return self.conv2(self.act(self.norm2(self.bottleneck(x))))


class ListBlock(nn.Module):
    """DenseNet's block: each layer gets the growing list of features."""

    def __init__(self, layer=ListLayer, channels: int = 3, layers: int = 3):
        super().__init__()
        self.block = nn.ModuleList(
            layer(channels + 4 * i) for i in range(layers))

    def forward(self, x):
        features = [x]
        for layer in self.block:
            features.append(layer(features))
        return torch.cat(features, 1)


class ReadsLength(ListLayer):

    def forward(self, x):
        assert isinstance(x, list)
        if len(x) > 2:  # a forward that depends on the list's length
            return self.conv2(self.act(self.bottleneck(x)))
        return self.conv2(self.act(self.norm2(self.bottleneck(x))))


class CatchesRead(ListLayer):

    def forward(self, x):
        assert isinstance(x, list)
        try:
            count = len(x)
        except Exception:  # the trace must not take this way out
            count = 1
        out = self.conv2(self.act(self.norm2(self.bottleneck(x))))
        return out if count else out * 0


class ReadsType(ListLayer):
    """Tells a list from its class, which a traced list does not share:
    traced, it would take the second way, where ``norm2`` folds; run, it
    takes the first, where ``conv1``'s output also skips the rest."""

    def forward(self, x):
        assert isinstance(x, list)
        if type(x) is list:  # noqa: E721
            y = self.conv1(torch.cat(x, 1))
            return self.conv2(self.act(self.norm2(y))) + y[:, :4]
        return self.conv2(self.act(self.norm2(self.bottleneck(x))))


_kind_of = type


class ReadsTypeUnderAnotherName(ReadsType):

    def forward(self, x):
        assert isinstance(x, list)
        if _kind_of(x) is list:
            y = self.conv1(torch.cat(x, 1))
            return self.conv2(self.act(self.norm2(y))) + y[:, :4]
        return self.conv2(self.act(self.norm2(self.bottleneck(x))))


class ReadsLengthInC(ListLayer):
    """Reads the length through list's own method, which the list's
    refusals do not see."""

    def forward(self, x):
        assert isinstance(x, list)
        if list.__len__(x) > 2:
            return self.conv2(self.act(self.bottleneck(x)))
        return self.conv2(self.act(self.norm2(self.bottleneck(x))))


class FlattensIt(ListLayer):
    """torch's pytree reads the list's type on the forward's behalf."""

    def forward(self, x):
        assert isinstance(x, list)
        if len(tree_flatten(x)[0]) > 2:
            return self.conv2(self.act(self.bottleneck(x)))
        return self.conv2(self.act(self.norm2(self.bottleneck(x))))


class TensorTaking(ListLayer):
    """Takes a tensor or a list, as torchvision's DenseNet layer does; for
    a tensor, the first conv's output also skips the rest (so ``norm2``
    must stay), for a list it does not."""

    def forward(self, x):
        if isinstance(x, torch.Tensor):
            y = self.conv1(x)
            return self.conv2(self.act(self.norm2(y))) + y[:, :4]
        assert isinstance(x, list)
        return self.conv2(self.act(self.norm2(self.bottleneck(x))))


class TensorCaller(nn.Module):
    """Calls that layer with a tensor: tracing it with a list would fold
    ``norm2`` into ``conv1``, whose output the residual also reads."""

    def __init__(self):
        super().__init__()
        self.layer = TensorTaking(3)

    def forward(self, x):
        return self.layer(x)


class MixedCaller(TensorCaller):
    """Calls the layer once with a list and once with a tensor."""

    def forward(self, x):
        return self.layer([x]) + self.layer(x)


def _input():
    return (torch.randn(2, 3, 6, 6), )


def test_dense_block_folds_each_layers_second_norm():
    fused, _, rel = fuse_and_compare(ListBlock(), _input(), traced=False)
    assert rel < 1e-5
    identity_at(fused, [f'block.{i}.norm2' for i in range(3)])
    # The first norm normalises a concat and runs before a ReLU.
    kept_at(fused, [f'block.{i}.norm1' for i in range(3)])
    plan = discover_folds(ListBlock().eval())
    reasons = {skip.name: skip.reason for skip in plan.skipped}
    assert reasons['block.0.norm1'] == 'input comes from cat, not a conv'


def test_traced_discovery_agrees():
    fused, report, rel = fuse_and_compare(ListBlock(), _input(), traced=True)
    assert rel < 1e-5
    assert sorted(report.folded_names) == [
        f'block.{i}.norm2' for i in range(3)
    ]


@pytest.mark.parametrize('layer', [
    ReadsLength, CatchesRead, ReadsType, ReadsTypeUnderAnotherName,
    ReadsLengthInC, FlattensIt
])
def test_forward_that_reads_the_list_is_not_traced_with_one(layer):
    model = ListBlock(layer).eval()
    plan = discover_folds(model)
    assert not plan.folds
    reasons = {skip.name: skip.reason for skip in plan.skipped}
    # (``type(x) is list`` is an identity test too, refused first.)
    assert 'cannot trace' in reasons['block.0.norm2'] or \
        'by identity' in reasons['block.0.norm2']
    fused, _, rel = fuse_and_compare(ListBlock(layer), _input(),
                                     traced=False)
    assert rel < 1e-5
    kept_at(fused, [f'block.{i}.norm2' for i in range(3)])


_READS = {
    'len': lambda xs: len(xs),
    'iteration': lambda xs: [t for t in xs],
    'index': lambda xs: xs[0],
    'in': lambda xs: 1 in xs,
    'bool': lambda xs: bool(xs),
    'append': lambda xs: xs.append(1),
    'concat after': lambda xs: xs + [1],
    'concat before': lambda xs: [1] + xs,
    'slice assignment': lambda xs: [0, 1].__setitem__(slice(0, 1), xs),
    'compare': lambda xs: xs == [],
    'print': lambda xs: f'{xs}',
    'star': lambda xs: max(*xs),
    'list()': lambda xs: list(xs),
    'tensor use': lambda xs: xs.shape,
    'operator': lambda xs: -xs,
}


@pytest.mark.parametrize('read', list(_READS.values()), ids=list(_READS))
def test_reads_are_refused_however_made(read):

    class Reads(ListLayer):

        def forward(self, x):
            read(x)
            return self.conv1(torch.cat(x, 1))

    with pytest.raises((fx.proxy.TraceError, AttributeError)):
        trace_module_forward(Reads(3), list_args={'x'})


def test_a_list_is_a_list_to_isinstance_and_class():
    seen = {}

    class Probe(ListLayer):

        def forward(self, x):
            seen['isinstance'] = isinstance(x, list)
            seen['tensor'] = isinstance(x, torch.Tensor)
            seen['class'] = x.__class__ is list
            seen['shape'] = hasattr(x, 'shape')
            return self.conv1(torch.cat(x, 1))

    graph = trace_module_forward(Probe(3), list_args={'x'})
    assert seen == {
        'isinstance': True, 'tensor': False, 'class': True, 'shape': False
    }
    cat = [n for n in graph.nodes if n.target is torch.cat]
    placeholder = [n for n in graph.nodes if n.op == 'placeholder']
    assert len(cat) == 1 and cat[0].args == (placeholder[0], 1)


@pytest.mark.parametrize('caller', [TensorCaller, MixedCaller])
def test_not_traced_with_a_list_unless_every_call_passes_one(caller):
    plan = discover_folds(caller().eval())
    assert not plan.folds
    fused, _, rel = fuse_and_compare(caller(), _input(), traced=False)
    assert rel < 1e-5
    kept_at(fused, ['layer.norm2'])


class ListAndTensorCallers(nn.Module):
    """Two layers of one class: one called with a list, one with a
    tensor (in either order).  Once the first is traced with a list, the
    second is tried that way first, and must still not be: its caller
    passes a tensor."""

    def __init__(self, list_first: bool):
        super().__init__()
        self.listed = 0 if list_first else 1
        self.layers = nn.ModuleList([TensorTaking(3), TensorTaking(3)])

    def forward(self, x):
        return self.layers[self.listed]([x]) + \
            self.layers[1 - self.listed](x)


@pytest.mark.parametrize('list_first', [True, False])
def test_a_class_traced_with_a_list_once_is_not_always(list_first):
    model = ListAndTensorCallers(list_first).eval()
    plan = discover_folds(model)
    listed = 0 if list_first else 1
    assert [f.norm for f in plan.folds] == [f'layers.{listed}.norm2']
    fused, _, rel = fuse_and_compare(
        ListAndTensorCallers(list_first), _input(), traced=False)
    assert rel < 1e-5
    identity_at(fused, [f'layers.{listed}.norm2'])
    kept_at(fused, [f'layers.{1 - listed}.norm2'])


def test_a_tracer_that_is_on_stays_on_and_the_module_as_it_was():
    import sys

    def tracer(frame, event, arg):
        return None

    layer = ListLayer(3)
    before = {m: dict(m.__dict__) for m in layer.modules()}
    sys.settrace(tracer)
    try:
        with pytest.raises(fx.proxy.TraceError, match='a tracer is on'):
            trace_module_forward(layer, list_args={'x'})
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(None)
    assert {m: dict(m.__dict__) for m in layer.modules()} == before
    assert not torch.fx._symbolic_trace.is_fx_tracing()
    # And once it is off, the same trace works.
    assert trace_module_forward(layer, list_args={'x'}) is not None


class _Holder(nn.Module):
    """Passes the layer a list."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([TensorTaking(3)])

    def forward(self, x):
        return self.layers[0]([x])


class _ReachesIn(nn.Module):
    """Also calls its grandchild with a tensor, past the holder: a module
    with no layers of its own is not traced, but its code is read."""

    def __init__(self):
        super().__init__()
        self.block = _Holder()

    def forward(self, x):
        return self.block(x) + self.block.layers[0](x)


def test_not_traced_with_a_list_when_a_module_above_may_call_it():
    plan = discover_folds(_ReachesIn().eval())
    assert not plan.folds
    fused, _, rel = fuse_and_compare(_ReachesIn(), _input(), traced=False)
    assert rel < 1e-5
    kept_at(fused, ['block.layers.0.norm2'])
    # Held by a module that does not reach in, the same layer is traced
    # with a list, and its norm folds.
    plan = discover_folds(_Holder().eval())
    assert [f.norm for f in plan.folds] == ['layers.0.norm2']
