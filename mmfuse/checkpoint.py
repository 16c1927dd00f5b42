"""Fused checkpoints: the format, a safe loader, an atomic writer.

A fused checkpoint is laid out as an MMEngine checkpoint::

    {'state_dict': <the fused model's weights: a FusedStateDict>,
     'meta': {'dataset_meta': <carried over from the source checkpoint>,
              'mmfuse': {'format_version': 2,
                         'mmfuse_version': '0.1.0',
                         'plan': <FusionPlan.to_dict()>,
                         'reparameterized': <merged blocks>,
                         'report': <summary of the fusion>,
                         'source_checkpoint': {'filename': ..., 'sha256': ...},
                         'config': {'filename': ..., 'cfg_options': ...},
                         'created': <ISO 8601 time>}}}

Everything in it is a tensor or a plain Python value, or the
:class:`FusedStateDict` that holds the weights, so it loads with
``torch.load(weights_only=True)`` once :mod:`mmfuse` is imported (which
allows that one class).  The weights fit only a model in the fused
structure: a :class:`FusedStateDict` refuses, with a line saying how to
load it, the plain loaders that would put them into the model as built
from the config and warn of missing and unexpected keys (MMEngine's
``load_checkpoint``, mmdet's ``init_detector``, ``load_state_dict``).
``reparameterized`` names every multi-branch block merged into one conv,
the plan every norm replaced by an identity and every conv that absorbed
one: all that is needed to turn a model freshly built from the original
config into the fused structure (:func:`convert_to_fused_structure`) so
that the fused weights load with no missing or unexpected keys
(:func:`load_fused_checkpoint`).

Source checkpoints are read with :func:`load_checkpoint_safely`:
``weights_only=True`` plus an allow-list of the benign types real OpenMMLab
checkpoints carry in their ``meta`` (numpy arrays, scalars and dtypes,
MMEngine's ``HistoryBuffer``, ``Config`` and ``ConfigDict``).
"""
import datetime
import hashlib
import os
import pickle
import stat
import tempfile
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .api import FusionError, unwrap_model
from .plan import FusionPlan
from .report import FusionReport
from .surgery import apply_plan
from .version import __version__

__all__ = [
    'FORMAT_VERSION', 'META_KEY', 'CheckpointError', 'UnsafeCheckpointError',
    'FusedStateDict', 'plain_state_dict',
    'load_checkpoint_safely', 'file_sha256', 'get_state_dict', 'fused_meta',
    'make_fused_checkpoint', 'atomic_save', 'save_fused_checkpoint',
    'convert_to_fused_structure', 'is_fused_structure', 'fused_record_of',
    'mark_fused', 'fusion_record', 'rebuild_fused_structure',
    'same_structure',
    'describe_key_mismatch',
    'load_fused_checkpoint', 'plain_value'
]

#: Version of the layout: 2 keeps the weights in a :class:`FusedStateDict`
#: (1, a plain dict, is still read).
FORMAT_VERSION = 2
#: Key of the mmfuse record in a checkpoint's ``meta``.
META_KEY = 'mmfuse'
#: Attribute set on a fused model: its :func:`fusion_record`.
_FUSED_ATTR = '_mmfuse_fusion_record'


class CheckpointError(FusionError):
    """A checkpoint mmfuse cannot read, write or apply."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that needs types outside mmfuse's allow-list."""

    def __init__(self, path: str, type_names: List[str]):
        self.path = path
        self.type_names = type_names
        names = ', '.join(type_names) if type_names else 'unknown types'
        super().__init__(
            f'{path} needs unpickling {names}, which mmfuse does not load '
            'with weights_only=True; if you trust the file, pass '
            '--trust-checkpoint (Python: trust=True)')


_PLAIN_LOAD = (
    'these are the weights of a fused checkpoint (mmfuse), which fit only '
    'a model in the fused structure: load it with FuseConvBNHook in the '
    'config (custom_imports=dict(imports=[\'mmfuse\']), custom_hooks=['
    'dict(type=\'FuseConvBNHook\')], with a priority ahead of any '
    'EMAHook\'s) or mmfuse.load_fused_checkpoint(model, path), or load '
    'the unfused checkpoint')


