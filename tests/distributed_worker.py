"""One rank of ``tests/test_distributed.py``, started by torchrun.

Runs the demo config with ``FuseConvBNHook`` under ``launcher='pytorch'``
three times: a test fusing in memory, a test loading a fused checkpoint,
and one training epoch validating a fused copy.  Writes what each rank saw
to ``OUT_DIR/rank<r>.json``.
"""
import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hook_helpers import demo_config, state_digest  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from mmfuse import FuseConvBNHook, unwrap_model  # noqa: E402
from mmfuse.checkpoint import fused_record_of  # noqa: E402


def _runner(work_dir: str,
            load_from: str,
            hook: dict = None,
            **overrides) -> Runner:
    cfg = demo_config(work_dir, hook=hook, fuse=hook is None, **overrides)
    cfg.launcher = 'pytorch'
    # On CPU, DDP must not be given device ids.
    cfg.model_wrapper_cfg = dict(type='MMDistributedDataParallel',
                                 device_ids=None)
    cfg.load_from = load_from
    return Runner.from_cfg(cfg)


def _hook(runner: Runner) -> FuseConvBNHook:
    return [h for h in runner.hooks if isinstance(h, FuseConvBNHook)][0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--checkpoint', required=True)
    parser.add_argument('--fused', required=True)
    parser.add_argument('--out-dir', required=True)
    args = parser.parse_args()
    # MMEngine 0.10.7's launcher='pytorch' calls torch.cuda.set_device,
    # which a CPU-only torch lacks; a process group that already exists is
    # used as it is, so start the gloo group here.
    dist.init_process_group('gloo')
    rank = dist.get_rank()
    results = {'world_size': dist.get_world_size()}
    for name, load_from in (('memory', args.checkpoint),
                            ('fused', args.fused)):
        runner = _runner(os.path.join(args.out_dir, name), load_from)
        metrics = runner.test()
        model = unwrap_model(runner.model)
        report = _hook(runner).last_report
        results[name] = dict(
            metrics=metrics,
            wrapper=type(runner.model).__name__,
            record=fused_record_of(model),
            digest=state_digest(model.state_dict()),
            reported=report is not None)
    runner = _runner(os.path.join(args.out_dir, 'train'), args.checkpoint,
                     dict(fuse_test=False, fuse_val=True),
                     train_cfg=dict(max_epochs=1))
    runner.train()
    model = unwrap_model(runner.model)
    results['train'] = dict(
        wrapper=type(runner.model).__name__,
        fused_after_training=fused_record_of(model) is not None,
        # Batch norm statistics are each rank's own; parameters are synced.
        parameters=state_digest(dict(model.named_parameters())),
        val_reported=_hook(runner).last_report is not None)
    with open(os.path.join(args.out_dir, f'rank{rank}.json'), 'w') as out:
        json.dump(results, out, indent=1, default=str)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == '__main__':
    torch.set_num_threads(1)
    main()
