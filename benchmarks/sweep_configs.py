"""Sweep conv/BN fusion over ~320 configs the OpenMMLab packages ship.

Builds each model of :data:`CONFIGS` (150 mmdet, mmseg, mmpretrain, mmyolo
and mmpose configs, read from ``<package>/.mim/configs``; the ones a
first, throwaway sweep could build and run on CPU; ``--models extra``:
the 169 of :data:`EXTRA_CONFIGS`, other families) as ``tests/real_models.py``
builds its curated models: download keys stripped, seeded weights from the
modules' own ``init_weights``, random batch norm statistics, a small
seeded input, eval mode, float32.  Then three ways to fuse are run, each
on a deep copy of the unfused model:

* ``fuse_model``: :func:`mmfuse.fuse_model` with the example input;
* ``fuse_conv_bn``: :func:`mmfuse.fuse_conv_bn` (structure only);
* ``mmcv``: ``mmcv.cnn.fuse_conv_bn`` (pairs a batch norm with the conv
  registered just before it).

For each: the batch norms folded (foldable batch norms, those with running
statistics counted once per module, that are no longer at their path in the
fused copy: folded, or merged by re-parameterisation), the largest relative
output error against the unfused model, the time, or the crash (one line;
the traceback's tail goes to ``--out``).  For ``fuse_model`` also its
report: its summary, why it left each foldable batch norm (counted by
reason), and the foldable batch norms it neither folded nor gave a reason
for.  Where mmcv folds batch norms that ``fuse_model`` leaves, each (up to
:data:`MAX_GAP_CHECKS`) is folded alone, as mmcv folds it, on another copy,
and judged: ``wrong`` when that moves the output by more than
:data:`GAP_TOLERANCE`; else ``exact`` where removing the batch norm
moves it by more than :data:`GAP_SENSITIVITY` times that, and
``insensitive`` where it does not (the output hardly depends on the
norm: nothing to tell); ``not run`` for a batch norm the forward pass
did not call.  The unfused model is run twice; where the two outputs
differ it is flagged as nondeterministic and its errors mean nothing.

With ``--float64-recheck``, a model on which a method's float32 error is
over :data:`RECHECK_ABOVE` (1e-5), or on which mmcv folds batch norms that
``fuse_model`` leaves, is built and measured again in float64, where
float32 rounding (amplified by a discontinuous head, for example) no
longer hides or fakes an error: that run decides whether an output is
corrupted and whether mmcv's extra folds are exact.

Prints, as it goes, one markdown row per model (folds and error of each
method, the most frequent reason ``fuse_model`` gave, seconds), with
``[i/n] name`` progress on stderr; at the end a table of the flagged models
(crashes and timeouts; a float32 error over :data:`CORRUPT_ABOVE`, 1e-4,
with the float64 recheck's; foldable batch norms left without a reason;
batch norms mmcv folds exactly that ``fuse_model`` leaves; nondeterministic
models), the reasons ``fuse_model`` gave over all models, and totals:
configs run, crashes, outputs over 1e-4 in float32, corrupted outputs (over
1e-4 in float64 where rechecked, else in float32).  With ``--out``, one
JSON line per model is written as each finishes.

Usage (CPU; a full sweep takes hours, each model runs alone under
``--timeout``)::

    PYTHONPATH=. python benchmarks/sweep_configs.py [--models a,b|extra]
        [--out results.jsonl] [--float64-recheck] [--timeout 300]
        [--threads 1]
"""
import argparse
import contextlib
import copy
import gc
import importlib
import json
import os
import re
import signal
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from typing import (Any, Callable, Dict, Iterator, List, Optional, Set,
                    Tuple)

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_leaves

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'tests'))

import mmfuse  # noqa: E402
import real_models  # noqa: E402
from mmfuse.testing import randomize_norm_stats  # noqa: E402
from mmfuse.verify import output_error  # noqa: E402

METHODS = ('fuse_model', 'fuse_conv_bn', 'mmcv')
#: A float32 error above this sends the model to the float64 recheck.
RECHECK_ABOVE = 1e-5
#: An error above this is a corrupted output (float64 error where
#: rechecked, else float32).
CORRUPT_ABOVE = 1e-4
#: Largest output error of a batch norm folded alone that counts as exact.
GAP_TOLERANCE = {'float32': 1e-5, 'float64': 1e-10}
#: Removing the batch norm must move the output by more than this many
#: tolerances for its lone fold to tell anything.
GAP_SENSITIVITY = 100
#: Batch norms folded alone per model, of those mmcv folds and fuse_model
#: leaves.
MAX_GAP_CHECKS = 8
#: Seed of the weights, the norm statistics and the input.
SEED = 0


@dataclass(frozen=True)
class SweepSpec:
    """One config of the sweep.

    Attributes:
        name: Short name, for ``--models`` and the tables.
        package: ``'mmdet'``, ``'mmseg'``, ``'mmpretrain'``, ``'mmyolo'``
            or ``'mmpose'``.
        config: Path of the config under the package's shipped configs
            (:func:`real_models.config_root`).
        input_size: ``(height, width)`` of the example RGB image, or
            ``(channels, frames)`` of the example sequence where
            ``sequence``.
        samples: The second positional argument of ``forward``, as in
            :class:`real_models.ModelSpec`: ``''`` none, ``'det'`` a list
            of detection data samples, ``'none'`` ``None`` (mmpose), and
            ``'two_stage'`` no second argument but the detector wrapped in
            :class:`real_models.TwoStageTensorForward`.
        overrides: Dotted keys and values set in ``cfg.model`` (to fit the
            input size).
        reseed: Reseed torch's generator before each forward pass of the
            model (SegNeXt's Hamburger head draws random bases in eval
            mode: without it two passes differ).
        sequence: The input is a ``(1, channels, frames)`` sequence (a
            pose lifter) rather than an image.
    """
    name: str
    package: str
    config: str
    input_size: Tuple[int, int]
    samples: str = ''
    overrides: Tuple[Tuple[str, Any], ...] = ()
    reseed: bool = False
    sequence: bool = False


def _row(name: str, package: str, config: str, input_size: Tuple[int, int],
         samples: str = '', **extras: Any) -> SweepSpec:
    return SweepSpec(name, package, config, input_size, samples, **extras)


_TD = 'body_2d_keypoint/topdown_heatmap/coco/'

