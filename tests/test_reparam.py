"""Structural re-parameterization (issue 4).

Every check uses random weights and randomised norm statistics; merged
outputs must match the multi-branch ones within a relative error of 1e-5,
and every merged block must be one conv (plus what it keeps after the sum).
The built-in entries are checked against the real classes' own
``switch_to_deploy``, on blocks and on whole models built from shipped
configs.
"""
import contextlib
import copy
import json
import pickle
from typing import Iterator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from mmengine.model import BaseModule
from torch import nn

import mmfuse
from mmfuse.reparam import (REPARAMETERIZERS, BranchSum, ConvGeometry,
                            MergeError, Reparameterizer, Term,
                            apply_reparam_structure, conv_op, merge_terms,
                            norm_op, reparameterize)
from mmfuse.reparam.merge import (BranchGeometry, avg_pool_kernel,
                                  centre_kernel, identity_kernel,
                                  merge_geometry)
from mmfuse.surgery import apply_plan
from mmfuse.testing import randomize_norm_stats
from mmfuse.verify import output_error

from fusion_checks import CoarseRounding, doubled_output
from reparam_models import build_reparam_model

RTOL = 1e-5


def _input(channels: int, size: int = 12, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, channels, size, size, generator=gen)


def _prepare(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, std=0.2)
            if module.bias is not None:
                nn.init.normal_(module.bias, std=0.2)
    randomize_norm_stats(model, seed=seed)
    return model.eval()


def _reparam_and_compare(model: nn.Module, x: torch.Tensor, **kwargs):
    """Re-parameterize a copy of ``model``; return it, its records and the
    relative output error."""
    with torch.no_grad():
        reference = model(x)
    merged = copy.deepcopy(model)
    records = reparameterize(merged, **kwargs)
    with torch.no_grad():
        output = merged(x)
    return merged, records, output_error(reference, output)[1]


