"""What kind of layer a module is, and whether it can take part in a fold.

Discovery asks this module two questions about a leaf module: *is it a
normalisation layer, and can it be folded?* and *is it a convolution (or
linear layer) whose parameters a fold may rewrite?*  Every refusal comes with
a reason that ends up in the :class:`~mmfuse.FusionReport`.  Nothing here
mutates a module.
"""
from typing import Callable, Dict, Optional, Set, Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm

from .module_walk import has_children

__all__ = [
    'is_norm_layer', 'norm_fold_problem', 'norm_affine_params',
    'norm_channels', 'is_conv_layer', 'conv_fold_problem', 'conv_geometry',
    'pads_with_zeros', 'conv_out_channels', 'conv_in_channels',
    'is_deformable_conv', 'input_fold_problem', 'runs_class_forward',
    'global_hook_problem', 'is_stock_sequential'
]

# Convolution subclasses whose forward is the plain convolution with their
# own ``weight`` and ``bias`` (they only handle empty inputs or pad
# adaptively first).
_LINEAR_CONV_FORWARDS: Set[Callable] = {
    nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward,
    nn.ConvTranspose1d.forward, nn.ConvTranspose2d.forward,
    nn.ConvTranspose3d.forward, nn.Linear.forward
}
#: The ``_conv_forward`` of torch's convs (Conv1d/2d/3d call theirs with
#: the weight; transposed convs do not call the one they inherit).
_STOCK_CONV_FORWARDS = {
    getattr(cls, '_conv_forward', None)
    for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                nn.ConvTranspose2d, nn.ConvTranspose3d)
}
_LINEAR_CONV_QUALNAMES = {
    # mmcv.cnn.bricks.wrappers: fall back to the stock forward except for
    # empty inputs.
    'mmcv.cnn.bricks.wrappers.Conv2d.forward',
    'mmcv.cnn.bricks.wrappers.Conv3d.forward',
    'mmcv.cnn.bricks.wrappers.ConvTranspose2d.forward',
    'mmcv.cnn.bricks.wrappers.ConvTranspose3d.forward',
    'mmcv.cnn.bricks.wrappers.Linear.forward',
    # Pads like TensorFlow's 'SAME', then F.conv2d with its own weight.
    'mmcv.cnn.bricks.conv2d_adaptive_padding.Conv2dAdaptivePadding.forward',
    # Modulated deformable convs (DCNv2): output channel ``o`` is
    # ``weight[o]`` applied to samples of the input (where offsets and a
    # mask say, both computed apart from ``weight``), plus ``bias[o]``;
    # the Pack computes offsets and mask from the input with its own
    # ``conv_offset``.
    'mmcv.ops.modulated_deform_conv.ModulatedDeformConv2d.forward',
    'mmcv.ops.modulated_deform_conv.ModulatedDeformConv2dPack.forward',
}
# Deformable convs of mmcv (by the class that defines them): whether each
# has a bias to take a norm's shift.  Any subclass is a conv layer too, to
# discovery (a layer whose output a norm may follow); one that overrides
# forward is refused like any conv that does.
_DEFORMABLE_CONVS = {
    'mmcv.ops.modulated_deform_conv.ModulatedDeformConv2d': True,
    'mmcv.ops.deform_conv.DeformConv2d': False,
}
# Convolutions that transform their weight (or their input-dependent
# behaviour) in forward: folding into ``weight`` would be undone.
_WEIGHT_TRANSFORMING_CONVS = {
    'ConvWS2d': 'standardises its weight in forward (weight standardization)',
    'ConvAWS2d': 'standardises its weight in forward (adaptive weight '
    'standardization)',
    'SAConv2d': 'switchable atrous conv: mixes two dilations and '
    'standardises its weight in forward',
}

# Norm classes whose forward, in eval mode with running statistics, is the
# plain per-channel affine map ``gamma * (x - mean) / sqrt(var + eps) +
# beta``.
_AFFINE_NORM_FORWARDS: Set[Callable] = {
    _BatchNorm.forward, nn.SyncBatchNorm.forward
}
_AFFINE_NORM_QUALNAMES = {
    'mmcv.ops.sync_bn.SyncBatchNorm.forward',
    'torchvision.ops.misc.FrozenBatchNorm2d.forward',
    'detectron2.layers.batch_norm.FrozenBatchNorm2d.forward',
}