#: The configs, by package: name, package, config, input size, second
#: argument (and, for a few, extras).
CONFIGS: List[SweepSpec] = [
    # -- mmdet --------------------------------------------------------------
    _row('det_pafpn_frcnn', 'mmdet',
         'pafpn/faster-rcnn_r50_pafpn_1x_coco.py', (128, 128), 'two_stage'),
    _row('det_nasfcos_nashead', 'mmdet',
         'nas_fcos/nas-fcos_r50-caffe_fpn_nashead-gn-head_4xb4-1x_coco.py',
         (128, 128)),
    _row('det_hrnet_w18_frcnn', 'mmdet',
         'hrnet/faster-rcnn_hrnetv2p-w18-1x_coco.py', (128, 128), 'two_stage'),
    _row('det_res2net101_frcnn', 'mmdet',
         'res2net/faster-rcnn_res2net-101_fpn_2x_coco.py',
         (128, 128), 'two_stage'),
    _row('det_regnetx800_retina', 'mmdet',
         'regnet/retinanet_regnetx-800MF_fpn_1x_coco.py', (128, 128)),
    _row('det_resnest50_frcnn_syncbn_head', 'mmdet',
         'resnest/faster-rcnn_s50_fpn_syncbn-backbone+head'
         '_ms-range-1x_coco.py', (128, 128), 'two_stage'),
    _row('det_cascade_mask_rcnn_r50', 'mmdet',
         'cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py',
         (128, 128), 'two_stage'),
    _row('det_ssd300', 'mmdet', 'ssd/ssd300_coco.py', (300, 300)),
    _row('det_yolof', 'mmdet',
         'yolof/yolof_r50-c5_8xb8-1x_coco.py', (128, 128)),
    _row('det_tood', 'mmdet', 'tood/tood_r50_fpn_1x_coco.py', (128, 128)),
    _row('det_gfl', 'mmdet', 'gfl/gfl_r50_fpn_1x_coco.py', (128, 128)),
    _row('det_vfnet', 'mmdet', 'vfnet/vfnet_r50_fpn_1x_coco.py', (128, 128)),
    _row('det_paa', 'mmdet', 'paa/paa_r50_fpn_1x_coco.py', (128, 128)),
    _row('det_autoassign', 'mmdet',
         'autoassign/autoassign_r50-caffe_fpn_1x_coco.py', (128, 128)),
    _row('det_centernet_update', 'mmdet',
         'centernet/centernet-update_r50-caffe_fpn_ms-1x_coco.py', (128, 128)),
    _row('det_cornernet_hg104', 'mmdet',
         'cornernet/cornernet_hourglass104_8xb6-210e-mstest_coco.py',
         (64, 64)),
    _row('det_centripetalnet_hg104', 'mmdet',
         'centripetalnet/centripetalnet_hourglass104'
         '_16xb6-crop511-210e-mstest_coco.py', (64, 64)),
    _row('det_rtmdet_ins_tiny', 'mmdet',
         'rtmdet/rtmdet-ins_tiny_8xb32-300e_coco.py', (64, 64)),
    _row('det_rtmdet_s', 'mmdet',
         'rtmdet/rtmdet_s_8xb32-300e_coco.py', (64, 64)),
    _row('det_pisa_ssd300', 'mmdet', 'pisa/ssd300_pisa_coco.py', (300, 300)),
    _row('det_libra_retina', 'mmdet',
         'libra_rcnn/libra-retinanet_r50_fpn_1x_coco.py', (128, 128)),
    _row('det_gcnet_mrcnn_syncbn', 'mmdet',
         'gcnet/mask-rcnn_r50-syncbn-gcb-r4-c3-c5_fpn_1x_coco.py',
         (128, 128), 'two_stage'),
    _row('det_dyhead_atss', 'mmdet',
         'dyhead/atss_r50_fpn_dyhead_1x_coco.py', (128, 128)),
    _row('det_foveabox', 'mmdet',
         'foveabox/fovea_r50_fpn_4xb4-1x_coco.py', (128, 128)),
    _row('det_reppoints_moment', 'mmdet',
         'reppoints/reppoints-moment_r50_fpn-gn_head-gn_1x_coco.py',
         (128, 128)),
    _row('det_sabl_retina', 'mmdet',
         'sabl/sabl-retinanet_r50_fpn_1x_coco.py', (128, 128)),
    _row('det_fpg_retina', 'mmdet',
         'fpg/retinanet_r50_fpg_crop640_50e_coco.py', (128, 128)),
    _row('det_detectors_cascade', 'mmdet',
         'detectors/detectors_cascade-rcnn_r50_1x_coco.py',
         (128, 128), 'two_stage'),
    _row('det_sac_cascade', 'mmdet',
         'detectors/cascade-rcnn_r50-sac_1x_coco.py', (128, 128), 'two_stage'),
    _row('det_scnet', 'mmdet',
         'scnet/scnet_r50_fpn_1x_coco.py', (128, 128), 'two_stage'),
    _row('det_htc', 'mmdet',
         'htc/htc_r50_fpn_1x_coco.py', (128, 128), 'two_stage'),
    _row('det_double_heads', 'mmdet',
         'double_heads/dh-faster-rcnn_r50_fpn_1x_coco.py',
         (128, 128), 'two_stage'),
    _row('det_yolov3_d53', 'mmdet',
         'yolo/yolov3_d53_8xb8-320-273e_coco.py', (64, 64)),
    _row('det_tridentnet', 'mmdet',
         'tridentnet/tridentnet_r50-caffe_1x_coco.py',
         (128, 128), 'two_stage'),
    _row('det_gn_ws_frcnn', 'mmdet',
         'gn+ws/faster-rcnn_r50_fpn_gn-ws-all_1x_coco.py',
         (128, 128), 'two_stage'),
    _row('det_grid_rcnn', 'mmdet',
         'grid_rcnn/grid-rcnn_r50_fpn_gn-head_1x_coco.py',
         (128, 128), 'two_stage'),
    _row('det_decoupled_solo_light', 'mmdet',
         'solo/decoupled-solo-light_r50_fpn_3x_coco.py', (128, 128), 'det'),
    _row('det_mask2former_r50', 'mmdet',
         'mask2former/mask2former_r50_8xb2-lsj-50e_coco.py', (64, 64), 'det'),
    _row('det_point_rend', 'mmdet',
         'point_rend/point-rend_r50-caffe_fpn_ms-1x_coco.py',
         (128, 128), 'two_stage'),
    # -- mmseg --------------------------------------------------------------
    _row('seg_ann', 'mmseg',
         'ann/ann_r50-d8_4xb2-40k_cityscapes-512x1024.py', (64, 64)),
    _row('seg_apcnet', 'mmseg',
         'apcnet/apcnet_r50-d8_4xb2-40k_cityscapes-512x1024.py', (64, 64)),
    _row('seg_ccnet', 'mmseg',
         'ccnet/ccnet_r50-d8_4xb2-40k_cityscapes-512x1024.py', (64, 64)),
    _row('seg_danet', 'mmseg',
         'danet/danet_r50-d8_4xb2-40k_cityscapes-512x1024.py', (64, 64)),
    _row('seg_dmnet', 'mmseg',
         'dmnet/dmnet_r50-d8_4xb2-40k_cityscapes-512x1024.py', (64, 64)),
    _row('seg_dnl', 'mmseg',
         'dnlnet/dnl_r50-d8_4xb2-40k_cityscapes-512x1024.py', (64, 64)),
    _row('seg_emanet', 'mmseg',
         'emanet/emanet_r50-d8_4xb2-80k_cityscapes-512x1024.py', (64, 64)),
    _row('seg_encnet', 'mmseg',
         'encnet/encnet_r50-d8_4xb2-40k_cityscapes-512x1024.py', (64, 64)),
    _row('seg_gcnet', 'mmseg',
         'gcnet/gcnet_r50-d8_4xb2-40k_cityscapes-512x1024.py', (64, 64)),
    _row('seg_isanet', 'mmseg',
         'isanet/isanet_r50-d8_4xb2-40k_cityscapes-512x1024.py', (64, 64)),
    _row('seg_knet_fcn', 'mmseg',
         'knet/knet-s3_r50-d8_fcn_8xb2-adamw-80k_ade20k-512x512.py', (64, 64)),
    _row('seg_nonlocal', 'mmseg',
         'nonlocal_net/nonlocal_r50-d8_4xb2-40k_cityscapes-512x1024.py',
         (64, 64)),
    _row('seg_ocrnet_hr18s', 'mmseg',
         'ocrnet/ocrnet_hr18s_4xb2-40k_cityscapes-512x1024.py', (64, 64)),
    _row('seg_semfpn', 'mmseg',
         'sem_fpn/fpn_r50_4xb2-80k_cityscapes-512x1024.py', (64, 64)),
    _row('seg_mnv2_deeplabv3', 'mmseg',
         'mobilenet_v2/mobilenet-v2-d8_deeplabv3_4xb2-80k'
         '_cityscapes-512x1024.py', (64, 64)),
    _row('seg_resnest101_fcn', 'mmseg',
         'resnest/resnest_s101-d8_fcn_4xb2-80k_cityscapes-512x1024.py',
         (64, 64)),
    _row('seg_ddrnet_slim', 'mmseg',
         'ddrnet/ddrnet_23-slim_in1k-pre_2xb6-120k_cityscapes-1024x1024.py',
         (64, 64)),
    _row('seg_pidnet_s', 'mmseg',
         'pidnet/pidnet-s_2xb6-120k_1024x1024-cityscapes.py', (64, 64)),
    _row('seg_fastfcn_jpu_aspp', 'mmseg',
         'fastfcn/fastfcn_r50-d32_jpu_aspp_4xb2-80k_cityscapes-512x1024.py',
         (64, 64)),
    _row('seg_fastfcn_jpu_enc', 'mmseg',
         'fastfcn/fastfcn_r50-d32_jpu_enc_4xb2-80k_cityscapes-512x1024.py',
         (64, 64)),
    _row('seg_unet_fcn', 'mmseg',
         'unet/unet-s5-d16_fcn_4xb4-40k_drive-64x64.py', (64, 64)),
    _row('seg_segnext_t', 'mmseg',
         'segnext/segnext_mscan-t_1xb16-adamw-160k_ade20k-512x512.py',
         (64, 64)),
    _row('seg_poolformer_fpn', 'mmseg',
         'poolformer/fpn_poolformer_s12_8xb4-40k_ade20k-512x512.py', (64, 64)),
    _row('seg_deeplabv3_r50', 'mmseg',
         'deeplabv3/deeplabv3_r101-d8_4xb2-40k_cityscapes-512x1024.py',
         (64, 64)),
    _row('seg_psanet', 'mmseg',
         'psanet/psanet_r50-d8_4xb2-40k_cityscapes-512x1024.py',
         (64, 64), overrides=(('decode_head.mask_size', (15, 15)),)),
    _row('seg_mae_upernet', 'mmseg',
         'mae/mae-base_upernet_8xb2-amp-160k_ade20k-512x512.py',
         (64, 64), overrides=(('backbone.img_size', (64, 64)),)),
    _row('seg_dpt', 'mmseg',
         'dpt/dpt_vit-b16_8xb2-160k_ade20k-512x512.py',
         (64, 64), overrides=(('backbone.img_size', (64, 64)),)),
    _row('seg_twins_pcpvt_fpn', 'mmseg',
         'twins/twins_pcpvt-s_fpn_fpnhead_8xb4-80k_ade20k-512x512.py',
         (64, 64)),
    _row('seg_segnext_t_reseed', 'mmseg',
         'segnext/segnext_mscan-t_1xb16-adamw-160k_ade20k-512x512.py',
         (64, 64), reseed=True),
    # -- mmpretrain ---------------------------------------------------------
    _row('cls_resnest50', 'mmpretrain',
         'resnest/resnest50_32xb64_in1k.py', (64, 64)),
    _row('cls_res2net50_w14', 'mmpretrain',
         'res2net/res2net50-w14-s8_8xb32_in1k.py', (64, 64)),
    _row('cls_seresnet50', 'mmpretrain',
         'seresnet/seresnet50_8xb32_in1k.py', (64, 64)),
    _row('cls_seresnext50', 'mmpretrain',
         'seresnet/seresnext50-32x4d_8xb32_in1k.py', (64, 64)),
    _row('cls_resnetv1c50', 'mmpretrain',
         'resnet/resnetv1c50_8xb32_in1k.py', (64, 64)),
    _row('cls_resnetv1d50', 'mmpretrain',
         'resnet/resnetv1d50_8xb32_in1k.py', (64, 64)),
    _row('cls_resnet18_cifar', 'mmpretrain',
         'resnet/resnet18_8xb16_cifar10.py', (32, 32)),
    _row('cls_tnt', 'mmpretrain', 'tnt/tnt-s-p16_16xb64_in1k.py', (224, 224)),
    _row('cls_cspdarknet50', 'mmpretrain',
         'cspnet/cspdarknet50_8xb32_in1k.py', (64, 64)),
    _row('cls_cspresnet50', 'mmpretrain',
         'cspnet/cspresnet50_8xb32_in1k.py', (64, 64)),
    _row('cls_cspresnext50', 'mmpretrain',
         'cspnet/cspresnext50_8xb32_in1k.py', (64, 64)),
    _row('cls_effv2_b0', 'mmpretrain',
         'efficientnet_v2/efficientnetv2-b0_8xb32_in1k.py', (64, 64)),
    _row('cls_hrnet_w30', 'mmpretrain',
         'hrnet/hrnet-w30_4xb32_in1k.py', (64, 64)),
    _row('cls_repmlp_base', 'mmpretrain',
         'repmlp/repmlp-base_8xb64_in1k.py', (224, 224)),
    _row('cls_repvgg_b1g2', 'mmpretrain',
         'repvgg/repvgg-B1g2_8xb32_in1k.py', (64, 64)),
    _row('cls_repvgg_d2se', 'mmpretrain',
         'repvgg/repvgg-D2se_8xb32_in1k.py', (64, 64)),
    _row('cls_mobileone_s1', 'mmpretrain',
         'mobileone/mobileone-s1_8xb32_in1k.py', (64, 64)),
    _row('cls_mobileone_s4', 'mmpretrain',
         'mobileone/mobileone-s4_8xb32_in1k.py', (64, 64)),
    _row('cls_convmixer_768', 'mmpretrain',
         'convmixer/convmixer-768-32_10xb64_in1k.py', (112, 112)),
    _row('cls_poolformer_s12', 'mmpretrain',
         'poolformer/poolformer-s12_32xb128_in1k.py', (64, 64)),
    _row('cls_edgenext_xxs', 'mmpretrain',
         'edgenext/edgenext-xxsmall_8xb256_in1k.py', (128, 128)),
    _row('cls_hornet_tiny', 'mmpretrain',
         'hornet/hornet-tiny_8xb128_in1k.py', (64, 64)),
    _row('cls_van_tiny', 'mmpretrain',
         'van/van-tiny_8xb128_in1k.py', (64, 64)),
    _row('cls_mobilevit_xxs', 'mmpretrain',
         'mobilevit/mobilevit-xxsmall_8xb128_in1k.py', (128, 128)),
    _row('cls_tinyvit_5m', 'mmpretrain',
         'tinyvit/tinyvit-5m_8xb256_in1k.py', (224, 224)),
    _row('cls_riformer_s12', 'mmpretrain',
         'riformer/riformer-s12_8xb128_in1k.py', (64, 64)),
    _row('cls_densenet169', 'mmpretrain',
         'densenet/densenet169_4xb256_in1k.py', (64, 64)),
    _row('cls_shufflenet_v1', 'mmpretrain',
         'shufflenet_v1/shufflenet-v1-1x_16xb64_in1k.py', (64, 64)),
    _row('cls_mnv3_large', 'mmpretrain',
         'mobilenet_v3/mobilenet-v3-large_8xb128_in1k.py', (64, 64)),
    _row('cls_conformer_tiny', 'mmpretrain',
         'conformer/conformer-tiny-p16_8xb128_in1k.py', (224, 224)),
    _row('cls_efficientformer_l1', 'mmpretrain',
         'efficientformer/efficientformer-l1_8xb128_in1k.py', (224, 224)),
    _row('cls_levit_192', 'mmpretrain',
         'levit/levit-192_8xb256_in1k.py', (224, 224)),
    _row('cls_inception_v3', 'mmpretrain',
         'inception_v3/inception-v3_8xb32_in1k.py', (128, 128)),
    _row('cls_wrn50', 'mmpretrain',
         'wrn/wide-resnet50_8xb32_in1k.py', (64, 64)),
    _row('cls_vig_tiny', 'mmpretrain',
         'vig/vig-tiny_8xb128_in1k.py', (224, 224)),
    _row('cls_pvig_tiny', 'mmpretrain',
         'vig/pvig-tiny_8xb128_in1k.py', (224, 224)),
    _row('cls_xcit_nano', 'mmpretrain',
         'xcit/xcit-nano-12-p16_8xb128_in1k.py', (112, 112)),
    _row('cls_regnetx_1.6gf', 'mmpretrain',
         'regnet/regnetx-1.6gf_8xb128_in1k.py', (64, 64)),
    _row('cls_effb0_01norm', 'mmpretrain',
         'efficientnet/efficientnet-b0_8xb32-01norm_in1k.py', (64, 64)),
    _row('cls_convnextv2_atto', 'mmpretrain',
         'convnext_v2/convnext-v2-atto_32xb32_in1k.py', (64, 64)),
    _row('cls_davit_tiny', 'mmpretrain',
         'davit/davit-tiny_4xb256_in1k.py', (224, 224)),
    _row('cls_replknet_31b_basecfg', 'mmpretrain',
         '_base_/models/replknet-31B_in1k.py', (64, 64)),
    # -- mmyolo -------------------------------------------------------------
    _row('yolo_v5_s_p6', 'mmyolo',
         'yolov5/yolov5_s-p6-v62_syncbn_fast_8xb16-300e_coco.py', (128, 128)),
    _row('yolo_v6_s', 'mmyolo',
         'yolov6/yolov6_s_syncbn_fast_8xb32-300e_coco.py', (128, 128)),
    _row('yolo_v6_m', 'mmyolo',
         'yolov6/yolov6_m_syncbn_fast_8xb32-300e_coco.py', (128, 128)),
    _row('yolo_v6_l', 'mmyolo',
         'yolov6/yolov6_l_syncbn_fast_8xb32-300e_coco.py', (128, 128)),
    _row('yolo_v6_v3_s', 'mmyolo',
         'yolov6/yolov6_v3_s_syncbn_fast_8xb32-300e_coco.py', (128, 128)),
    _row('yolo_v7_l', 'mmyolo',
         'yolov7/yolov7_l_syncbn_fast_8x16b-300e_coco.py', (128, 128)),
    _row('yolo_v7_x', 'mmyolo',
         'yolov7/yolov7_x_syncbn_fast_8x16b-300e_coco.py', (128, 128)),
    _row('yolo_v7_w_p6', 'mmyolo',
         'yolov7/yolov7_w-p6_syncbn_fast_8x16b-300e_coco.py', (128, 128)),
    _row('yolo_v8_m', 'mmyolo',
         'yolov8/yolov8_m_syncbn_fast_8xb16-500e_coco.py', (128, 128)),
    _row('yolo_rtmdet_s', 'mmyolo',
         'rtmdet/rtmdet_s_syncbn_fast_8xb32-300e_coco.py', (128, 128)),
    _row('yolo_rtmdet_ins_s', 'mmyolo',
         'rtmdet/rtmdet-ins_s_syncbn_fast_8xb32-300e_coco.py', (128, 128)),
    _row('yolo_ppyoloe_plus_m', 'mmyolo',
         'ppyoloe/ppyoloe_plus_m_fast_8xb8-80e_coco.py', (128, 128)),
    _row('yolo_ppyoloe_s', 'mmyolo',
         'ppyoloe/ppyoloe_s_fast_8xb32-300e_coco.py', (128, 128)),
    _row('yolo_yolox_s', 'mmyolo',
         'yolox/yolox_s_fast_8xb8-300e_coco.py', (128, 128)),
    # -- mmpose -------------------------------------------------------------
    _row('pose_cspnext_m_udp', 'mmpose',
         _TD + 'cspnext-m_udp_8xb256-210e_coco-256x192.py', (128, 96), 'none'),
    _row('pose_rtmpose_m', 'mmpose',
         'body_2d_keypoint/rtmpose/coco/rtmpose-m_8xb256-420e_coco-256x192.py',
         (256, 192), 'none'),
    _row('pose_vipnas_mbv3', 'mmpose',
         _TD + 'td-hm_vipnas-mbv3_8xb64-210e_coco-256x192.py',
         (128, 96), 'none'),
    _row('pose_vipnas_res50', 'mmpose',
         _TD + 'td-hm_vipnas-res50_8xb64-210e_coco-256x192.py',
         (128, 96), 'none'),
    _row('pose_hrnet_w32_dark', 'mmpose',
         _TD + 'td-hm_hrnet-w32_dark-8xb64-210e_coco-256x192.py',
         (128, 96), 'none'),
    _row('pose_rsn18', 'mmpose',
         _TD + 'td-hm_rsn18_8xb32-210e_coco-256x192.py', (128, 96), 'none'),
    _row('pose_2xrsn50', 'mmpose',
         _TD + 'td-hm_2xrsn50_8xb32-210e_coco-256x192.py', (128, 96), 'none'),
    _row('pose_mspn50', 'mmpose',
         _TD + 'td-hm_mspn50_8xb32-210e_coco-256x192.py', (128, 96), 'none'),
    _row('pose_cpm', 'mmpose',
         _TD + 'td-hm_cpm_8xb64-210e_coco-256x192.py', (128, 96), 'none'),
    _row('pose_hourglass52', 'mmpose',
         _TD + 'td-hm_hourglass52_8xb32-210e_coco-256x256.py',
         (128, 128), 'none'),
    _row('pose_mobilenetv2', 'mmpose',
         _TD + 'td-hm_mobilenetv2_8xb64-210e_coco-256x192.py',
         (128, 96), 'none'),
    _row('pose_shufflenetv1', 'mmpose',
         _TD + 'td-hm_shufflenetv1_8xb64-210e_coco-256x192.py',
         (128, 96), 'none'),
    _row('pose_shufflenetv2', 'mmpose',
         _TD + 'td-hm_shufflenetv2_8xb64-210e_coco-256x192.py',
         (128, 96), 'none'),
    _row('pose_litehrnet30', 'mmpose',
         _TD + 'td-hm_litehrnet-30_8xb64-210e_coco-256x192.py',
         (128, 96), 'none'),
    _row('pose_resnest50', 'mmpose',
         _TD + 'td-hm_resnest50_8xb64-210e_coco-256x192.py',
         (128, 96), 'none'),
    _row('pose_vgg16bn', 'mmpose',
         _TD + 'td-hm_vgg16-bn_8xb64-210e_coco-256x192.py', (128, 96), 'none'),
    _row('pose_alexnet', 'mmpose',
         _TD + 'td-hm_alexnet_8xb64-210e_coco-256x192.py', (128, 96), 'none'),
    _row('pose_rle_res50', 'mmpose',
         'body_2d_keypoint/topdown_regression/coco/td-reg_res50'
         '_rle-8xb64-210e_coco-256x192.py', (128, 96), 'none'),
    _row('pose_face_hrnetv2', 'mmpose',
         'face_2d_keypoint/topdown_heatmap/wflw/td-hm_hrnetv2-w18'
         '_8xb64-60e_wflw-256x256.py', (128, 128), 'none'),
    _row('pose_ae_hrnet', 'mmpose',
         'body_2d_keypoint/associative_embedding/coco/ae_hrnet-w32'
         '_8xb24-300e_coco-512x512.py', (64, 64), 'none'),
    _row('pose_cid_hrnet', 'mmpose',
         'body_2d_keypoint/cid/coco/cid_hrnet-w32_8xb20-140e_coco-512x512.py',
         (64, 64), 'none'),
    _row('pose_yoloxpose_s', 'mmpose',
         'body_2d_keypoint/yoloxpose/coco/yoloxpose_s_8xb32-300e_coco-640.py',
         (128, 128), 'none'),
    _row('pose_rtmo_s', 'mmpose',
         'body_2d_keypoint/rtmo/coco/rtmo-s_8xb32-600e_coco-640x640.py',
         (128, 128), 'none'),
    _row('pose_videopose_27frm', 'mmpose',
         'body_3d_keypoint/video_pose_lift/h36m/video-pose-lift'
         '_tcn-27frm-supv_8xb128-160e_h36m.py',
         (34, 27), 'none', sequence=True),
    _row('pose_scnet50_256', 'mmpose',
         _TD + 'td-hm_scnet50_8xb64-210e_coco-256x192.py', (256, 192), 'none'),
    _row('pose_ipr_dsnt_256', 'mmpose',
         'body_2d_keypoint/integral_regression/coco/ipr_res50'
         '_dsnt-8xb64-210e_coco-256x256.py', (256, 256), 'none'),
]