def _norms(module: nn.Module):
    return [m for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _convs(module: nn.Module):
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


def _merged(records):
    return [r for r in records if r['merged']]


# -- patterns written in plain PyTorch ---------------------------------------


class ConvBN(nn.Module):
    """PaddleDetection's ``ConvBNLayer``: conv then BN, no activation."""

    def __init__(self, cin, cout, k, stride=1, groups=1, padding=None,
                 dilation=1):
        super().__init__()
        if padding is None:
            padding = (k - 1) // 2 * dilation
        self.conv = nn.Conv2d(cin, cout, k, stride, padding, dilation,
                              groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn(self.conv(x))


class PaddleRepVggBlock(nn.Module):
    """PaddleDetection's ``RepVggBlock``: 3x3 + alpha * 1x1, no identity."""

    def __init__(self, cin, cout, stride=1, groups=1, alpha=True):
        super().__init__()
        self.conv1 = ConvBN(cin, cout, 3, stride, groups)
        self.conv2 = ConvBN(cin, cout, 1, stride, groups)
        self.act = nn.ReLU()
        self.alpha = nn.Parameter(torch.tensor([0.37])) if alpha else None

    def forward(self, x):
        if self.alpha is not None:
            y = self.conv1(x) + self.alpha * self.conv2(x)
        else:
            y = self.conv1(x) + self.conv2(x)
        return self.act(y)


class RepBlock(nn.Module):
    """RepVGG: 3x3 + 1x1 + BN identity, stride and groups as given."""

    def __init__(self, cin, cout, stride=1, groups=1, alpha=None):
        super().__init__()
        self.dense = ConvBN(cin, cout, 3, stride, groups)
        self.pointwise = ConvBN(cin, cout, 1, stride, groups)
        self.identity = nn.BatchNorm2d(cin) \
            if cin == cout and stride == 1 else None
        self.alpha = alpha
        self.act = nn.SiLU()

    def forward(self, x):
        out = self.dense(x)
        if self.alpha is None:
            out = out + self.pointwise(x)
        else:
            out = out + self.alpha * self.pointwise(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return self.act(out)


class MobileOneLike(nn.Module):
    """In-place accumulation from ``0`` over a ModuleList of branches."""

    def __init__(self, channels, num_convs=3):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)
        self.scale = ConvBN(channels, channels, 1, groups=channels)
        self.convs = nn.ModuleList(
            ConvBN(channels, channels, 3, groups=channels)
            for _ in range(num_convs))
        self.act = nn.ReLU()

    def forward(self, x):
        out = 0
        out += self.norm(x)
        out += self.scale(x)
        for conv in self.convs:
            out += conv(x)
        return self.act(out)


class DiverseBranch(nn.Module):
    """DBB-style: 3x3, 1x1, 1x3 + 3x1 (ACNet), and average pool + BN."""

    def __init__(self, channels):
        super().__init__()
        self.square = ConvBN(channels, channels, 3)
        self.point = ConvBN(channels, channels, 1)
        self.hor = ConvBN(channels, channels, (1, 3), padding=(0, 1))
        self.ver = ConvBN(channels, channels, (3, 1), padding=(1, 0))
        self.pool = nn.Sequential(nn.AvgPool2d(3, 1, 1),
                                  nn.BatchNorm2d(channels))

    def forward(self, x):
        return F.relu(
            self.square(x) + self.point(x) + self.hor(x) + self.ver(x) +
            self.pool(x))


class AffineMinusInput(nn.Module):
    """RIFormer's token mixer: ``conv1x1(x) - x``, then a residual."""

    def __init__(self, channels):
        super().__init__()
        self.affine = nn.Conv2d(channels, channels, 1, groups=channels)

    def forward(self, x):
        return self.affine(x) - x


class ResidualAfterSum(nn.Module):
    """The sum feeds a functional activation and a residual: not a chain of
    children, so the deploy form is a GraphModule."""

    def __init__(self, channels):
        super().__init__()
        self.a = ConvBN(channels, channels, 3)
        self.b = ConvBN(channels, channels, 1)

    def forward(self, x):
        y = self.a(x) + self.b(x) * 0.5
        return F.relu(y) + x


class LargeSmall(nn.Module):
    """RepLKNet-style: dilated large kernel + small kernel."""

    def __init__(self, channels, dilation=2):
        super().__init__()
        self.large = ConvBN(channels, channels, 5, dilation=dilation,
                            groups=channels)
        self.small = ConvBN(channels, channels, 1, groups=channels)

    def forward(self, x):
        return self.large(x) + self.small(x)


@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('groups', [1, 4])
@pytest.mark.parametrize('alpha', [True, False])
def test_paddle_rep_vgg_block(stride, groups, alpha):
    block = nn.Sequential(PaddleRepVggBlock(8, 16, stride, groups, alpha))
    merged, records, rel = _reparam_and_compare(_prepare(block), _input(8))
    assert rel <= RTOL
    assert len(_merged(records)) == 1
    assert len(_convs(merged)) == 1 and not _norms(merged)
    conv = merged[0].conv
    assert conv.stride == (stride, stride) and conv.groups == groups
    branches = records[0]['convs'][0]['branches']
    assert branches[1].startswith('alpha * ') == alpha


@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('groups', [1, 2, 8])
@pytest.mark.parametrize('alpha', [None, 0.6])
def test_rep_vgg_pattern(stride, groups, alpha):
    block = nn.Sequential(RepBlock(8, 8, stride, groups, alpha))
    merged, records, rel = _reparam_and_compare(_prepare(block), _input(8))
    assert rel <= RTOL
    assert len(_merged(records)) == 1
    assert len(_convs(merged)) == 1 and not _norms(merged)
    assert isinstance(merged[0], nn.Sequential)
    assert isinstance(merged[0].act, nn.SiLU)
    assert len(records[0]['convs'][0]['branches']) == (3 if stride == 1 else
                                                       2)


@pytest.mark.parametrize('model, channels', [
    (lambda: MobileOneLike(8), 8),
    (lambda: DiverseBranch(6), 6),
    (lambda: AffineMinusInput(6), 6),
    (lambda: LargeSmall(6), 6),
], ids=['mobileone_like', 'diverse_branch', 'affine_minus_input',
        'dilated_large_small'])
def test_generic_patterns(model, channels):
    block = nn.Sequential(model(), nn.Identity())
    merged, records, rel = _reparam_and_compare(_prepare(block),
                                                _input(channels))
    assert rel <= RTOL
    assert len(_merged(records)) == 1, records
    assert len(_convs(merged)) == 1 and not _norms(merged)


def test_dilated_geometry():
    block = nn.Sequential(LargeSmall(6, dilation=2))
    merged, _, _ = _reparam_and_compare(_prepare(block), _input(6))
    conv = merged[0]
    assert isinstance(conv, nn.Conv2d)
    assert conv.kernel_size == (5, 5) and conv.dilation == (2, 2)
    assert conv.padding == (4, 4) and conv.groups == 6


def test_graph_module_deploy_form_and_round_trip():
    block = nn.Sequential(ResidualAfterSum(6))
    merged, records, rel = _reparam_and_compare(_prepare(block), _input(6))
    assert rel <= RTOL
    assert records[0]['structure'] == 'graph'
    assert len(_convs(merged)) == 1 and not _norms(merged)
    fresh = nn.Sequential(ResidualAfterSum(6))
    apply_reparam_structure(fresh, json.loads(json.dumps(records)))
    result = fresh.load_state_dict(merged.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(_input(6)), merged(_input(6)))


def test_blocks_alike_share_a_trace_and_each_is_rebuilt(monkeypatch):
    """Three blocks alike are traced once; rebuilding each (which edits a
    graph) leaves the shared graph as it was for the next."""
    from mmfuse.discovery import trace_cache
    traced = []
    original = trace_cache.trace_module_forward

    def counting(module, *args, **kwargs):
        traced.append(type(module).__name__)
        return original(module, *args, **kwargs)

    monkeypatch.setattr(trace_cache, 'trace_module_forward', counting)
    model = nn.Sequential(*[ResidualAfterSum(6) for _ in range(3)])
    merged, records, rel = _reparam_and_compare(_prepare(model), _input(6))
    assert rel <= RTOL
    assert [r['structure'] for r in _merged(records)] == ['graph'] * 3
    assert len(_convs(merged)) == 3 and not _norms(merged)
    assert traced.count('ResidualAfterSum') == 1


@settings(max_examples=25, deadline=None)
@given(
    big=st.sampled_from([3, 5]),
    small=st.sampled_from([1, 3]),
    stride=st.sampled_from([1, 2]),
    groups=st.sampled_from([1, 2, 4]),
    dilation=st.sampled_from([1, 2]),
    alpha=st.floats(-2.0, 2.0).filter(lambda a: abs(a) > 0.05),
    identity=st.booleans(),
    seed=st.integers(0, 1000))
def test_generic_merge_property(big, small, stride, groups, dilation, alpha,
                                identity, seed):

    class Block(nn.Module):

        def __init__(self):
            super().__init__()
            self.big = ConvBN(8, 8, big, stride, groups, dilation=dilation)
            self.small = ConvBN(8, 8, small, stride, groups,
                                dilation=dilation)
            self.alpha = nn.Parameter(torch.tensor([alpha]))
            self.id = nn.BatchNorm2d(8) \
                if identity and stride == 1 else None

        def forward(self, x):
            out = self.big(x) + self.alpha * self.small(x)
            if self.id is not None:
                out = out + self.id(x)
            return out

    block = nn.Sequential(Block())
    merged, records, rel = _reparam_and_compare(
        _prepare(block, seed), _input(8, 11, seed))
    assert rel <= RTOL
    assert len(_convs(merged)) == 1 and not _norms(merged)


# -- left alone, with the reason ----------------------------------------------


class NormBeforeConv(nn.Module):

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.other = ConvBN(8, 8, 3)

    def forward(self, x):
        return self.conv(self.bn(x)) + self.other(x)


class TwoConvsInSeries(nn.Module):

    def __init__(self):
        super().__init__()
        self.first = ConvBN(8, 8, 3)
        self.second = ConvBN(8, 8, 1)
        self.other = ConvBN(8, 8, 3)

    def forward(self, x):
        return self.second(self.first(x)) + self.other(x)


class ActivationInBranch(nn.Module):

    def __init__(self):
        super().__init__()
        self.a = ConvBN(8, 8, 3)
        self.b = ConvBN(8, 8, 1)

    def forward(self, x):
        return self.a(x) + torch.relu(self.b(x))


class GroupNormBranch(nn.Module):

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.b = ConvBN(8, 8, 1)

    def forward(self, x):
        return self.gn(self.conv(x)) + self.b(x)


class MisalignedPadding(nn.Module):
    """Unpadded 3x3 and 1x1 with stride 3 give one output size (on 12x12)
    but different centres."""

    def __init__(self):
        super().__init__()
        self.a = ConvBN(8, 8, 3, stride=3, padding=0)
        self.b = ConvBN(8, 8, 1, stride=3, padding=0)

    def forward(self, x):
        return self.a(x) + self.b(x)


class ValueDependent(nn.Module):
    """Control flow on the input: no torch.fx proof."""

    def __init__(self):
        super().__init__()
        self.a = ConvBN(8, 8, 3)
        self.b = ConvBN(8, 8, 1)

    def forward(self, x):
        if x.sum() > 0:
            return self.a(x) + self.b(x)
        return self.a(x) + self.b(x)


@pytest.mark.parametrize('model, reason', [
    (NormBeforeConv, 'normalises before its convolution'),
    (TwoConvsInSeries, 'two convolutions'),
    (ActivationInBranch, None),
    (GroupNormBranch, None),
    (MisalignedPadding, 'paddings do not line'),
    (ValueDependent, None),
])
def test_unprovable_or_unmergeable_sums_are_left(model, reason):
    block = nn.Sequential(model())
    merged, records, rel = _reparam_and_compare(_prepare(block), _input(8))
    assert rel == 0
    assert not _merged(records)
    assert type(merged[0]) is model
    if reason is None:
        assert records == []
    else:
        assert any(reason in r['reason'] for r in records), records


def test_hooked_branch_is_left():
    block = nn.Sequential(PaddleRepVggBlock(8, 8))
    _prepare(block)
    calls = []
    block[0].conv2.conv.register_forward_hook(lambda *a: calls.append(1))
    merged, records, _ = _reparam_and_compare(block, _input(8))
    assert not _merged(records)
    assert isinstance(merged[0], PaddleRepVggBlock)


def test_training_mode_is_refused():
    block = nn.Sequential(PaddleRepVggBlock(8, 8)).train()
    with pytest.raises(mmfuse.FusionError, match='training mode'):
        reparameterize(block)


def test_structural_and_verified_agree():
    block = _prepare(nn.Sequential(RepBlock(8, 8), RepBlock(8, 16, 2, 4)))
    x = _input(8)
    structural = copy.deepcopy(block)
    reparameterize(structural)
    verified = copy.deepcopy(block)
    records = reparameterize(verified, (x, ))
    assert all(r['verified_rel_error'] <= RTOL for r in records)
    with torch.no_grad():
        assert torch.equal(structural(x), verified(x))


class ConvModuleSum(nn.Module):
    """Two mmcv ConvModules without activation, summed: the generic merge
    reads them from ``order`` without tracing them."""

    def __init__(self, channels: int, fast: bool = False,
                 act_cfg=None):
        super().__init__()
        from mmcv.cnn import ConvModule
        norm = dict(type='BN')
        self.big = ConvModule(channels, channels, 3, padding=1,
                              norm_cfg=norm, act_cfg=act_cfg,
                              fast_conv_bn_eval=fast)
        self.small = ConvModule(channels, channels, 1, norm_cfg=norm,
                                act_cfg=None)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.big(x) + self.small(x))


@pytest.mark.parametrize('fast,act_cfg,merges', [
    (False, None, True),
    # conv and norm fused on the fly inside the forward: left alone.
    (True, None, False),
    (False, dict(type='ReLU'), False),
])
def test_conv_module_branches(fast, act_cfg, merges):
    block = _prepare(nn.Sequential(ConvModuleSum(8, fast, act_cfg)))
    merged, records, rel = _reparam_and_compare(block, _input(8))
    assert rel <= RTOL
    assert bool(_merged(records)) is merges
    if merges:
        assert not _norms(merged)
        assert len(_convs(merged)) == 1
    else:
        assert rel == 0
        assert isinstance(merged[0], ConvModuleSum)


# -- the merge math -----------------------------------------------------------


def test_identity_and_pool_kernels():
    x = _input(8)
    for groups in (1, 2, 8):
        weight = identity_kernel(8, groups, (3, 3)).float()
        out = F.conv2d(x, weight, padding=1, groups=groups)
        assert torch.equal(out, x)
        weight = avg_pool_kernel(8, groups, (3, 3), (5, 5)).float()
        out = F.conv2d(x, weight, padding=2, groups=groups)
        expected = F.avg_pool2d(x, 3, 1, 1)
        assert torch.allclose(out, expected, atol=1e-6)


def test_centre_kernel():
    kernel = torch.randn(4, 2, 1, 3,
                         generator=torch.Generator().manual_seed(0))
    padded = centre_kernel(kernel, (3, 5))
    assert padded.shape == (4, 2, 3, 5)
    assert torch.equal(padded[:, :, 1, 1:4], kernel[:, :, 0])
    border = torch.ones(3, 5, dtype=torch.bool)
    border[1, 1:4] = False
    assert not padded[:, :, border].any()  # zeros everywhere else
    with pytest.raises(MergeError):
        centre_kernel(kernel, (2, 3))


@pytest.mark.parametrize('big_first', [True, False])
def test_merged_kernel_is_the_float64_sum_block_by_block(monkeypatch,
                                                         big_first):
    """A merged kernel is made a block of output channels at a time: it
    must be the float64 sum of the folded branches (a smaller kernel
    added into the centre, a constant before a conv, a scale after a
    norm, an identity) rounded once, bit for bit, whichever branch comes
    first; the bias is the float64 sum of the folded biases."""
    from mmfuse import folding
    from mmfuse.folding import norm_affine
    from mmfuse.reparam import scale_op
    monkeypatch.setattr(folding, '_BLOCK_ELEMENTS', 1 << 10)
    torch.manual_seed(0)
    big = nn.Conv2d(64, 64, 3, padding=1, bias=True)
    small = nn.Conv2d(64, 64, 1, bias=False)
    norms = [nn.BatchNorm2d(64) for _ in range(3)]
    for norm in norms:
        randomize_norm_stats(norm)
        norm.eval()
    big_term = Term([conv_op(big), norm_op(norms[0])])
    small_term = Term([scale_op(0.7), conv_op(small), norm_op(norms[1]),
                       scale_op(torch.tensor([-1.3]), 'alpha')])
    identity_term = Term([norm_op(norms[2])])
    terms = [big_term, small_term, identity_term]
    if not big_first:
        terms = [small_term, big_term, identity_term]
    assert big.weight.numel() > folding._BLOCK_ELEMENTS
    _, weight, bias = merge_terms(terms)

    affines = [
        norm_affine(n.running_mean, n.running_var, n.eps, n.weight, n.bias)
        for n in norms
    ]
    alpha = torch.tensor(-1.3).double()  # the float32 factor, widened
    column = (-1, 1, 1, 1)
    big64 = big.weight.double() * affines[0][0].reshape(column)
    small64 = small.weight.double() * (
        affines[1][0] * alpha).reshape(column) * 0.7
    ident64 = identity_kernel(64, 1, (1, 1)) * affines[2][0].reshape(column)
    biases = [big.bias.double() * affines[0][0] + affines[0][1],
              affines[1][1] * alpha, affines[2][1]]
    if big_first:
        expected = big64.clone()
        expected[..., 1:2, 1:2] += small64
    else:
        expected = torch.zeros(64, 64, 3, 3, dtype=torch.float64)
        expected[..., 1:2, 1:2] += small64
        expected += big64
        biases[:2] = biases[1::-1]
    expected[..., 1:2, 1:2] += ident64
    assert torch.equal(weight, expected.float())
    expected_bias = torch.zeros(64, dtype=torch.float64)
    for part in biases:
        expected_bias += part
    assert torch.equal(bias, expected_bias.float())
    assert big.weight.dtype == torch.float32  # the layers are untouched


@pytest.mark.parametrize('groups', [1, 2, 3, 12])
@pytest.mark.parametrize('window', [(1, 1), (3, 3), (1, 3)])
def test_diagonal_writes_are_the_kernels(groups, window):
    """``add_to_diagonal`` writes where the identity and pool kernels
    are not zero, ``[o, o % (channels / groups)]``, for any rows of them
    (a block of rows may start inside a group); the kernels are made by
    it."""
    from mmfuse.reparam.merge import add_to_diagonal, pool_value
    value = pool_value(window)
    kernel = torch.zeros(12, 12 // groups, *window, dtype=torch.float64)
    for row in range(12):
        kernel[row, row % (12 // groups)] = value
    assert torch.equal(
        kernel, identity_kernel(12, groups, (1, 1)) if window == (1, 1)
        else avg_pool_kernel(12, groups, window, window))
    kernel /= value
    values = torch.arange(1, 13, dtype=torch.float64)
    for first in range(12):
        for stop in range(first + 1, 13):
            got = torch.zeros(stop - first, 12 // groups, *window,
                              dtype=torch.float64)
            add_to_diagonal(got, values[first:stop] * value, first,
                            12 // groups)
            expected = kernel[first:stop] * (values[first:stop] *
                                             value).reshape(-1, 1, 1, 1)
            assert torch.equal(got, expected)


@pytest.mark.parametrize('factor', [1.0, -1.0, float('inf'), float('nan')])
@pytest.mark.parametrize('groups', [1, 4, 8])
def test_identity_and_pool_branches_add_what_their_kernels_would(
        monkeypatch, factor, groups):
    """An identity or pool branch is written on its diagonal, not as a
    kernel times its scales: the same float64 values, bit for bit, zeros
    of both signs (``-0`` stays ``-0`` only under a negative scale's
    ``-0``), and NaN off the diagonal where a scale is infinite, as the
    kernel's product gives; block by block too."""
    from mmfuse import folding
    from mmfuse.reparam import pool_op, scale_op
    from mmfuse.reparam.branches import (_branch, _branch_geometry,
                                         _norm_affines)
    monkeypatch.setattr(folding, '_BLOCK_ELEMENTS', 1 << 5)
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=groups, bias=False)
    with torch.no_grad():
        conv.weight[::2] = 0.0
    norms = [randomize_norm_stats(nn.BatchNorm2d(8)).eval()
             for _ in range(3)]
    with torch.no_grad():
        norms[0].weight[::3] *= -1
        norms[2].weight[1::2] *= -1
    terms = [Term([conv_op(conv), norm_op(norms[0])]),
             Term([pool_op(nn.AvgPool2d(3, 1, 1)), norm_op(norms[1]),
                   scale_op(-0.5)]),
             Term([norm_op(norms[2]), scale_op(factor)])]
    _, weight, _ = merge_terms(terms)

    geometry = merge_geometry([_branch_geometry(t) for t in terms])
    affines = _norm_affines(terms)
    branches = [_branch(t, geometry, torch.device('cpu'), affines)
                for t in terms]
    column = (-1, 1, 1, 1)
    expected = conv.weight.double() * branches[0].scale.reshape(column)
    expected += avg_pool_kernel(8, groups, (3, 3), (3, 3)) * \
        branches[1].scale.reshape(column)
    expected[..., 1:2, 1:2] += identity_kernel(8, groups, (1, 1)) * \
        branches[2].scale.reshape(column)
    expected = expected.float()
    assert torch.equal(weight.view(torch.int32), expected.view(torch.int32))


def test_convs_built_alike_are_plain_convs_of_their_own():
    """A conv built for a geometry built before is a copy of the first
    one's attributes: as the constructor makes it, sharing no container
    (parameters, hooks) with another."""
    from mmfuse.reparam.branches import build_conv
    geometry = ConvGeometry(8, 16, (3, 3), (2, 2), (1, 1), (1, 1), 2,
                            'reflect')
    weight, bias = torch.randn(16, 4, 3, 3), torch.randn(16)
    first, second = (build_conv(geometry, weight.clone(), bias.clone())
                     for _ in range(2))
    made = nn.Conv2d(8, 16, 3, 2, 1, groups=2, padding_mode='reflect')
    made.weight, made.bias = nn.Parameter(weight), nn.Parameter(bias)
    made.eval()
    for conv in (first, second):
        assert type(conv) is nn.Conv2d
        assert list(conv.__dict__) == list(made.__dict__)
        assert {k: v for k, v in vars(conv).items()
                if k != '_parameters'} == \
            {k: v for k, v in vars(made).items() if k != '_parameters'}
        assert list(conv._parameters) == ['weight', 'bias']
        assert torch.equal(conv.weight, weight)
    first.register_forward_hook(lambda *args: None)
    assert not second._forward_hooks
    assert first.weight is not second.weight
    x = torch.randn(1, 8, 9, 9)
    assert torch.equal(second(x), made(x))


def _conv_geometry(kernel, stride=1, padding=0, dilation=1, groups=1,
                   channels=8, mode='zeros'):
    return BranchGeometry('conv', (kernel, kernel), (stride, stride),
                          (padding, padding), (dilation, dilation), groups,
                          channels, channels, mode)


def test_merge_geometry():
    merged = merge_geometry(
        [_conv_geometry(3, padding=1), _conv_geometry(1)])
    assert merged == ConvGeometry(8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1)
    assert ConvGeometry.from_dict(merged.to_dict()) == merged
    cases = [
        ([_conv_geometry(3, 2, 1), _conv_geometry(1)], 'stride'),
        ([_conv_geometry(3, padding=1, groups=2), _conv_geometry(1)],
         'groups'),
        ([_conv_geometry(3, padding=1), _conv_geometry(2)], 'centred'),
        ([_conv_geometry(3, padding=1), _conv_geometry(1, padding=1)],
         'paddings'),
        ([_conv_geometry(3, padding=1),
          _conv_geometry(3, padding=2, dilation=2)], 'dilation'),
        ([_conv_geometry(3, padding=1, mode='reflect'),
          _conv_geometry(3, padding=1)], 'pad differently'),
    ]
    for branches, message in cases:
        with pytest.raises(MergeError, match=message):
            merge_geometry(branches)
    # A 1x1 branch never reads padding: any mode merges.
    merged = merge_geometry([_conv_geometry(3, padding=1, mode='reflect'),
                             _conv_geometry(1)])
    assert merged.padding_mode == 'reflect'


# -- the registry -------------------------------------------------------------


class OpaqueBlock(nn.Module):
    """A sum torch.fx cannot prove (control flow on the input)."""

    def __init__(self):
        super().__init__()
        self.a = ConvBN(8, 8, 3)
        self.b = ConvBN(8, 8, 1)
        self.act = nn.ReLU()

    def forward(self, x):
        if x.shape[-1] > 0 and bool(x.abs().sum() >= 0):
            return self.act(self.a(x) + self.b(x))
        return x


class OpaqueSubclass(OpaqueBlock):
    pass


def test_user_entry_and_exact_class_lookup():

    @REPARAMETERIZERS.register_module()
    class OpaqueBlockRule(Reparameterizer):
        targets = (OpaqueBlock, )

        def branches(self, block):
            return BranchSum([
                Term([conv_op(block.a.conv), norm_op(block.a.bn)]),
                Term([conv_op(block.b.conv), norm_op(block.b.bn)])
            ], ['act'])

    try:
        model = _prepare(nn.Sequential(OpaqueBlock(), OpaqueSubclass()))
        merged, records, rel = _reparam_and_compare(model, _input(8))
        assert rel <= RTOL
        assert [r['rule'] for r in _merged(records)] == ['OpaqueBlockRule']
        assert isinstance(merged[0], nn.Sequential)
        assert isinstance(merged[1], OpaqueSubclass)
    finally:
        REPARAMETERIZERS._module_dict.pop('OpaqueBlockRule')


@contextlib.contextmanager
def _wrong_rule_registered() -> Iterator[None]:
    """Within, a registry entry ``WrongRule`` converts ``OpaqueBlock``
    wrongly: it forgets the 1x1 branch."""

    @REPARAMETERIZERS.register_module()
    class WrongRule(Reparameterizer):
        targets = (OpaqueBlock, )

        def branches(self, block):
            return BranchSum(
                [Term([conv_op(block.a.conv), norm_op(block.a.bn)])], ['act'])

    try:
        yield
    finally:
        REPARAMETERIZERS._module_dict.pop('WrongRule')


def test_wrong_entry_is_undone_by_verification():
    with _wrong_rule_registered():
        model = _prepare(nn.Sequential(OpaqueBlock(), RepBlock(8, 8)))
        x = _input(8)
        merged, records, rel = _reparam_and_compare(model, x,
                                                    example_inputs=(x, ))
        assert rel <= RTOL
        wrong = [r for r in records if r['rule'] == 'WrongRule'][0]
        assert not wrong['merged'] and 'undone' in wrong['reason']
        assert isinstance(merged[0], OpaqueBlock)
        assert isinstance(merged[1], nn.Sequential)


class DeployMethodBlock(OpaqueBlock):
    """Has its own ``switch_to_deploy`` (and no entry)."""

    def switch_to_deploy(self):
        weight, bias = 0, 0
        for branch in (self.a, self.b):
            bn = branch.bn
            scale = bn.weight / (bn.running_var + bn.eps).sqrt()
            kernel = branch.conv.weight * scale.reshape(-1, 1, 1, 1)
            pad = (3 - kernel.shape[-1]) // 2
            weight = weight + F.pad(kernel, [pad] * 4)
            bias = bias + bn.bias - bn.running_mean * scale
        self.fused = nn.Conv2d(8, 8, 3, padding=1)
        self.fused.weight.data = weight.detach()
        self.fused.bias.data = bias.detach()
        del self.a, self.b

    def forward(self, x):
        if hasattr(self, 'fused'):
            return self.act(self.fused(x))
        return super().forward(x)


def test_deploy_methods_only_on_opt_in():
    model = _prepare(nn.Sequential(DeployMethodBlock()))
    x = _input(8)
    _, records, _ = _reparam_and_compare(model, x)
    assert records == []
    merged, records, rel = _reparam_and_compare(model, x,
                                                call_deploy_methods=True)
    assert rel <= RTOL
    assert [r['rule'] for r in records] == ['method:switch_to_deploy']
    assert hasattr(merged[0], 'fused') and not hasattr(model[0], 'fused')
    fresh = nn.Sequential(DeployMethodBlock())
    apply_reparam_structure(fresh, records)
    result = fresh.load_state_dict(merged.state_dict())
    assert not result.missing_keys and not result.unexpected_keys


# -- built-ins against the real classes' own switch_to_deploy -----------------


def _own_and_ours(block, x, deploy_conv, use_registry=True,
                  own_deploy=lambda block: block.switch_to_deploy(),
                  own_forward_right=True):
    """Compare our deploy form of ``block`` with its own switch_to_deploy.
    """
    model = _prepare(nn.Sequential(block))
    with torch.no_grad():
        reference = model(x)
    own = copy.deepcopy(model)
    own_deploy(own[0])
    ours = copy.deepcopy(model)
    records = reparameterize(ours, use_registry=use_registry)
    assert len(_merged(records)) == 1, records
    with torch.no_grad():
        own_out, our_out = own(x), ours(x)
    assert output_error(reference, our_out)[1] <= RTOL
    own_error = output_error(own_out, our_out)[1]
    assert (own_error <= RTOL) == own_forward_right
    deploy = ours[0] if isinstance(ours[0], nn.Conv2d) else ours[0].conv
    theirs = deploy_conv(own[0])
    for name in ('kernel_size', 'stride', 'padding', 'dilation', 'groups'):
        assert getattr(deploy, name) == getattr(theirs, name), name
    scale = theirs.weight.abs().max()
    assert (deploy.weight - theirs.weight).abs().max() <= 1e-5 * scale
    assert torch.allclose(deploy.bias, theirs.bias, rtol=1e-5, atol=1e-5)
    assert len(_convs(ours[0])) == len(_convs(own[0]))
    assert not _norms(ours[0])
    return records


@pytest.mark.parametrize('use_registry', [True, False],
                         ids=['entry', 'generic'])
@pytest.mark.parametrize('stride, groups, se', [(1, 1, False), (2, 2, False),
                                                (1, 4, True)])
def test_mmpretrain_repvgg_block(stride, groups, se, use_registry):
    from mmpretrain.models.backbones.repvgg import RepVGGBlock
    se_cfg = dict(ratio=4, divisor=1) if se else None
    block = RepVGGBlock(16, 16, stride=stride, groups=groups, se_cfg=se_cfg)
    # mmpretrain 1.2.0's deploy forward returns branch_reparam(x) before
    # the SE layer: its own conversion computes the same conv but drops SE.
    records = _own_and_ours(block, _input(16), lambda b: b.branch_reparam,
                            use_registry, own_forward_right=not se)
    assert records[0]['rule'] == ('MMPretrainRepVGGBlock'
                                  if use_registry else 'generic')


@pytest.mark.parametrize('use_registry', [True, False],
                         ids=['entry', 'generic'])
@pytest.mark.parametrize('kernel, stride, groups, num_convs', [
    (3, 1, 16, 4), (3, 2, 16, 1), (1, 1, 1, 3)])
def test_mmpretrain_mobileone_block(kernel, stride, groups, num_convs,
                                    use_registry):
    from mmpretrain.models.backbones.mobileone import MobileOneBlock
    block = MobileOneBlock(16, 16, kernel, num_convs, stride=stride,
                           padding=kernel // 2, groups=groups)
    _own_and_ours(block, _input(16), lambda b: b.branch_reparam,
                  use_registry)


@pytest.mark.parametrize('use_registry', [True, False],
                         ids=['entry', 'generic'])
def test_mmpretrain_large_kernel(use_registry):
    from mmpretrain.models.backbones.replknet import ReparamLargeKernelConv
    for args in ((16, 16, 7, 1, 16, 3), (16, 16, 5, 2, 4, 3)):
        _own_and_ours(ReparamLargeKernelConv(*args), _input(16),
                      lambda b: b.lkb_reparam, use_registry,
                      lambda b: b.merge_kernel())


@pytest.fixture(scope='module', autouse=False)
def mmyolo_registered():
    from mmyolo.utils import register_all_modules
    register_all_modules(init_default_scope=False)


@pytest.mark.parametrize('use_registry', [True, False],
                         ids=['entry', 'generic'])
@pytest.mark.parametrize('stride, groups, alpha, bn_first', [
    (1, 1, None, True), (2, 1, None, True), (1, 4, 0.37, False),
    (2, 2, -1.3, True), (1, 1, 2.0, True)])
def test_mmyolo_repvgg_block(stride, groups, alpha, bn_first, use_registry,
                             mmyolo_registered):
    from mmyolo.models.layers.yolo_bricks import RepVGGBlock
    block = RepVGGBlock(16, 16, stride=stride, groups=groups,
                        use_alpha=alpha is not None, use_bn_first=bn_first)
    if alpha is not None:
        with torch.no_grad():
            block.alpha.fill_(alpha)
    records = _own_and_ours(block, _input(16), lambda b: b.rbr_reparam,
                            use_registry)
    branches = records[0]['convs'][0]['branches']
    assert any(b.startswith('alpha * ') for b in branches) == \
        (alpha is not None)
    assert len(branches) == (3 if stride == 1 and bn_first else 2)


@pytest.mark.parametrize('use_registry', [True, False],
                         ids=['entry', 'generic'])
def test_mmpose_repvgg_block(use_registry):
    from mmpose.models.utils.reparam_layers import RepVGGBlock
    block = RepVGGBlock(16, 16, without_branch_norm=False)
    _own_and_ours(block, _input(16), lambda b: b.conv_reparam,
                  use_registry)


# -- real models from shipped configs -----------------------------------------


_OWN_DEPLOY = {
    'repvgg_a0': 'mmpretrain.models.backbones.repvgg.RepVGGBlock',
    'mobileone_s1': 'mmpretrain.models.backbones.mobileone.MobileOneBlock',
    'yolov6_s': 'mmyolo.models.layers.yolo_bricks.RepVGGBlock',
    'ppyoloe_plus_s': 'mmyolo.models.layers.yolo_bricks.RepVGGBlock',
}


def _own_deploy(model: nn.Module, class_path: str) -> int:
    count = 0
    for module in list(model.modules()):
        cls = type(module)
        if f'{cls.__module__}.{cls.__qualname__}' == class_path:
            module.switch_to_deploy()
            count += 1
    return count


@pytest.mark.parametrize('name', list(_OWN_DEPLOY))
def test_real_models(name):
    model, inputs = build_reparam_model(name, input_hw=(64, 64))
    with torch.no_grad():
        reference = model(*inputs)
    own = copy.deepcopy(model)
    blocks = _own_deploy(own, _OWN_DEPLOY[name])
    assert blocks > 0
    multi_branch = None
    for use_registry in (True, False):
        ours = copy.deepcopy(model)
        records = reparameterize(ours, inputs, use_registry=use_registry)
        merged = _merged(records)
        assert all(r['verified_rel_error'] <= RTOL for r in merged)
        if use_registry:
            # Every block its own conversion converts, single-branch ones
            # (MobileOne's 1x1 blocks that change width) included.
            assert len(merged) == blocks
            multi_branch = sum(1 for r in merged
                               if len(r['convs'][0]['branches']) > 1)
        else:
            # The generic merge takes every sum of two branches or more;
            # single conv+BN branches are left to the core's folding.
            assert len(merged) == multi_branch
        with torch.no_grad():
            output = ours(*inputs)
            own_output = own(*inputs)
        assert output_error(reference, output)[1] <= RTOL
        assert output_error(own_output, output)[1] <= RTOL
        for record in merged:
            block = ours.get_submodule(record['module'])
            kept = {origin for _, origin in record['layers'] if origin}
            convs = [m for n, m in block.named_modules()
                     if isinstance(m, nn.Conv2d)
                     and not any(n.startswith(k.replace('.', '_'))
                                 for k in kept)]
            assert len(convs) == 1, record['module']
    fused = copy.deepcopy(model)
    report = mmfuse.fuse_model(fused, inputs)
    assert report.max_rel_error <= RTOL
    assert len(_merged(report.reparameterized)) == blocks
    with torch.no_grad():
        assert output_error(reference, fused(*inputs))[1] <= 2 * RTOL
    assert not [m for m in fused.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    json.dumps(report.to_dict())


@pytest.mark.parametrize('name', ['repvgg_a0', 'ppyoloe_plus_s'])
def test_checkpoint_round_trip(name):
    model, inputs = build_reparam_model(name, input_hw=(64, 64))
    report = mmfuse.fuse_model(model, inputs)
    assert _merged(report.reparameterized)
    meta = json.loads(json.dumps(report.to_dict()))
    state = copy.deepcopy(model.state_dict())
    # A model built from the training config, with no deploy=True edit.
    fresh, _ = build_reparam_model(name, seed=5, randomize=False)
    fresh.train()
    apply_reparam_structure(fresh, meta['reparameterized'])
    apply_plan(fresh, mmfuse.FusionPlan.from_dict(
        {'folds': meta['folded']}))
    result = fresh.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    fresh.eval()
    with torch.no_grad():
        assert output_error(model(*inputs), fresh(*inputs))[1] == 0
    # Records that do not fit the model are refused.
    other, _ = build_reparam_model(
        'mobileone_s1' if name == 'repvgg_a0' else 'yolov6_s',
        randomize=False)
    with pytest.raises(mmfuse.FusionError):
        apply_reparam_structure(other, meta['reparameterized'])


def test_fuse_model_option_and_report():
    block = _prepare(nn.Sequential(RepBlock(8, 8), RepBlock(8, 16, 2, 4)))
    x = _input(8)
    kept = copy.deepcopy(block)
    report = mmfuse.fuse_model(kept, (x, ), reparameterize=False)
    assert report.reparameterized == []
    assert isinstance(kept[0], RepBlock)
    merged = copy.deepcopy(block)
    report = mmfuse.fuse_model(merged, (x, ))
    assert len(_merged(report.reparameterized)) == 2
    assert 're-parameterized 2 blocks' in report.summary()
    assert 'reparam:generic' in str(report)
    assert report.to_dict()['reparameterized'][0]['module'] == '0'
    with torch.no_grad():
        assert output_error(block(x), merged(x))[1] <= RTOL
    # A second pass finds nothing left to merge.
    assert reparameterize(merged, (x, )) == []


class FlaggedSum(nn.Module):
    """A 3x3 and a 1x1 branch, plus an identity BN branch where the buffer
    ``with_identity`` is set."""

    def __init__(self, with_identity: bool):
        super().__init__()
        self.big = ConvBN(6, 6, 3)
        self.small = ConvBN(6, 6, 1)
        self.id = nn.BatchNorm2d(6)
        self.register_buffer('with_identity', torch.tensor(with_identity))

    def forward(self, x):
        out = self.big(x) + self.small(x)
        if self.with_identity:
            out = out + self.id(x)
        return out


def test_blocks_whose_flags_differ_are_each_merged_from_their_own_trace():
    """Without example inputs nothing verifies a merge: a block must never
    be rebuilt from the trace of a block whose flag took the other
    branch."""
    model = nn.Sequential(FlaggedSum(True), FlaggedSum(False),
                          FlaggedSum(True))
    merged, records, rel = _reparam_and_compare(_prepare(model), _input(6))
    assert rel <= RTOL
    assert len(_merged(records)) == 3
    assert len(_convs(merged)) == 3


class InvertedResidualLike(nn.Module):
    """``x + bn(conv(relu(bn(conv(x)))))``: the sum's branches start at
    different values, so there is nothing to merge."""

    def __init__(self, channels):
        super().__init__()
        self.expand = ConvBN(channels, channels, 1)
        self.project = ConvBN(channels, channels, 3)

    def forward(self, x):
        return x + self.project(torch.relu(self.expand(x)))


class ScaledLeafBranch(nn.Module):
    """A branch through a childless module defined outside ``torch.nn``
    (mmdet's ``Scale``), which the generic merge traces as a scaling."""

    class Scale(nn.Module):

        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(0.6))

        def forward(self, x):
            return x * self.scale

    def __init__(self, channels):
        super().__init__()
        self.big = ConvBN(channels, channels, 3)
        self.small = ConvBN(channels, channels, 1)
        self.scale = self.Scale()

    def forward(self, x):
        return self.big(x) + self.scale(self.small(x))


class _SwishResidual(nn.Module):
    """``x + act(bn(conv(x)))``, the act one of mmcv's (YOLOX's
    bottleneck)."""

    def __init__(self, channels, act):
        super().__init__()
        self.conv = ConvBN(channels, channels, 3)
        self.act = act

    def forward(self, x):
        return x + self.act(self.conv(x))


def _swish(own_forward: bool = False) -> nn.Module:
    """mmcv's ``Swish``, or a subclass with a forward of its own (a
    linear one)."""
    from mmcv.cnn.bricks.swish import Swish

    class ScaledSwish(Swish):

        def forward(self, x):
            return x * 0.5

    return ScaledSwish() if own_forward else Swish()


@pytest.mark.parametrize('block, sums', [
    (lambda: MobileOneLike(6), True),
    (lambda: _SwishResidual(6, _swish()), False),
    (lambda: _SwishResidual(6, _swish(own_forward=True)), True),
    (lambda: DiverseBranch(6), True),
    (lambda: AffineMinusInput(6), True),
    (lambda: PaddleRepVggBlock(6, 6), True),
    (lambda: ScaledLeafBranch(6), True),
    (lambda: ResidualAfterSum(6), True),
    (lambda: InvertedResidualLike(6), False),
    (lambda: nn.Sequential(ConvBN(6, 6, 3), nn.ReLU()), False),
], ids=['mobileone_like', 'swish_residual', 'own_forward_swish_residual',
        'diverse_branch', 'affine_minus_input',
        'paddle_repvgg', 'scaled_leaf', 'residual_after_sum',
        'inverted_residual', 'plain_chain'])
def test_the_traced_pass_finds_the_blocks_that_sum_branches(block, sums):
    """In-place sums from ``0``, differences, scalings by a parameter and
    through a module the merge traces all count; a residual around a
    non-linear branch does not (mmcv's ``Swish`` too, but a subclass with
    a forward of its own is traced).  The whole model (the blocks above) is
    marked with the block."""
    from mmfuse.discovery.traced import TracedForward
    model = _prepare(nn.Sequential(ConvBN(6, 6, 1), block()))
    traced = TracedForward(model, (_input(6), ))
    traced.run()
    assert (id(model[1]) in traced.sum_blocks) is sums
    assert (id(model) in traced.sum_blocks) is sums
    assert id(model[0]) not in traced.sum_blocks


@pytest.mark.parametrize('block', [
    lambda: MobileOneLike(6), lambda: DiverseBranch(6),
    lambda: ScaledLeafBranch(6), lambda: ResidualAfterSum(6)
], ids=['mobileone_like', 'diverse_branch', 'scaled_leaf',
        'residual_after_sum'])
def test_fuse_model_merges_what_reparameterize_merges(block):
    """``fuse_model`` tries the generic merge only in the blocks its traced
    pass saw summing branches: it merges all that ``reparameterize`` does,
    verified."""
    model = _prepare(nn.Sequential(ConvBN(6, 6, 1), block(),
                                   InvertedResidualLike(6)))
    x = _input(6)
    merged = copy.deepcopy(model)
    expected = [r['module'] for r in _merged(reparameterize(merged))]
    fused = copy.deepcopy(model)
    report = mmfuse.fuse_model(fused, (x, ))
    assert [r['module'] for r in _merged(report.reparameterized)] == \
        expected == ['1']
    assert report.max_rel_error <= RTOL
    with torch.no_grad():
        assert output_error(model(x), fused(x))[1] <= RTOL


def test_fuse_model_without_branch_sums_runs_one_pass_and_no_trace(
        monkeypatch):
    from mmfuse.discovery.traced import TracedForward
    from mmfuse.reparam import generic
    passes, traces = [], []
    run, trace_block = TracedForward.run, generic.trace_block

    def counted_run(self):
        passes.append(self)
        return run(self)

    def counted_trace(*args, **kwargs):
        traces.append(args[0])
        return trace_block(*args, **kwargs)

    monkeypatch.setattr(TracedForward, 'run', counted_run)
    monkeypatch.setattr(generic, 'trace_block', counted_trace)
    model = _prepare(nn.Sequential(*[InvertedResidualLike(6)
                                     for _ in range(3)]))
    fused = copy.deepcopy(model)
    x = _input(6)
    report = mmfuse.fuse_model(fused, (x, ))
    assert len(report.folded) == 6 and not _norms(fused)
    assert len(passes) == 1 and traces == []
    with torch.no_grad():
        assert output_error(model(x), fused(x))[1] <= RTOL


@pytest.mark.parametrize('kind', ['nothing_to_fold', 'all_merged',
                                  'some_folded'])
def test_verification_runs_a_pass_only_after_a_fold(kind):
    """One traced pass of the model as given, and one verification pass
    only when a merge or a fold changed it: otherwise the traced pass
    already ran the model as it stands (a model with no batch norm).  The
    merged model is not traced again.  The report is verified either
    way."""
    blocks = {
        'nothing_to_fold': lambda: nn.Sequential(
            nn.Conv2d(6, 6, 3, padding=1), nn.GroupNorm(2, 6), nn.ReLU()),
        'all_merged': lambda: nn.Sequential(MobileOneLike(6)),
        'some_folded': lambda: nn.Sequential(MobileOneLike(6),
                                             ConvBN(6, 6, 1)),
    }
    model = _prepare(blocks[kind]())
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    x = _input(6)
    with torch.no_grad():
        expected = model(x)
    calls.clear()
    report = mmfuse.fuse_model(model, (x, ))
    # The traced pass; the verification pass where a block was merged or
    # a norm folded.
    changed = kind != 'nothing_to_fold'
    assert len(report.folded) == (kind == 'some_folded')
    assert len(calls) == 1 + changed
    assert report.verified and report.max_rel_error <= RTOL
    assert (report.max_rel_error == 0) == (not changed)
    merged = [r for r in report.reparameterized if r['merged']]
    assert len(merged) == changed
    assert all(r['verified_rel_error'] == report.max_rel_error
               for r in merged)
    with torch.no_grad():
        assert output_error(expected, model(x))[1] <= RTOL


def test_fuse_model_undoes_a_generic_merge_its_pass_shows_wrong():
    """A global forward hook doubles one branch: the generic merge cannot
    see it, the output observed before merging can, so the merge is
    undone and the output stays right."""
    model = _prepare(nn.Sequential(ConvBN(6, 6, 1), LargeSmall(6)))
    x = _input(6)
    with doubled_output(model[1].small):
        with torch.no_grad():
            expected = model(x)
        report = mmfuse.fuse_model(model, (x, ))
        with torch.no_grad():
            assert output_error(expected, model(x))[1] <= RTOL
    records = [r for r in report.reparameterized if r['module'] == '1']
    assert records and not records[0]['merged']
    assert 'verification' in records[0]['reason']
    assert isinstance(model[1], LargeSmall)


def test_merges_in_a_noisy_float32_model_are_judged_against_float64():
    """Rounding to a coarse grid after each block: merged sums cross grid
    points, by more than the rtol asked for, yet stay as close to the
    float64 output as the unmerged model; every merge stands, verified
    against float64."""
    blocks = [PaddleRepVggBlock(8, 8), CoarseRounding(),
              PaddleRepVggBlock(8, 8), CoarseRounding(),
              PaddleRepVggBlock(8, 8)]
    model = _prepare(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), *blocks))
    x = _input(8, size=32)
    merged, records, rel = _reparam_and_compare(model, x, rtol=RTOL,
                                                example_inputs=(x, ))
    assert rel > RTOL  # the premise: the plain check alone fails
    assert len(_merged(records)) == 3 and len(records) == 3
    for record in records:
        assert record['verified_against'] == 'float64'
        assert record['verified_precise_rel_error'] <= 1e-3
    assert not _norms(merged)


def test_folds_after_merges_are_judged_from_the_unmerged_float64_output(
        monkeypatch):
    """fuse_model on the noisy model with a conv+BN in front: the merges'
    check measures the unmerged model in float64 once, and the folds are
    judged against that same output (no second float64 pass)."""
    import mmfuse.verify as verify
    calls = []
    upcast = verify.upcast_output

    def counted(model, inputs, dtype):
        calls.append(dtype)
        return upcast(model, inputs, dtype)

    monkeypatch.setattr(verify, 'upcast_output', counted)
    blocks = [PaddleRepVggBlock(8, 8), CoarseRounding(),
              PaddleRepVggBlock(8, 8), CoarseRounding(),
              PaddleRepVggBlock(8, 8)]
    model = _prepare(nn.Sequential(
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
        CoarseRounding(), *blocks))
    x = _input(8, size=32)
    reference = copy.deepcopy(model)
    report = mmfuse.fuse_model(model, (x, ), rtol=RTOL)
    assert calls == [torch.float64]
    merged = [r for r in report.reparameterized if r['merged']]
    assert len(merged) == 3
    assert all(r['verified_against'] == 'float64' for r in merged)
    assert report.folded_names == ['1'] and not report.undone
    assert report.yardstick == 'float64'
    assert report.precise_rel_error <= 2 * report.unfused_precise_rel_error
    with torch.no_grad():
        wide = copy.deepcopy(reference).double()(x.double())
        # Measured from the unmerged, unfused model's float64 output.
        assert output_error(wide, model(x))[1] == pytest.approx(
            report.precise_rel_error, rel=1e-6)


def test_a_wrong_merge_is_undone_though_judged_against_float64():
    """A registry entry that forgets a branch, in the noisy model: the
    float64 yardstick lets the exact merges stand and still finds the
    wrong one."""
    with _wrong_rule_registered():
        model = _prepare(nn.Sequential(
            PaddleRepVggBlock(8, 8), CoarseRounding(), OpaqueBlock(),
            CoarseRounding(), PaddleRepVggBlock(8, 8)))
        x = _input(8, size=32)
        merged, records, rel = _reparam_and_compare(model, x, rtol=RTOL,
                                                    example_inputs=(x, ))
    wrong = [r for r in records if r['rule'] == 'WrongRule'][0]
    assert not wrong['merged']
    assert 'float64 output as the unmerged model' in wrong['reason']
    kept = _merged(records)
    assert len(kept) == 2
    assert all(r['verified_against'] == 'float64' for r in kept)
    assert isinstance(merged[2], OpaqueBlock)
    assert rel <= 1e-3


def test_registry_blocks_merge_from_branches_read_before_the_walk():
    """``merge_blocks`` reads every registry block's branches and computes
    all their norms' affine maps together before it walks: each merged
    conv must be bit for bit what ``merge_terms`` makes of that block
    alone, and a block whose branches cannot merge (a norm with batch
    statistics) is left with the reason it gives alone."""
    from mmpretrain.models.backbones.repvgg import RepVGGBlock

    from mmfuse.reparam import merge_blocks
    from mmfuse.reparam.registry import find_reparameterizer
    torch.manual_seed(0)
    model = nn.Sequential(
        RepVGGBlock(8, 8), RepVGGBlock(8, 16, stride=2, groups=2),
        RepVGGBlock(16, 16), RepVGGBlock(16, 16)).eval()
    randomize_norm_stats(model)
    norm = model[2].branch_1x1.norm
    norm.track_running_stats = False
    norm.running_mean = norm.running_var = None
    alone = []
    for block in copy.deepcopy(model):
        terms = find_reparameterizer(block)[1].branches(block).terms
        try:
            alone.append(merge_terms(terms))
        except MergeError as error:
            alone.append(str(error))
    x = _input(8)
    with torch.no_grad():
        expected = model(x)
    records = merge_blocks(model).records
    assert [r['merged'] for r in records] == [True, True, False, True]
    assert records[2]['reason'] == alone[2]
    for index in (0, 1, 3):
        conv = model[index][0]
        _, weight, bias = alone[index]
        assert torch.equal(conv.weight, weight)
        assert torch.equal(conv.bias, bias)
    with torch.no_grad():
        assert output_error(expected, model(x))[1] < 1e-5


def test_fuse_model_judges_merges_alone_when_merges_and_folds_fail():
    """The one pass that judges merges and folds together fails (a wrong
    registry entry): the merges are judged alone, the wrong one undone,
    and the norms inside the block it gave back (which the traced pass
    of the model as given observed) are folded after all, with the norm
    after the blocks; every other merge stands."""
    with _wrong_rule_registered():
        model = _prepare(nn.Sequential(OpaqueBlock(), RepBlock(8, 8),
                                       ConvBN(8, 8, 1)))
        x = _input(8)
        with torch.no_grad():
            expected = model(x)
        report = mmfuse.fuse_model(model, (x, ))
    by_rule = {r['rule']: r for r in report.reparameterized}
    assert sorted(by_rule) == ['WrongRule', 'generic']
    assert not by_rule['WrongRule']['merged']
    assert 'undone' in by_rule['WrongRule']['reason']
    assert by_rule['generic']['merged']
    assert by_rule['generic']['verified_rel_error'] <= RTOL
    assert isinstance(model[0], OpaqueBlock)
    assert isinstance(model[1], (nn.Sequential, nn.Conv2d))
    assert sorted(report.folded_names) == ['0.a.bn', '0.b.bn', '2.bn']
    assert not report.undone and report.verified
    assert not _norms(model)
    with torch.no_grad():
        assert output_error(expected, model(x))[1] <= RTOL


class _SumNoActivation(nn.Module):
    """Two conv+BN branches summed, nothing after: merged, the block is
    its conv alone."""

    def __init__(self):
        super().__init__()
        self.a = ConvBN(8, 8, 3)
        self.b = ConvBN(8, 8, 1)

    def forward(self, x):
        return self.a(x) + self.b(x)


class _AfterBlock(nn.Module):
    """A norm right after a block that merges into one conv."""

    def __init__(self):
        super().__init__()
        self.block = _SumNoActivation()
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.block(x))


class _AliasedBlock(_AfterBlock):
    """The block under a second name too, called by the second."""

    def __init__(self):
        super().__init__()
        self.alias = self.block


class _BlockInAList(_AfterBlock):
    """The block called through a plain list, which a merge cannot
    change: the block as it was runs."""

    def __init__(self):
        super().__init__()
        self.calls = [self.block]

    def forward(self, x):
        return self.bn(self.calls[0](x))


class _PostChain(nn.Module):
    """Merges into ``Sequential(conv, act, post)``."""

    def __init__(self):
        super().__init__()
        self.a = ConvBN(8, 8, 3)
        self.b = ConvBN(8, 8, 1)
        self.act = nn.ReLU()
        self.post = ConvBN(8, 8, 3)

    def forward(self, x):
        return self.post(self.act(self.a(x) + self.b(x)))


class _CallsInside(nn.Module):
    """Also runs the block's last conv itself, on its own input."""

    def __init__(self):
        super().__init__()
        self.blk = _PostChain()

    def forward(self, x):
        return self.blk(x) + self.blk.post.conv(x)


@pytest.mark.parametrize('make', [_AfterBlock, _AliasedBlock, _BlockInAList,
                                  _CallsInside])
@pytest.mark.parametrize('verify', [True, False])
def test_folds_after_merges_need_no_second_trace(make, verify):
    """The folds after a merge come from the pass over the model as given:
    what the merged blocks no longer call is dropped, what they kept is
    read from their Sequential, and nothing is assumed about what the
    merged conv feeds outside the block (it may not even run: a second
    name, a plain list).  Exact without verification too; a norm right
    after a merged block stays (a pass over the merged model would have
    folded it in the first model)."""
    model = _prepare(make())
    x = _input(8)
    with torch.no_grad():
        expected = model(x)
    report = mmfuse.fuse_model(model, (x, ), verify=verify)
    with torch.no_grad():
        assert output_error(expected, model(x))[1] <= RTOL
    assert not report.undone
    assert report.reparameterized and all(
        r['merged'] for r in report.reparameterized)
    if make is _CallsInside:
        # The inner conv+BN is also run raw: its norm stays.
        assert report.folded_names == []
        assert isinstance(model.blk, nn.Sequential)
        assert isinstance(model.blk.post.bn, nn.BatchNorm2d)
    else:
        assert report.folded_names == []
        assert isinstance(model.bn, nn.BatchNorm2d)
        assert 'bn' in {s.name for s in report.left}


def test_a_merge_that_breaks_its_callers_forward_is_undone():
    """The caller calls a method of the block (one that calls no layer of
    it, so the traced pass sees no reach inside), which the merged conv
    does not have: the one pass over merges and folds raises; the merge
    is undone (as in Merges.verify) and the model comes out whole.  (A
    plain attribute is carried over to what replaces the block.)"""

    class Block(_SumNoActivation):

        def scale(self):
            return 2.0

    class Caller(nn.Module):

        def __init__(self):
            super().__init__()
            self.stem = ConvBN(8, 8, 3)
            self.block = Block()

        def forward(self, x):
            return self.block(torch.relu(self.stem(x))) * \
                self.block.scale()

    model = _prepare(Caller())
    x = _input(8)
    with torch.no_grad():
        expected = model(x)
    report = mmfuse.fuse_model(model, (x, ))
    assert [r['merged'] for r in report.reparameterized] == [False]
    assert 'undone' in report.reparameterized[0]['reason']
    assert isinstance(model.block, Block)
    assert sorted(report.folded_names) == ['block.a.bn', 'block.b.bn',
                                           'stem.bn']
    with torch.no_grad():
        assert output_error(expected, model(x))[1] <= RTOL


def test_a_registry_block_with_hooks_is_left():
    """A forward hook on a block a registry entry merges would be lost
    with it: the block is left, with the reason, and its hook still runs
    and sees the same output."""
    model, inputs = build_reparam_model('repvgg_a0', input_hw=(64, 64))
    blocks = [m for m in model.modules()
              if type(m).__name__ == 'RepVGGBlock']
    seen = []
    blocks[0].register_forward_hook(
        lambda module, args, output: seen.append(output.clone()))
    with torch.no_grad():
        model(*inputs)
    expected = seen.pop()
    records = reparameterize(model, inputs)
    left = [r for r in records if not r['merged']]
    assert len(left) == 1 and 'forward hooks' in left[0]['reason']
    assert len(records) == len(blocks)
    assert type(blocks[0]) is type(model.get_submodule(left[0]['module']))
    with torch.no_grad():
        model(*inputs)
    assert torch.allclose(seen.pop(), expected, rtol=1e-4, atol=1e-5)


def test_a_failing_fold_after_good_merges_costs_no_repeated_pass():
    """A global hook makes one fold wrong (it shifts its conv's output
    after the fold's scale) while the merge is good: the one pass over
    merges and folds fails, the merges alone pass, and the output that
    failed is judged again rather than computed again; the wider pass,
    then bisection, undo that fold alone."""
    from fusion_checks import changed_where_marked

    class Model(nn.Module):

        def __init__(self):
            super().__init__()
            self.stem = ConvBN(8, 8, 3)
            self.block = _SumNoActivation()
            self.tail = ConvBN(8, 8, 1)
            self.stem.conv.marked = True

        def forward(self, x):
            return self.tail(torch.relu(self.block(torch.relu(
                self.stem(x)))))

    model = _prepare(Model())
    x = _input(8)
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    with changed_where_marked('marked', lambda out: out * 2 + 0.5):
        with torch.no_grad():
            expected = model(x)
        calls.clear()
        report = mmfuse.fuse_model(model, (x, ))
        # Traced pass, the pass over merges and folds, the merges alone,
        # the float64 pass of the unmerged model, two bisection passes.
        assert len(calls) == 6
        with torch.no_grad():
            assert output_error(expected, model(x))[1] <= RTOL
    assert [r['merged'] for r in report.reparameterized] == [True]
    assert report.folded_names == ['tail.bn']
    assert [s.name for s in report.undone] == ['stem.bn']


class _ChangesItsInput(nn.Module):
    """Two conv+BN branches of one input, which the forward scales in
    place between them."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.bn1(self.conv1(x))
        x.mul_(0.5)
        return y + self.bn2(self.conv2(x))


class _ChangesItsInputHolder(nn.Module):

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(8, 8, 1)
        self.block = _ChangesItsInput()

    def forward(self, x):
        return self.block(self.stem(x))


def test_a_block_that_changes_a_shared_value_in_place_is_not_merged():
    """The graph shows both branches reading ``x``, not that one reads it
    after ``x.mul_``: merged, the output was off by 0.19 to 0.28."""
    x = _input(8)
    for run in (lambda m: mmfuse.reparameterize(m),
                lambda m: mmfuse.fuse_model(m).reparameterized,
                lambda m: mmfuse.fuse_model(m, (x, ), verify=False)
                .reparameterized):
        model = randomize_norm_stats(_ChangesItsInputHolder().eval(), 0)
        with torch.no_grad():
            expected = model(x.clone())
        records = run(model)
        assert not any(r.get('merged') for r in records)
        assert any('in place' in r.get('reason', '') for r in records)
        with torch.no_grad():
            assert output_error(expected, model(x.clone()))[1] <= RTOL


class _CallsABranch(nn.Module):
    """Runs a RepVGG block and, itself, one of the block's branches."""

    def __init__(self):
        super().__init__()
        from mmpretrain.models.backbones.repvgg import RepVGGBlock
        self.block = RepVGGBlock(8, 8)

    def forward(self, x):
        return self.block(x) + self.block.branch_3x3(x)


def test_a_block_whose_branch_is_called_from_outside_is_not_merged():
    """Seen in the traced pass: the merge would remove the branch the
    caller runs (the fused model raised AttributeError before)."""
    model = randomize_norm_stats(_CallsABranch().eval(), 0)
    x = _input(8)
    with torch.no_grad():
        expected = model(x)
    report = mmfuse.fuse_model(model, (x, ), verify=False)
    (record, ) = [r for r in report.reparameterized
                  if r['module'] == 'block']
    assert not record['merged']
    assert 'outside it calls a layer inside it' in record['reason']
    with torch.no_grad():
        assert output_error(expected, model(x))[1] <= RTOL


class _ReversedSequential(nn.Sequential):

    def __iter__(self):
        return reversed(list(self._modules.values()))


class _BranchesOfAnotherKind(nn.Module):
    """A branch that is a Sequential running its children last first, and
    an identity with a forward of its own."""

    def __init__(self, kind: str):
        super().__init__()
        seq = _ReversedSequential if kind == 'reversed' else nn.Sequential
        self.a = seq(nn.Conv2d(8, 8, 3, padding=1, bias=False),
                     nn.BatchNorm2d(8))
        self.b = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False),
                               nn.BatchNorm2d(8))
        self.idn = nn.Identity()
        if kind == 'doubled':
            self.idn.forward = lambda x: 2 * x

    def forward(self, x):
        return self.a(x) + self.b(x) + self.idn(x)


