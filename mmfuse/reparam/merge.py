"""The branch merge math: geometry and tensors in, geometry and tensors out.

A multi-branch block sums branches that all read one input.  Each branch is a
convolution, an average pool or the identity, followed by per-channel affine
maps (folded norms, learnable scalars).  The sum is one convolution when the
branches agree on stride and groups and their kernels line up: a smaller
kernel is zero-padded to the largest and centred, which is exact when its
padding is the largest kernel's padding minus half the size difference
(times the dilation).  An identity is a 1x1 kernel with a single one per
output channel, an average pool a kernel of ``1 / (kh * kw)`` on the same
diagonal.

Nothing here knows about modules: this file only checks geometry and builds
kernels.  Folding a norm into a kernel goes through :mod:`mmfuse.folding`.
All tensors are built in float64; :func:`mmfuse.reparam.branches.merge_terms`
sums them, a block of output channels at a time.
"""
from dataclasses import dataclass, fields
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = [
    'MergeError', 'ConvGeometry', 'BranchGeometry', 'merge_geometry',
    'centre_kernel', 'centre_slices', 'identity_kernel', 'avg_pool_kernel',
    'pool_value', 'add_to_diagonal', 'compose_affine'
]

Pair = Tuple[int, int]


class MergeError(ValueError):
    """Branches that cannot be merged into one convolution, and why."""


@dataclass(frozen=True)
class ConvGeometry:
    """Everything that defines a plain ``nn.Conv2d`` except its values.

    The merged convolution always has a bias.
    """
    in_channels: int
    out_channels: int
    kernel_size: Pair
    stride: Pair
    padding: Pair
    dilation: Pair
    groups: int
    padding_mode: str = 'zeros'

    def to_dict(self) -> Dict:
        """A JSON-serialisable dict (tuples become lists)."""
        # Fields one by one: ``dataclasses.asdict`` deep-copies each value
        # (ints, pairs and a string here), several times slower.
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in ('kernel_size', 'stride', 'padding', 'dilation'):
            data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: Dict) -> 'ConvGeometry':
        """Inverse of :meth:`to_dict`."""
        values = dict(data)
        for key in ('kernel_size', 'stride', 'padding', 'dilation'):
            values[key] = tuple(int(v) for v in values[key])
        return cls(**values)


@dataclass(frozen=True)
class BranchGeometry:
    """The spatial operation of one branch.

    Attributes:
        kind: ``'conv'``, ``'pool'`` (an average pool) or ``'identity'``.
        kernel_size: Kernel size; ``(1, 1)`` for the identity.
        stride: Stride.
        padding: Zero (or ``padding_mode``) padding on each side.
        dilation: Dilation; ``(1, 1)`` for a pool or the identity.
        groups: The conv's groups; ``None`` for a pool or the identity,
            which are written for whatever groups the merged conv has.
        in_channels: Input channels, when known.
        out_channels: Output channels, when known.
        padding_mode: How the conv pads; pools pad with zeros.
    """
    kind: str
    kernel_size: Pair
    stride: Pair
    padding: Pair
    dilation: Pair = (1, 1)
    groups: Optional[int] = None
    in_channels: Optional[int] = None
    out_channels: Optional[int] = None
    padding_mode: str = 'zeros'


def _single(values: Sequence, what: str):
    """The one distinct non-None value of ``values``, or ``None``."""
    distinct = sorted({v for v in values if v is not None})
    if len(distinct) > 1:
        raise MergeError(f'branches differ in {what}: '
                         f'{", ".join(str(v) for v in distinct)}')
    return distinct[0] if distinct else None


