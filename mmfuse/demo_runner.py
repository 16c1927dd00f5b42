"""Commands of the MMEngine demo (``configs/demo/``).

::

    python -m mmfuse.demo_runner checkpoint OUT.pth
        write a demo checkpoint (random weights and norm statistics, in
        MMEngine's format with ``meta['dataset_meta']``)
    python -m mmfuse.demo_runner test CONFIG CHECKPOINT [--work-dir DIR]
        run an MMEngine ``Runner`` test with the config and checkpoint and
        print the metrics
"""
import argparse
import os
import sys
from typing import Dict, List, Optional

import torch

from .demo_model import DemoClassifier
from .testing import randomize_norm_stats

__all__ = ['save_demo_checkpoint', 'main']


def save_demo_checkpoint(path: str, seed: int = 0,
                         channels: int = 8) -> Dict:
    """Write a demo checkpoint: random weights and norm statistics."""
    torch.manual_seed(seed)
    model = DemoClassifier(channels)
    randomize_norm_stats(model, seed)
    checkpoint = {
        'state_dict': model.state_dict(),
        'meta': {
            'dataset_meta': {
                'classes': tuple(f'class_{i}' for i in range(10))
            },
            'seed': seed,
        }
    }
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    torch.save(checkpoint, path)
    return checkpoint


def _test(config: str, checkpoint: str, work_dir: Optional[str]) -> Dict:
    from mmengine.config import Config
    from mmengine.runner import Runner
    cfg = Config.fromfile(config)
    cfg.load_from = checkpoint
    cfg.work_dir = work_dir or os.path.join(
        'work_dirs',
        os.path.splitext(os.path.basename(config))[0])
    runner = Runner.from_cfg(cfg)
    return runner.test()


def main(argv: Optional[List[str]] = None) -> int:
    """Run a demo command; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog='python -m mmfuse.demo_runner',
        description='The mmfuse MMEngine demo: write a checkpoint, or test '
        'a config with a checkpoint.')
    commands = parser.add_subparsers(dest='command', required=True)
    write = commands.add_parser('checkpoint', help='write a demo checkpoint')
    write.add_argument('out', help='checkpoint file to write')
    write.add_argument('--seed', type=int, default=0)
    test = commands.add_parser('test', help='test a config and checkpoint')
    test.add_argument('config')
    test.add_argument('checkpoint')
    test.add_argument('--work-dir', default=None)
    args = parser.parse_args(argv)
    if args.command == 'checkpoint':
        save_demo_checkpoint(args.out, args.seed)
        print(f'wrote demo checkpoint {args.out}')
        return 0
    metrics = _test(args.config, args.checkpoint, args.work_dir)
    for name, value in metrics.items():
        print(f'{name}: {value}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
