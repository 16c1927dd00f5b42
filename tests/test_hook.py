"""FuseConvBNHook in a real MMEngine Runner.

The demo config (``configs/demo/``: the demo net on synthetic images with a
real metric) drives most tests; the round trips run real mmdet and mmseg
models through the tool and through mmdet's and mmseg's own
``tools/test.py``.
"""
import importlib
import os
from typing import Optional

import pytest
import torch
from hook_helpers import (DEMO_CONFIG, REAL, build_from_config, demo_config,
                          load_dump, make_demo_checkpoint,
                          make_real_checkpoint, package_tool,
                          prediction_tensors, run_python, state_digest,
                          write_real_config)
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.model import BaseModel, BaseTTAModel
from mmengine.registry import HOOKS, MODELS, DefaultScope
from mmengine.runner import Runner, load_checkpoint
from torch import nn

from mmfuse import FuseConvBNHook, FusionError
from mmfuse.hook import _settings
from mmfuse.checkpoint import (CheckpointError, fused_record_of,
                               load_checkpoint_safely)
from mmfuse.cli import main as tool_main
from mmfuse.demo_model import DemoClassifier
from mmfuse.plan import NOT_RUN
from mmfuse.testing import randomize_norm_stats


@pytest.fixture(scope='module')
def demo_checkpoint(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp('demo_checkpoint')
    return make_demo_checkpoint(str(folder / 'demo.pth'))


@pytest.fixture(scope='module')
def fused_demo_checkpoint(tmp_path_factory, demo_checkpoint) -> str:
    out = str(tmp_path_factory.mktemp('fused') / 'demo_fused.pth')
    assert tool_main([DEMO_CONFIG, demo_checkpoint, out, '--quiet']) == 0
    return out


def _test_run(cfg, load_from: str):
    cfg.load_from = load_from
    runner = Runner.from_cfg(cfg)
    metrics = runner.test()
    return runner, metrics


def _hook_of(runner) -> FuseConvBNHook:
    hooks = [h for h in runner.hooks if isinstance(h, FuseConvBNHook)]
    assert len(hooks) == 1
    return hooks[0]


def _norm_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm)
               for m in model.modules())


def _assert_metrics_close(fused, unfused, rel=1e-5):
    assert fused.keys() == unfused.keys()
    assert fused['demo/accuracy'] == unfused['demo/accuracy']
    for key in ('demo/mean_logit', 'demo/logit_checksum'):
        assert fused[key] == pytest.approx(unfused[key], rel=rel)


# ----------------------------------------------------------------- building


@pytest.mark.parametrize('scope', ['mmengine', 'mmdet', 'mmseg',
                                   'mmpretrain'])
def test_hook_is_found_from_every_default_scope(scope):
    with DefaultScope.overwrite_default_scope(scope):
        hook = HOOKS.build(dict(type='FuseConvBNHook'))
    assert isinstance(hook, FuseConvBNHook)
    if scope != 'mmengine':
        registry = importlib.import_module(f'{scope}.registry')
        hook = registry.HOOKS.build(dict(type='FuseConvBNHook'))
        assert isinstance(hook, FuseConvBNHook)


@pytest.mark.parametrize('config', [
    'mmdet/retinanet_r50_fpn_1x_coco_fuse.py',
    'mmseg/pspnet_r50-d8_4xb2-40k_cityscapes-512x1024_fuse.py',
    'demo/demo_classifier_fuse.py',
])
def test_example_configs_add_the_hook(config):
    cfg = Config.fromfile(os.path.join(os.path.dirname(DEMO_CONFIG), '..',
                                       config))
    assert 'mmfuse' in cfg.custom_imports['imports']
    assert cfg.custom_hooks == [dict(type='FuseConvBNHook')]
    assert build_from_config(
        os.path.join(os.path.dirname(DEMO_CONFIG), '..', config))


@pytest.mark.parametrize('options, error, message', [
    (dict(fuse_test='yes'), TypeError, 'fuse_test must be True or False'),
    (dict(fuse_val=1), TypeError, 'fuse_val must be True or False'),
    (dict(reparameterize='no'), TypeError,
     'reparameterize must be True or False'),
    (dict(rtol='tight'), TypeError, 'rtol must be a number'),
    (dict(rtol=-1e-4), ValueError, 'rtol must be positive'),
    (dict(rtol=float('inf')), ValueError, 'rtol must be positive'),
    (dict(rtol=1e-3, verify=False), ValueError, 'verify=False'),
    (dict(fuse_test=False), ValueError, 'only load fused checkpoints'),
    (dict(fuse_tests=True), TypeError, "unexpected keyword argument"),
])
def test_wrong_options_fail_when_the_hook_is_built(options, error, message):
    with pytest.raises(error, match=message):
        HOOKS.build(dict(type='FuseConvBNHook', **options))


