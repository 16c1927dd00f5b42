"""``FuseConvBNHook``: fuse a model inside an MMEngine ``Runner``.

Importing :mod:`mmfuse` registers the hook in MMEngine's root ``HOOKS``
registry, so it is found from configs whose ``default_scope`` is mmengine,
mmdet, mmseg, mmpretrain or any other codebase whose registries descend from
MMEngine's::

    custom_imports = dict(imports=['mmfuse'], allow_failed_imports=False)
    custom_hooks = [dict(type='FuseConvBNHook')]
"""
import copy
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from mmengine.dist import (all_reduce, broadcast_object_list, get_rank,
                           get_world_size)
from mmengine.hooks import EMAHook, Hook
from mmengine.logging import print_log
from mmengine.registry import HOOKS
from torch import nn

from .api import FusionError, fuse_model, unwrap_model
from .checkpoint import (convert_to_fused_structure, fused_meta, fused_plan_of,
                         is_fused_structure, mark_fused)
from .plan import FusionPlan
from .report import FusionReport
from .surgery import apply_plan, undo_folds
from .verify import default_rtol, output_error

__all__ = ['FuseConvBNHook', 'forward_args']

_BOOL_OPTIONS = ('fuse_test', 'fuse_val', 'use_batch', 'verify', 'log_table')


