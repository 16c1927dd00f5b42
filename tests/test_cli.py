"""tools/fuse_conv_bn.py: through ``main(argv)`` and as a subprocess.

Every bad input runs both ways and must give a one-line error, a non-zero
exit, no OUT (not even a temporary file) and an untouched input.
"""
import argparse
import os
import shutil
import sys
import textwrap
from typing import Tuple

import pytest
import torch
from hook_helpers import readonly_folder  # noqa: F401 (a fixture)
from hook_helpers import (DEMO_CONFIG, REPO, TOOL, file_digest,
                          make_demo_checkpoint, run_python)

from mmfuse.checkpoint import load_checkpoint_safely
from mmfuse.cli import main
from mmfuse.demo_runner import save_demo_checkpoint


@pytest.fixture(params=['main', 'subprocess'])
def tool(request, capsys):
    """Runs the tool; returns ``(exit status, stdout, stderr)``."""

    def run(*args: str):
        if request.param == 'main':
            status = main(list(args))
            captured = capsys.readouterr()
            return status, captured.out, captured.err
        result = run_python([TOOL, *args])
        return result.returncode, result.stdout, result.stderr

    return run


@pytest.fixture
def checkpoint(tmp_path) -> str:
    return make_demo_checkpoint(str(tmp_path / 'demo.pth'))


def _assert_clean_error(status, out, err, folder, expected, code=2):
    assert status == code, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith('fuse_conv_bn: error: '), err
    assert expected in lines[0], err
    assert not [name for name in os.listdir(folder)
                if name.startswith(('out', '.out'))], os.listdir(folder)


# --------------------------------------------------------------- success


def test_fuses_and_reports(tool, tmp_path, checkpoint):
    out = str(tmp_path / 'out.pth')
    before = file_digest(checkpoint)
    status, stdout, err = tool(DEMO_CONFIG, checkpoint, out, '--cfg-options',
                               'model.channels=8')
    assert status == 0, stdout + err
    for step in ('[1/5] building the model', '[2/5] loading the checkpoint',
                 '[3/5] preparing the example input',
                 '[4/5] tracing, folding and verifying',
                 '[5/5] writing the fused checkpoint'):
        assert step in stdout
    assert 'into / reason' in stdout  # the report's table
    for row in ('folded  ', 'left  ', 'max abs / rel error', 'sha256'):
        assert row in stdout
    assert file_digest(checkpoint) == before
    fused = torch.load(out, weights_only=True)
    record = fused['meta']['mmfuse']
    assert record['config']['cfg_options'] == {'model.channels': 8}
    assert record['report']['verified'] is True
    assert record['report']['num_folded'] >= 5
    assert sorted(os.listdir(tmp_path)) == ['demo.pth', 'out.pth']


@pytest.mark.parametrize('args, verified', [
    (['--shape', '40', '48'], True),
    (['--raw-shape', '2', '3', '32', '32'], True),
    (['--no-verify'], False),
    (['--no-input'], False),
    (['--rtol', '1e-3', '--seed', '3', '--quiet'], True),
])
def test_input_options(tmp_path, checkpoint, capsys, args, verified):
    out = str(tmp_path / 'out.pth')
    assert main([DEMO_CONFIG, checkpoint, out, *args]) == 0
    stdout = capsys.readouterr().out
    record = torch.load(out, weights_only=True)['meta']['mmfuse']
    assert record['report']['verified'] is verified
    assert record['report']['mode'] == (
        'structural' if '--no-input' in args else 'traced')
    if '--quiet' in args:
        assert '[1/5]' not in stdout and 'sha256' in stdout
    if '--rtol' in args:
        assert record['report']['rtol'] == 1e-3


def test_no_reparam_only_folds(tmp_path, checkpoint):
    """The demo net's SumNorm block is a branch sum: merged by default,
    only folded with --no-reparam."""
    merged = []
    for args in ([], ['--no-reparam']):
        out = str(tmp_path / f'out{len(args)}.pth')
        assert main([DEMO_CONFIG, checkpoint, out, '--quiet', *args]) == 0
        record = torch.load(out, weights_only=True)['meta']['mmfuse']
        merged.append(
            [r for r in record['reparameterized'] if r.get('merged')])
    assert merged[0] and not merged[1]