class _AddsInPlace(nn.Module):
    """``out += ...`` on the identity branch, which is ``x`` itself."""

    def __init__(self):
        super().__init__()
        self.idn = nn.Identity()
        self.b3 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False),
                                nn.BatchNorm2d(8))
        self.b1 = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False),
                                nn.BatchNorm2d(8))

    def forward(self, x):
        out = self.idn(x)
        out += self.b3(x)
        out += self.b1(x)
        return out


@pytest.mark.parametrize('make', [
    lambda: _BranchesOfAnotherKind('reversed'),
    lambda: _BranchesOfAnotherKind('doubled'), _AddsInPlace
], ids=['reversed-sequential', 'identity-forward', 'iadd'])
def test_review_cases_of_the_generic_merge(make):
    """Merged whole before, off by 0.8 to 3: the odd branch now stays as
    it is (the others may merge)."""
    x = _input(8)
    for run in (lambda m: mmfuse.reparameterize(m),
                lambda m: mmfuse.fuse_model(m).reparameterized):
        model = randomize_norm_stats(nn.Sequential(make()).eval(), 0)
        with torch.no_grad():
            expected = model(x.clone())
        run(model)
        with torch.no_grad():
            assert output_error(expected, model(x.clone()))[1] <= RTOL


# --------------------------------------- review: merges without verification