#: More configs, of families :data:`CONFIGS` lacks (``--models extra``):
#: the ones of a second sweep, over configs of other backbones, necks,
#: heads, decoders and self-supervised models, that build and run on
#: CPU with this harness as it is (configs whose forward needs more than
#: it gives, such as ground truth in the data samples, are left out).
EXTRA_CONFIGS: List[SweepSpec] = [
    # -- mmdet ----------------------------------------------------------------
    _row('det_fsaf', 'mmdet', 'fsaf/fsaf_r50_fpn_1x_coco.py', (128, 128)),
    _row('det_groie_frcnn', 'mmdet',
         'groie/faste-rcnn_r50_fpn_groie_1x_coco.py', (128, 128), 'two_stage'),
    _row('det_ms_rcnn', 'mmdet',
         'ms_rcnn/ms-rcnn_r50_fpn_1x_coco.py', (128, 128), 'two_stage'),
    _row('det_panoptic_fpn', 'mmdet',
         'panoptic_fpn/panoptic-fpn_r50_fpn_1x_coco.py',
         (128, 128), 'two_stage'),
    _row('det_crowddet', 'mmdet',
         'crowddet/crowddet-rcnn_r50_fpn_8xb2-30e_crowdhuman.py',
         (128, 128), 'two_stage'),
    _row('det_maskformer_r50', 'mmdet',
         'maskformer/maskformer_r50_ms-16xb1-75e_coco.py', (64, 64), 'det'),
    _row('det_rpn_c4', 'mmdet', 'rpn/rpn_r50-caffe-c4_1x_coco.py', (128, 128)),
    _row('det_frcnn_c4', 'mmdet',
         'faster_rcnn/faster-rcnn_r50-caffe_c4-1x_coco.py',
         (128, 128), 'two_stage'),
    _row('det_mrcnn_c4', 'mmdet',
         'mask_rcnn/mask-rcnn_r50-caffe-c4_1x_coco.py',
         (128, 128), 'two_stage'),
    _row('det_frcnn_dc5', 'mmdet',
         'faster_rcnn/faster-rcnn_r50-caffe-dc5_1x_coco.py',
         (128, 128), 'two_stage'),
    _row('det_attn1111', 'mmdet',
         'empirical_attention/faster-rcnn_r50-attn1111_fpn_1x_coco.py',
         (64, 64), 'two_stage'),
    _row('det_pvtv2_b0_retina', 'mmdet',
         'pvt/retinanet_pvtv2-b0_fpn_1x_coco.py', (128, 128)),
    _row('det_conditional_detr', 'mmdet',
         'conditional_detr/conditional-detr_r50_8xb2-50e_coco.py',
         (64, 64), 'det'),
    _row('det_yolox_nano', 'mmdet',
         'yolox/yolox_nano_8xb8-300e_coco.py', (128, 128)),
    _row('det_yolox_s', 'mmdet',
         'yolox/yolox_s_8xb8-300e_coco.py', (128, 128)),
    _row('det_solov2_light', 'mmdet',
         'solov2/solov2-light_r18_fpn_ms-3x_coco.py', (128, 128), 'det'),
    _row('det_gn_mrcnn', 'mmdet',
         'gn/mask-rcnn_r50_fpn_gn-all_2x_coco.py', (128, 128), 'two_stage'),
    _row('det_free_anchor', 'mmdet',
         'free_anchor/freeanchor_r50_fpn_1x_coco.py', (128, 128)),
    _row('det_reid_r50', 'mmdet',
         'reid/reid_r50_8xb32-6e_mot17train80_test-mot17val20.py', (256, 128)),
    _row('det_dino4', 'mmdet',
         'dino/dino-4scale_r50_8xb2-12e_coco.py', (256, 256), 'det'),
    _row('det_dab_detr', 'mmdet',
         'dab_detr/dab-detr_r50_8xb2-50e_coco.py', (64, 64), 'det'),
    _row('det_solo_r50', 'mmdet',
         'solo/solo_r50_fpn_1x_coco.py', (128, 128), 'det'),
    _row('det_fcos_dcn_tricks', 'mmdet',
         'fcos/'
         'fcos_r50-dcn-caffe_fpn_gn-head-center-normbbox-centeronreg-giou_1x'
         '_coco.py',
         (128, 128)),
    _row('det_convnext_cmrcnn', 'mmdet',
         'convnext/'
         'cascade-mask-rcnn_convnext-t-p4-w7_fpn_4conv1fc-giou'
         '_amp-ms-crop-3x_coco.py',
         (128, 128), 'two_stage'),
    _row('det_hrnet_fcos', 'mmdet',
         'hrnet/fcos_hrnetv2p-w18-gn-head_4xb4-1x_coco.py', (128, 128)),
    _row('det_ddq', 'mmdet',
         'ddq/ddq-detr-4scale_r50_8xb2-12e_coco.py', (256, 256), 'det'),
    _row('det_mdconv_group4', 'mmdet',
         'dcnv2/faster-rcnn_r50-mdconv-group4-c3-c5_fpn_1x_coco.py',
         (128, 128), 'two_stage'),
    _row('det_retina_r18', 'mmdet',
         'retinanet/retinanet_r18_fpn_1x_coco.py', (128, 128)),
    _row('det_mrcnn_x101_32x8d', 'mmdet',
         'mask_rcnn/mask-rcnn_x101-32x8d_fpn_ms-poly-3x_coco.py',
         (128, 128), 'two_stage'),
    _row('det_rtmdet_ins_s', 'mmdet',
         'rtmdet/rtmdet-ins_s_8xb32-300e_coco.py', (64, 64)),
    _row('det_rtmdet_l', 'mmdet',
         'rtmdet/rtmdet_l_8xb32-300e_coco.py', (64, 64)),
    _row('det_legacy_ssd300', 'mmdet',
         'legacy_1.x/ssd300_coco_v1.py', (300, 300)),
    _row('det_legacy_retina_caffe', 'mmdet',
         'legacy_1.x/retinanet_r50-caffe_fpn_1x_coco_v1.py', (128, 128)),
    _row('det_legacy_cmrcnn', 'mmdet',
         'legacy_1.x/cascade-mask-rcnn_r50_fpn_1x_coco_v1.py',
         (128, 128), 'two_stage'),
    _row('det_widerface_ssd', 'mmdet',
         'wider_face/ssd300_8xb32-24e_widerface.py', (300, 300)),
    _row('det_ddod_512', 'mmdet', 'ddod/ddod_r50_fpn_1x_coco.py', (512, 512)),
    _row('det_ghm_retina', 'mmdet',
         'ghm/retinanet_r50_fpn_ghm-1x_coco.py', (128, 128)),
    _row('det_rpn_r50_fpn', 'mmdet', 'rpn/rpn_r50_fpn_1x_coco.py', (128, 128)),
    _row('det_dynamic_rcnn', 'mmdet',
         'dynamic_rcnn/dynamic-rcnn_r50_fpn_1x_coco.py',
         (128, 128), 'two_stage'),
    _row('det_seesaw_mrcnn', 'mmdet',
         'seesaw_loss/mask-rcnn_r50_fpn_seesaw-loss_random-ms-2x_lvis-v1.py',
         (128, 128), 'two_stage'),
    _row('det_reppoints_bbox_grid', 'mmdet',
         'reppoints/reppoints-bbox_r50-center_fpn-gn_head-gn-grid_1x_coco.py',
         (128, 128)),
    _row('det_regnet_mrcnn', 'mmdet',
         'regnet/mask-rcnn_regnetx-3.2GF_fpn_1x_coco.py',
         (128, 128), 'two_stage'),
    _row('det_ssd512', 'mmdet', 'ssd/ssd512_coco.py', (512, 512)),
    # -- mmseg ----------------------------------------------------------------
    _row('seg_vit_deit_s_upernet', 'mmseg',
         'vit/vit_deit-s16_mln_upernet_8xb2-160k_ade20k-512x512.py',
         (64, 64), overrides=(('backbone.img_size', (64, 64)),)),
    _row('seg_convnext_t_upernet', 'mmseg',
         'convnext/convnext-tiny_upernet_8xb2-amp-160k_ade20k-512x512.py',
         (64, 64)),
    _row('seg_swin_t_upernet', 'mmseg',
         'swin/'
         'swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k'
         '_ade20k-512x512.py',
         (64, 64)),
    _row('seg_stdc2', 'mmseg',
         'stdc/stdc2_4xb12-80k_cityscapes-512x1024.py', (64, 64)),
    _row('seg_unet_deeplabv3', 'mmseg',
         'unet/unet-s5-d16_deeplabv3_4xb4-40k_drive-64x64.py', (64, 64)),
    _row('seg_ocrnet_r101', 'mmseg',
         'ocrnet/ocrnet_r101-d8_4xb2-40k_cityscapes-512x1024.py', (64, 64)),
    _row('seg_bisenetv1_r50', 'mmseg',
         'bisenetv1/bisenetv1_r50-d32_4xb4-160k_cityscapes-1024x1024.py',
         (64, 64)),
    _row('seg_knet_upernet', 'mmseg',
         'knet/knet-s3_r50-d8_upernet_8xb2-adamw-80k_ade20k-512x512.py',
         (64, 64)),
    _row('seg_knet_psp', 'mmseg',
         'knet/knet-s3_r50-d8_pspnet_8xb2-adamw-80k_ade20k-512x512.py',
         (64, 64)),
    _row('seg_fastfcn_jpu_psp', 'mmseg',
         'fastfcn/fastfcn_r50-d32_jpu_psp_4xb2-80k_cityscapes-512x1024.py',
         (64, 64)),
    _row('seg_twins_svt_uper', 'mmseg',
         'twins/twins_svt-s_uperhead_8xb2-160k_ade20k-512x512.py', (64, 64)),
    _row('seg_segmenter_vit_s_fcn', 'mmseg',
         'segmenter/segmenter_vit-s_fcn_8xb1-160k_ade20k-512x512.py',
         (64, 64), overrides=(('backbone.img_size', (64, 64)),)),
    _row('seg_hr48_ocr', 'mmseg',
         'ocrnet/ocrnet_hr48_4xb2-40k_cityscapes-512x1024.py', (64, 64)),
    _row('seg_beit_upernet', 'mmseg',
         'beit/beit-base_upernet_8xb2-160k_ade20k-640x640.py',
         (64, 64), overrides=(('backbone.img_size', (64, 64)),)),
    _row('seg_lraspp_mnv3', 'mmseg',
         'mobilenet_v3/'
         'mobilenet-v3-d8_lraspp_4xb4-320k_cityscapes-512x1024.py',
         (512, 512)),
    _row('seg_fcn_d6_r50', 'mmseg',
         'fcn/fcn-d6_r50-d16_4xb2-40k_cityscapes-512x1024.py', (64, 64)),
    _row('seg_setr_pup', 'mmseg',
         'setr/setr_vit-l_pup_8xb2-160k_ade20k-512x512.py',
         (64, 64), overrides=(('backbone.img_size', (64, 64)),)),
    _row('seg_setr_mla', 'mmseg',
         'setr/setr_vit-l_mla_8xb2-160k_ade20k-512x512.py',
         (64, 64), overrides=(('backbone.img_size', (64, 64)),)),
    _row('seg_mnv2_deeplabv3plus', 'mmseg',
         'mobilenet_v2/'
         'mobilenet-v2-d8_deeplabv3plus_4xb2-80k_cityscapes-512x1024.py',
         (64, 64)),
    _row('seg_mnv2_pspnet', 'mmseg',
         'mobilenet_v2/mobilenet-v2-d8_pspnet_4xb2-80k_cityscapes-512x1024.py',
         (64, 64)),
    _row('seg_unet_pspnet', 'mmseg',
         'unet/unet-s5-d16_pspnet_4xb4-40k_drive-64x64.py', (64, 64)),
    _row('seg_icnet_r50', 'mmseg',
         'icnet/icnet_r50-d8_4xb2-80k_cityscapes-832x832.py', (128, 128)),
    _row('seg_lraspp_mnv3_s_512', 'mmseg',
         'mobilenet_v3/'
         'mobilenet-v3-d8-s_lraspp_4xb4-320k_cityscapes-512x1024.py',
         (512, 512)),
    _row('seg_dlv3p_mg124', 'mmseg',
         'deeplabv3plus/'
         'deeplabv3plus_r101-d16-mg124_4xb2-40k_cityscapes-512x1024.py',
         (64, 64)),
    _row('seg_pspnet_r50b', 'mmseg',
         'pspnet/pspnet_r50b-d8_4xb2-80k_cityscapes-512x1024.py', (64, 64)),
    _row('seg_resnest_dlv3p', 'mmseg',
         'resnest/'
         'resnest_s101-d8_deeplabv3plus_4xb2-80k_cityscapes-512x1024.py',
         (64, 64)),
    # -- mmpretrain -----------------------------------------------------------
    _row('cls_arcface_r50', 'mmpretrain',
         'arcface/resnet50-arcface_8xb32_inshop.py', (64, 64)),
    _row('cls_csra_r101', 'mmpretrain',
         'csra/resnet101-csra_1xb16_voc07-448px.py', (64, 64)),
    _row('cls_effnet_em', 'mmpretrain',
         'efficientnet/efficientnet-em_8xb32-01norm_in1k.py', (64, 64)),
    _row('cls_effnet_es', 'mmpretrain',
         'efficientnet/efficientnet-es_8xb32-01norm_in1k.py', (64, 64)),
    _row('cls_effv2_s', 'mmpretrain',
         'efficientnet_v2/efficientnetv2-s_8xb32_in1k-384px.py', (64, 64)),
    _row('cls_mnv3_small050', 'mmpretrain',
         'mobilenet_v3/mobilenet-v3-small-050_8xb128_in1k.py', (64, 64)),
    _row('cls_simclr', 'mmpretrain',
         'simclr/simclr_resnet50_8xb32-coslr-200e_in1k.py', (64, 64)),
    _row('cls_simsiam', 'mmpretrain',
         'simsiam/simsiam_resnet50_8xb32-coslr-100e_in1k.py', (64, 64)),
    _row('cls_hornet_tiny_gf', 'mmpretrain',
         'hornet/hornet-tiny-gf_8xb128_in1k.py', (224, 224)),
    _row('cls_resnet34_gem', 'mmpretrain',
         '_base_/models/resnet34_gem.py', (64, 64)),
    _row('cls_res2net50_w48s2', 'mmpretrain',
         '_base_/models/res2net50-w48-s2.py', (64, 64)),
    _row('cls_mobilevit_s', 'mmpretrain',
         'mobilevit/mobilevit-small_8xb128_in1k.py', (128, 128)),
    _row('cls_repvgg_b3g4', 'mmpretrain',
         'repvgg/repvgg-B3g4_8xb32_in1k.py', (64, 64)),
    _row('cls_repvgg_b3_lbs', 'mmpretrain',
         '_base_/models/repvgg-B3_lbs-mixup_in1k.py', (64, 64)),
    _row('cls_mobileone_s2', 'mmpretrain',
         'mobileone/mobileone-s2_8xb32_in1k.py', (64, 64)),
    _row('cls_efficientformer_l3', 'mmpretrain',
         'efficientformer/efficientformer-l3_8xb128_in1k.py', (224, 224)),
    _row('cls_levit_256', 'mmpretrain',
         'levit/levit-256_8xb256_in1k.py', (224, 224)),
    _row('cls_twins_svt_s', 'mmpretrain',
         'twins/twins-svt-small_8xb128_in1k.py', (64, 64)),
    _row('cls_t2t_vit_14', 'mmpretrain',
         't2t_vit/t2t-vit-t-14_8xb64_in1k.py', (224, 224)),
    _row('cls_densecl', 'mmpretrain',
         'densecl/densecl_resnet50_8xb32-coslr-200e_in1k.py', (64, 64)),
    _row('cls_byol', 'mmpretrain',
         'byol/byol_resnet50_16xb256-coslr-200e_in1k.py', (64, 64)),
    _row('cls_edgenext_s', 'mmpretrain',
         'edgenext/edgenext-small_8xb256_in1k.py', (128, 128)),
    _row('cls_convmixer_1024', 'mmpretrain',
         'convmixer/convmixer-1024-20_10xb64_in1k.py', (64, 64)),
    _row('cls_mvit_tiny', 'mmpretrain',
         'mvit/mvitv2-tiny_8xb256_in1k.py', (224, 224)),
    _row('cls_vgg19bn', 'mmpretrain', '_base_/models/vgg19bn.py', (224, 224)),
    _row('cls_repvgg_a0_deploy', 'mmpretrain',
         'repvgg/repvgg-A0_deploy_in1k.py', (64, 64)),
    _row('cls_mocov2', 'mmpretrain',
         'mocov2/mocov2_resnet50_8xb32-coslr-200e_in1k.py', (64, 64)),
    _row('cls_swav', 'mmpretrain',
         'swav/swav_resnet50_8xb32-mcrop-coslr-200e_in1k-224px-96px.py',
         (64, 64)),
    _row('cls_resnet50_cifar', 'mmpretrain',
         'resnet/resnet50_8xb16_cifar10.py', (32, 32)),
    _row('cls_mobileone_s3', 'mmpretrain',
         'mobileone/mobileone-s3_8xb32_in1k.py', (64, 64)),
    _row('cls_effnet_b3', 'mmpretrain',
         'efficientnet/efficientnet-b3_8xb32_in1k.py', (64, 64)),
    _row('cls_repvgg_a2', 'mmpretrain',
         'repvgg/repvgg-A2_8xb32_in1k.py', (64, 64)),
    _row('cls_seresnext101', 'mmpretrain',
         '_base_/models/seresnext101_32x4d.py', (64, 64)),
    _row('cls_tinyvit_11m', 'mmpretrain',
         'tinyvit/tinyvit-11m_8xb256_in1k.py', (224, 224)),
    _row('cls_pvig_small', 'mmpretrain',
         'vig/pvig-small_8xb128_in1k.py', (224, 224)),
    _row('cls_conformer_s_p32', 'mmpretrain',
         'conformer/conformer-small-p32_8xb128_in1k.py', (224, 224)),
    _row('cls_barlowtwins', 'mmpretrain',
         'barlowtwins/barlowtwins_resnet50_8xb256-coslr-300e_in1k.py',
         (64, 64)),
    _row('cls_effv2_b3', 'mmpretrain',
         'efficientnet_v2/efficientnetv2-b3_8xb32_in1k.py', (64, 64)),
    _row('cls_mnv3_cifar', 'mmpretrain',
         'mobilenet_v3/mobilenet-v3-small_8xb16_cifar10.py', (32, 32)),
    _row('cls_res2net101', 'mmpretrain',
         'res2net/res2net101-w26-s4_8xb32_in1k.py', (64, 64)),
    _row('cls_vgg13bn', 'mmpretrain', '_base_/models/vgg13bn.py', (224, 224)),
    # -- mmyolo ---------------------------------------------------------------
    _row('yolo_v5_ins_s', 'mmyolo',
         'yolov5/ins_seg/'
         'yolov5_ins_s-v61_syncbn_fast_8xb16-300e_coco_instance.py',
         (128, 128)),
    _row('yolo_v5u_s', 'mmyolo',
         'yolov5/yolov5u/yolov5u_s_syncbn_fast_8xb16-300e_coco.py',
         (128, 128)),
    _row('yolo_v6_v3_m', 'mmyolo',
         'yolov6/yolov6_v3_m_syncbn_fast_8xb32-300e_coco.py', (128, 128)),
    _row('yolo_v6_t', 'mmyolo',
         'yolov6/yolov6_t_syncbn_fast_8xb32-300e_coco.py', (128, 128)),
    _row('yolo_v7_e_p6', 'mmyolo',
         'yolov7/yolov7_e-p6_syncbn_fast_8x16b-300e_coco.py', (128, 128)),
    _row('yolo_v7_e2e_p6', 'mmyolo',
         'yolov7/yolov7_e2e-p6_syncbn_fast_8x16b-300e_coco.py', (128, 128)),
    _row('yolo_yolox_pose_tiny', 'mmyolo',
         'yolox/pose/yolox-pose_tiny_8xb32-300e-rtmdet-hyp_coco.py',
         (128, 128)),
    _row('yolo_yolox_nano_rtmhyp', 'mmyolo',
         'yolox/yolox_nano_fast_8xb32-300e-rtmdet-hyp_coco.py', (128, 128)),
    _row('yolo_ppyoloe_l', 'mmyolo',
         'ppyoloe/ppyoloe_l_fast_8xb20-300e_coco.py', (128, 128)),
    _row('yolo_v6_v3_l', 'mmyolo',
         'yolov6/yolov6_v3_l_syncbn_fast_8xb32-300e_coco.py', (128, 128)),
    _row('yolo_v6_v3_n', 'mmyolo',
         'yolov6/yolov6_v3_n_syncbn_fast_8xb32-300e_coco.py', (128, 128)),
    _row('yolo_v7_d_p6', 'mmyolo',
         'yolov7/yolov7_d-p6_syncbn_fast_8x16b-300e_coco.py', (128, 128)),
    _row('yolo_rtmdet_l', 'mmyolo',
         'rtmdet/rtmdet_l_syncbn_fast_8xb32-300e_coco.py', (128, 128)),
    _row('yolo_v5_n_p6', 'mmyolo',
         'yolov5/yolov5_n-p6-v62_syncbn_fast_8xb16-300e_coco.py', (128, 128)),
    _row('yolo_v5_s_deploy', 'mmyolo',
         'deploy/model/yolov5_s-static.py', (128, 128)),
    _row('yolo_v8_s_maskref', 'mmyolo',
         'yolov8/yolov8_s_mask-refine_syncbn_fast_8xb16-500e_coco.py',
         (128, 128)),
    _row('yolo_ppyoloe_plus_l', 'mmyolo',
         'ppyoloe/ppyoloe_plus_l_fast_8xb8-80e_coco.py', (128, 128)),
    _row('yolo_yolox_m', 'mmyolo',
         'yolox/yolox_m_fast_8xb8-300e_coco.py', (128, 128)),
    # -- mmpose ---------------------------------------------------------------
    _row('pose_hrformer_s', 'mmpose',
         'body_2d_keypoint/topdown_heatmap/coco/'
         'td-hm_hrformer-small_8xb32-210e_coco-256x192.py',
         (128, 96), 'none'),
    _row('pose_vitpose_s', 'mmpose',
         'body_2d_keypoint/topdown_heatmap/coco/'
         'td-hm_ViTPose-small_8xb64-210e_coco-256x192.py',
         (128, 96), 'none', overrides=(('backbone.img_size', (128, 96)),)),
    _row('pose_vitpose_s_simple', 'mmpose',
         'body_2d_keypoint/topdown_heatmap/coco/'
         'td-hm_ViTPose-small-simple_8xb64-210e_coco-256x192.py',
         (128, 96), 'none', overrides=(('backbone.img_size', (128, 96)),)),
    _row('pose_vis_res50', 'mmpose',
         'body_2d_keypoint/topdown_heatmap/coco/'
         'td-hm-vis_res50_8xb64-210e_coco-aic-256x192-merge.py',
         (128, 96), 'none'),
    _row('pose_udp_regress', 'mmpose',
         'body_2d_keypoint/topdown_heatmap/coco/'
         'td-hm_hrnet-w32_udp-regress-8xb64-210e_coco-256x192.py',
         (128, 96), 'none'),
    _row('pose_treg_res50', 'mmpose',
         'body_2d_keypoint/topdown_regression/coco/'
         'td-reg_res50_8xb64-210e_coco-256x192.py',
         (128, 96), 'none'),
    _row('pose_imagelift_tcn', 'mmpose',
         'body_3d_keypoint/image_pose_lift/h36m/'
         'image-pose-lift_tcn_8xb64-200e_h36m.py',
         (34, 1), 'none', sequence=True),
    _row('pose_videolift_semi', 'mmpose',
         'body_3d_keypoint/video_pose_lift/h36m/'
         'video-pose-lift_tcn-27frm-semi-supv_8xb64-200e_h36m.py',
         (34, 27), 'none', sequence=True),
    _row('pose_videolift_243', 'mmpose',
         'body_3d_keypoint/video_pose_lift/h36m/'
         'video-pose-lift_tcn-243frm-supv_8xb128-160e_h36m.py',
         (34, 243), 'none', sequence=True),
    _row('pose_internet', 'mmpose',
         'hand_3d_keypoint/internet/interhand3d/'
         'internet_res50_4xb16-20e_interhand3d-256x256.py',
         (128, 128), 'none'),
    _row('pose_4xmspn50', 'mmpose',
         'body_2d_keypoint/topdown_heatmap/coco/'
         'td-hm_4xmspn50_8xb32-210e_coco-256x192.py',
         (128, 96), 'none'),
    _row('pose_pvtv2_b2', 'mmpose',
         'body_2d_keypoint/topdown_heatmap/coco/'
         'td-hm_pvtv2-b2_8xb64-210e_coco-256x192.py',
         (128, 96), 'none'),
    _row('pose_rtmpose_wb_m', 'mmpose',
         'wholebody_2d_keypoint/rtmpose/coco-wholebody/'
         'rtmpose-m_8xb64-270e_coco-wholebody-256x192.py',
         (256, 192), 'none'),
    _row('pose_cspnext_mpii', 'mmpose',
         'body_2d_keypoint/topdown_heatmap/mpii/'
         'cspnext-m_udp_8xb64-210e_mpii-256x256.py',
         (128, 128), 'none'),
    _row('pose_motionbert', 'mmpose',
         'body_3d_keypoint/motionbert/h36m/'
         'motionbert_dstformer-243frm_8xb32-240e_h36m.py',
         (17, 3), 'none'),
    _row('pose_simcc_res50', 'mmpose',
         'body_2d_keypoint/simcc/coco/simcc_res50_8xb64-210e_coco-256x192.py',
         (256, 192), 'none'),
    _row('pose_simcc_vipnas', 'mmpose',
         'body_2d_keypoint/simcc/coco/'
         'simcc_vipnas-mbv3_8xb64-210e_coco-256x192.py',
         (256, 192), 'none'),
    _row('pose_scnet101', 'mmpose',
         'body_2d_keypoint/topdown_heatmap/coco/'
         'td-hm_scnet101_8xb32-210e_coco-256x192.py',
         (256, 192), 'none'),
    _row('pose_swin_t', 'mmpose',
         'body_2d_keypoint/topdown_heatmap/coco/'
         'td-hm_swin-t-p4-w7_8xb32-210e_coco-256x192.py',
         (128, 96), 'none'),
    _row('pose_rtmpose_s_halpe', 'mmpose',
         'body_2d_keypoint/rtmpose/body8/'
         'rtmpose-s_8xb1024-700e_body8-halpe26-256x192.py',
         (256, 192), 'none'),
    _row('pose_ipr_res50', 'mmpose',
         'body_2d_keypoint/integral_regression/coco/'
         'ipr_res50_8xb64-210e_coco-256x256.py',
         (256, 256), 'none'),
    _row('pose_face_rtmpose_t', 'mmpose',
         'face_2d_keypoint/rtmpose/face6/'
         'rtmpose-t_8xb256-120e_face6-256x256.py',
         (256, 256), 'none'),
    _row('pose_hand_rtmpose_m', 'mmpose',
         'hand_2d_keypoint/rtmpose/hand5/'
         'rtmpose-m_8xb256-210e_hand5-256x256.py',
         (256, 256), 'none'),
    _row('pose_rtmo_t', 'mmpose',
         'body_2d_keypoint/rtmo/body7/rtmo-t_8xb32-600e_body7-416x416.py',
         (128, 128), 'none'),
    _row('pose_ipr_debias', 'mmpose',
         'body_2d_keypoint/integral_regression/coco/'
         'ipr_res50_debias-8xb64-210e_coco-256x256.py',
         (256, 256), 'none'),
    _row('pose_hrformer_b', 'mmpose',
         'body_2d_keypoint/topdown_heatmap/coco/'
         'td-hm_hrformer-base_8xb32-210e_coco-256x192.py',
         (128, 96), 'none'),
    _row('pose_wb_vipnas_res50', 'mmpose',
         'wholebody_2d_keypoint/topdown_heatmap/coco-wholebody/'
         'td-hm_vipnas-res50_8xb64-210e_coco-wholebody-256x192.py',
         (128, 96), 'none'),
    _row('pose_wb_cspnext_l', 'mmpose',
         'wholebody_2d_keypoint/topdown_heatmap/coco-wholebody/'
         'cspnext-l_udp_8xb64-210e_coco-wholebody-256x192.py',
         (128, 96), 'none'),
    _row('pose_ak_hrnet', 'mmpose',
         'animal_2d_keypoint/topdown_heatmap/ak/'
         'td-hm_hrnet-w32_8xb32-300e_animalkingdom_P1-256x256.py',
         (128, 128), 'none'),
    _row('pose_fashion_res50', 'mmpose',
         'fashion_2d_keypoint/topdown_heatmap/deepfashion2/'
         'td-hm_res50_1xb64-210e_deepfasion2-skirt-256x192.py',
         (128, 96), 'none'),
    _row('pose_dekr_w48', 'mmpose',
         'body_2d_keypoint/dekr/coco/'
         'dekr_hrnet-w48_8xb10-140e_coco-640x640.py',
         (64, 64), 'none'),
    _row('pose_cid_w48', 'mmpose',
         'body_2d_keypoint/cid/coco/cid_hrnet-w48_8xb20-140e_coco-512x512.py',
         (64, 64), 'none'),
    _row('pose_rtmo_l', 'mmpose',
         'body_2d_keypoint/rtmo/body7/rtmo-l_16xb16-600e_body7-640x640.py',
         (128, 128), 'none'),
    _row('pose_yoloxpose_tiny', 'mmpose',
         'body_2d_keypoint/yoloxpose/coco/'
         'yoloxpose_tiny_4xb64-300e_coco-416.py',
         (128, 128), 'none'),
    _row('pose_videolift_1frm', 'mmpose',
         'body_3d_keypoint/video_pose_lift/h36m/'
         'video-pose-lift_tcn-1frm-supv-cpn-ft_8xb128-160e_h36m.py',
         (34, 1), 'none', sequence=True),
    _row('pose_rtmw_m', 'mmpose',
         'wholebody_2d_keypoint/rtmpose/cocktail14/'
         'rtmw-m_8xb1024-270e_cocktail14-256x192.py',
         (256, 192), 'none'),
    _row('pose_rtmw_l', 'mmpose',
         'wholebody_2d_keypoint/rtmpose/cocktail14/'
         'rtmw-l_8xb1024-270e_cocktail14-256x192.py',
         (256, 192), 'none'),
    _row('pose_resnetv1d50', 'mmpose',
         'body_2d_keypoint/topdown_heatmap/coco/'
         'td-hm_resnetv1d50_8xb64-210e_coco-256x192.py',
         (128, 96), 'none'),
    _row('pose_seresnet50', 'mmpose',
         'body_2d_keypoint/topdown_heatmap/coco/'
         'td-hm_seresnet50_8xb64-210e_coco-256x192.py',
         (128, 96), 'none'),
    _row('pose_resnext50', 'mmpose',
         'body_2d_keypoint/topdown_heatmap/coco/'
         'td-hm_resnext50_8xb64-210e_coco-256x192.py',
         (128, 96), 'none'),
    _row('pose_simcc_res50_384', 'mmpose',
         'body_2d_keypoint/simcc/coco/simcc_res50_8xb32-140e_coco-384x288.py',
         (384, 288), 'none'),
]

