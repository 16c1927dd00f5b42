"""Conv/BN fusion on real OpenMMLab models: mmfuse against mmcv and torch.fx.

For the models of ``tests/real_models.py`` (built from the configs their
packages ship; seeded random weights, random BN statistics, small inputs,
always float32 here), four ways to fuse are compared on a fresh copy each:

* ``fuse_model``: :func:`mmfuse.fuse_model` with the example input (traced
  data flow, re-parameterization, verification);
* ``fuse_conv_bn``: :func:`mmfuse.fuse_conv_bn`, no input (structure only);
* ``mmcv``: ``mmcv.cnn.fuse_conv_bn`` (pairs a BN with the conv registered
  before it);
* ``torch.fx``: ``torch.fx.experimental.optimization.fuse`` (symbolic trace
  of the whole model; 'cannot trace' when that fails).

For each: batch norms folded out of those foldable (batch norms with running
statistics in the unfused model, counted once per module), the largest
relative output error against the unfused model (or the crash), the
same against the unfused model run in float64 for the float32 outputs
and for the fused models run in float64 (the folds' own error; not
measured where the float64 copy's outputs are not all float64), and the
time the call takes: after one untimed round, ``--repeats`` rounds of one
unfused forward and one call of each method on a fresh copy, each timed
with the garbage collector off (as ``timeit`` does); the time is the
median over rounds, and the ratios (``fuse_model`` in forward passes,
``fuse_conv_bn`` against mmcv) are medians of the ratios within each
round, so that both sides of a ratio see the same load.  Latency of the
unfused model, the ``fuse_model`` one and the *no-norm bound* (every
foldable norm replaced by ``nn.Identity``: not the same function, only
the speed a perfect fusion could reach; and the same with a zero bias on
each conv the fused model gave one, as a folded shift must be added) is
measured in one process, interleaved (one forward of each per round, in
an order that turns and reverses), as the median of ``--rounds`` rounds
(the fused over each bound as the median of the rounds' ratios), with
``torch.set_num_threads(--threads)``
(1 by default: on a 2-core machine shared with other work, two intra-op
threads wait on each other and the numbers scatter far more).

An output off by more than ``--corrupt`` (relative, default 1e-3) counts as
corrupted: float32 rounding after an exact fold stays below 1e-4 on every
model here but those with deformable convs.  Where the fused model was also
run in float64, that run's error (the folds' own, free of float32
arithmetic) decides instead: the float32 rounding of a DCNv2 detector
with random weights alone moves its output by 2e-3.  Prints markdown
tables and totals.

Usage::

    python benchmarks/bench_fusion.py [--models a,b] [--rounds 21]
        [--threads 1]
"""
import argparse
import copy
import datetime
import gc
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'tests'))

import mmfuse  # noqa: E402
import real_models  # noqa: E402
from mmfuse.verify import output_error  # noqa: E402

METHODS = ('fuse_model', 'fuse_conv_bn', 'mmcv', 'torch.fx')
#: The methods measured against the float64 model.
PRECISE_METHODS = ('fuse_model', 'fuse_conv_bn', 'mmcv')


@dataclass
class MethodResult:
    """What one fusion method did to one model."""
    folded: Optional[int] = None
    rel_error: Optional[float] = None
    # Max relative error of the fused float32 output against the unfused
    # model run in float64, and of the fused model run in float64 (the
    # folds' own error, without float32 arithmetic); or why not measured.
    precise_error: Optional[float] = None
    fold_error: Optional[float] = None
    precise_failure: str = ''
    seconds: Optional[float] = None
    failure: str = ''
    model: Optional[nn.Module] = None
    output: Any = None
    # Each timed call, in rounds.
    times: List[float] = field(default_factory=list)


@dataclass
class ModelResult:
    """Everything measured on one model."""
    name: str
    foldable: int
    methods: Dict[str, MethodResult] = field(default_factory=dict)
    latency_ms: Dict[str, float] = field(default_factory=dict)
    # Median over latency rounds of the fused forward over the bound's.
    fused_over_bound: Optional[float] = None
    # The same over the bound whose convs have the biases the fused ones
    # got (a folded shift has to be added somewhere).
    fused_over_biased: Optional[float] = None
    # The unfused float32 output's error against the float64 one.
    own_error: Optional[float] = None
    precise_failure: str = ''
    # The unfused forward timed in each round of ``run_methods``.
    forward_s: List[float] = field(default_factory=list)

    def paired(self, method: str, other: Optional[str] = None
               ) -> Optional[float]:
        """Median over rounds of ``method``'s time over ``other``'s (the
        unfused forward's by default), or ``None``."""
        mine = self.methods[method]
        theirs = self.forward_s if other is None else \
            self.methods[other].times
        if mine.seconds is None or not theirs or \
                len(theirs) != len(mine.times) or \
                (other is not None and self.methods[other].seconds is None):
            return None
        return statistics.median(a / b for a, b in zip(mine.times, theirs))


