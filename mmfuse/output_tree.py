"""The tensors in a model's inputs and outputs, whatever holds them.

``torch.utils._pytree`` walks tuples, lists and dicts, and takes anything
else as one opaque leaf: the tensors inside a dataclass, a dict subclass,
a plain object or MMEngine's ``BaseDataElement`` (what mmdet, mmseg and
mmpretrain return in ``predict`` mode) would be neither seen as used by
the model's output nor compared.  Here such objects are walked too: the
fields of a dataclass, the items of any mapping, and the attributes
(``__dict__`` and slots) of those and of any other object; looking for
tensors, also the items of a set or deque, a partial's arguments and the
slots of a value object.
Modules, classes, functions and Python modules are not walked (a module
passed along is a layer, not data).
"""
import dataclasses
import functools
import types
from collections import deque
from collections.abc import Mapping
from typing import Any, Hashable, Iterable, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ['tensors_in', 'flatten_output', 'FlatOutput', 'UncomparableOutput']

#: Values that hold no tensor and are compared by equality.
_CONSTANTS = (type(None), bool, int, str, bytes, complex, torch.dtype,
              torch.device, torch.layout, torch.memory_format, type(...),
              slice, range)
#: Objects that are not data: never walked.
_NOT_DATA = (nn.Module, type, types.FunctionType, types.MethodType,
             types.BuiltinFunctionType, types.ModuleType)


def _items(item: Any) -> Optional[Iterable[Tuple[Hashable, Any]]]:
    """``(key, value)`` of what ``item`` holds, or ``None`` for a value
    with nothing to walk (a constant, a tensor, something not data).

    The items of a list, tuple or mapping, then the attributes of a
    subclass of one (``('attribute', name)``); the fields of a
    dataclass, then its other attributes; the attributes of any other
    object that has a ``__dict__``.  Attributes are those of
    ``__dict__``, then the slots set.
    """
    if isinstance(item, (list, tuple, Mapping)):
        entries = list(item.items() if isinstance(item, Mapping) else
                       enumerate(item))
        if type(item) not in (list, tuple, dict):
            entries.extend((('attribute', name), value)
                           for name, value in _attributes(item) or ())
        return entries
    if isinstance(item, _NOT_DATA) or isinstance(item, _CONSTANTS):
        return None
    if dataclasses.is_dataclass(item):
        names = [f.name for f in dataclasses.fields(item)]
        entries = [(name, getattr(item, name, None)) for name in names]
        entries.extend((name, value)
                       for name, value in _attributes(item) or ()
                       if name not in names)
        return entries
    if not isinstance(getattr(item, '__dict__', None), dict):
        return None  # (slots alone: a value object, or not readable)
    return _attributes(item)


def _attributes(item: Any) -> Optional[List[Tuple[str, Any]]]:
    """The attributes of ``item``: those of its ``__dict__``, then its
    slots that are set; ``None`` where it has neither."""
    state = getattr(item, '__dict__', None)
    found = list(state.items()) if isinstance(state, dict) else None
    for cls in type(item).__mro__:
        slots = cls.__dict__.get('__slots__', ())
        for name in (slots, ) if isinstance(slots, str) else slots:
            if name in ('__dict__', '__weakref__') or \
                    (found is not None and name in state):
                continue
            try:
                value = getattr(item, name)
            except AttributeError:
                continue  # a slot not set
            found = [] if found is None else found
            found.append((name, value))
    return found


def tensors_in(tree: Any) -> List[Tensor]:
    """Every tensor in ``tree``, depth first in order (each container or
    object once)."""
    if isinstance(tree, Tensor):
        return [tree]
    found: List[Tensor] = []
    seen = set()
    pending = [tree]
    while pending:
        item = pending.pop()
        if isinstance(item, Tensor):
            found.append(item)
            continue
        if isinstance(item, (float, _CONSTANTS)) or id(item) in seen:
            continue
        seen.add(id(item))
        items = _items(item)
        if items is not None:
            pending.extend(reversed([value for _, value in items]))
        else:
            pending.extend(reversed(_other_contents(item)))
    return found


def _other_contents(item: Any) -> List[Any]:
    """What a holder :func:`_items` does not walk holds, for finding the
    tensors in it (not for comparing: a set has no order): the items of a
    set or deque, a partial's arguments, the slots of an object without
    ``__dict__``."""
    if isinstance(item, (set, frozenset, deque)):
        return list(item)
    if isinstance(item, functools.partial):
        return [*item.args, *item.keywords.values()]
    if isinstance(item, _NOT_DATA) or isinstance(item, _CONSTANTS):
        return []
    found = []
    for cls in type(item).__mro__:
        slots = cls.__dict__.get('__slots__', ())
        for name in (slots, ) if isinstance(slots, str) else slots:
            value = getattr(item, name, None)
            if value is not None:
                found.append(value)
    return found


