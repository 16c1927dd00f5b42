"""Discovery without an example input: prove data flow from structure.

Three kinds of structure count as proof, and registration order never does:

* ``nn.Sequential`` (with the stock forward): each child's output is the
  next child's only input;
* mmcv's ``ConvModule`` (with the stock forward): ``order`` says whether the
  norm runs right after or right before the conv;
* any other module whose own forward torch.fx can trace with every submodule
  kept as a leaf: the graph shows which call consumes which output.  A
  forward that takes a list of tensors (DenseNet's layers) and fails a
  plain trace is traced with that argument a list of unknown length,
  where the trace of the module holding it shows a list passed at every
  call (``traced_with_lists``).  A forward with optional parameters, or
  one that compares an argument (or a value from it) by identity, is not
  traced: a proxy stands for an argument given and is identical to
  nothing, so ``if scale is None`` would take the way of a call that
  gives one, whatever the callers do.

Only modules that call a foldable norm are traced, and then the modules
that hold a linked conv or norm anywhere below them (their calls of it,
even reaching into a child, decide whether it is folded in place, copied
or left) and have layers of their own, or whose code may reach below the
modules they call (:func:`_reached_below`, read from their bytecode): a
model without batch norms is not traced at all.  Below a module that
cannot be traced and whose code may so reach, links are undone.  A
module registered under several names gets no call site from a trace
(the graph cannot tell which name was called).  The model is never
mutated.
"""
import bisect
import builtins
import dis
import functools
import inspect
import operator
import sys
import types
import weakref
from typing import (Any, Collection, Dict, Iterator, List, NamedTuple,
                    Optional, Set, Tuple)

import torch
from torch import fx, nn

from ..layers import (call_problem, is_conv_layer, is_mmcv_conv_module,
                      is_norm_layer, is_stock_sequential, norm_fold_problem,
                      runs_class_forward)
from ..module_walk import (SubtreeIndex, class_memo, find_submodule,
                           subtree_span, unchanged_memo, walk_modules)
from ..plan import CONCAT, POST, PRE, SUM
from .fx_tracer import (MODULE_INTERNALS, TENSOR_METADATA, class_namespaces,
                        code_kind, functions_in, holds_only_settings,
                        modules_held_in)
from .occurrence import Evidence, Occurrence
from .trace_cache import TraceCache

__all__ = [
    'collect_structural_evidence', 'names_read_above', 'reached_inside'
]


def _is_leaf_layer(module: nn.Module) -> bool:
    return is_conv_layer(module) or (is_norm_layer(module) and not any(
        True for _ in module.children()))


def _skips_norm(node: fx.Node) -> bool:
    """Whether a call of an mmcv ConvModule may skip its norm: passes
    ``norm`` (its third parameter) as anything but ``True``."""
    norm = node.kwargs.get('norm', node.args[2] if len(node.args) > 2
                           else True)
    return norm is not True


def _metadata_only(node: fx.Node) -> bool:
    """Whether a ``get_attr`` node's tensor is read for nothing but what
    it tells of itself (its dtype, device, shape: ``getattr`` nodes the
    tracer records), or not used at all."""
    return all(
        user.op == 'call_function' and user.target is getattr
        and len(user.args) == 2 and user.args[1] in TENSOR_METADATA
        for user in node.users)


#: In-place operators a traced forward records as functions.
_IN_PLACE_OPERATORS = frozenset({
    operator.setitem, operator.delitem, operator.iadd, operator.isub,
    operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.imatmul, operator.iand, operator.ior,
    operator.ixor, operator.ilshift, operator.irshift
})


#: The operators of ``x op= y`` (``__iadd__``: 'add').
_BINARY_OPERATORS = frozenset({
    'add', 'sub', 'mul', 'truediv', 'floordiv', 'mod', 'pow', 'matmul',
    'and', 'or', 'xor', 'lshift', 'rshift'
})


def _may_change_arguments(root: nn.Module, node: fx.Node) -> bool:
    """Whether the operation of ``node`` may change one of its tensor
    arguments in place: an in-place method or function (``relu_``,
    ``x += y``, ``x[i] = v``), one given ``out=`` or ``inplace=True``, or
    a call of a module that is not one of torch's own leaf modules with
    ``inplace`` off, or of one with hooks or a forward of its own (any
    other module may do anything with its input)."""
    if node.op == 'call_module':
        try:
            called = find_submodule(root, node.target)
        except AttributeError:
            return True
        if call_problem(called) is not None:
            return True  # a hook or a forward of its own: anything
        if is_conv_layer(called) or is_norm_layer(called):
            return False
        return bool(called._modules) or getattr(called, 'inplace', False) \
            is not False or not type(called).__module__.startswith(
                'torch.nn.modules.')
    if node.op not in ('call_method', 'call_function'):
        return False
    if 'out' in node.kwargs or node.kwargs.get('inplace', False):
        return True
    target = node.target
    if target in _IN_PLACE_OPERATORS:
        return True
    schema = getattr(target, '_schema', None)  # a torch.ops overload
    if schema is not None and getattr(schema, 'is_mutable', True):
        return True
    name = target if isinstance(target, str) else getattr(
        target, '__name__', '')
    name = name.split('.')[0]  # (``relu_.default``)
    if name.startswith('__') and name.endswith('__'):
        # ``x.__setitem__(i, v)``, ``x.__iadd__(y)``
        return name in ('__setitem__', '__delitem__') or \
            name.startswith('__i') and name[3:-2] in _BINARY_OPERATORS
    # (A ``torch.ops`` packet, ``torch.ops.aten.add``, runs the overload
    # its arguments pick, ``out=`` ones among them.)
    return name.endswith('_') or not isinstance(target, str) and \
        callable(getattr(target, 'overloads', None))


def _input_changed_before(root: nn.Module, norm: fx.Node,
                          conv: fx.Node) -> Optional[str]:
    """For a norm that runs right before a conv (``conv(norm(x))``): an
    operation between the two calls that may change a tensor in place,
    which after a fold (the norm an ``Identity``, its output ``x`` itself)
    the conv would see where it changes ``x``; its description, or
    ``None``.  Any such operation counts, whatever it is given: ``x`` may
    be a view of another tensor, or share its memory otherwise."""
    node = norm.next
    while node is not conv and node.op != 'root':
        if _may_change_arguments(root, node):
            target = node.target
            return target if isinstance(target, str) else getattr(
                target, '__name__', str(target))
        node = node.next
    return None


def _resolve(root: nn.Module, target: str) -> Tuple[nn.Module, str]:
    """``(holder, attr)`` of the submodule at ``target`` under ``root``."""
    parent, _, attr = target.rpartition('.')
    holder = find_submodule(root, parent)
    return holder, attr


_OPTIONAL: Dict[Any, str] = {}