def count_batch_norms(model: nn.Module) -> int:
    """Batch norms with running statistics in ``model``, each module once."""
    return sum(
        real_models.is_batch_norm_with_stats(m) for m in model.modules())


def no_norm_bound(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every foldable norm replaced by Identity."""
    bound = copy.deepcopy(model)
    sites = [
        name for name, m in bound.named_modules(remove_duplicate=False)
        if name and real_models.is_batch_norm_with_stats(m)
    ]
    for name in sites:
        parent, _, attr = name.rpartition('.')
        holder = bound.get_submodule(parent) if parent else bound
        holder._modules[attr] = nn.Identity()
    return bound


def with_fused_biases(bound: nn.Module, fused: nn.Module) -> nn.Module:
    """A copy of ``bound`` in which each conv without a bias gets a zero
    one where the conv at its path in ``fused`` has a bias: the bound a
    fold that must add a shift can reach."""
    biased = copy.deepcopy(bound)
    fused_convs = {
        name: module
        for name, module in fused.named_modules()
        if isinstance(module, nn.modules.conv._ConvNd)
    }
    for name, module in biased.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd) and \
                module.bias is None and name in fused_convs and \
                fused_convs[name].bias is not None:
            channels = module.out_channels
            module.bias = nn.Parameter(
                module.weight.new_zeros(channels), requires_grad=False)
    return biased


def _mmcv_fuse(model: nn.Module, inputs: Tuple) -> nn.Module:
    from mmcv.cnn import fuse_conv_bn
    return fuse_conv_bn(model)


def _fx_fuse(model: nn.Module, inputs: Tuple) -> nn.Module:
    from torch.fx.experimental.optimization import fuse
    return fuse(model, inplace=True)


def fx_trace_problem(model: nn.Module) -> Optional[str]:
    """Why torch.fx cannot trace ``model`` (on a copy), or ``None``."""
    try:
        torch.fx.symbolic_trace(copy.deepcopy(model))
    except Exception as error:  # fx raises many types on Python code
        first = str(error).strip().splitlines()
        detail = first[0][:100] if first else ''
        return f'cannot trace: {type(error).__name__}: {detail}'
    return None


def _mmfuse_model(model: nn.Module, inputs: Tuple) -> nn.Module:
    mmfuse.fuse_model(model, inputs)
    return model


def _mmfuse_conv_bn(model: nn.Module, inputs: Tuple) -> nn.Module:
    return mmfuse.fuse_conv_bn(model)


FUSERS: Dict[str, Callable[[nn.Module, Tuple], nn.Module]] = {
    'fuse_model': _mmfuse_model,
    'fuse_conv_bn': _mmfuse_conv_bn,
    'mmcv': _mmcv_fuse,
    'torch.fx': _fx_fuse,
}


def timed(call: Callable[[], Any]) -> Tuple[float, Any]:
    """Time one call, as ``timeit`` does: the garbage collector runs
    before and is off during the call (a collection of the whole heap,
    hundreds of ms with several models alive, would otherwise land in
    whichever call happens to cross its threshold).

    Args:
        call: What to time.

    Returns:
        ``(seconds, call())``.
    """
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        value = call()
        return time.perf_counter() - start, value
    finally:
        if was_enabled:
            gc.enable()


def run_methods(model: nn.Module, inputs: Tuple, reference: Any,
                repeats: int, result: ModelResult) -> None:
    """Fuse fresh copies of ``model`` with every method, interleaved.

    One untimed round, then ``repeats`` rounds, each of one forward of the
    unfused model and one call of each method on a fresh copy: the
    ratios of a round (to the forward, to mmcv's call) compare times taken
    moments apart, which the load on a shared machine moves far less than
    times taken minutes apart.  The last fused copy of each method is
    checked.

    Args:
        model: The unfused model.
        inputs: Its example inputs.
        reference: Its output.
        repeats: Timed rounds.
        result: Where the forward times and each method's result go.
    """
    methods = {name: MethodResult() for name in METHODS}
    problem = fx_trace_problem(model)
    if problem:
        methods['torch.fx'].failure = problem
    live = [name for name in METHODS if not methods[name].failure]
    for index in range(1 + repeats):
        with torch.no_grad():
            seconds, _ = timed(lambda: model(*inputs))
        if index:
            result.forward_s.append(seconds)
        for name in list(live):
            work = copy.deepcopy(model)
            try:
                seconds, fused = timed(lambda: FUSERS[name](work, inputs))
            except Exception as error:  # a crash of a fuser: a result
                methods[name].failure = (f'crash: {type(error).__name__}: '
                                         f'{str(error)[:100]}')
                methods[name].model = None
                live.remove(name)
                continue
            if index:
                methods[name].times.append(seconds)
            methods[name].model = fused
    for name in live:
        res = methods[name]
        res.seconds = statistics.median(res.times)
        res.folded = result.foldable - count_batch_norms(res.model)
        try:
            with torch.no_grad():
                output = res.model(*inputs)
        except Exception as error:  # a fused model that no longer runs
            res.failure = (f'crash in forward: {type(error).__name__}: '
                           f'{str(error)[:100]}')
            res.model = None
            continue
        res.rel_error = output_error(reference, output)[1]
        res.output = output
    result.methods = methods


def float64_output(model: nn.Module, inputs: Tuple) -> Any:
    """The output of a float64 copy of ``model`` on ``inputs`` cast to
    float64 (``model`` is not changed).

    The whole copy is cast, unlike :func:`mmfuse.verify.upcast_output`
    (which casts a module's tensors only while it runs, to save memory):
    here code that reads another module's tensors sees them in float64
    too.

    Raises:
        TypeError: Where an output tensor is not float64 (the forward casts,
            or keeps float32 state outside parameters and buffers).
    """
    wide = copy.deepcopy(model).to(torch.float64)

    def cast(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.to(torch.float64)
        return value

    with torch.no_grad():
        output = wide(*tree_map(cast, inputs))
    narrow = {
        str(leaf.dtype)
        for leaf in tree_flatten(output)[0] if isinstance(leaf, torch.Tensor)
        and leaf.is_floating_point() and leaf.dtype != torch.float64
    }
    if narrow:
        # Computed in part outside float64 (a cast in the forward, state
        # kept in plain attributes): no yardstick.
        raise TypeError(f'the float64 copy gave {", ".join(narrow)} '
                        'outputs')
    return output


def measure_precision(model: nn.Module, inputs: Tuple, reference: Any,
                      result: ModelResult) -> None:
    """Errors against the unfused model run in float64: of the unfused
    float32 output (the model's own rounding), of each fused float32
    output, and of each fused model run in float64 (what the folds change
    in the function itself: their weights rounded to float32 once, with
    no float32 arithmetic on top)."""
    try:
        precise = float64_output(model, inputs)
    except Exception as error:  # a model without float64 kernels
        result.precise_failure = f'{type(error).__name__}: {error}'[:100]
        return
    result.own_error = output_error(precise, reference)[1]
    for method in PRECISE_METHODS:
        res = result.methods[method]
        if res.model is None or res.output is None:
            continue
        res.precise_error = output_error(precise, res.output)[1]
        try:
            res.fold_error = output_error(
                precise, float64_output(res.model, inputs))[1]
        except Exception as error:  # a fused module without float64
            res.precise_failure = \
                f'{type(error).__name__}: {error}'[:100]


def measure_latency(variants: Dict[str, nn.Module], inputs: Tuple,
                    rounds: int, warmup: int) -> Dict[str, List[float]]:
    """Forward times in seconds of each variant, one per round, the
    variants interleaved within each round, in an order that turns by
    one each round and runs backwards every other round (so that none
    always runs first, or right after the same other)."""
    times: Dict[str, List[float]] = {name: [] for name in variants}
    names = list(variants)
    with torch.no_grad():
        for index in range(warmup + rounds):
            turn = (index // 2) % len(names)
            order = names[turn:] + names[:turn]
            for name in order[::-1] if index % 2 else order:
                start = time.perf_counter()
                variants[name](*inputs)
                elapsed = time.perf_counter() - start
                if index >= warmup:
                    times[name].append(elapsed)
    return times


def bench_model(name: str, rounds: int, warmup: int,
                repeats: int) -> ModelResult:
    """Every measurement on one model."""
    model, inputs = real_models.build(name, dtype=torch.float32)
    with torch.no_grad():
        reference = model(*inputs)
    result = ModelResult(name, count_batch_norms(model))
    run_methods(model, inputs, reference, repeats, result)
    variants = {'unfused': model}
    fused = result.methods['fuse_model'].model
    if fused is not None:
        variants['fused'] = fused
    variants['bound'] = no_norm_bound(model)
    if fused is not None:
        variants['biased'] = with_fused_biases(variants['bound'], fused)
    times = measure_latency(variants, inputs, rounds, warmup)
    result.latency_ms = {
        name: 1e3 * statistics.median(values)
        for name, values in times.items()
    }
    if 'fused' in times:
        result.fused_over_bound = statistics.median(
            a / b for a, b in zip(times['fused'], times['bound']))
        result.fused_over_biased = statistics.median(
            a / b for a, b in zip(times['fused'], times['biased']))
    measure_precision(model, inputs, reference, result)
    for method in result.methods.values():
        # Free memory before the next model.
        method.model = method.output = None
    return result


def _err(value: Optional[float]) -> str:
    if value is None:
        return '-'
    return '0' if value == 0 else f'{value:.1e}'


class Notes:
    """Numbered footnotes for failure messages, one per distinct message."""

    def __init__(self):
        self.messages: Dict[str, List[str]] = {}

    def ref(self, message: str, model: str) -> str:
        """``[n]``, the number of ``message``'s footnote."""
        self.messages.setdefault(message, []).append(model)
        return f'[{list(self.messages).index(message) + 1}]'

    def print(self) -> None:
        for index, (message, models) in enumerate(self.messages.items()):
            where = ', '.join(models) if len(models) <= 4 else \
                f'{len(models)} models'
            text = message.replace('|', '/')
            print(f'{index + 1}. {text} ({where})')


def is_corrupt(res: MethodResult, corrupt: float) -> bool:
    """Whether a method's output counts as corrupted (see the module
    docstring): its folds' own error where measured, else its float32
    output's error, over ``corrupt``."""
    error = res.fold_error if res.fold_error is not None else res.rel_error
    return error is not None and error > corrupt


def fold_cell(result: ModelResult, method: str, corrupt: float,
              notes: Notes) -> str:
    res = result.methods[method]
    if res.failure:
        kind = res.failure.split(':', 1)[0]
        return f'{kind} {notes.ref(res.failure, result.name)}'
    mark = ' **corrupt**' if is_corrupt(res, corrupt) else ''
    return f'{res.folded}/{result.foldable} ({_err(res.rel_error)}){mark}'


def ms(value: Optional[float]) -> str:
    return '-' if value is None else f'{value:.1f}'


def time_cell(result: ModelResult, method: str) -> str:
    res = result.methods[method]
    return '-' if res.seconds is None else ms(1e3 * res.seconds)


def ratio(numerator: Optional[float], denominator: Optional[float]) -> str:
    """``numerator / denominator`` as a table cell (``-`` if unknown)."""
    if numerator is None or not denominator:
        return '-'
    return times_cell(numerator / denominator)


def times_cell(value: Optional[float]) -> str:
    """A ratio as a table cell, ``1.5x`` (``-`` if unknown)."""
    return '-' if value is None else f'{value:.1f}x'


def print_tables(results: List[ModelResult], corrupt: float) -> None:
    """The markdown tables and totals."""
    print('### Folds and output error\n')
    print('Cells: batch norms folded / foldable (max relative output '
          'error).\n')
    print('| model | ' + ' | '.join(f'`{m}`' for m in METHODS) + ' |')
    print('|---|' + '---|' * len(METHODS))
    notes = Notes()
    for result in results:
        cells = [fold_cell(result, m, corrupt, notes) for m in METHODS]
        print(f'| {result.name} | ' + ' | '.join(cells) + ' |')
    if notes.messages:
        print()
        notes.print()
    print_precision(results)
    print('\n### Time to fuse and CPU latency\n')
    print('| model | `fuse_model` ms (in forwards) | `fuse_conv_bn` ms '
          '(vs mmcv) | mmcv ms | torch.fx ms | unfused ms | fused ms | '
          'no-norm bound ms | fused over bound (with biases) | '
          'speed-up |')
    print('|---|---|---|---|---|---|---|---|---|---|')
    for result in results:
        lat = result.latency_ms
        in_forwards = times_cell(result.paired('fuse_model'))
        vs_mmcv = times_cell(result.paired('fuse_conv_bn', 'mmcv'))
        cells = [
            f'{time_cell(result, "fuse_model")} ({in_forwards})',
            f'{time_cell(result, "fuse_conv_bn")} ({vs_mmcv})',
            time_cell(result, 'mmcv'),
            time_cell(result, 'torch.fx'),
            ms(lat['unfused']),
            ms(lat.get('fused')),
            ms(lat['bound']),
            '-' if result.fused_over_bound is None else
            f'{result.fused_over_bound:.3f} '
            f'({result.fused_over_biased:.3f})',
            ratio(lat['unfused'], lat.get('fused')),
        ]
        print(f'| {result.name} | ' + ' | '.join(cells) + ' |')
    print('\n### Totals\n')
    print('| method | norms folded | corrupted outputs | crashes | '
          'cannot trace | median time to fuse |')
    print('|---|---|---|---|---|---|')
    foldable = sum(r.foldable for r in results)
    for method in METHODS:
        runs = [r.methods[method] for r in results]
        folded = sum(r.folded or 0 for r in runs if not r.failure)
        bad = sum(1 for r in runs if is_corrupt(r, corrupt))
        crashes = sum(1 for r in runs if r.failure.startswith('crash'))
        untraced = sum(1 for r in runs
                       if r.failure.startswith('cannot trace'))
        seconds = [r.seconds for r in runs if r.seconds is not None]
        median = ms(1e3 * statistics.median(seconds)) + ' ms' \
            if seconds else '-'
        print(f'| `{method}` | {folded}/{foldable} | {bad} | {crashes} | '
              f'{untraced} | {median} |')
    speedups = [
        r.latency_ms['unfused'] / r.latency_ms['fused'] for r in results
        if 'fused' in r.latency_ms
    ]
    bounds = [r.latency_ms['unfused'] / r.latency_ms['bound']
              for r in results]
    print(f'\nMedian speed-up of `fuse_model` over unfused: '
          f'{statistics.median(speedups):.2f}x (no-norm bound: '
          f'{statistics.median(bounds):.2f}x).')
    for attr, bound in (('fused_over_bound', 'the no-norm bound'),
                        ('fused_over_biased',
                         'the bound with the fused convs\' biases')):
        over = {
            r.name: getattr(r, attr)
            for r in results if getattr(r, attr) is not None
        }
        if not over:
            continue
        slow = ', '.join(f'{name} {value:.3f}'
                         for name, value in over.items() if value > 1.03)
        print(f'Fused latency within 3% of {bound} (median of the '
              f'per-round ratios) on '
              f'{sum(v <= 1.03 for v in over.values())} of {len(over)} '
              f'models' + (f'; over: {slow}.' if slow else '.'))
    in_forwards = [
        v for v in (r.paired('fuse_model') for r in results) if v is not None
    ]
    vs_mmcv = [
        v for v in (r.paired('fuse_conv_bn', 'mmcv') for r in results)
        if v is not None
    ]
    if in_forwards:
        print(f'`fuse_model` time in forward passes: median '
              f'{statistics.median(in_forwards):.1f}, max '
              f'{max(in_forwards):.1f}; at most 4 on '
              f'{sum(v <= 4 for v in in_forwards)} of {len(in_forwards)} '
              'models.')
    if vs_mmcv:
        print(f'`fuse_conv_bn` time over mmcv\'s: median '
              f'{statistics.median(vs_mmcv):.1f}x, max {max(vs_mmcv):.1f}x; '
              f'at most 2x on {sum(v <= 2 for v in vs_mmcv)} of '
              f'{len(vs_mmcv)} models.')


def print_precision(results: List[ModelResult]) -> None:
    """The table of errors against the float64 model, and its totals."""
    methods = PRECISE_METHODS
    print('\n### Output error against the float64 model\n')
    print('Max relative output error against the unfused model run in '
          'float64. `unfused`: the float32 model itself (its own '
          'rounding). Method cells: the fused float32 model / the fused '
          'model run in float64 (the error of the folds themselves: '
          'weights rounded to float32 once, no float32 arithmetic).\n')
    print('| model | unfused | ' + ' | '.join(f'`{m}`' for m in methods) +
          ' |')
    print('|---|---|' + '---|' * len(methods))
    failures = Notes()
    for result in results:
        if result.precise_failure:
            ref = failures.ref(result.precise_failure, result.name)
            print(f'| {result.name} | not measured {ref} |' +
                  ' |' * len(methods))
            continue
        cells = [_err(result.own_error)]
        for method in methods:
            res = result.methods[method]
            if res.precise_error is None:
                cells.append('-')
            elif res.fold_error is None:
                ref = failures.ref(res.precise_failure, result.name)
                cells.append(f'{_err(res.precise_error)} / - {ref}')
            else:
                cells.append(f'{_err(res.precise_error)} / '
                             f'{_err(res.fold_error)}')
        print(f'| {result.name} | ' + ' | '.join(cells) + ' |')
    if failures.messages:
        print()
        failures.print()
    measured = [r for r in results if r.methods['fuse_model'].fold_error
                is not None]
    if not measured:
        return
    folds = {r.name: r.methods['fuse_model'].fold_error for r in measured}
    worst = max(folds, key=folds.get)
    print(f'\n`fuse_model` folds\' own error (run in float64): at most '
          f'1e-5 on {sum(v <= 1e-5 for v in folds.values())} of '
          f'{len(folds)} models (max {_err(folds[worst])}, {worst}).')
    # Against mmcv where both fold the same norms and mmcv is not corrupt.
    same = [
        r for r in results
        if r.methods['fuse_conv_bn'].fold_error is not None
        and r.methods['mmcv'].fold_error is not None
        and r.methods['fuse_conv_bn'].folded == r.methods['mmcv'].folded
        and r.methods['mmcv'].fold_error <= 1e-3
    ]
    if same:
        wins = [r.name for r in same if r.methods['fuse_conv_bn'].fold_error
                <= r.methods['mmcv'].fold_error]
        losses = ', '.join(
            f'{r.name} {_err(r.methods["fuse_conv_bn"].fold_error)} '
            f'against {_err(r.methods["mmcv"].fold_error)}'
            for r in same if r.name not in wins)
        print(f'`fuse_conv_bn` folds\' own error at most mmcv\'s on '
              f'{len(wins)} of {len(same)} models where both fold the '
              'same number of norms and mmcv is not corrupt' +
              (f'; larger: {losses}.' if losses else '.'))
    closer = [
        r.name for r in measured
        if r.methods['fuse_model'].precise_error <= 2 * r.own_error
    ]
    print(f'`fuse_model` float32 output at most twice as far from the '
          f'float64 model as the unfused one on {len(closer)} of '
          f'{len(measured)} models.')


def machine() -> str:
    """CPU model, cores, torch version."""
    cpu = platform.processor() or platform.machine()
    if os.path.exists('/proc/cpuinfo'):
        with open('/proc/cpuinfo') as info:
            names = [
                line.split(':', 1)[1].strip() for line in info
                if line.startswith('model name')
            ]
        cpu = names[0] if names else cpu
    return (f'{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, '
            f'{torch.get_num_threads()} threads')


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        '--models',
        default='all',
        help='comma-separated names from tests/real_models.py, or "all"')
    parser.add_argument(
        '--rounds', type=int, default=21, help='latency rounds per model')
    parser.add_argument(
        '--warmup', type=int, default=3, help='untimed rounds first')
    parser.add_argument(
        '--threads', type=int, default=1, help='torch.set_num_threads')
    parser.add_argument(
        '--repeats',
        type=int,
        default=5,
        help='timed rounds per model (after an untimed one), each of one '
        'forward and one fusion per method on a fresh copy (medians are '
        'reported)')
    parser.add_argument(
        '--corrupt',
        type=float,
        default=1e-3,
        help='relative output error that counts as corrupted')
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error('--repeats must be at least 1')
    torch.set_num_threads(args.threads)
    names = real_models.MODEL_NAMES if args.models == 'all' else \
        [n.strip() for n in args.models.split(',') if n.strip()]
    for name in names:
        real_models.get_spec(name)  # fail early on a typo
    results = []
    for index, name in enumerate(names):
        print(f'[{index + 1}/{len(names)}] {name}', file=sys.stderr,
              flush=True)
        results.append(
            bench_model(name, args.rounds, args.warmup, args.repeats))
    print(f'Measured {datetime.date.today().isoformat()} on {machine()}; '
          f'latency = median of {args.rounds} interleaved rounds, batch '
          f'1, float32; time to fuse = median of {args.repeats} '
          'interleaved rounds after an untimed one, garbage collector '
          'off.\n')
    print_tables(results, args.corrupt)


if __name__ == '__main__':
    main()
