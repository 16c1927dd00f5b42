# mmdet's RetinaNet R50-FPN, fused at test time by FuseConvBNHook.
#   python <mmdet>/tools/test.py THIS_CONFIG CHECKPOINT
# works with the original checkpoint (fused in memory on the first batch)
# and with one written by tools/fuse_conv_bn.py.
_base_ = [
    'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py',
    '../_base_/fuse_conv_bn.py',
]