def merge_geometry(branches: Sequence[BranchGeometry]) -> ConvGeometry:
    """The convolution a sum of ``branches`` becomes.

    Args:
        branches: The spatial operation of every branch.

    Returns:
        The merged geometry.

    Raises:
        MergeError: When the branches cannot be one convolution, with the
            reason.
    """
    if not branches:
        raise MergeError('no branches')
    stride = _single([b.stride for b in branches], 'stride')
    groups = _single([b.groups for b in branches], 'groups')
    channel_free = [b for b in branches if b.kind != 'conv']
    in_channels = _single([b.in_channels for b in branches], 'in channels')
    out_channels = _single([b.out_channels for b in branches],
                           'out channels')
    if channel_free:
        in_channels = _single([in_channels, out_channels],
                              'channels (an identity or pool branch needs '
                              'as many output channels as input channels)')
        out_channels = in_channels
    if in_channels is None or out_channels is None:
        raise MergeError('channel count unknown')
    if groups is None:
        groups = in_channels  # depthwise: cheapest for identity and pools
    if in_channels % groups or out_channels % groups:
        raise MergeError(f'{in_channels} -> {out_channels} channels do not '
                         f'split into {groups} groups')
    kernel, padding, dilation = [], [], []
    for dim in range(2):
        size = max(b.kernel_size[dim] for b in branches)
        spread = {b.dilation[dim] for b in branches
                  if b.kernel_size[dim] > 1}
        if len(spread) > 1:
            raise MergeError('branches with kernels larger than 1 differ '
                             f'in dilation: {sorted(spread)}')
        step = spread.pop() if spread else 1
        pads = set()
        for branch in branches:
            extra = size - branch.kernel_size[dim]
            if extra % 2:
                raise MergeError(f'a {branch.kernel_size[dim]}-wide kernel '
                                 f'cannot be centred in a {size}-wide one')
            pads.add(branch.padding[dim] + extra // 2 * step)
        if len(pads) > 1:
            raise MergeError('paddings do not line the kernels up on one '
                             f'centre (they imply {sorted(pads)})')
        kernel.append(size)
        padding.append(pads.pop())
        dilation.append(step)
    modes = {b.padding_mode for b in branches if any(b.padding)}
    if len(modes) > 1:
        raise MergeError(f'branches pad differently: {sorted(modes)}')
    mode = modes.pop() if modes else 'zeros'
    return ConvGeometry(in_channels, out_channels, tuple(kernel),
                        tuple(stride), tuple(padding), tuple(dilation),
                        groups, mode)


def centre_slices(size: Sequence[int],
                  kernel_size: Pair) -> Tuple[slice, slice]:
    """Where a ``size`` kernel lies centred in a ``kernel_size`` one."""
    height, width = size
    extra_h, extra_w = kernel_size[0] - height, kernel_size[1] - width
    if extra_h < 0 or extra_w < 0 or extra_h % 2 or extra_w % 2:
        raise MergeError(f'a {height}x{width} kernel cannot be centred in '
                         f'{kernel_size[0]}x{kernel_size[1]}')
    top, left = extra_h // 2, extra_w // 2
    return slice(top, top + height), slice(left, left + width)


def centre_kernel(weight: Tensor, kernel_size: Pair) -> Tensor:
    """Zero-pad a ``(out, in / groups, kh, kw)`` kernel to ``kernel_size``,
    centred.

    Args:
        weight: The kernel.
        kernel_size: The target size; each dimension is at least the
            kernel's and differs from it by an even number.

    Returns:
        The padded kernel, same dtype (``weight`` itself if it has that
        size already).
    """
    rows, columns = centre_slices(weight.shape[-2:], kernel_size)
    if tuple(weight.shape[-2:]) == tuple(kernel_size):
        return weight
    padded = weight.new_zeros(*weight.shape[:-2], *kernel_size)
    padded[..., rows, columns] = weight
    return padded


def _diagonal(channels: int, groups: int, window: Pair, value: float,
              device: Optional[torch.device]) -> Tensor:
    """``value`` at ``[c, c % (channels / groups)]`` over a window (where
    :func:`add_to_diagonal` writes)."""
    per_group = channels // groups
    weight = torch.zeros(channels, per_group, *window, dtype=torch.float64,
                         device=device)
    add_to_diagonal(
        weight,
        torch.full((channels, ), value, dtype=torch.float64, device=device),
        0, per_group)
    return weight


def identity_kernel(channels: int,
                    groups: int,
                    kernel_size: Pair,
                    device: Optional[torch.device] = None) -> Tensor:
    """The identity as a ``kernel_size`` conv kernel with ``groups``, float64.
    """
    weight = _diagonal(channels, groups, (1, 1), 1.0, device)
    return centre_kernel(weight, kernel_size)


def avg_pool_kernel(channels: int,
                    groups: int,
                    pool_size: Pair,
                    kernel_size: Pair,
                    device: Optional[torch.device] = None) -> Tensor:
    """An average pool (zeros counted in the mean) as a conv kernel, float64.

    Args:
        channels: Channels pooled (input = output).
        groups: Groups of the conv the kernel is written for.
        pool_size: The pool's window.
        kernel_size: The conv's kernel size, at least ``pool_size``.
    """
    weight = _diagonal(channels, groups, pool_size, pool_value(pool_size),
                       device)
    return centre_kernel(weight, kernel_size)


def pool_value(pool_size: Pair) -> float:
    """The value on the diagonal of :func:`avg_pool_kernel`."""
    return 1.0 / (pool_size[0] * pool_size[1])


def add_to_diagonal(window: Tensor, values: Tensor, first_row: int,
                    per_group: int) -> None:
    """Add ``values[i]`` to ``window[i, (first_row + i) % per_group]``, in
    place: where :func:`identity_kernel` and :func:`avg_pool_kernel` are
    not zero, for rows ``first_row`` on of a kernel with ``per_group``
    input channels per group.

    Args:
        window: ``(rows, per_group, kh, kw)``: the rows of a kernel, or the
            part of them where the identity or pool lies (a view).
        values: ``(rows,)``, added at every position of the window.
        first_row: The output channel of ``window[0]``.
        per_group: Input channels per group.
    """
    rows = window.shape[0]
    if per_group == 1:  # depthwise: the first column
        window[:, 0].add_(values.reshape(-1, 1, 1))
        return
    column = first_row % per_group
    if column + rows <= per_group:  # within a group (every row, groups=1)
        window.diagonal(column, 0, 1).add_(values)
        return
    row = 0
    while row < rows:
        column = (first_row + row) % per_group
        if column == 0 and rows - row >= per_group:
            # Whole groups: the diagonal of each ``(per_group,
            # per_group)`` block.
            stop = row + (rows - row) // per_group * per_group
            blocks = window[row:stop].unflatten(0, (-1, per_group))
            blocks.diagonal(dim1=1, dim2=2).add_(values[row:stop].reshape(
                -1, 1, 1, per_group))
        else:  # part of a group: a diagonal from ``column``
            stop = row + min(per_group - column, rows - row)
            window[row:stop].diagonal(column, 0, 1).add_(values[row:stop])
        row = stop


def compose_affine(first: Tuple[Tensor, Tensor],
                   then: Tuple[Tensor, Tensor]) -> Tuple[Tensor, Tensor]:
    """``then(first(x))`` of two per-channel maps ``x -> scale * x + shift``.

    Args:
        first: ``(scale, shift)`` applied first.
        then: ``(scale, shift)`` applied to its result.

    Returns:
        ``(scale, shift)`` of the composition, float64.
    """
    scale1, shift1 = (t.to(torch.float64) for t in first)
    scale2, shift2 = (t.to(torch.float64) for t in then)
    return scale1 * scale2, shift1 * scale2 + shift2
