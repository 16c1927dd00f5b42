"""Wall time of a Runner's test loop with and without FuseConvBNHook.

Builds a real mmdet model from a shipped config (random weights, randomised
BN statistics, nothing downloaded), tests it on synthetic images run through
the config's own test pipeline (loading replaced by a made image), once
without the hook and once with it, alternating for ``--rounds`` rounds.  The
loop time with the hook includes fusing (tracing, folding, verifying) on
the first batch.  Prints a markdown table of medians: wall and CPU seconds
of the whole loop, the fusion, and the per-image time after the first
batch.

Usage::

    python benchmarks/bench_hook.py [--config CONFIG] [--images 16]
        [--size 320] [--rounds 3] [--threads N]
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'tests'))

from hook_helpers import CONFIGS, make_real_checkpoint  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from mmfuse import FuseConvBNHook  # noqa: E402

DEFAULT_CONFIG = os.path.join(CONFIGS, 'mmdet',
                              'retinanet_r50_fpn_1x_coco_fuse.py')


class _Clock:
    """Wall and process CPU time now."""

    @staticmethod
    def now() -> Dict[str, float]:
        return {'wall': time.perf_counter(), 'cpu': time.process_time()}


class _Start(Hook):
    """Starts the loop and iteration clocks before every other hook."""
    priority = 'HIGHEST'

    def __init__(self, times: Dict):
        self.times = times

    def before_test_epoch(self, runner) -> None:
        self.times['loop_start'] = _Clock.now()
        self.times['iterations'] = []

    def before_test_iter(self, runner, batch_idx, data_batch=None) -> None:
        self.times['iter_start'] = _Clock.now()


class _Stop(Hook):
    """Stops them after every other hook."""
    priority = 'LOWEST'

    def __init__(self, times: Dict):
        self.times = times

    def after_test_iter(self, runner, batch_idx, data_batch=None,
                        outputs=None) -> None:
        start, end = self.times['iter_start'], _Clock.now()
        self.times['iterations'].append(
            {k: end[k] - start[k] for k in end})

    def after_test_epoch(self, runner, metrics=None) -> None:
        start, end = self.times['loop_start'], _Clock.now()
        self.times['loop'] = {k: end[k] - start[k] for k in end}


def _config(base: str, folder: str, images: int, size: int) -> str:
    """A config testing ``base`` on synthetic images, batch size 1."""
    path = os.path.join(folder, 'bench_cfg.py')
    dump = os.path.join(folder, 'dump.pkl')
    with open(path, 'w') as stream:
        stream.write(
            f'_base_ = {base!r}\n'
            'custom_imports = dict(imports=["mmfuse", "mmfuse.synthetic"], '
            'allow_failed_imports=False)\n'
            'custom_hooks = []\n'
            'test_pipeline = [dict(type="LoadImageFromFile"), '
            f'dict(type="Resize", scale=({size}, {size}), keep_ratio=True),'
            ' dict(type="PackDetInputs", meta_keys=("img_id", "img_path", '
            '"ori_shape", "img_shape", "scale_factor"))]\n'
            'test_dataloader = dict(_delete_=True, batch_size=1, '
            'num_workers=0, sampler=dict(type="DefaultSampler", '
            'shuffle=False), dataset=dict(type="MMFuseSyntheticDataset", '
            f'num_samples={images}, image_size=({size}, {size}), '
            'pipeline=test_pipeline))\n'
            'test_evaluator = dict(_delete_=True, type="DumpResults", '
            f'out_file_path={dump!r})\n'
            'default_hooks = dict(logger=dict(type="LoggerHook", '
            'interval=1000), visualization=dict(draw=False))\n'
            'log_level = "WARNING"\n')
    return path


def _run(config: str, checkpoint: str, work_dir: str, hook: bool) -> Dict:
    cfg = Config.fromfile(config)
    cfg.work_dir = work_dir
    cfg.load_from = checkpoint
    cfg.experiment_name = f'{os.path.basename(work_dir)}'
    if hook:
        cfg.custom_hooks = [dict(type='FuseConvBNHook', log_table=False)]
    runner = Runner.from_cfg(cfg)
    times: Dict = {}
    runner.register_hook(_Start(times))
    runner.register_hook(_Stop(times))
    runner.test()
    fusion = None
    for item in runner.hooks:
        if isinstance(item, FuseConvBNHook):
            fusion = item.last_report
    times['fusion'] = fusion
    return times


def _median(values: List[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--config', default=DEFAULT_CONFIG)
    parser.add_argument('--images', type=int, default=16)
    parser.add_argument('--size', type=int, default=320,
                        help='the test pipeline resizes images to fit this')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument(
        '--threads',
        type=int,
        default=1,
        help='torch threads (default 1: steadier on a shared machine)')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        config = _config(os.path.abspath(args.config), folder, args.images,
                         args.size)
        checkpoint = make_real_checkpoint(config,
                                          os.path.join(folder, 'src.pth'))
        runs: Dict[bool, List[Dict]] = {False: [], True: []}
        for index in range(args.rounds):
            for hook in (False, True):
                work_dir = os.path.join(folder, f'run{index}_{int(hook)}')
                runs[hook].append(_run(config, checkpoint, work_dir, hook))
        rows = {}
        for hook, results in runs.items():
            loop = {k: _median([r['loop'][k] for r in results])
                    for k in ('wall', 'cpu')}
            steady = {
                k: _median([
                    statistics.mean(i[k] for i in r['iterations'][1:])
                    for r in results
                ])
                for k in ('wall', 'cpu')
            }
            fusion = [r['fusion'].seconds for r in results if r['fusion']]
            rows[hook] = (loop, steady, _median(fusion) if fusion else 0.0)
        report = runs[True][-1]['fusion']
    name = os.path.splitext(os.path.basename(args.config))[0]
    print(f'\nmodel: {name}; {args.images} synthetic images resized to fit '
          f'{args.size}x{args.size}, batch 1, {torch.get_num_threads()} '
          f'threads, median of {args.rounds} rounds; torch '
          f'{torch.__version__}, CPU')
    print(report.summary())
    print('\n| test loop | loop wall s | loop CPU s | fusion wall s | '
          'per image after the first, wall ms | same, CPU ms |')
    print('| --- | ---: | ---: | ---: | ---: | ---: |')
    for hook, label in ((False, 'without hook'), (True, 'FuseConvBNHook')):
        loop, steady, fusion = rows[hook]
        print(f'| {label} | {loop["wall"]:.2f} | {loop["cpu"]:.2f} | '
              f'{fusion:.2f} | {1000 * steady["wall"]:.0f} | '
              f'{1000 * steady["cpu"]:.0f} |')
    base, fused = rows[False][1], rows[True][1]
    print(f'\nper-image speedup after fusion: wall '
          f'{base["wall"] / fused["wall"]:.3f}x, CPU '
          f'{base["cpu"] / fused["cpu"]:.3f}x')


if __name__ == '__main__':
    main()