def test_wrong_option_fails_when_the_runner_is_built(tmp_path):
    cfg = demo_config(str(tmp_path), hook=dict(rtol=0))
    with pytest.raises(ValueError, match='rtol must be positive'):
        Runner.from_cfg(cfg)


# --------------------------------------------------------------------- test


def test_test_metrics_equal_the_unfused_run(tmp_path, demo_checkpoint):
    _, unfused = _test_run(demo_config(str(tmp_path / 'plain')),
                           demo_checkpoint)
    runner, fused = _test_run(demo_config(str(tmp_path / 'hook'), fuse=True),
                              demo_checkpoint)
    _assert_metrics_close(fused, unfused)
    assert fused != unfused  # the fused model really ran
    model = runner.model
    assert not model.training
    assert fused_record_of(model) is not None
    assert _norm_count(model) < _norm_count(build_from_config(DEMO_CONFIG))
    report = _hook_of(runner).last_report
    assert report.verified and report.max_rel_error < 1e-4
    assert len(report.folded) == len(
        fused_record_of(model)['plan']['folds']) > 5
    log_files = list((tmp_path / 'hook').rglob('*.log'))
    text = ''.join(path.read_text() for path in log_files)
    assert text.count('FuseConvBNHook (test): mmfuse: folded') == 1
    assert 'into / reason' in text  # the table, logged once


def test_structural_fusion_without_the_batch(tmp_path, demo_checkpoint):
    _, unfused = _test_run(demo_config(str(tmp_path / 'plain')),
                           demo_checkpoint)
    runner, fused = _test_run(
        demo_config(str(tmp_path / 'hook'), hook=dict(use_batch=False)),
        demo_checkpoint)
    _assert_metrics_close(fused, unfused)
    report = _hook_of(runner).last_report
    assert report.mode == 'structural' and not report.verified
    assert report.folded


def test_a_second_test_does_not_fuse_again(tmp_path, demo_checkpoint):
    runner, first = _test_run(demo_config(str(tmp_path), fuse=True),
                              demo_checkpoint)
    report = _hook_of(runner).last_report
    digest = state_digest(runner.model.state_dict())
    second = runner.test()
    assert second == first
    assert _hook_of(runner).last_report is report
    assert state_digest(runner.model.state_dict()) == digest


# ------------------------------------------------------- fused checkpoints


def test_fused_checkpoint_loads_through_the_runner(tmp_path, demo_checkpoint,
                                                   fused_demo_checkpoint):
    _, in_memory = _test_run(demo_config(str(tmp_path / 'mem'), fuse=True),
                             demo_checkpoint)
    runner, loaded = _test_run(
        demo_config(str(tmp_path / 'ckpt'), fuse=True),
        fused_demo_checkpoint)
    assert loaded == in_memory
    checkpoint = load_checkpoint_safely(fused_demo_checkpoint)
    state = runner.model.state_dict()
    weights = checkpoint['state_dict'].tensors()
    assert state.keys() == weights.keys()
    for key, value in weights.items():
        assert torch.equal(state[key], value), key
    record = fused_record_of(runner.model)
    assert record['plan'] == checkpoint['meta']['mmfuse']['plan']
    assert record['reparameterized'] == \
        checkpoint['meta']['mmfuse']['reparameterized']
    assert _hook_of(runner).last_report is None  # loaded, not fused again


def test_without_the_hook_a_fused_checkpoint_is_refused(
        tmp_path, fused_demo_checkpoint):
    """Plain loaders (the runner's, ``load_checkpoint``, mmdet's
    ``init_detector``) load with ``strict=False``: a fused checkpoint
    loaded into the model as built from the config half-loaded with a
    warning and ran with default norms (0.21 off on the demo)."""
    with pytest.raises(CheckpointError, match='FuseConvBNHook'):
        _test_run(demo_config(str(tmp_path / 'nohook')),
                  fused_demo_checkpoint)
    with pytest.raises(CheckpointError, match='load_fused_checkpoint'):
        load_checkpoint(build_from_config(DEMO_CONFIG),
                        fused_demo_checkpoint)
    with pytest.raises(CheckpointError, match='fused checkpoint'):
        build_from_config(DEMO_CONFIG).load_state_dict(
            torch.load(fused_demo_checkpoint,
                       weights_only=True)['state_dict'])