class FusedStateDict(OrderedDict):
    """The weights of a fused checkpoint (its ``'state_dict'``).

    They fit only a model turned into the fused structure.  A loader that
    does not know that would load them into the model as built from the
    config, warn of missing and unexpected keys, and leave the norms at
    their initial values (MMEngine's ``load_checkpoint`` loads with
    ``strict=False``, and so do mmdet's ``init_detector``, mmseg's
    ``init_model`` and every inferencer).  Such loaders list the entries:
    here that raises :class:`CheckpointError` saying how to load them.
    Entries are read by key, or all at once with :meth:`tensors`.
    """

    def tensors(self) -> 'OrderedDict[str, torch.Tensor]':
        """The entries, as a plain ordered dict (with ``_metadata``)."""
        plain = OrderedDict(dict.items(self))
        metadata = self.__dict__.get('_metadata')
        if metadata is not None:
            plain._metadata = metadata
        return plain

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise CheckpointError(_PLAIN_LOAD)

    items = keys = values = __iter__ = __reversed__ = popitem = _refuse

    def copy(self) -> 'FusedStateDict':
        copied = type(self)(dict.items(self))
        copied.__dict__.update(self.__dict__)
        return copied

    def __reduce__(self) -> Tuple:
        return type(self), (list(dict.items(self)), ), \
            dict(self.__dict__) or None

    def __repr__(self) -> str:
        return f'{type(self).__name__}({len(self)} entries)'


def plain_state_dict(state_dict: Dict) -> Dict:
    """The entries of a checkpoint's ``'state_dict'``, as a dict whose
    entries may be listed (a :class:`FusedStateDict`'s :meth:`tensors`)."""
    return state_dict.tensors() if isinstance(state_dict,
                                              FusedStateDict) else state_dict


# A fused checkpoint loads with ``weights_only=True`` where mmfuse is
# imported (a config with ``custom_imports``).  (Not in the allow-list of
# :func:`load_checkpoint_safely`: its context would remove it on exit.)
_ADD_SAFE_GLOBALS = getattr(torch.serialization, 'add_safe_globals', None)
if _ADD_SAFE_GLOBALS is not None:
    _ADD_SAFE_GLOBALS([FusedStateDict])


def _history_buffer_getattr() -> Callable[[Any, str], Any]:
    """A ``getattr`` for unpickling that allows only what HistoryBuffer
    pickles: its statistics methods (``min``, ``max``, ``current``,
    ``mean``).  A plain ``getattr`` would let a file reach anything."""
    from mmengine.logging import HistoryBuffer
    allowed = ('min', 'max', 'current', 'mean')

    def restricted_getattr(obj: Any, name: str) -> Any:
        if obj is HistoryBuffer and name in allowed:
            return getattr(obj, name)
        raise pickle.UnpicklingError(
            f'getattr({getattr(obj, "__name__", type(obj).__name__)}, '
            f'{name!r}) is not allowed')

    return restricted_getattr


def _allowed_globals() -> List[Union[Any, Tuple[Any, str]]]:
    """The benign types real OpenMMLab checkpoints carry in ``meta``."""
    import numpy as np
    allowed: List[Union[Any, Tuple[Any, str]]] = [np.ndarray, np.dtype]
    # numpy 1 pickles under numpy.core, numpy 2 under numpy._core; the
    # allow-list matches by the pickled name, so register both.
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        allowed.append((multiarray._reconstruct, f'{module}._reconstruct'))
        allowed.append((multiarray.scalar, f'{module}.scalar'))
    for code in '?bBhHiIlLqQefdgFDGUSOMm':
        try:
            dtype_class = type(np.dtype(code))
        except TypeError:
            continue
        if dtype_class is not np.dtype:
            allowed.append(dtype_class)
    try:
        from mmengine.config import Config, ConfigDict
        from mmengine.logging import HistoryBuffer
    except ImportError:
        return allowed
    allowed += [HistoryBuffer, Config, ConfigDict,
                (_history_buffer_getattr(), 'builtins.getattr')]
    return allowed


