"""The folding math: tensors in, tensors out.

Every fold in mmfuse goes through the functions here.  A normalisation layer
in inference mode is a per-channel affine map ``y = scale * x + shift`` with
``scale = gamma / sqrt(var + eps)`` and ``shift = beta - mean * scale``.  A
norm *after* a convolution is folded into the convolution's output channels;
a norm *before* a convolution is folded into its input channels, which is
exact only where the convolution does not pad with zeros (the caller checks).

All arithmetic is done in float64 on the parameters' device and the results
are cast back to the dtype of the weight, so fp16/bf16 models are folded as
accurately as their dtype allows.
"""
import threading
from typing import (Any, Callable, Dict, List, Optional, Sequence,
                    Tuple, Union)

import torch
from torch import Tensor

__all__ = [
    'NormParams', 'norm_affine', 'norm_affines', 'fold_affine_into_output',
    'fold_affine_into_input', 'fold_affine_into_bias', 'in_float64_rows',
    'scale_output_channels', 'dense_format'
]


#: float64 elements per block of output channels in
#: :func:`scale_output_channels` (2 MiB: fastest on a 2-core EPYC, 15 %
#: ahead of 1 MiB, where the copies in and out cost more per block).
_BLOCK_ELEMENTS = 1 << 18

#: Views of the scratch buffer kept per shape, at most.
_MAX_SCRATCH_VIEWS = 256

_SCRATCH = threading.local()


def _scratch(shape: Tuple[int, ...]) -> Tensor:
    """A float64 CPU tensor shaped ``shape`` in a buffer kept for the next
    call of this thread: fresh memory costs a page fault per page on first
    use.  The view for each shape is kept too (making one is two tensor
    operations, as long as a small fold's products)."""
    views = getattr(_SCRATCH, 'views', None)
    view = None if views is None else views.get(shape)
    if view is not None:
        return view
    elements = 1
    for size in shape:
        elements *= size
    buffer = getattr(_SCRATCH, 'buffer', None)
    # Normal tensors even when made under ``torch.inference_mode``: an
    # inference tensor could not be written outside it later.
    with torch.inference_mode(False):
        if buffer is None or buffer.numel() < elements:
            buffer = torch.empty(max(elements, _BLOCK_ELEMENTS),
                                 dtype=torch.float64,
                                 device='cpu')
            _SCRATCH.buffer = buffer
            views = None
        if views is None or len(views) >= _MAX_SCRATCH_VIEWS:
            views = _SCRATCH.views = {}
        view = views[shape] = buffer[:elements].view(shape)
    return view


def _float64(tensor: Tensor) -> Tensor:
    """Return ``tensor`` as float64 on its own device (maybe itself)."""
    tensor = tensor.detach()
    return tensor if tensor.dtype == torch.float64 else \
        tensor.to(dtype=torch.float64)


def _float64_copy(tensor: Tensor) -> Tensor:
    """A new float64 tensor with the values of ``tensor``, free to change
    in place (never the model's own tensor, even when that is float64)."""
    return tensor.detach().to(dtype=torch.float64, copy=True)


#: ``(running_mean, running_var, eps, weight, bias)`` of one norm.
NormParams = Tuple[Tensor, Tensor, float, Optional[Tensor], Optional[Tensor]]


