"""Fused checkpoints: format, structure rebuild, safe loading, atomic
writes."""
import argparse
import copy
import hashlib
import os
import pickle

import numpy as np
import pytest
import torch
from hook_helpers import readonly_folder  # noqa: F401 (a fixture)
from hook_helpers import (DEMO_CONFIG, build_from_config, demo_config,
                          make_demo_checkpoint, make_real_checkpoint,
                          write_real_config)
from mmengine.config import Config, ConfigDict
from mmengine.logging import HistoryBuffer
from mmengine.runner import Runner

import mmfuse
from mmfuse.checkpoint import (CheckpointError, FusedStateDict,
                               UnsafeCheckpointError, atomic_save,
                               convert_to_fused_structure, file_sha256,
                               fused_meta, fused_record_of,
                               load_checkpoint_safely, load_fused_checkpoint,
                               make_fused_checkpoint, mark_fused,
                               plain_value, save_fused_checkpoint)
from mmfuse.demo_model import DemoClassifier
from mmfuse.plan import FusionPlan
from mmfuse.testing import randomize_norm_stats


def _demo_model(seed: int = 0) -> DemoClassifier:
    torch.manual_seed(seed)
    return randomize_norm_stats(DemoClassifier(), seed).eval()


def _inputs(seed: int = 1):
    return (torch.randn(2, 3, 32, 32,
                        generator=torch.Generator().manual_seed(seed)), )


def _outputs_equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(
        torch.utils._pytree.tree_leaves(a),
        torch.utils._pytree.tree_leaves(b)))


@pytest.fixture
def source_checkpoint(tmp_path) -> str:
    return make_demo_checkpoint(str(tmp_path / 'source.pth'))


@pytest.fixture
def fused_pair(tmp_path, source_checkpoint):
    """A fused demo model and its fused checkpoint file."""
    source = torch.load(source_checkpoint, weights_only=True)
    model = DemoClassifier().eval()
    model.load_state_dict(source['state_dict'])
    report = mmfuse.fuse_model(model, _inputs())
    path = str(tmp_path / 'fused.pth')
    save_fused_checkpoint(model, report, path, source_checkpoint=source,
                          source_path=source_checkpoint,
                          config_path=DEMO_CONFIG,
                          cfg_options={'model.channels': 8})
    return model, report, path


# ------------------------------------------------------------------ format


def test_fused_checkpoint_format(fused_pair, source_checkpoint):
    model, report, path = fused_pair
    # Plain weights_only loading where mmfuse is imported.
    checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    assert set(checkpoint) == {'state_dict', 'meta'}
    weights = checkpoint['state_dict']
    assert isinstance(weights, FusedStateDict)
    assert weights.tensors().keys() == model.state_dict().keys()
    assert weights.tensors()._metadata == model.state_dict()._metadata
    for key, value in model.state_dict().items():
        assert torch.equal(weights[key], value), key
    copied = weights.copy()
    assert isinstance(copied, FusedStateDict)
    assert copied.tensors()._metadata == model.state_dict()._metadata
    for listing in (list, reversed, dict, lambda w: w.popitem()):
        with pytest.raises(CheckpointError, match='load_fused_checkpoint'):
            listing(weights)
    meta = checkpoint['meta']
    assert meta['dataset_meta'] == {
        'classes': tuple(f'class_{i}' for i in range(10))
    }
    record = meta['mmfuse']
    assert record['format_version'] == 2
    assert record['mmfuse_version'] == mmfuse.__version__
    with open(source_checkpoint, 'rb') as stream:
        assert record['source_checkpoint'] == {
            'filename': 'source.pth',
            'sha256': hashlib.sha256(stream.read()).hexdigest()
        }
    assert record['config'] == {
        'filename': 'demo_classifier.py',
        'cfg_options': {'model.channels': 8}
    }
    assert record['plan'] == report.plan.to_dict()
    assert FusionPlan.from_dict(record['plan']).folds == report.folded
    assert record['reparameterized'] == [
        r for r in report.reparameterized if r['merged']
    ]
    assert record['report']['num_folded'] == len(report.folded)
    assert record['report']['verified'] is True
    assert record['created'].endswith('+00:00')
    assert fused_meta(checkpoint) is record


