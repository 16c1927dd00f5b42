"""Real OpenMMLab models, built from the configs their packages ship.

Shared by ``tests/test_real_models.py`` and ``benchmarks/bench_fusion.py``.
Every model is built from a config installed with its package
(``<package>/.mim/configs``) with ``init_cfg``, ``pretrained`` and
``checkpoint`` keys stripped, so nothing is ever downloaded: weights come
from the modules' own ``init_weights`` under a fixed seed, and every norm
gets random statistics from
:func:`mmfuse.testing.randomize_norm_stats` so that a wrong fold cannot hide
behind an identity batch norm.

Inputs are as small as each model allows, so one forward pass takes well
under two seconds on two CPU cores.  Models are called in ``mode='tensor'``
(the default of every OpenMMLab ``BaseModel.forward``).  DETR-like
detectors and SOLOv2, whose tensor mode reads image metadata, get a list of
data samples as a second positional argument; mmpose estimators get
``None`` there; two-stage detectors run through
:class:`TwoStageTensorForward` (fixed proposals, see there why).

Models left out because they cannot run here (each tried):

* mmdet ``yolact`` and ``condinst``: their ``mode='tensor'`` forward reads
  ground-truth instances from the data samples (``AttributeError:
  'DetDataSample' object has no attribute '_gt_instances'``), so there is no
  inference tensor output to compare without annotations.
* mmdet ``glip``: builds a BERT language model through ``transformers``
  from the Hugging Face hub (not installed, and no network).
* mmpretrain ``blip`` and the other multi-modal models: need the
  ``mmpretrain[multimodal]`` extras and a tokenizer from the hub.

SyncBN configs (mmseg, mmyolo, rtmpose) are built as they are: an eval-mode
``SyncBatchNorm`` runs on CPU, and mmfuse folds it.
"""
import contextlib
import importlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from mmfuse.testing import randomize_norm_stats

__all__ = [
    'ModelSpec', 'MODELS', 'MODEL_NAMES', 'build', 'config_root',
    'strip_pretrained', 'norm_modules', 'is_batch_norm_with_stats'
]

#: Keys removed from a config, at any depth, so that nothing downloads.
_DOWNLOAD_KEYS = ('init_cfg', 'pretrained', 'checkpoint')
#: The scope each package registers its modules in.
_SCOPES = {
    'mmdet': 'mmdet',
    'mmseg': 'mmseg',
    'mmpretrain': 'mmpretrain',
    'mmyolo': 'mmyolo',
    'mmpose': 'mmpose',
}


@dataclass(frozen=True)
class ModelSpec:
    """One real model to build.

    Attributes:
        name: Short name used as the test id and in the benchmark table.
        package: ``'mmdet'``, ``'mmseg'``, ``'mmpretrain'``, ``'mmyolo'`` or
            ``'mmpose'``.
        config: Path of the config under the package's shipped configs.
        input_hw: ``(height, width)`` of the example image.
        samples: What ``forward`` gets as its second positional argument:
            ``'det'`` for a list of detection data samples (image metadata,
            for detectors whose tensor mode reads it), ``'none'`` for
            ``None`` (mmpose estimators, whose ``data_samples`` argument is
            required), ``''`` for no second argument.  ``'two_stage'``
            wraps a two-stage detector in :class:`TwoStageTensorForward`.
        dtype: ``'float32'``, or ``'float64'`` for a model whose unfused
            float32 output is itself off its float64 output by more than a
            third of the tolerance the tests check folding against (1e-5):
            there float32 cannot tell an exact fold from a wrong one.
        overrides: Dotted config keys and values merged into ``cfg.model``
            before building (only to shrink a model or fix its input size).
        what: The pattern the model exercises, for the reader.
        offset_scale: Factor on the weights and biases of the offset convs
            of deformable convs (``conv_offset``), after their random
            reset: where the default scale sends every sample outside the
            feature maps, the output would not depend on what feeds the
            deformable convs.
    """
    name: str
    package: str
    config: str
    input_hw: Tuple[int, int] = (64, 64)
    samples: str = ''
    dtype: str = 'float32'
    overrides: Tuple[Tuple[str, Any], ...] = ()
    what: str = ''
    offset_scale: float = 1.0


