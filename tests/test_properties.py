"""Property-based tests: random conv/norm configurations, randomised norm
statistics, both discovery modes."""
import copy

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mmfuse
from mmfuse.testing import randomize_norm_stats
from mmfuse.verify import output_error

CONV = {
    (1, False): nn.Conv1d, (2, False): nn.Conv2d, (3, False): nn.Conv3d,
    (1, True): nn.ConvTranspose1d, (2, True): nn.ConvTranspose2d,
    (3, True): nn.ConvTranspose3d
}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@st.composite
def conv_norm_configs(draw):
    dims = draw(st.sampled_from([1, 2, 3]))
    transposed = draw(st.booleans())
    groups = draw(st.sampled_from([1, 2, 3]))
    in_channels = groups * draw(st.integers(1, 3))
    out_channels = groups * draw(st.integers(1, 3))
    kernel = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    padding = draw(st.integers(0, 1))
    padding_mode = 'zeros' if transposed else draw(
        st.sampled_from(['zeros', 'reflect', 'replicate', 'circular']))
    conv = CONV[(dims, transposed)](
        in_channels, out_channels, kernel, stride=stride, padding=padding,
        dilation=dilation, groups=groups, bias=draw(st.booleans()),
        padding_mode=padding_mode)
    norm_first = draw(st.booleans())
    norm = BN[dims](in_channels if norm_first else out_channels,
                    eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])),
                    affine=draw(st.booleans()))
    layers = [norm, conv] if norm_first else [conv, norm]
    size = (kernel - 1) * dilation + 3 + draw(st.integers(0, 3))
    batch = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    return layers, norm_first, (batch, in_channels) + (size, ) * dims, seed


@settings(max_examples=60, deadline=None)
@given(conv_norm_configs(), st.booleans())
def test_random_conv_norm_pairs(config, traced):
    layers, norm_first, shape, seed = config
    torch.manual_seed(seed)
    model = randomize_norm_stats(nn.Sequential(*layers).eval(), seed)
    x = torch.randn(*shape)
    with torch.no_grad():
        reference = model(x)
    fused = copy.deepcopy(model)
    report = mmfuse.fuse_model(
        fused, (x, ) if traced else None, reparameterize=False)
    with torch.no_grad():
        _, rel = output_error(reference, fused(x))
    assert rel < 1e-5
    conv = layers[1] if norm_first else layers[0]
    zero_padded = conv.transposed or (conv.padding_mode == 'zeros' and any(
        p for p in conv.padding))
    foldable = not (norm_first and zero_padded)
    norm_at = '0' if norm_first else '1'
    assert isinstance(fused.get_submodule(norm_at), nn.Identity) == foldable
    explained = report.folded_names + [s.name for s in report.left]
    assert explained == [norm_at]
    if traced:
        assert report.max_rel_error < 1e-5 and not report.undone


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(0, 2**16), st.booleans())
def test_random_chains_of_blocks(depth, seed, traced):
    """conv -> bn -> relu chains, with sums and re-used outputs mixed in."""
    gen = torch.Generator().manual_seed(seed)

    class Block(nn.Module):

        def __init__(self, variant: int):
            super().__init__()
            self.variant = variant
            self.conv_a = nn.Conv2d(4, 4, 3, padding=1)
            self.conv_b = nn.Conv2d(4, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            a = self.conv_a(x)
            if self.variant == 0:
                return torch.relu(self.bn(a))
            if self.variant == 1:
                return self.bn(a + self.conv_b(x))
            if self.variant == 2:
                return self.bn(a) + a
            return self.bn(torch.relu(a)) + self.conv_b(x)

    variants = torch.randint(0, 4, (depth, ), generator=gen).tolist()
    torch.manual_seed(seed)
    model = randomize_norm_stats(
        nn.Sequential(*[Block(v) for v in variants]).eval(), seed)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    with torch.no_grad():
        reference = model(x)
    report = mmfuse.fuse_model(
        model, (x, ) if traced else None, reparameterize=False)
    with torch.no_grad():
        assert output_error(reference, model(x))[1] < 1e-5
    for index, variant in enumerate(variants):
        folded = isinstance(model[index].bn, nn.Identity)
        assert folded == (variant in (0, 1)), (variants, index)
    assert len(report.folded) + len(report.left) == depth