@MODELS.register_module(name='MMFuseTestFirstAugTTA', force=True)
class FirstAugTTA(BaseTTAModel):
    """What ``tools/test.py --tta`` wraps the model in (mmdet's, mmseg's
    and mmpretrain's TTA models merge otherwise; the wrapping is the
    same)."""

    def merge_preds(self, data_samples_list):
        return [samples[0] for samples in data_samples_list]


def _with_tta(cfg):
    cfg.model = dict(type='MMFuseTestFirstAugTTA', module=cfg.model)
    cfg.test_dataloader.dataset.pipeline = [
        dict(type='TestTimeAug', transforms=[[dict(type='MMFusePackImage')]])
    ]
    return cfg


def test_test_time_augmentation(tmp_path, demo_checkpoint,
                                fused_demo_checkpoint):
    """A ``BaseTTAModel`` is unwrapped as MMEngine's loader unwraps it, and
    the first augmentation of the first batch is the example input (before,
    the hook called the wrapper, which raised, and a fused checkpoint did
    not fit it)."""
    _, unfused = _test_run(_with_tta(demo_config(str(tmp_path / 'plain'))),
                           demo_checkpoint)
    runner, fused = _test_run(
        _with_tta(demo_config(str(tmp_path / 'hook'), fuse=True)),
        demo_checkpoint)
    _assert_metrics_close(fused, unfused)
    report = _hook_of(runner).last_report
    assert report.verified and report.folded
    assert fused_record_of(runner.model.module) is not None
    _, loaded = _test_run(
        _with_tta(demo_config(str(tmp_path / 'ckpt'), fuse=True)),
        fused_demo_checkpoint)
    _assert_metrics_close(loaded, unfused)


def test_a_fused_checkpoint_is_not_trained(tmp_path, fused_demo_checkpoint):
    """``load_from`` a fused checkpoint in a training run: the optimizer,
    built before it loads, held the unfused parameters (20 of 41 were
    trained by nothing, and no norm was left), silently."""
    cfg = demo_config(str(tmp_path), fuse=True)
    cfg.load_from = fused_demo_checkpoint
    runner = Runner.from_cfg(cfg)
    with pytest.raises(FusionError, match='fused checkpoint, which cannot '
                       'be trained'):
        runner.train()
    assert runner.iter == 0


def test_training_is_not_resumed_from_a_fused_checkpoint(
        tmp_path, fused_demo_checkpoint):
    """``resume`` failed later with ``KeyError: 'epoch'`` (a fused
    checkpoint keeps no training state), the model converted already."""
    cfg = demo_config(str(tmp_path), fuse=True)
    cfg.load_from = fused_demo_checkpoint
    cfg.resume = True
    runner = Runner.from_cfg(cfg)
    with pytest.raises(FusionError, match='cannot resume training from a '
                       'fused checkpoint'):
        runner.train()
    assert fused_record_of(runner.model) is None


class _Unprintable:

    def __repr__(self):
        raise RuntimeError('no repr')


