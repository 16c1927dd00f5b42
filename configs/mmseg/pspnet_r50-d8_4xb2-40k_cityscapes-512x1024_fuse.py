# mmseg's PSPNet R50-D8 on Cityscapes, fused at test time by FuseConvBNHook.
#   python <mmseg>/tools/test.py THIS_CONFIG CHECKPOINT
# works with the original checkpoint (fused in memory on the first batch)
# and with one written by tools/fuse_conv_bn.py.
_base_ = [
    'mmseg::pspnet/pspnet_r50-d8_4xb2-40k_cityscapes-512x1024.py',
    '../_base_/fuse_conv_bn.py',
]
