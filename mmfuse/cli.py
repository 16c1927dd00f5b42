"""``tools/fuse_conv_bn.py`` / ``mmfuse-fuse-conv-bn``: fuse a checkpoint.

Builds the model through the config's registries, loads the checkpoint
(``weights_only=True`` with an allow-list of benign types), fuses it with
:func:`mmfuse.fuse_model` on an example input taken from the config's test
pipeline, verifies it, prints the report and writes a fused checkpoint that
loads with ``weights_only=True`` and, with ``FuseConvBNHook`` in the config,
through MMEngine's ``Runner`` (mmdet's and mmseg's ``tools/test.py``).

Exit status: 0 done, 1 fusing or writing failed, 2 bad input, 130
interrupted.  Errors are one line on stderr; OUT is written through a
temporary file in its folder and renamed, so it is never left partial.
"""
import argparse
import os
import signal
import sys
import tempfile
import threading
import time
import zipfile
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .api import FusionError, fuse_model
from .checkpoint import (CheckpointError, describe_key_mismatch, file_sha256,
                         fused_meta, get_state_dict, load_checkpoint_safely,
                         save_fused_checkpoint)
from .report import FusionReport

__all__ = ['main', 'console_main', 'build_parser']

PROG = 'fuse_conv_bn'


class InputError(Exception):
    """Bad input: a missing file, a wrong option, an unfit checkpoint."""


class _Terminated(BaseException):
    """SIGTERM arrived; unwinds like KeyboardInterrupt so OUT's temporary
    file is removed."""


def _config_options_action() -> type:
    """MMEngine's ``DictAction``, with a malformed pair an argparse usage
    error (exit 2, one line) instead of the ``ValueError`` it raises."""
    from mmengine.config import DictAction

    class ConfigOptions(DictAction):

        def __call__(self, parser, namespace, values, option_string=None):
            for pair in values:
                if '=' not in pair or not pair.partition('=')[0]:
                    raise argparse.ArgumentError(
                        self, f'{pair!r} is not KEY=VALUE')
            try:
                super().__call__(parser, namespace, values, option_string)
            except (ValueError, SyntaxError, AssertionError) as error:
                # (DictAction asserts that brackets balance.)
                raise argparse.ArgumentError(
                    self, f'{" ".join(values)!r}: {error}') from None

    return ConfigOptions


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, OpenMMLab style."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description='Fold batch norms into convolutions where the data flow '
        'proves it, verify the result and write a fused checkpoint.')
    parser.add_argument('config', help='model config file')
    parser.add_argument('checkpoint', help='checkpoint file to fuse')
    parser.add_argument('out', help='fused checkpoint file to write')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=_config_options_action(),
        help='override config settings, key=value pairs as in OpenMMLab '
        'tools (xxx=yyy, xxx=[a,b], xxx.yyy=zzz); recorded in OUT')
    parser.add_argument(
        '--device', default='cpu', help='device to fuse on (default: cpu)')
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        '--shape',
        type=int,
        nargs='+',
        metavar='N',
        default=None,
        help='height [width] of the synthetic image fed through the '
        "config's test pipeline (default: 256 256)")
    source.add_argument(
        '--image',
        metavar='PATH',
        help="an image file fed through the config's test pipeline")
    source.add_argument(
        '--raw-shape',
        type=int,
        nargs='+',
        metavar='N',
        help='shape of a random tensor passed straight to model(tensor) '
        '(e.g. 1 3 224 224); skips the pipeline and data preprocessor')
    source.add_argument(
        '--no-input',
        action='store_true',
        help='no example input: fold only what the model structure proves, '
        'without verification')
    parser.add_argument(
        '--no-verify',
        action='store_true',
        help='do not compare the fused output with the unfused one')
    parser.add_argument(
        '--no-reparam',
        action='store_true',
        help='only fold norms: do not merge multi-branch (RepVGG-style) '
        'blocks into single convs first')
    parser.add_argument(
        '--rtol',
        type=float,
        default=None,
        help='largest relative output error accepted (default: 1e-4 for '
        'float32, 5e-2 for half precision); folds that break it are undone')
    parser.add_argument(
        '--seed', type=int, default=0, help='seed of the synthetic input')
    parser.add_argument(
        '--trust-checkpoint',
        action='store_true',
        help='load CHECKPOINT with full pickle (weights_only=False); only '
        'for files you trust')
    parser.add_argument(
        '--allow-key-mismatch',
        action='store_true',
        help='fuse even if the checkpoint has missing or unexpected keys '
        'for this model')
    parser.add_argument(
        '--quiet', action='store_true', help='print only the final table')
    return parser


