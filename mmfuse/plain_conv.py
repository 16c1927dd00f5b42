"""Turn a conv that transforms its weight in forward into a plain conv.

Weight standardization (mmcv's ``ConvWS2d``, ``ConvAWS2d``), spectral norm,
weight norm and parametrizations recompute the weight on every forward; in
eval mode the result does not depend on the input, so the layer is a plain
convolution with that *effective* weight.  :func:`plain_conv_of` finds it by
running the layer on probe inputs and capturing the weight and bias it hands
to ``F.convNd``; it returns a plain ``nn.ConvNd`` only if that conv gives
bit-identical outputs on two different probes.  Layers that call the
convolution more than once or with input-dependent weights (SAC, dynamic
convs) are refused.  The layer itself is never changed.
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torch.overrides import TorchFunctionMode

__all__ = ['plain_conv_of']

_CONV_FUNCS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_PLAIN = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class _CaptureConvCalls(TorchFunctionMode):

    def __init__(self):
        super().__init__()
        self.calls: List[Tuple[Tensor, Optional[Tensor]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CONV_FUNCS:
            params = list(args[1:3]) + [None, None]
            weight = kwargs.get('weight', params[0])
            bias = kwargs.get('bias', params[1])
            self.calls.append((weight, bias))
        return func(*args, **kwargs)


def _probe(module: _ConvNd, seed: int) -> Tensor:
    dims = len(module.kernel_size)
    size = [(k - 1) * d + 2 * s + 3 for k, d, s in zip(
        module.kernel_size, module.dilation, module.stride)]
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
            len(module.kernel_size) in _PLAIN:
        try:
            plain = _build(module)
        except (RuntimeError, NotImplementedError, TypeError,
                ValueError, AssertionError):
            plain = None  # its forward does not run on a CPU probe
    if cache is not None:
        cache[id(module)] = plain
    return plain


def _build(module: _ConvNd) -> Optional[nn.Module]:
    probes = [_probe(module, seed) for seed in (0, 1)]
    capture = _CaptureConvCalls()
    with capture:
        outputs = [module(probe) for probe in probes]
    if len(capture.calls) != 2:
        return None
    (weight, bias), (weight2, bias2) = capture.calls
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
