"""Structural re-parameterization: multi-branch blocks become one conv.

:func:`reparameterize` merges every block whose output is provably a sum of
branches (convs with foldable norms, norm-only identities, average pools,
any of them scaled by a constant such as a learnable ``alpha``) into one
``nn.Conv2d``, keeping whatever the block does after the sum.  Blocks that
need their own rule get it from :data:`REPARAMETERIZERS`.
"""
from . import builtins  # noqa: F401  (registers the built-in entries)
from .api import (DEPLOY_METHODS, Merges, apply_reparam_structure,
                  has_registered_blocks, merge_blocks, reparameterize)
from .branches import Op, Term, conv_op, merge_terms, norm_op, pool_op
from .branches import scale_op
from .generic import GenericMerger
from .merge import ConvGeometry, MergeError
from .registry import (REPARAMETERIZERS, BranchSum, Reparameterizer,
                       ReparamRefused, find_reparameterizer)

__all__ = [
    'reparameterize', 'merge_blocks', 'has_registered_blocks', 'Merges',
    'apply_reparam_structure',
    'DEPLOY_METHODS',
    'REPARAMETERIZERS', 'Reparameterizer', 'BranchSum', 'ReparamRefused',
    'find_reparameterizer', 'GenericMerger', 'Term', 'Op', 'conv_op',
    'norm_op', 'pool_op', 'scale_op', 'merge_terms', 'ConvGeometry',
    'MergeError'
]
