"""Ways a layer's call can do more than its class's forward, and other
paths around a fold found by review: each must leave the norm (or, for
weights in memory torch does not own, the memory) alone."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmfuse
from fusion_checks import (changed_where_marked, fuse_and_compare,
                           identity_at, kept_at)
from mmfuse.testing import randomize_norm_stats
from mmfuse.verify import output_error

X = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))


def _conv_bn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))


def test_frozen_batchnorm_with_a_forward_hook_stays(traced):
    from torchvision.ops.misc import FrozenBatchNorm2d
    model = nn.Sequential(nn.Conv2d(4, 4, 3), FrozenBatchNorm2d(4))
    with torch.no_grad():
        for name in ('weight', 'bias', 'running_mean'):
            getattr(model[1], name).normal_()
        model[1].running_var.uniform_(0.5, 1.5)
    model[1].register_forward_hook(lambda module, args, out: out.relu())
    fused, report, rel = fuse_and_compare(model, (X, ), traced)
    assert rel == 0
    kept_at(fused, ['1'])
    if report is not None:
        assert 'has forward hooks' in report.left[0].reason


def _instance_forward_norm() -> nn.Module:
    model = _conv_bn()
    norm = model[1]
    norm.forward = lambda x: F.relu(nn.BatchNorm2d.forward(norm, x))
    return model


def _instance_forward_conv() -> nn.Module:
    model = _conv_bn()
    conv = model[0]
    conv.forward = lambda x: F.relu(nn.Conv2d.forward(conv, x))
    return model


class DoublingConv(nn.Conv2d):

    def __call__(self, x):
        return super().__call__(x) * 2


class ReLUAfterBN(nn.BatchNorm2d):

    def _call_impl(self, *args, **kwargs):
        return super()._call_impl(*args, **kwargs).relu()


@pytest.mark.parametrize('make', [
    _instance_forward_norm, _instance_forward_conv,
    lambda: nn.Sequential(DoublingConv(4, 4, 3), nn.BatchNorm2d(4)),
    lambda: nn.Sequential(nn.Conv2d(4, 4, 3), ReLUAfterBN(4)),
],
                         ids=[
                             'norm-forward', 'conv-forward', 'conv-call',
                             'norm-call-impl'
                         ])
def test_a_layer_not_called_through_its_class_forward_stays(make, traced):
    fused, report, rel = fuse_and_compare(make(), (X, ), traced)
    assert rel == 0
    kept_at(fused, ['1'])
    if report is not None and 'forward' in make.__name__:
        assert "not called through its class's forward" in \
            report.left[0].reason


class ReversedSequential(nn.Sequential):
    """Runs its children last first."""

    def __iter__(self):
        return iter(reversed(list(self._modules.values())))


def test_sequential_subclass_with_its_own_iteration_is_traced():
    """Registered norm-then-conv, run conv-then-norm: read as a stock
    Sequential the norm would fold into the conv's input side (relative
    error 1.0 before); traced, it folds into the conv's output side."""
    torch.manual_seed(0)
    model = ReversedSequential(
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 4, 3, padding=1, padding_mode='circular'))
    fused, _, rel = fuse_and_compare(model, (X, ), traced=False)
    assert rel < 1e-5
    identity_at(fused, ['0'])
    assert fused[1].bias is not None


def test_weight_in_numpy_memory_is_not_rewritten():
    """A weight made with ``torch.from_numpy`` lies in the array's memory:
    the fold gives the conv a new weight and leaves the array alone."""
    array = np.random.default_rng(0).standard_normal(
        (4, 4, 3, 3)).astype(np.float32)
    kept = array.copy()
    model = randomize_norm_stats(_conv_bn().eval(), seed=0)
    model[0].weight = nn.Parameter(torch.from_numpy(array))
    with torch.no_grad():
        reference = model(X)
    mmfuse.fuse_conv_bn(model)
    identity_at(model, ['1'])
    assert np.array_equal(array, kept)
    with torch.no_grad():
        assert output_error(reference, model(X))[1] < 1e-5


def test_weight_in_shared_memory_is_not_rewritten():
    """``share_memory_()``: other processes may see the weight."""
    model = randomize_norm_stats(_conv_bn().eval(), seed=0)
    model.share_memory()
    weight = model[0].weight
    before = weight.detach().clone()
    mmfuse.fuse_conv_bn(model)
    identity_at(model, ['1'])
    assert model[0].weight is not weight
    assert torch.equal(weight.detach(), before)


class ScriptedActivation(nn.Module):

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = torch.jit.script(nn.ReLU())

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


def test_a_scripted_submodule_is_called_not_read(traced):
    fused, _, rel = fuse_and_compare(ScriptedActivation(), (X, ), traced)
    assert rel < 1e-5
    identity_at(fused, ['bn'])


