"""Fuse a checkpoint: ``python tools/fuse_conv_bn.py CONFIG CHECKPOINT OUT``.

The same as the ``mmfuse-fuse-conv-bn`` console command; see
:mod:`mmfuse.cli` and ``--help``.
"""
import os
import sys

try:
    from mmfuse.cli import main
except ImportError:  # run from a checkout without installing mmfuse
    sys.path.insert(0, os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    from mmfuse.cli import main

if __name__ == '__main__':
    sys.exit(main())
