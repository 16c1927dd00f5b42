"""Synthetic images through a config's test pipeline, and a dataset of them.

Used by ``tools/fuse_conv_bn.py`` to make an example input from a config
(no data files needed), by the demo config, and by the tests and
benchmarks.  An image is made where the pipeline would load one: loading
transforms (``LoadImageFromFile``, ``LoadAnnotations``, ...) are dropped and
the rest of the test pipeline (resize, pad, normalise, pack) runs as
configured.

Importing this module registers ``MMFuseSyntheticDataset`` in MMEngine's
root ``DATASETS`` registry and ``MMFusePackImage`` in its root
``TRANSFORMS`` registry.
"""
import copy
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from mmengine.dataset import Compose
from mmengine.registry import DATASETS, TRANSFORMS
from torch.utils.data import Dataset

__all__ = [
    'synthetic_image', 'synthetic_results', 'image_annotations',
    'strip_loading', 'WholeImageBox',
    'find_test_pipeline', 'SyntheticImageDataset', 'PackImage'
]


def synthetic_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A ``height x width x 3`` uint8 image: smooth blobs plus noise, so
    that convs see structure rather than pure noise."""
    rng = np.random.default_rng(seed)
    rows = np.linspace(0, 1, height)[:, None, None]
    cols = np.linspace(0, 1, width)[None, :, None]
    phase = rng.uniform(0, 2 * np.pi, size=(1, 1, 3))
    freq = rng.uniform(2, 8, size=(2, 1, 1, 3))
    smooth = np.sin(freq[0] * np.pi * rows + phase) * \
        np.cos(freq[1] * np.pi * cols + phase)
    noise = rng.normal(0, 0.25, size=(height, width, 3))
    image = 127.5 + 90 * smooth + 30 * noise
    return np.clip(image, 0, 255).astype(np.uint8)


def synthetic_results(index: int,
                      height: int,
                      width: int,
                      seed: int = 0,
                      label: int = 0) -> Dict[str, Any]:
    """The results dict a loading transform would hand the pipeline."""
    image = synthetic_image(height, width, seed * 100003 + index)
    return dict(
        img=image,
        img_shape=(height, width),
        ori_shape=(height, width),
        bbox=_whole_image_box(height, width),
        **image_annotations(index, label))


def _whole_image_box(height: int, width: int) -> np.ndarray:
    """An image's whole extent as the person box a top-down pose
    estimator's pipeline crops."""
    return np.array([[0, 0, width, height]], dtype=np.float32)


def image_annotations(index: int, label: int = 0) -> Dict[str, Any]:
    """What a dataset hands each codebase's test pipeline besides the image
    and its box: its ids and an empty annotation."""
    return dict(
        img_path=f'synthetic_{index}.png',
        img_id=index,
        sample_idx=index,
        id=index,
        gt_label=label,
        seg_fields=[],
        reduce_zero_label=False,
        instances=[],
        bbox_score=np.ones(1, dtype=np.float32),
    )


def _transform_name(transform: Any) -> str:
    if isinstance(transform, dict):
        kind = transform.get('type', '')
        return kind if isinstance(kind, str) else getattr(
            kind, '__name__', str(kind))
    return type(transform).__name__


def strip_loading(pipeline: Sequence[Any],
                  keep_image_loading: bool = False) -> List[Any]:
    """The pipeline without its loading transforms.

    Args:
        pipeline: Transform configs or transforms.
        keep_image_loading: Keep the transforms that load the image
            (``LoadImageFromFile`` and the like), dropping only the ones that
            load annotations; a :class:`WholeImageBox` follows them.
    """
    kept = []
    for transform in pipeline:
        name = _transform_name(transform).split('.')[-1]
        if not name.startswith('Load'):
            kept.append(transform)
        elif keep_image_loading and 'Image' in name and 'Annotation' \
                not in name:
            kept.append(transform)
            kept.append(WholeImageBox())
    return kept