def test_global_hooks_keep_unverified_folds_out():
    """A global forward hook may act on any layer: without an output check
    nothing is folded (structure only, ``discover_folds``, ``verify=False``);
    with one, the hook runs in the checks and folds that pass it stand."""
    model = randomize_norm_stats(_conv_bn().eval(), seed=0)
    with changed_where_marked('never_marked', lambda output: output):
        fused = mmfuse.fuse_conv_bn(copy.deepcopy(model))
        kept_at(fused, ['1'])
        plan = mmfuse.discover_folds(model, (X, ))
        assert not plan.folds
        assert 'global forward hooks' in plan.skipped[0].reason
        report = mmfuse.fuse_model(copy.deepcopy(model), (X, ), verify=False)
        assert not report.folded
        assert 'global forward hooks' in report.left[0].reason
        report = mmfuse.fuse_model(copy.deepcopy(model), (X, ))
        assert report.folded_names == ['1']
    fused = mmfuse.fuse_conv_bn(copy.deepcopy(model))
    identity_at(fused, ['1'])


class Level(nn.Module):

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


class HeadAlsoCallingTheSharedConv(nn.Module):
    """One conv shared by two levels, each with its own BN; the head also
    calls the conv through a level from a place that resolves to no
    site."""

    def __init__(self):
        super().__init__()
        conv = nn.Conv2d(4, 4, 3, padding=1)
        self.levels = nn.ModuleList(Level(conv) for _ in range(2))

    def forward(self, a, b):
        return self.levels[0](a), self.levels[1](b), self.levels[1].conv(b)


def test_shared_conv_also_called_from_an_unresolved_place_stays():
    model = randomize_norm_stats(HeadAlsoCallingTheSharedConv().eval(), 0)
    b = X.flip(0)
    fused = copy.deepcopy(model)
    report = mmfuse.fuse_model(fused, (X, b), verify=False)
    assert not report.folded
    assert all('could not be resolved' in s.reason for s in report.left)
    with torch.no_grad():
        assert output_error(model(X, b), fused(X, b))[1] == 0


def test_a_torch_compile_wrapper_is_unwrapped():
    model = randomize_norm_stats(_conv_bn().eval(), seed=0)
    with torch.no_grad():
        reference = model(X)
    compiled = torch.compile(model, backend='eager')
    with torch.no_grad():
        compiled(X)
    report = mmfuse.fuse_model(compiled, (X, ))
    assert report.folded_names == ['1']
    identity_at(model, ['1'])
    with torch.no_grad():  # compiled again: its guards see the change
        assert output_error(reference, compiled(X))[1] < 1e-5


class Steps(nn.Module):
    """Runs its layers from a plain list (registered as attributes too)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.steps = [self.conv, self.bn]

    def forward(self, x):
        for step in self.steps:
            x = step(x)
        return x


class NormThroughPartial(nn.Module):

    def __init__(self):
        super().__init__()
        import functools
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.norm = functools.partial(self.bn)

    def forward(self, x):
        return self.norm(self.conv(x))


class LocalAlias(nn.Module):
    """Fetches its norm once into a local, calls it once: a fetch per
    call, as usual."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        norm = self.bn
        return norm(self.conv(x))


def test_layers_called_through_other_references_stay():
    """A fold replaces the module at its attribute; a plain list or a
    partial made before keeps calling the old one (relative error 2.5
    and 0.9 before).  Structure-only traces count fetches from the
    holder: a module called more often than fetched stays."""
    for make, kept in ((Steps, ['bn']), (NormThroughPartial, ['bn'])):
        fused, _, rel = fuse_and_compare(make(), (X, ), traced=False)
        assert rel == 0, make.__name__
        kept_at(fused, kept)
    fused, _, rel = fuse_and_compare(LocalAlias(), (X, ), traced=False)
    assert rel < 1e-5
    identity_at(fused, ['bn'])


def test_a_conv_whose_weight_is_a_buffer_is_made_plain_first(traced):
    """A fold gives the conv parameters; its state dict would keep the old
    buffer under the same key (a checkpoint of it was off by 0.8).  It is
    replaced by a plain conv first (same output), or, with
    ``plain_convs=False``, left."""
    model = _conv_bn()
    weight = model[0].weight.detach().clone()
    del model[0].weight
    model[0].register_buffer('weight', weight)
    fused, _, rel = fuse_and_compare(model, (X, ), traced)
    assert rel < 1e-5
    identity_at(fused, ['1'])
    assert list(fused.state_dict()) == ['0.weight', '0.bias']
    assert isinstance(fused[0].weight, nn.Parameter)
    report = mmfuse.fuse_model(copy.deepcopy(model), (X, ) if traced else
                               None, plain_convs=False)
    assert not report.folded
    assert 'weight or bias as a buffer' in report.left[0].reason


class ListNormAlsoFetched(nn.Module):
    """Fetches its norm once (a None test) and calls it from a plain list:
    the counts match, the list gives it away."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.post = [self.bn]

    def forward(self, x):
        x = self.conv(x)
        if self.bn is not None:
            x = self.post[0](x)
        return x


def test_a_child_also_held_in_a_plain_list_stays():
    fused, _, rel = fuse_and_compare(ListNormAlsoFetched(), (X, ),
                                     traced=False)
    assert rel == 0
    kept_at(fused, ['bn'])