def _unsafe_type_names(path: str, allowed: List) -> List[str]:
    finder = getattr(torch.serialization, 'get_unsafe_globals_in_checkpoint',
                     None)
    if finder is None:
        return []
    names = {f'{FusedStateDict.__module__}.{FusedStateDict.__qualname__}'}
    for entry in allowed:
        if isinstance(entry, tuple):
            names.add(entry[1])
        else:
            names.add(f'{entry.__module__}.{entry.__qualname__}')
    try:
        found = finder(path)
    except Exception:  # it parses arbitrary bytes: any error, no names
        return []
    return sorted(name for name in found
                  if name not in names and name != 'builtins.getattr')


def load_checkpoint_safely(path: str,
                           map_location: Any = 'cpu',
                           trust: bool = False) -> Any:
    """Load a checkpoint file without running code from it.

    Args:
        path: The checkpoint file.
        map_location: As for :func:`torch.load`.
        trust: Load with full pickle (``weights_only=False``); only for files
            whose origin you trust.

    Returns:
        What the file holds (usually a dict).

    Raises:
        UnsafeCheckpointError: The file needs a type outside the allow-list;
            the message names it.
        CheckpointError: The file is missing, unreadable or not a
            checkpoint.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint {path} does not exist')
    allowed: List = []
    try:
        if trust:
            return torch.load(path, map_location=map_location,
                              weights_only=False)
        safe_globals = getattr(torch.serialization, 'safe_globals', None)
        if safe_globals is None:  # torch < 2.5: no allow-list context
            return torch.load(path, map_location=map_location,
                              weights_only=True)
        allowed = _allowed_globals()
        with safe_globals(allowed):
            return torch.load(path, map_location=map_location,
                              weights_only=True)
    except pickle.UnpicklingError as error:
        names = [] if trust else _unsafe_type_names(path, allowed)
        if names:
            raise UnsafeCheckpointError(path, names) from None
        detail = _weights_only_detail(error)
        if not trust and ('GLOBAL' in detail or 'not allowed' in detail):
            raise UnsafeCheckpointError(path, [detail]) from None
        raise CheckpointError(
            f'{path} is not a readable checkpoint: {detail}') from None
    except Exception as error:  # arbitrary bytes make torch.load raise
        # anything (KeyError, RuntimeError, EOFError, ...)
        raise CheckpointError(f'{path} is not a readable checkpoint: '
                              f'{type(error).__name__}: '
                              f'{_first_line(error)}') from None


def _weights_only_detail(error: BaseException) -> str:
    """The informative line of torch's long weights_only error."""
    marker = 'WeightsUnpickler error:'
    text = str(error)
    if marker in text:
        for line in text.split(marker, 1)[1].splitlines():
            if line.strip():
                return _shorten(line.strip(), 300)
    lines = text.splitlines()
    for line in lines:
        if 'GLOBAL' in line:
            return _shorten(line.strip(), 300)
    return _first_line(error)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    for line in text.splitlines():
        if line.strip():
            return _shorten(line.strip())
    return type(error).__name__


