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
change the input or the output, and layers with forward hooks other than
spectral or weight norm's or a forward of the instance's own are refused.
The layer itself is never changed.
"""
from typing import Any, Dict, List, Optional, Tuple

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


_CONV_ARGS = ('input', 'weight', 'bias', 'stride', 'padding', 'dilation',
              'groups')
_CONV_DEFAULTS = (None, None, None, 1, 0, 1, 1)
_PAD_ARGS = ('input', 'pad', 'mode', 'value')
_PAD_DEFAULTS = (None, None, 'constant', None)


def _arguments(args: Tuple, kwargs: Dict, names: Tuple[str, ...],
               defaults: Tuple) -> List[Any]:
    """The values of a call's arguments, in the order of ``names``."""
    values = list(args[:len(names)]) + list(defaults[len(args):])
    return [kwargs.get(name, value) for name, value in zip(names, values)]


class _CaptureConvCalls(TorchFunctionMode):
    """Records each ``F.convNd`` call as ``(input, weight, bias, stride,
    padding, dilation, groups, output, the output's version)`` and each
    tensor ``F.pad`` returned, with its ``(input, pad, mode, value)``."""

    def __init__(self):
        super().__init__()
        self.calls: List[List[Any]] = []
        self.padded: Dict[int, Tuple[Any, List[Any]]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func in _CONV_FUNCS:
            self.calls.append(
                _arguments(args, kwargs, _CONV_ARGS, _CONV_DEFAULTS) +
                [result, getattr(result, '_version', None)])
        elif func is F.pad:
            self.padded[id(result)] = (result,
                                       _arguments(args, kwargs, _PAD_ARGS,
                                                  _PAD_DEFAULTS))
        return result

    def pad_of(self, value: Any) -> Optional[List[Any]]:
        """``(input, pad, mode, value)`` of the ``F.pad`` call that
        returned ``value``, or ``None`` where none did."""
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


def _runs_as_plain(module: _ConvNd, call: List[Any], probe: Tensor,
                   capture: _CaptureConvCalls) -> bool:
    """Whether the conv ``call`` is what a plain conv of ``module``'s
    geometry runs on ``probe``: the probe itself, or the probe padded by
    ``F.pad`` exactly as its ``padding_mode`` pads (then with no padding
    in the conv), and the module's stride, dilation and groups.  Padding
    computed from the input's size (TF-style "same") differs with the
    size, even where it comes out as the module's at the probe's."""
    dims = len(module.kernel_size)
    given, padding = call[0], _as_tuple(module.padding, dims)
    if module.padding_mode != 'zeros':
        pad = capture.pad_of(given)
        if pad is None or pad[0] is not probe or \
                tuple(pad[1]) != tuple(
                    module._reversed_padding_repeated_twice) or \
                pad[2] != module.padding_mode or pad[3] not in (None, 0):
            return False
        padding = (0, ) * dims
    elif given is not probe:
        return False
    return (_as_tuple(call[3], dims) == tuple(module.stride)
            and _as_tuple(call[4], dims) == padding
            and _as_tuple(call[5], dims) == tuple(module.dilation)
            and call[6] == module.groups)


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
            plain = _build(module)
        except Exception:  # a forward raises anything: not a plain conv
            # (mmpretrain's SparseConv2d reads a mask set by its caller.)
            plain = None
    if cache is not None:
        cache[id(module)] = plain
    return plain


def _build(module: _ConvNd) -> Optional[nn.Module]:
    probes = [_probe(module, seed) for seed in (0, 1)]
    kept = [probe.clone() for probe in probes]
    capture = _CaptureConvCalls()
    with capture:
        outputs = [module(probe) for probe in probes]
    if len(capture.calls) != 2:
        return None
    for probe, copy, output, call in zip(probes, kept, outputs,
                                         capture.calls):
        # The conv's input is the probe (padded by F.pad for a padding
        # mode), unchanged, and its output is the module's, as the conv
        # gave it: nothing done before or after the convolution, in place
        # either.
        if not _runs_as_plain(module, call, probe, capture):
            return None
        if call[7] is not output or output._version != call[8] or \
                not torch.equal(probe, copy):
            return None
    (weight, bias), (weight2, bias2) = [call[1:3] for call in capture.calls]
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