class UncomparableOutput(TypeError):
    """An output holds an object whose contents cannot be read."""


@dataclasses.dataclass
class FlatOutput:
    """An output as its leaves (tensors; floats and numpy arrays as
    tensors) in order, and a ``spec`` of everything else: container types
    and keys, and the constants (integers, strings, ``None``), which two
    outputs must share to be compared."""
    leaves: List[Tensor]
    spec: Tuple


def flatten_output(output: Any, clone: bool = False) -> FlatOutput:
    """Flatten ``output`` (a :class:`FlatOutput` is returned as it is).

    Args:
        output: A model's output.
        clone: Copy the tensors, so that a model that writes into the
            tensors it returned (a buffer it returns) cannot change them.

    Raises:
        UncomparableOutput: ``output`` holds an object that is neither a
            tensor, a number, a string, a container, a dataclass, an
            object with attributes nor a hashable value that compares by
            equality (a path, a date): one with ``__slots__`` only and no
            ``__eq__``, say.
    """
    if isinstance(output, FlatOutput):
        return output
    leaves: List[Tensor] = []
    spec: List[Hashable] = []
    on_path: set = set()

    def walk(item: Any) -> None:
        if isinstance(item, Tensor):
            leaf = item.detach()
            if leaf.is_nested or leaf.layout not in (torch.strided,
                                                     torch.sparse_coo):
                raise UncomparableOutput(
                    'the output holds a tensor of layout '
                    f'{"nested" if leaf.is_nested else leaf.layout}, '
                    'which is not compared')
            if leaf.layout == torch.sparse_coo:
                leaf = leaf.to_dense()  # (a new tensor: clone or not)
            elif clone:
                leaf = leaf.clone()
            leaves.append(leaf)
            spec.append('tensor')
        elif isinstance(item, float):
            leaves.append(torch.tensor(item, dtype=torch.float64))
            spec.append('float')
        elif isinstance(item, (np.ndarray, np.generic)) and \
                item.dtype.kind in 'biufc':
            leaves.append(torch.from_numpy(np.array(item)))
            spec.append('array')
        elif isinstance(item, np.ndarray):  # strings, objects
            spec.append(('array', item.dtype.str, item.shape,
                         _hashable(item.tolist(), type(item))))
        elif isinstance(item, (np.generic, ) + _CONSTANTS):
            spec.append(('constant', item))
        elif isinstance(item, (set, frozenset)):
            spec.append(('set', frozenset(item)))
        elif isinstance(item, _NOT_DATA):
            spec.append(('object', id(item)))
        else:
            items = _items(item)
            if items is None:
                if type(item).__eq__ is object.__eq__:  # identity only
                    raise UncomparableOutput(
                        f'the output holds a {type(item).__name__}, whose '
                        'contents cannot be read')
                # A value object (a path, a date): compared by equality.
                spec.append(('value', _hashable(item, type(item))))
                return
            if id(item) in on_path:
                spec.append(('cycle', type(item).__name__))
                return
            on_path.add(id(item))
            items = list(items)
            spec.append((type(item).__name__, len(items)))
            for key, value in items:
                if tensors_in(key):
                    raise UncomparableOutput(
                        f'the output holds a {type(item).__name__} keyed '
                        'by tensors, which are not compared')
                spec.append(('key', key if isinstance(key, Hashable)
                             else repr(key)))
                walk(value)
            on_path.discard(id(item))

    walk(output)
    return FlatOutput(leaves, tuple(spec))


def _hashable(value: Any, kind: type) -> Hashable:
    """``value`` (or, for a list, a tuple of it, nested) as a key of a
    spec.

    Raises:
        UncomparableOutput: It cannot be compared by equality.
    """
    if isinstance(value, list):
        return tuple(_hashable(item, kind) for item in value)
    if tensors_in(value):
        raise UncomparableOutput(
            f'the output holds a {kind.__name__} holding tensors, which '
            'are not compared')
    try:
        hash(value)
    except TypeError:
        raise UncomparableOutput(
            f'the output holds a {kind.__name__}, whose contents cannot be '
            'read') from None
    return value