#: The groups ``--models`` takes by name.
GROUPS: Dict[str, List[SweepSpec]] = {
    'all': CONFIGS,
    'extra': EXTRA_CONFIGS,
    'every': CONFIGS + EXTRA_CONFIGS,
}

_BY_NAME: Dict[str, SweepSpec] = {
    spec.name: spec
    for spec in CONFIGS + EXTRA_CONFIGS
}


class Timeout(BaseException):
    """A model ran past ``--timeout``.

    A ``BaseException``, so that the handlers that record a method's crash
    let it through to the one that records the model's timeout.
    """


def _on_alarm(signum: int, frame: Any) -> None:
    raise Timeout()


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`Timeout` in the block after ``seconds`` (none if 0)."""
    if seconds <= 0:
        yield
        return
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def one_line(error: BaseException) -> str:
    """``'Type: first line of the message'``, at most 200 characters."""
    lines = str(error).strip().splitlines()
    return f'{type(error).__name__}: {lines[0] if lines else ""}'[:200]


def _reseed(module: nn.Module, args: Tuple) -> None:
    torch.manual_seed(SEED)


def build(spec: SweepSpec,
          dtype: torch.dtype = torch.float32) -> Tuple[nn.Module, Tuple]:
    """Build one model in eval mode with random norm statistics.

    As :func:`real_models.build`, for a :class:`SweepSpec`.

    Args:
        spec: The config.
        dtype: Floating point type of the model and its input.

    Returns:
        ``(model, example_inputs)``.
    """
    from mmengine.config import Config, ConfigDict
    from mmengine.registry import DefaultScope

    registry = real_models._registry(spec.package)
    path = os.path.join(real_models.config_root(spec.package), spec.config)
    model_cfg = real_models.strip_pretrained(
        Config.fromfile(path).model.to_dict())
    for key, value in spec.overrides:
        real_models._set_dotted(model_cfg, key, value)
    # Models read train_cfg/test_cfg by attribute: build from a ConfigDict.
    model_cfg = ConfigDict(model_cfg)
    with torch.random.fork_rng(devices=[]), \
            real_models._quiet_mmengine(), \
            DefaultScope.overwrite_default_scope(
                real_models._SCOPES[spec.package]):
        torch.manual_seed(SEED)
        model = registry.build(model_cfg)
        model.init_weights()
        real_models._reset_constant_layers(model)
    first, second = spec.input_size
    if spec.samples == 'two_stage':
        model = real_models.TwoStageTensorForward(
            model, real_models._det_samples(first, second))
    randomize_norm_stats(model, seed=SEED)
    model.to(dtype).eval()
    if spec.reseed:
        model.register_forward_pre_hook(_reseed)
    shape = (1, first, second) if spec.sequence else (1, 3, first, second)
    gen = torch.Generator().manual_seed(SEED)
    image = torch.randn(*shape, generator=gen).to(dtype)
    if spec.samples == 'det':
        return model, (image, real_models._det_samples(first, second))
    if spec.samples == 'none':
        return model, (image, None)
    if spec.samples not in ('', 'two_stage'):
        raise ValueError(f'{spec.name}: unknown samples {spec.samples!r}')
    return model, (image, )


def forward(model: nn.Module, inputs: Tuple) -> Any:
    with torch.no_grad():
        return model(*inputs)


def foldable_norms(model: nn.Module) -> Dict[str, List[str]]:
    """Batch norms with running statistics, by first path, each with every
    path it has in ``model``."""
    paths: Dict[int, List[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(path)
    return {
        first: paths[id(module)]
        for first, module in real_models.norm_modules(model).items()
        if real_models.is_batch_norm_with_stats(module)
    }


def gone(fused: nn.Module, norms: Dict[str, List[str]]) -> Set[str]:
    """The norms (first paths) that ``fused`` no longer has at their first
    path: folded, or merged with the block that held them."""
    out = set()
    for first in norms:
        try:
            module = fused.get_submodule(first)
        except AttributeError:
            out.add(first)
            continue
        if not real_models.is_batch_norm_with_stats(module):
            out.add(first)
    return out


def _fuse_model(model: nn.Module, inputs: Tuple) -> Tuple[nn.Module, Any]:
    return model, mmfuse.fuse_model(model, inputs)


def _fuse_conv_bn(model: nn.Module, inputs: Tuple) -> Tuple[nn.Module, Any]:
    return mmfuse.fuse_conv_bn(model), None


def _mmcv(model: nn.Module, inputs: Tuple) -> Tuple[nn.Module, Any]:
    from mmcv.cnn import fuse_conv_bn
    return fuse_conv_bn(model), None


FUSERS: Dict[str, Callable[[nn.Module, Tuple], Tuple[nn.Module, Any]]] = {
    'fuse_model': _fuse_model,
    'fuse_conv_bn': _fuse_conv_bn,
    'mmcv': _mmcv,
}


def run_method(method: str, model: nn.Module, inputs: Tuple,
               reference: Any, norms: Dict[str, List[str]],
               out: Dict[str, Any]) -> Optional[Tuple[Set[str], Any]]:
    """Fuse a copy of ``model`` with ``method`` and run it.

    Args:
        method: A key of :data:`FUSERS`.
        model: The unfused model.
        inputs: Its example inputs.
        reference: Its output.
        norms: Its foldable batch norms (:func:`foldable_norms`).
        out: Gets ``folded``, ``rel_error`` and ``seconds``, or ``crash``
            (``'fuse: ...'`` or ``'forward: ...'``) and ``traceback``.

    Returns:
        ``(norms gone, report)`` (the report of ``fuse_model``, else
        ``None``), or ``None`` after a crash.
    """
    stage = 'fuse'
    try:
        work = copy.deepcopy(model)
        start = time.perf_counter()
        fused, report = FUSERS[method](work, inputs)
        out['seconds'] = time.perf_counter() - start
        stage = 'forward'
        output = forward(fused, inputs)
    except Exception as error:  # a crash of a method is a result
        out['crash'] = f'{stage}: {one_line(error)}'
        out['traceback'] = traceback.format_exc()[-2000:]
        return None
    folded = gone(fused, norms)
    out['folded'] = len(folded)
    out['rel_error'] = output_error(reference, output)[1]
    return folded, report


def short_reason(reason: str) -> str:
    """A reason with dotted module paths replaced by ``<path>``, so that
    equal reasons about different modules count together."""
    return re.sub(r'[A-Za-z_]\w*(?:\.\w+)+', '<path>', reason)[:120]


def describe_report(report: Any, norms: Dict[str, List[str]],
                    folded: Set[str], out: Dict[str, Any]) -> None:
    """Put what ``fuse_model``'s report says of the foldable batch norms
    it left into ``out``: ``summary``, ``report_folds``,
    ``merged_blocks``, ``left`` (first path: reason), ``reasons`` (short
    reason: count) and ``unexplained`` (first paths left without one)."""
    first = {path: name for name, paths in norms.items() for path in paths}
    left: Dict[str, str] = {}
    for skip in list(report.undone) + list(report.left):
        name = first.get(skip.name)
        if name is not None and name not in folded and name not in left:
            left[name] = (skip.reason or '').strip()
    out['summary'] = report.summary()
    out['report_folds'] = len(report.folded)
    out['merged_blocks'] = sum(
        1 for record in report.reparameterized if record.get('merged'))
    out['left'] = left
    out['reasons'] = dict(
        Counter(short_reason(r) for r in left.values() if r).most_common())
    out['unexplained'] = sorted(
        name for name in norms if name not in folded and not left.get(name))


_mmcv_fold: Optional[Callable[[nn.Module, nn.Module], nn.Module]] = None


def mmcv_fold_only(module: nn.Module, sites: Set[str],
                   prefix: str = '') -> None:
    """``mmcv.cnn.fuse_conv_bn``'s walk, folding only the batch norms at
    ``sites`` (each with the conv mmcv would fold it into)."""
    global _mmcv_fold
    if _mmcv_fold is None:
        _mmcv_fold = importlib.import_module(
            'mmcv.cnn.utils.fuse_conv_bn')._fuse_conv_bn
    last_conv, last_name = None, ''
    for name, child in module.named_children():
        path = prefix + name
        if isinstance(child, _BatchNorm):
            if last_conv is None:
                continue
            if path in sites:
                module._modules[last_name] = _mmcv_fold(last_conv, child)
                module._modules[name] = nn.Identity()
            last_conv = None
        elif isinstance(child, nn.Conv2d):
            last_conv, last_name = child, name
        else:
            mmcv_fold_only(child, sites, path + '.')


def without_norm(model: nn.Module, sites: List[str]) -> nn.Module:
    """A copy of ``model`` with an identity at each of ``sites``."""
    copied = copy.deepcopy(model)
    for site in sites:
        parent, _, attr = site.rpartition('.')
        holder = copied.get_submodule(parent) if parent else copied
        holder._modules[attr] = nn.Identity()
    return copied


def check_gap(model: nn.Module, inputs: Tuple, reference: Any,
              norms: Dict[str, List[str]], gap: List[str], run: Set[str],
              dtype: str) -> List[Dict[str, Any]]:
    """Fold each of the first :data:`MAX_GAP_CHECKS` batch norms of
    ``gap`` (mmcv folds them, fuse_model does not) alone, as mmcv does.

    Returns:
        One dict per norm: ``norm``, ``fold_error`` (output error with
        only that fold), ``identity_error`` (with the norm removed) and
        ``verdict`` (see the module docstring), or ``crash``.
    """
    tolerance = GAP_TOLERANCE[dtype]
    checks = []
    for name in gap[:MAX_GAP_CHECKS]:
        entry: Dict[str, Any] = {'norm': name}
        checks.append(entry)
        if name not in run:
            entry['verdict'] = 'not run'
            continue
        try:
            alone = copy.deepcopy(model)
            mmcv_fold_only(alone, set(norms[name]))
            if name not in gone(alone, {name: norms[name]}):
                entry['verdict'] = 'not folded alone'
                continue
            entry['fold_error'] = output_error(
                reference, forward(alone, inputs))[1]
            del alone
            entry['identity_error'] = output_error(
                reference, forward(without_norm(model, norms[name]),
                                   inputs))[1]
        except Exception as error:  # recorded: the check itself failed
            entry['crash'] = one_line(error)
            entry['verdict'] = 'crash'
            continue
        if entry['fold_error'] > tolerance:
            entry['verdict'] = 'wrong'
        elif entry['identity_error'] <= GAP_SENSITIVITY * tolerance:
            entry['verdict'] = 'insensitive'
        else:
            entry['verdict'] = 'exact'
    return checks


def measure(spec: SweepSpec, dtype: torch.dtype, row: Dict[str, Any]
            ) -> None:
    """Build, run and fuse one model in ``dtype``, filling ``row`` as it
    goes (``row['stage']`` says how far it got).

    Raises:
        Exception: From building or running the unfused model.
        Timeout: From :func:`time_limit`.
    """
    row['stage'] = 'build'
    start = time.perf_counter()
    model, inputs = build(spec, dtype)
    row['build_s'] = time.perf_counter() - start
    row['stage'] = 'forward'
    reference = forward(model, inputs)
    norms = foldable_norms(model)
    run: Set[str] = set()
    hooks = [
        model.get_submodule(name).register_forward_hook(
            lambda *args, _name=name: run.add(_name)) for name in norms
    ]
    try:
        start = time.perf_counter()
        again = forward(model, inputs)
        row['forward_s'] = time.perf_counter() - start
    finally:
        for hook in hooks:
            hook.remove()
    row['norms'] = len(norms)
    row['norms_run'] = len(run)
    row['repeat_error'] = output_error(reference, again)[1]
    row['finite'] = all(
        bool(torch.isfinite(leaf).all()) for leaf in tree_leaves(reference)
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point())
    del again
    folded: Dict[str, Set[str]] = {}
    for method in METHODS:
        row['stage'] = method
        out = row['methods'][method] = {}
        result = run_method(method, model, inputs, reference, norms, out)
        if result is not None:
            folded[method], report = result
            if report is not None:
                describe_report(report, norms, folded[method], out)
    if 'fuse_model' in folded and 'fuse_conv_bn' in folded:
        row['fuse_conv_bn_only'] = sorted(folded['fuse_conv_bn'] -
                                          folded['fuse_model'])
    if 'fuse_model' in folded and 'mmcv' in folded:
        row['mmcv_only'] = sorted(folded['mmcv'] - folded['fuse_model'])
        row['stage'] = 'gap check'
        row['gap_checks'] = check_gap(model, inputs, reference, norms,
                                      row['mmcv_only'], run,
                                      str(dtype).replace('torch.', ''))
    row['stage'] = 'done'


def sweep_model(spec: SweepSpec, dtype: torch.dtype,
                timeout: float) -> Dict[str, Any]:
    """Measure one model within ``timeout`` seconds.

    Returns:
        The row: ``dtype``, ``methods`` (one dict per method, see
        :func:`run_method`), the norm counts, ``crash`` (a one-line
        error: the unfused model did not build or run, or the timeout),
        ``seconds``.
    """
    row: Dict[str, Any] = {
        'dtype': str(dtype).replace('torch.', ''),
        'methods': {}
    }
    start = time.perf_counter()
    try:
        with time_limit(timeout):
            measure(spec, dtype, row)
    except Timeout:
        row['crash'] = f'timeout: over {timeout:g} s in {row["stage"]}'
    except Exception as error:  # the unfused model does not build or run
        row['crash'] = f'{row["stage"]}: {one_line(error)}'
        row['traceback'] = traceback.format_exc()[-2000:]
    row['seconds'] = time.perf_counter() - start
    gc.collect()
    return row


def nondeterministic(row: Dict[str, Any]) -> bool:
    return bool(row.get('repeat_error'))


def needs_recheck(row: Dict[str, Any]) -> bool:
    """Whether a float32 row goes to the float64 recheck."""
    if row.get('crash') or nondeterministic(row):
        return False
    errors = [
        res.get('rel_error') for res in row['methods'].values()
        if res.get('rel_error') is not None
    ]
    return any(e > RECHECK_ABOVE for e in errors) or \
        bool(row.get('mmcv_only'))


def final_error(row: Dict[str, Any], method: str) -> Optional[float]:
    """The method's error in float64 where rechecked, else in float32."""
    wide = row.get('float64', {}).get('methods', {}).get(method, {})
    if wide.get('rel_error') is not None:
        return wide['rel_error']
    return row['methods'].get(method, {}).get('rel_error')


