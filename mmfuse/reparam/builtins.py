"""Built-in ``REPARAMETERIZERS`` entries for OpenMMLab's multi-branch blocks.

Each entry reads its block's branches from the attributes its class sets,
checks that every container on the way computes what its class says (the
stock forward of ``nn.Sequential`` or mmcv's ``ConvModule`` without
activation, no hooks), and refuses a block already in deploy form.  Targets
are class paths, so none of these packages is imported here.

* mmpretrain ``RepVGGBlock``: 3x3 conv+BN + 1x1 conv+BN (+ BN identity),
  then the SE layer (if any) and the activation.
* mmpretrain ``MobileOneBlock``: ``num_convs`` kxk conv+BN + 1x1 conv+BN
  (when k > 1) + BN identity, then SE and activation.
* mmpretrain ``ReparamLargeKernelConv`` (RepLKNet): large conv+BN + small
  conv+BN.
* mmyolo ``RepVGGBlock`` (YOLOv6, YOLOv7, RTMDet-style necks, and PP-YOLOE
  with ``use_alpha``): 3x3 ConvModule + ``alpha`` * 1x1 ConvModule + BN
  identity, then SE and activation.
* mmpose ``RepVGGBlock`` (RTMO's hybrid encoder): 3x3 ConvModule + 1x1
  ConvModule + BN identity, then the activation.
"""
from typing import List

from torch import nn

from ..layers import (fuses_conv_bn_on_the_fly, is_mmcv_conv_module,
                      is_stock_sequential, runs_class_forward)
from .branches import Op, Term, conv_op, norm_op, scale_op
from .registry import (REPARAMETERIZERS, BranchSum, Reparameterizer,
                       ReparamRefused)

__all__ = [
    'MMPretrainRepVGGBlock', 'MMPretrainMobileOneBlock',
    'MMPretrainReparamLargeKernelConv', 'MMYOLORepVGGBlock',
    'MMPoseRepVGGBlock'
]


def _no_hooks(module: nn.Module, what: str) -> None:
    if module._forward_hooks or module._forward_pre_hooks:
        raise ReparamRefused(f'{what} has forward hooks')
    if not runs_class_forward(module):
        raise ReparamRefused(f'{what} is not called through its class\'s '
                             'forward')


def _sequential_ops(seq: nn.Module, what: str, conv: str,
                    norm: str) -> List[Op]:
    """``[conv, norm]`` of a ``Sequential(conv, norm)`` branch."""
    if not is_stock_sequential(seq):
        raise ReparamRefused(f'{what} is not a plain Sequential')
    _no_hooks(seq, what)
    names = [n for n, m in seq._modules.items() if m is not None]
    if names != [conv, norm]:
        raise ReparamRefused(f'{what} holds {names}, not [{conv}, {norm}]')
    return [conv_op(seq._modules[conv]), norm_op(seq._modules[norm])]


def _conv_module_ops(block: nn.Module, what: str) -> List[Op]:
    """``[conv, norm]`` (or ``[conv]``) of an mmcv ``ConvModule`` branch
    that runs no activation."""
    if not is_mmcv_conv_module(block):
        raise ReparamRefused(f'{what} is not a plain mmcv ConvModule')
    _no_hooks(block, what)
    if getattr(block, 'with_explicit_padding', False):
        raise ReparamRefused(f'{what} pads in a separate layer')
    if fuses_conv_bn_on_the_fly(block):
        raise ReparamRefused(f'{what} fuses conv and norm on the fly')
    order = [layer for layer in block.order
             if (layer != 'act' or block.with_activation) and
             (layer != 'norm' or block.with_norm)]
    if 'act' in order:
        raise ReparamRefused(f'{what} applies an activation')
    ops = []
    for layer in order:
        if layer == 'conv':
            ops.append(conv_op(block.conv))
        else:
            ops.append(norm_op(block.norm))
    if not ops or ops[0].kind != 'conv':
        raise ReparamRefused(f'{what} normalises before its conv')
    return ops


def _after(block: nn.Module, *names: str) -> List[str]:
    """The names among ``names`` whose child exists."""
    kept = []
    for name in names:
        child = getattr(block, name, None)
        if child is not None:
            if not isinstance(child, nn.Module):
                raise ReparamRefused(f'{name} is not a module')
            kept.append(name)
    return kept


