"""Turn a conv that transforms its weight in forward into a plain conv.

Weight standardization (mmcv's ``ConvWS2d``, ``ConvAWS2d``), spectral norm,
weight norm and parametrizations recompute the weight on every forward; in
eval mode the result does not depend on the input, so the layer is a plain
convolution with that *effective* weight.  :func:`plain_conv_of` finds it by
running the layer on probe inputs and capturing the weight and bias it hands
to ``F.convNd``; it returns a plain ``nn.ConvNd`` only if that conv gives
bit-identical outputs on two probes of different sizes, where the
convolution's output is the layer's and its input the probe (padded by
``F.pad`` as the layer's padding mode pads, for one), with the layer's
stride, padding, dilation and groups: padding computed from the input's
size (TF-style "same") is refused.  Layers that call the convolution more
than once or with input-dependent weights (SAC, dynamic convs), that
change the input or the output, or change their own state (parameters,
buffers, attributes), and layers with forward hooks other than spectral
or weight norm's or a forward of the instance's own are refused.  The
probes run on a copy of the layer: the layer itself is never changed.
"""
import copy
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm
from torch.overrides import TorchFunctionMode

from .layers import runs_class_forward

__all__ = ['plain_conv_of']

_CONV_FUNCS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_PLAIN = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class _ConvCall(NamedTuple):
    """One ``F.convNd`` call, its output and that output's version."""
    input: Any
    weight: Any
    bias: Any = None
    stride: Any = 1
    padding: Any = 0
    dilation: Any = 1
    groups: Any = 1
    output: Any = None
    version: Optional[int] = None


class _PadCall(NamedTuple):
    """One ``F.pad`` call."""
    input: Any
    pad: Any
    mode: str = 'constant'
    value: Any = None


class _CaptureConvCalls(TorchFunctionMode):
    """Records each ``F.convNd`` call (a :class:`_ConvCall`) and each
    tensor ``F.pad`` returned, with its call (a :class:`_PadCall`)."""

    def __init__(self):
        super().__init__()
        self.calls: List[_ConvCall] = []
        self.padded: Dict[int, Tuple[Any, _PadCall]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func in _CONV_FUNCS:
            # (The fields are F.convNd's parameters in order, and F.pad's.)
            self.calls.append(
                _ConvCall(*args, **kwargs, output=result,
                          version=getattr(result, '_version', None)))
        elif func is F.pad:
            self.padded[id(result)] = (result, _PadCall(*args, **kwargs))
        return result

    def pad_of(self, value: Any) -> Optional[_PadCall]:
        """The ``F.pad`` call that returned ``value``, or ``None`` where
        none did."""
        known = self.padded.get(id(value))
        return known[1] if known is not None and known[0] is value else None


def _as_tuple(value: Any, dims: int) -> Any:
    """A stride, padding or dilation as a tuple of ``dims`` (a padding
    string as it is)."""
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return (value, ) * dims
    return tuple(value)


def _runs_as_plain(module: _ConvNd, call: _ConvCall, probe: Tensor,
                   capture: _CaptureConvCalls) -> bool:
    """Whether the conv ``call`` is what a plain conv of ``module``'s
    geometry runs on ``probe``: the probe itself, or the probe padded by
    ``F.pad`` exactly as its ``padding_mode`` pads (then with no padding
    in the conv), and the module's stride, dilation and groups.  Padding
    computed from the input's size (TF-style "same") differs with the
    size, even where it comes out as the module's at the probe's."""
    dims = len(module.kernel_size)
    padding = _as_tuple(module.padding, dims)
    if module.padding_mode != 'zeros':
        pad = capture.pad_of(call.input)
        if pad is None or pad.input is not probe or \
                tuple(pad.pad) != tuple(
                    module._reversed_padding_repeated_twice) or \
                pad.mode != module.padding_mode or \
                pad.value not in (None, 0):
            return False
        padding = (0, ) * dims
    elif call.input is not probe:
        return False
    return (_as_tuple(call.stride, dims) == tuple(module.stride)
            and _as_tuple(call.padding, dims) == padding
            and _as_tuple(call.dilation, dims) == tuple(module.dilation)
            and call.groups == module.groups)


#: Forward pre-hooks that only recompute the weight from parameters and
#: buffers (eval mode: the stored power-iteration vectors).
_WEIGHT_HOOKS = (SpectralNorm, WeightNorm)


def _hook_problem(module: nn.Module) -> bool:
    """Whether a call of ``module`` may do more than its class's forward
    and a weight recomputation: hooks other than spectral or weight
    norm's, a forward or ``__call__`` of the instance's own.  Such a conv
    is never replaced (a replacement would also drop the hooks)."""
    if module._forward_hooks or getattr(module, '_forward_hooks_with_kwargs',
                                        None):
        return True
    if getattr(module, '_forward_pre_hooks_with_kwargs', None) or any(
            not isinstance(hook, _WEIGHT_HOOKS)
            for hook in module._forward_pre_hooks.values()):
        return True
    return not runs_class_forward(module)


def _probe(module: _ConvNd, seed: int) -> Tensor:
    """A float64-drawn probe input for ``module``; each seed gives another
    size, one larger in every dim than the seed before (and the dims of
    one probe differ)."""
    dims = len(module.kernel_size)
    size = [(k - 1) * d + 2 * s + 3 + seed + dim for dim, (k, d, s) in
            enumerate(zip(module.kernel_size, module.dilation,
                          module.stride))]
    weight = next(module.parameters())
    gen = torch.Generator().manual_seed(seed)
    probe = torch.randn(2, module.in_channels, *size[:dims], generator=gen,
                        dtype=torch.float64)
    return probe.to(device=weight.device, dtype=weight.dtype)


@torch.no_grad()
def plain_conv_of(module: nn.Module,
                  cache: Optional[Dict[int, Optional[nn.Module]]] = None
                  ) -> Optional[nn.Module]:
    """A plain conv computing exactly what ``module`` computes, or ``None``.

    Args:
        module: A non-transposed conv in eval mode.
        cache: Optional memo keyed by ``id(module)``.

    Returns:
        A new ``nn.Conv1d/2d/3d`` (same geometry and ``padding_mode``, the
        effective weight and bias), or ``None`` when the layer is not a
        fixed-weight convolution.
    """
    if cache is not None and id(module) in cache:
        return cache[id(module)]
    plain = None
    lazy = isinstance(module, nn.modules.lazy.LazyModuleMixin) and \
        module.has_uninitialized_params()
    if isinstance(module, _ConvNd) and not module.transposed and \
            not module.training and not lazy and \
            len(module.kernel_size) in _PLAIN and not _hook_problem(module):
        try:
            # The probes run on a copy: the layer's forward may change
            # its own state.
            probed = copy.deepcopy(module)
            state = _state_of(probed)
            plain = _build(probed)
            # A forward that changed the layer's state keeps state: not
            # a fixed-weight conv.
            if plain is not None and _state_of(probed) != state:
                plain = None
        except Exception:  # a forward raises anything: not a plain conv
            # (mmpretrain's SparseConv2d reads a mask set by its caller;
            # a layer holding what cannot be copied cannot be probed.)
            plain = None
    if cache is not None:
        cache[id(module)] = plain
    return plain


class _Value:
    """A value of a layer's state as it was, compared with ``==`` as
    what a forward may have changed: a tensor by its values, a list, dict
    or set by its items (a shallow copy), a number, string or tuple by
    value, anything else by identity."""

    __slots__ = ('kind', 'value')

    def __init__(self, value: Any):
        if isinstance(value, Tensor):
            self.kind = 'tensor'
            value = value.detach().clone()
        elif isinstance(value, (list, dict, set)):
            self.kind = 'items'
            value = copy.copy(value)
        elif isinstance(value, (int, float, complex, str, bytes, tuple)):
            self.kind = 'value'
        else:
            self.kind = 'object'
        self.value = value

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Value) or other.kind != self.kind or \
                type(other.value) is not type(self.value):
            return False
        mine, theirs = self.value, other.value
        if self.kind == 'object' or mine is theirs:
            return mine is theirs
        if self.kind == 'tensor':
            return mine.dtype == theirs.dtype and \
                mine.shape == theirs.shape and torch.equal(mine, theirs)
        try:
            return bool(mine == theirs)
        except (ValueError, RuntimeError, TypeError):
            return False


