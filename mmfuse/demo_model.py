"""The demo net as an MMEngine model, and a metric for it.

``configs/demo/`` builds :class:`DemoClassifier` (the embedded demo net of
:mod:`mmfuse.demo` with a classification output) on
``MMFuseSyntheticDataset`` images and scores it with
:class:`ClassificationMetric`; no mmdet, mmseg or download is needed.
:mod:`mmfuse.demo_runner` has the commands that use them.

Importing this module registers ``MMFuseDemoClassifier`` in MMEngine's root
``MODELS`` registry and ``MMFuseClassificationMetric`` in its root
``METRICS`` registry.
"""
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from mmengine.evaluator import BaseMetric
from mmengine.model import BaseModel
from mmengine.registry import METRICS, MODELS

from .demo import DemoNet

__all__ = ['DemoClassifier', 'ClassificationMetric']


@MODELS.register_module(name='MMFuseDemoClassifier')
class DemoClassifier(BaseModel):
    """:class:`mmfuse.demo.DemoNet` as an MMEngine model.

    Args:
        channels: Width of the net.
        data_preprocessor: Config of the data preprocessor.
        init_cfg: Initialisation config.
    """

    def __init__(self,
                 channels: int = 8,
                 data_preprocessor: Optional[Union[Dict, Any]] = None,
                 init_cfg: Optional[Dict] = None):
        super().__init__(data_preprocessor=data_preprocessor,
                         init_cfg=init_cfg)
        self.net = DemoNet(channels)

    def forward(self,
                inputs: torch.Tensor,
                data_samples: Optional[Sequence[int]] = None,
                mode: str = 'tensor') -> Any:
        """``'tensor'``: the net's raw outputs; ``'predict'``: a dict per
        image; ``'loss'``: cross entropy against the labels."""
        outputs = self.net(inputs)
        if mode == 'tensor':
            return outputs
        logits = outputs[0]
        if mode == 'loss':
            labels = torch.as_tensor(list(data_samples),
                                     device=logits.device)
            return dict(loss=F.cross_entropy(logits, labels))
        if mode == 'predict':
            labels = list(data_samples) if data_samples is not None else \
                [None] * len(logits)
            return [
                dict(logits=row.detach(), pred_label=int(row.argmax()),
                     gt_label=label) for row, label in zip(logits, labels)
            ]
        raise ValueError(f'unknown mode {mode!r}')


@METRICS.register_module(name='MMFuseClassificationMetric')
class ClassificationMetric(BaseMetric):
    """Top-1 accuracy, plus the mean and a checksum of the logits (which
    show whether two runs computed the same outputs)."""

    default_prefix = 'demo'

    def process(self, data_batch: Any, data_samples: Sequence[Dict]) -> None:
        for sample in data_samples:
            self.results.append(
                (sample['pred_label'], sample['gt_label'],
                 sample['logits'].double().cpu()))

    def compute_metrics(self, results: List) -> Dict[str, float]:
        logits = torch.stack([r[2] for r in results])
        correct = sum(int(r[0] == r[1]) for r in results)
        weights = torch.arange(1, logits.numel() + 1, dtype=torch.float64)
        return dict(
            accuracy=100.0 * correct / len(results),
            mean_logit=float(logits.mean()),
            logit_checksum=float((logits.flatten() * weights).sum()))