def _spec(name: str, package: str, config: str, **kwargs: Any) -> ModelSpec:
    return ModelSpec(name, package, config, **kwargs)


#: The curated list: detection, segmentation, classification, YOLO and pose
#: models that between them exercise every conv/norm pattern OpenMMLab uses.
MODELS: List[ModelSpec] = [
    # -- mmdet ------------------------------------------------------------
    _spec('retinanet_r50_fpn', 'mmdet',
          'retinanet/retinanet_r50_fpn_1x_coco.py', input_hw=(128, 128),
          what='ResNet-50 bottlenecks, FPN without norm, conv-only head'),
    _spec('retinanet_sepbn_nasfpn', 'mmdet',
          'nas_fpn/retinanet_r50_fpn_crop640-50e_coco.py',
          input_hw=(128, 128),
          what='RetinaSepBNHead: convs shared across levels, BN per level'),
    _spec('retinanet_effb3_sepbn', 'mmdet',
          'efficientnet/retinanet_effb3_fpn_8xb4-crop896-1x_coco.py',
          input_hw=(128, 128),
          what='EfficientNet (adaptive padding, SE) + FPN with BN + SepBN'),
    _spec('faster_rcnn_r50_fpn', 'mmdet',
          'faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', input_hw=(128, 128),
          samples='two_stage', what='two-stage: RPN head, RoI head'),
    _spec('mask_rcnn_r50_fpn', 'mmdet',
          'mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py', input_hw=(128, 128),
          samples='two_stage', what='two-stage with a mask head'),
    _spec('faster_rcnn_regnetx_400mf', 'mmdet',
          'regnet/faster-rcnn_regnetx-400MF_fpn_ms-3x_coco.py',
          input_hw=(128, 128), samples='two_stage',
          what='RegNetX grouped bottlenecks'),
    _spec('fcos_r50_gn_head', 'mmdet',
          'fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py', input_hw=(128, 128),
          dtype='float64',
          what='caffe-style ResNet, GroupNorm head (left unfolded); float64 '
          'because the unfused float32 output is itself 5e-6 off the '
          'float64 one'),
    _spec('atss_r50_fpn', 'mmdet', 'atss/atss_r50_fpn_1x_coco.py',
          input_hw=(128, 128), what='GroupNorm head'),
    _spec('yolox_tiny', 'mmdet', 'yolox/yolox_tiny_8xb8-300e_coco.py',
          what='CSPDarknet with Focus, decoupled head'),
    _spec('rtmdet_tiny', 'mmdet', 'rtmdet/rtmdet_tiny_8xb32-300e_coco.py',
          what='CSPNeXt, RTMDetSepBNHead with shared convs'),
    _spec('centernet_r18', 'mmdet',
          'centernet/centernet_r18_8xb16-crop512-140e_coco.py',
          dtype='float64',
          what='deconv (ConvTranspose2d) followed by BN; float64 because '
          'the unfused float32 output is itself 3.5e-5 off the float64 one'),
    _spec('ssdlite_mobilenetv2', 'mmdet',
          'ssd/ssdlite_mobilenetv2-scratch_8xb24-600e_coco.py',
          input_hw=(128, 128),
          what='MobileNetV2, depthwise-separable SSD neck and head'),
    _spec('yolov3_mobilenetv2', 'mmdet',
          'yolo/yolov3_mobilenetv2_8xb24-320-300e_coco.py',
          what='YOLOv3 neck with upsample + concat'),
    _spec('faster_rcnn_r50_dcn', 'mmdet',
          'dcn/faster-rcnn_r50-dconv-c3-c5_fpn_1x_coco.py',
          input_hw=(128, 128), samples='two_stage', dtype='float64',
          what='deformable convs (mmcv DeformConv2dPack) followed by BN; '
          'float64 because offsets computed from the features amplify '
          'float32 rounding to 3.5e-4 in the unfused model itself'),
    _spec('faster_rcnn_r50_mdconv', 'mmdet',
          'dcnv2/faster-rcnn_r50-mdconv-c3-c5_fpn_1x_coco.py',
          input_hw=(128, 128), samples='two_stage', dtype='float64',
          what='modulated deformable convs (mmcv ModulatedDeformConv2dPack, '
          'DCNv2) followed by BN, folded into the DCN; float64 as for DCN'),
    _spec('centernet_r18_dcnv2', 'mmdet',
          'centernet/centernet_r18-dcnv2_8xb16-crop512-140e_coco.py',
          dtype='float64', offset_scale=0.1,
          what='ConvModule with a DCNv2 conv and BN in the neck, deconvs; '
          'float64 as for centernet_r18; offsets scaled by 0.1 (at the '
          'default scale every sample falls outside the maps, and the '
          'output did not depend on the backbone)'),
    _spec('solov2_r50', 'mmdet', 'solov2/solov2_r50_fpn_1x_coco.py',
          input_hw=(128, 128), samples='det',
          what='instance segmentation, GroupNorm mask branch'),
    _spec('detr_r50', 'mmdet', 'detr/detr_r50_8xb2-150e_coco.py',
          samples='det', what='ResNet + transformer (LayerNorm)'),
    _spec('deformable_detr_r50', 'mmdet',
          'deformable_detr/deformable-detr_r50_16xb2-50e_coco.py',
          samples='det',
          what='multi-scale deformable attention, GroupNorm ChannelMapper'),
    # -- mmseg (SyncBN configs kept as they are: eval-mode SyncBN runs on
    # CPU, and mmfuse folds it) -------------------------------------------
    _spec('fcn_r18_d8', 'mmseg',
          'fcn/fcn_r18-d8_4xb2-80k_cityscapes-512x1024.py',
          what='dilated ResNet-18 (deep stem), SyncBN'),
    _spec('pspnet_r18_d8', 'mmseg',
          'pspnet/pspnet_r18-d8_4xb2-80k_cityscapes-512x1024.py',
          what='pyramid pooling: ConvModule after adaptive pooling'),
    _spec('deeplabv3plus_r18_d8', 'mmseg',
          'deeplabv3plus/deeplabv3plus_r18-d8_4xb2-80k_cityscapes-512x1024'
          '.py', what='ASPP with depthwise-separable ConvModules'),
    _spec('upernet_r18', 'mmseg',
          'upernet/upernet_r18_4xb2-40k_cityscapes-512x1024.py',
          what='UPerNet: PPM + FPN with ConvModules'),
    _spec('bisenetv1_r18', 'mmseg',
          'bisenetv1/bisenetv1_r18-d32_4xb4-160k_cityscapes-1024x1024.py',
          what='attention refinement (pool, conv, BN, sigmoid)'),
    _spec('bisenetv2', 'mmseg',
          'bisenetv2/bisenetv2_fcn_4xb4-160k_cityscapes-1024x1024.py',
          what='BN after depthwise convs, BN-only branches'),
    _spec('fastscnn', 'mmseg',
          'fastscnn/fast_scnn_8xb4-160k_cityscapes-512x1024.py',
          what='inverted residuals, depthwise convs'),
    _spec('erfnet', 'mmseg',
          'erfnet/erfnet_fcn_4xb4-160k_cityscapes-512x1024.py',
          what='BN over a concat of conv and max-pool outputs'),
    _spec('stdc1', 'mmseg', 'stdc/stdc1_4xb12-80k_cityscapes-512x1024.py',
          what='STDC: concat of progressively narrower ConvModules'),
    _spec('cgnet', 'mmseg', 'cgnet/cgnet_fcn_4xb4-60k_cityscapes-680x680.py',
          what='BN + PReLU after a concat of dilated convs'),
    _spec('icnet_r18', 'mmseg',
          'icnet/icnet_r18-d8_4xb2-80k_cityscapes-832x832.py',
          input_hw=(128, 128), what='cascade of three resolutions'),
    _spec('mobilenetv3_lraspp', 'mmseg',
          'mobilenet_v3/mobilenet-v3-d8_lraspp_4xb4-320k_cityscapes'
          '-512x1024.py', input_hw=(392, 392),
          what='MobileNetV3 with SE and hard-swish (a 49x49 pooling in the '
          'head sets the input size)'),
    _spec('fcn_hr18s', 'mmseg',
          'hrnet/fcn_hr18s_4xb2-40k_cityscapes-512x1024.py',
          what='HRNet fuse layers: conv+BN summed across resolutions'),
    _spec('segformer_b0', 'mmseg',
          'segformer/segformer_mit-b0_8xb2-160k_ade20k-512x512.py',
          what='transformer (LayerNorm); BN only in the head'),
    # -- mmpretrain -------------------------------------------------------
    _spec('resnet18', 'mmpretrain', 'resnet/resnet18_8xb32_in1k.py',
          what='basic blocks'),
    _spec('resnext50_32x4d', 'mmpretrain',
          'resnext/resnext50-32x4d_8xb32_in1k.py',
          what='grouped bottlenecks'),
    _spec('mobilenet_v2', 'mmpretrain',
          'mobilenet_v2/mobilenet-v2_8xb32_in1k.py',
          what='inverted residuals'),
    _spec('mobilenet_v3_small', 'mmpretrain',
          'mobilenet_v3/mobilenet-v3-small_8xb128_in1k.py',
          what='SE, hard-swish, BN1d in the classifier'),
    _spec('efficientnet_b0', 'mmpretrain',
          'efficientnet/efficientnet-b0_8xb32_in1k.py',
          what='adaptive padding convs, SE'),
    _spec('regnetx_400mf', 'mmpretrain',
          'regnet/regnetx-400mf_8xb128_in1k.py', what='RegNet stages'),
    _spec('repvgg_a0', 'mmpretrain', 'repvgg/repvgg-A0_8xb32_in1k.py',
          what='sum of 3x3 and 1x1 conv+BN branches and a BN-only branch'),
    _spec('mobileone_s0', 'mmpretrain',
          'mobileone/mobileone-s0_8xb32_in1k.py',
          what='over-parameterised branches summed'),
    _spec('convnext_tiny', 'mmpretrain',
          'convnext/convnext-tiny_32xb128_in1k.py',
          what='LayerNorm only: nothing foldable'),
    _spec('densenet121', 'mmpretrain',
          'densenet/densenet121_4xb256_in1k.py',
          what='pre-activation: BN before ReLU before conv, concat'),
    _spec('hrnet_w18', 'mmpretrain', 'hrnet/hrnet-w18_4xb32_in1k.py',
          what='multi-resolution fuse layers'),
    _spec('shufflenet_v2', 'mmpretrain',
          'shufflenet_v2/shufflenet-v2-1x_16xb64_in1k.py',
          what='channel split and shuffle'),
    _spec('vgg11_bn', 'mmpretrain', 'vgg/vgg11bn_8xb32_in1k.py',
          overrides=(('backbone.num_classes', -1), ), input_hw=(32, 32),
          what='plain conv/BN/ReLU stacks (the 224-pixel classifier MLP '
          'off)'),
    _spec('levit_128s', 'mmpretrain', 'levit/levit-128s_8xb256_in1k.py',
          input_hw=(224, 224),
          what='Linear followed by BatchNorm1d (attention biases fix the '
          'input size)'),
    # -- mmyolo -----------------------------------------------------------
    _spec('yolov5_n', 'mmyolo',
          'yolov5/yolov5_n-v61_syncbn_fast_8xb16-300e_coco.py',
          what='CSP blocks, SPPF'),
    _spec('yolov6_n', 'mmyolo',
          'yolov6/yolov6_n_syncbn_fast_8xb32-300e_coco.py',
          what='RepVGG blocks (3x3 + 1x1 + identity BN summed)'),
    _spec('yolov7_tiny', 'mmyolo',
          'yolov7/yolov7_tiny_syncbn_fast_8x16b-300e_coco.py',
          what='ELAN blocks'),
    _spec('yolov8_n', 'mmyolo',
          'yolov8/yolov8_n_syncbn_fast_8xb16-500e_coco.py',
          what='C2f blocks, decoupled head'),
    _spec('ppyoloe_plus_s', 'mmyolo',
          'ppyoloe/ppyoloe_plus_s_fast_8xb8-80e_coco.py',
          what='CSPResNet with RepVGG-style blocks, ESE attention'),
    _spec('rtmdet_tiny_mmyolo', 'mmyolo',
          'rtmdet/rtmdet_tiny_syncbn_fast_8xb32-300e_coco.py',
          what='RTMDet head with shared convs, BN per level'),
    # -- mmpose -----------------------------------------------------------
    _spec('hrnet_w32_topdown', 'mmpose',
          'body_2d_keypoint/topdown_heatmap/coco/'
          'td-hm_hrnet-w32_8xb64-210e_coco-256x192.py', input_hw=(128, 96),
          samples='none', what='HRNet-W32 heatmap'),
    _spec('res50_topdown', 'mmpose',
          'body_2d_keypoint/topdown_heatmap/coco/'
          'td-hm_res50_8xb64-210e_coco-256x192.py', input_hw=(64, 48),
          samples='none', what='deconv head: ConvTranspose2d + BN'),
    _spec('rtmpose_t', 'mmpose',
          'body_2d_keypoint/rtmpose/coco/'
          'rtmpose-t_8xb256-420e_coco-256x192.py', input_hw=(256, 192),
          samples='none', what='CSPNeXt + RTMCC head (GAU, ScaleNorm)'),
    _spec('simcc_mobilenetv2', 'mmpose',
          'body_2d_keypoint/simcc/coco/'
          'simcc_mobilenetv2_wo-deconv-8xb64-210e_coco-256x192.py',
          input_hw=(256, 192), samples='none',
          what='SimCC head on MobileNetV2'),
    _spec('litehrnet_18', 'mmpose',
          'body_2d_keypoint/topdown_heatmap/coco/'
          'td-hm_litehrnet-18_8xb64-210e_coco-256x192.py',
          input_hw=(128, 96), samples='none',
          what='conditional channel weighting, depthwise convs'),
    _spec('dekr_hrnet_w32', 'mmpose',
          'body_2d_keypoint/dekr/coco/'
          'dekr_hrnet-w32_8xb10-140e_coco-512x512.py', input_hw=(64, 64),
          samples='none',
          what='deformable convs whose offsets come from the features'),
]