def is_corrupt(row: Dict[str, Any], method: str) -> bool:
    error = final_error(row, method)
    return not nondeterministic(row) and error is not None and \
        error > CORRUPT_ABOVE


def final_gap_checks(row: Dict[str, Any]) -> Tuple[str, List[Dict]]:
    """``(dtype, gap checks)``: the float64 recheck's where it made them.
    """
    wide = row.get('float64', {})
    if 'gap_checks' in wide:
        return 'float64', wide['gap_checks']
    return 'float32', row.get('gap_checks', [])


def recheck_note(row: Dict[str, Any], method: str) -> str:
    if 'float64' not in row:
        return 'no float64 recheck'
    wide = row['float64']
    if wide.get('crash'):
        return f'float64 recheck failed: {wide["crash"]}'
    res = wide['methods'].get(method, {})
    if res.get('crash'):
        return f'float64 recheck: {res["crash"]}'
    if res.get('rel_error') is None:
        return 'float64 recheck: not measured'
    return f'float64 recheck {_err(res["rel_error"])}'


def flags(row: Dict[str, Any]) -> List[Tuple[str, str]]:
    """``(flag, detail)`` for each thing the flagged table shows."""
    out = []
    if row.get('crash'):
        kind = 'timeout' if row['crash'].startswith('timeout') else 'crash'
        out.append((kind, row['crash']))
    for method in METHODS:
        res = row['methods'].get(method, {})
        if res.get('crash'):
            out.append(('crash', f'{method} {res["crash"]}'))
    if nondeterministic(row):
        out.append(('nondeterministic',
                    'two forward passes of the unfused model differ by '
                    f'{_err(row["repeat_error"])}: the errors mean nothing'))
    else:
        for method in METHODS:
            error = row['methods'].get(method, {}).get('rel_error')
            if error is not None and error > CORRUPT_ABOVE:
                out.append((f'error > {CORRUPT_ABOVE:.0e}',
                            f'{method} {_err(error)} in float32; '
                            f'{recheck_note(row, method)}'))
    fm = row['methods'].get('fuse_model', {})
    if fm.get('unexplained'):
        names = fm['unexplained']
        out.append(('left without reason', f'{len(names)}: ' +
                    ', '.join(names[:3]) + (' ...' if len(names) > 3 else '')))
    dtype, checks = final_gap_checks(row)
    exact = [c['norm'] for c in checks if c.get('verdict') == 'exact']
    if exact:
        reasons = Counter(
            short_reason(fm.get('left', {}).get(name) or 'no reason')
            for name in exact)
        out.append(('mmcv folds more', f'{len(exact)} of '
                    f'{len(row["mmcv_only"])} exact alone ({dtype}, '
                    f'{len(checks)} checked): ' + ', '.join(exact[:3]) +
                    (' ...' if len(exact) > 3 else '') +
                    '; fuse_model: ' + '; '.join(
                        f'{n}x {r}' for r, n in reasons.most_common(2))))
    return out