def test_source_meta_is_made_plain(tmp_path):
    model = _demo_model()
    report = mmfuse.fuse_model(model, _inputs())
    source = {'meta': {'dataset_meta': {
        'classes': ('a', 'b'),
        'palette': np.array([[1, 2, 3], [4, 5, 6]], dtype=np.uint8),
        'count': np.int64(2),
        'weights': [np.float32(0.5)],
        'odd': argparse.Namespace(x=1),
    }, 'message_hub': HistoryBuffer()}}
    notes = []
    checkpoint = make_fused_checkpoint(model, report, source, notes=notes)
    dataset_meta = checkpoint['meta']['dataset_meta']
    assert dataset_meta['palette'] == [[1, 2, 3], [4, 5, 6]]
    assert dataset_meta['count'] == 2 and type(dataset_meta['count']) is int
    assert dataset_meta['weights'] == [0.5]
    assert dataset_meta['odd'] == 'Namespace(x=1)'
    assert notes == ['meta.dataset_meta.odd (Namespace) stored as text']
    assert 'message_hub' not in checkpoint['meta']
    path = str(tmp_path / 'plain.pth')
    atomic_save(checkpoint, path)
    assert torch.load(path, weights_only=True)['meta']['dataset_meta'] == \
        dataset_meta


def test_numpy_scalars_that_subclass_python_ones_are_made_plain(tmp_path):
    """``np.float64`` and ``np.str_`` are ``float`` and ``str`` too: they
    were kept, and the tool refused to write the checkpoint (a
    ``weights_only`` load rejects numpy's classes)."""
    import enum

    class Level(enum.IntEnum):
        HIGH = 3

    value = {np.str_('name'): np.str_('cat'), 'score': np.float64(0.5),
             'level': Level.HIGH, 'flags': np.array([True, False]),
             'objects': np.array([argparse.Namespace(x=1)], dtype=object)}
    notes = []
    plain = plain_value(value, notes)
    assert plain == {'name': 'cat', 'score': 0.5, 'level': 3,
                     'flags': [True, False], 'objects': ['Namespace(x=1)']}
    assert [type(key) for key in plain] == [str] * 5
    assert (type(plain['name']), type(plain['score']),
            type(plain['level'])) == (str, float, int)
    assert notes == ['meta.objects[0] (Namespace) stored as text']
    path = str(tmp_path / 'plain.pth')
    atomic_save({'meta': plain}, path)
    assert torch.load(path, weights_only=True)['meta'] == plain


def test_a_checkpoint_weights_only_refuses_names_the_class(tmp_path):
    path = str(tmp_path / 'odd.pth')
    with pytest.raises(CheckpointError) as raised:
        atomic_save({'meta': {'odd': argparse.Namespace(x=1)}}, path)
    message = str(raised.value)
    assert 'Namespace' in message and '\n' not in message
    assert '\x1b' not in message
    assert not os.path.exists(path)


def test_plain_value_keeps_plain_values():
    value = {'a': [1, 2.5, 'x', None, True], 'b': (1, ), 3: b'raw'}
    assert plain_value(value) == value


def test_a_newer_format_is_refused():
    checkpoint = {'meta': {'mmfuse': {'format_version': 99, 'plan': {}}}}
    with pytest.raises(CheckpointError, match='newer'):
        fused_meta(checkpoint)
    assert fused_meta({'meta': {'epoch': 3}}) is None
    assert fused_meta({'state_dict': {}}) is None


# ------------------------------------------------------ structure rebuild


