"""The embedded demo: a small net with every pattern that trips naive fusion.

``python -m mmfuse.demo`` builds it with random weights and randomised norm
statistics, then fuses copies with ``mmcv.cnn.fuse_conv_bn`` (when mmcv or
mmcv-lite is installed), with :func:`mmfuse.fuse_conv_bn` and with
:func:`mmfuse.fuse_model` given an example input, and prints how each did.
No download, no mmdet.
"""
import argparse
import copy
import sys
from typing import List, Optional

import torch
from torch import nn

from .api import fuse_conv_bn, fuse_model
from .testing import randomize_norm_stats
from .verify import output_error

__all__ = ['build_demo_model', 'main']


class Bottleneck(nn.Module):
    """Registers conv1, conv2, bn1, bn2 (like mmcv/mmdet's Bottleneck); the
    conv2 output is normalised and also used by the residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, channels, 1)
        self.bn3 = nn.BatchNorm2d(channels)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = self.conv3(out)  # conv3's output feeds bn3 *and* the sum
        return torch.relu(self.bn3(skip) + skip + x)


class ActThenNorm(nn.Module):
    """conv -> activation -> BN: the BN must stay."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return self.bn(torch.relu(self.conv(x)))


class ConcatNorm(nn.Module):
    """A BN over the concat of a conv and a pooling branch (ENet/ERFNet
    downsampler): the BN is wider than the conv."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels - in_channels, 3,
                              padding=1)
        self.pool = nn.MaxPool2d(3, 1, 1)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        return self.bn(torch.cat([self.conv(x), self.pool(x)], 1))


class SumNorm(nn.Module):
    """A BN over the sum of two convs: folds into both."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv_a = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv_b = nn.Conv2d(channels, channels, 1)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return self.bn(self.conv_a(x) + self.conv_b(x))


class SharedConvHead(nn.Module):
    """One conv shared across pyramid levels, a BN per level.

    ``levels[i]`` each hold the *same* conv object and their own BN (like
    mmdet's RetinaSepBNHead); ``loop_bns`` follow one more conv called once
    per level from the same place.
    """

    def __init__(self, channels: int, num_levels: int = 3):
        super().__init__()
        shared = nn.Conv2d(channels, channels, 3, padding=1)
        self.levels = nn.ModuleList(
            nn.Sequential(shared, nn.BatchNorm2d(channels))
            for _ in range(num_levels))
        self.loop_conv = nn.Conv2d(channels, channels, 1)
        self.loop_bns = nn.ModuleList(
            nn.BatchNorm2d(channels) for _ in range(num_levels))

    def forward(self, feats: List[torch.Tensor]):
        outs = []
        for feat, level, bn in zip(feats, self.levels, self.loop_bns):
            outs.append(bn(self.loop_conv(level(feat))))
        return outs


def _conv_module(*args, **kwargs) -> Optional[nn.Module]:
    try:
        from mmcv.cnn import ConvModule
    except ImportError:
        return None
    return ConvModule(*args, **kwargs)


class DemoNet(nn.Module):
    """Every pattern of the mmfuse core issue in one small network."""

    def __init__(self, channels: int = 8):
        super().__init__()
        c = channels
        self.stem = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
            nn.ReLU())
        # A ConvModule with the norm first: exact to fold into a 1x1 conv,
        # not into a zero-padded 3x3 one.
        self.pre_1x1 = _conv_module(
            c, c, 1, norm_cfg=dict(type='BN'), order=('norm', 'conv', 'act'))
        self.pre_3x3 = _conv_module(
            c, c, 3, padding=1, norm_cfg=dict(type='BN'),
            order=('norm', 'conv', 'act'))
        self.block = Bottleneck(c)
        self.act_norm = ActThenNorm(c)
        self.sum_norm = SumNorm(c)
        self.concat = ConcatNorm(c, 2 * c)
        self.reduce = nn.Conv2d(2 * c, c, 1)
        self.head = SharedConvHead(c)
        self.fc = nn.Linear(c, 10)
        self.fc_bn = nn.BatchNorm1d(10)

    def forward(self, x):
        x = self.stem(x)
        if self.pre_1x1 is not None:
            x = self.pre_3x3(self.pre_1x1(x))
        x = self.sum_norm(self.act_norm(self.block(x)))
        x = self.reduce(self.concat(x))
        feats = [x, x[..., ::2, ::2], x[..., ::4, ::4]]
        outs = self.head(feats)
        pooled = sum(o.mean((2, 3)) for o in outs)
        return self.fc_bn(self.fc(pooled)), outs


def build_demo_model(seed: int = 0) -> nn.Module:
    """The demo net in eval mode with random weights and norm statistics."""
    torch.manual_seed(seed)
    model = DemoNet().eval()
    return randomize_norm_stats(model, seed)


def _mmcv_result(model: nn.Module, inputs, reference) -> str:
    try:
        from mmcv.cnn import fuse_conv_bn as mmcv_fuse
    except ImportError:
        return 'mmcv.cnn.fuse_conv_bn: mmcv not installed, skipped'
    fused = copy.deepcopy(model)
    try:
        mmcv_fuse(fused)
        with torch.no_grad():
            _, rel = output_error(reference, fused(*inputs))
    except RuntimeError as error:
        return ('mmcv.cnn.fuse_conv_bn: crashed: '
                f'{str(error).splitlines()[0][:90]}')
    verdict = 'CORRUPTED' if rel > 1e-4 else 'ok'
    return f'mmcv.cnn.fuse_conv_bn: max rel error {rel:.3g} ({verdict})'


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    model = build_demo_model(args.seed)
    inputs = (torch.randn(2, 3, 32, 32,
                          generator=torch.Generator().manual_seed(args.seed)),
              )
    with torch.no_grad():
        reference = model(*inputs)
    print(_mmcv_result(model, inputs, reference))

    structural = copy.deepcopy(model)
    fuse_conv_bn(structural)
    with torch.no_grad():
        _, rel = output_error(reference, structural(*inputs))
    print(f'mmfuse.fuse_conv_bn:   max rel error {rel:.3g}')

    traced = copy.deepcopy(model)
    report = fuse_model(traced, inputs)
    print('mmfuse.fuse_model with an example input:')
    print(report)
    ok = rel <= 1e-5 and report.max_rel_error <= 1e-5
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