def _shorten(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[:limit - 3] + '...'


def file_sha256(path: str, chunk_size: int = 1 << 20) -> str:
    """The hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, 'rb') as stream:
        for chunk in iter(lambda: stream.read(chunk_size), b''):
            digest.update(chunk)
    return digest.hexdigest()


def get_state_dict(checkpoint: Any) -> 'OrderedDict[str, torch.Tensor]':
    """The model weights of a checkpoint, ``module.`` prefixes removed.

    Accepts an MMEngine/MMCV checkpoint (``{'state_dict': ...}``), a
    ``{'model': ...}`` checkpoint or a bare state dict.
    """
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f'a checkpoint must be a dict (a state dict, or one under '
            f"'state_dict' or 'model'), not a {type(checkpoint).__name__}")
    state = checkpoint
    for key in ('state_dict', 'model'):
        if isinstance(checkpoint.get(key), dict):
            state = plain_state_dict(checkpoint[key])
            break
    odd = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if odd and len(odd) == len(state):
        raise CheckpointError('the checkpoint holds no state_dict of tensors '
                              f'(keys such as {odd[0]!r})')
    if odd:
        raise CheckpointError(
            f'state_dict entry {odd[0]!r} is not a tensor '
            f'({type(state[odd[0]]).__name__})')
    result = OrderedDict()
    for key, value in state.items():
        plain = key[len('module.'):] if key.startswith('module.') else key
        if plain in result:
            raise CheckpointError(
                f'state_dict keys {plain!r} and {"module." + plain!r} name '
                'the same weight once the module. prefix is removed')
        result[plain] = value
    metadata = getattr(state, '_metadata', None)
    if metadata is not None:
        result._metadata = OrderedDict(
            (k[len('module.'):] if k.startswith('module.') else k, v)
            for k, v in metadata.items())
    return result


def fused_meta(checkpoint: Any) -> Optional[Dict]:
    """``meta['mmfuse']`` of a fused checkpoint, or None for any other."""
    if not isinstance(checkpoint, dict):
        return None
    meta = checkpoint.get('meta')
    if not isinstance(meta, dict) or not isinstance(meta.get(META_KEY),
                                                    dict):
        return None
    record = meta[META_KEY]
    version = record.get('format_version')
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f'fused checkpoint format {version!r} is newer than this mmfuse '
            f'{__version__} reads (format {FORMAT_VERSION}); upgrade mmfuse')
    if not isinstance(record.get('plan'), dict):
        raise CheckpointError('fused checkpoint meta has no fusion plan')
    return record


#: Python's scalar types, ``bool`` before ``int`` (its base).
_PLAIN_SCALARS = (bool, int, float, str, bytes)


def plain_value(value: Any, notes: Optional[List[str]] = None,
                where: str = 'meta') -> Any:
    """``value`` with numpy types turned into plain Python ones.

    Dicts, lists, tuples, strings, numbers, None and tensors are kept; numpy
    arrays become lists and numpy scalars (``np.float64`` and ``np.str_``
    too, subclasses of ``float`` and ``str``) Python ones, as do other
    subclasses of Python's scalar types (an ``IntEnum``): a
    ``weights_only`` load refuses any class it does not know.  Dict keys
    that are none of these become their ``str``.  Anything else becomes
    its ``str`` and ``where`` is appended to ``notes``.
    """
    import numpy as np
    if value is None or type(value) in _PLAIN_SCALARS or \
            isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.generic):
        return plain_value(value.item(), notes, where)
    if isinstance(value, _PLAIN_SCALARS):  # a subclass: its plain value
        return next(kind for kind in _PLAIN_SCALARS
                    if isinstance(value, kind))(value)
    if isinstance(value, np.ndarray):
        return plain_value(value.tolist(), notes, where)
    if isinstance(value, dict):
        plain_items = {}
        for key, item in value.items():
            key = plain_value(key) if isinstance(
                key, _PLAIN_SCALARS + (np.generic, )) else str(key)
            plain_items[key] = plain_value(item, notes, f'{where}.{key}')
        return plain_items
    if isinstance(value, (list, tuple)):
        items = [plain_value(item, notes, f'{where}[{index}]')
                 for index, item in enumerate(value)]
        return tuple(items) if isinstance(value, tuple) else items
    if notes is not None:
        notes.append(f'{where} ({type(value).__name__}) stored as text')
    return str(value)


def _report_record(report: FusionReport) -> Dict:
    return {
        'mode': report.mode,
        'num_norms': report.num_norms,
        'num_foldable': report.num_foldable,
        'num_folded': len(report.folded),
        'left': [{'name': s.name, 'reason': s.reason} for s in report.left],
        'undone': [{'name': s.name, 'reason': s.reason}
                   for s in report.undone],
        'verified': report.verified,
        'max_abs_error': report.max_abs_error,
        'max_rel_error': report.max_rel_error,
        'rtol': report.rtol,
        'summary': report.summary(),
    }


def make_fused_checkpoint(model: nn.Module,
                          report: FusionReport,
                          source_checkpoint: Optional[Dict] = None,
                          source_path: Optional[str] = None,
                          source_sha256: Optional[str] = None,
                          config_path: Optional[str] = None,
                          cfg_options: Optional[Dict] = None,
                          notes: Optional[List[str]] = None) -> Dict:
    """The fused checkpoint of a model fused by :func:`mmfuse.fuse_model`.

    Args:
        model: The fused model (wrappers are unwrapped).
        report: The report :func:`mmfuse.fuse_model` returned for it.
        source_checkpoint: The checkpoint the weights came from; its
            ``meta['dataset_meta']`` (and the ``CLASSES`` and ``PALETTE``
            of older checkpoints) are carried over.
        source_path: Path of the source checkpoint (its file name is kept).
        source_sha256: sha256 of the source checkpoint file; computed from
            ``source_path`` when not given.
        config_path: The config the model was built from.
        cfg_options: ``--cfg-options`` the model was built with.
        notes: Receives a line for each meta value stored as text.

    Returns:
        ``{'state_dict': ..., 'meta': {..., 'mmfuse': {...}}}``, every
        tensor on the CPU, the weights in a :class:`FusedStateDict`.
    """
    model = unwrap_model(model)
    weights = model.state_dict()
    state_dict = FusedStateDict(
        (key, value.detach().cpu()) for key, value in weights.items())
    state_dict._metadata = weights._metadata
    meta: Dict[str, Any] = {}
    source_meta = (source_checkpoint or {}).get('meta')
    if isinstance(source_meta, dict):
        # What a model's classes and colours are read from: MMEngine's
        # dataset_meta, and mmdet 2.x / mmseg 0.x's CLASSES and PALETTE.
        for key in ('dataset_meta', 'CLASSES', 'PALETTE'):
            if key in source_meta:
                meta[key] = plain_value(source_meta[key], notes,
                                        f'meta.{key}')
    if source_sha256 is None and source_path is not None:
        source_sha256 = file_sha256(source_path)
    record = fusion_record(report)
    meta[META_KEY] = {
        'format_version': FORMAT_VERSION,
        'mmfuse_version': __version__,
        'torch_version': str(torch.__version__),
        'plan': record['plan'],
        'reparameterized': record['reparameterized'],
        'report': _report_record(report),
        'source_checkpoint': {
            'filename': os.path.basename(source_path)
            if source_path else None,
            'sha256': source_sha256,
        },
        'config': {
            'filename': os.path.basename(config_path)
            if config_path else None,
            'cfg_options': plain_value(cfg_options or {}, notes,
                                       'cfg_options'),
        },
        'created': datetime.datetime.now(
            datetime.timezone.utc).isoformat(timespec='seconds'),
    }
    return {'state_dict': state_dict, 'meta': meta}


def atomic_save(obj: Any, path: str, check_weights_only: bool = True) -> None:
    """``torch.save(obj, path)`` so that ``path`` is complete or absent.

    The data goes to a temporary file in the same folder, is flushed to
    disk and optionally read back with ``weights_only=True``, then renamed
    over ``path``.  On any failure or interruption the temporary file is
    removed and ``path`` is left as it was.

    Raises:
        CheckpointError: The folder is missing or not writable, ``path`` is
            a folder, or the data does not read back with
            ``weights_only=True``.
    """
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise CheckpointError(f'output folder {folder} does not exist')
    if os.path.isdir(path):
        raise CheckpointError(f'output {path} is a folder')
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CheckpointError(f'output folder {folder} is not writable')
    try:
        handle, temporary = tempfile.mkstemp(
            prefix=f'.{os.path.basename(path)}.', suffix='.tmp', dir=folder)
    except OSError as error:
        raise CheckpointError(
            f'cannot write in {folder}: {_first_line(error)}') from None
    renamed = False
    try:
        with os.fdopen(handle, 'wb') as stream:
            torch.save(obj, stream)
            stream.flush()
            os.fsync(stream.fileno())
        if check_weights_only:
            try:
                torch.load(temporary, map_location='cpu', weights_only=True)
            except pickle.UnpicklingError as error:
                raise CheckpointError(
                    'the checkpoint would not load with weights_only=True: '
                    f'{_weights_only_detail(error)}') from None
        # mkstemp makes the file private (0600): give it the mode of the
        # file it replaces, or the one a new file gets here (the umask's).
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            mode = 0o666 & ~_umask()
        os.chmod(temporary, mode)
        os.replace(temporary, path)
        renamed = True
    except OSError as error:
        raise CheckpointError(
            f'cannot write {path}: {_first_line(error)}') from None
    finally:
        if not renamed and os.path.exists(temporary):
            os.unlink(temporary)


def _umask() -> int:
    """The process's umask, read without changing it where Linux says
    (``/proc/self/status``); elsewhere set and put back at once."""
    try:
        with open('/proc/self/status') as status:
            lines = [line for line in status if line.startswith('Umask:')]
    except OSError:  # not Linux: ask the system call
        lines = []
    if lines:
        return int(lines[0].split()[1], 8)
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def save_fused_checkpoint(model: nn.Module, report: FusionReport, path: str,
                          **kwargs) -> Dict:
    """Make the fused checkpoint and write it atomically to ``path``.

    Keyword arguments go to :func:`make_fused_checkpoint`.

    Returns:
        The checkpoint written.
    """
    checkpoint = make_fused_checkpoint(model, report, **kwargs)
    atomic_save(checkpoint, path)
    return checkpoint


def fusion_record(report: FusionReport) -> Dict:
    """What a fusion changed in a model's structure, as plain data.

    ``{'plan': <FusionPlan.to_dict()>, 'reparameterized': [...]}``: the
    multi-branch blocks merged by :func:`mmfuse.reparam.reparameterize`
    (applied first) and the folds (applied next).
    """
    return {
        'plan': report.plan.to_dict(),
        'reparameterized': plain_value(
            [r for r in report.reparameterized if r.get('merged')],
            where='reparameterized'),
    }


#: Keys of a re-parameterization record that measure rather than describe.
_MEASURED_KEYS = ('verified_rel_error', )


def same_structure(record: Dict, other: Dict) -> bool:
    """Whether two fusion records describe the same fused structure
    (measured errors aside)."""

    def structure(entry: Dict) -> Dict:
        return {
            'plan': entry.get('plan'),
            'reparameterized': [{
                key: value
                for key, value in block.items() if key not in _MEASURED_KEYS
            } for block in entry.get('reparameterized', [])]
        }

    return structure(record) == structure(other)


def fused_record_of(model: nn.Module) -> Optional[Dict]:
    """The :func:`fusion_record` a model was marked with, or None."""
    return getattr(unwrap_model(model), _FUSED_ATTR, None)


def is_fused_structure(model: nn.Module) -> bool:
    """Whether ``model`` was fused or converted to a fused structure by
    mmfuse's checkpoint loading or :class:`mmfuse.hook.FuseConvBNHook`."""
    return fused_record_of(model) is not None


def mark_fused(model: nn.Module, record: Dict) -> None:
    """Remember on ``model`` that the fusion ``record`` describes is done."""
    object.__setattr__(unwrap_model(model), _FUSED_ATTR, record)


def rebuild_fused_structure(model: nn.Module, record: Dict) -> None:
    """Give ``model`` the structure described by a :func:`fusion_record`:
    merged blocks first, then the folds.  Values are placeholders until a
    fused state dict is loaded.  Marks the model fused.

    Raises:
        CheckpointError: The record does not fit the model.
    """
    from .reparam import apply_reparam_structure
    model = unwrap_model(model)
    if is_fused_structure(model):
        raise CheckpointError('the model is already fused')
    plan = FusionPlan.from_dict(record['plan'])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            apply_reparam_structure(model, record.get('reparameterized', []))
            apply_plan(model, plan)
    except (AttributeError, KeyError, RuntimeError, ValueError,
            FusionError) as error:
        raise CheckpointError(
            'the fusion record does not fit this model (was it made from '
            f'another config?): {_first_line(error)}') from None
    finally:
        model.train(was_training)
    mark_fused(model, {
        'plan': record['plan'],
        'reparameterized': record.get('reparameterized', [])
    })


def convert_to_fused_structure(model: nn.Module,
                               checkpoint_or_record: Dict) -> Dict:
    """Turn a freshly built, unfused model into the fused structure.

    Multi-branch blocks that were merged become the merged conv; norms that
    were folded become ``nn.Identity``; the convs that absorbed them get a
    bias (and their own copy where a conv was shared), so that the fused
    ``state_dict`` loads with no missing or unexpected keys.  The weights
    are placeholders; load the checkpoint next.

    Args:
        model: Built from the config the fused checkpoint was made from.
        checkpoint_or_record: A fused checkpoint or its ``meta['mmfuse']``.

    Returns:
        The fusion record applied (``plan`` and ``reparameterized``).

    Raises:
        CheckpointError: Not a fused checkpoint, the model is already
            converted, or the record does not fit the model.
    """
    record = fused_meta(checkpoint_or_record)
    if record is None and isinstance(checkpoint_or_record, dict) and \
            isinstance(checkpoint_or_record.get('plan'), dict):
        record = checkpoint_or_record
    if record is None:
        raise CheckpointError('not a fused checkpoint (no meta.mmfuse)')
    if record is not checkpoint_or_record and any(
            block.get('structure') == 'graph'
            for block in record.get('reparameterized', [])):
        # A merged block rebuilt as a graph is traced again: its forward
        # reads the values it held when fused (a flag kept in a buffer).
        # (Given only its meta, the structure is rebuilt from the fresh
        # values: a graph they trace otherwise is refused.)
        weights = _weights_if_any(checkpoint_or_record)
        if weights is not None:
            _load_what_fits(unwrap_model(model), weights)
    rebuild_fused_structure(model, record)
    return fused_record_of(model)


def _weights_if_any(checkpoint: Dict) -> Optional[Dict]:
    """The state dict of ``checkpoint``, or ``None`` where it holds none
    (its ``meta`` alone)."""
    try:
        return get_state_dict(checkpoint)
    except CheckpointError:
        return None


def _load_what_fits(model: nn.Module, state_dict: Dict) -> None:
    """Load the entries of ``state_dict`` that ``model`` has, of the same
    shape (the rest waits for the model's fused structure)."""
    own = model.state_dict()
    model.load_state_dict(
        {
            key: value
            for key, value in state_dict.items()
            if key in own and own[key].shape == value.shape
        },
        strict=False)


def load_fused_checkpoint(model: nn.Module,
                          checkpoint: Union[str, Dict],
                          map_location: Any = 'cpu',
                          strict: bool = True) -> Dict:
    """Load a fused checkpoint into a model built from the original config.

    Converts ``model`` to the fused structure, then loads the weights.  The
    model is left in eval mode.

    Args:
        model: Freshly built from the config (and ``cfg_options``) the fused
            checkpoint was made from; wrappers are unwrapped.
        checkpoint: The fused checkpoint or the path of its file (loaded
            with :func:`load_checkpoint_safely`).
        map_location: As for :func:`torch.load`.
        strict: Refuse missing or unexpected keys.

    Returns:
        The checkpoint's ``meta``.
    """
    if isinstance(checkpoint, str):
        checkpoint = load_checkpoint_safely(checkpoint, map_location)
    model = unwrap_model(model)
    convert_to_fused_structure(model, checkpoint)
    state_dict = get_state_dict(checkpoint)
    result = model.load_state_dict(state_dict, strict=False)
    if strict and (result.missing_keys or result.unexpected_keys):
        raise CheckpointError(
            'fused checkpoint does not match the model: ' +
            describe_key_mismatch(result.missing_keys,
                                  result.unexpected_keys))
    model.eval()
    return checkpoint.get('meta', {})


def describe_key_mismatch(missing: List[str], unexpected: List[str],
                          limit: int = 5) -> str:
    """One line naming the first missing and unexpected keys."""

    def listed(keys: List[str]) -> str:
        shown = ', '.join(keys[:limit])
        more = f' and {len(keys) - limit} more' if len(keys) > limit else ''
        return f'{shown}{more}'

    parts = []
    if missing:
        parts.append(f'{len(missing)} missing keys ({listed(missing)})')
    if unexpected:
        parts.append(
            f'{len(unexpected)} unexpected keys ({listed(unexpected)})')
    return '; '.join(parts) if parts else 'no key mismatch'
