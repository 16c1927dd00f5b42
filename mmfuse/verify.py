"""Compare a fused model's output with the unfused reference.

Outputs may be any nesting of tuples, lists and dicts; every floating point
tensor is compared.  The relative error of a tensor is its largest absolute
error divided by its largest absolute reference value, so values near zero
do not blow it up.

A float16 or bfloat16 model is also measured against a float32 copy of the
unfused model (:class:`OutputCheck`): its own rounding can put the unfused
output further from the exact one than any tolerance on the difference of
two low-precision outputs would allow, and a fold is then judged by whether
it brings the output further from the float32 one than the unfused model
already is.
"""
import copy
import math
from typing import Any, Callable, List, Optional, Sequence, Tuple, TypeVar

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from .module_walk import walk_modules

__all__ = [
    'output_error', 'default_rtol', 'isolate_failures', 'is_low_precision',
    'float32_output', 'OutputCheck'
]

Item = TypeVar('Item')
Applied = TypeVar('Applied')


def output_error(reference: Any, output: Any) -> Tuple[float, float]:
    """``(max_abs_error, max_rel_error)`` between two model outputs.

    Returns ``(inf, inf)`` when the outputs differ in structure, shape or
    contain a NaN the reference does not.
    """
    ref_leaves, ref_spec = tree_flatten(reference)
    out_leaves, out_spec = tree_flatten(output)
    if ref_spec != out_spec or len(ref_leaves) != len(out_leaves):
        return float('inf'), float('inf')
    max_abs = max_rel = 0.0
    for ref, out in zip(ref_leaves, out_leaves):
        if not isinstance(ref, Tensor):
            continue
        if not isinstance(out, Tensor) or ref.shape != out.shape:
            return float('inf'), float('inf')
        if ref.numel() == 0:
            continue
        if not ref.is_floating_point():
            if not torch.equal(ref, out):
                return float('inf'), float('inf')
            continue
        ref64 = ref.detach().double()
        out64 = out.detach().double()
        if bool((torch.isnan(out64) & ~torch.isnan(ref64)).any()):
            return float('inf'), float('inf')
        finite = torch.isfinite(ref64)
        diff = (ref64 - out64).abs()[finite]
        if diff.numel() == 0:
            continue
        abs_err = float(diff.max())
        scale = float(ref64[finite].abs().max())
        rel_err = abs_err / scale if scale > 0 else abs_err
        max_abs = max(max_abs, abs_err)
        max_rel = max(max_rel, rel_err)
    return max_abs, max_rel


def default_rtol(model: nn.Module) -> float:
    """Relative error above which a fold counts as broken.

    1e-4 for float32/float64 models (folding itself measures 1e-7 to 1e-6),
    5e-2 for float16/bfloat16 models, whose rounding dominates.
    """
    return 5e-2 if is_low_precision(model) else 1e-4


def is_low_precision(model: nn.Module) -> bool:
    """Whether ``model`` has float16 or bfloat16 parameters."""
    low = (torch.float16, torch.bfloat16)
    return any(param is not None and param.dtype in low
               for _, module in walk_modules(model)
               for param in module._parameters.values())


def float32_output(model: nn.Module, inputs: Tuple) -> Any:
    """The output of a float32 copy of ``model`` on ``inputs`` (their
    floating point tensors cast to float32); ``model`` is not changed."""
    upcast = copy.deepcopy(model).float()

    def to_float32(value: Any) -> Any:
        if isinstance(value, Tensor) and value.is_floating_point():
            return value.float()
        return value

    with torch.no_grad():
        return upcast(*tree_map(to_float32, inputs))


class OutputCheck:
    """Whether a changed model's output is acceptable.

    It is when its relative error against ``reference`` (the unchanged
    model's output) is at most ``tolerance``; or, for a low-precision model
    given ``precise`` (the unchanged model's float32 output), when its
    error against ``precise`` is at most :attr:`MARGIN` times the unchanged
    model's own, or within ``tolerance``.

    Args:
        reference: The unchanged model's output.
        tolerance: Largest relative error accepted against ``reference``.
        precise: The unchanged model's output in float32, or ``None``.
    """

    #: How much further from the float32 output than the unchanged model a
    #: low-precision model's output may be.  A fold rounds its new weights
    #: to the model's dtype once more, a source of error the unchanged
    #: model does not have, of the same order as its own rounding; a wrong
    #: fold moves the output by the size of the output.
    MARGIN = 2.0

    def __init__(self, reference: Any, tolerance: float,
                 precise: Optional[Any] = None):
        self.reference = reference
        self.tolerance = tolerance
        self.precise = precise
        self.own_error = None if precise is None else \
            output_error(precise, reference)[1]
        self.abs_error: Optional[float] = None
        self.rel_error: Optional[float] = None
        self.precise_error: Optional[float] = None

    def __call__(self, output: Any) -> bool:
        """Check ``output``; the errors measured stay on the object."""
        self.abs_error, self.rel_error = output_error(self.reference, output)
        self.precise_error = None
        if self.precise is not None:
            self.precise_error = output_error(self.precise, output)[1]
        if self.rel_error <= self.tolerance:
            return True
        # Only a finite yardstick: an unfused output that overflows (or
        # has NaNs) in its dtype says nothing about a fold.
        return self.precise_error is not None and \
            math.isfinite(self.own_error) and \
            self.precise_error <= max(self.tolerance,
                                      self.MARGIN * self.own_error)

    def failure(self) -> str:
        """What an output that fails this check is, in words."""
        what = f'off by more than rtol={self.tolerance:g}'
        if self.precise is not None:
            what += (f' and more than {self.MARGIN:g} times as far from '
                     'the float32 output as the unfused model')
        return what


def isolate_failures(
        items: Sequence[Item], apply: Callable[[List[Item]], List[Applied]],
        undo: Callable[[List[Applied]], None],
        passes: Callable[[], bool]
) -> Tuple[List[Applied], List[Item], List[Applied]]:
    """Apply as many ``items`` as keep ``passes()`` true.

    Starts from a state where none is applied and bisects, so one bad item
    among ``n`` costs about ``2 log2(n)`` checks.  The search may end on a
    set that fails as a whole (an output that is not reproducible, so one
    check disagrees with the last): what it kept is checked once more, and
    undone if even that fails.  ``passes()`` runs last on what stays.

    Args:
        items: The changes, e.g. folds or merged blocks.
        apply: Applies a list of items, returns what it applied.
        undo: Undoes what ``apply`` returned.
        passes: Checks the model as it is now.

    Returns:
        ``(kept, bad, dropped)``: what stays applied, the items found to
        fail, and what was undone at the end because the kept set failed.
    """
    kept: List[Applied] = []
    bad: List[Item] = []

    def search(candidates: List[Item]) -> None:
        applied = apply(candidates)
        if passes():
            kept.extend(applied)
            return
        undo(applied)
        if len(candidates) == 1:
            bad.append(candidates[0])
            return
        middle = len(candidates) // 2
        search(candidates[:middle])
        search(candidates[middle:])

    dropped: List[Applied] = []
    if items:
        search(list(items))
    if not passes():
        undo(kept)
        dropped, kept = kept, []
        passes()
    return kept, bad, dropped
