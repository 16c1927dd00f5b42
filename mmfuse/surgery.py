"""Apply a :class:`~mmfuse.plan.FusionPlan` to a model, and undo it.

Surgery is the only room that changes a model.  A folded layer gets new
``Parameter`` objects, so a weight tied to another module is never changed
behind its back, and each applied fold keeps what it replaced, so it can be
undone exactly.  The one exception is a fold that is not to be undone
(``apply_plan(..., undoable=False)``): there a weight that nothing but its
module refers to, and whose memory no other tensor uses, is rewritten in
place, which nobody can tell from a new one and saves allocating it.
"""
import sys
import threading
import weakref
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .folding import (dense_format, fold_affine_into_input,
                      fold_affine_into_output, norm_affine, norm_affines)
from .layers import (CONV_BN_ON_THE_FLY, conv_geometry, conv_out_channels,
                     norm_affine_params)
from .plain_conv import plain_conv_of
from .plan import CONCAT, PRE, Fold, FusionPlan

__all__ = ['AppliedFold', 'apply_fold', 'apply_plan', 'undo_folds']


class AppliedFold:
    """A fold that has been applied, with what is needed to undo it."""

    def __init__(self, fold: Fold):
        self.fold = fold
        self._undo: Optional[List[Callable[[], None]]] = []

    def remember(self, undo: Callable[[], None]) -> None:
        self._undo.append(undo)

    def undo(self) -> None:
        """Put back every module and parameter the fold replaced."""
        if self._undo is None:
            raise RuntimeError(f'the fold of {self.fold.norm} was applied '
                               'without keeping what it replaced')
        while self._undo:
            self._undo.pop()()

    def forget(self) -> None:
        """Let go of what the fold replaced; it can no longer be undone."""
        self._undo = None


def _split(name: str):
    parent, _, attr = name.rpartition('.')
    return parent, attr


class _ModulesAt:
    """The modules at dotted paths below ``model``, each found once from
    the one above it: the paths of a plan share their parents (looking
    each path up from the root took a tenth of the time of a fold on
    HRNet, whose paths are eight deep).  Kept up to date with the
    replacements a fold makes through it."""

    def __init__(self, model: nn.Module):
        self.found: Dict[str, nn.Module] = {'': model}

    def __call__(self, path: str) -> nn.Module:
        module = self.found.get(path)
        if module is None:
            parent, _, attr = path.rpartition('.')
            holder = self(parent)
            module = holder._modules.get(attr)
            if module is None:
                raise AttributeError(f'{type(holder).__name__} has no '
                                     f'submodule {attr!r} (in {path!r})')
            self.found[path] = module
        return module

    def replace(self, path: str, new: nn.Module) -> None:
        """Put ``new`` at ``path`` here (not in the model)."""
        old = self.found.get(path)
        if old is not None and old._modules:
            below = path + '.'
            for known in [p for p in self.found if p.startswith(below)]:
                del self.found[known]
        self.found[path] = new


def _replace_module(modules: _ModulesAt, name: str, new: nn.Module,
                    applied: AppliedFold) -> nn.Module:
    parent_name, attr = _split(name)
    parent = modules(parent_name)
    old = parent._modules[attr]
    parent._modules[attr] = new
    modules.replace(name, new)
    applied.remember(lambda: parent._modules.__setitem__(attr, old))
    # mmcv's ConvModule may fuse conv and norm on the fly: with the norm
    # gone that would be wrong.
    for flag in CONV_BN_ON_THE_FLY:
        previous = parent.__dict__.get(flag)
        if previous is not None:
            setattr(parent, flag, None)
            applied.remember(
                lambda flag=flag, previous=previous: setattr(
                    parent, flag, previous))
    return old


def _set_parameter(module: nn.Module, name: str, value: torch.Tensor,
                   applied: AppliedFold) -> None:
    registered = name in module._parameters
    old = module._parameters.get(name)
    requires_grad = old.requires_grad if old is not None else \
        module.weight.requires_grad
    if not registered and name in module.__dict__:
        raise RuntimeError(f'{type(module).__name__}.{name} is a plain '
                           'attribute, not a parameter')
    module._parameters[name] = nn.Parameter(value, requires_grad)

    def restore():
        if registered:
            module._parameters[name] = old
        else:
            del module._parameters[name]

    applied.remember(restore)


#: ``torch._C._storage_Use_Count``: how many tensors use a storage (no
#: public equivalent); without it no weight is rewritten in place.
_STORAGE_USERS = getattr(torch._C, '_storage_Use_Count', None)


_CONTROLS = threading.local()


def _control(name: str) -> Dict[str, nn.Parameter]:
    """``{name: parameter}``, a parameter that only this dict refers to
    and no other tensor shares memory with, kept for the next call of this
    thread (making one costs as much as the rest of the test)."""
    controls = getattr(_CONTROLS, 'by_name', None)
    if controls is None:
        controls = _CONTROLS.by_name = {}
    control = controls.get(name)
    if control is None:
        # A normal tensor even under ``torch.inference_mode``.
        with torch.inference_mode(False):
            control = controls[name] = {name: nn.Parameter(torch.empty(0))}
    return control


