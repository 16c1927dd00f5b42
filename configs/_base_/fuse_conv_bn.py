# Fold batch norms into convs at test time (and load checkpoints written by
# tools/fuse_conv_bn.py).  Use as a `_base_`, or copy the two lines into a
# config.  Options: see mmfuse.hook.FuseConvBNHook, e.g.
#   custom_hooks = [dict(type='FuseConvBNHook', fuse_val=True)]
custom_imports = dict(imports=['mmfuse'], allow_failed_imports=False)
custom_hooks = [dict(type='FuseConvBNHook')]