class _Progress:
    """Prints each step, its time, and a heartbeat during long steps."""

    def __init__(self, total: int, quiet: bool, heartbeat_s: float = 5.0):
        self.total = total
        self.quiet = quiet
        self.heartbeat_s = heartbeat_s
        self.index = 0
        self.times: List[Tuple[str, float]] = []

    def say(self, message: str) -> None:
        if not self.quiet:
            print(message, flush=True)

    @contextmanager
    def step(self, label: str, detail: str = '') -> Iterator[None]:
        self.index += 1
        self.say(f'[{self.index}/{self.total}] {label}{detail} ...')
        start = time.perf_counter()
        done = threading.Event()

        def beat() -> None:
            while not done.wait(self.heartbeat_s):
                self.say(f'      ... still {label} '
                         f'({time.perf_counter() - start:.0f} s)')

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
        seconds = time.perf_counter() - start
        self.times.append((label, seconds))
        self.say(f'      done in {seconds:.2f} s')


def _check_readable(kind: str, path: str) -> None:
    if not os.path.exists(path):
        raise InputError(f'{kind} {path} does not exist')
    if not os.path.isfile(path):
        raise InputError(f'{kind} {path} is not a file')
    try:
        with open(path, 'rb') as stream:
            stream.read(1)
    except OSError as error:
        raise InputError(f'{kind} {path} is not readable: '
                         f'{error.strerror or error}') from None


def _check_writable_folder(folder: str) -> None:
    """Create and remove a probe file: the only test that also holds for
    root, read-only mounts and immutable folders."""
    try:
        handle, probe = tempfile.mkstemp(prefix='.mmfuse-probe-', dir=folder)
    except OSError as error:
        raise InputError(f'output folder {folder} is not writable: '
                         f'{error.strerror or error}') from None
    os.close(handle)
    os.unlink(probe)


def _check_paths(args: argparse.Namespace) -> None:
    _check_readable('config', args.config)
    _check_readable('checkpoint', args.checkpoint)
    out = os.path.abspath(args.out)
    for kind, path in (('checkpoint', args.checkpoint),
                       ('config', args.config)):
        if os.path.realpath(out) == os.path.realpath(path) or (
                os.path.exists(out) and os.path.samefile(out, path)):
            raise InputError(f'OUT {args.out} is the {kind}; write the '
                             'fused checkpoint to another file')
    if args.image is not None:
        _check_readable('image', args.image)
    if args.image is not None and os.path.exists(out) and \
            os.path.samefile(out, args.image):
        raise InputError(f'OUT {args.out} is the image; write the fused '
                         'checkpoint to another file')
    folder = os.path.dirname(out)
    if not os.path.isdir(folder):
        raise InputError(f'output folder {folder} does not exist')
    if os.path.isdir(out):
        raise InputError(f'OUT {args.out} is a folder')
    if os.path.isfile(out) and not _is_torch_file(out):
        # A config it inherits from, a picture, anything but an earlier
        # checkpoint: not ours to replace.
        raise InputError(f'OUT {args.out} exists and is not a checkpoint; '
                         'refusing to replace it')
    _check_writable_folder(folder)
    if args.shape is not None and not 1 <= len(args.shape) <= 2:
        raise InputError('--shape takes a height and optionally a width')
    if args.shape is not None and min(args.shape) < 1:
        raise InputError('--shape must be positive')
    if args.raw_shape is not None and (len(args.raw_shape) < 2 or
                                       min(args.raw_shape) < 1):
        raise InputError('--raw-shape needs at least two positive sizes, '
                         'e.g. 1 3 224 224')
    if args.rtol is not None and not 0 < args.rtol < float('inf'):
        raise InputError('--rtol must be positive')