def test_settings_of_odd_attributes():
    """The validation copy's settings are read from every attribute: odd
    values must not fail the validation (a set whose items cannot be
    printed did), and equal settings read alike."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1))
    model[0].odd = {_Unprintable(), _Unprintable()}
    model[0].mixed = {1, 'a', None}
    model[0].nan = float('nan')
    model[0].config = dict(mode='a', nested=dict(scales=[1, 2]))
    before = _settings(model)
    assert _settings(model) == before
    model[0].config['nested']['scales'].append(3)
    assert _settings(model) != before


EMA = dict(type='EMAHook', momentum=0.2, update_buffers=True, priority=49)


def test_ema_hook_at_test_time(tmp_path, demo_checkpoint,
                               fused_demo_checkpoint):
    plain = demo_config(str(tmp_path / 'plain'))
    plain.custom_hooks = [EMA]
    _, unfused = _test_run(plain, demo_checkpoint)
    hooked = demo_config(str(tmp_path / 'mem'), fuse=True)
    hooked.custom_hooks = [EMA, dict(type='FuseConvBNHook')]
    runner, in_memory = _test_run(hooked, demo_checkpoint)
    _assert_metrics_close(in_memory, unfused)
    ema_hook = [h for h in runner.hooks if type(h).__name__ == 'EMAHook'][0]
    assert fused_record_of(ema_hook.ema_model.module) == \
        fused_record_of(runner.model)
    loaded_cfg = demo_config(str(tmp_path / 'ckpt'), fuse=True)
    loaded_cfg.custom_hooks = [EMA, dict(type='FuseConvBNHook')]
    _, loaded = _test_run(loaded_cfg, fused_demo_checkpoint)
    assert loaded == in_memory


# --------------------------------------------------- validation in training


def _train(work_dir: str, hook: dict, load_from: str):
    cfg = demo_config(work_dir, hook=hook)
    cfg.custom_hooks = [EMA] + list(cfg.get('custom_hooks', []))
    cfg.load_from = load_from
    runner = Runner.from_cfg(cfg)
    val_metrics = []

    class Recorder(Hook):
        priority = 'VERY_LOW'

        def after_val_epoch(self, runner, metrics=None):
            val_metrics.append(dict(metrics))

    runner.register_hook(Recorder())
    runner.train()
    return runner, val_metrics


def test_validation_on_a_fused_copy_leaves_training_untouched(
        tmp_path, demo_checkpoint):
    plain, plain_val = _train(str(tmp_path / 'plain'), None, demo_checkpoint)
    fused, fused_val = _train(
        str(tmp_path / 'hook'), dict(fuse_test=False, fuse_val=True),
        demo_checkpoint)
    assert len(plain_val) == len(fused_val) == 2
    for with_hook, without in zip(fused_val, plain_val):
        _assert_metrics_close(with_hook, without, rel=1e-4)
    assert fused_val != plain_val  # validation really ran fused
    hook = _hook_of(fused)
    assert hook.last_report is not None and hook.last_report.folded
    # Training weights, BN statistics, optimizer state and EMA weights.
    assert fused_record_of(fused.model) is None
    assert state_digest(fused.model.state_dict()) == \
        state_digest(plain.model.state_dict())
    ema = [h for h in fused.hooks if type(h).__name__ == 'EMAHook'][0]
    plain_ema = [h for h in plain.hooks if type(h).__name__ == 'EMAHook'][0]
    assert state_digest(ema.ema_model.state_dict()) == \
        state_digest(plain_ema.ema_model.state_dict())
    optim = fused.optim_wrapper.state_dict()['state']
    plain_optim = plain.optim_wrapper.state_dict()['state']
    assert optim.keys() == plain_optim.keys()
    for key in optim:
        assert torch.equal(optim[key]['momentum_buffer'],
                           plain_optim[key]['momentum_buffer'])
    # The checkpoints written during training are the same too.
    for epoch in (1, 2):
        mine = torch.load(tmp_path / 'hook' / f'epoch_{epoch}.pth',
                          weights_only=False)
        theirs = torch.load(tmp_path / 'plain' / f'epoch_{epoch}.pth',
                            weights_only=False)
        assert state_digest(mine['state_dict']) == \
            state_digest(theirs['state_dict'])


@MODELS.register_module(name='MMFuseTestTeacherStudent', force=True)
class TeacherStudent(BaseModel):
    """mmdet's semi-supervised detectors, in small: ``semi_test_cfg``
    says which of two models predicts."""

    def __init__(self, data_preprocessor=None):
        super().__init__(data_preprocessor=data_preprocessor)
        torch.manual_seed(0)
        self.teacher = randomize_norm_stats(DemoClassifier(8), 0)
        torch.manual_seed(1)
        self.student = randomize_norm_stats(DemoClassifier(8), 1)
        self.semi_test_cfg = dict(predict_on='teacher')

    def forward(self, inputs, data_samples=None, mode='tensor'):
        return getattr(self, self.semi_test_cfg['predict_on'])(
            inputs, data_samples, mode)


def _teacher_student_val(work_dir: str, hook: Optional[dict]):
    import mmdet.engine  # noqa: F401 (registers TeacherStudentValLoop)
    cfg = demo_config(work_dir, hook=hook)
    cfg.model = dict(type='MMFuseTestTeacherStudent',
                     data_preprocessor=cfg.model.data_preprocessor)
    cfg.val_cfg = dict(type='mmdet.TeacherStudentValLoop')
    runner = Runner.from_cfg(cfg)
    metrics = {}

    class Recorder(Hook):  # (the loop's run returns nothing)
        priority = 'VERY_LOW'

        def after_val_epoch(self, runner, metrics=None):
            recorded.update(metrics)

    recorded = metrics
    runner.register_hook(Recorder())
    runner.val()
    return runner, metrics


def test_a_loop_that_switches_the_model_between_passes(tmp_path):
    """mmdet's ``TeacherStudentValLoop`` sets ``predict_on`` on the model
    it holds between its two passes: the fused copy made on the first
    batch went on predicting with the teacher (the student's metrics were
    the teacher's)."""
    _, plain = _teacher_student_val(str(tmp_path / 'plain'), None)
    runner, fused = _teacher_student_val(
        str(tmp_path / 'hook'), dict(fuse_test=False, fuse_val=True))
    assert plain['student/demo/logit_checksum'] != pytest.approx(
        plain['teacher/demo/logit_checksum'], rel=1e-3)
    for role in ('teacher', 'student'):
        key = f'{role}/demo/logit_checksum'
        assert fused[key] == pytest.approx(plain[key], rel=1e-5)
    report = _hook_of(runner).last_report
    # The student ran; the teacher's layers fold from structure alone.
    ran = [fold.norm for fold in report.folded if NOT_RUN not in
           fold.evidence]
    assert ran and all(name.startswith('student.') for name in ran)
    assert all(fold.norm.startswith('teacher.') for fold in report.folded
               if fold.norm not in ran)
    assert runner.model.semi_test_cfg['predict_on'] == 'teacher'


# ------------------------------------------------ real models, round trip


@pytest.mark.parametrize('package', sorted(REAL))
def test_real_model_round_trip(tmp_path, package):
    """tool -> fused checkpoint -> the codebase's own tools/test.py with the
    hook -> the same predictions as fusing in memory."""
    memory_dump = str(tmp_path / 'memory.pkl')
    loaded_dump = str(tmp_path / 'loaded.pkl')
    memory_cfg = write_real_config(str(tmp_path / 'memory_cfg.py'), package,
                                   memory_dump)
    loaded_cfg = write_real_config(str(tmp_path / 'loaded_cfg.py'), package,
                                   loaded_dump)
    source = make_real_checkpoint(memory_cfg, str(tmp_path / 'source.pth'))
    fused = str(tmp_path / 'fused.pth')
    assert tool_main([memory_cfg, source, fused, '--quiet']) == 0

    # In memory: the runner loads the unfused checkpoint, the hook fuses.
    cfg = Config.fromfile(memory_cfg)
    cfg.work_dir = str(tmp_path / 'memory')
    cfg.load_from = source
    runner = Runner.from_cfg(cfg)
    runner.test()
    report = _hook_of(runner).last_report
    assert report.verified and len(report.folded) >= 20

    # The fused checkpoint through the codebase's unchanged test script.
    result = run_python([
        package_tool(package), loaded_cfg, fused, '--work-dir',
        str(tmp_path / 'loaded')
    ], timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[
        -3000:]
    output = result.stdout + result.stderr
    assert 'loading a fused checkpoint' in output
    assert 'missing keys' not in output and 'unexpected key' not in output

    memory, loaded = load_dump(memory_dump), load_dump(loaded_dump)
    assert len(memory) == len(loaded) == 4
    for mine, theirs in zip(loaded, memory):
        mine, theirs = prediction_tensors(mine), prediction_tensors(theirs)
        assert len(mine) == len(theirs) > 0
        assert sum(t.numel() for t in mine) > 100
        for a, b in zip(mine, theirs):
            assert a.shape == b.shape
            assert torch.allclose(a.double(), b.double(), rtol=1e-5,
                                  atol=1e-5)


def _broken_fuse_model(*args, **kwargs):
    raise RuntimeError('simulated failure inside fuse_model')


def test_a_failed_fusion_validates_unfused(tmp_path, demo_checkpoint,
                                           monkeypatch):
    plain, plain_val = _train(str(tmp_path / 'plain'), None, demo_checkpoint)
    monkeypatch.setattr('mmfuse.hook.fuse_model', _broken_fuse_model)
    hooked, hooked_val = _train(
        str(tmp_path / 'hook'), dict(fuse_test=False, fuse_val=True),
        demo_checkpoint)
    assert hooked_val == plain_val  # validated unfused, exactly
    log = ''.join(p.read_text() for p in (tmp_path / 'hook').rglob('*.log'))
    # Both validations fell back; MMLogger shows a repeated warning once.
    assert log.count('simulated failure inside fuse_model; validating the '
                     'unfused model') == 1
    assert state_digest(hooked.model.state_dict()) == \
        state_digest(plain.model.state_dict())


def test_a_failed_fusion_fails_the_test(tmp_path, demo_checkpoint,
                                        monkeypatch):
    monkeypatch.setattr('mmfuse.hook.fuse_model', _broken_fuse_model)
    with pytest.raises(RuntimeError, match='simulated failure'):
        _test_run(demo_config(str(tmp_path), fuse=True), demo_checkpoint)