def _optional_parameters(forward: Any) -> str:
    """The names of ``forward``'s parameters a call may leave out (with
    defaults, ``*args``, ``**kwargs``), joined; ``''`` for none (or no
    signature to read)."""
    names = _OPTIONAL.get(forward)
    if names is None:
        try:
            params = list(inspect.signature(forward).parameters.values())
        except (TypeError, ValueError):
            params = []
        names = _OPTIONAL[forward] = ', '.join(
            p.name for p in params[1:]
            if p.default is not p.empty
            or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
    return names


_IDENTITY_TESTED: Dict[Any, str] = {}


def _identity_tested_parameters(forward: Any, cls: type) -> str:
    """The names of ``forward``'s parameters whose values, or values its
    code computes from them, that code (or code nested in it, a
    comprehension, a function of the model's or a method of ``cls`` it
    hands them to) compares by identity (``if skip is None``, ``s =
    inputs[1]; if s is None``, ``if mode is Mode.RAW``, ``exists(skip)``,
    ``hasattr(skip, 'shape')``), joined; ``''`` for none.  A caller may
    pass ``None`` or a flag there (a UNet decoder's first skip), which a
    traced value never is, and a traced value is never identical to
    anything: the trace would take the other way.  (What a tensor tells
    of itself, ``x.size()[2:]``, is never ``None``: not followed.)"""
    names = _IDENTITY_TESTED.get((forward, cls))
    if names is None:
        found: List[str] = []
        # The forward and what it wraps (a decorator without
        # ``functools.wraps`` calls it from its closure).
        for function in functions_in(forward):
            code = function.__code__
            params = code.co_varnames[1:code.co_argcount +
                                      code.co_kwonlyargcount]
            _find_identity_tests(code, {p: p for p in params}, found,
                                 function.__globals__, cls)
        names = _IDENTITY_TESTED[(forward, cls)] = ', '.join(found)
    return names


def _loaded(op: Any) -> Tuple[str, ...]:
    """The variables a load of locals gives (two for Python 3.13's
    ``LOAD_FAST_LOAD_FAST``)."""
    return op.argval if isinstance(op.argval, tuple) else (op.argval, )


def _stack_effect(op: Any) -> Optional[int]:
    """How many values instruction ``op`` adds to the stack (not
    jumping), or ``None`` where ``dis`` cannot tell."""
    try:
        return dis.stack_effect(op.opcode, op.arg, jump=False)
    except ValueError:
        return None


def _deeper(depth: int, op: Any) -> Optional[int]:
    """``depth`` after instruction ``op``; ``None`` where ``dis`` cannot
    tell, or where it takes more than ``depth`` values (what was on the
    stack before is used)."""
    effect = _stack_effect(op)
    if effect is None or depth + effect < 0:
        return None
    return depth + effect


#: Loads of local and closure variables.
_LOCAL_LOADS = frozenset({
    'LOAD_FAST', 'LOAD_DEREF', 'LOAD_CLOSURE', 'LOAD_FAST_CHECK',
    'LOAD_FAST_LOAD_FAST', 'LOAD_FAST_AND_CLEAR'
})


def _find_identity_tests(code: Any,
                         derived: Dict[str, str],
                         found: List[str],
                         scope: Optional[Dict[str, Any]] = None,
                         cls: Optional[type] = None,
                         depth: int = 0) -> None:
    """Add to ``found`` the parameters whose values ``code`` compares by
    identity (``is``, or ``hasattr``, true of any traced value).
    ``derived`` maps each variable holding a value computed from a
    parameter (in a statement that reads it: ``x, skip = inputs``, ``s =
    skip``) to the parameter; it grows as the code is read (twice, for
    loops), and closures and comprehensions carry it into nested code
    (a function or lambda made there takes it at every parameter).  A
    function of the model's code (a global of ``scope``, an attribute of
    a module or class one names, a method of ``cls``) handed such a value
    is read too, with the parameters it is handed at derived
    (``exists(skip)``)."""
    ops = list(dis.get_instructions(code))
    me = code.co_varnames[0] if code.co_argcount else None
    for _ in range(2):
        read: List[str] = []  # parameters read since the statement began
        for index, op in enumerate(ops):
            if op.starts_line:
                read = []
            if op.opname in _LOCAL_LOADS and not _metadata_read(ops, index):
                loaded = _loaded(op)
                read.extend(derived[n] for n in loaded if n in derived)
            elif op.opname in ('STORE_FAST', 'STORE_DEREF') and read:
                derived.setdefault(op.argval, read[0])
            hit = None
            if op.opname in ('IS_OP', 'CONTAINS_OP') or \
                    'IF_NONE' in op.opname or 'IF_NOT_NONE' in op.opname:
                operands = 1 if 'NONE' in op.opname else 2
                hit = _read_by_operands(ops, index, operands, derived)
            elif op.opname in ('LOAD_GLOBAL', 'LOAD_NAME', 'LOAD_METHOD',
                               'LOAD_ATTR'):
                given = _call_arguments(ops, index, derived)
                if given is not None:
                    positional, keywords = given
                    on_self = index > 0 and ops[index - 1].opname in (
                        'LOAD_FAST', 'LOAD_DEREF') and \
                        ops[index - 1].argval == me
                    if op.argval in _IDENTITY_CALLS:
                        hit = next((p for p in positional if p), None)
                    else:
                        hit = _tests_identity(
                            _called_function(ops, index, scope, cls),
                            positional, keywords,
                            op.opname == 'LOAD_METHOD' and on_self, depth)
            if hit and hit not in found:
                found.append(hit)
    for const in code.co_consts:
        if not hasattr(const, 'co_code'):
            continue
        carried = {
            name: derived[name]
            for name in const.co_freevars if name in derived
        }
        params = const.co_varnames[:const.co_argcount +
                                   const.co_kwonlyargcount]
        if '.0' in params:
            # A comprehension: its iterable is its argument ``.0``.
            source = _comprehension_source(ops, const, derived)
            if source:
                carried['.0'] = source
        elif derived:
            # A function or lambda made here may be handed anything the
            # code has (``missing = lambda s: s is None``).
            first = next(iter(derived.values()))
            carried.update((p, first) for p in params)
        if carried:
            _find_identity_tests(const, carried, found, scope, cls, depth)


#: What a tensor tells of itself: never ``None`` nor a flag.
_METADATA_READS = frozenset({
    'size', 'shape', 'dim', 'ndim', 'dtype', 'device', 'numel', 'ndimension'
})


def _metadata_read(ops: List[Any], index: int) -> bool:
    """Whether the value instruction ``index`` of ``ops`` loads is read
    for its metadata at once (``x.size()``, ``x.shape``, ``xs[0].shape``).
    """
    after = index + 1
    while after + 1 < len(ops) and ops[after].opname in (
            'LOAD_CONST', 'LOAD_FAST', 'LOAD_DEREF') and \
            ops[after + 1].opname == 'BINARY_SUBSCR':
        after += 2  # through ``inputs[0]``, to ``inputs[0].shape``
    following = ops[after] if after < len(ops) else None
    return following is not None and following.opname in _READS and \
        following.argval in _METADATA_READS


def _call_arguments(
    ops: List[Any], index: int, derived: Dict[str, str]
) -> Optional[Tuple[List[Optional[str]], Dict[str, str]]]:
    """For a function loaded by instruction ``index`` of ``ops`` and
    called right after (Python 3.11's ``PRECALL``), the parameter (of
    ``derived``) each positional argument reads (``None`` for none), and
    by keyword those that do; ``None`` where no argument reads one, or
    the call cannot be followed."""
    depth = 0
    reads: Dict[int, str] = {}
    keywords: Tuple = ()
    for position in range(index + 1, min(index + 80, len(ops))):
        op = ops[position]
        if op.opname == 'PRECALL' and depth == op.arg:
            if not reads:
                return None
            count = op.arg
            positional = [reads.get(i) for i in range(count - len(keywords))]
            named = {
                name: reads[count - len(keywords) + i]
                for i, name in enumerate(keywords)
                if count - len(keywords) + i in reads
            }
            return positional, named
        if op.is_jump_target or op.opname.startswith('RETURN') or \
                'JUMP' in op.opname:
            return None
        if op.opname == 'KW_NAMES':
            keywords = op.argval if isinstance(op.argval, tuple) else ()
        hit = None if _metadata_read(ops, position) else \
            _derived_read(op, derived)
        if hit:
            reads.setdefault(depth, hit)
        depth = _deeper(depth, op)
        if depth is None:
            return None
    return None


#: Calls that tell a value from ``None`` or a flag by identity.
_IDENTITY_CALLS = frozenset({'hasattr', 'is_', 'is_not', 'id', 'hash'})


def _called_function(ops: List[Any], index: int,
                     scope: Optional[Dict[str, Any]],
                     cls: Optional[type]) -> Any:
    """The Python function that instruction ``index`` of ``ops`` loads, if
    it is the model's code: a global of ``scope``, an attribute of a
    module or class that a global of ``scope`` names (``helpers.exists``,
    ``Util.check``), or else a method of ``cls``."""
    op = ops[index]
    previous = ops[index - 1] if index else None
    value = None
    if op.opname in ('LOAD_GLOBAL', 'LOAD_NAME') and scope is not None:
        value = scope.get(op.argval)
    elif previous is not None and previous.opname == 'LOAD_GLOBAL' and \
            scope is not None and previous.argval.isidentifier():
        # (Not names no identifier is: pytest's assertion rewriting puts
        # ``@pytest_ar`` and its helpers in the modules it imports.)
        holder = scope.get(previous.argval)
        if isinstance(holder, (type, types.ModuleType)):
            value = inspect.getattr_static(holder, op.argval, None)
    elif cls is not None:
        value = inspect.getattr_static(cls, op.argval, None)
    function = getattr(value, '__func__', value)
    code = getattr(inspect.unwrap(function) if callable(function) else
                   None, '__code__', None)
    return function if code is not None and \
        code_kind(code.co_filename) == 'model' else None


def _tests_identity(function: Any, positional: List[Optional[str]],
                    keywords: Dict[str, str], method: bool,
                    depth: int) -> Optional[str]:
    """The parameter (of the caller) handed to ``function`` (the model's
    code; a method called on an object with ``method``) that it compares
    by identity, or ``None``."""
    if function is None or depth >= 3:
        return None
    function = inspect.unwrap(function)
    code = function.__code__
    params = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
    given = params[1:] if method else params
    derived = {p: hit for p, hit in zip(given, positional) if hit}
    derived.update((p, keywords[p]) for p in params if p in keywords)
    if code.co_flags & inspect.CO_VARARGS:
        extra = [hit for hit in positional[len(given):] if hit]
        if extra:
            derived[code.co_varnames[len(params)]] = extra[0]
    if not derived:
        return None
    found: List[str] = []
    _find_identity_tests(code, derived, found, function.__globals__, None,
                         depth + 1)
    return found[0] if found else None


def _comprehension_source(ops: List[Any], comprehension: Any,
                          derived: Dict[str, str]) -> Optional[str]:
    """The parameter the iterable handed to ``comprehension`` (made and
    called in ``ops``) reads, or ``None``."""
    made = next((i for i, op in enumerate(ops)
                 if op.opname == 'LOAD_CONST' and op.argval is comprehension),
                None)
    if made is None:
        return None
    for op in ops[made + 1:made + 60]:
        if op.opname == 'GET_ITER':
            return None
        hit = _derived_read(op, derived)
        if hit:
            return hit
    return None


def _read_by_operands(ops: List[Any], index: int, operands: int,
                      derived: Dict[str, str]) -> Optional[str]:
    """The parameter the instructions that push the last ``operands``
    values before instruction ``index`` read (found back to where they
    push that many, by their stack effects), or ``None``; where that
    cannot be followed (a jump), any read since the statement began."""
    depth = 0
    start = index
    while start > 0 and depth < operands:
        start -= 1
        op = ops[start]
        effect = _stack_effect(op)
        if 'JUMP' in op.opname or effect is None:
            start = -1
            break
        depth += effect
        if op.is_jump_target and depth < operands:
            start = -1  # (an operand may begin where a jump lands)
            break
    if start < 0:  # the statement's reads, all of them
        start = index
        while start > 0 and not ops[start].starts_line:
            start -= 1
    return next((hit for hit in (_derived_read(op, derived)
                                 for op in ops[start:index]) if hit), None)


def _derived_read(op: Any, derived: Dict[str, str]) -> Optional[str]:
    """The parameter a load of locals ``op`` reads a value from, or
    ``None``."""
    if op.opname not in _LOCAL_LOADS:
        return None
    return next((derived[name] for name in _loaded(op) if name in derived),
                None)


_CLASS_CODE: Dict[type, Tuple[frozenset, frozenset]] = {}


def _class_code(cls: type) -> Tuple[frozenset, frozenset]:
    """What the code of ``cls``'s methods (but ``__init__``), and of its
    bases' that are not torch's, names: every name it loads or reads as
    an attribute, and the keyword names its calls pass."""
    known = _CLASS_CODE.get(cls)
    if known is None:
        names: set = set()
        strings: set = set()
        stack = []
        for namespace in class_namespaces(cls):
            for name, value in namespace.items():
                function = getattr(value, '__func__', value)
                code = getattr(function, '__code__', None)
                if code is not None and name != '__init__':
                    stack.append(code)
        while stack:
            code = stack.pop()
            names.update(code.co_names)
            stack.extend(c for c in code.co_consts if hasattr(c, 'co_names'))
            strings.update(_keyword_names(code))
        known = _CLASS_CODE[cls] = (frozenset(names), frozenset(strings))
    return known


#: Names through which code may reach a module's submodules or tensors
#: other than one attribute at a time: walks of the tree or its tensors,
#: its tables, reflection.
_WALKS = frozenset({
    'children', 'named_children', 'modules', 'named_modules', '_modules',
    'parameters', 'named_parameters', 'buffers', 'named_buffers',
    '_parameters', '_buffers', 'state_dict', 'get_submodule',
    'get_parameter', 'get_buffer', '__dict__', 'vars', '__getattribute__',
    '__getattr__', '_named_members'
})
#: Values that hold no module, besides numbers and strings.
_NO_HOLDERS = (torch.device, torch.dtype, torch.Tensor, types.ModuleType)
#: How deep in containers and objects a module held outside the module
#: tables is looked for.
_HELD_DEPTH = 8


class _CodeReading(NamedTuple):
    """What :func:`_forward_code` read of a class's code (see there)."""
    deep: frozenset
    deep_taken: frozenset
    deep_indexed: frozenset
    values: frozenset
    taken: frozenset
    hands_on: bool
    passed: frozenset
    deep_passed: frozenset


#: The entries of the code a call of a module runs (see
#: :func:`_forward_code`).
_FORWARD = frozenset({'forward'})
#: What runs code when read on a module, as a property does; and what
#: is a method though not callable itself.
_PROPERTIES = (property, functools.cached_property)
_METHODS = (staticmethod, classmethod, functools.partialmethod,
            functools.singledispatchmethod)


def _reads_any_attribute(cls: type, entries: frozenset = _FORWARD) -> bool:
    """Whether the code of ``cls`` (its ``forward``, or the methods and
    properties ``entries``) may read an attribute of its module not by
    name: it hands the module on, walks modules, or calls ``getattr``
    with a name made at run time."""
    code = _code_of(cls, entries)
    return code.hands_on or bool(code.deep & _WALKS) or '' in code.taken


def _names_used(cls: type,
                entries: frozenset = _FORWARD) -> Optional[frozenset]:
    """Every name the code of ``cls`` (its ``forward``, or ``entries``)
    uses, or ``None`` where it may read any attribute of its module
    (:func:`_reads_any_attribute`, or ``getattr(self, name)`` called with
    a name made at run time)."""
    names = _forward_code_reads(cls, entries)[1]
    return None if '' in names or _reads_any_attribute(cls, entries) \
        else names


def _is_torch_class(cls: type) -> bool:
    return cls.__module__.split('.')[0] == 'torch'


def _held_by_code_reads(module: nn.Module,
                        entries: frozenset = _FORWARD) -> List[nn.Module]:
    """The modules held by the globals and class attributes that the code
    a call of ``module`` may run reads (a global list of layers, a class
    attribute holding one); or the code of its methods and properties
    ``entries``.  The same for every module of a class: kept while no
    module changes."""
    cls = type(module)
    memo = unchanged_memo('held by code reads')
    known = None if memo is None else memo.get((cls, entries))
    if known is not None:
        return known
    scopes, names = _forward_code_reads(cls, entries)
    names = names | entries  # (an entry that is itself a held module)
    found = [
        held for scope in scopes for name in names if name in scope
        and not holds_only_settings(scope[name], _NO_HOLDERS)
        for held in modules_held_in(scope[name], _HELD_DEPTH)
    ]
    found.extend(
        held for namespace in class_namespaces(type(module))
        for name in names if name in namespace and not isinstance(
            namespace[name], (types.FunctionType, ) + _METHODS + _PROPERTIES)
        for held in modules_held_in(namespace[name], _HELD_DEPTH))
    if memo is not None:
        memo[(cls, entries)] = found
    return found


#: Methods of a module that run a function on every module below it:
#: called on a child (``self.stem.apply(fn)``), they reach below it.  (Not
#: walks of the module itself: MMEngine's ``BaseModel.to`` names them.)
_APPLY = frozenset({'apply', '_apply'})
_READS = frozenset({'LOAD_ATTR', 'LOAD_METHOD'})
#: By class, and by the method or property whose code is read
#: (``'forward'``, or one called from above): what its code was read
#: from, and what was read.
_FORWARD_CODE: 'weakref.WeakKeyDictionary[type, Dict[str, Tuple]]' = \
    weakref.WeakKeyDictionary()


def _forward_code(
    cls: type,
    entry: str = 'forward'
) -> _CodeReading:
    """What the code a call of a ``cls`` module may run does with names,
    read from its ``forward`` (or the method or property ``entry``) and,
    by the names that code uses, the
    methods and properties of ``cls`` and its bases but torch's (nested
    code, decorators, closures too; where it calls ``getattr(self, name)``
    with a name made at run time, every property's):

    * the attributes it reads of anything but the module itself
      (``self.block.conv``: ``conv``; ``x.shape``: ``shape``), and the
      names of the walks and reflection it may use (:data:`_WALKS`); and
      of those attributes the ones it takes as values (see below), and the
      ones it indexes;
    * the attributes of the module it takes as values other than to call
      them at once (``self.layers`` iterated, indexed, passed on, set; not
      ``self.conv(x)`` or ``self.conv.forward(x)``; nor only tested:
      ``if self.block``, ``len(self.layers)``), and of those the ones it
      does not just index (``self.layers[i]``);
    * whether it may hand the module itself on: its first parameter
      loaded for anything but an attribute read, a call of it (its
      forward: ``self(x)``) or setting an attribute (``self.x = v``, which
      takes ``x``), as in ``helper(self)``; or ``getattr`` of anything
      else than the module;
    * of the attributes it takes, those it neither just indexes nor just
      iterates (``helper(self.block)``, ``self.block.apply(fn)``); and
      the same of the attributes of anything else
      (``helper(self.body.block)``).
    """
    # (Checked once while no class changes: see ``class_memo``.)
    checked = class_memo('forward code')
    if checked is not None and (cls, entry) in checked:
        return _FORWARD_CODE[cls][entry][1]
    forward = inspect.getattr_static(cls, entry, None)
    known = _FORWARD_CODE.get(cls, {}).get(entry)
    if known is not None and all(
            namespace.get(name, _MISSING) is value
            for namespace, name, value in known[0]):
        if checked is not None:
            checked[(cls, entry)] = True
        return known[1]
    bases = class_namespaces(cls)
    # What was looked up, to tell when the class changed.
    looked_up = [(vars(cls), entry, vars(cls).get(entry, _MISSING))]
    looked_up.extend((namespace, entry, namespace.get(entry, _MISSING))
                     for namespace in bases if namespace is not vars(cls))
    # (What a store on the module runs: see ``_plain_store``.)
    looked_up.extend((namespace, name, namespace.get(name, _MISSING))
                     for namespace in bases
                     for name in ('__setattr__', '__delattr__'))
    deep: Set[str] = set()
    deep_taken: Set[str] = set()
    deep_indexed: Set[str] = set()
    deep_passed: Set[str] = set()
    values: Set[str] = set()
    taken: Set[str] = set()
    passed: Set[str] = set()
    hands_on = computed = lists_taken = False
    # (Function, whether its first parameter is the module.)
    bound = not isinstance(forward, (staticmethod, classmethod))
    pending = [(f, bound) for f in functions_in(forward)]
    # Another entry's ``self.forward(x)`` calls the forward the class
    # resolves, whose calls its own reading covers (not a base's,
    # ``super().forward(x)``).
    resolved = inspect.getattr_static(cls, 'forward', None) \
        if entry != 'forward' else _MISSING
    seen: Set[Any] = set()
    named: Set[str] = set()
    scopes: List[Dict[str, Any]] = []
    while pending:
        function, bound = pending.pop()
        if all(function.__globals__ is not scope for scope in scopes):
            scopes.append(function.__globals__)
        code = function.__code__
        # The module: a method's first parameter, and in the code nested
        # in it the closure's variable of that name.
        codes = [(code, code.co_varnames[0]
                  if bound and code.co_argcount else None)]
        while codes:
            code, me = codes.pop()
            if code in seen:
                continue
            seen.add(code)
            codes.extend((c, me) for c in code.co_consts
                         if hasattr(c, 'co_code'))
            named.update(code.co_names)
            deep.update(_WALKS.intersection(code.co_names))
            ops = list(dis.get_instructions(code))
            for index, op in enumerate(ops):
                previous = ops[index - 1] if index else None
                following = ops[index + 1] if index + 1 < len(ops) else None
                on_me = previous is not None and previous.argval == me and \
                    previous.opname in ('LOAD_FAST', 'LOAD_DEREF')
                # Read to call at once: ``x.conv(...)``, ``x.head.predict``
                # (a dunder such as ``__getitem__`` takes the value).
                called = following is not None and \
                    following.opname in _READS and \
                    not following.argval.startswith('__')
                if called and following.argval in _APPLY and \
                        op.opname in _READS:
                    # ``self.stem.apply(fn)``: every module below it.
                    if on_me:
                        values.add(op.argval)
                        taken.add(op.argval)
                        passed.add(op.argval)
                    else:
                        deep.add(op.argval)
                        deep_taken.add(op.argval)
                        deep_passed.add(op.argval)
                    continue
                if op.opname in _READS and not on_me:
                    deep.add(op.argval)
                    if op.opname == 'LOAD_ATTR' and not called:
                        use = _use_of(ops, index, function.__globals__)
                        if use in ('taken', 'iterated'):
                            deep_taken.add(op.argval)
                        if use == 'taken':
                            deep_passed.add(op.argval)
                        elif use == 'indexed':
                            deep_indexed.add(op.argval)
                elif op.opname == 'LOAD_ATTR' and not (
                        sys.version_info >= (3, 12) and op.arg & 1) and \
                        not called:
                    # (3.12 on: bit 0 of the argument marks a method.)
                    use = _use_of(ops, index, function.__globals__)
                    if use != 'tested':
                        values.add(op.argval)
                    if use == 'taken':
                        passed.add(op.argval)
                    if use in ('taken', 'iterated'):
                        taken.add(op.argval)
                stored = _stored(ops, index) if op.argval == me else None
                if op.opname in ('LOAD_FAST', 'LOAD_DEREF') and \
                        op.argval == me and (following is None or
                                             following.opname not in _READS):
                    if previous is not None and \
                            previous.argval == 'getattr':
                        computed = True  # ``getattr(self, name)``
                        after = ops[index + 2] \
                            if index + 2 < len(ops) else None
                        name = following.argval if following is not \
                            None and following.opname == 'LOAD_CONST' \
                            and after is not None and \
                            after.opname in ('PRECALL', 'CALL') else None
                        # What it gives may be called: it names the
                        # attribute (``''``: any).
                        named.add(name if isinstance(name, str) else '')
                        if not _getattr_result_called(ops, index - 1):
                            # ``getattr(self, 'stem')[0]`` is ``self.stem``
                            # so used; ``getattr(self, name)`` iterated
                            # as a list of modules is.
                            if isinstance(name, str):
                                values.add(name)
                                taken.add(name)
                                passed.add(name)
                            else:
                                lists_taken = True
                    elif previous is not None and \
                            previous.opname == 'PUSH_NULL' and \
                            sys.version_info[:2] == (3, 11) and \
                            _called_after(ops, index):
                        pass  # ``self(x)``: its own forward, called
                    elif stored is not None and \
                            _plain_store(bases, stored, pending, seen):
                        # ``self.cache = x``, ``self.calls += 1``: a child
                        # so set is taken (changed).
                        values.add(stored)
                        taken.add(stored)
                        passed.add(stored)
                    elif not _is_builtin(previous, _LOOKS,
                                         function.__globals__):
                        hands_on = True  # (not ``hasattr(self, 'head')``)
                elif op.argval == 'getattr' and op.opname in (
                        'LOAD_GLOBAL', 'LOAD_NAME') and (
                            following is None or following.argval != me):
                    hands_on = True
        for namespace in bases:
            for name, value in namespace.items():
                if name != '__init__' and value is not resolved and (
                        name in named or
                        (computed and isinstance(value, _PROPERTIES))):
                    looked_up.append((namespace, name, value))
                    if _opaque(value):
                        hands_on = True  # (what it runs is not read)
                    # (A static or class method's first parameter is not
                    # the module.)
                    bound = isinstance(value, (types.FunctionType,
                                               functools.partialmethod) +
                                       _PROPERTIES)
                    pending.extend((f, bound) for f in functions_in(value)
                                   if f.__code__ not in seen)
        for namespace in bases:  # names looked for, not there
            looked_up.extend((namespace, name, _MISSING)
                             for name in named if name not in namespace)
    if lists_taken:
        taken.add('')  # (some list of modules: see ``_reached_below``)
        passed.add('')
    result = _CodeReading(frozenset(deep), frozenset(deep_taken),
                          frozenset(deep_indexed), frozenset(values),
                          frozenset(taken), hands_on, frozenset(passed),
                          frozenset(deep_passed))
    # Each lookup once (the loops above look again for every function).
    looked_up = list({(id(namespace), name): (namespace, name, value)
                      for namespace, name, value in looked_up}.values())
    _FORWARD_CODE.setdefault(cls, {})[entry] = (looked_up, result,
                                                (scopes, frozenset(named)))
    if checked is not None:
        checked[(cls, entry)] = True
    return result


def _code_of(cls: type, entries: frozenset) -> _CodeReading:
    """:func:`_forward_code` of each of ``entries``, together."""
    if entries == _FORWARD:
        return _forward_code(cls)
    parts = [_forward_code(cls, entry) for entry in sorted(entries)]
    return _CodeReading(*(
        any(values) if field == 'hands_on' else frozenset().union(*values)
        for field, values in zip(_CodeReading._fields, zip(*parts))))


def _forward_code_reads(
        cls: type,
        entries: frozenset = _FORWARD
) -> Tuple[List[Dict[str, Any]], frozenset]:
    """The global scopes of the code :func:`_forward_code` reads for
    ``cls`` (and each of ``entries``), and every name that code uses
    (``''``: any attribute, where it calls ``getattr(self, name)`` with a
    name made at run time)."""
    scopes: List[Dict[str, Any]] = []
    names: Set[str] = set()
    for entry in entries:
        _forward_code(cls, entry)
        entry_scopes, entry_names = _FORWARD_CODE[cls][entry][2]
        scopes.extend(scope for scope in entry_scopes
                      if all(scope is not seen for seen in scopes))
        names.update(entry_names)
    return scopes, frozenset(names)


_MISSING = object()


def _opaque(value: Any) -> bool:
    """Whether a class attribute ``value`` runs code when read or called
    that :func:`~mmfuse.discovery.fx_tracer.functions_in` does not give: a
    property of a class with its own ``__get__``, a callable object other
    than a function or class (``functools.lru_cache``'s wrapper, a
    decorator class), a ``singledispatchmethod``."""
    if isinstance(value, property):
        return type(value).__get__ is not property.__get__
    if isinstance(value, functools.singledispatchmethod):
        return True
    return callable(value) and not isinstance(value, type) and \
        not functions_in(value)


def _plain_store(bases: List[Dict[str, Any]], name: str,
                 pending: List[Tuple[Any, bool]], seen: Set[Any]) -> bool:
    """Whether setting or deleting attribute ``name`` of a module whose
    class and bases have namespaces ``bases`` runs no code but what is
    then added to ``pending`` (a property's setter and deleter): not
    where the class has its own ``__setattr__`` or ``__delattr__``, or
    ``name`` is another descriptor that can be set."""
    for namespace in bases:
        if '__setattr__' in namespace or '__delattr__' in namespace:
            return False
    for namespace in bases:
        value = namespace.get(name, _MISSING)
        if value is _MISSING:
            continue
        if isinstance(value, property) and \
                type(value).__set__ is property.__set__ and \
                type(value).__delete__ is property.__delete__:
            pending.extend(
                (f, True) for accessor in (value.fset, value.fdel)
                if accessor is not None for f in functions_in(accessor)
                if f.__code__ not in seen)
            return True
        return not (hasattr(type(value), '__set__')
                    or hasattr(type(value), '__delete__'))
    return True


def _stored(ops: List[Any], index: int) -> Optional[str]:
    """The attribute set or deleted on the value instruction ``index`` of
    ``ops`` loads (``self.x = v``, ``del self.x``, ``self.x += 1``), or
    ``None``."""
    following = ops[index + 1] if index + 1 < len(ops) else None
    if following is None:
        return None
    if following.opname in ('STORE_ATTR', 'DELETE_ATTR'):
        return following.argval
    after = ops[index + 2] if index + 2 < len(ops) else None
    if following.opname == 'COPY' and following.arg == 1 and \
            after is not None and after.opname == 'LOAD_ATTR':
        # ``self.x += 1``: the attribute read, changed and set again.
        for op in ops[index + 3:index + 12]:
            if op.opname == 'STORE_ATTR' and op.argval == after.argval:
                return op.argval
    return None


def _getattr_result_called(ops: List[Any], index: int) -> bool:
    """Whether what the ``getattr`` call whose function instruction
    ``index`` of ``ops`` loads gives is only called: at once
    (``getattr(self, name)(x)``), or through a variable every read of
    which calls it (``layer = getattr(self, name)`` then ``layer(x)``).
    Python 3.11's instructions; ``False`` for others."""
    if sys.version_info[:2] != (3, 11):
        return False
    depth = 0
    for end in range(index, min(index + 40, len(ops))):
        op = ops[end]
        if op.is_jump_target and end > index:
            return False
        effect = _stack_effect(op)
        if effect is None:
            return False
        depth += effect
        if depth == 1 and op.opname == 'CALL':
            break
    else:
        return False
    store = ops[end + 1] if end + 1 < len(ops) else None
    if store is None:
        return False
    if store.opname == 'RETURN_VALUE':
        return True  # (a property's: its callers' use counts)
    if index and ops[index - 1].opname == 'PUSH_NULL':
        return _called_after(ops, end)
    if store.opname != 'STORE_FAST':
        return False
    reads = [
        i for i, op in enumerate(ops)
        if op.opname.startswith('LOAD_FAST') and op.argval == store.argval
    ]
    stores = [op for op in ops
              if op.opname == 'STORE_FAST' and op.argval == store.argval]
    return len(stores) == 1 and all(
        i and ops[i - 1].opname == 'PUSH_NULL' and _called_after(ops, i)
        for i in reads)


def _called_after(ops: List[Any], index: int) -> bool:
    """Whether the value instruction ``index`` of ``ops`` leaves on the
    stack (after a ``PUSH_NULL``) is the callee of the next call: the
    instructions after it push that call's arguments and nothing uses the
    value first (``layer(x)``, not ``layer[0](x)``)."""
    depth = 0
    for op in ops[index + 1:index + 40]:
        if op.opname == 'PRECALL' and depth == op.arg:
            return True
        pops = 2 if op.opname.startswith('BINARY') or op.opname in (
            'COMPARE_OP', 'IS_OP', 'CONTAINS_OP') else (
                op.arg or 0) if op.opname.startswith('BUILD') else 0
        if op.is_jump_target or depth < pops or (
                depth == 0 and op.opname not in (
                    'LOAD_FAST', 'LOAD_CONST', 'LOAD_DEREF', 'LOAD_GLOBAL',
                    'PUSH_NULL', 'KW_NAMES', 'PRECALL')):
            return False  # what it gives is used, not called
        depth = _deeper(depth, op)
        if depth is None:
            return False
    return False


#: Calls that only look at what they are given.
_LOOKS = frozenset({'len', 'isinstance', 'hasattr', 'id', 'bool', 'type'})
#: Calls that iterate what they are given first (which fails on a module
#: that cannot be iterated).
_ITERATES = frozenset({'enumerate', 'iter', 'list', 'tuple', 'zip'})


def _is_builtin(op: Any, names: frozenset, scope: Dict[str, Any]) -> bool:
    """Whether instruction ``op`` loads a global that is one of the
    builtins ``names`` (not a function of that name in ``scope``, the
    code's globals, nor one its ``__builtins__`` puts there)."""
    if op is None or op.opname not in ('LOAD_GLOBAL', 'LOAD_NAME') or \
            op.argval not in names:
        return False
    name = op.argval
    if name in scope:
        value = scope[name]
    else:
        table = scope.get('__builtins__', builtins)
        value = table.get(name) if isinstance(table, dict) else getattr(
            table, name, None)
    return value is getattr(builtins, name)


def _use_of(ops: List[Any], index: int, scope: Dict[str, Any]) -> str:
    """What the code does next with the value instruction ``index`` of
    ``ops`` pushes: ``'tested'`` (its truth, ``is None``; or given to
    builtin ``len``, ``isinstance``...; ``scope``: the code's globals),
    ``'indexed'`` (what a subscript indexes,
    ``self.layers[n - 1 - i]``, followed through the index expression by
    the stack effects of its instructions), ``'iterated'`` (``for m in
    self.layers``, ``enumerate(self.layers)``) or ``'taken'`` (anything
    else)."""
    following = ops[index + 1] if index + 1 < len(ops) else None
    if following is None:
        return 'taken'
    if following.opname.startswith('POP_JUMP'):
        return 'tested'  # ``if self.block:`` (not ``self.a or self.b``)
    callee = ops[index - 2] if index > 1 else None
    if _is_builtin(callee, _LOOKS, scope):
        return 'tested'  # ``len(self.layers)``, ``isinstance(self.x, T)``
    if following.opname == 'GET_ITER' or _is_builtin(callee, _ITERATES,
                                                     scope):
        return 'iterated'  # ``for m in self.layers``, ``enumerate(...)``
    after = ops[index + 2] if index + 2 < len(ops) else None
    if following.opname == 'LOAD_CONST' and following.argval is None and \
            after is not None and after.opname == 'IS_OP':
        return 'tested'
    depth = 1  # the value, on the stack
    for op in ops[index + 1:index + 40]:
        if op.opname == 'BINARY_SUBSCR' and depth == 2:
            return 'indexed'
        effect = _stack_effect(op)
        if op.is_jump_target or 'JUMP' in op.opname or \
                op.opname.startswith('RETURN') or effect is None:
            return 'taken'
        depth += effect
        if depth <= 1:
            return 'taken'  # the value (or what was pushed on it) used
    return 'taken'


def _is_container(module: nn.Module) -> bool:
    """Whether ``module`` is a list or dict of modules without a forward
    of its own: its entries are what its holder's forward calls."""
    return isinstance(module, (nn.ModuleList, nn.ModuleDict)) and \
        type(module).forward is nn.Module.forward


def _indexable(module: nn.Module) -> bool:
    """Whether ``module`` can be indexed or iterated to get at what it
    holds (a Sequential, a list or dict of modules, a class with its own
    ``__getitem__`` or ``__iter__``)."""
    cls = type(module)
    return isinstance(module, (nn.Sequential, nn.ModuleList,
                               nn.ModuleDict)) or \
        getattr(cls, '__getitem__', None) is not None or \
        getattr(cls, '__iter__', None) is not None


def _reached_below(
        module: nn.Module,
        entries: frozenset = _FORWARD) -> Tuple[List[nn.Module], bool]:
    """The modules below those ``module`` calls (its children, and the
    entries of its lists and dicts of modules) that a call of it may reach
    (call, read the tensors of, index, iterate), read from the code it may
    run (see :func:`_forward_code`; or the code of its methods and
    properties ``entries``); and whether it may also hand on or
    iterate a list of modules that holds Sequentials (``multi_apply(
    self.forward_single, feats, self.cls_convs)``, which calls them, or
    ``for m in self.stages[0]``, which reaches into one).

    It may reach below every one where the code walks modules or tensors
    or hands the module on, or where the module holds modules outside its
    module table (a list, a partial); below a child it takes as a value
    (``self.stem[0]``, a loop over a Sequential's layers; not where it
    only indexes or iterates a child that can be neither, which fails:
    ``for head in self.aux_head`` under ``isinstance(self.aux_head,
    nn.ModuleList)``, an mmseg segmentor's training step); a layer below
    them that the code reads by name (``self.block.conv``), and below a
    Sequential or list of modules so read other than to call it, or any
    module so read and handed on (``helper(self.body.block)``).  An
    entry taken from a list of modules by index is taken to be called (not
    indexed in turn), another module below read by name to be called
    (``self.det.neck(x)``, ``self.det.head.predict(x)``), and
    ``getattr(self, name)`` to give a child or an attribute, not a method
    the code then calls."""
    deep, deep_taken, deep_indexed, values, taken, hands_on, passed, \
        deep_passed = _code_of(type(module), entries)  # (every field)
    # (``''``: what ``getattr(self, name)`` gives, used other than called.)
    lists = '' in taken or any(
        name in taken and _is_container(child)
        and any(_indexable(entry) for entry in child.children())
        for name, child in module._modules.items())
    called = []
    reached: List[nn.Module] = []
    for name, child in _callable_children(module):
        called.append(child)
        # (Indexing or iterating a module that cannot be either fails.)
        if name in values and (name in passed or _indexable(child)):
            reached.append(child)  # taken as a value, not called
    if hands_on or deep & _WALKS or any(
            key not in MODULE_INTERNALS and modules_held_in(value)
            for key, value in module.__dict__.items()) or \
            _held_by_code_reads(module, entries):
        return called, lists
    for child in called:
        # What lies below ``child`` by every path, found by name and class.
        index, start, end = subtree_span(child)
        for name in deep.intersection(index.by_name):
            # (``deep`` holds ``deep_taken`` and ``deep_indexed``.)
            for position in _positions_within(index.by_name[name],
                                              start + 1, end):
                below = index.modules[position]
                indexed = name in deep_indexed and \
                    not _is_container(below)
                if _is_leaf_layer(below) or name in deep_passed or (
                        _indexable(below) and (name in deep_taken
                                               or indexed)):
                    reached.append(below)
        for properties, positions in _property_classes(index):
            if not properties.isdisjoint(deep):
                # ``self.block.layers[0]``, a property of its class.
                reached.extend(index.modules[position]
                               for position in _positions_within(
                                   positions, start, end))
    return reached, lists


def _property_classes(index: SubtreeIndex
                      ) -> List[Tuple[frozenset, List[int]]]:
    """For each class in ``index`` with properties (see
    :func:`_class_members`): its properties' names, and where its modules
    lie in the index."""
    memo = unchanged_memo('property classes')
    known = None if memo is None else memo.get(id(index))
    if known is not None and known[0] is index:
        return known[1]
    found = []
    for cls, positions in index.by_class.items():
        properties = _class_members(cls)[1]
        if properties:
            found.append((properties, positions))
    if memo is not None:
        memo[id(index)] = (index, found)
    return found


def _positions_within(positions: List[int], start: int,
                      end: int) -> List[int]:
    """The entries of ascending ``positions`` from ``start`` to before
    ``end``."""
    return positions[bisect.bisect_left(positions, start):bisect.
                     bisect_left(positions, end)]


def _members_named(module: nn.Module, names: frozenset,
                   properties_only: bool = False) -> bool:
    """Whether ``names`` (read by code above ``module``) name a method or
    property of its class other than ``forward`` (only a property, with
    ``properties_only``), outside torch's classes."""
    methods, properties = _class_members(type(module))
    members = properties if properties_only else methods
    return bool(members) and not members.isdisjoint(names)


def _class_members(cls: type) -> Tuple[frozenset, frozenset]:
    """The names of the methods and properties (with the methods) of
    ``cls`` and its bases but torch's, ``forward`` aside: ``(methods and
    properties, properties)``; kept while no module changes."""
    memo = unchanged_memo('class members')
    known = None if memo is None else memo.get(cls)
    if known is not None:
        return known
    members, properties = set(), set()
    for namespace in class_namespaces(cls):
        for name, value in namespace.items():
            if name == 'forward':
                continue
            if isinstance(value, _PROPERTIES):
                properties.add(name)
                members.add(name)
            elif callable(value) or isinstance(value, _METHODS):
                members.add(name)
    known = (frozenset(members), frozenset(properties))
    if memo is not None:
        memo[cls] = known
    return known


#: Methods by which a class answers reads of its attributes itself.
_LOOKUP_HOOKS = frozenset({'__getattr__', '__getattribute__'})


def _unread_member(cls: type, name: str) -> bool:
    """Whether member ``name`` of ``cls`` runs code no reading of
    :func:`_forward_code` sees (see :func:`_opaque`), or none at all."""
    value = inspect.getattr_static(cls, name, None)
    return _opaque(value) or not functions_in(value)


def _may_reach_below(module: nn.Module) -> bool:
    """Whether a call of ``module`` may reach below the modules it calls,
    or iterate a list of them that holds Sequentials (see
    :func:`_reached_below`): then it is traced."""
    reached, lists = _reached_below(module)
    return bool(reached) or lists


def names_read_above(model: nn.Module, path: str) -> Optional[frozenset]:
    """The attribute names that the code of the modules above the module
    at ``path`` may read on other objects than themselves (``self.block.
    groups``, ``self.block.alpha``), read from their code (see
    :func:`_forward_code`); ``None`` where a module above runs a forward
    of its own (anything may be read)."""
    names: Set[str] = set()
    parts = path.split('.') if path else []
    holder = model
    # (The same for every module of a class without a forward of its
    # own: kept while no class changes.)
    memo = class_memo('names read by')
    for part in parts:
        key = (type(holder), 'forward' in holder.__dict__, part)
        read = _MISSING if memo is None else memo.get(key, _MISSING)
        if read is _MISSING:
            read = _names_read_by(holder, part)
            if memo is not None:
                memo[key] = read
        if read is None:
            return None
        names.update(read)
        holder = holder._modules.get(part)
        if holder is None:
            return None
    return frozenset(names)


def _names_read_by(module: nn.Module, child: str) -> Optional[frozenset]:
    """What :func:`names_read_above` takes from one module, which holds
    the next module on the way as ``child`` (``None``: anything, where
    its code hands the module or that child on, walks modules, or calls
    ``getattr`` on another object: ``getattr(self.block, 'groups')``,
    ``helper(self.block)``, ``vars(self.block)``)."""
    if not runs_class_forward(module):
        return None
    if is_stock_sequential(module) or _is_container(module):
        return frozenset()
    if _reads_any_attribute(type(module)) or \
            child in _forward_code(type(module)).taken:
        return None
    return _forward_code(type(module)).deep


def reached_inside(model: nn.Module) -> Dict[int, Set[int]]:
    """What code outside each module of ``model`` may call or read inside
    it, read from the code of the modules above (no trace): by ``id`` of
    the module, the ``id`` of each module inside it that a module above
    may reach (:func:`_reached_below`, where everything below a child is
    reached) or read by name (``self.block.branch(x)``, a call of a
    module inside the block).  For re-parameterization without an example
    input: a merge must keep such a module."""
    found: Dict[int, Set[int]] = {}
    for _, holder in walk_modules(model):
        if not holder._modules or is_stock_sequential(holder) or \
                is_mmcv_conv_module(holder) or _is_container(holder):
            continue
        reached = {id(m) for m in _reached_below(holder)[0]}
        deep = _forward_code(type(holder)).deep \
            if runs_class_forward(holder) else None
        for name, child in _callable_children(holder):
            everything = deep is None or id(child) in reached
            # A module whose methods other than forward the code calls
            # (``self.block.branch_out(x)``): anything inside it.
            inside = {
                id(sub)
                for _, top in walk_modules(child)
                if deep is not None and _members_named(top, deep)
                for _, sub in walk_modules(top)
            }
            for path, below in walk_modules(child):
                if not path:
                    continue
                if everything or id(below) in reached or \
                        id(below) in inside or \
                        path.rpartition('.')[2] in deep:
                    # Each module on the way down holds it.
                    way = path.split('.')
                    inner = child
                    found.setdefault(id(inner), set()).add(id(below))
                    for part in way[:-1]:
                        inner = inner._modules[part]
                        found.setdefault(id(inner), set()).add(id(below))
    return found


def _callable_children(module: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The children of ``module`` and the entries of its lists and dicts
    of modules (its forward's callees), with their names."""
    found = []
    pending = list(module._modules.items())
    while pending:
        name, child = pending.pop()
        if child is None:
            continue
        if _is_container(child):
            pending.extend(child._modules.items())
        else:
            found.append((name, child))
    return found


def _keyword_names(code: Any) -> Set[str]:
    """The keyword argument names of the calls ``code`` makes: the tuple
    of ``KW_NAMES`` (Python 3.11, 3.12), or the constant loaded right
    before ``CALL_KW`` (3.13 on) or ``CALL_FUNCTION_KW`` (up to 3.10)."""
    found: Set[str] = set()
    previous = None
    for op in dis.get_instructions(code):
        names = None
        if op.opname == 'KW_NAMES':
            # (Python 3.11's dis leaves argval unresolved: the constant.)
            names = code.co_consts[op.arg] if op.arg is not None and \
                op.arg < len(code.co_consts) else None
        elif op.opname in ('CALL_KW', 'CALL_FUNCTION_KW') and \
                previous is not None and previous.opname == 'LOAD_CONST':
            names = previous.argval
        if isinstance(names, tuple):
            found.update(n for n in names if isinstance(n, str))
        previous = op
    return found


def _names_in_class(cls: type) -> frozenset:
    """Every name the code of ``cls``'s methods (but ``__init__``), and of
    its bases' that are not torch's, loads or reads as an attribute."""
    return _class_code(cls)[0]


def _traced_argument(arg: Any) -> bool:
    """Whether a call's argument in a graph is a traced value, or a list
    or tuple of them (a module traced with a list argument is only where
    every call passes one)."""
    if isinstance(arg, (list, tuple)):
        return all(isinstance(item, fx.Node) for item in arg)
    return isinstance(arg, fx.Node)


def _reads_a_proxy(error: Exception) -> bool:
    """Whether a failed trace tried to iterate over a traced value or
    take its ``len``: a list argument of unknown length would fail the
    same way (multi-level heads, ``for x in feats``), so tracing with one
    (and first the caller, to see what it passes) is not tried."""
    message = str(error)
    return (isinstance(error, fx.proxy.TraceError)
            and 'cannot be iterated' in message) or (
                isinstance(error, RuntimeError)
                and "'len' is not supported" in message)


class _StructuralCollector:

    def __init__(self, model: nn.Module,
                 norms: Optional[Collection[int]] = None):
        self.model = model
        self.evidence = Evidence(mode='structural')
        self.traces = TraceCache(model)
        # Path of each module (made when first needed), and the graphs of
        # the callers of modules traced with list arguments (``None``
        # where the trace failed).
        self.paths: Optional[Dict[int, str]] = None
        self.caller_graphs: Dict[int, Optional[fx.Graph]] = {}
        # Forwards traced with list arguments where a plain trace failed.
        self.list_forwards: Set[Any] = set()
        # The graph of each module traced, and the calls of layers each
        # such graph showed, by the module's id.
        self.graphs: Dict[int, Tuple[nn.Module, fx.Graph]] = {}
        self.traced_calls: Dict[int, List[Occurrence]] = {}
        # mmcv ConvModules a traced forward calls with ``norm=False``.
        self.norm_skipped: Dict[int, nn.Module] = {}
        # The modules holding each module (made when first needed).
        self.parents: Optional[Dict[int, List[nn.Module]]] = None
        # ids of: every leaf conv and norm; the norms; the foldable ones;
        # the convs a norm may fold into here (not linear layers: see
        # ``only_linear``); modules registered under more than one name.
        self.leaf_layers, self.norms, self.foldable = set(), set(), set()
        self.foldable_into: Set[int] = set()
        # Norms whose links are looked for (``None``: all).
        self.wanted = None if norms is None else set(norms)
        # The methods and properties code above may call on each module
        # (by ``id``): see ``check_methods_called_from_above``.
        self.called_entries: Dict[int, frozenset] = {}
        seen, self.aliased = set(), set()
        for _, m in walk_modules(model, remove_duplicate=False):
            if id(m) in seen:
                self.aliased.add(id(m))
                continue
            seen.add(id(m))
            if not _is_leaf_layer(m):
                continue
            self.leaf_layers.add(id(m))
            if is_conv_layer(m) and not isinstance(m, nn.Linear):
                self.foldable_into.add(id(m))
            if not is_conv_layer(m):
                self.norms.add(id(m))
                problem = self.evidence.norm_problems[id(m)] = \
                    norm_fold_problem(m)
                if problem is None and (self.wanted is None
                                        or id(m) in self.wanted):
                    self.foldable.add(id(m))

    def link(self, kind: str, norm: Occurrence, convs: List[Occurrence],
             evidence: str) -> None:
        """Link ``norm`` to ``convs`` (see :meth:`Evidence.link`), where
        its links are looked for."""
        if self.wanted is None or id(norm.module) in self.wanted:
            self.evidence.link(kind, norm, convs, evidence)

    def ancestors(self, module: nn.Module) -> List[nn.Module]:
        """Every module above ``module`` (through any of its names)."""
        if self.parents is None:
            self.parents = {}
            for _, holder in walk_modules(self.model):
                for child in holder._modules.values():
                    if child is not None:
                        self.parents.setdefault(id(child), []).append(holder)
        found: List[nn.Module] = []
        seen = set()
        stack = list(self.parents.get(id(module), ()))
        while stack:
            holder = stack.pop()
            if id(holder) in seen:
                continue
            seen.add(id(holder))
            found.append(holder)
            stack.extend(self.parents.get(id(holder), ()))
        return found

    def is_leaf(self, module: nn.Module) -> bool:
        return id(module) in self.leaf_layers

    def is_norm(self, module: nn.Module) -> bool:
        return id(module) in self.norms

    def direct_layers(self, module: nn.Module) -> Iterator[nn.Module]:
        """The convs and norms ``module``'s forward may call directly.

        Looks through module containers without a forward (``ModuleList``,
        ``ModuleDict``), whose children are called by this module's forward.
        """
        for child in module.children():
            if self.is_leaf(child):
                yield child
            elif _is_container(child):
                yield from self.direct_layers(child)

    def occurrence(self, module: nn.Module, holder: nn.Module,
                   attr: str) -> Occurrence:
        occ = Occurrence(module, (holder, attr))
        self.evidence.occurrences.append(occ)
        return occ

    # -- nn.Sequential -----------------------------------------------------
    def sequential(self, seq: nn.Sequential) -> None:
        items = [(attr, m) for attr, m in seq._modules.items()
                 if m is not None]
        occs: List[Optional[Occurrence]] = []
        for attr, module in items:
            occs.append(
                self.occurrence(module, seq, attr)
                if self.is_leaf(module) else None)
        # Norms after a conv first, then norms before one: a conv between
        # two norms may absorb both.
        for index, occ in enumerate(occs):
            if occ is None or not self.is_norm(occ.module) or index == 0:
                continue
            prev = occs[index - 1]
            if prev is not None and is_conv_layer(prev.module):
                self.link(POST, occ, [prev], 'sequential')
        for index, occ in enumerate(occs):
            if occ is None or not self.is_norm(occ.module) or \
                    occ.link is not None or occ.reason is not None:
                continue
            nxt = occs[index + 1] if index + 1 < len(occs) else None
            if nxt is not None and is_conv_layer(nxt.module):
                self.link(PRE, occ, [nxt], 'sequential')
            else:
                before = type(items[index - 1][1]).__name__ \
                    if index > 0 else 'the Sequential input'
                occ.reason = f'follows {before} in a Sequential'

    # -- mmcv ConvModule ---------------------------------------------------
    def conv_module(self, block: nn.Module) -> None:
        conv = getattr(block, 'conv', None)
        if conv is None:
            return
        conv_occ = self.occurrence(conv, block, 'conv')
        if not getattr(block, 'with_norm', False):
            return
        norm_name = block.norm_name
        norm_occ = self.occurrence(getattr(block, norm_name), block, norm_name)
        passes_norm = next(
            (type(m).__name__ for m in self.ancestors(block)
             if 'norm' in _class_code(type(m))[1]), None)
        if passes_norm:
            # ``forward(x, activate=True, norm=True)``: a call that passes
            # norm=False uses the conv without the norm.
            norm_occ.reason = (f'{passes_norm} passes a norm= argument: its '
                               'ConvModule may run without the norm')
            return
        order = [layer for layer in block.order
                 if layer != 'act' or block.with_activation]
        conv_at, norm_at = order.index('conv'), order.index('norm')
        if norm_at == conv_at + 1:
            self.link(POST, norm_occ, [conv_occ], 'conv_module')
        elif conv_at == norm_at + 1 and not block.with_explicit_padding:
            self.link(PRE, norm_occ, [conv_occ], 'conv_module')
        elif conv_at == norm_at + 1:
            norm_occ.reason = ('runs before an explicit padding layer and '
                               'the conv')
        else:
            norm_occ.reason = (f'ConvModule order {tuple(block.order)}: an '
                               'activation lies between conv and norm')

    # -- anything torch.fx can trace ---------------------------------------
    def call_occurrence(self, root: nn.Module, path: str,
                        target: nn.Module) -> Occurrence:
        holder, attr = _resolve(root, path)
        occ = self.occurrence(target, holder, attr)
        if id(target) in self.aliased:
            # Registered under several names: which one the forward called
            # cannot be told from the graph.
            occ.site = None
        return occ

    def parameter_read(self, root: nn.Module, path: str,
                       metadata_only: bool = False) -> None:
        """A traced op used a tensor of a conv or norm outside a call of
        it (``F.conv2d(x, self.conv.weight)``, ``self.conv.forward(x)``):
        an unlinked use that keeps the layer from being folded in
        place.  A read of only its dtype, device or shape
        (``metadata_only``) keeps a norm (a fold leaves an Identity, which
        has none), not a conv."""
        owner_path = path.rpartition('.')[0]
        if owner_path:
            self.used_inside(root, owner_path, metadata_only)

    def used_inside(self, root: nn.Module, path: str,
                    metadata_only: bool = False,
                    why: str = 'its parameters are used outside a call of '
                    'it') -> None:
        """The module at ``path`` below ``root`` (a conv or norm, or a
        module inside one: the parametrization that computes a conv's
        weight) was used outside a call of the layer: see
        :meth:`parameter_read`."""
        try:
            found = self.layer_at_or_above(root, path)
        except AttributeError:
            return  # not a submodule's tensor (a constant of the trace)
        if found is None:
            return
        layer_path, layer = found
        if metadata_only and not self.is_norm(layer):
            return  # a conv that takes a fold keeps its tensors' kind
        occ = self.call_occurrence(root, layer_path, layer)
        occ.reason = why

    def layer_at_or_above(self, root: nn.Module, path: str
                          ) -> Optional[Tuple[str, nn.Module]]:
        """The conv or norm at ``path`` below ``root``, or the nearest one
        above it there (a read of ``conv.parametrizations.weight`` is a
        read of ``conv``'s weight), as ``(its path, it)``; ``None`` if
        there is none.

        Raises:
            AttributeError: Nothing is registered at ``path``.
        """
        module = find_submodule(root, path)
        while True:
            if self.is_leaf(module):
                return path, module
            if '.' not in path:
                return None
            path = path.rpartition('.')[0]
            module = find_submodule(root, path)

    def traced(self, module: nn.Module) -> None:
        if not runs_class_forward(module):
            # What the trace of its class's forward shows is not what a
            # call of it runs.
            self.evidence.unproven.append(
                (module, f'data flow not proven: {type(module).__name__} '
                 'is not called through its class\'s forward (a forward '
                 'of its own, or __call__ overridden)'))
            return
        # A proxy stands for an argument given, and is never None nor
        # identical to a flag: ``if scale is None`` then takes the way of a
        # call that gives one, whatever the callers do.
        forward = type(module).forward
        for names, why in (
            (_optional_parameters(forward), 'takes optional arguments ({}):'
             ' whether a call gives them cannot be traced'),
            (_identity_tested_parameters(forward, type(module)),
             'compares {} (or a value from it) by identity (is None, is a '
             'flag): a call may pass None or a flag, which a traced value '
             'never is')):
            if names:
                self.evidence.unproven.append(
                    (module, f'data flow not proven: {type(module).__name__}'
                     f'.forward {why.format(names)}'))
                return
        # A forward whose plain trace failed where a trace with list
        # arguments did (DenseNet's layers test ``isinstance(x, Tensor)``)
        # is traced with lists first at its other modules: the graph
        # holds for the calls the holder's trace shows, all of them.
        tried_lists = forward in self.list_forwards
        graph = self.traced_with_lists(module) if tried_lists else None
        try:
            if graph is None:
                graph = self.traces.trace(module)
        except Exception as error:  # fx raises many types on Python code
            graph = None if _reads_a_proxy(error) or tried_lists else \
                self.traced_with_lists(module)
            if graph is not None:
                self.list_forwards.add(forward)
            if graph is None:
                first = str(error).strip().splitlines()
                detail = first[0][:120] if first else type(error).__name__
                self.evidence.unproven.append(
                    (module, f'data flow not proven: torch.fx cannot trace '
                     f'{type(module).__name__}.forward ({detail})'))
                return
        self.graphs[id(module)] = (module, graph)
        for path in getattr(graph, 'read_modules', ()):
            self.used_inside(
                module, path,
                why='read outside a call of it (its type, an attribute, '
                'whether it has a bias): a fold would change what is read')
        occs: Dict[fx.Node, Occurrence] = {}
        for node in graph.nodes:
            if node.op == 'get_attr':
                self.parameter_read(module, node.target,
                                    _metadata_only(node))
                continue
            if node.op != 'call_module':
                continue
            target = find_submodule(module, node.target)
            if is_mmcv_conv_module(target) and _skips_norm(node):
                self.norm_skipped[id(target)] = target
            if not self.is_leaf(target):
                if '.' in node.target:
                    # A module inside a conv or norm (a parametrization
                    # computing its weight) called from outside it.
                    self.used_inside(module, node.target)
                continue
            occ = self.call_occurrence(module, node.target, target)
            self.traced_calls.setdefault(id(module), []).append(occ)
            if node.meta.get('unfetched'):
                occ.reason = ('called through a reference other than its '
                              'attribute (a plain list, a partial): a fold '
                              'would not reach that call')
                continue
            occs[node] = occ
        pending = []
        for node, occ in occs.items():
            if not self.is_norm(occ.module):
                continue
            if len(node.args) != 1 or node.kwargs:
                occ.reason = 'called with extra arguments'
                continue
            convs = self._sources(node.args[0], occs)
            kind = POST if convs is not None and len(convs) == 1 else SUM
            if convs is None:
                convs = self._concat_sources(node.args[0], occs)
                kind = CONCAT
            if convs is None:
                pending.append((node, occ))
                continue
            self.link(kind, occ, [occs[c] for c in convs], 'fx')
        for node, occ in pending:
            users = list(node.users)
            if len(users) == 1 and users[0] in occs and \
                    is_conv_layer(occs[users[0]].module) and \
                    users[0].args == (node, ) and not users[0].kwargs:
                changed = _input_changed_before(module, node, users[0])
                if changed is None:
                    self.link(PRE, occ, [occs[users[0]]], 'fx')
                else:
                    occ.reason = (
                        f'its input may be changed in place ({changed}) '
                        'before the conv reads its output: after a fold '
                        'the conv would read the changed input')
            else:
                occ.reason = self._describe(node.args[0])

    @staticmethod
    def _sources(node, occs) -> Optional[List[fx.Node]]:
        """Conv nodes whose outputs ``node`` is (one, or a plain sum)."""
        if not isinstance(node, fx.Node) or len(node.users) != 1:
            return None
        if node in occs:
            if is_conv_layer(occs[node].module):
                return [node]
            return None
        is_add = (node.op == 'call_function' and node.target in
                  (operator.add, torch.add, operator.iadd)) or \
            (node.op == 'call_method' and node.target == 'add')
        if not is_add or len(node.args) != 2 or node.kwargs or \
                node.args[0] is node.args[1]:
            return None
        found = []
        for arg in node.args:
            inner = _StructuralCollector._sources(arg, occs)
            if inner is None:
                return None
            found.extend(inner)
        return found

    @staticmethod
    def _concat_sources(node, occs) -> Optional[List[fx.Node]]:
        """Conv nodes that ``node`` concatenates along dim 1, in order."""
        if not isinstance(node, fx.Node) or len(node.users) != 1 or \
                node.op != 'call_function' or node.target is not torch.cat:
            return None
        parts = node.args[0] if node.args else node.kwargs.get('tensors')
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get(
            'dim', 0)
        if dim != 1 or not isinstance(parts, (list, tuple)) or \
                len(set(parts)) != len(parts):
            return None
        for part in parts:
            if not isinstance(part, fx.Node) or part not in occs or \
                    not is_conv_layer(occs[part].module) or \
                    len(part.users) != 1:
                return None
        return list(parts)

    def traced_with_lists(self, module: nn.Module) -> Optional[fx.Graph]:
        """The graph of ``module.forward`` traced with the arguments its
        caller passes as lists taken as lists of unknown length (see
        ``trace_module_forward``), or ``None``.

        The caller is the module that holds ``module`` (through module
        containers): its own trace shows what each of its calls of
        ``module`` passes.  Only where every call passes a list at a
        position, and nothing but positional arguments, is the parameter
        there taken as a list; a module registered under several names is
        not tried (its calls cannot be told apart), nor one that a module
        above the caller may call itself (:meth:`reached_from_above`).
        """
        if id(module) in self.aliased:
            return None
        if self.paths is None:
            self.paths = {id(m): p for p, m in walk_modules(self.model)}
        path = self.paths.get(id(module))
        if not path:
            return None
        caller_path = path
        while True:
            caller_path = caller_path.rpartition('.')[0]
            caller = find_submodule(self.model, caller_path)
            if not isinstance(caller, (nn.ModuleList, nn.ModuleDict)) or \
                    not caller_path:
                break
        if isinstance(caller, (nn.ModuleList, nn.ModuleDict)):
            return None
        target = path[len(caller_path) + 1:] if caller_path else path
        if _optional_parameters(type(caller).forward) or \
                self.reached_from_above(caller_path, target):
            return None
        if id(caller) not in self.caller_graphs:
            try:
                self.caller_graphs[id(caller)] = self.traces.trace(caller)
            except Exception:  # fx raises many types on Python code
                self.caller_graphs[id(caller)] = None
        caller_graph = self.caller_graphs[id(caller)]
        if caller_graph is None:
            return None
        calls = [
            node for node in caller_graph.nodes
            if node.op == 'call_module' and node.target == target
        ]
        if not calls or any(node.kwargs for node in calls) or \
                len({len(node.args) for node in calls}) != 1:
            return None
        try:
            params = list(
                inspect.signature(type(module).forward).parameters)[1:]
        except (TypeError, ValueError):  # no signature to read
            return None
        lists = frozenset(
            params[index] for index in range(len(calls[0].args))
            if index < len(params) and all(
                isinstance(node.args[index], list) for node in calls))
        if not lists:
            return None
        try:
            return self.traces.trace(module, list_args=lists)
        except Exception:  # fx raises many types on Python code
            return None

    def reached_from_above(self, caller_path: str, target: str) -> bool:
        """Whether a module above the caller (at ``caller_path``) may call
        the module at ``target`` below the caller, or anything on the way,
        itself: whether the code of its class (any method but
        ``__init__``) names an attribute on that way past its own child
        (``self.block.layers[0](x)`` from the module holding ``block``).
        Those modules are not traced; their code is read instead."""
        parts = caller_path.split('.') if caller_path else []
        below = target.split('.')
        for depth in range(len(parts)):
            ancestor = find_submodule(self.model, '.'.join(parts[:depth]))
            deeper = {
                name
                for name in parts[depth + 1:] + below if not name.isdigit()
            }
            if deeper & _names_in_class(type(ancestor)):
                return True
        return False

    @staticmethod
    def _describe(source) -> str:
        if not isinstance(source, fx.Node):
            return 'input is not a traced value'
        if len(source.users) > 1:
            return 'its input is also used elsewhere'
        if source.op == 'call_module':
            return f'input comes from {source.target}, not a conv'
        target = getattr(source.target, '__name__', source.target)
        return f'input comes from {target}, not a conv'

    def run(self) -> Evidence:
        if unchanged_memo('subtree spans') is not None:
            # One index of the whole model serves the spans of every module
            # (one asked for first would index its own subtree alone).
            subtree_span(self.model)
        # Tracing is the cost: first the modules that call a foldable norm,
        # then the others with layers of their own or code that may reach
        # below their children, where they hold a linked layer (their uses
        # of it decide whether it is folded in place, copied or left).
        pending = []
        for _, module in walk_modules(self.model):
            if not module._modules:
                continue  # a layer, an activation: calls nothing
            if isinstance(module, torch.jit.ScriptModule):
                continue  # compiled: neither traced nor read
            if is_stock_sequential(module):
                self.sequential(module)
            elif is_mmcv_conv_module(module):
                self.conv_module(module)
            elif not self.is_leaf(module) and not _is_container(module):
                layers = list(self.direct_layers(module))
                if any(id(m) in self.foldable for m in layers):
                    if self.only_linear(module):
                        self.evidence.unproven.append(
                            (module, self.only_linear_reason(module)))
                    else:
                        self.traced(module)
                    continue
                if layers or _may_reach_below(module) or \
                        not runs_class_forward(module):
                    pending.append(module)
        # A module that may call a linked layer (one of its own, or one it
        # may reach inside a child: ``self.block.conv(x)``, a tap between
        # the layers of a Sequential it runs itself) is traced too, and
        # its trace may link more: repeat until nothing changes.
        while pending:
            holding = self.holders_of(self.linked_layers())
            ready = [m for m in pending if id(m) in holding]
            if not ready:
                break
            for module in ready:
                pending.remove(module)
                self.traced(module)
        for block in self.norm_skipped.values():
            self.unlink_norm_of(block)
        self.check_call_arguments()
        self.check_unproven_reach()
        self.check_methods_called_from_above()
        self.check_held_elsewhere()
        return self.evidence

    def unlink_layers(self, layers: Dict[int, str]) -> None:
        """Undo every link of the layers in ``layers`` (by ``id``, with
        why), as the norm's or a conv's."""
        if not layers:
            return
        for occ in self.evidence.occurrences:
            link = occ.link
            if link is None or link.norm is not occ:
                continue
            why = next((layers[id(m)] for m in
                        [occ.module] + [c.module for c in link.convs]
                        if id(m) in layers), None)
            if why is not None:
                self.unlink(occ, f'{why}: data flow not proven')

    def check_held_elsewhere(self) -> None:
        """A module whose state holds a module outside its own subtree
        (``self.ref = [other.conv]``, a weak reference, a partial) may
        call it, in ways no Sequential, ConvModule or trace showed: the
        links of the layers in what it holds are undone.  (Held within
        its subtree, the module's trace sees it, or its reach is read.)"""
        linked = self.linked_layers()
        if not linked:
            return
        layers: Dict[int, str] = {}
        walk = walk_modules(self.model)
        # Only attributes some code may read can be used: those the
        # module's own code names, and those any code names on another
        # object (``self.peek.held[0](x)``); all where that is not known.
        read_above: Optional[Set[str]] = set()
        for cls in {type(module) for _, module in walk}:
            if not _is_torch_class(cls):
                read_above.update(_forward_code(cls).deep)
        if any(not runs_class_forward(module) for _, module in walk):
            read_above = None
        # By class: whether its code is torch's, the attribute names its
        # modules' state may be read by (``None``: any), and the modules
        # held by what its code reads past its modules.
        by_class: Dict[type, Tuple[bool, Optional[Set[str]], List]] = {}
        for path, module in walk:
            cls = type(module)
            info = by_class.get(cls)
            if info is None:
                own_code = not _is_torch_class(cls)
                names = None
                if read_above is not None and \
                        cls.__call__ is nn.Module.__call__ and \
                        cls._call_impl is nn.Module._call_impl:
                    if not own_code:
                        names = read_above
                    else:
                        used = _names_used(cls)
                        names = None if used is None else read_above | used
                info = by_class[cls] = (
                    own_code, names,
                    _held_by_code_reads(module) if own_code else [])
            own_code, names, code_held = info
            if id(module) in self.leaf_layers and not own_code:
                continue  # torch's layers call nothing they hold
            entries = self.called_entries.get(id(module))
            if entries and own_code:
                # Methods code above calls (see
                # ``check_methods_called_from_above``) read more.
                extra = _names_used(cls, entries)
                names = None if names is None or extra is None else \
                    names | extra
                code_held = code_held + _held_by_code_reads(module, entries)
            state = module.__dict__
            keys = state.keys() - MODULE_INTERNALS
            if names is not None and 'forward' not in state:
                keys &= names  # (not for a forward of its own)
            held = [
                found for key in keys
                if not holds_only_settings(state[key], _NO_HOLDERS)
                for found in modules_held_in(state[key], _HELD_DEPTH)
            ]
            held.extend(code_held)
            if not held:
                continue
            index, start, end = subtree_span(module)
            own = {id(below) for below in index.modules[start:end]}
            for other in held:
                if id(other) in own:
                    continue
                for _, below in walk_modules(other):
                    if id(below) in linked:
                        layers.setdefault(
                            id(below), f'{type(module).__name__} ({path}) '
                            f'holds {type(other).__name__} outside its '
                            'module table and may call it')
        self.unlink_layers(layers)

    def linked_layers(self) -> Set[int]:
        """The ids of the layers linked now (a norm, or a conv on
        either side of one)."""
        return {
            id(occ.module)
            for occ in self.evidence.occurrences
            if occ.link is not None or occ.input_link is not None
        }

    def only_linear(self, module: nn.Module) -> bool:
        """Whether no norm can fold into a conv below ``module`` from
        structure alone: its only convs, if any, are linear layers (see
        ``_Planner.conv_target``).  Its forward is then not traced, and it
        counts as a module whose forward could not be (so nothing is
        assumed about how it calls the layers below it, for the links
        of modules above that reach into it)."""
        index, start, end = subtree_span(module)
        foldable_into = self.foldable_into
        return not any(
            id(below) in foldable_into for below in index.modules[start:end])

    def only_linear_reason(self, module: nn.Module) -> str:
        """Why a module :meth:`only_linear` holds is not traced."""
        name = type(module).__name__
        index, start, end = subtree_span(module)
        if not any(isinstance(below, nn.Linear)
                   for below in index.modules[start:end]):
            return (f'{name} was not traced: it holds no conv a norm could '
                    'fold into')
        return (f'{name} was not traced: it holds no conv but linear '
                'layers, and whether a norm normalises their features '
                'depends on the rank of the tensors, which structure '
                'alone cannot show (an example input can)')

    def check_unproven_reach(self) -> None:
        """A module whose forward was not read from a trace may call its
        own layers, and reach below the modules it calls
        (``self.stem[0](x)``), in ways nothing showed: the links of its
        own layers (made by a module above that reaches into it:
        ``self.block.bn(...)``) are undone, and, where its code may reach
        below (see :func:`_reached_below`; every child for a forward of
        the instance's own), those of the layers below the modules it
        calls (their Sequential, ConvModule or traced parent showed only
        the calls it makes itself)."""
        linked = self.linked_layers()
        layers: Dict[int, str] = {}
        for module, _ in self.evidence.unproven:
            index, start, end = subtree_span(module)
            if not any(id(below) in linked
                       for below in index.modules[start:end]):
                continue  # nothing linked below it to undo
            name = type(module).__name__
            for layer in self.direct_layers(module):
                layers.setdefault(
                    id(layer), f'{name}, whose forward was not traced, may '
                    'call this layer or its conv itself')
            reached = list(module.children()) \
                if not runs_class_forward(module) else \
                _reached_below(module)[0]
            for top in reached:
                for _, below in walk_modules(top):
                    if id(below) in self.leaf_layers:
                        layers.setdefault(
                            id(below), f'{name}, whose forward was not '
                            'traced, may reach below the modules it calls '
                            '(to this layer or its conv)')
        self.unlink_layers(layers)

    def check_methods_called_from_above(self) -> None:
        """A module's links hold for calls of its forward (its trace, its
        Sequential or ConvModule showed those).  Code above that calls
        another of its methods, or reads a property
        (``self.head.predict(x)``, ``self.block.features(x)``; by name:
        any module below whose class has one), runs that code instead,
        read from its bytecode as a forward's is, and the methods it
        names in turn: the links of the module's own layers that code
        names (calls or reads: ``self.conv(x)``, ``isinstance(self.bn,
        ...)``), and of the layers below what it reaches (see
        :func:`_reached_below`), are undone; of every layer below the
        module where that code hands the module on (but ``self(x)``, its
        forward), walks modules or calls ``getattr`` with a name made at
        run time."""
        linked = self.linked_layers()
        if not linked:
            return
        pending: List[Tuple[nn.Module, frozenset, str]] = []
        classes = {
            cls: _class_members(cls)[0]
            for cls in subtree_span(self.model)[0].by_class
        }
        # Any member of a class of the model; and whether one of them
        # answers reads of any name itself.
        every = frozenset().union(*classes.values())
        hooked = not every.isdisjoint(_LOOKUP_HOOKS)

        def note_calls(holder: nn.Module, deep: frozenset,
                       caller: str) -> None:
            if not hooked and every.isdisjoint(deep):
                return  # (most modules: nothing to look for)
            index, start, end = subtree_span(holder)
            for cls, positions in index.by_class.items():
                members = classes[cls]
                names = members & deep
                # (Its own ``__getattr__`` may answer any name, in code
                # above or in its methods; ``__getattribute__`` every one.)
                names |= members & _LOOKUP_HOOKS if names or \
                    deep - members else frozenset()
                if names:
                    pending.extend(
                        (index.modules[position], names, caller)
                        for position in _positions_within(
                            positions, start + 1, end))

        for _, holder in walk_modules(self.model):
            if not holder._modules or is_stock_sequential(holder) or \
                    _is_container(holder):
                continue
            cls = type(holder)
            if runs_class_forward(holder):
                note_calls(holder, _forward_code(cls).deep, cls.__name__)
            elif '__call__' in _class_members(cls)[0]:
                # A ``__call__`` of its own: what a call of it runs.
                pending.append((holder, frozenset({'__call__'}),
                                f'a call of {cls.__name__}'))
        layers: Dict[int, str] = {}
        done: Set[Tuple[int, frozenset]] = set()
        while pending:
            module, names, caller = pending.pop()
            if (id(module), names) in done:
                continue
            done.add((id(module), names))
            self.called_entries[id(module)] = self.called_entries.get(
                id(module), frozenset()) | names
            cls = type(module)
            deep = _code_of(cls, names).deep
            # What those methods call on modules below, in turn.
            note_calls(module, deep, cls.__name__)
            index, start, end = subtree_span(module)
            if not any(id(below) in linked
                       for below in index.modules[start:end]):
                continue  # nothing linked below it to undo
            used = _names_used(cls, names)
            why = (f'{caller} calls {cls.__name__}.'
                   f'{"/".join(sorted(names))} (not its forward), whose '
                   'code may call or read this layer or its conv')
            if used is None or '__getattribute__' in names or \
                    any(_unread_member(cls, name) for name in names):
                reached = [module]
            else:
                reached = [
                    child for attr, child in module._modules.items()
                    if attr in used and child is not None and (
                        self.is_leaf(child) or _is_container(child))
                ]
                reached.extend(_reached_below(module, names)[0])
            for top in reached:
                for _, below in walk_modules(top):
                    if id(below) in self.leaf_layers:
                        layers.setdefault(id(below), why)
        self.unlink_layers(layers)

    def check_call_arguments(self) -> None:
        """A module's trace stands for calls that pass traced values
        (tensors) at every parameter: where the trace of a module above
        shows a call passing anything else (``None``, a flag, an enum),
        the forward may take another way for it (by a test the trace
        cannot see and the reading of its code missed: an exception
        caught, the value's text), so the links of the module's own trace
        are undone."""
        for caller, graph in self.graphs.values():
            for node in graph.nodes:
                if node.op != 'call_module':
                    continue
                target = find_submodule(caller, node.target)
                if id(target) not in self.traced_calls:
                    continue
                given = list(node.args) + list(node.kwargs.values())
                if all(_traced_argument(arg) for arg in given):
                    continue
                for occ in self.traced_calls.pop(id(target)):
                    self.unlink(
                        occ, f'{type(target).__name__} is also called with '
                        f'an argument that is not a traced tensor (in '
                        f'{type(caller).__name__}.forward): its trace holds '
                        'only for tensors')

    @staticmethod
    def unlink(occ: Occurrence, reason: str) -> None:
        """Take back the link of a norm call ``occ`` (and its convs')."""
        link = occ.link
        if link is None or link.norm is not occ:
            return
        for conv in link.convs:
            if conv.side(link.kind) is link:
                if link.kind == PRE:
                    conv.input_link = None
                else:
                    conv.link = None
        occ.link = None
        occ.reason = reason

    def unlink_norm_of(self, block: nn.Module) -> None:
        """An mmcv ConvModule called with ``norm=False`` somewhere: the
        link its ``order`` gave its norm holds only for the other calls,
        and its conv's output is used without the norm there."""
        norm = getattr(block, block.norm_name, None) \
            if getattr(block, 'with_norm', False) else None
        for occ in self.evidence.occurrences:
            if occ.module is norm and occ.site is not None and \
                    occ.site[0] is block:
                self.unlink(
                    occ, 'its ConvModule is also called with norm=False: '
                    'the conv is used without the norm there')

    def holders_of(self, modules: Set[int]) -> Set[int]:
        """The ids of the modules that hold any of ``modules`` (ids)
        below them, under any of their names."""
        walk = walk_modules(self.model, remove_duplicate=False)
        by_path = dict(walk)
        found: Set[int] = set()
        seen_paths: Set[str] = set()
        for path, module in walk:
            if id(module) not in modules:
                continue
            while path:
                path = path.rpartition('.')[0]
                if path in seen_paths:
                    break  # and so are the paths above it
                seen_paths.add(path)
                found.add(id(by_path[path]))
        return found


def collect_structural_evidence(
        model: nn.Module,
        norms: Optional[Collection[int]] = None) -> Evidence:
    """Prove conv/norm data flow in ``model`` from its structure alone.

    Args:
        model: The model.
        norms: Only links of these norms (by ``id``) are looked for, the
            others are taken as norms that cannot fold (less to trace);
            by default those of every foldable norm.
    """
    return _StructuralCollector(model, norms).run()