def test_apply_plan_recreates_the_fused_structure():
    """The claim of ``mmfuse.apply_plan``: on a freshly built model it
    recreates the fused structure and the fused state dict loads with no
    missing or unexpected keys (folds only, no re-parameterization)."""
    fused = _demo_model()
    report = mmfuse.fuse_model(fused, _inputs(), reparameterize=False)
    assert any(t.copy for f in report.folded for t in f.convs)
    fresh = DemoClassifier().eval()
    mmfuse.apply_plan(fresh, FusionPlan.from_dict(report.plan.to_dict()))
    result = fresh.load_state_dict(fused.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    folded = [f.norm for f in report.folded]
    for norm in folded:
        assert isinstance(fresh.get_submodule(norm), torch.nn.Identity)
    with torch.no_grad():
        assert _outputs_equal(fresh(*_inputs()), fused(*_inputs()))


def test_convert_rebuilds_merged_blocks_and_folds(fused_pair):
    model, report, path = fused_pair
    assert any(r['merged'] for r in report.reparameterized)
    checkpoint = load_checkpoint_safely(path)
    fresh = DemoClassifier()  # training mode, default values
    record = convert_to_fused_structure(fresh, checkpoint)
    assert record['plan'] == checkpoint['meta']['mmfuse']['plan']
    assert fresh.training  # the mode is left as it was
    result = fresh.load_state_dict(checkpoint['state_dict'].tensors(),
                                   strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    with pytest.raises(CheckpointError, match='already fused'):
        convert_to_fused_structure(fresh, checkpoint)


def test_load_fused_checkpoint_matches_the_fused_model(fused_pair):
    model, _, path = fused_pair
    fresh = DemoClassifier()
    meta = load_fused_checkpoint(fresh, path)
    assert not fresh.training
    assert meta['mmfuse']['plan'] == fused_record_of(fresh)['plan']
    with torch.no_grad():
        assert _outputs_equal(fresh(*_inputs()), model(*_inputs()))


def test_a_record_for_another_model_is_refused(fused_pair):
    _, _, path = fused_pair
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)).eval()
    with pytest.raises(CheckpointError, match='does not fit this model'):
        load_fused_checkpoint(other, path)
    with pytest.raises(CheckpointError, match='not a fused checkpoint'):
        convert_to_fused_structure(DemoClassifier(), {'state_dict': {}})


def test_real_detector_loads_strictly(tmp_path):
    config = write_real_config(str(tmp_path / 'cfg.py'), 'mmdet',
                               str(tmp_path / 'dump.pkl'))
    source = make_real_checkpoint(config, str(tmp_path / 'source.pth'))
    model = build_from_config(config)
    model.load_state_dict(torch.load(source, weights_only=True)['state_dict'])
    images = (torch.randn(1, 3, 64, 64,
                          generator=torch.Generator().manual_seed(0)), )
    report = mmfuse.fuse_model(model, images)
    assert len(report.folded) >= 20
    path = str(tmp_path / 'fused.pth')
    save_fused_checkpoint(model, report, path, source_path=source)
    fresh = build_from_config(config)
    load_fused_checkpoint(fresh, path, strict=True)
    with torch.no_grad():
        assert _outputs_equal(fresh(*images), model(*images))


# ----------------------------------------------------------- safe loading