def _seen_only_by(module: nn.Module, name: str) -> bool:
    """Whether parameter ``name`` of ``module`` is referred to by the module
    alone, and its memory used by no other tensor: then rewriting it in
    place cannot be seen.

    Each of these counts must equal that of a control made and counted the
    same way (not a constant that depends on the Python or torch version):
    Python references to the parameter (a user's variable, an optimizer, a
    ``state_dict(keep_vars=True)``, a tied module), references from C++
    to its tensor (a ``torch.jit`` trace or script of the model), tensors
    using its memory (a view, a ``state_dict()`` entry).  A parameter with
    weak references (which may be looked through later), an inference
    tensor (which may not change outside inference mode), with elements
    sharing memory (an expanded tensor), or in memory that torch does not
    own (``torch.from_numpy``, a memory-mapped file) or that other
    processes share is not rewritten either.
    """
    params = module._parameters
    if _STORAGE_USERS is None or \
            not isinstance(params.get(name), nn.Parameter) or \
            not hasattr(params[name], '_use_count') or \
            params[name].is_inference() or \
            weakref.getweakrefcount(params[name]) or \
            dense_format(params[name]) is None:
        return False
    storage = params[name].untyped_storage()
    # Memory torch does not own (``torch.from_numpy``, a memory-mapped
    # file) or shares with other processes (on the CPU: torch calls every
    # CUDA storage shared) is not torch's to rewrite.
    if not storage.resizable() or (storage.device.type == 'cpu'
                                   and storage.is_shared()):
        return False
    control = _control(name)
    return (sys.getrefcount(params[name]) == sys.getrefcount(control[name])
            and params[name]._use_count() == control[name]._use_count()
            and _STORAGE_USERS(params[name].untyped_storage()._cdata) ==
            _STORAGE_USERS(control[name].untyped_storage()._cdata))


def apply_fold(model: nn.Module,
               fold: Fold,
               in_place: bool = False,
               affine: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
               modules: Optional[_ModulesAt] = None) -> AppliedFold:
    """Apply one fold to ``model`` in place.

    Args:
        model: The model the plan was made for.
        fold: The fold.
        in_place: Rewrite a weight that nobody else can see in place,
            instead of giving the layer a new one.  The fold cannot be
            undone then.
        affine: The norm's ``norm_affine`` if already computed.
        modules: The modules of ``model`` by path, if already looked up
            (for the folds of one plan).

    Returns:
        The applied fold, which can be undone unless ``in_place``.
    """
    applied = AppliedFold(fold)
    modules = modules or _ModulesAt(model)
    norm = modules(fold.norm)
    scale, shift = affine if affine is not None else norm_affine(
        *norm_affine_params(norm))
    for target in fold.convs:
        conv = modules(target.name)
        if target.plain:
            plain = plain_conv_of(conv)
            if plain is None:
                raise RuntimeError(f'{target.name} ({type(conv).__name__}) '
                                   'is not a fixed-weight convolution')
            _replace_module(modules, target.name, plain, applied)
            conv = plain
        elif target.copy:
            shared = conv
            conv = _copy_module(shared)
            _replace_module(modules, target.name, conv, applied)
        rewrite = in_place and _seen_only_by(conv, 'weight')
        weight_out = conv.weight.detach() if rewrite else None
        transposed, groups = conv_geometry(conv)
        if fold.kind == PRE:
            weight, bias = fold_affine_into_input(conv.weight, conv.bias,
                                                  scale, shift, groups,
                                                  weight_out)
        else:
            if fold.kind == CONCAT:
                part = slice(target.offset,
                             target.offset + conv_out_channels(conv))
                conv_scale, conv_shift = scale[part], shift[part]
            else:
                conv_scale, conv_shift = scale, shift
            if not target.shift:
                conv_shift = None
            weight, bias = fold_affine_into_output(
                conv.weight, conv.bias, conv_scale, conv_shift, transposed,
                groups, weight_out)
        if rewrite:
            weight = None  # already there
        if weight is not None:
            _set_parameter(conv, 'weight', weight, applied)
        _set_parameter(conv, 'bias', bias, applied)
    for site in fold.norm_sites:
        identity = nn.Identity()
        # (What ``Module.__setattr__`` does with a bool, without its
        # checks.)
        object.__setattr__(identity, 'training', norm.training)
        _replace_module(modules, site, identity, applied)
    if in_place:
        applied.forget()
    return applied


def _copy_module(module: nn.Module) -> nn.Module:
    """A copy of a leaf conv that shares nothing with it."""
    copy = module.__class__.__new__(module.__class__)
    copy.__dict__ = dict(module.__dict__)
    copy._parameters = dict(module._parameters)
    copy._buffers = dict(module._buffers)
    copy._modules = dict(module._modules)
    for hooks in ('_forward_hooks', '_forward_pre_hooks',
                  '_backward_hooks', '_state_dict_hooks',
                  '_load_state_dict_pre_hooks'):
        if hooks in copy.__dict__:
            copy.__dict__[hooks] = type(module.__dict__[hooks])(
                module.__dict__[hooks])
    return copy


def apply_plan(model: nn.Module,
               plan: FusionPlan,
               folds: Optional[List[Fold]] = None,
               undoable: bool = True) -> List[AppliedFold]:
    """Apply every fold of ``plan`` (or just ``folds``) in order.

    Args:
        model: The model the plan was made for.
        plan: The plan.
        folds: The folds to apply, by default the plan's.
        undoable: Keep what each fold replaced so that it can be undone.
            With ``False`` the replaced parameters are let go as soon as
            each fold is made, a weight nobody else can see is rewritten in
            place, and the returned folds cannot be undone.
    """
    applied = []
    folds = list(plan.folds if folds is None else folds)
    # The norms' affine maps all at once: a few tensor operations in all
    # rather than a few per norm.
    modules = _ModulesAt(model)
    affines = norm_affines(
        [norm_affine_params(modules(fold.norm)) for fold in folds])
    for fold, affine in zip(folds, affines):
        applied.append(
            apply_fold(model, fold, not undoable, affine, modules))
    return applied


def undo_folds(applied: List[AppliedFold]) -> None:
    """Undo applied folds, last first."""
    for fold in reversed(applied):
        fold.undo()