#: Names of :data:`MODELS`, in order.
MODEL_NAMES: List[str] = [spec.name for spec in MODELS]
_BY_NAME: Dict[str, ModelSpec] = {spec.name: spec for spec in MODELS}


def config_root(package: str) -> str:
    """The folder of the configs ``package`` ships (``<pkg>/.mim/configs``).
    """
    module = importlib.import_module(package)
    root = os.path.join(os.path.dirname(module.__file__), '.mim', 'configs')
    if not os.path.isdir(root):
        raise FileNotFoundError(f'{package} ships no configs at {root}')
    return root


def strip_pretrained(cfg: Any) -> Any:
    """A copy of ``cfg`` without any key that would download weights.

    Args:
        cfg: A config (any nesting of dicts and lists).

    Returns:
        Plain dicts and lists without ``init_cfg``, ``pretrained`` and
        ``checkpoint`` keys at any depth.
    """
    if isinstance(cfg, dict):
        return {
            key: strip_pretrained(value)
            for key, value in cfg.items() if key not in _DOWNLOAD_KEYS
        }
    if isinstance(cfg, (list, tuple)):
        return type(cfg)(strip_pretrained(value) for value in cfg)
    return cfg


def _set_dotted(cfg: Dict, key: str, value: Any) -> None:
    *parents, last = key.split('.')
    for part in parents:
        cfg = cfg[part]
    cfg[last] = value


