"""Whether a block's forward can add or subtract values at all.

The generic merge looks for sums of branches in a traced graph.  Tracing is
the expensive part, and most blocks (a conv, norm and activation in a row)
never add anything.  Reading the bytecode of the forward, and of the Python
functions it may call, tells them apart without running anything: a block
whose code has no ``+``/``-`` operator and never names ``add``, ``sub`` or
``sum`` cannot produce a sum, so it is not traced.

The scan follows, up to a few levels deep: nested functions and lambdas,
wrapped and closed-over functions (decorators such as mmcv's
``auto_fp16``), methods named on the block's class or its bases (so
``super().forward`` and helpers such as ``_forward_impl`` count), functions
stored on the instance, and global Python functions of the module the code
comes from.  Code reached some other way (``getattr`` with a computed name)
is not seen: such a block is not merged, which is always safe.
"""
import dis
import functools
import types
from typing import Any, Callable, Dict, Iterator, Set, Tuple

from torch import nn

__all__ = ['forward_may_add']

_ADDITIVE_OPCODES = {
    'BINARY_ADD', 'INPLACE_ADD', 'BINARY_SUBTRACT', 'INPLACE_SUBTRACT'
}
_ADDITIVE_OPERATORS = {'+', '+=', '-', '-='}
_ADDITIVE_NAMES = {
    'add', 'add_', 'sub', 'sub_', 'subtract', 'sum', '__add__', '__radd__',
    '__iadd__', '__sub__', '__rsub__', '__isub__'
}
# LOAD_SUPER_ATTR: ``super().name`` from Python 3.12 on.
_NAME_LOADS = {
    'LOAD_ATTR', 'LOAD_METHOD', 'LOAD_GLOBAL', 'LOAD_NAME', 'LOAD_SUPER_ATTR'
}
#: How many calls deep the scan follows Python functions.
_DEPTH = 4


def _functions_in(value: Any) -> Iterator[types.FunctionType]:
    """Python functions behind ``value`` (a function, method, partial,
    static or class method)."""
    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    if isinstance(value, types.MethodType):
        value = value.__func__
    func = getattr(value, 'func', None)  # functools.partial
    if func is not None and not isinstance(value, types.FunctionType):
        value = func
    if isinstance(value, types.FunctionType):
        yield value
        wrapped = getattr(value, '__wrapped__', None)
        if wrapped is not None:
            yield from _functions_in(wrapped)
        for cell in value.__closure__ or ():
            try:
                content = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if isinstance(content, types.FunctionType):
                yield content


@functools.lru_cache(maxsize=4096)
def _summary(code: types.CodeType
             ) -> Tuple[bool, Tuple[str, ...], Tuple[str, ...],
                        Tuple[types.CodeType, ...]]:
    """What one code object does, read once: ``(adds, global names,
    attribute names, nested code)``."""
    globals_, attributes = [], []
    for ins in dis.get_instructions(code):
        if ins.opname in _ADDITIVE_OPCODES or (
                ins.opname == 'BINARY_OP'
                and ins.argrepr in _ADDITIVE_OPERATORS):
            return True, (), (), ()
        if ins.opname not in _NAME_LOADS or not isinstance(ins.argval, str):
            continue
        if ins.argval in _ADDITIVE_NAMES:
            return True, (), (), ()
        if ins.opname in ('LOAD_GLOBAL', 'LOAD_NAME'):
            globals_.append(ins.argval)
        else:
            attributes.append(ins.argval)
    nested = tuple(c for c in code.co_consts if isinstance(c, types.CodeType))
    return False, tuple(dict.fromkeys(globals_)), tuple(
        dict.fromkeys(attributes)), nested


class _Scan:

    def __init__(self, module: nn.Module):
        self.module = module
        self.seen: Set[types.CodeType] = set()

    def attribute(self, name: str) -> Iterator[Any]:
        """What ``<something>.name`` may be in the block's code."""
        if name in self.module.__dict__:
            yield self.module.__dict__[name]
        for cls in type(self.module).__mro__:
            if name in cls.__dict__:
                yield cls.__dict__[name]

    def function(self, func: Callable, depth: int) -> bool:
        return self.code(func.__code__, func.__globals__, depth)

    def code(self, code: types.CodeType, globals_: Dict[str, Any],
             depth: int) -> bool:
        if code in self.seen:
            return False
        self.seen.add(code)
        adds, global_names, attribute_names, nested = _summary(code)
        if adds:
            return True
        if any(self.code(inner, globals_, depth) for inner in nested):
            return True
        if depth == 0:
            return False
        followed = [globals_.get(name) for name in global_names]
        for name in attribute_names:
            followed.extend(self.attribute(name))
        for value in followed:
            for func in _functions_in(value):
                if self.function(func, depth - 1):
                    return True
        return False


def forward_may_add(module: nn.Module) -> bool:
    """Whether ``module.forward`` may add or subtract two values.

    ``False`` only when no code the forward can reach by name does: see the
    module docstring.
    """
    forward = module.__dict__.get('forward', type(module).forward)
    funcs = list(_functions_in(forward))
    if not funcs:
        return True  # not Python code: it may
    scan = _Scan(module)
    return any(scan.function(func, _DEPTH) for func in funcs)