def _conv_bn(conv: nn.Module, channels: int) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(channels))


class _ThreeBranches(BaseModule):
    """(An mmengine ``BaseModule``: its class carries ``_abc_impl``, which
    cannot be copied, deep or pickled.)"""

    def __init__(self):
        super().__init__()
        self.out_channels = 4
        self.a = _conv_bn(nn.Conv2d(4, 4, 3, padding=1, bias=False), 4)
        self.b = _conv_bn(nn.Conv2d(4, 4, 1, bias=False), 4)
        self.n = nn.BatchNorm2d(4)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.a(x) + self.b(x) + self.n(x))


class _ReadsTheBlocksAttribute(nn.Module):
    """``self.block.out_channels``: read after the merge too (it raised
    AttributeError on the Sequential that replaced the block)."""

    expansion = 2

    def __init__(self):
        super().__init__()
        self.block = _ThreeBranches()
        self.block.expansion = 1

    def forward(self, x):
        return self.block(x) * (self.block.out_channels / 4) + \
            self.block.expansion


class _UsesItsSumTwice(_ThreeBranches):
    """Rebuilt as a GraphModule (the rest is no chain), whose deepcopy
    keeps only what its graph names, unless told."""

    def forward(self, x):
        total = self.a(x) + self.b(x) + self.n(x)
        return self.act(total) + total


