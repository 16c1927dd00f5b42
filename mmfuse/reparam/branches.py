"""Branches as data: what a multi-branch sum is made of, and its one conv.

Both the generic merge (which proves a block's data flow with torch.fx) and
the registry entries (which know their block's class) describe a sum of
branches the same way: a list of :class:`Term`, each the operations one
branch applies to the block's input, in order.  :func:`merge_terms` checks
every layer with the same rules as the core folding
(:func:`~mmfuse.layers.norm_fold_problem`,
:func:`~mmfuse.layers.conv_fold_problem`) and turns the terms into one
``nn.Conv2d`` with the math of :mod:`mmfuse.reparam.merge` and
:mod:`mmfuse.folding`.
"""
import copy
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import (Dict, List, NamedTuple, Optional, Sequence, Tuple,
                    Union)

import torch
from torch import Tensor, nn

from ..folding import (fold_affine_into_bias, in_float64_rows, norm_affines,
                       scale_output_channels)
from ..layers import (conv_fold_problem, norm_affine_params, norm_channels,
                      norm_fold_problem)
from .merge import (BranchGeometry, ConvGeometry, MergeError,
                    add_to_diagonal, avg_pool_kernel, centre_slices,
                    compose_affine, identity_kernel, merge_geometry,
                    pool_value)

__all__ = ['Op', 'Term', 'conv_op', 'norm_op', 'pool_op', 'scale_op',
           'merge_terms', 'describe_term', 'build_conv', 'norm_ops']

CONV, POOL, NORM, SCALE = 'conv', 'pool', 'norm', 'scale'


@dataclass
class Op:
    """One operation of a branch.

    Attributes:
        kind: ``'conv'``, ``'pool'`` (average pool), ``'norm'`` (a foldable
            norm) or ``'scale'`` (multiplication by a constant).
        module: The layer, for conv, pool and norm.
        value: The factor of a scale: a number or a tensor with one element
            or one per channel (shape ``(C, 1, 1)`` or ``(1, C, 1, 1)``).
        label: How the operation reads in a report (e.g. ``'alpha'``).
        shift: For a norm over a sum of branches: whether this branch takes
            the norm's shift (exactly one does).
    """
    kind: str
    module: Optional[nn.Module] = None
    value: Union[float, Tensor, None] = None
    label: str = ''
    shift: bool = True


@dataclass
class Term:
    """One branch: the operations applied to the common input, in order."""
    ops: List[Op] = field(default_factory=list)

    def then(self, *ops: Op) -> 'Term':
        """A new term with ``ops`` appended."""
        return Term(self.ops + list(ops))


def conv_op(module: nn.Module) -> Op:
    return Op(CONV, module)


def norm_op(module: nn.Module) -> Op:
    return Op(NORM, module)


def pool_op(module: nn.Module) -> Op:
    return Op(POOL, module)


def scale_op(value: Union[float, Tensor], label: str = '') -> Op:
    return Op(SCALE, value=value, label=label)


def _pair(value) -> Tuple[int, int]:
    if type(value) is tuple and len(value) == 2 and \
            type(value[0]) is int and type(value[1]) is int:
        return value  # (a conv's sizes, mostly)
    if isinstance(value, int):
        return value, value
    values = tuple(int(v) for v in value)
    if len(values) == 1:
        return values[0], values[0]
    if len(values) != 2:
        raise MergeError(f'not a 2-d size: {value}')
    return values


def _conv_problem(conv: nn.Module) -> Optional[str]:
    problem = conv_fold_problem(conv)
    if problem:
        return problem
    if not isinstance(conv, nn.Conv2d):
        return f'{type(conv).__name__} is not a 2-d convolution'
    if 'AdaptivePadding' in type(conv).__name__:
        return f'{type(conv).__name__} pads by its input size'
    return None


