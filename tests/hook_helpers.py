"""Shared by the hook, checkpoint, CLI and distributed tests and by
``benchmarks/bench_hook.py``: runner configs on synthetic data, demo and
real-model checkpoints, output comparison.

Nothing is downloaded: real models are built from the configs their
packages ship with ``init_cfg``/``pretrained`` removed, their norms get
random statistics, and images are synthetic (``MMFuseSyntheticDataset``).
"""
import hashlib
import os
import pickle
import shutil
import subprocess
import sys
from typing import Any, Dict, Iterator, List, Optional, Sequence

import pytest
import torch
from torch import nn

import mmfuse.demo_model  # noqa: F401 registers the demo model and metric
import mmfuse.synthetic  # noqa: F401 registers the synthetic dataset
from mmfuse.demo_runner import save_demo_checkpoint
from mmfuse.testing import randomize_norm_stats
from real_models import strip_pretrained as strip_downloads

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, 'configs')
DEMO_CONFIG = os.path.join(CONFIGS, 'demo', 'demo_classifier.py')
DEMO_FUSE_CONFIG = os.path.join(CONFIGS, 'demo', 'demo_classifier_fuse.py')
FUSE_BASE = os.path.join(CONFIGS, '_base_', 'fuse_conv_bn.py')
TOOL = os.path.join(REPO, 'tools', 'fuse_conv_bn.py')

#: Real models of the round trips: small shipped configs, and the pipeline
#: pieces that replace loading and shrink the images.
REAL = {
    'mmdet': dict(
        base='mmdet::retinanet/retinanet_r18_fpn_1x_coco.py',
        resize=dict(type='Resize', scale=(96, 96), keep_ratio=True),
        pack=dict(
            type='PackDetInputs',
            meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                       'scale_factor')),
        image_size=(80, 96),
        # Random weights score below the default threshold: keep boxes.
        extra='model = dict(test_cfg=dict(score_thr=0.0, max_per_img=20))\n'
    ),
    'mmseg': dict(
        base='mmseg::pspnet/pspnet_r18-d8_4xb2-80k_cityscapes-512x1024.py',
        resize=dict(type='Resize', scale=(96, 48), keep_ratio=True),
        pack=dict(type='PackSegInputs'),
        image_size=(48, 96),
        extra='model = dict(data_preprocessor=dict(size=(48, 96)))\n'),
}


def demo_config(work_dir: str,
                fuse: bool = False,
                hook: Optional[Dict] = None,
                **overrides: Any):
    """The demo config (with the hook when ``fuse`` or ``hook`` is given),
    a work dir, and ``overrides`` merged in."""
    from mmengine.config import Config
    cfg = Config.fromfile(DEMO_FUSE_CONFIG if fuse else DEMO_CONFIG)
    if hook is not None:
        cfg.custom_hooks = [dict(type='FuseConvBNHook', **hook)]
    cfg.work_dir = work_dir
    cfg.experiment_name = os.path.basename(work_dir.rstrip('/'))
    cfg.default_hooks.checkpoint = dict(
        type='CheckpointHook', interval=1, save_last=True)
    cfg.merge_from_dict(overrides)
    return cfg


def make_demo_checkpoint(path: str, seed: int = 0) -> str:
    """A demo checkpoint with random weights and norm statistics."""
    save_demo_checkpoint(path, seed)
    return path


def write_real_config(path: str, package: str, dump_path: str,
                      num_samples: int = 4) -> str:
    """A config inheriting a shipped ``package`` config and the hook
    snippet, testing on synthetic images and dumping the predictions."""
    spec = REAL[package]
    text = (
        f'_base_ = [{spec["base"]!r}, {FUSE_BASE!r}]\n'
        'custom_imports = dict(imports=["mmfuse", "mmfuse.synthetic"], '
        'allow_failed_imports=False)\n'
        f'test_pipeline = [dict(type="LoadImageFromFile"), '
        f'{spec["resize"]!r}, {spec["pack"]!r}]\n'
        'test_dataloader = dict(_delete_=True, batch_size=2, '
        'num_workers=0, sampler=dict(type="DefaultSampler", shuffle=False),'
        f' dataset=dict(type="MMFuseSyntheticDataset", '
        f'num_samples={num_samples}, image_size={spec["image_size"]!r}, '
        'pipeline=test_pipeline))\n'
        'test_evaluator = dict(_delete_=True, type="DumpResults", '
        f'out_file_path={dump_path!r})\n'
        'default_hooks = dict(logger=dict(type="LoggerHook", interval=1))\n'
        + spec['extra'])
    with open(path, 'w') as stream:
        stream.write(text)
    return path