class _ReadsTheGraphBlocksAttribute(_ReadsTheBlocksAttribute):

    def __init__(self):
        super().__init__()
        self.block = _UsesItsSumTwice()
        self.block.expansion = 1


class _WritesThroughAForeach(_ThreeBranches):
    """``torch._foreach_mul_([x], 0.5)`` between the branches' reads (a
    merge after it: 1.34)."""

    def forward(self, x):
        y = self.a(x) + self.n(x)
        torch._foreach_mul_([x], 0.5)
        return y + self.b(x)


class _UnderAutocast(_ThreeBranches):
    """Sums two branches in bfloat16, which torch.fx does not record (a
    merge into a float32 conv: 3.9e-3)."""

    def forward(self, x):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            y = self.a(x) + self.b(x)
        return self.act(y.float() + self.n(x))


class _ReflectConv(nn.Conv2d):
    """The stock forward, and a ``_conv_forward`` that pads otherwise than
    its attributes say (a merge by the attributes: 0.1)."""

    def _conv_forward(self, x, weight, bias):
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode='reflect'), weight, bias,
                        self.stride, 0, self.dilation, self.groups)


class _CustomConvBranch(nn.Module):

    def __init__(self):
        super().__init__()
        self.a = _conv_bn(_ReflectConv(4, 4, 3, padding=1, bias=False), 4)
        self.b = _conv_bn(nn.Conv2d(4, 4, 1, bias=False), 4)

    def forward(self, x):
        return self.a(x) + self.b(x)