def test_an_image_through_the_test_pipeline(tmp_path, checkpoint):
    import cv2
    image = str(tmp_path / 'image.png')
    cv2.imwrite(image, (torch.rand(24, 32, 3) * 255).byte().numpy())
    config = tmp_path / 'image_cfg.py'
    config.write_text(textwrap.dedent(f'''
        _base_ = {DEMO_CONFIG!r}
        test_dataloader = dict(dataset=dict(pipeline=[
            dict(type='LoadImageFromFile'), dict(type='MMFusePackImage')]))
    '''))
    out = str(tmp_path / 'out.pth')
    assert main([str(config), checkpoint, out, '--image', image]) == 0


def test_the_console_command(tmp_path, checkpoint):
    command = shutil.which('mmfuse-fuse-conv-bn',
                           path=os.path.dirname(sys.executable))
    assert command, 'pip install -e . installs the mmfuse-fuse-conv-bn command'
    import subprocess
    result = subprocess.run(
        [command, DEMO_CONFIG, checkpoint, str(tmp_path / 'out.pth'),
         '--quiet'],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert load_checkpoint_safely(str(tmp_path / 'out.pth'))


def test_help(tool):
    status, out, _ = tool('--help')
    assert status == 0
    for option in ('--cfg-options', '--device', '--shape', '--raw-shape',
                   '--image', '--no-input', '--no-verify', '--rtol',
                   '--trust-checkpoint', '--allow-key-mismatch'):
        assert option in out


# ------------------------------------------------------------ bad inputs


def test_missing_config(tool, tmp_path, checkpoint):
    result = tool(str(tmp_path / 'nope.py'), checkpoint,
                  str(tmp_path / 'out.pth'))
    _assert_clean_error(*result, tmp_path, 'does not exist')


def test_config_is_a_folder(tool, tmp_path, checkpoint):
    result = tool(str(tmp_path), checkpoint, str(tmp_path / 'out.pth'))
    _assert_clean_error(*result, tmp_path, 'is not a file')


def test_broken_config(tool, tmp_path, checkpoint):
    config = tmp_path / 'broken.py'
    config.write_text('model = dict(type=\n')
    result = tool(str(config), checkpoint, str(tmp_path / 'out.pth'))
    _assert_clean_error(*result, tmp_path, 'cannot read config')


def test_config_with_an_unknown_model(tool, tmp_path, checkpoint):
    config = tmp_path / 'unknown.py'
    config.write_text("model = dict(type='NoSuchModel')\n")
    result = tool(str(config), checkpoint, str(tmp_path / 'out.pth'))
    _assert_clean_error(*result, tmp_path, 'cannot build the model')


@pytest.mark.skipif(os.geteuid() == 0,
                    reason='root reads files whatever their mode')
def test_unreadable_config_and_checkpoint(tool, tmp_path, checkpoint):
    config = tmp_path / 'config.py'
    config.write_text(open(DEMO_CONFIG).read())
    config.chmod(0)
    result = tool(str(config), checkpoint, str(tmp_path / 'out.pth'))
    _assert_clean_error(*result, tmp_path, 'is not readable')
    os.chmod(checkpoint, 0)
    result = tool(DEMO_CONFIG, checkpoint, str(tmp_path / 'out.pth'))
    _assert_clean_error(*result, tmp_path, 'is not readable')


def test_missing_checkpoint(tool, tmp_path):
    result = tool(DEMO_CONFIG, str(tmp_path / 'nope.pth'),
                  str(tmp_path / 'out.pth'))
    _assert_clean_error(*result, tmp_path, 'does not exist')


@pytest.mark.parametrize('damage', ['garbage', 'truncated'])
def test_unreadable_checkpoint(tool, tmp_path, checkpoint, damage):
    with open(checkpoint, 'rb') as stream:
        data = stream.read()
    with open(checkpoint, 'wb') as stream:
        stream.write(b'garbage\n' if damage == 'garbage' else data[:3000])
    result = tool(DEMO_CONFIG, checkpoint, str(tmp_path / 'out.pth'))
    _assert_clean_error(*result, tmp_path, 'not a readable checkpoint')


def test_checkpoint_of_another_shape(tool, tmp_path):
    other = str(tmp_path / 'wide.pth')
    save_demo_checkpoint(other, channels=16)
    result = tool(DEMO_CONFIG, other, str(tmp_path / 'out.pth'))
    _assert_clean_error(*result, tmp_path, 'size mismatch')


def test_checkpoint_of_another_architecture(tool, tmp_path, checkpoint):
    source = torch.load(checkpoint, weights_only=True)
    state = source['state_dict']
    for key in [k for k in state if k.startswith('net.block.')]:
        state[key.replace('net.block.', 'net.other_block.')] = state.pop(key)
    torch.save(source, checkpoint)
    out = str(tmp_path / 'out.pth')
    status, stdout, err = tool(DEMO_CONFIG, checkpoint, out)
    _assert_clean_error(status, stdout, err, tmp_path, 'missing keys')
    assert 'unexpected keys' in err and 'net.block.conv1.weight' in err
    assert '--allow-key-mismatch' in err
    status, stdout, err = tool(DEMO_CONFIG, checkpoint, out,
                               '--allow-key-mismatch')
    assert status == 0, stdout + err
    assert 'warning: ' in stdout and 'missing keys' in stdout


def test_checkpoint_needing_unsafe_types(tool, tmp_path, checkpoint):
    source = torch.load(checkpoint, weights_only=True)
    source['meta']['args'] = argparse.Namespace(lr=0.1)
    torch.save(source, checkpoint)
    out = str(tmp_path / 'out.pth')
    result = tool(DEMO_CONFIG, checkpoint, out)
    _assert_clean_error(*result, tmp_path, 'argparse.Namespace')
    assert '--trust-checkpoint' in result[2]
    status, stdout, err = tool(DEMO_CONFIG, checkpoint, out,
                               '--trust-checkpoint', '--quiet')
    assert status == 0, stdout + err


def test_already_fused_checkpoint(tool, tmp_path, checkpoint):
    fused = str(tmp_path / 'fused.pth')
    assert main([DEMO_CONFIG, checkpoint, fused, '--quiet']) == 0
    result = tool(DEMO_CONFIG, fused, str(tmp_path / 'out.pth'))
    _assert_clean_error(*result, tmp_path, 'already a fused checkpoint')


def test_out_is_the_checkpoint(tool, tmp_path, checkpoint):
    before = file_digest(checkpoint)
    link = tmp_path / 'link.pth'
    link.symlink_to(checkpoint)
    for out in (checkpoint, str(link)):
        status, stdout, err = tool(DEMO_CONFIG, checkpoint, out)
        assert status == 2 and 'is the checkpoint' in err, stdout + err
        assert len(err.strip().splitlines()) == 1
    assert file_digest(checkpoint) == before


def test_out_in_a_missing_folder(tool, tmp_path, checkpoint):
    result = tool(DEMO_CONFIG, checkpoint,
                  str(tmp_path / 'missing' / 'out.pth'))
    _assert_clean_error(*result, tmp_path, 'does not exist')


def test_out_in_a_read_only_folder(tool, tmp_path, checkpoint,
                                   readonly_folder):  # noqa: F811
    before = sorted(os.listdir(readonly_folder))
    result = tool(DEMO_CONFIG, checkpoint,
                  os.path.join(readonly_folder, 'out.pth'))
    _assert_clean_error(*result, tmp_path, 'not writable')
    assert sorted(os.listdir(readonly_folder)) == before


def test_out_is_a_folder(tool, tmp_path, checkpoint):
    (tmp_path / 'outdir').mkdir()
    status, stdout, err = tool(DEMO_CONFIG, checkpoint,
                               str(tmp_path / 'outdir'))
    assert status == 2 and 'is a folder' in err, stdout + err


@pytest.mark.parametrize('args, message', [
    (['--rtol', '-1'], '--rtol must be positive'),
    (['--shape', '1', '2', '3'], '--shape takes a height'),
    (['--raw-shape', '0', '3'], '--raw-shape needs'),
    (['--device', 'nonsense'], '--device nonsense'),
    (['--image', '/nonexistent.png'], 'image /nonexistent.png does not'),
])
def test_bad_options(tool, tmp_path, checkpoint, args, message):
    result = tool(DEMO_CONFIG, checkpoint, str(tmp_path / 'out.pth'), *args)
    _assert_clean_error(*result, tmp_path, message)


def test_unknown_option(tool, tmp_path, checkpoint):
    status, _, err = tool(DEMO_CONFIG, checkpoint, str(tmp_path / 'out.pth'),
                          '--frobnicate')
    assert status == 2 and 'unrecognized arguments' in err


@pytest.mark.parametrize('pair, expected', [
    ('model.head.num_classes',
     "argument --cfg-options: 'model.head.num_classes' is not KEY=VALUE"),
    ('=3', "argument --cfg-options: '=3' is not KEY=VALUE"),
    ('a=[1,2', "argument --cfg-options: 'a=[1,2': Imbalanced brackets"),
    ('model.type.x=1', '--cfg-options do not fit'),
])
def test_malformed_config_options(tool, tmp_path, checkpoint, pair,
                                  expected):
    """A pair without a key and '=', unbalanced brackets, or a key the
    config cannot take was a traceback from MMEngine (its DictAction, its
    merge), exit 1."""
    status, _, err = tool(DEMO_CONFIG, checkpoint, str(tmp_path / 'out.pth'),
                          '--cfg-options', pair)
    assert status == 2, err
    assert 'Traceback' not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith('fuse_conv_bn: error: ') and expected in last, err
    assert os.listdir(tmp_path) == ['demo.pth']


def test_config_without_a_test_pipeline(tool, tmp_path, checkpoint):
    config = tmp_path / 'nopipe.py'
    config.write_text(
        f'_base_ = {DEMO_CONFIG!r}\n'
        'test_dataloader = None\nval_dataloader = None\n'
        'train_dataloader = None\ntest_pipeline = None\n')
    result = tool(str(config), checkpoint, str(tmp_path / 'out.pth'))
    _assert_clean_error(*result, tmp_path, 'has no test pipeline')


def test_model_failing_on_the_input(tool, tmp_path, checkpoint):
    result = tool(DEMO_CONFIG, checkpoint, str(tmp_path / 'out.pth'),
                  '--raw-shape', '1', '5', '32', '32')
    _assert_clean_error(*result, tmp_path,
                        'the model failed on the example input', code=1)


# ------------------------------------------------------- interrupted write


@pytest.mark.parametrize('replaced', [False, True])
def test_interrupted_write_through_main(tmp_path, checkpoint, monkeypatch,
                                        capsys, replaced):
    """Ctrl-C while OUT is written; ``replaced``: as torch.save's zip
    writer does it, raising its own error while the interrupt unwinds
    (that error's traceback came out, exit 1)."""
    out = tmp_path / 'out.pth'
    torch.save({'state_dict': {'older': torch.zeros(1)}}, str(out))
    older = out.read_bytes()
    before = file_digest(checkpoint)

    def interrupted(obj, stream, *args, **kwargs):
        stream.write(b'x' * 1000)
        try:
            raise KeyboardInterrupt
        finally:
            if replaced:
                raise RuntimeError('[enforce fail at inline_container.cc] '
                                   'unexpected pos')

    monkeypatch.setattr(torch, 'save', interrupted)
    status = main([DEMO_CONFIG, checkpoint, str(out)])
    err = capsys.readouterr().err
    assert status == 130
    assert len(err.strip().splitlines()) == 1 and 'interrupted' in err
    assert out.read_bytes() == older
    assert sorted(os.listdir(tmp_path)) == ['demo.pth', 'out.pth']
    assert file_digest(checkpoint) == before


def test_sigterm_during_the_write(tmp_path, checkpoint):
    """A real SIGTERM to a real process, sent while OUT is being written."""
    script = tmp_path / 'terminate.py'
    script.write_text(textwrap.dedent('''
        import os, signal, sys, torch
        from mmfuse.cli import main
        real_save = torch.save

        def save_then_die(obj, stream, *args, **kwargs):
            stream.write(b'x' * 1000)
            os.kill(os.getpid(), signal.SIGTERM)
            real_save(obj, stream, *args, **kwargs)

        torch.save = save_then_die
        sys.exit(main(sys.argv[1:]))
    '''))
    before = file_digest(checkpoint)
    out = str(tmp_path / 'out.pth')
    result = run_python([str(script), DEMO_CONFIG, checkpoint, out])
    assert result.returncode == 130, result.stdout + result.stderr
    assert 'interrupted' in result.stderr
    assert sorted(os.listdir(tmp_path)) == ['demo.pth', 'terminate.py']
    assert file_digest(checkpoint) == before


def test_out_is_not_a_checkpoint_it_may_replace(tool, tmp_path, checkpoint):
    """OUT naming the image, a config the config inherits from, or any
    file that is not a checkpoint is refused (before, it was replaced);
    an earlier checkpoint at OUT is replaced."""
    import cv2
    image = str(tmp_path / 'image.png')
    cv2.imwrite(image, (torch.rand(24, 32, 3) * 255).byte().numpy())
    base = tmp_path / 'base.py'
    shutil.copy(DEMO_CONFIG, base)
    child = tmp_path / 'child.py'
    child.write_text("_base_ = ['./base.py']\n")
    for config, out, args, message in (
            (DEMO_CONFIG, image, ['--image', image], 'is the image'),
            (str(child), str(base), [], 'is not a checkpoint')):
        before = file_digest(out)
        status, stdout, err = tool(config, checkpoint, out, *args)
        assert status == 2 and message in err, stdout + err
        assert len(err.strip().splitlines()) == 1
        assert file_digest(out) == before
    out = str(tmp_path / 'again.pth')
    for _ in range(2):
        assert main([DEMO_CONFIG, checkpoint, out, '--quiet']) == 0


def test_out_gets_the_mode_of_a_new_file(tmp_path, checkpoint):
    out = str(tmp_path / 'out.pth')
    umask = os.umask(0o022)
    try:
        assert main([DEMO_CONFIG, checkpoint, out, '--quiet']) == 0
        assert os.stat(out).st_mode & 0o777 == 0o644
        os.chmod(out, 0o640)
        assert main([DEMO_CONFIG, checkpoint, out, '--quiet']) == 0
        assert os.stat(out).st_mode & 0o777 == 0o640
    finally:
        os.umask(umask)


def test_old_style_class_names_are_carried_over(tmp_path, checkpoint):
    """mmdet 2.x / mmseg 0.x checkpoints keep ``CLASSES`` and ``PALETTE``
    in meta (no dataset_meta): OUT keeps them."""
    source = torch.load(checkpoint, weights_only=False)
    old = str(tmp_path / 'old.pth')
    torch.save({'state_dict': source['state_dict'],
                'meta': {'CLASSES': ('cat', 'dog'),
                         'PALETTE': [[1, 2, 3], [4, 5, 6]]}}, old)
    out = str(tmp_path / 'out.pth')
    assert main([DEMO_CONFIG, old, out, '--quiet']) == 0
    meta = torch.load(out, weights_only=True)['meta']
    assert meta['CLASSES'] == ('cat', 'dog')
    assert meta['PALETTE'] == [[1, 2, 3], [4, 5, 6]]


@pytest.mark.parametrize('change, message', [
    (lambda sd: sd.update(_extra=3), "entry '_extra' is not a tensor (int)"),
    (lambda sd: sd.update({'module.' + next(iter(sd)): next(iter(
        sd.values())).clone()}), 'name the same weight'),
])
def test_state_dicts_that_do_not_read_as_one(tool, tmp_path, checkpoint,
                                             change, message):
    state = dict(torch.load(checkpoint, weights_only=False)['state_dict'])
    change(state)
    bad = str(tmp_path / 'bad.pth')
    torch.save({'state_dict': state}, bad)
    result = tool(DEMO_CONFIG, bad, str(tmp_path / 'out.pth'))
    _assert_clean_error(*result, tmp_path, message)


def test_a_missing_image_is_a_clean_error_with_out_existing(
        tool, tmp_path, checkpoint):
    out = str(tmp_path / 'out.pth')
    assert main([DEMO_CONFIG, checkpoint, out, '--quiet']) == 0
    missing = str(tmp_path / 'missing.png')
    status, stdout, err = tool(DEMO_CONFIG, checkpoint, out, '--image',
                               missing)
    assert status == 2 and 'missing.png' in err, stdout + err
    assert len(err.strip().splitlines()) == 1


def test_a_zip_or_pickle_that_is_no_checkpoint_is_not_replaced(
        tool, tmp_path, checkpoint):
    import pickle
    import numpy as np
    arrays = str(tmp_path / 'arrays.npz')
    np.savez(arrays, a=np.ones(2))
    results = str(tmp_path / 'results.pkl')
    with open(results, 'wb') as stream:
        pickle.dump({'a': 1}, stream)
    for out in (arrays, results):
        before = file_digest(out)
        status, stdout, err = tool(DEMO_CONFIG, checkpoint, out)
        assert status == 2 and 'is not a checkpoint' in err, stdout + err
        assert file_digest(out) == before


def test_final_table_says_what_an_error_over_rtol_was_judged_against():
    """A float32 model whose own rounding exceeds rtol: the folds stand,
    judged against its float64 copy, and the tool's final table says so
    next to the error over rtol (which alone would read as a failure)."""
    from fusion_checks import CoarseRounding

    import mmfuse
    from mmfuse.cli import _final_table, _Progress
    from mmfuse.testing import randomize_norm_stats
    torch.manual_seed(0)
    model = randomize_norm_stats(
        torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16),
            CoarseRounding(), torch.nn.Conv2d(16, 16, 3, padding=1),
            torch.nn.BatchNorm2d(16), CoarseRounding(),
            torch.nn.Conv2d(16, 8, 3, padding=1),
            torch.nn.BatchNorm2d(8)).eval(),
        seed=0)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    report = mmfuse.fuse_model(model, (x, ))
    assert report.max_rel_error > report.rtol  # the premise
    table = _final_table(report, _Progress(5, quiet=True), (1, 2), (1, 2),
                         'out.pth', '0' * 64)
    rows = {
        line[:line.index('  ')]: line[line.index('  '):].strip()
        for line in table.splitlines() if '  ' in line
    }
    assert rows['rel error against float64'] == (
        f'{report.precise_rel_error:.3g} (the unfused model: '
        f'{report.unfused_precise_rel_error:.3g})')
    assert report.precise_rel_error <= 2 * report.unfused_precise_rel_error
    assert 'folds judged on' not in rows  # the twin was not needed