def _err(value: Optional[float]) -> str:
    if value is None:
        return '-'
    return '0' if value == 0 else f'{value:.1e}'


def _cell(text: str) -> str:
    return text.replace('|', '/').replace('\n', ' ')


def method_cell(row: Dict[str, Any], method: str) -> str:
    res = row['methods'].get(method, {})
    if res.get('crash'):
        return 'crash'
    if res.get('folded') is None:
        return '-'
    text = f'{res["folded"]} ({_err(res["rel_error"])}'
    wide = row.get('float64', {}).get('methods', {}).get(method, {})
    if wide.get('rel_error') is not None:
        text += f'; f64 {_err(wide["rel_error"])}'
    return text + ')'


HEADER = ('| model | BNs | `fuse_model` | `fuse_conv_bn` | mmcv | '
          '`fuse_model` left (top reason) | s |\n'
          '|---|---|---|---|---|---|---|')


def print_row(name: str, row: Dict[str, Any]) -> None:
    """One markdown row: folds (error) of each method."""
    if row.get('crash') and 'norms' not in row:
        print(f'| {name} | - | {_cell(row["crash"])} | | | | '
              f'{row["seconds"]:.1f} |', flush=True)
        return
    fm = row['methods'].get('fuse_model', {})
    reasons = fm.get('reasons') or {}
    top = next(iter(reasons.items()), None)
    left = len(fm.get('left') or {})
    why = f'{left}; {top[1]}x {top[0][:60]}' if top else str(left or '-')
    if row.get('crash'):
        why = row['crash']
    cells = [str(row['norms'])] + [method_cell(row, m) for m in METHODS]
    cells += [_cell(why), f'{row["seconds"]:.1f}']
    print(f'| {name} | ' + ' | '.join(cells) + ' |', flush=True)