class _WritesThroughOut(_ThreeBranches):
    """Halves its input through ``out=`` between the reads of it (all three
    branches merged after the write: 0.27)."""

    def forward(self, x):
        y = self.a(x) + self.n(x)
        torch.mul(x, 0.5, out=x)
        return y + self.b(x)


@pytest.mark.parametrize('make, merges, fold_rtol', [
    (_ReadsTheBlocksAttribute, True, 1e-5),
    (_ReadsTheGraphBlocksAttribute, True, 1e-5),
    (lambda: nn.Sequential(_WritesThroughAForeach()), False, 1e-5),
    # The folds inside the bfloat16 region round as any bfloat16 model's.
    (lambda: nn.Sequential(_UnderAutocast()), False, 1e-2),
    (lambda: nn.Sequential(_CustomConvBranch()), False, 1e-5),
    (lambda: nn.Sequential(_WritesThroughOut()), False, 1e-5),
])
def test_merges_without_verification_the_review_found(
        make, merges, fold_rtol):
    torch.manual_seed(0)
    model = randomize_norm_stats(make().eval(), seed=7)
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        reference = model(x.clone())
    records = mmfuse.reparam.reparameterize(model)
    assert any(r['merged'] for r in records) == merges
    copied = copy.deepcopy(model)
    pickled = pickle.loads(pickle.dumps(model))
    for merged in (model, copied, pickled):
        with torch.no_grad():
            assert output_error(reference, merged(x.clone()))[1] < 1e-5
    fused = copy.deepcopy(model)
    mmfuse.fuse_conv_bn(fused)
    with torch.no_grad():
        assert output_error(reference, fused(x.clone()))[1] < fold_rtol