def norm_affine(running_mean: Tensor,
                running_var: Tensor,
                eps: float,
                weight: Optional[Tensor] = None,
                bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Per-channel ``(scale, shift)`` of a norm in inference mode, float64.

    Args:
        running_mean: Running mean, shape ``(C,)``.
        running_var: Running variance, shape ``(C,)``.
        eps: The norm's epsilon.
        weight: ``gamma``; ``None`` for a norm without affine parameters.
        bias: ``beta``; ``None`` for a norm without affine parameters.

    Returns:
        ``(scale, shift)`` in float64 such that ``norm(x) == scale * x +
        shift`` channel-wise.
    """
    return norm_affines([(running_mean, running_var, eps, weight, bias)])[0]


def norm_affines(norms: Sequence[NormParams]) -> List[Tuple[Tensor, Tensor]]:
    """:func:`norm_affine` of many norms, computed together: the same
    float64 values, with a few tensor operations for all the norms of a
    device instead of a few for each (most norms are small).

    Args:
        norms: ``(running_mean, running_var, eps, weight, bias)`` of each
            norm.

    Returns:
        ``(scale, shift)`` of each norm, in order.
    """
    by_device: Dict[torch.device, List[int]] = {}
    for index, (mean, var, _, _, _) in enumerate(norms):
        if mean.shape != var.shape or mean.dim() != 1:
            raise ValueError('running_mean and running_var must be 1-D '
                             f'tensors of one shape, got {tuple(mean.shape)} '
                             f'and {tuple(var.shape)}')
        by_device.setdefault(var.device, []).append(index)
    affines: List[Tuple[Tensor, Tensor]] = []
    with torch.no_grad():
        for device, indices in by_device.items():
            group = [norms[i] for i in indices]
            scale, shift = _joined_affine(group, device)
            sizes = [params[1].numel() for params in group]
            affines.extend(
                zip(indices, scale.split(sizes), shift.split(sizes)))
    affines.sort(key=lambda entry: entry[0])
    return [(scale, shift) for _, scale, shift in affines]


def _joined_affine(group: Sequence[NormParams],
                   device: torch.device) -> Tuple[Tensor, Tensor]:
    """``(scale, shift)`` of the norms of ``group``, one after the other."""
    sizes = [params[1].numel() for params in group]

    def joined(position: int, missing: float) -> Optional[Tensor]:
        """A new float64 tensor of every norm's entry ``position``
        (``missing`` where a norm has none); ``None`` if none has."""
        parts = [params[position] for params in group]
        if all(part is None for part in parts):
            return None
        if len(parts) == 1:  # one norm: a float64 copy is enough
            return parts[0].detach().to(torch.float64, copy=True)
        if any(part is None for part in parts):
            parts = [
                torch.full((size, ), missing, dtype=torch.float64,
                           device=device) if part is None else part
                for part, size in zip(parts, sizes)
            ]
        return torch.cat(parts).to(torch.float64)

    epsilons = {params[2] for params in group}
    if len(epsilons) == 1:
        eps: Union[float, Tensor] = epsilons.pop()
    else:
        eps = torch.tensor([params[2] for params in group],
                           dtype=torch.float64,
                           device=device).repeat_interleave(
                               torch.tensor(sizes, device=device))
    scale = joined(1, 1.0).add_(eps).rsqrt_()
    gamma = joined(3, 1.0)
    if gamma is not None:
        scale.mul_(gamma)
    # shift = beta - mean * scale
    shift = torch.mul(joined(0, 0.0), scale).neg_()
    beta = joined(4, 0.0)
    if beta is not None:
        shift.add_(beta)
    return scale, shift


def dense_format(tensor: Tensor) -> Optional[torch.memory_format]:
    """The memory format in which ``tensor`` is laid out densely
    (contiguous, or channels last for 4-D and 5-D tensors), or ``None``
    for a strided view (whose elements may also share memory)."""
    if tensor.is_contiguous():
        return torch.contiguous_format
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(
        tensor.dim())
    if fmt is not None and tensor.is_contiguous(memory_format=fmt):
        return fmt
    return None


def _same_layout(new: Tensor, like: Tensor) -> Tensor:
    """``new`` laid out in memory like ``like`` (contiguous or channels
    last): a strided weight would slow every convolution after the fold."""
    return new.contiguous(
        memory_format=dense_format(like) or torch.contiguous_format)


def _row_factors(scale64: Tensor, weight: Tensor, transposed: bool,
                 groups: int) -> Tuple[List[Tuple[int, int]], Any]:
    """How output channel scales broadcast over rows (dim 0) of a weight.

    A regular conv or linear weight is ``(out, in / groups, *kernel)``: row
    ``o`` is output channel ``o``.  A transposed conv weight is ``(in, out /
    groups, *kernel)``: output channel ``g * out / groups + j`` lives at
    ``[g * in / groups:(g + 1) * in / groups, j]``, which is why
    ``torch.nn.utils.fusion`` gets grouped transposed convs wrong.

    Returns:
        ``(segments, factor)``: ranges of rows, and ``factor(start, stop)``,
        the float64 factor that broadcasts over ``weight[start:stop]`` for
        rows within one segment.
    """
    tail = (1, ) * (weight.dim() - 2)
    rows = weight.shape[0]
    if not transposed:
        per_row = scale64.reshape((-1, 1) + tail)
        return [(0, rows)], lambda start, stop: per_row \
            if stop - start == rows else per_row[start:stop]
    rows_per_group = rows // groups
    per_group = scale64.reshape((groups, 1, -1) + tail)
    return ([(g * rows_per_group, (g + 1) * rows_per_group)
             for g in range(groups)],
            lambda start, stop: per_group[start // rows_per_group])


def in_float64_rows(weight: Tensor,
                    out: Tensor,
                    segments: Sequence[Tuple[int, int]],
                    work: Callable[[Tensor, int, int], None],
                    block_scale: int = 1) -> None:
    """Run ``work`` on the float64 values of ``weight``, a block of rows
    at a time, and write the changed rows into ``out`` in its dtype.

    On CPU a float32/float16/bfloat16 weight goes through a float64 block
    of rows at a time, in a buffer kept for every block and every call,
    which stays in cache: a mixed-dtype multiply takes about four times as
    long, and a float64 copy of the whole weight twice as long.  A float64
    ``out`` takes the work where it lies (after a copy of ``weight``
    unless it is ``weight``; on CPU, a contiguous one apart from
    ``weight`` takes each block of rows so, in place of the buffer);
    elsewhere the work is done on one float64 copy.  ``work`` may call
    this function again (a nested call works in a buffer of its own).

    Args:
        weight: A tensor whose rows (dim 0) are worked on; not changed
            unless it is ``out``.
        out: Shaped like ``weight``; may be ``weight`` itself (each block
            is read before it is written).
        segments: ``(first, last)`` ranges of rows; a block never spans
            two (see ``_row_factors``).
        work: ``work(rows, start, stop)`` changes ``rows``, the float64
            values of rows ``start:stop``, in place.
        block_scale: Blocks of this many times the usual elements (for a
            ``work`` whose cost per block outweighs a block's size).
    """
    if weight.dtype == out.dtype == torch.float64:
        if out.data_ptr() != weight.data_ptr():
            out.copy_(weight)
        for first, last in segments:
            work(out[first:last], first, last)
        return
    if weight.device.type != 'cpu' or weight.dtype == torch.float64:
        rows64 = _float64_copy(weight)
        for first, last in segments:
            work(rows64[first:last], first, last)
        out.copy_(rows64)
        return
    rows = weight.shape[0]
    if not weight.numel():
        return
    step = max(1, _BLOCK_ELEMENTS * block_scale * rows // weight.numel())
    if out.dtype == torch.float64 and out.device.type == 'cpu' and \
            out.is_contiguous() and out.untyped_storage().data_ptr() != \
            weight.untyped_storage().data_ptr():
        # A float64 ``out`` laid out as the buffer is: each block is
        # worked on where it is written, as it would be in the buffer.
        for first, last in segments:
            for start in range(first, last, step):
                stop = min(start + step, last)
                if stop - start == rows:  # one block: no slices
                    part = out.copy_(weight)
                else:
                    part = out[start:stop].copy_(weight[start:stop])
                work(part, start, stop)
        return
    shape = tuple(weight.shape) if step >= rows else \
        (step, ) + tuple(weight.shape[1:])
    nested = getattr(_SCRATCH, 'in_use', False)
    block = torch.empty(shape, dtype=torch.float64) if nested else \
        _scratch(shape)
    _SCRATCH.in_use = True
    try:
        if step >= rows:  # one block: no slices (most layers)
            block.copy_(weight)
            for first, last in segments:
                work(block if last - first == rows else block[first:last],
                     first, last)
            out.copy_(block)
            return
        for first, last in segments:
            for start in range(first, last, step):
                stop = min(start + step, last)
                part = block if stop - start == len(block) else \
                    block[:stop - start]
                part.copy_(weight[start:stop])
                work(part, start, stop)
                out[start:stop].copy_(part)
    finally:
        _SCRATCH.in_use = nested


def _check_out(weight: Tensor, out: Optional[Tensor]) -> None:
    """``out`` must be shaped like ``weight``, and be ``weight`` itself or
    not overlap it."""
    if out is not None and out.shape != weight.shape:
        raise ValueError(f'cannot write a weight of shape '
                         f'{tuple(weight.shape)} into {tuple(out.shape)}')
    if out is not None and out.data_ptr() == weight.data_ptr() and \
            out.stride() != weight.stride():
        raise ValueError('out must be the weight itself or not overlap it')


def scale_output_channels(weight: Tensor,
                          scale: Tensor,
                          transposed: bool = False,
                          groups: int = 1,
                          dtype: Optional[torch.dtype] = None,
                          out: Optional[Tensor] = None) -> Tensor:
    """Multiply output channel ``o`` of ``weight`` by ``scale[o]``.

    The products are computed in float64 and rounded once to ``dtype``,
    a block of rows at a time on CPU.  The scales broadcast over the weight
    as it lies (no permuted copy, also for transposed convs).

    Args:
        weight: A conv, transposed conv or linear weight.
        scale: Shape ``(out_channels,)``.
        transposed: Whether ``weight`` belongs to a transposed conv.
        groups: The conv's groups.
        dtype: The result's dtype; float64 by default.  Ignored with
            ``out``.
        out: Where to write the result, shaped like ``weight``; may be
            ``weight`` itself, but no other view of its memory.  By default
            a new tensor laid out like ``weight``.

    Returns:
        The scaled weight, same shape as ``weight`` (``out`` if given).
    """
    weight = weight.detach()
    channels = weight.shape[1] * groups if transposed else weight.shape[0]
    if channels != scale.numel() or (transposed
                                     and weight.shape[0] % groups):
        raise ValueError(f'cannot scale {channels} output channels by '
                         f'{scale.numel()} norm channels')
    _check_out(weight, out)
    segments, factor = _row_factors(_float64(scale), weight, transposed,
                                    groups)
    if out is None:
        out = torch.empty_like(weight, dtype=dtype or torch.float64)
    in_float64_rows(weight, out, segments,
                    lambda rows, start, stop: rows.mul_(factor(start, stop)))
    return out


def fold_affine_into_bias(bias: Optional[Tensor], scale: Tensor,
                          shift: Optional[Tensor]) -> Tensor:
    """The bias of ``scale * layer(x) + shift``.

    Args:
        bias: The layer's bias, or ``None`` for none.
        scale: Per-output-channel scale, shape ``(out_channels,)``.
        shift: Per-output-channel shift, or ``None`` for none.

    Returns:
        ``bias * scale + shift`` in float64: maybe ``shift`` itself, or a
        view of it (copy it before changing it).
    """
    if bias is None:
        return torch.zeros_like(_float64(scale)) if shift is None else \
            _float64(shift)
    # The product of a bias and the float64 scale is float64.
    new_bias = torch.mul(bias.detach(), _float64(scale))
    if shift is not None:
        new_bias.add_(shift)
    return new_bias


def fold_affine_into_output(weight: Tensor,
                            bias: Optional[Tensor],
                            scale: Tensor,
                            shift: Optional[Tensor],
                            transposed: bool = False,
                            groups: int = 1,
                            weight_out: Optional[Tensor] = None
                            ) -> Tuple[Tensor, Tensor]:
    """Fold ``y = scale * layer(x) + shift`` into the layer's parameters.

    Args:
        weight: Weight of a conv, transposed conv or linear layer.
        bias: Its bias, or ``None``.
        scale: Per-output-channel scale, shape ``(out_channels,)``.
        shift: Per-output-channel shift, or ``None`` for no shift (used for
            all but one branch of a normalised sum).
        transposed: Whether the layer is a transposed conv.
        groups: The layer's groups.
        weight_out: Where to write the new weight (``weight`` itself to
            fold in place); a new tensor by default.

    Returns:
        ``(weight, bias)`` cast back to ``weight``'s dtype and device.
    """
    new_weight = scale_output_channels(weight, scale, transposed, groups,
                                       weight.dtype, weight_out)
    new_bias = fold_affine_into_bias(bias, scale, shift)
    if weight_out is None:
        new_weight = _same_layout(new_weight, weight)
    # A copy even where the dtype is the same: the bias must not share
    # memory with ``shift`` (a slice of one norm's shift, for a concat).
    return new_weight, new_bias.to(weight.dtype, copy=True)


def fold_affine_into_input(weight: Tensor,
                           bias: Optional[Tensor],
                           scale: Tensor,
                           shift: Tensor,
                           groups: int = 1,
                           weight_out: Optional[Tensor] = None
                           ) -> Tuple[Tensor, Tensor]:
    """Fold ``layer(scale * x + shift)`` into a conv or linear layer.

    Exact only when the layer sees no zero padding: a padded zero of the
    normalised input is not ``scale * 0 + shift``.  The caller checks that.

    Args:
        weight: ``(out, in / groups, *kernel)`` weight of a non-transposed
            conv, or ``(out, in)`` of a linear layer.
        bias: Its bias, or ``None``.
        scale: Per-input-channel scale, shape ``(in_channels,)``.
        shift: Per-input-channel shift, shape ``(in_channels,)``.
        groups: The conv's groups.
        weight_out: Where to write the new weight (``weight`` itself to
            fold in place); a new tensor laid out like ``weight`` by
            default.

    Returns:
        ``(weight, bias)`` cast back to ``weight``'s dtype and device.
    """
    weight = weight.detach()
    out_channels, in_per_group = weight.shape[:2]
    if scale.numel() != in_per_group * groups:
        raise ValueError(f'cannot fold {scale.numel()} norm channels into '
                         f'{in_per_group * groups} input channels')
    _check_out(weight, weight_out)
    scale64, shift64 = _float64(scale), _float64(shift)
    if groups == 1:
        # Every row meets every input channel.
        scales, shifts = scale64, shift64
    else:
        # The input channel of weight[o, c] is (o // out_per_group) *
        # in_per_group + c: the values per weight entry, (out, in / groups).
        def per_entry(values: Tensor) -> Tensor:
            return values.reshape(groups, 1, in_per_group).expand(
                groups, out_channels // groups,
                in_per_group).reshape(out_channels, in_per_group)

        scales, shifts = per_entry(scale64), per_entry(shift64)
    tail = (1, ) * (weight.dim() - 2)
    # added[o] = sum over c and the kernel of weight[o, c, ...] * shift[c]
    added = torch.zeros(out_channels, dtype=torch.float64,
                        device=weight.device)

    def fold(rows: Tensor, start: int, stop: int) -> None:
        row_scales = scales if groups == 1 else scales[start:stop]
        row_shifts = shifts if groups == 1 else shifts[start:stop]
        sums = rows.reshape(stop - start, in_per_group, -1).sum(2)
        torch.sum(sums.mul_(row_shifts), 1, out=added[start:stop])
        rows.mul_(row_scales.reshape(row_scales.shape + tail))

    new_weight = torch.empty_like(weight) if weight_out is None else \
        weight_out
    in_float64_rows(weight, new_weight, [(0, out_channels)], fold)
    new_bias = added if bias is None else added.add_(bias.detach())
    if weight_out is None:
        new_weight = _same_layout(new_weight, weight)
    return new_weight, new_bias.to(weight.dtype)
