"""Walking a model's module tree, faster than ``nn.Module.named_modules``.

``named_modules`` is a recursive generator: each module is handed up
through every level above it, which costs 20 ms on HRNet (1,300 modules,
depth up to 8) when done a few times per fusion.  This walk gives the same
modules in the same order, with one loop.
"""
import threading
from contextlib import contextmanager
from typing import (Any, Dict, Hashable, Iterator, List, NamedTuple,
                    Optional, Tuple)

from torch import nn

__all__ = [
    'walk_modules', 'tree_unchanged', 'unchanged_memo', 'classes_unchanged',
    'class_memo', 'has_children', 'find_submodule', 'unique_modules',
    'SubtreeIndex', 'subtree_span'
]

_MEMO = threading.local()


def has_children(module: nn.Module) -> bool:
    """``next(module.children(), None) is not None``, without a
    generator."""
    return any(child is not None for child in module._modules.values())


def unique_modules(model: nn.Module) -> Iterator[nn.Module]:
    """Every module of the tree once (``model`` first), in no promised
    order and without paths: the cheapest walk, for a question about
    each module."""
    seen = {id(model)}
    stack = [model]
    while stack:
        module = stack.pop()
        yield module
        for child in module._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                stack.append(child)


def find_submodule(root: nn.Module, path: str) -> nn.Module:
    """The module registered at dotted ``path`` below ``root`` (``root``
    for ``''``): ``root.get_submodule(path)`` by the registered names
    alone, without its checks at every step.

    Raises:
        AttributeError: Nothing is registered at ``path``.
    """
    module = root
    if path:
        for name in path.split('.'):
            child = module._modules.get(name)
            if child is None:
                raise AttributeError(f'{type(module).__name__} has no '
                                     f'submodule {name!r} (in {path!r})')
            module = child
    return module


@contextmanager
def _memo_scope(name: str) -> Iterator[None]:
    """Within, this thread's memo ``name`` is kept (the outermost scope
    makes it, and drops it at its end)."""
    previous = getattr(_MEMO, name, None)
    setattr(_MEMO, name, {} if previous is None else previous)
    try:
        yield
    finally:
        setattr(_MEMO, name, previous)


@contextmanager
def tree_unchanged() -> Iterator[None]:
    """Within, each walk of one root is made once (per thread): for code
    that changes no module tree, such as discovery, which walks the model
    from several places.  Other answers about modules that hold as long
    as no module changes may be kept there too (:func:`unchanged_memo`).
    """
    with _memo_scope('walks'):
        yield


def unchanged_memo(kind: str) -> Optional[Dict[Hashable, Any]]:
    """A dict for answers of ``kind`` kept for as long as the outermost
    :func:`tree_unchanged` of this thread lasts; ``None`` outside one."""
    walks = getattr(_MEMO, 'walks', None)
    if walks is None:
        return None
    return walks.setdefault(('memo', kind), {})


@contextmanager
def classes_unchanged() -> Iterator[None]:
    """Within, answers about classes that hold as long as no class changes
    are kept (per thread, :func:`class_memo`): for code that changes
    modules but no class, such as a merge walk, which replaces modules
    (so :func:`tree_unchanged` does not apply) and reads the code of the
    classes above each block it merges."""
    with _memo_scope('classes'):
        yield


def class_memo(kind: str) -> Optional[Dict[Hashable, Any]]:
    """A dict for answers of ``kind`` about classes, kept for as long as
    the outermost :func:`tree_unchanged` or :func:`classes_unchanged` of
    this thread lasts (no class changes in either); ``None`` outside
    both."""
    memo = unchanged_memo(kind)
    if memo is not None:
        return memo
    classes = getattr(_MEMO, 'classes', None)
    if classes is None:
        return None
    return classes.setdefault(kind, {})