# -- second review of merges: what a merge must keep of the block -----------


class _NamesClash(nn.Module):
    """Keeps ``post.act`` and ``post_act`` after the sum: one name in a
    Sequential (the ReLU was dropped: 1.0 off)."""

    def __init__(self):
        super().__init__()
        self.a = _conv_bn(nn.Conv2d(4, 4, 3, padding=1, bias=False), 4)
        self.b = _conv_bn(nn.Conv2d(4, 4, 1, bias=False), 4)
        self.post = nn.Module()
        self.post.act = nn.ReLU()
        self.post_act = nn.Tanh()

    def forward(self, x):
        return self.post_act(self.post.act(self.a(x) + self.b(x)))


class _ShuffleGroups(nn.Module):
    """A branch sum that keeps its channel-shuffle groups in ``groups``."""

    def __init__(self):
        super().__init__()
        self.a = _conv_bn(nn.Conv2d(4, 4, 3, padding=1, bias=False), 4)
        self.b = _conv_bn(nn.Conv2d(4, 4, 1, bias=False), 4)
        self.groups = 2
        self.scale = nn.Parameter(torch.full((1, ), 0.5))

    def forward(self, x):
        return self.a(x) + self.b(x)


class _ReadsGroups(nn.Module):
    """Shuffles with ``self.block.groups``: a merged conv's groups is 1
    (0.86 off)."""

    def __init__(self):
        super().__init__()
        self.block = _ShuffleGroups()

    def forward(self, x):
        y = self.block(x)
        n, c, h, w = y.shape
        groups = self.block.groups
        return y.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(
            n, c, h, w)


class _ReadsScale(_ReadsGroups):
    """Reads a parameter of the block (AttributeError once merged)."""

    def forward(self, x):
        return self.block(x) * self.block.scale


class _ReadsInsideTheBlock(_ReadsGroups):
    """Reads a tensor of a branch (AttributeError once merged, with an
    example input: a pass shows calls, not reads)."""

    def forward(self, x):
        return self.block(x) + self.block.b[1].bias.mean()


