"""The folding math against the layers it replaces, in float64."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from mmfuse.folding import (fold_affine_into_input, fold_affine_into_output,
                            norm_affine)
from mmfuse.testing import randomize_norm_stats


def _bn(channels: int, seed: int = 0) -> nn.BatchNorm2d:
    return randomize_norm_stats(nn.BatchNorm2d(channels).double().eval(),
                                seed)


def _affine(bn):
    return norm_affine(bn.running_mean, bn.running_var, bn.eps, bn.weight,
                       bn.bias)


@pytest.mark.parametrize('groups', [1, 2, 4])
@pytest.mark.parametrize('bias', [True, False])
def test_fold_into_conv_output(groups, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1, groups=groups, bias=bias).double()
    bn = _bn(12)
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    scale, shift = _affine(bn)
    weight, new_bias = fold_affine_into_output(conv.weight, conv.bias, scale,
                                               shift, False, groups)
    fused = F.conv2d(x, weight, new_bias, padding=1, groups=groups)
    torch.testing.assert_close(fused, bn(conv(x)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('groups', [1, 2, 4])
def test_fold_into_grouped_transposed_conv(groups):
    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(8, 12, 3, stride=2, groups=groups).double()
    bn = _bn(12)
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    scale, shift = _affine(bn)
    weight, bias = fold_affine_into_output(conv.weight, conv.bias, scale,
                                           shift, True, groups)
    fused = F.conv_transpose2d(x, weight, bias, stride=2, groups=groups)
    torch.testing.assert_close(fused, bn(conv(x)), rtol=1e-12, atol=1e-12)


def test_torch_fusion_is_wrong_for_grouped_transposed_conv():
    """torch.nn.utils.fusion scales the wrong weight axis when groups > 1:
    the reason mmfuse keeps its own output-channel view."""
    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(4, 4, 3, groups=2).double()
    bn = _bn(4)
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    expected = bn(conv(x))
    try:
        weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias,
                                            bn.running_mean, bn.running_var,
                                            bn.eps, bn.weight, bn.bias,
                                            transpose=True)
    except RuntimeError:
        return  # a crash is wrong too
    got = F.conv_transpose2d(x, weight, bias, groups=2)
    assert not torch.allclose(got, expected, atol=1e-6)


def test_torch_fusion_agrees_for_plain_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3).double()
    bn = _bn(6)
    scale, shift = _affine(bn)
    ours = fold_affine_into_output(conv.weight, conv.bias, scale, shift)
    theirs = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean,
                                  bn.running_var, bn.eps, bn.weight, bn.bias)
    torch.testing.assert_close(ours[0], theirs[0].detach())
    torch.testing.assert_close(ours[1], theirs[1].detach())


@pytest.mark.parametrize('groups', [1, 2])
@pytest.mark.parametrize('padding_mode', ['replicate', 'reflect',
                                          'circular'])
def test_fold_into_conv_input(groups, padding_mode):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, 3, padding=1, groups=groups,
                     padding_mode=padding_mode).double()
    bn = _bn(8)
    x = torch.randn(2, 8, 7, 7, dtype=torch.float64)
    scale, shift = _affine(bn)
    weight, bias = fold_affine_into_input(conv.weight, conv.bias, scale,
                                          shift, groups)
    folded = nn.Conv2d(8, 6, 3, padding=1, groups=groups,
                       padding_mode=padding_mode).double()
    folded.weight.data, folded.bias.data = weight, bias
    torch.testing.assert_close(folded(x), conv(bn(x)), rtol=1e-12,
                               atol=1e-12)


def test_fold_into_input_is_wrong_with_zero_padding():
    """Why a norm before a zero-padded conv must stay."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1).double()
    bn = _bn(4)
    scale, shift = _affine(bn)
    weight, bias = fold_affine_into_input(conv.weight, conv.bias, scale,
                                          shift)
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    folded = F.conv2d(x, weight, bias, padding=1)
    expected = conv(bn(x))
    assert not torch.allclose(folded, expected)
    # ... and it is exact away from the border.
    torch.testing.assert_close(folded[..., 1:-1, 1:-1],
                               expected[..., 1:-1, 1:-1])


def test_norm_affine_without_affine_params():
    bn = randomize_norm_stats(nn.BatchNorm1d(5, affine=False).eval())
    scale, shift = norm_affine(bn.running_mean, bn.running_var, bn.eps)
    x = torch.randn(3, 5)
    torch.testing.assert_close((x.double() * scale + shift).float(), bn(x))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match='output channels'):
        fold_affine_into_output(torch.ones(4, 2, 1, 1), None,
                                torch.ones(3), torch.zeros(3))
    with pytest.raises(ValueError, match='input channels'):
        fold_affine_into_input(torch.ones(4, 2, 1, 1), None, torch.ones(3),
                               torch.zeros(3))