# ---------------------------------------------------- real configs, dtypes


def _pose_checkpoint(tmp_path) -> Tuple[str, str]:
    """mmpose RTMPose-t's shipped config and a checkpoint of random
    weights and norm statistics for it."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmpose.registry import MODELS
    from real_models import config_root
    from mmfuse.testing import randomize_norm_stats
    config = os.path.join(config_root('mmpose'), 'body_2d_keypoint',
                          'rtmpose', 'coco',
                          'rtmpose-t_8xb256-420e_coco-256x192.py')
    cfg = Config.fromfile(config)
    init_default_scope('mmpose')
    model = randomize_norm_stats(MODELS.build(cfg.model).eval(), seed=1)
    path = str(tmp_path / 'pose.pth')
    torch.save({'state_dict': model.state_dict()}, path)
    return config, path


@pytest.mark.parametrize('how', ['synthetic', 'image', 'raw'])
def test_a_top_down_pose_config_is_fused_with_an_input(tmp_path, capsys,
                                                       how):
    """A top-down pose pipeline crops the person's box: the synthetic
    image had none ('KeyError: bbox', then a hint to pass --image, which
    failed the same way), and --raw-shape called the pose estimator
    without its data samples.  The whole image is the box now, and a raw
    tensor is given as the pipeline's input is (in 'tensor' mode)."""
    import cv2
    config, checkpoint = _pose_checkpoint(tmp_path)
    args = {'synthetic': [],
            'image': ['--image', str(tmp_path / 'person.png')],
            'raw': ['--raw-shape', '1', '3', '256', '192']}[how]
    cv2.imwrite(str(tmp_path / 'person.png'),
                (torch.rand(200, 120, 3) * 255).byte().numpy())
    out = str(tmp_path / 'out.pth')
    assert main([config, checkpoint, out, '--quiet', *args]) == 0, \
        capsys.readouterr().err
    report = torch.load(out, weights_only=True)['meta']['mmfuse']['report']
    assert report['verified'] and report['num_folded'] > 30
    assert report['max_rel_error'] < 1e-4


