# configs/demo/demo_classifier.py with FuseConvBNHook: fuses in memory on the
# first test batch, or loads a fused checkpoint from tools/fuse_conv_bn.py.
_base_ = './demo_classifier.py'
custom_hooks = [dict(type='FuseConvBNHook')]