_registered: Dict[str, bool] = {}


def _registry(package: str):
    """The package's MODELS registry, with every module registered."""
    if package not in _registered:
        utils = importlib.import_module(f'{package}.utils')
        utils.register_all_modules(init_default_scope=False)
        _registered[package] = True
    return importlib.import_module(f'{package}.registry').MODELS


def _det_samples(height: int, width: int) -> List[Any]:
    from mmdet.structures import DetDataSample
    meta = dict(
        img_shape=(height, width),
        ori_shape=(height, width),
        pad_shape=(height, width),
        batch_input_shape=(height, width),
        scale_factor=(1.0, 1.0),
        img_id=0)
    return [DetDataSample(metainfo=meta)]


class TwoStageTensorForward(nn.Module):
    """A two-stage detector's tensor-mode forward with fixed proposals.

    ``TwoStageDetector._forward`` turns the RPN output into proposals (box
    decoding through ``exp``, NMS) and samples the features at them with
    RoIAlign.  Both amplify float32 rounding: in one measurement on Faster
    R-CNN with random weights, the RPN output after an exact fold agreed to
    2e-6 but the RoI head output only to 1.5e-5, because the proposals had
    moved by a fraction of a pixel.  Here the
    RoI head gets fixed proposals instead, and the RPN head's raw output is
    returned too, so every layer is still checked, to 1e-5.

    Args:
        detector: A built ``TwoStageDetector``.
        samples: Detection data samples (image metadata).
        num_boxes: How many fixed proposals, on a grid over the image.
    """

    def __init__(self, detector: nn.Module, samples: List[Any],
                 num_boxes: int = 16):
        super().__init__()
        from mmengine.structures import InstanceData
        self.detector = detector
        self.samples = samples
        height, width = samples[0].metainfo['img_shape']
        side = int(num_boxes**0.5)
        boxes = []
        for row in range(side):
            for col in range(side):
                x0, y0 = col * width / side, row * height / side
                boxes.append([x0, y0, x0 + 1.5 * width / side,
                              y0 + 1.5 * height / side])
        proposals = InstanceData()
        limit = float(max(height, width))
        proposals.bboxes = torch.tensor(boxes).clamp(max=limit)
        self.proposals = [proposals]

    def forward(self, images: torch.Tensor) -> Tuple[Any, Any]:
        feats = self.detector.extract_feat(images)
        rpn_outs = self.detector.rpn_head(feats)
        proposals = [
            p.to(images.device, images.dtype) for p in self.proposals
        ]
        roi_outs = self.detector.roi_head.forward(feats, proposals,
                                                  self.samples)
        return rpn_outs, roi_outs


