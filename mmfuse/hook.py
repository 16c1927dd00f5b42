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
from mmengine.dist import (all_gather_object, all_reduce, broadcast,
                           broadcast_object_list, get_rank, get_world_size)
from mmengine.hooks import EMAHook, Hook
from mmengine.logging import print_log
from mmengine.model import BaseTTAModel
from mmengine.registry import HOOKS
from torch import nn

from .api import FusionError, fuse_model, unwrap_model
from .checkpoint import (convert_to_fused_structure, fused_meta,
                         fused_record_of, fusion_record, is_fused_structure,
                         mark_fused, plain_state_dict,
                         rebuild_fused_structure, same_structure)
from .discovery.fx_tracer import MODULE_INTERNALS
from .guards import fresh_inputs, is_wrapper
from .module_walk import walk_modules
from .report import FusionReport
from .verify import default_rtol, output_error

__all__ = ['FuseConvBNHook', 'forward_args']

_BOOL_OPTIONS = ('fuse_test', 'fuse_val', 'use_batch', 'verify', 'log_table',
                 'reparameterize')


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
      ``EMAHook``, the averaged copy it keeps is fused the same way, so its
      swap back after the test stays consistent.  A test-time augmentation
      model (``tools/test.py --tta``) is unwrapped as MMEngine's loader
      unwraps it, and the first augmentation of the batch is the example.
    * **Validation** (``fuse_val``, off by default): each validation runs
      on a fused deep copy of the model (fused on that validation's first
      batch), so training weights, optimizer state, batch norm running
      statistics and ``EMAHook`` weights are untouched.  If fusing the copy
      fails, that validation runs unfused, with a warning.  Where the
      model's settings changed at the first batch of another pass over
      the data (mmdet's ``TeacherStudentValLoop``), a new copy is fused.
    * **Fused checkpoints**: when the runner loads a checkpoint whose
      ``meta`` has an ``'mmfuse'`` record (written by
      ``tools/fuse_conv_bn.py``), the freshly built model, and the copy an
      ``EMAHook`` keeps, are first turned into the fused structure, so the
      weights load with no missing or unexpected keys; the test then runs
      the model as loaded.  This happens in ``after_load_checkpoint``, which
      MMEngine calls before it loads the weights; the hook's priority
      (``'ABOVE_NORMAL'``) puts it before ``EMAHook``.  A training run
      that loads one fails before its first iteration.
    * **Distributed**: every rank starts from rank 0's weights (the ones a
      checkpoint saves; batch norm statistics can differ across ranks in
      training); rank 0 fuses with its first batch and broadcasts what it
      changed; every other rank rebuilds exactly that structure, receives
      rank 0's fused tensors and checks the result on its own first batch,
      so every rank runs the same fused model.  A failure on
      any rank fails on every rank (for validation: unfused, with a
      warning).

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
        reparameterize: First merge multi-branch blocks (RepVGG-style)
            into single convs; ``False`` only folds norms.

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
                 log_table: bool = True,
                 reparameterize: bool = True):
        options = dict(fuse_test=fuse_test, fuse_val=fuse_val,
                       use_batch=use_batch, verify=verify,
                       log_table=log_table, reparameterize=reparameterize)
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
        self.reparameterize = reparameterize
        self.last_report: Optional[FusionReport] = None
        self._val_original: Optional[nn.Module] = None
        self._val_swapped = False
        self._val_settings: List = []

    # ----------------------------------------------------------- loading

    def after_load_checkpoint(self, runner, checkpoint: Dict) -> None:
        """Turn the model into the fused structure before a fused
        checkpoint's weights load into it."""
        record = fused_meta(checkpoint)
        if record is None:
            return
        if getattr(runner, '_resume', False):
            # (What ``EMAHook`` reads too; resuming would fail later, on
            # the training state a fused checkpoint does not keep.)
            raise FusionError(
                'FuseConvBNHook: cannot resume training from a fused '
                'checkpoint (its norms are folded away); resume from an '
                'unfused one')
        model = unwrap_model(runner.model)
        if is_fused_structure(model):
            if not same_structure(fused_record_of(model), record):
                raise FusionError(
                    'FuseConvBNHook: the model is already fused, with another '
                    'structure than the checkpoint being loaded')
            self._let_load(checkpoint)
            return
        convert_to_fused_structure(model, checkpoint)
        self._let_load(checkpoint)
        for ema_module in _ema_modules(runner):
            if not is_fused_structure(ema_module):
                convert_to_fused_structure(ema_module, checkpoint)
        source = record.get('source_checkpoint') or {}
        self._log(
            f'FuseConvBNHook: loading a fused checkpoint (mmfuse '
            f'{record.get("mmfuse_version")}, '
            f'{len(record["plan"].get("folds", []))} folds, '
            f'{len(record.get("reparameterized", []))} merged blocks, from '
            f'{source.get("filename")}); model turned into the fused '
            'structure')

    def before_train(self, runner) -> None:
        """Refuse to train a model in the fused structure (a fused
        checkpoint given as ``load_from`` or resumed): its norms are gone,
        and the optimizer, built before the checkpoint loaded, holds the
        parameters the model had before."""
        if is_fused_structure(unwrap_model(runner.model)):
            raise FusionError(
                'FuseConvBNHook: the model was loaded from a fused '
                'checkpoint, which cannot be trained (its norms are folded '
                'away); train from the unfused checkpoint')

    @staticmethod
    def _let_load(checkpoint: Dict) -> None:
        """Hand the loader that comes next (MMEngine's, and ``EMAHook``'s
        copy) the fused weights as a plain dict: a
        :class:`~mmfuse.checkpoint.FusedStateDict` refuses plain loaders,
        and the model now has the structure they fit."""
        if 'state_dict' in checkpoint:
            checkpoint['state_dict'] = plain_state_dict(
                checkpoint['state_dict'])

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
        if data_batch is not None and _augments_at_test(runner.model):
            data_batch = _first_augmentation(data_batch)
        example = self._example_inputs(model, data_batch)
        record = self._fuse_everywhere(model, example, 'test')
        if record is None:
            raise FusionError('FuseConvBNHook: fusing for test failed')
        for ema_module in _ema_modules(runner):
            self._fuse_ema_module(ema_module, example, record)

    def _fuse_ema_module(self, module: nn.Module, example: Optional[Tuple],
                         record: Dict) -> None:
        """Fuse the averaged copy an ``EMAHook`` keeps (it holds the source
        weights while the model tests with the averaged ones) the same way,
        so that ``EMAHook`` swapping them back stays consistent."""
        if is_fused_structure(module):
            return
        module.eval()
        with torch.no_grad():
            report = fuse_model(module, example,
                                verify=self.verify and example is not None,
                                rtol=self.rtol,
                                reparameterize=self.reparameterize)
        mine = fusion_record(report)
        if not same_structure(mine, record):
            raise FusionError(
                'FuseConvBNHook: the EMAHook copy of the model fuses '
                'differently from the model; set use_batch=False or drop '
                'EMAHook at test time')
        mark_fused(module, mine)

    # -------------------------------------------------------- validation

    def before_val_iter(self,
                        runner,
                        batch_idx: int,
                        data_batch: Any = None) -> None:
        """Swap a fused copy in for this validation; at the first batch of
        another pass over the data, make a new one if the model's settings
        changed since (mmdet's ``TeacherStudentValLoop`` switches
        ``semi_test_cfg['predict_on']`` between its passes, on the model
        it holds, which the copy would not see; comparing them takes a few
        milliseconds, so not at every batch)."""
        if not self.fuse_val:
            return
        if self._val_swapped:
            if batch_idx or self._val_original is None or not _on_any_rank(
                    _settings(unwrap_model(self._val_original)) !=
                    self._val_settings):
                return
            runner.model = self._val_original
            self._val_original = None
        self._val_swapped = True
        model = unwrap_model(runner.model)
        if is_fused_structure(model):
            return
        self._val_settings = _settings(model)
        fused = copy.deepcopy(model).eval()
        for param in fused.parameters():
            param.grad = None
        example = self._example_inputs(fused, data_batch)
        if self._fuse_everywhere(fused, example, 'val') is None:
            return
        self._val_original = runner.model
        runner.model = fused

    def after_val_epoch(self, runner, metrics: Optional[Dict] = None) -> None:
        """Put the training model back."""
        if self._val_original is not None:
            runner.model = self._val_original
        self._val_original = None
        self._val_swapped = False

    # ---------------------------------------------------------- helpers

    def _fuse_everywhere(self, model: nn.Module, example: Optional[Tuple],
                         stage: str) -> Optional[Dict]:
        """Fuse ``model`` on rank 0 and make every other rank's model the
        same: rank 0's fusion record is broadcast, the other ranks rebuild
        that structure and receive rank 0's fused tensors, then each rank
        checks the result on its own first batch.

        Returns:
            The fusion record, or None when fusing failed on some rank and
            ``stage`` is ``'val'`` (for ``'test'`` that raises).
        """
        verify = self.verify and example is not None
        world_size = get_world_size()
        rank = get_rank()
        record = None
        message = None
        reference = None
        if world_size > 1:
            # Start from rank 0's weights everywhere (the ones a checkpoint
            # saves): batch norm statistics may differ across ranks while
            # training with broadcast_buffers=False.
            message = _first_failure(None, _same_everywhere(model))
            if message is not None:
                return self._failed(message, stage)
            _broadcast_tensors(model)
        if rank == 0:
            try:
                with torch.no_grad():
                    report = fuse_model(model, example, verify=verify,
                                        rtol=self.rtol,
                                        reparameterize=self.reparameterize)
                record = fusion_record(report)
                self.last_report = report
                self._log(f'FuseConvBNHook ({stage}): ' +
                          (str(report) if self.log_table else
                           report.summary()))
            except FusionError as error:
                message = str(error)
            except Exception as error:  # noqa: B902
                if world_size == 1 and stage == 'test':
                    raise
                # A validation falls back to the unfused model; and any
                # failure must reach the other ranks, or they would wait
                # for rank 0 forever.
                message = f'rank 0: {type(error).__name__}: {error}'
        if world_size > 1:
            shared: List[Any] = [record if message is None else message]
            broadcast_object_list(shared, src=0)
            if isinstance(shared[0], str):
                message = shared[0]
            elif rank != 0:
                record = shared[0]
                try:
                    with torch.no_grad():
                        if verify:
                            reference = model(*fresh_inputs(example))
                    rebuild_fused_structure(model, record)
                except Exception as error:  # noqa: B902 (as on rank 0)
                    message = f'rank {rank}: {type(error).__name__}: {error}'
            message = _first_failure(message, _same_everywhere(model))
            if message is None:
                _broadcast_tensors(model)
                if rank != 0 and verify:
                    with torch.no_grad():
                        _, relative = output_error(
                            reference, model(*fresh_inputs(example)))
                    tolerance = default_rtol(model) if self.rtol is None \
                        else self.rtol
                    if not relative <= tolerance:
                        message = (f'rank {rank}: the fused model is off by '
                                   f'{relative:.3g} > rtol {tolerance:g} on '
                                   'its first batch')
                message = _first_failure(message, None)
        if message is not None:
            return self._failed(message, stage)
        mark_fused(model, record)
        return record

    def _failed(self, message: str, stage: str) -> None:
        """Raise for a test; warn (and return None) for a validation."""
        if stage == 'val':
            self._log(f'FuseConvBNHook: {message}; validating the unfused '
                      'model', 'WARNING')
            return None
        raise FusionError(f'FuseConvBNHook: {message}')

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