def test_a_float16_checkpoint_is_noted(tmp_path, checkpoint, capsys):
    """Its tensors load into the float32 model the config builds, which is
    fused and written in float32: said, not silent (the file doubled)."""
    source = torch.load(checkpoint, weights_only=True)
    source['state_dict'] = {
        key: value.half() if value.is_floating_point() else value
        for key, value in source['state_dict'].items()
    }
    half = str(tmp_path / 'half.pth')
    torch.save(source, half)
    out = str(tmp_path / 'out.pth')
    assert main([DEMO_CONFIG, half, out]) == 0
    printed = capsys.readouterr().out
    assert 'note: CHECKPOINT holds float16 tensors, loaded into the ' \
        'float32 model' in printed
    weights = load_checkpoint_safely(out)['state_dict'].tensors()
    assert {value.dtype for value in weights.values()
            if value.is_floating_point()} == {torch.float32}
    assert main([DEMO_CONFIG, checkpoint, str(tmp_path / 'out32.pth')]) == 0
    assert 'note: CHECKPOINT' not in capsys.readouterr().out


def _mmpretrain_checkpoint(tmp_path, config: str) -> Tuple[str, str]:
    """A shipped mmpretrain config (without its download key) and a
    checkpoint of random weights and norm statistics for its model."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS
    from real_models import config_root, strip_pretrained
    from mmfuse.testing import randomize_norm_stats
    cfg = Config.fromfile(os.path.join(config_root('mmpretrain'), config))
    cfg.model = strip_pretrained(cfg.model.to_dict())
    path = str(tmp_path / 'config.py')
    cfg.dump(path)
    init_default_scope('mmpretrain')
    model = randomize_norm_stats(MODELS.build(cfg.model).eval(), seed=1)
    checkpoint = str(tmp_path / 'model.pth')
    torch.save({'state_dict': model.state_dict()}, checkpoint)
    return path, checkpoint


def test_the_top_level_data_preprocessor_is_the_models(tmp_path, capsys):
    """mmpretrain keeps mean, std and num_classes in a top-level
    ``data_preprocessor``, which MMEngine's Runner gives the model: the
    tool built the model without it (fused on un-normalised input, and
    LeViT's batch augments failed the test pipeline, exit 2)."""
    from mmfuse.cli import _build_model
    config, checkpoint = _mmpretrain_checkpoint(
        tmp_path, os.path.join('levit', 'levit-128s_8xb256_in1k.py'))
    model, _ = _build_model(argparse.Namespace(config=config,
                                               cfg_options=None))
    preprocessor = model.data_preprocessor
    assert preprocessor.mean.flatten().tolist() == pytest.approx(
        [123.675, 116.28, 103.53])
    assert preprocessor.num_classes == 1000
    out = str(tmp_path / 'out.pth')
    assert main([config, checkpoint, out, '--quiet']) == 0, \
        capsys.readouterr().err
    report = torch.load(out, weights_only=True)['meta']['mmfuse']['report']
    assert report['verified'] and report['num_folded'] > 30