@pytest.mark.parametrize('transposed', [False, True])
@pytest.mark.parametrize('channels_last', [False, True])
def test_folded_weight_keeps_the_memory_layout(transposed, channels_last):
    torch.manual_seed(0)
    conv = (nn.ConvTranspose2d if transposed else nn.Conv2d)(8, 6, 3)
    weight = conv.weight.detach()
    if channels_last:
        weight = weight.contiguous(memory_format=torch.channels_last)
    bn = _bn(6 if not transposed else 6)
    scale, shift = _affine(bn)
    new, _ = fold_affine_into_output(weight, None, scale, shift, transposed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert new.is_contiguous(memory_format=fmt)
    if not transposed:
        scale_in, shift_in = _affine(_bn(8))
        new, _ = fold_affine_into_input(weight, None, scale_in, shift_in)
        assert new.is_contiguous(memory_format=fmt)


def test_float64_inputs_are_never_changed():
    """The math works in place on its own float64 copies: a float64 model's
    own tensors (which ``.to(float64)`` would return as they are) must come
    out untouched."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, bias=True).double()
    bn = _bn(6)
    tensors = [conv.weight, conv.bias, bn.running_mean, bn.running_var,
               bn.weight, bn.bias]
    before = [t.detach().clone() for t in tensors]
    scale, shift = _affine(bn)
    fold_affine_into_output(conv.weight, conv.bias, scale, shift)
    for old, new in zip(before, tensors):
        assert torch.equal(old, new)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 16384 float64 elements, so that the weights of the tests
    below span several (whatever the block size in use)."""
    from mmfuse import folding
    monkeypatch.setattr(folding, '_BLOCK_ELEMENTS', 1 << 14)


@pytest.mark.parametrize('transposed', [False, True])
def test_blockwise_product_is_the_float64_product(transposed, small_blocks):
    """A weight larger than one block is scaled block by block on CPU: the
    result must be the float64 product rounded once, bit for bit."""
    from mmfuse import folding
    torch.manual_seed(0)
    groups = 4
    # (out, in / groups, k, k), or (in, out / groups, k, k) transposed.
    weight = torch.randn(256, 96 // groups, 5, 5)
    channels = 96 if transposed else 256
    assert weight.numel() > folding._BLOCK_ELEMENTS
    scale = torch.rand(channels, dtype=torch.float64) + 0.5
    got = folding.scale_output_channels(weight, scale, transposed, groups,
                                        torch.float32)
    # The same through one whole float64 product, output channel by
    # output channel: of a transposed weight, channel g * out / groups + j
    # is [g * in / groups:(g + 1) * in / groups, j].
    expected = weight.double().clone()
    if transposed:
        rows = weight.shape[0] // groups
        per_group = weight.shape[1]
        for channel in range(channels):
            g, j = divmod(channel, per_group)
            expected[g * rows:(g + 1) * rows, j] *= scale[channel]
    else:
        expected *= scale.reshape(-1, 1, 1, 1)
    assert torch.equal(got, expected.float())


@pytest.mark.parametrize('groups', [1, 4])
@pytest.mark.parametrize('in_place', [False, True])
def test_blockwise_fold_into_input_is_the_float64_product(groups, in_place,
                                                          small_blocks):
    """A weight larger than one block takes a norm before it block by
    block: the weight is the float64 product rounded once, bit for bit,
    and the bias the float64 sum rounded once."""
    from mmfuse import folding
    torch.manual_seed(0)
    weight = torch.randn(256, 96 // groups, 5, 5)
    assert weight.numel() > folding._BLOCK_ELEMENTS
    bias = torch.randn(256)
    scale = torch.rand(96, dtype=torch.float64) + 0.5
    shift = torch.randn(96, dtype=torch.float64)

    def per_entry(values):  # input channel of weight[o, c]
        return values.reshape(groups, 1, -1, 1, 1).expand(
            groups, 256 // groups, 96 // groups, 1, 1).reshape(
                256, 96 // groups, 1, 1)

    expected_weight = (weight.double() * per_entry(scale)).float()
    expected_bias = (bias.double() + (weight.double() * per_entry(shift))
                     .sum((1, 2, 3))).float()
    storage = weight.data_ptr()
    got_weight, got_bias = fold_affine_into_input(
        weight, bias, scale, shift, groups, weight if in_place else None)
    assert torch.equal(got_weight, expected_weight)
    torch.testing.assert_close(got_bias, expected_bias, rtol=1e-6, atol=0)
    assert (got_weight.data_ptr() == storage) == in_place
    if not in_place:
        assert not torch.equal(weight, expected_weight)


def test_fold_into_input_of_an_empty_weight_gives_a_zero_bias():
    """A conv that reads no input channels (a weight with no elements)
    adds nothing of a norm's shift: its bias comes out as zeros, not as
    whatever memory the sum started from."""
    for _ in range(3):  # fresh allocations that may reuse dirty memory
        garbage = torch.full((64, ), float('nan'), dtype=torch.float64)
        del garbage
        weight = torch.empty(64, 0, 3, 3)
        new_weight, new_bias = fold_affine_into_input(
            weight, None, torch.ones(0, dtype=torch.float64),
            torch.ones(0, dtype=torch.float64))
        assert new_weight.shape == (64, 0, 3, 3)
        assert torch.equal(new_bias, torch.zeros(64))


@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_scaling_in_place_is_the_float64_product(channels_last, dtype,
                                                 small_blocks):
    """Written into the weight itself, block by block and in any memory
    layout, the result is the float64 product rounded once."""
    from mmfuse import folding
    torch.manual_seed(0)
    weight = torch.randn(300, 20, 5, 5).to(dtype)
    if channels_last:
        weight = weight.contiguous(memory_format=torch.channels_last)
    assert weight.numel() > folding._BLOCK_ELEMENTS
    scale = torch.rand(300, dtype=torch.float64) + 0.5
    expected = (weight.double() * scale.reshape(-1, 1, 1, 1)).to(dtype)
    new = folding.scale_output_channels(weight, scale, dtype=dtype)
    assert torch.equal(new, expected)
    assert new.stride() == weight.stride()
    storage = weight.data_ptr()
    got = folding.scale_output_channels(weight, scale, out=weight)
    assert got is weight and weight.data_ptr() == storage
    assert torch.equal(weight, expected)
    assert weight.is_contiguous(memory_format=torch.channels_last) == \
        channels_last
    with pytest.raises(ValueError, match='cannot write'):
        folding.scale_output_channels(weight, scale, out=weight[1:])


def test_float64_rows_nested_and_larger_than_the_buffer(small_blocks):
    """A row longer than a block grows the kept buffer; a call made from
    inside the work of another works in a buffer of its own, so that
    neither overwrites the other's block."""
    from mmfuse import folding
    torch.manual_seed(0)
    outer = torch.randn(3, 40000)  # a row of more than one block
    inner = torch.randn(4, 5)
    assert outer[0].numel() > folding._BLOCK_ELEMENTS
    inner_out = torch.empty_like(inner)
    outer_out = torch.empty_like(outer)

    def inner_work(rows, start, stop):
        rows.mul_(3.0)

    def outer_work(rows, start, stop):
        folding.in_float64_rows(inner, inner_out, [(0, 4)], inner_work)
        rows.add_(1.0)

    folding.in_float64_rows(outer, outer_out, [(0, 3)], outer_work)
    assert torch.equal(outer_out, (outer.double() + 1.0).float())
    assert torch.equal(inner_out, (inner.double() * 3.0).float())
    assert folding._SCRATCH.buffer.numel() >= outer[0].numel()
    assert not folding._SCRATCH.in_use


def test_scratch_views_are_kept_per_shape_and_bounded():
    """The float64 scratch buffer hands out one view per shape, all on
    its memory, and keeps at most ``_MAX_SCRATCH_VIEWS`` of them."""
    from mmfuse import folding
    first = folding._scratch((2, 3))
    assert folding._scratch((2, 3)) is first
    for rows in range(1, folding._MAX_SCRATCH_VIEWS + 5):
        view = folding._scratch((rows, 1))
        assert view.shape == (rows, 1) and view.dtype == torch.float64
        assert view.data_ptr() == folding._SCRATCH.buffer.data_ptr()
    assert len(folding._SCRATCH.views) <= folding._MAX_SCRATCH_VIEWS


def test_results_stay_on_the_weights_device(small_blocks):
    """A default device set by the caller does not move folded weights."""
    from mmfuse import folding
    weight = torch.randn(256, 24, 5, 5)  # more than one block
    assert weight.numel() > folding._BLOCK_ELEMENTS
    scale = torch.rand(256, dtype=torch.float64)
    torch.set_default_device('meta')
    try:
        new_weight, new_bias = fold_affine_into_output(
            weight, None, scale, scale)
    finally:
        torch.set_default_device(None)
    assert new_weight.device.type == 'cpu' and new_bias.device.type == 'cpu'
    expected = (weight.double() * scale.reshape(-1, 1, 1, 1)).float()
    assert torch.equal(new_weight, expected)


def test_norm_affines_of_many_norms_equal_each_norms_own():
    """Computed together (mixed eps, dtypes, norms without gamma or beta),
    the affine maps are bit for bit those of the norms one by one."""
    from mmfuse.folding import norm_affines
    generator = torch.Generator().manual_seed(4)
    norms = []
    for index in range(12):
        size = 3 + index
        dtype = torch.float16 if index % 4 == 1 else torch.float32

        def draw(low=-1.0, high=1.0):
            return (torch.rand(size, generator=generator) *
                    (high - low) + low).to(dtype)

        norms.append((draw(), draw(0.1, 2.0), 1e-3 if index % 3 else 1e-5,
                      draw() if index % 4 else None,
                      draw() if index % 5 else None))
    together = norm_affines(norms)
    assert len(together) == len(norms)
    for params, (scale, shift) in zip(norms, together):
        alone_scale, alone_shift = norm_affine(*params)
        assert scale.dtype == torch.float64
        assert torch.equal(scale, alone_scale)
        assert torch.equal(shift, alone_shift)
        mean, var, eps, gamma, beta = params
        expected = torch.rsqrt(var.double() + eps)
        if gamma is not None:
            expected = expected * gamma.double()
        assert torch.equal(scale, expected)
