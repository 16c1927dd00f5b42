"""CPU latency of re-parameterized models: mmfuse against the blocks' own.

For mmpretrain's RepVGG-A0 and MobileOne-S1 and mmyolo's YOLOv6-s and
PP-YOLOE+-s (built from their shipped configs, random weights, randomised
BN statistics), times three versions of each model:

* **before**: the training structure, in eval mode;
* **mmfuse**: :func:`mmfuse.fuse_model` (re-parameterize, then fold);
* **own**: the blocks' own ``switch_to_deploy`` (mmpretrain's backbone
  method, mmyolo's ``switch_to_deploy`` utility), then
  ``fuse_model(reparameterize=False)`` to fold the remaining BNs.

Forward passes are interleaved (one of each version per round) and the
median is reported, so drifting CPU clocks hit every version alike.  Prints
a markdown table.

Usage::

    python benchmarks/bench_reparam.py [--rounds 15] [--models a,b]
"""
import argparse
import copy
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'tests'))

import mmfuse  # noqa: E402
from mmfuse.verify import output_error  # noqa: E402
from reparam_models import build_reparam_model  # noqa: E402

#: name -> (table label, input size)
BENCH_MODELS: Dict[str, Tuple[str, Tuple[int, int]]] = {
    'repvgg_a0': ('mmpretrain RepVGG-A0', (224, 224)),
    'mobileone_s1': ('mmpretrain MobileOne-S1', (224, 224)),
    'yolov6_s': ('mmyolo YOLOv6-s', (640, 640)),
    'ppyoloe_plus_s': ('mmyolo PP-YOLOE+-s', (640, 640)),
}


def own_deploy(name: str, model: nn.Module) -> None:
    """The conversion each codebase ships, in place."""
    if name.startswith(('repvgg', 'mobileone')):
        model.backbone.switch_to_deploy()
        return
    from mmyolo.models.layers.yolo_bricks import RepVGGBlock
    for layer in model.modules():  # mmyolo.utils.switch_to_deploy
        if isinstance(layer, RepVGGBlock):
            layer.switch_to_deploy()


def count(model: nn.Module) -> Tuple[int, int]:
    """``(convs, batch norms)`` in ``model``."""
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    norms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm)
                for m in model.modules())
    return convs, norms


def interleaved(runs: Dict[str, Callable[[], object]], rounds: int,
                clock: Callable[[], float]) -> Dict[str, float]:
    """Median seconds of each run, one of each per round."""
    times: Dict[str, List[float]] = {key: [] for key in runs}
    for run in runs.values():  # warm up
        run()
        run()
    for _ in range(rounds):
        for key, run in runs.items():
            start = clock()
            run()
            times[key].append(clock() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def bench(name: str, rounds: int, clock: Callable[[], float]) -> Dict:
    label, input_hw = BENCH_MODELS[name]
    model, inputs = build_reparam_model(name, input_hw=input_hw)
    with torch.no_grad():
        reference = model(*inputs)
    ours = copy.deepcopy(model)
    report = mmfuse.fuse_model(ours, inputs)
    own = copy.deepcopy(model)
    own_deploy(name, own)
    own.eval()  # the new convs are built in training mode
    own_report = mmfuse.fuse_model(own, inputs, reparameterize=False)
    print(f'{name} mmfuse: {report.summary()}\n{name} own: '
          f'{own_report.summary()}', file=sys.stderr)
    for skip in own_report.undone + own_report.left:
        print(f'  own left {skip.name}: {skip.reason}', file=sys.stderr)
    versions = {'before': model, 'mmfuse': ours, 'own': own}

    def forward(version: nn.Module) -> Callable[[], object]:

        def run():
            with torch.no_grad():
                return version(*inputs)

        return run

    with torch.no_grad():
        errors = {
            key: output_error(reference, version(*inputs))[1]
            for key, version in versions.items() if key != 'before'
        }
    medians = interleaved({k: forward(v) for k, v in versions.items()},
                          rounds, clock)
    merged = sum(1 for r in report.reparameterized if r['merged'])
    return {
        'label': label,
        'input': f'{input_hw[0]}x{input_hw[1]}',
        'ms': {k: 1000 * v for k, v in medians.items()},
        'errors': errors,
        'counts': {k: count(v) for k, v in versions.items()},
        'merged': merged,
        'folded': (len(report.folded), len(own_report.folded)),
    }


def table(results: List[Dict]) -> str:
    lines = [
        '| model | input | before (ms) | mmfuse: reparam + fold (ms) | '
        'speed-up | own switch_to_deploy + fold (ms) | speed-up | '
        'convs / BNs before → mmfuse → own | rel. error mmfuse / own |',
        '|---|---|---:|---:|---:|---:|---:|---|---|'
    ]
    for r in results:
        ms, counts, errors = r['ms'], r['counts'], r['errors']
        lines.append(
            f"| {r['label']} | {r['input']} | {ms['before']:.1f} | "
            f"{ms['mmfuse']:.1f} | {ms['before'] / ms['mmfuse']:.2f}x | "
            f"{ms['own']:.1f} | {ms['before'] / ms['own']:.2f}x | "
            f"{counts['before'][0]}/{counts['before'][1]} → "
            f"{counts['mmfuse'][0]}/{counts['mmfuse'][1]} → "
            f"{counts['own'][0]}/{counts['own'][1]} | "
            f"{errors['mmfuse']:.1e} / {errors['own']:.1e} |")
    return '\n'.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rounds', type=int, default=15)
    parser.add_argument('--models', default=','.join(BENCH_MODELS))
    parser.add_argument('--threads', type=int, default=0,
                        help='torch threads (default: torch\'s choice)')
    parser.add_argument(
        '--clock', choices=('wall', 'cpu'), default='wall',
        help='wall-clock time, or the CPU time of this process (steadier '
        'on a shared machine; use with --threads 1)')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == 'wall' else time.process_time
    results = []
    for name in args.models.split(','):
        results.append(bench(name, args.rounds, clock))
        print(f'{name}: done', file=sys.stderr)
    what = 'wall-clock' if args.clock == 'wall' else 'process CPU time'
    print(f'CPU, {torch.get_num_threads()} threads, torch '
          f'{torch.__version__}, batch 1, {what}, median of {args.rounds} '
          'interleaved rounds.\n')
    print(table(results))


if __name__ == '__main__':
    main()