class _LayerScaled(nn.Module):
    """A branch scaled by a ``(1, C, 1, 1)`` parameter: on an unbatched
    input it makes the output 4-D, which one conv does not."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1)
        self.gamma = nn.Parameter(torch.full((1, 4, 1, 1), 0.5))

    def forward(self, x):
        return self.a(x) * self.gamma + self.b(x)


def _repvgg_with_stray_se():
    """An mmpretrain RepVGGBlock given an SE layer its ``se_cfg`` does not
    ask for: its forward skips it (a merge ran it: 0.49 off)."""
    from mmpretrain.models.backbones.repvgg import RepVGGBlock
    from mmpretrain.models.utils import SELayer
    block = RepVGGBlock(4, 4)
    block.se_layer = SELayer(4, ratio=2)
    return nn.Sequential(block)


@pytest.mark.parametrize('make, shape, merged', [
    (lambda: nn.Sequential(_NamesClash()), (2, 4, 9, 9), True),
    (_ReadsGroups, (2, 4, 9, 9), False),
    (_ReadsScale, (2, 4, 9, 9), False),
    (_ReadsInsideTheBlock, (2, 4, 9, 9), False),
    (lambda: nn.Sequential(_LayerScaled()), (4, 9, 9), False),
    (_repvgg_with_stray_se, (2, 4, 9, 9), False),
])
def test_merges_keep_what_the_block_gave(make, shape, merged):
    """Found by a review, each wrong or raising after the merge in every
    mode: without an input, from structure, and from a pass unverified."""
    torch.manual_seed(0)
    model = randomize_norm_stats(make().eval(), seed=3)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(x)
    for merge in (reparameterize,
                  lambda m: mmfuse.fuse_model(m).reparameterized,
                  lambda m: mmfuse.fuse_model(m, (x, ), verify=False)
                  .reparameterized):
        copied = copy.deepcopy(model)
        records = merge(copied)
        with torch.no_grad():
            output = copied(x)
        assert output.shape == reference.shape
        assert output_error(reference, output)[1] < RTOL
        assert any(r['merged'] for r in records) == merged, records


def test_merges_without_verification_refuse_global_hooks():
    """A global hook on every conv runs once per branch before a merge,
    once after (0.17 off): merges need an example input to verify them."""
    model = _prepare(nn.Sequential(_NamesClash()))
    x = _input(4)
    with torch.no_grad():
        reference = model(x)
    handle = nn.modules.module.register_module_forward_hook(
        lambda module, args, output: output * 0.5
        if isinstance(module, nn.Conv2d) else output)
    try:
        with pytest.raises(mmfuse.FusionError, match='global forward hooks'):
            reparameterize(model)
        records = reparameterize(model, (x, ))
    finally:
        handle.remove()
    with torch.no_grad():
        assert output_error(reference, model(x))[1] < RTOL
    assert not any(r['merged'] for r in records)


def _groups_of(block):
    return block.groups


class _ReadsGroupsThroughGetattr(_ReadsGroups):

    def forward(self, x):
        return self.block(x) * getattr(self.block, 'groups')


class _ReadsGroupsThroughAFunction(_ReadsGroups):

    def forward(self, x):
        return self.block(x) * _groups_of(self.block)


@pytest.mark.parametrize('make', [_ReadsGroupsThroughGetattr,
                                  _ReadsGroupsThroughAFunction])
def test_attributes_read_past_the_code_above_keep_the_block(make):
    """``getattr(self.block, 'groups')``, ``helper(self.block)``: the
    names are not in the code above, which hands the block on (1.22 off
    with an example input, unverified)."""
    model = randomize_norm_stats(make().eval(), seed=3)
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        reference = model(x)
    report = mmfuse.fuse_model(model, (x, ), verify=False)
    assert not any(r['merged'] for r in report.reparameterized)
    with torch.no_grad():
        assert output_error(reference, model(x))[1] < RTOL


class _CallsTheBlock(nn.Module):
    """Calls ``self.block`` and reads nothing of it (until its class
    changes)."""

    def __init__(self):
        super().__init__()
        self.block = _ShuffleGroups()

    def forward(self, x):
        return self.block(x)


def test_a_class_changed_between_merges_has_its_code_read_again():
    """A merge walk checks what the code above each block reads against
    its class once: a forward changed after one walk is read in the
    next, which keeps the block whose ``groups`` it now reads."""
    from mmfuse.reparam.api import merge_blocks
    model = randomize_norm_stats(_CallsTheBlock().eval(), seed=3)
    assert [r['merged'] for r in merge_blocks(model).records] == [True]
    forward = _CallsTheBlock.forward
    _CallsTheBlock.forward = _ReadsGroups.forward
    try:
        model = randomize_norm_stats(_CallsTheBlock().eval(), seed=3)
        records = merge_blocks(model).records
    finally:
        _CallsTheBlock.forward = forward
    assert [r['merged'] for r in records] == [False]
    assert 'groups' in records[0]['reason']


# -------------------------------------------- dtypes and rebuilt structures


class _NormFirstSum(nn.Module):
    """An identity-norm branch listed before the conv branch."""

    def __init__(self, channels: int = 8):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)

    def forward(self, x):
        return self.bn(x) + self.bn3(self.conv(x))


def _half_convs_float_norms(block: nn.Module) -> nn.Module:
    """``block`` in float16 with its norms kept in float32 (mixed
    precision's "keep batch norm in float32")."""
    model = randomize_norm_stats(nn.Sequential(block).eval(), seed=3)
    model.half()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.float()
    return model


def _mixed_precision_blocks():
    from mmpretrain.models.backbones.mobileone import MobileOneBlock
    yield 'MobileOneBlock', lambda: MobileOneBlock(8, 8, 3, 2)
    yield 'generic', _NormFirstSum


@pytest.mark.parametrize('name, make', list(_mixed_precision_blocks()))
@pytest.mark.parametrize('how', ['reparameterize', 'fuse_model'])
def test_a_merged_conv_takes_the_dtype_of_the_convs(name, make, how):
    """float16 convs beside float32 norms: where a norm-only branch came
    first, the merged conv took the norm's float32 and the model raised on
    its float16 input; a fused checkpoint rebuilt it from the block's
    first tensor, a float32 norm, and raised too."""
    from mmfuse.checkpoint import (load_fused_checkpoint,
                                   make_fused_checkpoint)
    torch.manual_seed(0)
    model = _half_convs_float_norms(make())
    x = torch.randn(1, 8, 7, 7).half()
    with torch.no_grad():
        reference = model(x)
    if how == 'reparameterize':
        records = reparameterize(model)
        report = mmfuse.fuse_model(model, (x, ), reparameterize=False)
        report.reparameterized = records
    else:
        report = mmfuse.fuse_model(model)
    assert _merged(report.reparameterized)
    assert {p.dtype for m in model.modules() if isinstance(m, nn.Conv2d)
            for p in m.parameters()} == {torch.float16}
    with torch.no_grad():
        fused = model(x)
    assert fused.dtype == torch.float16
    assert output_error(reference, fused)[1] < 1e-2
    torch.manual_seed(1)
    fresh = _half_convs_float_norms(make())
    load_fused_checkpoint(fresh, make_fused_checkpoint(model, report))
    with torch.no_grad():
        assert torch.equal(fresh(x), fused)


class _PlainSum(nn.Module):

    def __init__(self, channels: int = 4):
        super().__init__()
        self.c3 = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels))
        self.c1 = nn.Sequential(
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels))

    def forward(self, x):
        return self.c3(x) + self.c1(x)


class _FlagInABuffer(_PlainSum):
    """A sum merged into a graph, and code after it that a flag kept in a
    buffer turns on (set by training, not by the config)."""

    def __init__(self, channels: int = 8):
        super().__init__(channels)
        self.gamma = nn.Parameter(torch.ones(channels, 1, 1))
        self.register_buffer('use_shortcut', torch.tensor(False))

    def forward(self, x):
        out = torch.relu(self.c3(x) + self.c1(x)) * self.gamma
        if self.use_shortcut:
            out = out + x
        return out


def test_a_graph_rebuilt_from_a_checkpoint_reads_the_flags_it_was_fused_with():
    """The merged block's graph was traced again from the fresh model,
    whose flag was still off, before the weights loaded: the residual was
    gone, 0.67 off, and the strict load said nothing.  The fused state
    dict's values that fit the fresh model load first now; a record made
    from another graph is refused."""
    from mmfuse.checkpoint import (CheckpointError, load_fused_checkpoint,
                                   make_fused_checkpoint)
    model = randomize_norm_stats(nn.Sequential(_FlagInABuffer()).eval())
    model[0].use_shortcut.fill_(True)
    x = torch.randn(1, 8, 9, 9)
    with torch.no_grad():
        reference = model(x)
    report = mmfuse.fuse_model(model, (x, ))
    assert [r['structure'] for r in _merged(report.reparameterized)] == [
        'graph']
    checkpoint = make_fused_checkpoint(model, report)
    fresh = nn.Sequential(_FlagInABuffer()).eval()
    load_fused_checkpoint(fresh, checkpoint)
    with torch.no_grad():
        assert output_error(reference, fresh(x))[1] < 1e-5
    # Without the fused values, the graph traced from the fresh block is
    # another one: refused.
    record = checkpoint['meta']['mmfuse']['reparameterized']
    with pytest.raises(mmfuse.FusionError, match='another graph'):
        apply_reparam_structure(nn.Sequential(_FlagInABuffer()).eval(),
                                record)
    with pytest.raises(CheckpointError, match='another graph'):
        mmfuse.checkpoint.convert_to_fused_structure(
            nn.Sequential(_FlagInABuffer()).eval(),
            checkpoint['meta']['mmfuse'])


def test_reparameterize_puts_its_merges_back_when_verification_raises():
    """Ctrl-C during the verification pass left the merged block in."""
    model = randomize_norm_stats(nn.Sequential(_PlainSum()).eval())
    calls = []

    def interrupt_the_second(module, args, output):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    model.register_forward_hook(interrupt_the_second)
    with pytest.raises(KeyboardInterrupt):
        reparameterize(model, (torch.randn(1, 4, 6, 6), ))
    assert len(calls) == 2
    assert isinstance(model[0], _PlainSum)


def test_a_merge_walk_that_raises_puts_back_what_it_merged(monkeypatch):
    """Ctrl-C (or an error out of a later block) in the walk left the
    blocks merged before it in the model."""
    from mmfuse.reparam import api as reparam_api
    model = randomize_norm_stats(
        nn.Sequential(_PlainSum(), _PlainSum()).eval())
    replace = reparam_api._Walker.replace
    calls = []

    def interrupted_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return replace(self, *args, **kwargs)

    monkeypatch.setattr(reparam_api._Walker, 'replace', interrupted_second)
    with pytest.raises(KeyboardInterrupt):
        reparameterize(model)
    assert [type(m) for m in model] == [_PlainSum, _PlainSum]


class _ReadsItsDtype(ResidualAfterSum):
    """Its code after the sum names the dtype of a parameter."""

    def __init__(self, channels):
        super().__init__(channels)
        self.gamma = nn.Parameter(torch.ones(channels, 1, 1))

    def forward(self, x):
        y = self.a(x) + self.b(x) * 0.5
        return F.relu(y).to(self.gamma.dtype) * self.gamma + x


def test_a_graph_merge_rebuilds_from_its_meta_and_in_its_dtype():
    """A fused checkpoint's meta alone rebuilds the structure (the values
    the fresh model has are traced: it raised, wanting a state dict).  A
    graph whose code names the dtype it was fused in rebuilds in a model
    of that dtype, and is refused in another (its cast would differ)."""
    from mmfuse.checkpoint import (convert_to_fused_structure,
                                   load_fused_checkpoint,
                                   make_fused_checkpoint)
    model = randomize_norm_stats(
        nn.Sequential(_ReadsItsDtype(6)).eval()).to(torch.bfloat16)
    x = torch.randn(1, 6, 8, 8, dtype=torch.bfloat16)
    report = mmfuse.fuse_model(model, (x, ))
    assert [r['structure'] for r in _merged(report.reparameterized)] == [
        'graph']
    checkpoint = make_fused_checkpoint(model, report)
    fresh = nn.Sequential(_ReadsItsDtype(6)).eval().to(torch.bfloat16)
    convert_to_fused_structure(fresh, {'meta': checkpoint['meta']})
    fresh.load_state_dict(checkpoint['state_dict'].tensors())
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    fresh = nn.Sequential(_ReadsItsDtype(6)).eval().to(torch.bfloat16)
    load_fused_checkpoint(fresh, checkpoint)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    with pytest.raises(mmfuse.checkpoint.CheckpointError,
                       match='another graph'):
        load_fused_checkpoint(nn.Sequential(_ReadsItsDtype(6)).eval(),
                              checkpoint)


class _ReadsItsDevice(_ReadsItsDtype):
    """Its code after the sum names the device of a parameter."""

    def forward(self, x):
        y = self.a(x) + self.b(x) * 0.5
        return F.relu(y).to(self.gamma.device) * self.gamma + x


def test_a_graph_merge_rebuilds_on_another_device():
    """The device a forward reads is a constant of the graph: a block fused
    on the CPU would have been refused as another graph where a runner
    moved the fresh model to a GPU before loading.  Devices are named
    alike in the recorded code."""
    from types import SimpleNamespace

    from mmfuse.checkpoint import load_fused_checkpoint, make_fused_checkpoint
    from mmfuse.reparam.api import graph_code
    model = randomize_norm_stats(nn.Sequential(_ReadsItsDevice(6)).eval())
    x = torch.randn(1, 6, 8, 8)
    report = mmfuse.fuse_model(model, (x, ))
    checkpoint = make_fused_checkpoint(model, report)
    code = checkpoint['meta']['mmfuse']['reparameterized'][0]['code']
    assert 'device(...)' in code and "type='cpu'" not in code
    fresh = nn.Sequential(_ReadsItsDevice(6)).eval()
    load_fused_checkpoint(fresh, checkpoint)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert graph_code(SimpleNamespace(
        code="y.to(device(type='cuda', index=0))")) == graph_code(
            SimpleNamespace(code="y.to(device(type='cpu'))"))