def test_benign_meta_types_load(tmp_path):
    history = HistoryBuffer()
    history.update(1.5)
    history.update(np.float64(2.5))
    meta = {
        'array': np.arange(4, dtype=np.int32),
        'scalar': np.float32(1.25),
        'integer': np.int64(7),
        'dtype': np.dtype('float16'),
        'history': history,
        'cfg': Config(dict(model=dict(type='X', depth=18))),
        'cfg_dict': ConfigDict(a=1, b=dict(c=[1, 2])),
    }
    path = str(tmp_path / 'benign.pth')
    torch.save({'state_dict': {'w': torch.ones(2)}, 'meta': meta}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # torch alone refuses them
    loaded = load_checkpoint_safely(path)['meta']
    assert np.array_equal(loaded['array'], meta['array'])
    assert loaded['scalar'] == np.float32(1.25)
    assert loaded['integer'] == 7 and loaded['dtype'] == np.float16
    assert loaded['history'].mean() == 2.0
    assert loaded['cfg'].model.depth == 18
    assert loaded['cfg_dict'].b.c == [1, 2]


def test_a_checkpoint_written_by_a_runner_loads(tmp_path):
    cfg = demo_config(str(tmp_path), train_cfg=dict(max_epochs=1))
    runner = Runner.from_cfg(cfg)
    runner.train()
    path = str(tmp_path / 'epoch_1.pth')
    checkpoint = load_checkpoint_safely(path)
    assert isinstance(checkpoint['message_hub']['log_scalars']['train/loss'],
                      HistoryBuffer)
    assert checkpoint['state_dict'].keys() == \
        runner.model.state_dict().keys()


class _Namespaced:
    """Pickles as ``argparse.Namespace``: harmless, but not allow-listed."""

    def __reduce__(self):
        return (argparse.Namespace, (), {'x': 1})


def _marker_maker(path):

    class Malicious:

        def __reduce__(self):
            return (os.mkdir, (path, ))

    return Malicious()


def test_unknown_types_are_refused_by_name(tmp_path):
    path = str(tmp_path / 'namespace.pth')
    torch.save({'state_dict': {}, 'meta': {'args': _Namespaced()}}, path)
    with pytest.raises(UnsafeCheckpointError) as error:
        load_checkpoint_safely(path)
    assert error.value.type_names == ['argparse.Namespace']
    assert '--trust-checkpoint' in str(error.value)
    assert '\n' not in str(error.value)
    trusted = load_checkpoint_safely(path, trust=True)
    assert trusted['meta']['args'].x == 1


def test_code_in_a_checkpoint_never_runs(tmp_path):
    marker = str(tmp_path / 'ran')
    path = str(tmp_path / 'malicious.pth')
    torch.save({'state_dict': {}, 'meta': {'x': _marker_maker(marker)}},
               path)
    with pytest.raises(UnsafeCheckpointError, match='mkdir'):
        load_checkpoint_safely(path)
    assert not os.path.exists(marker)


class _SneakyGetattr:
    """Reaches a function through ``getattr`` on an allow-listed class."""

    def __reduce__(self):
        return (getattr, (HistoryBuffer, '__init__'))


def test_getattr_is_allowed_only_for_history_buffer_statistics(tmp_path):
    path = str(tmp_path / 'getattr.pth')
    torch.save({'state_dict': {}, 'meta': {'x': _SneakyGetattr()}}, path)
    with pytest.raises(UnsafeCheckpointError, match='__init__'):
        load_checkpoint_safely(path)


@pytest.mark.parametrize('content, message', [
    (b'not a checkpoint\n', 'not a readable checkpoint'),
    (None, 'not a readable checkpoint'),  # truncated
])
def test_unreadable_checkpoints(tmp_path, source_checkpoint, content,
                                message):
    path = str(tmp_path / 'bad.pth')
    if content is None:
        with open(source_checkpoint, 'rb') as stream:
            content = stream.read()[:2000]
    with open(path, 'wb') as stream:
        stream.write(content)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint_safely(path)
    with pytest.raises(CheckpointError, match='does not exist'):
        load_checkpoint_safely(str(tmp_path / 'missing.pth'))


# ----------------------------------------------------------- atomic save


def _folder_listing(folder) -> list:
    return sorted(os.listdir(folder))


def test_an_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / 'out.pth'
    out.write_bytes(b'previous content')
    real_save = torch.save

    def interrupted(obj, stream, *args, **kwargs):
        stream.write(b'partial bytes')
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, 'save', interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({'w': torch.ones(3)}, str(out))
    monkeypatch.setattr(torch, 'save', real_save)
    assert out.read_bytes() == b'previous content'
    assert _folder_listing(tmp_path) == ['out.pth']


def test_content_that_needs_pickle_is_not_written(tmp_path):
    out = tmp_path / 'out.pth'
    with pytest.raises(CheckpointError, match='weights_only'):
        atomic_save({'meta': _Namespaced()}, str(out))
    assert _folder_listing(tmp_path) == []


def test_bad_output_places(tmp_path, readonly_folder):  # noqa: F811
    with pytest.raises(CheckpointError, match='does not exist'):
        atomic_save({}, str(tmp_path / 'missing' / 'out.pth'))
    (tmp_path / 'folder.pth').mkdir()
    with pytest.raises(CheckpointError, match='is a folder'):
        atomic_save({}, str(tmp_path / 'folder.pth'))
    before = _folder_listing(readonly_folder)
    with pytest.raises(CheckpointError, match='not writable|cannot write'):
        atomic_save({}, os.path.join(readonly_folder, 'out.pth'))
    assert _folder_listing(readonly_folder) == before


def test_file_sha256(tmp_path):
    path = tmp_path / 'data'
    path.write_bytes(b'abc' * 1000)
    assert file_sha256(str(path), chunk_size=7) == \
        hashlib.sha256(b'abc' * 1000).hexdigest()


def test_deepcopy_keeps_the_fused_mark():
    model = _demo_model()
    mark_fused(model, {'plan': {}, 'reparameterized': []})
    assert fused_record_of(copy.deepcopy(model)) == {
        'plan': {}, 'reparameterized': []}
