"""Fusion on a CUDA device: devices, dtypes, accuracy and speed.

Run on a machine with a CUDA GPU (no OpenMMLab codebase needed: the models
come from torchvision and timm, where installed, plus mmfuse's own demo
model and mmcv ``ConvModule`` stacks).  For each model and each of float32,
float16 and bfloat16, a copy is fused on the GPU with :func:`fuse_model`
(example input) and with :func:`fuse_conv_bn` (structure only), and this
checks that:

* every parameter and buffer stays on the GPU, in the model's dtype;
* the fused weights equal the ones the same fusion computes on CPU (both
  go through float64: the largest difference is printed, in units of the
  dtype's resolution);
* the fused output stays within the default tolerance of the unfused one
  (running statistics are those of random images, gammas and betas
  random),
  and both are compared with a float64 run of the unfused model (the
  error a dtype gives anyway).

Then it times unfused and fused forwards (CUDA events, median of
``--rounds`` after warm-up, float16, batch ``--batch``) and the fusion
itself.  Prints markdown tables; with ``--out FILE`` writes them there too.

Usage::

    python benchmarks/gpu_check.py [--rounds 50] [--batch 8] [--out F]
"""
import argparse
import copy
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

import mmfuse
from mmfuse.testing import randomize_norm_stats
from mmfuse.verify import default_rtol, output_error

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _torchvision(name: str) -> Callable[[], nn.Module]:

    def build() -> nn.Module:
        import torchvision
        return getattr(torchvision.models, name)(weights=None)

    return build


def _timm(name: str) -> Callable[[], nn.Module]:

    def build() -> nn.Module:
        import timm
        return timm.create_model(name, pretrained=False)

    return build


def _conv_modules() -> nn.Module:
    """mmcv ConvModules in every order, with and without padding."""
    from mmcv.cnn import ConvModule
    norm = dict(type='BN')
    return nn.Sequential(
        ConvModule(3, 16, 3, padding=1, norm_cfg=norm),
        ConvModule(16, 16, 1, norm_cfg=norm, order=('norm', 'conv', 'act')),
        ConvModule(16, 32, 3, stride=2, padding=1, norm_cfg=norm,
                   order=('act', 'conv', 'norm')),
        ConvModule(32, 32, 3, padding=1, groups=32, norm_cfg=norm),
        nn.ConvTranspose2d(32, 16, 2, stride=2, groups=4),
        nn.BatchNorm2d(16))


def _demo() -> nn.Module:
    from mmfuse.demo import build_demo_model
    return build_demo_model()


MODELS: Dict[str, Callable[[], nn.Module]] = {
    'resnet50 (torchvision)': _torchvision('resnet50'),
    'mobilenet_v3_large (torchvision)': _torchvision('mobilenet_v3_large'),
    'efficientnet_b0 (torchvision)': _torchvision('efficientnet_b0'),
    'regnet_y_400mf (torchvision)': _torchvision('regnet_y_400mf'),
    'densenet121 (torchvision)': _torchvision('densenet121'),
    'repvgg_a0 (timm)': _timm('repvgg_a0'),
    'mobileone_s0 (timm)': _timm('mobileone_s0'),
    'ConvModule stack (mmcv)': _conv_modules,
    'mmfuse demo model': _demo,
}


def _build(name: str) -> Tuple[Optional[nn.Module], str]:
    try:
        model = MODELS[name]()
    except ImportError as error:
        return None, f'not installed here: {error}'
    randomize_norm_stats(model, seed=0)
    _calibrate(model)
    return model.eval(), ''


@torch.no_grad()
def _calibrate(model: nn.Module) -> None:
    """Running statistics from random images, as training would leave
    them (the affine parameters stay random): activations keep a sane
    scale, so float16 runs do not overflow."""
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a plain average over the batches
    model.train()
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        model(torch.randn(4, 3, 64, 64, generator=gen))
    model.eval()


def _tensors(model: nn.Module) -> List[torch.Tensor]:
    return list(model.parameters()) + list(model.buffers())


def _placement(model: nn.Module, device: torch.device,
               dtype: torch.dtype) -> str:
    """'' when every floating tensor is on ``device`` in ``dtype``."""
    for tensor in _tensors(model):
        if tensor.device != device:
            return f'a tensor on {tensor.device}'
        if tensor.is_floating_point() and tensor.dtype != dtype:
            return f'a {tensor.dtype} tensor'
    return ''


def _weight_gap(gpu_model: nn.Module, cpu_model: nn.Module,
                dtype: torch.dtype) -> float:
    """Largest difference of the fused parameters, GPU against CPU, in
    units of the dtype's resolution at each value."""
    gap = 0.0
    cpu_params = dict(cpu_model.named_parameters())
    for name, param in gpu_model.named_parameters():
        other = cpu_params.get(name)
        if other is None or other.shape != param.shape:
            return float('nan')
        a = param.detach().cpu().double()
        b = other.detach().double()
        ulp = torch.finfo(dtype).eps * b.abs().clamp_min(
            torch.finfo(dtype).tiny)
        gap = max(gap, float(((a - b).abs() / ulp).max()))
    return gap