@contextlib.contextmanager
def _quiet_mmengine() -> Iterator[None]:
    """Silence MMEngine's INFO log (per-parameter init, preprocessor notes)
    so that scripts printing tables keep a clean stdout."""
    from mmengine.logging import MMLogger
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _reset_constant_layers(model: nn.Module) -> None:
    """Give layers whose weight ``init_weights`` set to a constant (e.g.
    zero-initialised prediction convs) their default random weights, so
    that the output depends on every layer before them."""
    for module in model.modules():
        weight = getattr(module, 'weight', None)
        if not isinstance(weight, nn.Parameter) or weight.numel() < 2 or \
                not hasattr(module, 'reset_parameters') or \
                _looks_like_norm(module):
            continue
        if bool((weight == weight.flatten()[0]).all()):
            module.reset_parameters()


@torch.no_grad()
def _scale_offsets(model: nn.Module, scale: float) -> None:
    """Scale the offset convs of the deformable convs of ``model``."""
    for module in model.modules():
        offset = getattr(module, 'conv_offset', None)
        if isinstance(offset, nn.Conv2d):
            offset.weight.mul_(scale)
            if offset.bias is not None:
                offset.bias.mul_(scale)


def get_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` called ``name``."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f'no real model called {name!r}; known: '
                       f'{", ".join(MODEL_NAMES)}') from None


def build(name: str,
          seed: int = 0,
          dtype: Optional[torch.dtype] = None) -> Tuple[nn.Module, Tuple]:
    """Build one real model in eval mode with random norm statistics.

    Args:
        name: A name from :data:`MODEL_NAMES`.
        seed: Seed of the norm statistics and of the example image.
        dtype: Floating point type of the model and its input; by default
            the spec's.

    Returns:
        ``(model, example_inputs)`` such that ``model(*example_inputs)`` is
        the model's tensor-mode forward.
    """
    from mmengine.config import Config, ConfigDict
    from mmengine.registry import DefaultScope

    spec = get_spec(name)
    registry = _registry(spec.package)
    path = os.path.join(config_root(spec.package), spec.config)
    cfg = Config.fromfile(path)
    model_cfg = strip_pretrained(cfg.model.to_dict())
    for key, value in spec.overrides:
        _set_dotted(model_cfg, key, value)
    # Models read train_cfg/test_cfg by attribute: build from a ConfigDict.
    model_cfg = ConfigDict(model_cfg)
    # Weights come from each module's own ``init_weights`` (some modules
    # leave parameters uninitialised until it runs): seed it, without
    # disturbing the caller's random state.
    with torch.random.fork_rng(devices=[]), _quiet_mmengine(), \
            DefaultScope.overwrite_default_scope(_SCOPES[spec.package]):
        torch.manual_seed(seed)
        model = registry.build(model_cfg)
        model.init_weights()
        _reset_constant_layers(model)
        if spec.offset_scale != 1.0:
            _scale_offsets(model, spec.offset_scale)
    height, width = spec.input_hw
    if spec.samples == 'two_stage':
        model = TwoStageTensorForward(model, _det_samples(height, width))
    randomize_norm_stats(model, seed=seed)
    dtype = dtype or getattr(torch, spec.dtype)
    model.to(dtype).eval()
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(1, 3, height, width, generator=gen).to(dtype)
    inputs: Tuple = (image, )
    if spec.samples == 'det':
        inputs = (image, _det_samples(height, width))
    elif spec.samples == 'none':
        inputs = (image, None)
    elif spec.samples not in ('', 'two_stage'):
        raise ValueError(f'{name}: unknown samples kind {spec.samples!r}')
    return model, inputs


def is_batch_norm_with_stats(module: nn.Module) -> bool:
    """Whether ``module`` is a batch norm that keeps running statistics.

    The test's own definition of *foldable in principle*, independent of
    mmfuse's: a ``_BatchNorm`` (torch's or mmcv's SyncBN included) with
    running statistics.
    """
    cls_names = {cls.__name__ for cls in type(module).__mro__}
    is_bn = isinstance(module, nn.modules.batchnorm._BatchNorm) or (
        'SyncBatchNorm' in cls_names)
    return is_bn and getattr(module, 'running_mean', None) is not None


def norm_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """Every leaf normalisation layer of ``model`` by its first path.

    Independent of mmfuse's own detection: torch's norm base classes, plus
    any leaf module whose class name says it normalises (``*Norm*``,
    ``*BN``).
    """
    found: Dict[str, nn.Module] = {}
    seen = set()
    for path, module in model.named_modules():
        if id(module) in seen or next(module.children(), None) is not None:
            continue
        if _looks_like_norm(module):
            seen.add(id(module))
            found[path] = module
    return found


def _looks_like_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    torch_norm = isinstance(
        module,
        (_NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm))
    return torch_norm or 'Norm' in name or name.endswith('BN')