#: :func:`_qualname` of each function asked about (forwards of classes).
_QUALNAMES: Dict[Callable, str] = {}


def _qualname(func: Callable) -> str:
    """``module.qualname`` of ``func``, made once per function (each time
    for an unhashable callable)."""
    try:
        return _QUALNAMES[func]
    except (KeyError, TypeError):
        pass
    name = f'{getattr(func, "__module__", "")}.' \
           f'{getattr(func, "__qualname__", "")}'
    try:
        _QUALNAMES[func] = name
    except TypeError:
        pass
    return name


#: Forwards of mmcv's layers without children that compute no linear map
#: of their input: ``x * sigmoid(x)``.
_NONLINEAR_QUALNAMES = {'mmcv.cnn.bricks.swish.Swish.forward'}


def is_nonlinear_layer(module: nn.Module) -> bool:
    """Whether ``module`` runs the stock forward of one of mmcv's layers
    known to compute no linear map of its input (``Swish``)."""
    if isinstance(module, torch.jit.ScriptModule):
        return False  # compiled: its class's forward is not Python's
    return _qualname(type(module).forward) in _NONLINEAR_QUALNAMES and \
        runs_class_forward(module)


def is_mmcv_conv_module(module: nn.Module) -> bool:
    """Whether ``module`` runs mmcv's stock ``ConvModule.forward`` (any
    subclass that keeps it): its data flow follows ``module.order``."""
    if isinstance(module, torch.jit.ScriptModule):
        return False  # compiled: its class's forward is not Python's
    return _qualname(type(module).forward) == \
        'mmcv.cnn.bricks.conv_module.ConvModule.forward' and \
        runs_class_forward(module)


#: Attributes through which mmcv's ``ConvModule`` fuses conv and norm on
#: the fly in eval mode (mmcv 2.0 calls it fast_conv_bn_eval, later versions
#: efficient_conv_bn_eval): set, its forward skips the norm module.
CONV_BN_ON_THE_FLY = ('fast_conv_bn_eval_forward',
                      'efficient_conv_bn_eval_forward')


def fuses_conv_bn_on_the_fly(block: nn.Module) -> bool:
    """Whether an mmcv ``ConvModule`` has conv-norm fusion on the fly on."""
    return any(
        block.__dict__.get(flag) is not None for flag in CONV_BN_ON_THE_FLY)


def _is_frozen_bn(module: nn.Module) -> bool:
    """Buffer-only BN in the style of torchvision/detectron2."""
    return (type(module).__name__.startswith('FrozenBatchNorm')
            and all(module._buffers.get(k) is not None
                    for k in ('weight', 'bias', 'running_mean',
                              'running_var')))


def _is_mmcv_sync_bn(cls: type) -> bool:
    """Whether ``cls`` is mmcv's ``SyncBatchNorm``."""
    return (cls.__name__ == 'SyncBatchNorm'
            and cls.__module__.startswith('mmcv.ops'))


#: ``(is a norm, may be a frozen BN, is named like a norm)`` of each
#: class asked about: what :func:`is_norm_layer` can tell from the class.
_NORM_CLASSES: Dict[type, Tuple[bool, bool, bool]] = {}


def _norm_class(cls: type) -> Tuple[bool, bool, bool]:
    known = _NORM_CLASSES.get(cls)
    if known is not None:
        return known
    rms_norm = getattr(nn, 'RMSNorm', None)
    norm = issubclass(cls, (_BatchNorm, nn.GroupNorm, nn.LayerNorm,
                            _InstanceNorm, nn.LocalResponseNorm)) or \
        _is_mmcv_sync_bn(cls) or (rms_norm is not None
                                  and issubclass(cls, rms_norm))
    name = cls.__name__
    # torch.nn.utils' weight-norm/spectral-norm parametrizations are named
    # like norms but normalise a weight, not the data.
    named = (name.endswith('Norm') or name.endswith('BN') or any(
        tag in name for tag in ('Norm1d', 'Norm2d', 'Norm3d'))) and \
        not cls.__module__.startswith('torch.nn.utils')
    known = _NORM_CLASSES[cls] = (norm, name.startswith('FrozenBatchNorm'),
                                  named)
    return known


