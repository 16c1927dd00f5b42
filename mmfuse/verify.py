"""Compare a fused model's output with the unfused reference.

Outputs may be any nesting of tuples, lists and dicts; every floating point
tensor is compared.  The relative error of a tensor is its largest absolute
error divided by its largest absolute reference value, so values near zero
do not blow it up.
"""
from typing import Any, Callable, List, Sequence, Tuple, TypeVar

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

__all__ = ['output_error', 'default_rtol', 'isolate_failures']

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
    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16):
            return 5e-2
    return 1e-4


def isolate_failures(
        items: Sequence[Item], apply: Callable[[List[Item]], List[Applied]],
        undo: Callable[[List[Applied]], None],
        passes: Callable[[], bool]) -> Tuple[List[Applied], List[Item]]:
    """Apply as many ``items`` as keep ``passes()`` true.

    Starts from a state where none is applied and bisects, so one bad item
    among ``n`` costs about ``2 log2(n)`` checks.

    Args:
        items: The changes, e.g. folds or merged blocks.
        apply: Applies a list of items, returns what it applied.
        undo: Undoes what ``apply`` returned.
        passes: Checks the model as it is now.

    Returns:
        What stays applied, and the items left out.
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

    if items:
        search(list(items))
    return kept, bad