class WholeImageBox:
    """Sets a loaded image's whole extent as the person box that a
    top-down pose estimator's pipeline crops (``bbox``), where none is
    set."""

    def __call__(self, results: Dict) -> Dict:
        if 'bbox' not in results and 'img' in results:
            results['bbox'] = _whole_image_box(*results['img'].shape[:2])
        return results


def _dataset_pipeline(dataset_cfg: Any) -> Optional[List]:
    while isinstance(dataset_cfg, dict):
        if dataset_cfg.get('pipeline'):
            return list(dataset_cfg['pipeline'])
        if isinstance(dataset_cfg.get('datasets'), (list, tuple)) and \
                dataset_cfg['datasets']:
            dataset_cfg = dataset_cfg['datasets'][0]
        else:
            dataset_cfg = dataset_cfg.get('dataset')
    return None


def find_test_pipeline(cfg: Any) -> Optional[List]:
    """The test pipeline of a config: from ``test_dataloader`` (through
    dataset wrappers), else ``test_pipeline``, else ``val_dataloader``."""
    for loader in ('test_dataloader', 'val_dataloader'):
        loader_cfg = cfg.get(loader)
        if isinstance(loader_cfg, dict):
            pipeline = _dataset_pipeline(loader_cfg.get('dataset'))
            if pipeline:
                return copy.deepcopy(pipeline)
        if loader == 'test_dataloader' and cfg.get('test_pipeline'):
            return copy.deepcopy(list(cfg['test_pipeline']))
    return None


@TRANSFORMS.register_module(name='MMFusePackImage')
class PackImage:
    """Pack ``img`` (HxWxC uint8) as ``inputs`` (CxHxW tensor) and
    ``gt_label`` as ``data_samples``: the pipeline end of the demo."""

    def __call__(self, results: Dict) -> Dict:
        image = np.ascontiguousarray(results['img'].transpose(2, 0, 1))
        return dict(inputs=torch.from_numpy(image),
                    data_samples=int(results.get('gt_label', 0)))

    def __repr__(self) -> str:
        return 'MMFusePackImage()'


@DATASETS.register_module(name='MMFuseSyntheticDataset')
class SyntheticImageDataset(Dataset):
    """Synthetic images run through a test pipeline; no files needed.

    Args:
        num_samples: Number of images.
        image_size: ``(height, width)`` of the made images, before the
            pipeline resizes them.
        pipeline: Transform configs (or transforms); loading transforms
            are dropped.  ``None`` packs with :class:`PackImage`.
        num_classes: Labels are ``index % num_classes``.
        seed: Seed of the images.
        metainfo: The dataset's ``metainfo`` (``classes`` by default).
        **unused_dataset_keys: Other keys of a real dataset's config
            (``ann_file``, ``data_root``, ``test_mode``, ...), accepted and
            not used, so that a config's dataset ``type`` can be switched to
            this one.
    """

    def __init__(self,
                 num_samples: int = 8,
                 image_size: Tuple[int, int] = (64, 64),
                 pipeline: Optional[Sequence[Any]] = None,
                 num_classes: int = 10,
                 seed: int = 0,
                 metainfo: Optional[Dict] = None,
                 **unused_dataset_keys: Any):
        if num_samples < 1:
            raise ValueError('num_samples must be at least 1')
        self.num_samples = num_samples
        self.image_size = tuple(image_size)
        self.num_classes = num_classes
        self.seed = seed
        transforms: List[Any] = strip_loading(pipeline or [])
        if not transforms:
            transforms = [PackImage()]
        self.pipeline: Callable = Compose(transforms)
        self._metainfo = dict(metainfo) if metainfo else dict(
            classes=tuple(f'class_{i}' for i in range(num_classes)))

    @property
    def metainfo(self) -> Dict:
        """Dataset meta information (``classes`` and whatever was given)."""
        return copy.deepcopy(self._metainfo)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Dict:
        height, width = self.image_size
        results = synthetic_results(index, height, width, self.seed,
                                    index % self.num_classes)
        output = self.pipeline(results)
        if output is None:
            raise RuntimeError(
                f'the pipeline dropped synthetic sample {index}')
        return output