def _conv_padding(conv: nn.Conv2d) -> Tuple[int, int]:
    padding = conv.padding
    if padding == 'valid':
        return 0, 0
    if padding == 'same':
        pads = []
        for size, step in zip(_pair(conv.kernel_size), _pair(conv.dilation)):
            total = step * (size - 1)
            if total % 2:
                raise MergeError(f'{type(conv).__name__} pads "same" '
                                 'unevenly')
            pads.append(total // 2)
        return tuple(pads)
    return _pair(padding)


def _pool_problem(pool: nn.Module) -> Optional[str]:
    name = type(pool).__name__
    if not isinstance(pool, nn.AvgPool2d) or \
            type(pool).forward is not nn.AvgPool2d.forward:
        return f'{name} is not a plain nn.AvgPool2d'
    if pool._forward_hooks or pool._forward_pre_hooks:
        return f'{name} has forward hooks'
    if pool.ceil_mode:
        return f'{name} rounds its output size up (ceil_mode)'
    if pool.divisor_override is not None:
        return f'{name} overrides its divisor'
    if any(_pair(pool.padding)) and not pool.count_include_pad:
        return f'{name} leaves padded zeros out of the mean'
    return None


def _scale_tensor(value: Union[float, Tensor],
                  channels: int) -> Tuple[Optional[Tensor], str]:
    """A ``(channels,)`` float64 factor, or ``None`` and the reason."""
    if not isinstance(value, Tensor):
        return torch.full((channels, ), float(value),
                          dtype=torch.float64), ''
    flat = value.detach().to(torch.float64)
    shape = tuple(value.shape)
    if value.dim() > 3:
        # ``(1, C, 1, 1)`` broadcasts an unbatched ``(C, H, W)`` output to
        # 4-D, which one conv does not.
        return None, (f'a factor of shape {shape} may add a dimension to '
                      'the output (an unbatched input)')
    if flat.numel() == 1:
        return flat.reshape(1).expand(channels).clone(), ''
    if shape == (channels, 1, 1):
        return flat.reshape(channels), ''
    return None, f'a factor of shape {shape} is not per channel'


def _split(term: Term) -> Tuple[List[Op], Optional[Op], List[Op]]:
    """``(scales before, spatial op, ops after)`` of a term."""
    spatial = [i for i, op in enumerate(term.ops) if op.kind in (CONV, POOL)]
    if len(spatial) > 1:
        raise MergeError('a branch applies two convolutions or pools')
    if not spatial:
        return [], None, list(term.ops)
    index = spatial[0]
    before = term.ops[:index]
    for op in before:
        if op.kind != SCALE:
            raise MergeError('a branch normalises before its convolution')
    return before, term.ops[index], term.ops[index + 1:]


def _branch_geometry(term: Term) -> BranchGeometry:
    before, spatial, after = _split(term)
    for op in before:
        if isinstance(op.value, Tensor) and (op.value.numel() != 1
                                             or op.value.dim() > 3):
            raise MergeError('a per-channel factor before a convolution')
    out_channels = None
    for op in after:
        if op.kind == NORM:
            problem = norm_fold_problem(op.module)
            if problem:
                raise MergeError(problem)
            channels = norm_channels(op.module)
            if out_channels is not None and channels != out_channels:
                raise MergeError(f'{channels} norm channels after '
                                 f'{out_channels}')
            out_channels = channels
    if spatial is None:
        return BranchGeometry('identity', (1, 1), (1, 1), (0, 0),
                              in_channels=out_channels,
                              out_channels=out_channels)
    module = spatial.module
    if spatial.kind == POOL:
        problem = _pool_problem(module)
        if problem:
            raise MergeError(problem)
        kernel = _pair(module.kernel_size)
        stride = _pair(module.stride if module.stride else kernel)
        return BranchGeometry('pool', kernel, stride, _pair(module.padding),
                              in_channels=out_channels,
                              out_channels=out_channels)
    problem = _conv_problem(module)
    if problem:
        raise MergeError(problem)
    if out_channels is not None and out_channels != module.out_channels:
        raise MergeError(f'{module.out_channels} conv channels normalised '
                         f'by a norm of {out_channels}')
    return BranchGeometry('conv', _pair(module.kernel_size),
                          _pair(module.stride), _conv_padding(module),
                          _pair(module.dilation), int(module.groups),
                          int(module.in_channels), int(module.out_channels),
                          module.padding_mode)


def _affine_after(ops: Sequence[Op], channels: int,
                  norms: Dict[int, Tuple[Tensor, Tensor]]
                  ) -> Tuple[Tensor, Tensor]:
    """The per-channel ``(scale, shift)`` of the ops after the spatial op
    (``norms``: the ``norm_affine`` of each norm op, by ``id``)."""
    affine = None
    for op in ops:
        if op.kind == NORM:
            step = norms[id(op)]
            if not op.shift:
                step = (step[0], torch.zeros_like(step[1]))
        else:
            factor, problem = _scale_tensor(op.value, channels)
            if factor is None:
                raise MergeError(problem)
            step = (factor, torch.zeros(channels, dtype=torch.float64))
        step = (step[0].cpu(), step[1].cpu())
        affine = step if affine is None else compose_affine(affine, step)
    if affine is None:
        return (torch.ones(channels, dtype=torch.float64),
                torch.zeros(channels, dtype=torch.float64))
    return affine


def norm_ops(terms: Sequence[Term]) -> List[Op]:
    """The norm ops of ``terms``, in order."""
    return [op for term in terms for op in term.ops if op.kind == NORM]


def _norm_affines(
    terms: Sequence[Term],
    known: Optional[Dict[int, Tuple[Tensor, Tensor]]] = None
) -> Dict[int, Tuple[Tensor, Tensor]]:
    """``norm_affine`` of every norm op of ``terms``, by ``id`` of the op:
    from ``known`` (by ``id`` of the norm module) where it has the norm,
    the others computed together."""
    known = known or {}
    ops = norm_ops(terms)
    missing = [op for op in ops if id(op.module) not in known]
    affines = dict(
        zip(map(id, missing),
            norm_affines([norm_affine_params(op.module)
                          for op in missing]))) if missing else {}
    return {
        id(op): known[id(op.module)]
        if id(op.module) in known else affines[id(op)]
        for op in ops
    }


class _Branch(NamedTuple):
    """One branch of a sum, ready to merge: its output is ``scale * conv(x,
    kernel * factors) + bias`` per output channel."""
    #: The conv's weight as it is, at its own size (centred in the merged
    #: kernel by the sum); ``None`` for an identity or a pool, whose
    #: float64 kernel (:func:`~mmfuse.reparam.merge.identity_kernel`,
    #: :func:`~mmfuse.reparam.merge.avg_pool_kernel`) the sum writes
    #: where it is not zero.
    kernel: Optional[Tensor]
    #: Constants the branch multiplies its input by, before the conv.
    factors: List[Union[float, Tensor]]
    #: Per-output-channel scale after the conv, float64.
    scale: Tensor
    #: The folded bias, float64.
    bias: Tensor
    #: The window of an identity (``(1, 1)``) or pool.
    window: Tuple[int, int] = (1, 1)
    #: The value of an identity or pool kernel on its diagonal.
    value: float = 1.0


def _branch(term: Term, geometry: ConvGeometry, device: torch.device,
            norms: Dict[int, Tuple[Tensor, Tensor]]) -> _Branch:
    """One branch, its norms and scales folded into a per-channel affine
    map (``norms``: the ``norm_affine`` of each norm op, by ``id``)."""
    before, spatial, after = _split(term)
    channels = geometry.out_channels
    kernel: Optional[Tensor] = None
    bias: Optional[Tensor] = None
    window, value = (1, 1), 1.0
    if spatial is not None and spatial.kind == POOL:
        window = _pair(spatial.module.kernel_size)
        value = pool_value(window)
    elif spatial is not None:
        kernel = spatial.module.weight.detach()
        bias = spatial.module.bias
    factors = [
        op.value.detach().to(torch.float64).reshape(())
        if isinstance(op.value, Tensor) else op.value for op in before
    ]
    scale, shift = _affine_after(after, channels, norms)
    scale, shift = scale.to(device), shift.to(device)
    return _Branch(kernel, factors, scale,
                   fold_affine_into_bias(bias, scale, shift), window, value)


def _diagonal_kernel(branch: _Branch, geometry: ConvGeometry) -> Tensor:
    """The float64 kernel of an identity or pool branch, at its window."""
    channels, groups = geometry.out_channels, geometry.groups
    device = branch.scale.device
    if branch.window == (1, 1) and branch.value == 1.0:
        return identity_kernel(channels, groups, (1, 1), device)
    return avg_pool_kernel(channels, groups, branch.window, branch.window,
                           device)


def _rows(tensor: Tensor, start: int, stop: int) -> Tensor:
    """``tensor[start:stop]``, or ``tensor`` itself for all its rows."""
    return tensor if start == 0 and stop == tensor.shape[0] else \
        tensor[start:stop]


def _add_diagonal(rows: Tensor, branch: _Branch, start: int, stop: int,
                  kernel_size: Tuple[int, int], per_group: int) -> bool:
    """Add rows ``start:stop`` of an identity or pool branch's kernel,
    times its scales and factors, to ``rows``, without making the kernel:
    its zeros times them (``+0``, or ``-0`` on a row of negative scale:
    a ``-0`` in ``rows`` becomes ``+0`` where the kernel's product would
    make it so), then its diagonal, each the float64 value the kernel's
    product gives, in the same order of additions.  ``False`` (nothing
    added) where a scale or factor is infinite or NaN: the kernel's zeros
    times it are NaN, which the kernel's product adds off its diagonal
    only."""
    scale = _rows(branch.scale, start, stop)
    zeros = torch.mul(scale, 0.0)
    diagonal = scale if branch.value == 1.0 and not branch.factors else \
        torch.mul(scale, branch.value)
    for factor in branch.factors:
        zeros.mul_(factor)
        diagonal.mul_(factor)
    if zeros.count_nonzero().item():  # (NaN is not zero)
        return False
    rows_at, columns_at = centre_slices(branch.window, kernel_size)
    window = rows[..., rows_at, columns_at]
    window.add_(zeros.reshape(-1, 1, 1, 1))
    add_to_diagonal(window, diagonal, start, per_group)
    return True


def _merged_weight(branches: Sequence[_Branch], geometry: ConvGeometry,
                   dtype: torch.dtype) -> Tensor:
    """The sum of the branches' kernels, each times its factors and
    scales, in float64, rounded once to ``dtype``.

    The sum is made a block of output channels at a time
    (:func:`~mmfuse.folding.in_float64_rows`), starting from the first
    branch's kernel when it has the merged size (from zeros otherwise),
    each branch added in order, its channels scaled by
    :func:`~mmfuse.folding.scale_output_channels` (the one copy of that
    product): no float64 copy of a whole branch is made.  An identity or
    pool branch added is written on its diagonal (:func:`_add_diagonal`).

    Args:
        branches: The branches, their kernels of one ``(out, in /
            groups)``.
        geometry: The merged conv's geometry.
        dtype: The merged kernel's dtype.

    Returns:
        The merged kernel, a new tensor on the branches' device.
    """
    kernel_size = tuple(geometry.kernel_size)
    channels = geometry.out_channels
    heads = sorted({
        (channels, channels // geometry.groups) if b.kernel is None else
        tuple(b.kernel.shape[:-2])
        for b in branches
    })
    if len(heads) != 1:
        raise MergeError(f'kernels of different channels: {heads}')
    shape = heads[0] + kernel_size
    per_group = heads[0][1]
    device = branches[0].scale.device
    first: Optional[_Branch] = branches[0]
    if first.kernel is None and first.window == kernel_size:
        first = first._replace(kernel=_diagonal_kernel(first, geometry))
    if first.kernel is not None and \
            tuple(first.kernel.shape[-2:]) == kernel_size:
        start_from, added = first.kernel, branches[1:]
        weight = torch.empty(shape, dtype=dtype, device=device)
    else:  # the sum starts from zeros, written where it will be
        first, added = None, branches
        weight = start_from = torch.zeros(shape, dtype=dtype, device=device)
    kernels: Dict[int, Tensor] = {}

    def merge_rows(rows: Tensor, start: int, stop: int) -> None:
        """``rows`` holds the float64 values of rows ``start:stop`` of
        ``start_from``: make them the merged kernel's."""
        if first is not None:
            for factor in first.factors:
                rows.mul_(factor)
            scale_output_channels(rows, _rows(first.scale, start, stop),
                                  out=rows)
        for index, branch in enumerate(added):
            kernel = branch.kernel
            if kernel is None:
                if _add_diagonal(rows, branch, start, stop, kernel_size,
                                 per_group):
                    continue
                if index not in kernels:
                    kernels[index] = _diagonal_kernel(branch, geometry)
                kernel = kernels[index]
            part = scale_output_channels(_rows(kernel, start, stop),
                                         _rows(branch.scale, start, stop))
            for factor in branch.factors:
                part.mul_(factor)
            rows_at, columns_at = centre_slices(part.shape[-2:], kernel_size)
            rows[..., rows_at, columns_at].add_(part)

    # Blocks twice the usual size: each costs a few tensor operations per
    # branch (a 192 x 192 x 3 x 3 kernel is one block, 1.1 ms less on
    # RepVGG-A0).
    in_float64_rows(start_from, weight, [(0, shape[0])], merge_rows,
                    block_scale=2)
    return weight


def _reference(terms: Sequence[Term]) -> Tensor:
    """A tensor whose dtype and device the merged conv takes: the weight of
    the branches' convs (a norm's output has its input's dtype, not that
    of its parameters: float32 norms beside float16 convs give float16).

    Raises:
        MergeError: The convs' weights differ in dtype or device.
    """
    weights = [op.module.weight for term in terms for op in term.ops
               if op.kind == CONV and isinstance(
                   getattr(op.module, 'weight', None), Tensor)]
    kinds = {(w.dtype, w.device) for w in weights}
    if len(kinds) > 1:
        raise MergeError('convs of different dtypes or devices: ' + ', '.join(
            sorted(f'{dtype} on {device}' for dtype, device in kinds)))
    if weights:
        return weights[0]
    for term in terms:
        for op in term.ops:
            if op.module is not None:
                for tensor in list(op.module.parameters()) + \
                        list(op.module.buffers()):
                    if tensor.is_floating_point():
                        return tensor
    raise MergeError('no layer with parameters in any branch')


def merge_terms(
    terms: Sequence[Term],
    affines: Optional[Dict[int, Tuple[Tensor, Tensor]]] = None
) -> Tuple[ConvGeometry, Tensor, Tensor]:
    """The one convolution a sum of ``terms`` is.

    Args:
        terms: The branches, each read from the same input.
        affines: ``norm_affine`` of norm modules, by ``id``, computed
            beforehand (for many blocks at once); the norms not in it are
            computed here.

    Returns:
        ``(geometry, weight, bias)``; weight and bias in the dtype and on
        the device of the branches' layers.

    Raises:
        MergeError: When the sum is not one convolution, with the reason.
    """
    if not any(op.kind == CONV for term in terms for op in term.ops):
        raise MergeError('no branch has a convolution')
    geometry = merge_geometry([_branch_geometry(term) for term in terms])
    reference = _reference(terms)
    for term in terms:
        for op in term.ops:
            if isinstance(op.value, Tensor) and op.value.dim() and \
                    op.value.dtype != reference.dtype:
                # A multiplication would promote the branch to its dtype.
                raise MergeError(f'a {op.value.dtype} factor on a '
                                 f'{reference.dtype} branch')
    norms = _norm_affines(terms, affines)
    branches = [
        _branch(term, geometry, reference.device, norms) for term in terms
    ]
    weight = _merged_weight(branches, geometry, reference.dtype)
    bias = torch.zeros_like(branches[0].bias)
    for branch in branches:
        bias += branch.bias
    return geometry, weight, bias.to(reference.dtype)


class _ValuesGiven(nn.Conv2d):
    """An ``nn.Conv2d`` being built for values given at once: its
    parameters are not initialised (``build_conv`` makes it a plain
    ``nn.Conv2d`` before it is seen)."""

    def reset_parameters(self) -> None:
        pass


def _conv_of(cls: type, geometry: ConvGeometry, **kwargs) -> nn.Conv2d:
    """A ``cls`` conv (``nn.Conv2d`` or a subclass) with ``geometry`` and
    a bias, built by its constructor with ``kwargs``."""
    return cls(geometry.in_channels,
               geometry.out_channels,
               geometry.kernel_size,
               stride=geometry.stride,
               padding=geometry.padding,
               dilation=geometry.dilation,
               groups=geometry.groups,
               bias=True,
               padding_mode=geometry.padding_mode,
               **kwargs)


#: A plain ``nn.Conv2d`` of each geometry built for values given, on the
#: meta device: a conv of that geometry built again is a copy of its
#: attributes (the constructor's dozen ``Module.__setattr__`` calls cost
#: more than the merge of a small block's values).
_BUILT: Dict[ConvGeometry, nn.Conv2d] = {}

#: Geometries kept in ``_BUILT``, at most.
_MAX_BUILT = 256


def _empty_conv(geometry: ConvGeometry) -> nn.Conv2d:
    """A plain ``nn.Conv2d`` with ``geometry`` whose parameters are on the
    meta device, to be given values: a copy of the one built first for
    ``geometry``, its containers (parameters, hooks, ...) copied too;
    built anew while global parameter registration hooks are set (they
    see each conv's parameters registered, as they would be built)."""
    built = _BUILT.get(geometry)
    if built is None or getattr(nn.modules.module,
                                '_global_parameter_registration_hooks',
                                None):
        built = _conv_of(_ValuesGiven, geometry, device='meta')
        built.__class__ = nn.Conv2d
        if len(_BUILT) >= _MAX_BUILT:
            _BUILT.clear()
        _BUILT[geometry] = built
    conv = nn.Conv2d.__new__(nn.Conv2d)
    conv.__dict__.update(
        (name, value.copy() if type(value) in _CONTAINERS else
         copy.copy(value) if isinstance(value, (dict, list, set)) else value)
        for name, value in built.__dict__.items())
    return conv


#: Containers whose ``copy`` method makes a shallow copy of their type.
_CONTAINERS = frozenset({dict, OrderedDict, list, set})


def build_conv(geometry: ConvGeometry,
               weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None,
               like: Optional[Tensor] = None) -> nn.Conv2d:
    """A plain ``nn.Conv2d`` with ``geometry`` (and values, when given).

    Args:
        geometry: The conv's geometry.
        weight: Its weight, taken as it is (not copied); default
            initialisation when ``None``.
        bias: Its bias, taken as it is.
        like: Dtype and device for a conv without values.
    """
    if weight is not None:
        conv = _empty_conv(geometry)
        # The values are fresh tensors made for this conv: no copy.
        conv.weight = nn.Parameter(weight.detach())
        conv.bias = nn.Parameter(bias.detach())
    else:
        conv = _conv_of(nn.Conv2d, geometry)
        if like is not None:
            conv = conv.to(device=like.device, dtype=like.dtype)
    conv.eval()
    return conv


def describe_term(term: Term, names: Dict[int, str]) -> str:
    """A branch as text, e.g. ``'alpha * rbr_1x1.conv -> rbr_1x1.bn'``.

    Args:
        term: The branch.
        names: Module names by ``id(module)``.
    """
    parts = []
    factors = []
    for op in term.ops:
        if op.kind == SCALE:
            factors.append(op.label or _number(op.value))
            continue
        name = names.get(id(op.module), type(op.module).__name__)
        parts.append(name)
    text = ' -> '.join(parts) if parts else 'identity'
    if factors:
        text = ' * '.join(factors) + ' * ' + text
    return text


def _number(value: Union[float, Tensor]) -> str:
    if isinstance(value, Tensor):
        if value.numel() == 1:
            return f'{float(value):g}'
        return f'tensor{tuple(value.shape)}'
    return f'{float(value):g}'