def _state_of(layer: nn.Module) -> List[Dict[str, _Value]]:
    """The state of ``layer`` and of the modules below it: their
    attributes, parameters and buffers (see :class:`_Value`)."""
    state = []
    for module in layer.modules():
        entries = {name: _Value(value)
                   for name, value in module.__dict__.items()
                   if name not in ('_parameters', '_buffers', '_modules')}
        for table in ('_parameters', '_buffers'):
            for name, value in (module.__dict__.get(table) or {}).items():
                entries[f'{table}.{name}'] = _Value(value)
        state.append(entries)
    return state


def _build(module: _ConvNd) -> Optional[nn.Module]:
    probes = [_probe(module, seed) for seed in (0, 1)]
    kept = [probe.clone() for probe in probes]
    capture = _CaptureConvCalls()
    with capture:
        outputs = [module(probe) for probe in probes]
    if len(capture.calls) != 2:
        return None
    for probe, unchanged, output, call in zip(probes, kept, outputs,
                                              capture.calls):
        # The conv's input is the probe (padded by F.pad for a padding
        # mode), unchanged, and its output is the module's, as the conv
        # gave it: nothing done before or after the convolution, in place
        # either.
        if not _runs_as_plain(module, call, probe, capture):
            return None
        if call.output is not output or output._version != call.version \
                or not torch.equal(probe, unchanged):
            return None
    (weight, bias), (weight2, bias2) = [(call.weight, call.bias)
                                        for call in capture.calls]
    if not isinstance(weight, Tensor) or not torch.equal(weight, weight2):
        return None
    if (bias is None) != (bias2 is None) or \
            (bias is not None and not torch.equal(bias, bias2)):
        return None
    dims = len(module.kernel_size)
    if tuple(weight.shape) != (module.out_channels,
                               module.in_channels // module.groups,
                               *module.kernel_size):
        return None
    plain = _PLAIN[dims](
        module.in_channels,
        module.out_channels,
        module.kernel_size,
        stride=module.stride,
        padding=module.padding,
        dilation=module.dilation,
        groups=module.groups,
        bias=bias is not None,
        padding_mode=module.padding_mode,
        device=weight.device,
        dtype=weight.dtype).eval()
    requires_grad = any(p.requires_grad for p in module.parameters())
    plain.weight = nn.Parameter(weight.detach().clone(), requires_grad)
    if bias is not None:
        plain.bias = nn.Parameter(bias.detach().clone(), requires_grad)
    for probe, output in zip(probes, outputs):
        if not torch.equal(plain(probe), output):
            return None
    return plain