@REPARAMETERIZERS.register_module()
class MMPretrainRepVGGBlock(Reparameterizer):
    """mmpretrain's ``RepVGGBlock`` (RepVGG backbones, also in YOLOX-PAI).
    """
    targets = ('mmpretrain.models.backbones.repvgg.RepVGGBlock', )

    def branches(self, block: nn.Module) -> BranchSum:
        if block.deploy:
            raise ReparamRefused('already in deploy form')
        _no_hooks(block, 'the block')
        terms = [
            Term(_sequential_ops(block.branch_3x3, 'branch_3x3', 'conv',
                                 'norm')),
            Term(_sequential_ops(block.branch_1x1, 'branch_1x1', 'conv',
                                 'norm'))
        ]
        if block.branch_norm is not None:
            terms.append(Term([norm_op(block.branch_norm)]))
        # Its forward runs ``se_layer`` where ``se_cfg`` is set, whatever
        # the attribute holds.
        if (getattr(block, 'se_cfg', None) is None) != \
                (getattr(block, 'se_layer', None) is None):
            raise ReparamRefused('se_layer and se_cfg disagree on whether '
                                 'the block runs an SE layer')
        return BranchSum(terms, _after(block, 'se_layer', 'act'))


@REPARAMETERIZERS.register_module()
class MMPretrainMobileOneBlock(Reparameterizer):
    """mmpretrain's ``MobileOneBlock``."""
    targets = ('mmpretrain.models.backbones.mobileone.MobileOneBlock', )

    def branches(self, block: nn.Module) -> BranchSum:
        if block.deploy:
            raise ReparamRefused('already in deploy form')
        _no_hooks(block, 'the block')
        terms = []
        if block.branch_norm is not None:
            terms.append(Term([norm_op(block.branch_norm)]))
        if block.branch_scale is not None:
            terms.append(
                Term(_sequential_ops(block.branch_scale, 'branch_scale',
                                     'conv', 'norm')))
        for index, branch in enumerate(block.branch_conv_list):
            terms.append(
                Term(_sequential_ops(branch, f'branch_conv_list.{index}',
                                     'conv', 'norm')))
        return BranchSum(terms, _after(block, 'se', 'act'))


@REPARAMETERIZERS.register_module()
class MMPretrainReparamLargeKernelConv(Reparameterizer):
    """mmpretrain's ``ReparamLargeKernelConv`` (RepLKNet)."""
    targets = ('mmpretrain.models.backbones.replknet.ReparamLargeKernelConv',
               )

    def branches(self, block: nn.Module) -> BranchSum:
        if hasattr(block, 'lkb_reparam'):
            raise ReparamRefused('already in deploy form')
        _no_hooks(block, 'the block')
        terms = [
            Term(_sequential_ops(block.lkb_origin, 'lkb_origin', 'conv',
                                 'bn'))
        ]
        if hasattr(block, 'small_conv'):
            terms.append(
                Term(_sequential_ops(block.small_conv, 'small_conv', 'conv',
                                     'bn')))
        return BranchSum(terms, [])


@REPARAMETERIZERS.register_module()
class MMYOLORepVGGBlock(Reparameterizer):
    """mmyolo's ``RepVGGBlock``, with or without the learnable ``alpha`` on
    the 1x1 branch (PP-YOLOE+)."""
    targets = ('mmyolo.models.layers.yolo_bricks.RepVGGBlock', )

    def branches(self, block: nn.Module) -> BranchSum:
        if hasattr(block, 'rbr_reparam'):
            raise ReparamRefused('already in deploy form')
        _no_hooks(block, 'the block')
        one_by_one = Term(_conv_module_ops(block.rbr_1x1, 'rbr_1x1'))
        # The block's forward tests ``if self.alpha:``: a zero alpha runs
        # the branch unscaled.
        if block.alpha is not None and bool(block.alpha):
            one_by_one = one_by_one.then(scale_op(block.alpha, 'alpha'))
        terms = [Term(_conv_module_ops(block.rbr_dense, 'rbr_dense')),
                 one_by_one]
        if block.rbr_identity is not None:
            terms.append(Term([norm_op(block.rbr_identity)]))
        return BranchSum(terms, _after(block, 'se', 'nonlinearity'))


@REPARAMETERIZERS.register_module()
class MMPoseRepVGGBlock(Reparameterizer):
    """mmpose's ``RepVGGBlock`` (RTMO's hybrid encoder)."""
    targets = ('mmpose.models.utils.reparam_layers.RepVGGBlock', )

    def branches(self, block: nn.Module) -> BranchSum:
        if getattr(block, 'deploy', False):
            raise ReparamRefused('already in deploy form')
        _no_hooks(block, 'the block')
        terms = [
            Term(_conv_module_ops(block.branch_3x3, 'branch_3x3')),
            Term(_conv_module_ops(block.branch_1x1, 'branch_1x1'))
        ]
        if block.branch_norm is not None:
            terms.append(Term([norm_op(block.branch_norm)]))
        return BranchSum(terms, _after(block, 'act'))
