"""Helpers for tests and benchmarks: randomised norm statistics.

Default statistics (mean 0, variance 1, gamma 1, beta 0) make a batch norm an
identity and hide most folding bugs, so every check randomises them first.
"""
from typing import Optional

import torch
from torch import nn

from .layers import is_norm_layer

__all__ = ['randomize_norm_stats']


@torch.no_grad()
def randomize_norm_stats(model: nn.Module,
                         seed: Optional[int] = 0,
                         spread: float = 1.0) -> nn.Module:
    """Give every norm random running statistics and affine parameters.

    Args:
        model: The model; changed in place.
        seed: Seed of a private generator (the global RNG is untouched).
        spread: Scale of the random statistics.

    Returns:
        ``model``.
    """
    gen = torch.Generator().manual_seed(seed if seed is not None else 0)

    def uniform(tensor: torch.Tensor, low: float, high: float) -> None:
        values = torch.rand(tensor.shape, generator=gen, dtype=torch.float64)
        tensor.copy_((low + (high - low) * values).to(tensor))

    for module in model.modules():
        if not is_norm_layer(module):
            continue
        for name in ('running_mean', 'bias'):
            tensor = getattr(module, name, None)
            if isinstance(tensor, torch.Tensor):
                uniform(tensor, -spread, spread)
        for name in ('running_var', 'weight'):
            tensor = getattr(module, name, None)
            if isinstance(tensor, torch.Tensor):
                uniform(tensor, 0.25, 0.25 + 2 * spread)
    return model
