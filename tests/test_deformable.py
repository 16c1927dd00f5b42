"""Norms after mmcv's deformable convs: DCNv2 (modulated, with a bias to
take the shift) folds, DCNv1 (no bias) stays, a norm before a deformable
conv stays.  Offset convs get random weights (mmcv zeroes them), so that
a fold that touched the offsets would show."""
import copy

import mmcv.ops as ops
import pytest
import torch
from torch import nn

import mmfuse
from fusion_checks import fuse_and_compare, identity_at, kept_at
from mmfuse.checkpoint import convert_to_fused_structure, fusion_record
from mmfuse.testing import randomize_norm_stats
from mmfuse.verify import output_error


def _offsets_random(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        offset = getattr(module, 'conv_offset', None)
        if isinstance(offset, nn.Conv2d):
            with torch.no_grad():
                offset.weight.copy_(
                    torch.randn(offset.weight.shape, generator=gen) * 0.1)
                offset.bias.copy_(
                    torch.randn(offset.bias.shape, generator=gen))
    return model


def _input(channels: int = 4, size: int = 9) -> torch.Tensor:
    return torch.randn(2, channels, size, size,
                       generator=torch.Generator().manual_seed(1))


class DCNv2ThenBN(nn.Module):

    def __init__(self, bias: bool = False):
        super().__init__()
        self.dcn = ops.ModulatedDeformConv2dPack(
            4, 6, 3, padding=1, bias=bias)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return torch.relu(self.bn(self.dcn(x)))


@pytest.mark.parametrize('bias', [False, True])
def test_dcnv2_pack_then_bn_folds(bias, traced):
    model = _offsets_random(DCNv2ThenBN(bias))
    fused, report, rel = fuse_and_compare(model, (_input(), ), traced)
    assert rel < 1e-5
    identity_at(fused, ['bn'])
    assert isinstance(fused.dcn, ops.ModulatedDeformConv2dPack)
    assert isinstance(fused.dcn.bias, nn.Parameter)
    # The offset conv is the unfused model's own.
    assert torch.equal(fused.dcn.conv_offset.weight,
                       model.dcn.conv_offset.weight)
    if report is not None:
        assert report.folded and not report.left


class OffsetsFromOutside(nn.Module):
    """A plain ``ModulatedDeformConv2d``: offsets and mask are arguments."""

    def __init__(self):
        super().__init__()
        self.offsets = nn.Conv2d(4, 27, 3, padding=1)
        self.dcn = ops.ModulatedDeformConv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        o1, o2, mask = self.offsets(x).chunk(3, dim=1)
        out = self.dcn(x, torch.cat([o1, o2], dim=1), mask.sigmoid())
        return self.bn(out)


def test_modulated_deform_conv_with_given_offsets_folds(traced):
    model = OffsetsFromOutside()
    with torch.no_grad():
        model.offsets.weight.mul_(3)
    fused, _, rel = fuse_and_compare(model, (_input(), ), traced)
    assert rel < 1e-5
    identity_at(fused, ['bn'])


def test_convmodule_with_dcnv2_folds_and_norm_first_stays(traced):
    from mmcv.cnn import ConvModule
    model = _offsets_random(
        nn.Sequential(
            ConvModule(4, 4, 3, padding=1, conv_cfg=dict(type='DCNv2'),
                       norm_cfg=dict(type='BN')),
            ConvModule(4, 4, 1, conv_cfg=dict(type='DCNv2'),
                       norm_cfg=dict(type='BN'),
                       order=('norm', 'conv', 'act'))))
    fused, report, rel = fuse_and_compare(model, (_input(), ), traced)
    assert rel < 1e-5
    identity_at(fused, ['0.bn'])
    kept_at(fused, ['1.bn'])
    if report is not None:
        (left, ) = report.left
        assert left.name == '1.bn'
        assert 'deformable conv' in left.reason


def test_dcnv1_then_bn_stays_with_its_reason(traced):
    model = _offsets_random(
        nn.Sequential(
            ops.DeformConv2dPack(4, 4, 3, padding=1), nn.BatchNorm2d(4)))
    fused, report, rel = fuse_and_compare(model, (_input(), ), traced)
    assert rel == 0
    kept_at(fused, ['1'])
    if report is not None:
        assert 'without a bias (DCNv1)' in report.left[0].reason


def test_bn_before_unpadded_dcnv2_stays(traced):
    """No padding, yet a norm before a deformable conv is not folded into
    it: samples outside the input are zeros, and the Pack reads the
    normalised input for its offsets."""
    model = _offsets_random(
        nn.Sequential(
            nn.BatchNorm2d(4), ops.ModulatedDeformConv2dPack(4, 4, 1)))
    fused, report, rel = fuse_and_compare(model, (_input(), ), traced)
    assert rel == 0
    kept_at(fused, ['0'])
    if report is not None:
        assert 'deformable conv' in report.left[0].reason


class ScaledDCN(ops.ModulatedDeformConv2dPack):
    """Transforms its weight in forward: must not take a fold."""

    def forward(self, x):
        weight = self.weight
        self.weight = nn.Parameter(weight / weight.norm())
        try:
            return super().forward(x)
        finally:
            self.weight = weight


def test_dcn_subclass_overriding_forward_stays(traced):
    model = _offsets_random(
        nn.Sequential(ScaledDCN(4, 4, 3, padding=1), nn.BatchNorm2d(4)))
    fused, report, rel = fuse_and_compare(model, (_input(), ), traced)
    assert rel == 0
    kept_at(fused, ['1'])
    if report is not None:
        assert 'overrides forward' in report.left[0].reason


class SharedDCNHead(nn.Module):
    """One DCN in every level's block, a BN per level (pattern 4d, as
    RetinaSepBNHead shares its convs)."""

    def __init__(self):
        super().__init__()
        shared = ops.ModulatedDeformConv2dPack(4, 4, 3, padding=1)
        self.levels = nn.ModuleList(
            nn.Sequential(shared, nn.BatchNorm2d(4)) for _ in range(2))

    def forward(self, levels):
        return [block(x) for x, block in zip(levels, self.levels)]


def test_shared_dcn_gets_a_folded_copy_per_level(traced):
    model = _offsets_random(SharedDCNHead())
    levels = [_input(size=9), _input(size=5)]
    fused, _, rel = fuse_and_compare(model, (levels, ), traced)
    assert rel < 1e-5
    identity_at(fused, ['levels.0.1', 'levels.1.1'])
    assert fused.levels[0][0] is not fused.levels[1][0]
    assert model.levels[0][0] is model.levels[1][0]


class DCNConcatConv(nn.Module):
    """A BN over the concat of a DCN output and a conv output (4e)."""

    def __init__(self):
        super().__init__()
        self.dcn = ops.ModulatedDeformConv2dPack(4, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 3, 1)
        self.bn = nn.BatchNorm2d(7)

    def forward(self, x):
        return self.bn(torch.cat([self.dcn(x), self.conv(x)], dim=1))


def test_bn_over_concat_of_dcn_and_conv_folds_both_slices(traced):
    model = _offsets_random(DCNConcatConv())
    fused, _, rel = fuse_and_compare(model, (_input(), ), traced)
    assert rel < 1e-5
    identity_at(fused, ['bn'])
    assert isinstance(fused.dcn.bias, nn.Parameter)


def test_fused_dcn_checkpoint_loads_into_a_fresh_model():
    """The fused state dict (with the DCN's new bias) loads with no missing
    or unexpected keys into a model rebuilt from its fusion record."""
    model = randomize_norm_stats(_offsets_random(DCNv2ThenBN()).eval())
    x = _input()
    with torch.no_grad():
        reference = model(x)
    fused = copy.deepcopy(model)
    report = mmfuse.fuse_model(fused, (x, ))
    fresh = DCNv2ThenBN().eval()
    convert_to_fused_structure(fresh, fusion_record(report))
    fresh.load_state_dict(fused.state_dict(), strict=True)
    with torch.no_grad():
        assert output_error(reference, fresh(x))[1] < 1e-5
    # A second fusion finds nothing left to fold and changes nothing.
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    again = mmfuse.fuse_model(fused, (x, ))
    assert not again.folded
    assert all(torch.equal(before[k], v)
               for k, v in fused.state_dict().items())


def test_the_real_dcnv2_neck_depends_on_its_input():
    """centernet_r18_dcnv2 with its offsets scaled (tests/real_models.py):
    the output depends on the backbone, so the folds before and in the
    DCNv2 neck are checked by the real-model tests."""
    import real_models
    model, inputs = real_models.build('centernet_r18_dcnv2')
    with torch.no_grad():
        reference = model(*inputs)
        model.backbone.bn1.running_mean.add_(0.1)
        assert output_error(reference, model(*inputs))[1] > 1e-4
