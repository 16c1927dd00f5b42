"""Real multi-branch models for the re-parameterization tests and benchmark.

Built from the configs the packages ship (``<package>/.mim/configs``) with
every ``init_cfg``, ``pretrained`` and ``checkpoint`` key stripped, so
nothing downloads: weights are torch's default initialisation and every norm
gets random statistics from :func:`mmfuse.testing.randomize_norm_stats`.
"""
import importlib
import os
from typing import Dict, Tuple

import torch
from torch import nn

from mmfuse.testing import randomize_norm_stats
from real_models import _registry
from real_models import strip_pretrained as strip_downloads

__all__ = ['REPARAM_MODELS', 'build_reparam_model', 'strip_downloads']

#: name -> (package, config under the package's configs, input size)
REPARAM_MODELS: Dict[str, Tuple[str, str, Tuple[int, int]]] = {
    'repvgg_a0': ('mmpretrain', 'repvgg/repvgg-A0_8xb32_in1k.py', (224, 224)),
    'repvgg_b1g2': ('mmpretrain', 'repvgg/repvgg-B1g2_8xb32_in1k.py',
                    (64, 64)),
    'repvgg_d2se': ('mmpretrain', 'repvgg/repvgg-D2se_8xb32_in1k.py',
                    (64, 64)),
    'mobileone_s1': ('mmpretrain', 'mobileone/mobileone-s1_8xb32_in1k.py',
                     (224, 224)),
    'yolov6_s': ('mmyolo', 'yolov6/yolov6_s_syncbn_fast_8xb32-400e_coco.py',
                 (320, 320)),
    'ppyoloe_plus_s': ('mmyolo',
                       'ppyoloe/ppyoloe_plus_s_fast_8xb8-80e_coco.py',
                       (320, 320)),
}


def build_reparam_model(name: str,
                        seed: int = 0,
                        randomize: bool = True,
                        input_hw: Tuple[int, int] = None
                        ) -> Tuple[nn.Module, Tuple]:
    """Build one model of :data:`REPARAM_MODELS` in eval mode.

    Args:
        name: The model's name.
        seed: Seed of the weights, norm statistics and example image.
        randomize: Randomise the norm statistics.
        input_hw: Image size; the model's default when ``None``.

    Returns:
        ``(model, (image, ))``.
    """
    from mmengine.config import Config, ConfigDict
    from mmengine.registry import DefaultScope

    package, config, default_hw = REPARAM_MODELS[name]
    module = importlib.import_module(package)
    root = os.path.join(os.path.dirname(module.__file__), '.mim', 'configs')
    cfg = Config.fromfile(os.path.join(root, config))
    model_cfg = ConfigDict(strip_downloads(cfg.model.to_dict()))
    registry = _registry(package)
    torch.manual_seed(seed)
    with DefaultScope.overwrite_default_scope(package):
        model = registry.build(model_cfg)
    model.eval()
    if randomize:
        randomize_norm_stats(model, seed=seed)
    height, width = input_hw or default_hw
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(1, 3, height, width, generator=gen)
    return model, (image, )