def walk_modules(model: nn.Module,
                 remove_duplicate: bool = True
                 ) -> List[Tuple[str, nn.Module]]:
    """``list(model.named_modules(remove_duplicate=...))``, faster.

    Args:
        model: The root module.
        remove_duplicate: Give a module registered under several names only
            at its first path (in pre-order), and skip what lies below its
            other paths, as ``named_modules`` does.

    Returns:
        ``(dotted path, module)`` in pre-order, children in registration
        order; the root has path ``''``.
    """
    memo: Dict[Hashable, Tuple[nn.Module, List]] = getattr(
        _MEMO, 'walks', None)
    if memo is not None:
        known = memo.get((id(model), remove_duplicate))
        if known is not None and known[0] is model:
            return list(known[1])
        if remove_duplicate:
            # The first time each module comes in the walk with every
            # path: a module's other paths come after its first, and so
            # do the paths below them, which ``named_modules`` skips.
            found = []
            seen = set()
            for path, module in walk_modules(model, remove_duplicate=False):
                if id(module) not in seen:
                    seen.add(id(module))
                    found.append((path, module))
            memo[(id(model), True)] = (model, found)
            return list(found)
    found: List[Tuple[str, nn.Module]] = []
    seen = set()
    stack = [('', model)]
    while stack:
        path, module = stack.pop()
        if remove_duplicate:
            if id(module) in seen:
                continue
            seen.add(id(module))
        found.append((path, module))
        children = module._modules
        if not children:
            continue
        prefix = f'{path}.' if path else ''
        stack.extend((prefix + name, child)
                     for name, child in reversed(children.items())
                     if child is not None)
    if memo is not None:
        memo[(id(model), remove_duplicate)] = (model, found)
        return list(found)
    return found


class SubtreeIndex(NamedTuple):
    """A walk of a module tree by every path (``remove_duplicate=False``),
    indexed: where each module's subtree lies in it, and where the modules
    of each name (the last part of their paths) and of each class are.

    Attributes:
        modules: The modules in pre-order, once per path.
        ends: For each position, where its module's subtree ends (the
            subtree is ``modules[position:end]``, the module first).
        by_name: For each name, the positions, ascending.
        by_class: For each class, the positions, ascending.
    """
    modules: List[nn.Module]
    ends: List[int]
    by_name: Dict[str, List[int]]
    by_class: Dict[type, List[int]]


def _index_walk(root: nn.Module) -> SubtreeIndex:
    """The :class:`SubtreeIndex` of the tree under ``root``."""
    walk = walk_modules(root, remove_duplicate=False)
    ends = [len(walk)] * len(walk)
    by_name: Dict[str, List[int]] = {}
    by_class: Dict[type, List[int]] = {}
    # ``(depth, position)`` of the modules whose subtree has not ended.
    unended: List[Tuple[int, int]] = []
    for position, (path, module) in enumerate(walk):
        depth = path.count('.') + 1 if path else 0
        while unended and unended[-1][0] >= depth:
            ends[unended.pop()[1]] = position
        unended.append((depth, position))
        by_name.setdefault(path.rpartition('.')[2], []).append(position)
        by_class.setdefault(type(module), []).append(position)
    return SubtreeIndex([module for _, module in walk], ends, by_name,
                        by_class)


def subtree_span(module: nn.Module) -> Tuple[SubtreeIndex, int, int]:
    """``(index, start, end)``: a :class:`SubtreeIndex` in which the
    subtree of ``module`` is ``index.modules[start:end]`` (``module``
    first, then what lies below it by every path).

    Within :func:`tree_unchanged` one index serves every module it holds
    (the first asked about, and all below it); outside, each call walks
    ``module``'s subtree.
    """
    memo = unchanged_memo('subtree spans')
    known = None if memo is None else memo.get(id(module))
    if known is not None and known[0] is module:
        return known[1:]
    index = _index_walk(module)
    if memo is not None:
        for position, below in enumerate(index.modules):
            seen = memo.get(id(below))
            if seen is None or seen[0] is not below:
                memo[id(below)] = (below, index, position,
                                   index.ends[position])
    return index, 0, len(index.modules)