#: Values a setting is compared by.
_PLAIN_SETTINGS = (bool, int, str, bytes, type(None), torch.dtype,
                   torch.device)


def _settings(model: nn.Module, depth: int = 3) -> List:
    """What the forward of ``model`` may branch on besides its tensors and
    modules, to tell whether it changed: each module's attributes (its
    tables and torch's own aside) as plain values, down through
    containers and plain objects' attributes ``depth`` levels; other
    values (a tensor, a function) by identity."""

    def plain(value: Any, level: int) -> Any:
        if isinstance(value, _PLAIN_SETTINGS):
            return value
        if isinstance(value, float):
            return repr(value)  # (NaN equals itself so)
        if level >= depth or isinstance(value, (torch.Tensor, nn.Module)):
            return type(value), id(value)
        if isinstance(value, dict):
            return type(value), [(plain(key, level + 1),
                                  plain(item, level + 1))
                                 for key, item in value.items()]
        if isinstance(value, (set, frozenset)):
            # (Compared whole where every item is plain: sets are not
            # ordered.)
            return (type(value), frozenset(value)) if all(
                isinstance(item, _PLAIN_SETTINGS) for item in value) \
                else (type(value), id(value))
        if isinstance(value, (list, tuple)):
            return type(value), [plain(item, level + 1) for item in value]
        if type(value).__dictoffset__ and not callable(value):
            # (Past a class's own ``__getattr__``.)
            state = object.__getattribute__(value, '__dict__')
            return type(value), id(value), plain(state, level + 1)
        return type(value), id(value)

    return [(path, [(name, plain(value, 0))
                    for name, value in module.__dict__.items()
                    if name not in MODULE_INTERNALS])
            for path, module in walk_modules(model)]