def build_from_config(path: str) -> nn.Module:
    """The model of a config, built through its registries, in eval mode,
    without pretrained weights."""
    from mmengine.config import Config, ConfigDict
    from mmengine.registry import MODELS, init_default_scope
    cfg = Config.fromfile(path)
    init_default_scope(cfg.get('default_scope', 'mmengine'))
    model_cfg = ConfigDict(strip_downloads(cfg.model.to_dict()))
    return MODELS.build(model_cfg).eval()


def make_real_checkpoint(config: str, path: str, seed: int = 0) -> str:
    """A checkpoint for the model of ``config``: default initialisation,
    random norm statistics, MMEngine layout with ``dataset_meta``."""
    torch.manual_seed(seed)
    model = build_from_config(config)
    randomize_norm_stats(model, seed)
    torch.save({
        'state_dict': model.state_dict(),
        'meta': {'dataset_meta': {'classes': ('thing', 'stuff')}}
    }, path)
    return path


def state_digest(state_dict: Dict[str, torch.Tensor]) -> str:
    """sha256 over the names and exact bytes of a state dict."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        digest.update(key.encode())
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.numpy().tobytes() if tensor.numel() else b'')
    return digest.hexdigest()


def file_digest(path: str) -> str:
    """sha256 of a file's bytes."""
    with open(path, 'rb') as stream:
        return hashlib.sha256(stream.read()).hexdigest()


def load_dump(path: str) -> List[Any]:
    """The predictions ``DumpResults`` wrote."""
    with open(path, 'rb') as stream:
        return pickle.load(stream)


def prediction_tensors(sample: Any) -> List[torch.Tensor]:
    """The tensors of one mmdet/mmseg prediction, in a fixed order."""
    from mmengine.structures import BaseDataElement
    tensors = []
    if isinstance(sample, BaseDataElement):
        sample = sample.to_dict()
    if isinstance(sample, dict):
        for key in sorted(sample):
            if key in ('pred_instances', 'pred_sem_seg', 'seg_logits'):
                tensors += _all_tensors(sample[key])
    return tensors


def _all_tensors(value: Any) -> List[torch.Tensor]:
    from mmengine.structures import BaseDataElement
    if isinstance(value, BaseDataElement):
        value = value.to_dict()
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for key in sorted(value) for t in _all_tensors(value[key])]
    return []


def run_python(args: Sequence[str],
               timeout: float = 300,
               cwd: Optional[str] = None,
               env: Optional[Dict[str, str]] = None
               ) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` with this interpreter; output captured."""
    full_env = dict(os.environ)
    full_env['PYTHONPATH'] = REPO + os.pathsep + full_env.get(
        'PYTHONPATH', '')
    if env:
        full_env.update(env)
    return subprocess.run([sys.executable, *args],
                          capture_output=True,
                          text=True,
                          timeout=timeout,
                          cwd=cwd or REPO,
                          env=full_env)


def package_tool(package: str, tool: str = 'test.py') -> str:
    """Path of a tool a codebase ships in ``<package>/.mim/tools``."""
    import importlib
    module = importlib.import_module(package)
    path = os.path.join(os.path.dirname(module.__file__), '.mim', 'tools',
                        tool)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{package} ships no {tool} at {path}')
    return path


@pytest.fixture
def readonly_folder(tmp_path) -> Iterator[str]:
    """A folder no file can be created in, even by root: mode 555 for a
    normal user; for root an immutable folder (``chattr +i``), or sysfs
    where that is not supported."""
    folder = tmp_path / 'readonly'
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield str(folder)
        folder.chmod(0o755)
        return
    chattr = shutil.which('chattr')
    if chattr and subprocess.run([chattr, '+i', str(folder)],
                                 capture_output=True).returncode == 0:
        try:
            yield str(folder)
        finally:
            subprocess.run([chattr, '-i', str(folder)], check=True)
        return
    yield '/sys'