def is_norm_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer of any kind.

    Used to list every norm in the report, foldable or not.
    """
    norm, frozen, named = _norm_class(type(module))
    if norm or (frozen and _is_frozen_bn(module)):
        return True
    # A container named like a norm (a block ending in 'Norm') is not one.
    return named and not has_children(module)


def runs_class_forward(module: nn.Module) -> bool:
    """Whether calling ``module`` runs its class's ``forward`` the way
    ``nn.Module`` does (hooks aside): no ``forward`` of the instance's own,
    no ``__call__`` or ``_call_impl`` of the class's own."""
    cls = type(module)
    return 'forward' not in module.__dict__ and \
        cls.__call__ is nn.Module.__call__ and \
        cls._call_impl is nn.Module._call_impl


def is_stock_sequential(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Sequential`` that runs its children
    in order as ``nn.Sequential`` does: its class keeps the stock forward,
    iteration and call, and the instance has no forward of its own."""
    return isinstance(module, nn.Sequential) and \
        type(module).forward is nn.Sequential.forward and \
        type(module).__iter__ is nn.Sequential.__iter__ and \
        runs_class_forward(module)


def call_problem(module: nn.Module) -> Optional[str]:
    """Why a call of this layer may do more than its class's ``forward``
    (hooks, its own ``forward``, a ``__call__`` of its own), or ``None``.
    """
    if module._forward_pre_hooks or module._forward_hooks:
        return 'has forward hooks'
    if not runs_class_forward(module):
        return ('is not called through its class\'s forward (a forward of '
                'its own, or __call__ overridden)')
    return None


def global_hook_problem() -> Optional[str]:
    """Why no fold can be trusted without verification while global
    module hooks are registered (``register_module_forward_hook`` and
    friends: they may act on any layer's call), or ``None``."""
    hooks = nn.modules.module
    if getattr(hooks, '_global_forward_hooks', None) or \
            getattr(hooks, '_global_forward_pre_hooks', None):
        return ('global forward hooks are registered (they may act on any '
                'layer): not folded without verification')
    return None


def norm_fold_problem(module: nn.Module) -> Optional[str]:
    """Why ``module`` cannot be folded, or ``None`` when it can.

    A foldable norm is, in its current mode, a per-channel affine map from
    stored statistics: a batch norm (any ``_BatchNorm`` subclass that keeps
    the stock forward, torch's or mmcv's SyncBN, a buffer-only frozen BN)
    with running statistics, in eval mode.
    """
    name = type(module).__name__
    if isinstance(module, nn.GroupNorm):
        return 'GroupNorm normalises with per-sample statistics'
    if isinstance(module, nn.LayerNorm):
        return f'{name} normalises with per-sample statistics'
    if isinstance(module, _InstanceNorm):
        if getattr(module, 'track_running_stats', False):
            return (f'{name} uses running statistics only in some '
                    'configurations; not folded')
        return f'{name} normalises with per-sample statistics'
    is_bn = isinstance(module, _BatchNorm) or _is_mmcv_sync_bn(type(module))
    if not is_bn and not _is_frozen_bn(module):
        return f'{name} is not a batch norm with stored statistics'
    problem = call_problem(module)
    if problem:
        return problem
    forward = type(module).forward
    known = forward in _AFFINE_NORM_FORWARDS or \
        _qualname(forward) in _AFFINE_NORM_QUALNAMES
    if _is_frozen_bn(module):
        # Frozen BNs each come with their own forward: accept one only if
        # it computes exactly the affine map of its buffers.
        if known or _is_affine_on_probes(module):
            return None
        return f'{name} does not compute the affine map of its buffers'
    if not known:
        return (f'{name} overrides forward: it may do more than normalise '
                '(e.g. an activation)')
    if not getattr(module, 'track_running_stats', True) or \
            module.running_mean is None or module.running_var is None:
        return 'track_running_stats=False: normalises with batch statistics'
    if module.training:
        return 'in training mode: normalises with batch statistics'
    return None


@torch.no_grad()
def _is_affine_on_probes(module: nn.Module) -> bool:
    """Whether a buffer-only norm computes ``scale * x + shift`` on random
    probes of both signs and a wide range (an activation would show)."""
    from .folding import norm_affine
    mean, var, eps, weight, bias = norm_affine_params(module)
    scale, shift = norm_affine(mean, var, eps, weight, bias)
    before = [b.clone() for b in module.buffers()]
    gen = torch.Generator().manual_seed(0)
    for spread in (1.0, 100.0):
        probe = torch.randn(2, mean.numel(), 3, 3, generator=gen,
                            dtype=torch.float64) * spread
        probe = probe.to(mean)
        expected = probe.double() * scale.view(1, -1, 1, 1) + \
            shift.view(1, -1, 1, 1)
        got = module(probe).double()
        tolerance = 1e-5 * float(expected.abs().max()) + 1e-6
        if got.shape != expected.shape or \
                float((got - expected).abs().max()) > tolerance:
            return False
    return all(torch.equal(a, b) for a, b in zip(before, module.buffers()))


def norm_affine_params(
    module: nn.Module
) -> Tuple[Tensor, Tensor, float, Optional[Tensor], Optional[Tensor]]:
    """``(running_mean, running_var, eps, weight, bias)`` of a foldable norm.
    """
    weight = getattr(module, 'weight', None)
    bias = getattr(module, 'bias', None)
    eps = float(getattr(module, 'eps', 1e-5))
    return module.running_mean, module.running_var, eps, weight, bias


def norm_channels(module: nn.Module) -> int:
    """Number of channels a foldable norm normalises."""
    return int(module.running_mean.numel())


#: :func:`_deformable_kind` of each class asked about.
_DEFORMABLE_KINDS: Dict[type, Optional[bool]] = {}


def _deformable_kind(cls: type) -> Optional[bool]:
    """For a deformable conv class of mmcv (or a subclass), whether it has
    a bias (:data:`_DEFORMABLE_CONVS`); ``None`` for any other class."""
    try:
        return _DEFORMABLE_KINDS[cls]
    except KeyError:
        pass
    kind = next((_DEFORMABLE_CONVS[name] for name in (
        f'{base.__module__}.{base.__qualname__}' for base in cls.__mro__)
                 if name in _DEFORMABLE_CONVS), None)
    _DEFORMABLE_KINDS[cls] = kind
    return kind


def is_deformable_conv(module: nn.Module) -> bool:
    """Whether ``module`` is one of mmcv's deformable convs (DCN, DCNv2,
    their Packs, and subclasses)."""
    return _deformable_kind(type(module)) is not None


def is_conv_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a convolution (deformable ones of mmcv too) or
    a linear layer."""
    return isinstance(module, (_ConvNd, nn.Linear)) or \
        _deformable_kind(type(module)) is not None


def _has_member(module: nn.Module, name: str) -> bool:
    """``hasattr(module, name)`` for a parameter, buffer, submodule or
    instance attribute, without the cost of a failed lookup."""
    return name in module.__dict__ or name in module._parameters or \
        name in module._buffers or name in module._modules


#: What each conv class asked about does to its weight ('' for nothing).
_WEIGHT_TRANSFORMS: Dict[type, str] = {}


def _weight_transform(cls: type) -> str:
    """How ``cls`` (or a class it derives from) transforms its weight in
    forward, by :data:`_WEIGHT_TRANSFORMING_CONVS`; ``''`` for not."""
    known = _WEIGHT_TRANSFORMS.get(cls)
    if known is None:
        known = next((_WEIGHT_TRANSFORMING_CONVS[base.__name__]
                      for base in cls.__mro__
                      if base.__name__ in _WEIGHT_TRANSFORMING_CONVS), '')
        _WEIGHT_TRANSFORMS[cls] = known
    return known


def conv_fold_problem(module: nn.Module) -> Optional[str]:
    """Why a fold may not rewrite this conv's parameters, or ``None``."""
    name = type(module).__name__
    if not is_conv_layer(module):
        return f'{name} is not a convolution or linear layer'
    if _deformable_kind(type(module)) is False:
        return (f'{name} is a deformable conv without a bias (DCNv1): it '
                "cannot take the norm's shift")
    transforms = _weight_transform(type(module))
    if transforms:
        return f'{name} {transforms}'
    if _has_member(module, 'weight_orig'):
        return f'{name} has spectral norm: its weight is recomputed in forward'
    if _has_member(module, 'weight_g') and _has_member(module, 'weight_v'):
        return f'{name} has weight norm: its weight is recomputed in forward'
    # (No ``parametrizations`` submodule: not parametrized, and asking
    # torch costs a failed attribute lookup.)
    if _has_member(module, 'parametrizations') and \
            torch.nn.utils.parametrize.is_parametrized(module):
        return f'{name} has a parametrized weight'
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and \
            module.has_uninitialized_params():
        return f'{name} is a lazy module with uninitialized parameters'
    problem = call_problem(module)
    if problem:
        return f'{name} {problem}'
    forward = type(module).forward
    if forward not in _LINEAR_CONV_FORWARDS and \
            _qualname(forward) not in _LINEAR_CONV_QUALNAMES:
        return f'{name} overrides forward: it may transform its weight'
    conv_forward = getattr(type(module), '_conv_forward', None)
    if '_conv_forward' in module.__dict__ or (
            conv_forward is not None
            and conv_forward not in _STOCK_CONV_FORWARDS):
        # (What the stock forwards of Conv1d/2d/3d call with the weight.)
        return f'{name} overrides _conv_forward: it may transform its ' \
            'weight or pad otherwise than its attributes say'
    weight = module.weight
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        return f'{name} has a non floating point weight'
    if 'weight' in module._buffers or 'bias' in module._buffers:
        # A fold gives it parameters; the buffers would stay in its state.
        return f'{name} keeps its weight or bias as a buffer'
    if 'weight' not in module._parameters or 'bias' in module.__dict__:
        # (A fold sets parameters; an instance attribute would shadow it.)
        return f'{name} keeps its weight or bias as a plain attribute'
    return None


def conv_geometry(module: nn.Module) -> Tuple[bool, int]:
    """``(transposed, groups)`` of a conv or linear layer."""
    if isinstance(module, nn.Linear):
        return False, 1
    return bool(module.transposed), int(module.groups)


def conv_out_channels(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    return module.out_channels


def conv_in_channels(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    return module.in_channels


def input_fold_problem(module: nn.Module) -> Optional[str]:
    """Why a norm that runs right before the conv or linear layer
    ``module`` cannot be folded into its input side, or ``None``.

    Completes ``'runs before <conv>, which ...'``.
    """
    if is_deformable_conv(module):
        # Offsets pointing outside the input sample zeros wherever they
        # point, and a Pack computes its offsets from the input too.
        return ('is a deformable conv: it samples zeros outside its input '
                'and may read the input for its offsets')
    if pads_with_zeros(module):
        return 'pads with zeros: folding would change the border'
    return None


def pads_with_zeros(module: nn.Module) -> bool:
    """Whether the layer pads its input with zeros.

    A norm before such a layer cannot be folded into it: the padded zeros
    would have been ``shift``, not zero.  Transposed convs are treated as
    padding (their input is spread over a zero canvas).  See
    :func:`input_fold_problem` for deformable convs.
    """
    if isinstance(module, nn.Linear):
        return False
    if module.transposed:
        return True
    if 'AdaptivePadding' in type(module).__name__:
        return True
    if module.padding_mode != 'zeros':
        return False
    padding = module.padding
    if isinstance(padding, str):
        return padding != 'valid'
    return any(p != 0 for p in padding)