@HOOKS.register_module()
class FuseConvBNHook(Hook):
    """Fold batch norms into convs for testing (and, opt-in, validation).

    What it does in a ``Runner``:

    * **Test** (``fuse_test``): before the first test iteration the model
      (unwrapped from DDP or any MMEngine wrapper) is put in eval mode and
      fused in place by :func:`mmfuse.fuse_model`.  The example input is the
      first test batch after the model's ``data_preprocessor``, passed as
      ``model(inputs, data_samples, 'tensor')``; it serves discovery and
      verification.  The report is logged once, on rank 0.  With an
      ``EMAHook``, the averaged copy it keeps gets the same folds, so its
      swaps stay consistent.
    * **Validation** (``fuse_val``, off by default): each validation runs
      on a fused deep copy of the model, so training weights, optimizer
      state, batch norm running statistics and ``EMAHook`` weights are
      untouched.  The plan found the first time is reused and checked
      against the unfused copy on the first batch each time; if that check
      fails, that validation runs unfused, with a warning.
    * **Fused checkpoints**: when the runner loads a checkpoint whose
      ``meta`` has an ``'mmfuse'`` record (written by
      ``tools/fuse_conv_bn.py``), the freshly built model, and the copy an
      ``EMAHook`` keeps, are first turned into the fused structure, so the
      weights load with no missing or unexpected keys; the test then runs
      the model as loaded.  This happens in ``after_load_checkpoint``, which
      MMEngine calls before it loads the weights; the hook's priority
      (``'ABOVE_NORMAL'``) puts it before ``EMAHook``.
    * **Distributed**: rank 0 fuses with its first batch and broadcasts the
      plan; every other rank applies exactly that plan and checks it on its
      own first batch.  A failure on any rank raises on every rank.

    Example config::

        custom_imports = dict(imports=['mmfuse'], allow_failed_imports=False)
        custom_hooks = [dict(type='FuseConvBNHook', fuse_val=True)]

    The config key ``priority`` works as for any hook; keep it ahead of
    ``EMAHook``'s for fused checkpoints to load into a model that uses EMA.

    Args:
        fuse_test: Fuse the model before the first test iteration.
        fuse_val: Validate a fused copy of the model.
        use_batch: Use the first batch as example input (data flow observed
            in a real forward pass, output verified).  ``False`` fuses from
            the model's structure alone, without verification.
        verify: Compare the fused output with the unfused one on the
            example input and undo folds that break it.
        rtol: Largest relative output error accepted; ``None`` for
            mmfuse's default (1e-4 for float32, 5e-2 for half precision).
        log_table: Log the full per-norm table; ``False`` logs the summary
            line only.

    Raises:
        TypeError: An option has the wrong type.
        ValueError: An option has a wrong value.
    """

    priority = 'ABOVE_NORMAL'

    def __init__(self,
                 fuse_test: bool = True,
                 fuse_val: bool = False,
                 use_batch: bool = True,
                 verify: bool = True,
                 rtol: Optional[float] = None,
                 log_table: bool = True):
        options = dict(fuse_test=fuse_test, fuse_val=fuse_val,
                       use_batch=use_batch, verify=verify,
                       log_table=log_table)
        for name in _BOOL_OPTIONS:
            if not isinstance(options[name], bool):
                raise TypeError(
                    f'FuseConvBNHook: {name} must be True or False, got '
                    f'{options[name]!r}')
        if rtol is not None and (isinstance(rtol, bool) or
                                 not isinstance(rtol, (int, float))):
            raise TypeError(
                f'FuseConvBNHook: rtol must be a number or None, got {rtol!r}')
        if rtol is not None and not 0 < rtol < float('inf'):
            raise ValueError('FuseConvBNHook: rtol must be positive and '
                             f'finite, got {rtol}')
        if rtol is not None and not verify:
            raise ValueError(
                'FuseConvBNHook: rtol is set but verify=False; drop rtol or '
                'set verify=True')
        if not fuse_test and not fuse_val:
            raise ValueError(
                'FuseConvBNHook: fuse_test and fuse_val are both False, so '
                'the hook would only load fused checkpoints; set one of them')
        self.fuse_test = fuse_test
        self.fuse_val = fuse_val
        self.use_batch = use_batch
        self.verify = verify
        self.rtol = rtol
        self.log_table = log_table
        self.last_report: Optional[FusionReport] = None
        self._val_plan: Optional[FusionPlan] = None
        self._val_original: Optional[nn.Module] = None
        self._val_swapped = False

    # ----------------------------------------------------------- loading

    def after_load_checkpoint(self, runner, checkpoint: Dict) -> None:
        """Turn the model into the fused structure before a fused
        checkpoint's weights load into it."""
        record = fused_meta(checkpoint)
        if record is None:
            return
        model = unwrap_model(runner.model)
        if is_fused_structure(model):
            if fused_plan_of(model) != record['plan']:
                raise FusionError(
                    'FuseConvBNHook: the model is already fused with another '
                    'plan than the checkpoint being loaded')
            return
        plan = convert_to_fused_structure(model, record)
        for ema_module in _ema_modules(runner):
            if not is_fused_structure(ema_module):
                convert_to_fused_structure(ema_module, record)
        source = record.get('source_checkpoint') or {}
        self._log(
            f'FuseConvBNHook: loading a fused checkpoint (mmfuse '
            f'{record.get("mmfuse_version")}, {len(plan.folds)} folds, from '
            f'{source.get("filename")}); model turned into the fused '
            'structure')

    # -------------------------------------------------------------- test

    def before_test_iter(self,
                         runner,
                         batch_idx: int,
                         data_batch: Any = None) -> None:
        """Fuse the model in place before the first test iteration."""
        if not self.fuse_test:
            return
        model = unwrap_model(runner.model)
        if is_fused_structure(model):
            return
        model.eval()
        _, plan = self._fuse_everywhere(model, data_batch, 'test')
        mark_fused(model, plan)
        for ema_module in _ema_modules(runner):
            if not is_fused_structure(ema_module):
                ema_module.eval()
                with torch.no_grad():
                    apply_plan(ema_module, plan)
                mark_fused(ema_module, plan)

    # -------------------------------------------------------- validation

    def before_val_iter(self,
                        runner,
                        batch_idx: int,
                        data_batch: Any = None) -> None:
        """Swap a fused copy in for this validation."""
        if not self.fuse_val or self._val_swapped:
            return
        self._val_swapped = True
        model = unwrap_model(runner.model)
        if is_fused_structure(model):
            return
        fused = copy.deepcopy(model).eval()
        for param in fused.parameters():
            param.grad = None
        with torch.no_grad():
            if self._val_plan is None:
                report, plan = self._fuse_everywhere(fused, data_batch, 'val')
                if plan is None:
                    self._log('FuseConvBNHook: fusing for validation failed '
                              'on a rank; validating unfused', 'WARNING')
                    return
                self._val_plan = plan
            elif not self._apply_checked(fused, self._val_plan, data_batch):
                self._log(
                    'FuseConvBNHook: the fused copy is off by more than '
                    'rtol on this validation; validating unfused', 'WARNING')
                return
        mark_fused(fused, self._val_plan)
        self._val_original = runner.model
        runner.model = fused

    def after_val_epoch(self, runner, metrics: Optional[Dict] = None) -> None:
        """Put the training model back."""
        if self._val_original is not None:
            runner.model = self._val_original
        self._val_original = None
        self._val_swapped = False

    # ---------------------------------------------------------- helpers

    def _fuse_everywhere(
            self, model: nn.Module, data_batch: Any,
            stage: str) -> Tuple[Optional[FusionReport], Optional[FusionPlan]]:
        """Fuse ``model`` on rank 0, the same plan on the other ranks.

        Returns ``(report, plan)``; ``report`` is None on other ranks, both
        are None when some rank failed (after the model is restored)."""
        world_size = get_world_size()
        example = self._example_inputs(model, data_batch)
        report = None
        message = None
        if get_rank() == 0:
            try:
                report = fuse_model(model, example,
                                    verify=self.verify and example is not None,
                                    rtol=self.rtol)
            except FusionError as error:
                message = str(error)
        if world_size > 1:
            shared: List[Any] = [
                report.plan.to_dict() if report is not None else message
            ]
            broadcast_object_list(shared, src=0)
            if isinstance(shared[0], str) or shared[0] is None:
                message = shared[0] or 'fusion failed on rank 0'
            elif get_rank() != 0:
                plan = FusionPlan.from_dict(shared[0])
                if not self._apply_checked(model, plan, data_batch, example):
                    message = (f'rank {get_rank()}: the fused model is off by '
                               'more than rtol on its first batch')
            failed = torch.tensor([0 if message is None else 1])
            all_reduce(failed)
            if int(failed.item()) and message is None:
                message = 'fusion failed on another rank'
        if message is not None:
            if stage == 'val':
                return None, None
            raise FusionError(f'FuseConvBNHook: {message}')
        if report is not None:
            self.last_report = report
            self._log(f'FuseConvBNHook ({stage}): ' +
                      (str(report) if self.log_table else report.summary()))
            return report, report.plan
        return None, FusionPlan.from_dict(shared[0])

    def _apply_checked(self,
                       model: nn.Module,
                       plan: FusionPlan,
                       data_batch: Any,
                       example: Optional[Tuple] = None) -> bool:
        """Apply ``plan``; with verification, undo it and return False if
        the output on the first batch moves by more than rtol."""
        if example is None and self.use_batch:
            example = self._example_inputs(model, data_batch)
        check = self.verify and example is not None
        with torch.no_grad():
            reference = model(*example) if check else None
            applied = apply_plan(model, plan)
            if not check:
                return True
            _, relative = output_error(reference, model(*example))
        tolerance = default_rtol(model) if self.rtol is None else self.rtol
        if relative <= tolerance:
            return True
        undo_folds(applied)
        return False

    def _example_inputs(self, model: nn.Module,
                        data_batch: Any) -> Optional[Tuple]:
        if not self.use_batch or data_batch is None:
            return None
        preprocessor = getattr(model, 'data_preprocessor', None)
        with torch.no_grad():
            data = preprocessor(data_batch, False) \
                if preprocessor is not None else data_batch
        return forward_args(data)

    @staticmethod
    def _log(message: str, level: str = 'INFO') -> None:
        if get_rank() != 0:
            return
        print_log(message, logger='current', level=getattr(logging, level))


def forward_args(data: Any) -> Tuple:
    """Positional arguments of ``model(...)`` in ``'tensor'`` mode for the
    output of a data preprocessor, as ``BaseModel._run_forward`` does."""
    if isinstance(data, dict):
        if 'inputs' not in data:
            raise FusionError(
                'FuseConvBNHook: the data preprocessor returned a dict '
                f'without "inputs" (keys: {sorted(data)}); set '
                'use_batch=False to fuse from structure alone')
        return (data['inputs'], data.get('data_samples'), 'tensor')
    if isinstance(data, (list, tuple)):
        return tuple(data) + ('tensor', )
    return (data, )


def _ema_modules(runner) -> Sequence[nn.Module]:
    """The averaged models kept by the runner's ``EMAHook``s."""
    modules = []
    for hook in getattr(runner, 'hooks', []):
        ema_model = getattr(hook, 'ema_model', None)
        if isinstance(hook, EMAHook) and ema_model is not None:
            modules.append(unwrap_model(ema_model.module))
    return modules
