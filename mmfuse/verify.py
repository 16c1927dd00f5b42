"""Compare a fused model's output with the unfused reference.

Outputs may be any nesting of tuples, lists and dicts; every floating point
tensor is compared.  The relative error of a tensor is its largest absolute
error divided by its largest absolute reference value, so values near zero
do not blow it up.

When an output fails that tolerance, the unfused model is also measured
in a wider dtype (float32 for a float16/bfloat16 model, float64 for a
float32 one; :class:`OutputCheck`): its own rounding can put the unfused
output further from the exact one than any tolerance on the difference of
two outputs in its dtype would allow, and a fold is then judged by whether
it brings the output further from the wider one than the unfused model
already is.
"""
import copy
import math
from typing import (Any, Callable, Dict, List, NamedTuple, Optional, Set,
                    Sequence, Tuple, TypeVar)

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from .guards import FusionError, fresh_inputs
from .module_walk import walk_modules
from .output_tree import (FlatOutput, UncomparableOutput, flatten_output,
                          tensors_in)

__all__ = [
    'output_error', 'default_rtol', 'isolate_failures', 'Isolated',
    'search_checks', 'is_low_precision',
    'precise_dtype', 'upcast_output', 'OutputCheck', 'WiderTwin', 'TwinError',
    'output_check'
]

Item = TypeVar('Item')
Applied = TypeVar('Applied')


def leaf_errors(reference: Any,
                output: Any) -> Optional[List[Tuple[float, float]]]:
    """``(abs_error, rel_error)`` of each floating point leaf of ``output``
    against the one at its place in ``reference``, in order (see
    :func:`mmfuse.output_tree.flatten_output`: tensors in any container,
    dataclass or object, Python floats and numpy arrays).

    ``None`` when the outputs differ in structure, shape or a constant
    (an integer, a string), in an integer tensor, or ``output`` has a NaN
    the reference does not, or holds what cannot be compared.

    Raises:
        UncomparableOutput: ``reference`` holds what cannot be compared.
    """
    ref = flatten_output(reference)
    try:
        out = flatten_output(output)
    except UncomparableOutput:
        return None
    if ref.spec != out.spec:
        return None
    errors = []
    for ref_leaf, out_leaf in zip(ref.leaves, out.leaves):
        if ref_leaf.shape != out_leaf.shape:
            return None
        if not ref_leaf.is_floating_point():
            if ref_leaf.dtype != out_leaf.dtype or \
                    not torch.equal(ref_leaf, out_leaf):
                return None
            continue
        errors.append(_tensor_error(ref_leaf, out_leaf))
        if errors[-1] is None:
            return None
    return errors


def _tensor_error(ref: Tensor, out: Tensor) -> Optional[Tuple[float, float]]:
    """``(abs_error, rel_error)`` of one floating point tensor, over the
    places where ``ref`` is finite; ``None`` where the two differ where it
    is not (``out`` must have the same inf, or a NaN, there: an overflow
    that a fold scales back into range changes the output too) or ``out``
    has a NaN ``ref`` has not."""
    if ref.numel() == 0:
        return 0.0, 0.0
    ref, out = ref.detach(), out.detach()
    if out.is_floating_point() and bool(torch.isfinite(ref).all()) and \
            bool(torch.isfinite(out).all()):
        # The common case, in one float64 tensor (the values of ``ref``
        # and ``out`` convert exactly): no inf or NaN to match.
        diff = ref.to(torch.float64, copy=True).sub_(out).abs_()
        low, high = torch.aminmax(ref)
        abs_err = float(diff.max())
        scale = max(-float(low), float(high))
        return abs_err, abs_err / scale if scale > 0 else abs_err
    ref64 = ref.double()
    out64 = out.double()
    if bool((torch.isnan(out64) & ~torch.isnan(ref64)).any()):
        return None
    finite = torch.isfinite(ref64)
    if not bool(finite.all()):
        odd_ref, odd_out = ref64[~finite], out64[~finite]
        if not bool(((odd_ref == odd_out) |
                     (torch.isnan(odd_ref) & torch.isnan(odd_out))).all()):
            return None
    diff = (ref64 - out64).abs()[finite]
    if diff.numel() == 0:
        return 0.0, 0.0
    abs_err = float(diff.max())
    scale = float(ref64[finite].abs().max())
    return abs_err, abs_err / scale if scale > 0 else abs_err