def _folded(row: Dict[str, Any], method: str) -> bool:
    return row['methods'].get(method, {}).get('folded') is not None


def print_summary(rows: Dict[str, Dict[str, Any]]) -> None:
    """The flagged models, the reasons and the totals."""
    print('\n### Flagged models\n')
    print('| model | flag | detail |\n|---|---|---|')
    for name, row in rows.items():
        for flag, detail in row['flags']:
            print(f'| {name} | {flag} | {_cell(detail)} |')
    reasons: Counter = Counter()
    for row in rows.values():
        reasons.update(row['methods'].get('fuse_model', {}).get('reasons')
                       or {})
    if reasons:
        print('\n### Why `fuse_model` left foldable batch norms\n')
        print('| batch norms | reason |\n|---|---|')
        for reason, count in reasons.most_common():
            print(f'| {count} | {_cell(reason)} |')
    # Rows whose measurement finished (the crashes: every row that got to
    # the methods).
    ran = [r for r in rows.values() if r.get('stage') == 'done']
    print('\n### Totals\n')
    print('| | ' + ' | '.join(f'`{m}`' for m in METHODS) + ' |')
    print('|---|' + '---|' * len(METHODS))
    # Over the models on which the method did not crash.
    print('| batch norms folded | ' + ' | '.join(
        f'{sum(r["methods"][m]["folded"] for r in ran if _folded(r, m))}/'
        f'{sum(r["norms"] for r in ran if _folded(r, m))}'
        for m in METHODS) + ' |')
    counts = {
        'crashes':
        lambda r, m: bool(r['methods'].get(m, {}).get('crash')),
        f'error > {CORRUPT_ABOVE:.0e} in float32':
        lambda r, m: not nondeterministic(r) and (r['methods'].get(
            m, {}).get('rel_error') or 0) > CORRUPT_ABOVE,
        'corrupted outputs (float64 where rechecked)': is_corrupt,
    }
    for label, test in counts.items():
        among = rows.values() if label == 'crashes' else ran
        print(f'| {label} | ' + ' | '.join(
            str(sum(1 for r in among if test(r, m))) for m in METHODS) +
            ' |')
    crashed = sum(1 for r in rows.values() if r.get('crash'))
    timeouts = sum(1 for r in rows.values()
                   if (r.get('crash') or '').startswith('timeout'))
    print(f'\nConfigs run: {len(rows)}; unfused model did not build or '
          f'run: {crashed - timeouts}; timed out: {timeouts}; '
          'nondeterministic: '
          f'{sum(nondeterministic(r) for r in rows.values())}; rechecked '
          f'in float64: {sum("float64" in r for r in rows.values())}.')


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        '--models',
        default='all',
        help='comma-separated names from CONFIGS and EXTRA_CONFIGS, or '
        '"all" (CONFIGS), "extra" (EXTRA_CONFIGS) or "every" (both)')
    parser.add_argument(
        '--out', help='write one JSON line per model here, as it goes')
    parser.add_argument(
        '--float64-recheck',
        action='store_true',
        help=f'measure again in float64 a model with a float32 error over '
        f'{RECHECK_ABOVE:g}, or on which mmcv folds batch norms that '
        'fuse_model leaves')
    parser.add_argument(
        '--timeout',
        type=float,
        default=300,
        help='seconds per model and dtype (0: no limit)')
    parser.add_argument(
        '--threads', type=int, default=1, help='torch.set_num_threads')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [spec.name for spec in GROUPS[args.models]] \
        if args.models in GROUPS else \
        [n.strip() for n in args.models.split(',') if n.strip()]
    unknown = [name for name in names if name not in _BY_NAME]
    if unknown:
        parser.error(f'unknown models: {", ".join(unknown)}')
    out = open(args.out, 'w') if args.out else None
    rows: Dict[str, Dict[str, Any]] = {}
    print(HEADER, flush=True)
    try:
        for index, name in enumerate(names):
            print(f'[{index + 1}/{len(names)}] {name}', file=sys.stderr,
                  flush=True)
            spec = _BY_NAME[name]
            row = sweep_model(spec, torch.float32, args.timeout)
            if args.float64_recheck and needs_recheck(row):
                print(f'[{index + 1}/{len(names)}] {name} in float64',
                      file=sys.stderr, flush=True)
                row['float64'] = sweep_model(spec, torch.float64,
                                             args.timeout)
            row['flags'] = flags(row)
            rows[name] = row
            if out is not None:
                record = {
                    'name': name,
                    'package': spec.package,
                    'config': spec.config,
                    'input_size': list(spec.input_size),
                    'samples': spec.samples,
                    **row
                }
                out.write(json.dumps(record, default=str) + '\n')
                out.flush()
            print_row(name, row)
    finally:
        if out is not None:
            out.close()
    print_summary(rows)


if __name__ == '__main__':
    main()