def check_model(name: str, size: int, device: torch.device) -> List[Dict]:
    """One row per dtype."""
    base, problem = _build(name)
    if base is None:
        return [{'model': name, 'dtype': '-', 'problem': problem}]
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, size, size, generator=gen)
    with torch.no_grad():
        truth = copy.deepcopy(base).to(device, torch.float64)(
            image.to(device, torch.float64))
    rows = []
    for dtype in DTYPES:
        row: Dict = {'model': name, 'dtype': str(dtype).split('.')[-1]}
        model = copy.deepcopy(base).to(device, dtype)
        x = image.to(device, dtype)
        with torch.no_grad():
            unfused = model(x)
        fused = copy.deepcopy(model)
        report = mmfuse.fuse_model(fused, (x, ))
        cpu = copy.deepcopy(base).to(dtype)
        mmfuse.fuse_model(cpu, (image.to(dtype), ))
        structural = mmfuse.fuse_conv_bn(copy.deepcopy(model))
        with torch.no_grad():
            structural_out = structural(x)
            fused_out = fused(x)
        row.update(
            folded=f'{len(report.folded)}/{report.num_foldable}',
            merged=sum(r['merged'] for r in report.reparameterized),
            placement=_placement(fused, device, dtype)
            or _placement(structural, device, dtype) or 'ok',
            rel_error=report.max_rel_error,
            rtol=default_rtol(model),
            structural_error=output_error(unfused, structural_out)[1],
            unfused_vs_f64=output_error(truth, unfused)[1],
            fused_vs_f64=output_error(truth, fused_out)[1],
            cpu_gap=_weight_gap(fused, cpu, dtype),
            undone=len(report.undone))
        rows.append(row)
    return rows


def _forward_ms(model: nn.Module, x: torch.Tensor, rounds: int) -> float:
    times = []
    cuda = x.device.type == 'cuda'
    with torch.no_grad():
        for index in range(rounds + 10):
            if cuda:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                model(x)
                end.record()
                torch.cuda.synchronize()
                elapsed = start.elapsed_time(end)
            else:
                begin = time.perf_counter()
                model(x)
                elapsed = (time.perf_counter() - begin) * 1e3
            if index >= 10:
                times.append(elapsed)
    return statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize()


def time_model(name: str, batch: int, size: int, rounds: int,
               device: torch.device) -> Optional[Dict]:
    base, _ = _build(name)
    if base is None:
        return None
    dtype = torch.float16 if device.type == 'cuda' else torch.float32
    model = base.to(device, dtype)
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    fused = copy.deepcopy(model)
    _sync(device)
    start = time.perf_counter()
    mmfuse.fuse_model(fused, (x, ))
    _sync(device)
    fuse_s = time.perf_counter() - start
    # Interleave the two so clocks and caches treat them alike.
    unfused_ms, fused_ms = [], []
    for _ in range(3):
        unfused_ms.append(_forward_ms(model, x, rounds // 3))
        fused_ms.append(_forward_ms(fused, x, rounds // 3))
    unfused, fused_t = statistics.median(unfused_ms), \
        statistics.median(fused_ms)
    return {
        'model': name,
        'unfused_ms': unfused,
        'fused_ms': fused_t,
        'speedup': unfused / fused_t,
        'fuse_ms': fuse_s * 1e3,
    }


def _fmt(value) -> str:
    if isinstance(value, float):
        return f'{value:.1e}' if value and abs(value) < 0.01 else \
            f'{value:.3g}'
    return str(value)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rounds', type=int, default=60)
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--out', default=None)
    parser.add_argument(
        '--device', default='cuda', help='cuda, or cpu for a dry run')
    parser.add_argument('--models', default='all')
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        sys.exit('gpu_check: no CUDA device')
    names = list(MODELS) if args.models == 'all' else \
        args.models.split(',')
    where = torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'
    lines = [
        f'{where}, torch {torch.__version__}, CUDA {torch.version.cuda}\n',
        '### Fusion on the device\n',
        '| model | dtype | folded | merged | stays on device in dtype | '
        'rel error (rtol) | `fuse_conv_bn` rel error | unfused vs float64 '
        '| fused vs float64 | GPU-CPU weight gap (ulp) | undone |',
        '|---|---|---|---|---|---|---|---|---|---|---|'
    ]
    for name in names:
        print(f'checking {name}', file=sys.stderr, flush=True)
        for row in check_model(name, 96, device):
            if 'problem' in row:
                lines.append(f'| {name} | - | {row["problem"]} |' +
                             ' |' * 8)
                continue
            lines.append(
                f'| {name} | {row["dtype"]} | {row["folded"]} | '
                f'{row["merged"]} | {row["placement"]} | '
                f'{_fmt(row["rel_error"])} ({row["rtol"]:g}) | '
                f'{_fmt(row["structural_error"])} | '
                f'{_fmt(row["unfused_vs_f64"])} | '
                f'{_fmt(row["fused_vs_f64"])} | {_fmt(row["cpu_gap"])} | '
                f'{row["undone"]} |')
    lines += [
        '', f'### Latency (float16 on CUDA), batch {args.batch}, '
        f'{args.size}x{args.size}\n',
        '| model | unfused ms | fused ms | speed-up | fuse_model ms |',
        '|---|---|---|---|---|'
    ]
    for name in names:
        print(f'timing {name}', file=sys.stderr, flush=True)
        row = time_model(name, args.batch, args.size, args.rounds, device)
        if row is not None:
            lines.append(f'| {name} | {row["unfused_ms"]:.2f} | '
                         f'{row["fused_ms"]:.2f} | {row["speedup"]:.2f}x | '
                         f'{row["fuse_ms"]:.0f} |')
    text = '\n'.join(lines)
    print(text)
    if args.out:
        with open(args.out, 'w') as out:
            out.write(text + '\n')


if __name__ == '__main__':
    main()