def output_error(reference: Any, output: Any) -> Tuple[float, float]:
    """``(max_abs_error, max_rel_error)`` between two model outputs, over
    their floating point tensors (:func:`leaf_errors`).

    Returns ``(inf, inf)`` when the outputs differ in structure, shape or
    contain a NaN the reference does not.
    """
    errors = leaf_errors(reference, output)
    if errors is None:
        return float('inf'), float('inf')
    return (max((e[0] for e in errors), default=0.0),
            max((e[1] for e in errors), default=0.0))


def default_rtol(model: nn.Module) -> float:
    """Relative error above which a fold counts as broken.

    1e-4 for float32/float64 models (folding itself measures 1e-7 to 1e-6),
    5e-2 for float16/bfloat16 models, whose rounding dominates.
    """
    return 5e-2 if is_low_precision(model) else 1e-4


def is_low_precision(model: nn.Module) -> bool:
    """Whether ``model`` has float16 or bfloat16 parameters."""
    return precise_dtype(model) == torch.float32


def precise_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The dtype of the copy an :class:`OutputCheck` measures ``model``
    against: float32 for a model with float16 or bfloat16 parameters,
    float64 for one with float32 parameters, else ``None`` (nothing more
    precise to compare with)."""
    dtypes = {
        param.dtype
        for _, module in walk_modules(model)
        for param in module._parameters.values() if param is not None
    }
    if dtypes & {torch.float16, torch.bfloat16}:
        return torch.float32
    if torch.float32 in dtypes:
        return torch.float64
    return None


def dtype_name(dtype: torch.dtype) -> str:
    """``'float64'`` for ``torch.float64``."""
    return str(dtype).replace('torch.', '')


def cast_inputs(inputs: Tuple, dtype: torch.dtype) -> Tuple:
    """``inputs`` with their floating point tensors cast to ``dtype``."""

    def cast(value: Any) -> Any:
        if isinstance(value, Tensor) and value.is_floating_point():
            return value.to(dtype)
        return value

    return tree_map(cast, inputs)


def upcast_output(model: nn.Module, inputs: Tuple, dtype: torch.dtype) -> Any:
    """The output of ``model`` computed in ``dtype`` on ``inputs`` (their
    floating point tensors cast to ``dtype``); ``model`` is not changed.

    The forward runs on a copy of ``model`` that shares its parameters and
    buffers (so state the forward caches on its modules stays on the copy;
    hooks registered on its modules are copied with them and run there).
    Each module of the copy holds its own floating point parameters and
    buffers in ``dtype`` only while its forward runs: casting a layer at a
    time reuses freed memory, where casting the whole model at once would
    take fresh memory for all of it (0.3 s on a ResNet-50 detector here,
    against 11 ms).  Code that reads another module's parameters outside
    that module's forward sees them in their own dtype.  A module whose
    forward raises keeps its cast tensors, in the copy only, which is let
    go; a module the copy shares with ``model`` (a custom
    ``__deepcopy__``) is never cast.
    """
    tensors = {
        id(tensor): tensor
        for _, module in walk_modules(model)
        for table in (module._parameters, module._buffers)
        for tensor in table.values() if tensor is not None
    }
    upcast = copy.deepcopy(model, memo=tensors)
    # Only the copy's own modules (not one a custom __deepcopy__ shares
    # with the model) have their tensors swapped.
    modules = {id(module) for _, module in walk_modules(upcast)} - \
        {id(module) for _, module in walk_modules(model)}
    own: Dict[int, List[Tuple[Dict, str, Tensor]]] = {}

    def cast_own(module: nn.Module, args: Any) -> None:
        if id(module) not in modules or id(module) in own:
            return
        swapped = own[id(module)] = []
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is None or not tensor.is_floating_point() or \
                        tensor.dtype == dtype:
                    continue
                swapped.append((table, name, tensor))
                wide = tensor.detach().to(dtype)
                table[name] = nn.Parameter(wide, requires_grad=False) \
                    if isinstance(tensor, nn.Parameter) else wide

    def restore_own(module: nn.Module, args: Any, output: Any) -> None:
        for table, name, tensor in own.pop(id(module), ()):
            table[name] = tensor

    pre = nn.modules.module.register_module_forward_pre_hook(cast_own)
    post = nn.modules.module.register_module_forward_hook(restore_own)
    try:
        with torch.no_grad():
            return upcast(*fresh_inputs(cast_inputs(inputs, dtype)))
    finally:
        pre.remove()
        post.remove()


class OutputCheck:
    """Whether a changed model's output is acceptable.

    It is when each floating point tensor of it is within ``tolerance``
    (relative error) of that tensor of ``reference``, the unchanged
    model's output.  Rounding can put that reference further from the
    exact output than ``tolerance``: a float16/bfloat16 model's own, or a
    float32 model whose ops amplify it (deformable convs compute sampling
    offsets from features).  So once :meth:`add_precise` has measured the
    unchanged model in a wider dtype (``precise``), a tensor is also
    acceptable when its error against that is at most :attr:`MARGIN` times
    the unchanged model's own error there: tensor by tensor, so the
    rounding of one output buys no slack for another.

    Args:
        reference: The unchanged model's output.
        tolerance: Largest relative error accepted against ``reference``.
        precise: The unchanged model's output in a wider dtype, or
            ``None``.
    """

    #: How much further from the wider output than the unchanged model a
    #: changed model's output may be.  A fold rounds its new weights to the
    #: model's dtype once more, a source of error the unchanged model does
    #: not have, of the same order as its own rounding; a wrong fold moves
    #: the output by the size of the output.
    MARGIN = 2.0

    #: The same, once the changes themselves have been judged on a
    #: :class:`WiderTwin`: what is left to judge is only what the model's
    #: dtype makes of exact changes (an overflow, a NaN), against the
    #: largest own error of any output tensor.  In a model that amplifies
    #: rounding, the changed model's output is another draw from the same
    #: cloud of rounding noise as the unchanged one's: against the
    #: tensor-by-tensor ``MARGIN`` of 2, some tensor of a DCNv2 detector
    #: fails by chance.
    TWIN_MARGIN = 4.0

    #: The largest own error (relative, in any output tensor) of a model
    #: whose wider copy is a yardstick, by the copy's dtype.  Beyond it the
    #: copy does not compute what the model computes (state outside its
    #: parameters and buffers, hooks keyed to the model's own module
    #: objects) or the model is too unstable for any comparison, and
    #: ``MARGIN`` times it would let a wrong fold through.  Float32 rounding
    #: amplified by deformable convs measures 3.5e-4; bfloat16 rounding
    #: through 24 conv layers (``tests/test_safety.py``), 0.16.
    OWN_LIMITS = {'float64': 1e-3, 'float32': 0.25}

    def __init__(self, reference: Any, tolerance: float,
                 precise: Optional[Any] = None):
        # A copy: a model may write into the tensors it returned (a buffer
        # it returns) on its next call.
        self.reference = flatten_output(reference, clone=True)
        self.tolerance = tolerance
        self.abs_error: Optional[float] = None
        self.rel_error: Optional[float] = None
        self.precise: Optional[Any] = None
        #: The unchanged model's largest relative error against
        #: ``precise`` (also when that was too large to use it).
        self.own_error: Optional[float] = None
        self.precise_error: Optional[float] = None
        #: The output checked last.
        self.last_output: Any = None
        #: Whether the output checked last could not be compared at all
        #: (another structure, shape or constant).
        self.mismatch = False
        #: The dtype of ``precise`` (``'float32'``, ``'float64'``), or why
        #: none is used: set by :meth:`add_precise`.
        self.yardstick: Optional[str] = None
        self._own_errors: List[float] = []
        #: Whether the wider copy was refused only for being too far from
        #: the unchanged model (its own error measured, finite, beyond the
        #: limit): a model too rough in its dtype to judge changes by, or
        #: a copy that computes otherwise (:class:`WiderTwin` tells which).
        self.too_rough = False
        self.margin = self.MARGIN
        #: Whether outputs are measured against a twin (:meth:`use_twin`).
        self.against_twin = False
        #: The wider output refused for being too far from the unchanged
        #: model's (:attr:`too_rough`), flattened, where asked for
        #: (:meth:`add_precise`): a :class:`WiderTwin` of the model starts
        #: from it.
        self.rough: Optional[FlatOutput] = None
        if precise is not None:
            name = _dtype_name(precise)
            self._set_precise(precise, name,
                              self.OWN_LIMITS.get(name, math.inf))

    def add_precise(self, model: nn.Module, inputs: Tuple,
                    keep_rough: bool = False) -> None:
        """Measure ``model``, which must be the unchanged model, in the
        wider dtype of :func:`precise_dtype`, once.

        A model that has no wider dtype, fails to run in it, or whose copy
        lands too far from its own output keeps the plain tolerance; the
        reason is left in :attr:`yardstick`.  With ``keep_rough``, an
        output refused for being too far is kept as :attr:`rough`.
        """
        if self.yardstick is not None:
            return
        dtype = precise_dtype(model)
        if dtype is None:
            self.yardstick = 'none: no float32 or narrower parameters'
            return
        name = dtype_name(dtype)
        try:
            precise = upcast_output(model, inputs, dtype)
        except Exception as error:  # the model's code, in another dtype
            self.yardstick = (f'none: the {name} copy of the model failed '
                              f'({type(error).__name__}: {error})')
            return
        self._set_precise(precise, name, self.OWN_LIMITS[name], keep_rough)

    def _set_precise(self, precise: Any, name: str, limit: float,
                     keep_rough: bool = False) -> None:
        """Use ``precise`` where each tensor of the unchanged output is at
        most ``limit`` from it, measured both ways, so that a place where
        either is not finite and the other is counts as infinitely far: an
        unchanged output that overflows in its dtype says nothing about a
        fold, and a copy that is NaN where the model is not would hide
        any error of the fold there.  With ``keep_rough``, one refused for
        being too far (finite) is kept as :attr:`rough`."""
        try:
            precise = flatten_output(precise, clone=True)
        except UncomparableOutput:
            precise = None
        forward = None if precise is None else \
            leaf_errors(precise, self.reference)
        backward = leaf_errors(self.reference, precise)
        if forward is None or backward is None or \
                len(forward) != len(backward):
            self.own_error = math.inf
            self.yardstick = (f'none: the {name} copy\'s output differs '
                              'from the model\'s in structure, shape, '
                              'integer values or NaNs')
            return
        own = [max(f[1], b[1]) for f, b in zip(forward, backward)]
        self.own_error = max(own, default=0.0)
        if self.own_error <= limit:
            self.precise = precise
            self._own_errors = own
            self.yardstick = name
        else:
            self.too_rough = math.isfinite(self.own_error)
            self.rough = precise if self.too_rough and keep_rough else None
            self.yardstick = (f'none: the {name} copy is {self.own_error:.3g}'
                              ' away from the model\'s output')

    def use_twin(self, twin: 'WiderTwin') -> None:
        """Judge outputs against ``twin``'s unchanged output from now on,
        however far the unchanged model is from it: where the changes
        themselves are judged on the twin (:meth:`WiderTwin.holds`), this
        check is left to judge only what the model's dtype makes of them
        (:attr:`TWIN_MARGIN` times its largest own rounding error)."""
        self.too_rough = False
        self.rough = None
        self._set_precise(twin.unchanged, twin.dtype_name, math.inf)
        self._own_errors = [self.own_error] * len(self._own_errors)
        self.margin = self.TWIN_MARGIN
        self.against_twin = True

    def __call__(self, output: Any) -> bool:
        """Check ``output``; the errors measured stay on the object (and
        ``output``, flattened, as :attr:`last_output`: a copy where it
        fails, so that, judged again after the model runs once more, it
        is the one checked; ``None`` after :meth:`no_output`)."""
        try:
            output = flatten_output(output)
        except UncomparableOutput:
            output = None
        passed = self._judge(output)
        # The output that failed is judged again after the model runs
        # once more (:meth:`passes_wider`): a copy, as the model may write
        # into a tensor it returned (a buffer).  One that passed is not
        # judged again: not copied.
        self.last_output = output if passed or output is None else \
            FlatOutput([leaf.clone() for leaf in output.leaves], output.spec)
        return passed

    def _judge(self, output: Optional[FlatOutput]) -> bool:
        """:meth:`__call__` of a flattened output (``None``: one that
        cannot be read)."""
        self.precise_error = None
        errors = None if output is None else \
            leaf_errors(self.reference, output)
        self.mismatch = errors is None
        if errors is None:
            self.abs_error = self.rel_error = float('inf')
            return False
        self.abs_error = max((e[0] for e in errors), default=0.0)
        self.rel_error = max((e[1] for e in errors), default=0.0)
        if self.precise is None:
            return self.rel_error <= self.tolerance
        precise = leaf_errors(self.precise, output)
        if precise is not None and len(precise) != len(errors):
            precise = None
        self.precise_error = float('inf') if precise is None else \
            max((e[1] for e in precise), default=0.0)
        if self.rel_error <= self.tolerance:
            return True
        return precise is not None and all(
            error[1] <= self.tolerance
            or wide[1] <= max(self.tolerance, self.margin * own)
            for error, wide, own in zip(errors, precise, self._own_errors))

    def no_output(self) -> None:
        """Record a changed model that gave no output (its forward
        raised): infinitely wrong."""
        self.last_output = self.precise_error = None
        self.abs_error = self.rel_error = float('inf')
        self.mismatch = False

    def passes_wider(self, model: nn.Module, inputs: Tuple,
                     keep_rough: bool = False) -> bool:
        """After a failed check, with ``model`` changed back to the
        unchanged model: measure it in a wider dtype (:meth:`add_precise`,
        with ``keep_rough``) and judge the output that failed once more;
        whether it passes now (never after :meth:`no_output`)."""
        self.add_precise(model, inputs, keep_rough)
        return self.precise is not None and \
            self.last_output is not None and self(self.last_output)

    def failure(self, unchanged: str = 'unfused') -> str:
        """What an output that fails this check is, in words
        (``unchanged``: what the model was before the change)."""
        if self.mismatch:
            return (f'unlike the {unchanged} output in structure, a shape, '
                    'a constant (an integer, a string), an integer tensor '
                    'or a NaN, or unreadable')
        if self.precise is None:
            return f'off by more than rtol={self.tolerance:g}'
        if self.against_twin:
            return (f'off by more than rtol={self.tolerance:g} in a tensor '
                    f'that is also more than {self.margin:g} times as far '
                    f'from the {self.yardstick} twin\'s output as the '
                    f'{unchanged} model\'s furthest tensor')
        return (f'off by more than rtol={self.tolerance:g} in a tensor '
                f'that is also more than {self.margin:g} times as far from '
                f'the {self.yardstick} output as the {unchanged} model\'s')


def _dtype_name(output: Any) -> str:
    """The dtype of the first floating point tensor in ``output``."""
    for leaf in tensors_in(output):
        if leaf.is_floating_point():
            return dtype_name(leaf.dtype)
    return 'unknown'


def output_check(reference: Any, tolerance: float,
                 what: str = 'the fusion') -> 'OutputCheck':
    """``OutputCheck(reference, tolerance)``, or a :class:`FusionError`
    that says why ``what`` cannot be verified."""
    try:
        return OutputCheck(reference, tolerance)
    except UncomparableOutput as error:
        raise FusionError(f'mmfuse: cannot verify {what}: {error}; pass '
                          'verify=False to go on without') from None


class WiderTwin:
    """A deep copy of the unchanged model in a wider dtype, on which
    changes are judged where the model's own rounding is too rough to
    judge them in its dtype (:attr:`OutputCheck.too_rough`).

    In float64, changes that are exact leave the output where it was, to
    the last few digits, however much the model amplifies rounding; a
    wrong one moves it.  So the changes are made to the twin (from its own
    wide tensors: no rounding to the model's dtype) and judged against its
    unchanged output with the plain tolerance (:meth:`holds`).

    A twin is only made of a model whose deep copy, run in the model's
    own dtype first, gives the model's output to within the tolerance
    (bit for bit, where the forward is deterministic): then the copy
    computes what the model computes (no hook or state tied to the
    model's own module objects is missed), and the model's distance from
    the wider copy measured before was its own rounding.

    The twin's unchanged output may be given: the model's output in the
    wider dtype measured on another copy (the check's refused yardstick,
    :attr:`OutputCheck.rough`, computed layer by layer).  Changes are
    judged against that until they fail it; only then is the twin run
    unchanged for its own (:meth:`measure`), against which the output
    that failed is judged again (:meth:`held_own`).  Both are the unchanged
    model computed in the wider dtype, but for what code reads of a
    layer's tensors outside that layer's forward: in the model's dtype on
    the check's copy, so the two may compute apart there.

    Args:
        model: The unchanged model (not changed here).
        inputs: Its example inputs.
        check: The check of the model's output; gives the reference and
            the tolerance.
        dtype: The wider dtype.
        unchanged: The unchanged model's output in ``dtype``, flattened,
            or ``None`` to measure the twin's own (also measured where
            ``unchanged`` has outputs narrower than ``dtype``).

    Raises:
        TwinError: No twin can be made, with the reason.
    """

    def __init__(self, model: nn.Module, inputs: Tuple, check: OutputCheck,
                 dtype: torch.dtype,
                 unchanged: Optional[FlatOutput] = None):
        self.dtype_name = dtype_name(dtype)
        self._eps = torch.finfo(dtype).eps
        self.tolerance = check.tolerance
        try:
            twin = copy.deepcopy(model)
            with torch.no_grad():
                same = twin(*fresh_inputs(inputs))
        except Exception as error:  # the model's code, on a copy
            raise TwinError(f'a copy of the model failed ({error})') from None
        errors = leaf_errors(check.reference, same)
        if errors is None or any(e[1] > check.tolerance for e in errors):
            raise TwinError('a copy of the model computes otherwise (a hook '
                            'or state tied to its own modules)')
        twin.to(dtype)

        self.model = twin
        self.inputs = cast_inputs(inputs, dtype)
        if unchanged is not None and self._narrow(unchanged):
            unchanged = None  # rounded more than the twin: measure its own
        #: Whether :attr:`unchanged` was given, not measured on the twin.
        self.borrowed = unchanged is not None
        self.unchanged = unchanged
        #: The output :meth:`holds` judged last against a given unchanged
        #: output, flattened.
        self.judged: Optional[FlatOutput] = None
        if unchanged is None:
            self.measure()

    def measure(self) -> None:
        """Run the twin, which must stand unchanged, for its own
        :attr:`unchanged` output."""
        try:
            output = self.run()
        except Exception as error:  # the model's code, in another dtype
            raise TwinError(f'the {self.dtype_name} copy failed '
                            f'({error})') from None
        # Flattened once: every judgement compares against it.
        output = flatten_output(output)
        narrow = self._narrow(output)
        if narrow:
            raise TwinError(f'the {self.dtype_name} copy gave '
                            f'{", ".join(sorted(narrow))} outputs')
        self.unchanged = output
        self.borrowed = False

    def _narrow(self, output: FlatOutput) -> Set[str]:
        """The dtypes of ``output``'s floating point leaves (tensors, numpy
        arrays) narrower than the twin's: where the twin rounds as much as
        the model, or more, a fold's error may hide (a wider one, such as
        a float ``item()``, rounds no more than the twin)."""
        return {
            dtype_name(leaf.dtype)
            for leaf in output.leaves if leaf.is_floating_point()
            and torch.finfo(leaf.dtype).eps > self._eps
        }

    def run(self) -> Any:
        """The twin's output as it stands."""
        with torch.no_grad():
            return self.model(*fresh_inputs(self.inputs))

    def holds(self) -> bool:
        """Whether the twin as it stands gives its unchanged output, each
        tensor to within the tolerance (and runs at all; a given unchanged
        output also needs an output with nothing narrower than the twin's
        dtype).  Against a given unchanged output, the output judged is
        kept (a copy) for :meth:`held_own` to judge again."""
        self.judged = None
        try:
            output = self.run()
        except Exception:  # a change broke the forward: it fails
            return False
        if self.borrowed:
            try:
                # (A copy: the model may write into tensors it returned.)
                output = self.judged = flatten_output(output, clone=True)
            except UncomparableOutput:
                return False
            if self._narrow(output):
                return False  # measure() says why
        return self._within(output)

    def held_own(self) -> bool:
        """After :meth:`measure`: whether the output :meth:`holds` judged
        last against the given unchanged output is within the tolerance
        of the twin's own (``False`` where there was none to judge)."""
        return self.judged is not None and self._within(self.judged)

    def _within(self, output: Any) -> bool:
        errors = leaf_errors(self.unchanged, output)
        return errors is not None and all(e[1] <= self.tolerance
                                          for e in errors)


