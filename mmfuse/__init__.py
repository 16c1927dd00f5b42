"""mmfuse: fold normalisation layers into convolutions, provably right."""
from .api import (FusionError, discover_folds, fuse_conv_bn, fuse_model,
                  unwrap_model)
from .hook import FuseConvBNHook  # importing registers it in HOOKS
from .plan import ConvTarget, Fold, FusionPlan, Skip
from .reparam import (REPARAMETERIZERS, apply_reparam_structure,
                      reparameterize)
from .report import FusionReport
from .surgery import apply_plan
from .version import __version__

__all__ = [
    '__version__', 'fuse_conv_bn', 'fuse_model', 'discover_folds',
    'FusionReport', 'FusionPlan', 'Fold', 'ConvTarget', 'Skip',
    'FusionError', 'apply_plan', 'unwrap_model', 'FuseConvBNHook',
    'reparameterize', 'apply_reparam_structure', 'REPARAMETERIZERS'
]