def _on_any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank (every rank gets the answer, and
    so takes the same way into the collective calls that follow)."""
    if get_world_size() == 1:
        return flag
    count = torch.tensor([int(flag)])
    all_reduce(count)
    return bool(count.item())


def _first_failure(message: Optional[str],
                   extra: Optional[str]) -> Optional[str]:
    """Agree across ranks on whether something failed: every rank gets a
    message when any rank has one."""
    message = message or extra
    if _on_any_rank(message is not None) and message is None:
        message = 'fusion failed on another rank'
    return message


def _same_everywhere(model: nn.Module) -> Optional[str]:
    """None when every rank's model has the same state dict layout."""
    layout = [(key, tuple(value.shape), str(value.dtype))
              for key, value in model.state_dict().items()]
    layouts = all_gather_object(layout)
    if any(other != layouts[0] for other in layouts):
        return (f'rank {get_rank()}: the fused models differ in structure '
                'across ranks')
    return None


def _broadcast_tensors(model: nn.Module) -> None:
    """Give every rank rank 0's floating point parameters and buffers."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                broadcast(tensor, src=0)


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


def _augments_at_test(model: nn.Module) -> bool:
    """Whether ``model`` is, or wraps, an MMEngine test-time augmentation
    model (``tools/test.py --tta``), whose batches hold each augmentation
    of every sample."""
    while True:
        if isinstance(model, BaseTTAModel):
            return True
        if not is_wrapper(model):
            return False
        model = model.module


def _first_augmentation(data_batch: Any) -> Any:
    """The batch of the first augmentation in a test-time augmentation
    batch, split as ``BaseTTAModel.test_step`` splits it: each value of a
    dict, or each item of a list, holds one entry per augmentation."""
    if isinstance(data_batch, dict):
        return {key: value[0] for key, value in data_batch.items()}
    if isinstance(data_batch, (list, tuple)):
        return [item[0] for item in data_batch]
    raise FusionError('FuseConvBNHook: a test-time augmentation batch is a '
                      f'dict or a list, not {type(data_batch).__name__}')


def _ema_modules(runner) -> Sequence[nn.Module]:
    """The averaged models kept by the runner's ``EMAHook``s."""
    modules = []
    for hook in getattr(runner, 'hooks', []):
        ema_model = getattr(hook, 'ema_model', None)
        if isinstance(hook, EMAHook) and ema_model is not None:
            modules.append(unwrap_model(ema_model.module))
    return modules