def _is_torch_file(path: str) -> bool:
    """Whether ``path`` looks like a file ``torch.save`` wrote: a zip
    archive holding a ``data.pkl`` (the format since torch 1.6), or a
    pickle that starts with torch's magic number (the legacy one)."""
    try:
        with open(path, 'rb') as stream:
            head = stream.read(4)
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                return any(name.endswith('data.pkl')
                           for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
    # Protocol 2, then the magic number as a 10-byte long.
    return head == b'\x80\x02\x8a\x0a'


def _first_line(error: BaseException) -> str:
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()
    return type(error).__name__


def _build_model(args: argparse.Namespace) -> Tuple[nn.Module, Any]:
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    try:
        cfg = Config.fromfile(args.config)
    except Exception as error:  # a config is arbitrary Python: any error
        raise InputError(f'cannot read config {args.config}: '
                         f'{type(error).__name__}: {_first_line(error)}'
                         ) from None
    if args.cfg_options:
        try:
            cfg.merge_from_dict(args.cfg_options)
        except Exception as error:  # MMEngine raises what a merge meets
            raise InputError(f'--cfg-options do not fit {args.config}: '
                             f'{type(error).__name__}: {_first_line(error)}'
                             ) from None
    if not isinstance(cfg.get('model'), dict):
        raise InputError(f'config {args.config} has no model')
    init_default_scope(cfg.get('default_scope', None) or 'mmengine')
    # As MMEngine's Runner builds it: a top-level ``data_preprocessor``
    # (mmpretrain's configs keep mean, std and num_classes there) is the
    # model's unless the model names its own.
    if cfg.get('data_preprocessor') is not None:
        cfg.model.setdefault('data_preprocessor', cfg.data_preprocessor)
    try:
        model = MODELS.build(cfg.model)
    except Exception as error:  # builders raise anything a model raises
        raise InputError(f'cannot build the model of {args.config}: '
                         f'{type(error).__name__}: {_first_line(error)}'
                         ) from None
    return model, cfg


def _load_weights(model: nn.Module, args: argparse.Namespace,
                  progress: _Progress) -> Tuple[Dict, Optional[str]]:
    """Load the checkpoint into ``model``; returns it, and a note where
    its floating point tensors are of another dtype than the model's."""
    try:
        checkpoint = load_checkpoint_safely(
            args.checkpoint, trust=args.trust_checkpoint)
        if fused_meta(checkpoint) is not None:
            raise InputError(f'{args.checkpoint} is already a fused '
                             'checkpoint (its meta has mmfuse)')
        state_dict = get_state_dict(checkpoint)
    except CheckpointError as error:
        raise InputError(str(error)) from None
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # shape mismatches raise even non-strict
        shapes = [line.strip() for line in str(error).splitlines()
                  if 'size mismatch' in line]
        detail = '; '.join(shapes[:3]) + (
            f' and {len(shapes) - 3} more' if len(shapes) > 3 else '')
        raise InputError(
            f'{args.checkpoint} does not fit the model of {args.config}: '
            f'{detail or _first_line(error)}') from None
    if result.missing_keys or result.unexpected_keys:
        mismatch = describe_key_mismatch(result.missing_keys,
                                         result.unexpected_keys)
        if not args.allow_key_mismatch:
            raise InputError(
                f'{args.checkpoint} does not fit the model of '
                f'{args.config}: {mismatch}; pass --allow-key-mismatch to '
                'fuse anyway')
        progress.say(f'      warning: {mismatch}')
    return checkpoint, _dtype_note(model, state_dict)


def _dtype_note(model: nn.Module, state_dict: Dict) -> Optional[str]:
    """A note where the checkpoint's floating point tensors are of another
    dtype than the model built from the config (a float16 checkpoint in a
    float32 model): the model fuses, and OUT is written, in its dtype."""
    dtype = next((p.dtype for p in model.parameters()
                  if p.is_floating_point()), None)
    other = sorted({
        str(value.dtype).replace('torch.', '')
        for value in state_dict.values() if isinstance(value, torch.Tensor)
        and value.is_floating_point() and value.dtype != dtype
    })
    if dtype is None or not other:
        return None
    name = str(dtype).replace('torch.', '')
    return (f'CHECKPOINT holds {" and ".join(other)} tensors, loaded into '
            f'the {name} model the config builds: the model is fused, '
            f'verified and written in {name} (folded weights rounded to '
            f'{other[0]} would move the output further)')


def _pipeline_input(model: nn.Module, cfg: Any,
                    args: argparse.Namespace) -> Tuple:
    from mmengine.dataset import Compose, pseudo_collate

    from .hook import forward_args
    from .synthetic import (find_test_pipeline, image_annotations,
                            strip_loading, synthetic_results)
    pipeline = find_test_pipeline(cfg)
    if not pipeline:
        raise InputError(
            f'config {args.config} has no test pipeline to make an input '
            'with; pass --raw-shape N C H W or --no-input')
    height, width = (args.shape * 2)[:2] if args.shape else (256, 256)
    results = synthetic_results(0, height, width, args.seed)
    if args.image is not None:
        # (The box a top-down pipeline crops is set once the image is
        # loaded: see strip_loading.)
        results = dict(image_annotations(0), img_path=args.image)
    transforms = strip_loading(pipeline,
                               keep_image_loading=args.image is not None)
    what = f'image {args.image}' if args.image else \
        f'a synthetic {height}x{width} image'
    others = '--raw-shape or --no-input' if args.image else \
        '--image, --raw-shape or --no-input'
    try:
        packed = Compose(transforms)(results)
        if packed is None:
            raise InputError(f'the test pipeline dropped {what}')
        batch = pseudo_collate([packed])
        with torch.no_grad():
            data = model.data_preprocessor(batch, False)
    except InputError:
        raise
    except Exception as error:  # transforms raise anything
        raise InputError(
            f'the test pipeline failed on {what}: {type(error).__name__}: '
            f'{_first_line(error)}; pass {others}') from None
    return forward_args(data)


def _example_inputs(model: nn.Module, cfg: Any, args: argparse.Namespace,
                    device: torch.device) -> Optional[Tuple]:
    if args.no_input:
        return None
    if args.raw_shape is not None:
        generator = torch.Generator().manual_seed(args.seed)
        dtype = next((p.dtype for p in model.parameters()
                      if p.is_floating_point()), torch.float32)
        images = torch.randn(args.raw_shape, generator=generator).to(
            device=device, dtype=dtype)
        from mmengine.model import BaseModel
        if isinstance(model, BaseModel):
            # As the pipeline's input is given: in 'tensor' mode, with no
            # data samples (a pose estimator's forward requires the
            # argument).
            return (images, None, 'tensor')
        return (images, )
    return _pipeline_input(model, cfg, args)


def _count(model: nn.Module) -> Tuple[int, int]:
    params = sum(p.numel() for p in model.parameters())
    tensors = list(model.state_dict().values())
    size = sum(t.numel() * t.element_size() for t in tensors)
    return params, size


def _final_table(report: FusionReport, progress: _Progress,
                 before: Tuple[int, int], after: Tuple[int, int],
                 out: str, sha256: str) -> str:
    rows = [(label, f'{seconds:.2f} s') for label, seconds in progress.times]
    merged = sum(1 for r in report.reparameterized if r.get('merged'))
    rows.append(('blocks re-parameterized', str(merged)))
    rows.append(('norms in model', str(report.num_norms)))
    rows.append(('foldable', str(report.num_foldable)))
    rows.append(('folded', str(len(report.folded))))
    rows.append(('left', str(len(report.left))))
    rows.append(('undone by verification', str(len(report.undone))))
    if report.verified:
        rows.append(('max abs / rel error',
                     f'{report.max_abs_error:.3g} / '
                     f'{report.max_rel_error:.3g} (rtol {report.rtol:g})'))
        if report.precise_rel_error is not None:
            # The output was also judged against a wider copy (where it
            # failed rtol at first): a bare figure over rtol would read
            # as a failure.
            rows.append((f'rel error against {report.yardstick}',
                         f'{report.precise_rel_error:.3g} (the unfused '
                         f'model: {report.unfused_precise_rel_error:.3g})'))
        if report.twin is not None:
            rows.append(('folds judged on', f'a {report.twin} twin of the '
                         'model (its own rounding is too rough)'))
    else:
        rows.append(('verified', 'no'))
    rows.append(('parameters', f'{before[0]:,} -> {after[0]:,}'))
    rows.append(('state_dict size', f'{before[1] / 2**20:.2f} MiB -> '
                 f'{after[1] / 2**20:.2f} MiB'))
    rows.append(('written', out))
    rows.append(('sha256', sha256))
    width = max(len(r[0]) for r in rows)
    rule = '-' * (width + 2 + max(len(r[1]) for r in rows))
    lines = [rule] + [f'{k:<{width}}  {v}' for k, v in rows] + [rule]
    return '\n'.join(lines)


def _run(args: argparse.Namespace) -> int:
    _check_paths(args)
    progress = _Progress(total=5, quiet=args.quiet)
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise InputError(f'--device {args.device}: {_first_line(error)}'
                         ) from None
    with progress.step('building the model', f' from {args.config}'):
        model, cfg = _build_model(args)
    with progress.step('loading the checkpoint', f' {args.checkpoint}'):
        source, dtype_note = _load_weights(model, args, progress)
        source_sha256 = file_sha256(args.checkpoint)
    try:
        model.to(device)
    except (RuntimeError, AssertionError) as error:
        raise InputError(f'--device {args.device}: {_first_line(error)}'
                         ) from None
    model.eval()
    before = _count(model)
    with progress.step('preparing the example input'):
        example = _example_inputs(model, cfg, args, device)
    verify = example is not None and not args.no_verify
    label = 'tracing, folding' + (' and verifying' if verify else '')
    detail = ''
    if example is None:
        label, detail = 'folding', ' from structure (no input, not verified)'
    with progress.step(label, detail):
        try:
            report = fuse_model(model, example, verify=verify,
                                rtol=args.rtol,
                                reparameterize=not args.no_reparam)
        except FusionError:
            raise
        except Exception as error:  # the model's forward raises anything
            raise FusionError(
                f'the model failed on the example input: '
                f'{type(error).__name__}: {_first_line(error)}; try '
                '--shape, --image, --raw-shape or --no-input') from None
    progress.say(str(report))
    after = _count(model)
    notes: List[str] = [dtype_note] if dtype_note else []
    with progress.step('writing the fused checkpoint', f' {args.out}'):
        save_fused_checkpoint(
            model,
            report,
            args.out,
            source_checkpoint=source,
            source_path=args.checkpoint,
            source_sha256=source_sha256,
            config_path=args.config,
            cfg_options=dict(args.cfg_options or {}),
            notes=notes)
        out_sha256 = file_sha256(args.out)
    for note in notes:
        progress.say(f'      note: {note}')
    print(_final_table(report, progress, before, after, args.out,
                       out_sha256), flush=True)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the tool; returns the exit status instead of exiting.

    Args:
        argv: The arguments (``sys.argv[1:]`` when None).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or argparse's own usage error
        return int(exit_.code or 0)
    previous = None
    if threading.current_thread() is threading.main_thread():

        def terminate(signum: int, frame: Any) -> None:
            raise _Terminated()

        previous = signal.signal(signal.SIGTERM, terminate)
    try:
        return _run(args)
    except InputError as error:
        print(f'{PROG}: error: {error}', file=sys.stderr)
        return 2
    except (FusionError, CheckpointError) as error:
        print(f'{PROG}: error: {_first_line(error)}', file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Terminated):
        return _interrupted(args)
    except Exception as error:
        # An interrupt inside torch.save comes out as the error its zip
        # writer raises while unwinding.
        if _caused_by_interrupt(error):
            return _interrupted(args)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupted(args: argparse.Namespace) -> int:
    print(f'{PROG}: interrupted; {args.out} was not written (an existing '
          'file is left as it was)',
          file=sys.stderr)
    return 130


def _caused_by_interrupt(error: BaseException) -> bool:
    """Whether ``error`` was raised while an interrupt (Ctrl-C, SIGTERM)
    was being handled."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, (KeyboardInterrupt, _Terminated)):
            return True
        seen.add(id(error))
        error = error.__context__ or error.__cause__
    return False


def console_main() -> None:
    """Entry point of the ``mmfuse-fuse-conv-bn`` console command."""
    # Scripts generated by ``setup.py develop`` set ``__requires__`` in
    # __main__; pkg_resources (which MMEngine imports to resolve ``mmdet::``
    # config paths) then re-checks every requirement of mmfuse's whole
    # dependency tree and fails on any unrelated version conflict in the
    # environment.  The plain ``python tools/fuse_conv_bn.py`` has no such
    # check, so neither should the command.
    vars(sys.modules['__main__']).pop('__requires__', None)
    sys.exit(main())


if __name__ == '__main__':
    console_main()