class TwinError(Exception):
    """Why no :class:`WiderTwin` can be made."""


class Isolated(NamedTuple):
    """What :func:`isolate_failures` found (a plain named tuple: one that
    is also ``Generic`` needs Python 3.11).

    Attributes:
        kept: What stays applied.
        bad: The items found to fail.
        dropped: What was undone at the end because the kept set failed.
        unchecked: The items the search did not reach within its checks
            (left unapplied).
    """
    kept: List[Any]
    bad: List[Any]
    dropped: List[Any]
    unchecked: List[Any]


def search_checks(count: int) -> int:
    """The checks :func:`isolate_failures` may make among ``count`` items:
    enough to find two that fail, where the check gives the same answer
    each time (a bisection takes two checks per level), and four more.
    Where most items fail (an output that jumps with the rounding of any
    change: a threshold, a top-k, a point NMS), finding every one of them
    would take a check per item, each a forward pass."""
    levels = max(1, math.ceil(math.log2(max(count, 1))))
    return 4 * levels + 4


def isolate_failures(
        items: Sequence[Item],
        apply: Callable[[List[Item]], List[Applied]],
        undo: Callable[[List[Applied]], None],
        passes: Callable[[], bool],
        max_checks: Optional[int] = None) -> Isolated:
    """Apply as many ``items`` as keep ``passes()`` true, given that all of
    them together fail it (the caller has just checked that).

    Starts from a state where none is applied and bisects, so one bad item
    among ``n`` costs about ``2 log2(n)`` checks.  The search may end on a
    set that fails as a whole (an output that is not reproducible, so one
    check disagrees with the last): what it kept is checked once more
    (unless the last check was of it, and passed), and undone if even that
    fails.  ``passes()`` runs last on what stays.

    Args:
        items: The changes, e.g. folds or merged blocks.
        apply: Applies a list of items, returns what it applied.
        undo: Undoes what ``apply`` returned.
        passes: Checks the model as it is now.
        max_checks: At most this many checks in the search (the one or
            two on what stays, where needed, aside); the items it has not
            reached then stay unapplied.  No limit by default.

    Returns:
        An :class:`Isolated`.
    """
    kept: List[Applied] = []
    bad: List[Item] = []
    unchecked: List[Item] = []
    # Whether the last check was of the state as it is now, and passed;
    # and the checks left.
    checked = [False]
    left = [math.inf if max_checks is None else max_checks]

    def bisect(failing: List[Item]) -> None:
        """None of ``failing`` is applied; all of them together fail."""
        if len(failing) == 1:
            bad.append(failing[0])
            return
        middle = len(failing) // 2
        for half in (failing[:middle], failing[middle:]):
            if left[0] <= 0:
                unchecked.extend(half)
                continue
            left[0] -= 1
            applied = apply(half)
            checked[0] = passes()
            if checked[0]:
                kept.extend(applied)
            else:
                undo(applied)
                bisect(half)

    dropped: List[Applied] = []
    if items:
        bisect(list(items))
    if not (checked[0] or passes()):
        undo(kept)
        dropped, kept = kept, []
        passes()
    return Isolated(kept, bad, dropped, unchecked)
