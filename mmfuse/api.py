"""The public entry points: :func:`fuse_model` and :func:`fuse_conv_bn`.

Both unwrap model wrappers, refuse a model in training mode, discover the
folds the data flow proves, and apply them in place.  :func:`fuse_model`
with an example input observes the real forward pass and verifies the fused
output against the unfused one, undoing any fold that breaks it.
"""
import time
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from .discovery import (collect_structural_evidence, collect_traced_evidence,
                        plan_and_count, plan_folds)
from .discovery.occurrence import Evidence
from .discovery.planner import add_folds_not_run, not_called_norms
from .discovery.traced import TracedForward
from .guards import (FusionError, as_input_tuple, check_eval,
                     fresh_inputs, unwrap_model)
from .layers import global_hook_problem, is_norm_layer, norm_fold_problem
from .module_walk import tree_unchanged, unique_modules
from .plan import Fold, FusionPlan, Skip
from .reparam import Merges, has_registered_blocks, merge_blocks
from .report import FusionReport
from .surgery import AppliedFold, apply_plan, undo_folds
from .verify import (OutputCheck, TwinError, WiderTwin, default_rtol,
                     isolate_failures, output_check, precise_dtype,
                     search_checks)

__all__ = ['FusionError', 'fuse_model', 'fuse_conv_bn', 'discover_folds',
           'unwrap_model']


def discover_folds(model: nn.Module,
                   example_inputs: Optional[Sequence] = None,
                   *,
                   plain_convs: bool = True) -> FusionPlan:
    """Find the folds the data flow of ``model`` proves, changing nothing.

    Args:
        model: A model in eval mode (wrappers are unwrapped).
        example_inputs: Positional arguments for ``model(*example_inputs)``;
            when given, the data flow is observed in a real forward pass.
        plain_convs: See :func:`fuse_model`.

    Returns:
        The plan: folds to make and norms left, with reasons.
    """
    model = unwrap_model(model)
    with tree_unchanged():
        check_eval(model)
        if example_inputs is None:
            evidence = collect_structural_evidence(model)
        else:
            evidence, _ = collect_traced_evidence(
                model, as_input_tuple(example_inputs))
        return _unverified(plan_folds(model, evidence, plain_convs))


def _add_folds_not_run(model: nn.Module, plan: FusionPlan,
                       evidences: Sequence[Optional[Evidence]],
                       plain_convs: bool) -> None:
    """Add to ``plan``, made from the traced pass's ``evidences[0]``, the
    folds structure proves for the norms the pass never called, into
    convs it never called (see
    :func:`~mmfuse.discovery.planner.add_folds_not_run`); structure is
    read for those norms alone.  For a plan whose output is checked: the
    check shows the folds change nothing the pass ran (code that runs may
    still read a norm it does not call, from a hook structure does not
    read: ``isinstance(model.head.bn, ...)``).  None with global module
    hooks registered: they may act on those layers when they do run.

    Args:
        model: The model, as ``plan`` finds it.
        plan: The plan, changed in place.
        evidences: What the pass found (and, after merges, what it found
            before them; or ``None``): whatever was called in either is
            left alone.
        plain_convs: See :func:`fuse_model`.
    """
    names = not_called_norms(plan)
    if not names or global_hook_problem():
        return
    norms = {id(model.get_submodule(name)) for name in names}
    structural = plan_folds(model, collect_structural_evidence(model, norms),
                            plain_convs)
    called = {
        id(occ.module)
        for evidence in evidences if evidence is not None
        for occ in evidence.occurrences
    }
    add_folds_not_run(model, plan, structural, called)


def _unverified(plan: FusionPlan) -> FusionPlan:
    """``plan`` for folds no output check will judge: with global module
    hooks registered (which may act on any layer), none of them."""
    problem = global_hook_problem()
    if problem and plan.folds:
        plan.skipped.extend(Skip(fold.norm, problem) for fold in plan.folds)
        plan.folds = []
    return plan


# Outside inference mode: the tensors made are normal ones (parameters
# that inference tensors would keep from autograd later).
@torch.inference_mode(False)
def fuse_model(model: nn.Module,
               example_inputs: Optional[Sequence] = None,
               *,
               verify: bool = True,
               rtol: Optional[float] = None,
               plain_convs: bool = True,
               reparameterize: bool = True,
               fold_not_run: bool = True) -> FusionReport:
    """Fold normalisation layers into adjacent convolutions, in place.

    Args:
        model: The model, in eval mode.  DataParallel, DDP and MMEngine
            wrappers are unwrapped.
        example_inputs: A tuple of positional arguments for
            ``model(*example_inputs)`` (``(images, )`` for mmdet, mmseg and
            mmpretrain models).  With it, pairs are found from the data flow
            of a real forward pass and the fused output is verified.
            Without it, only structure that proves the data flow is used.
        verify: Compare the fused output with the unfused one (needs
            ``example_inputs``) and undo the folds responsible for an error
            above ``rtol``.
        rtol: Largest relative output error accepted; by default 1e-4 for
            float32 models and 5e-2 for float16/bfloat16 models.  Where the
            fused output is off by more, the unfused model is measured
            once in a wider dtype (float64 for a float32 model, float32
            for a float16/bfloat16 one), and a fold that leaves the output
            at most twice as far from that as the unfused model is kept
            (:class:`mmfuse.verify.OutputCheck`), each output tensor
            judged on its own.  Hooks registered on the model's modules
            run in every forward pass fuse_model makes, including that of
            the wider copy (which shares the model's tensors and holds its
            modules' in the wider dtype while they run).
        plain_convs: A conv that transforms its weight in forward (weight
            standardization, spectral or weight norm, parametrizations) is
            first replaced by a plain conv with the effective weight, where
            that gives identical outputs, and then takes part in folds.
        reparameterize: First merge multi-branch blocks (RepVGG-style sums
            of conv+BN branches) into single convs as
            :func:`mmfuse.reparam.reparameterize` does; its records go to
            ``report.reparameterized``.  With an example input the model is
            traced once, as given: the data flow the merges leave alone is
            the one observed, and the merged blocks' own (a merged conv,
            then what ran after the sum) is that of the ``nn.Sequential``
            that holds them; a norm right after a merged block stays.
            Merges and folds are verified together, in one pass; only when
            that fails are the merges judged alone (those that fail
            undone) and then the folds.
        fold_not_run: With an example input and verification, also fold
            the norms that the forward pass did not run (an mmseg
            segmentor's auxiliary heads), where structure proves the data
            flow, as :func:`fuse_conv_bn` would, and the pass called
            neither the norm nor its conv; the output check shows they
            change nothing it ran (they cost a few ms of structure-only
            discovery, and the folds' own time).

    Returns:
        A :class:`FusionReport`.
    """
    start = time.perf_counter()
    model = unwrap_model(model)
    inputs = None if example_inputs is None else as_input_tuple(
        example_inputs)
    tolerance = None
    observed = None
    with tree_unchanged():  # the checks below walk the model each
        check_eval(model)
        if inputs is not None and verify:
            tolerance = default_rtol(model) if rtol is None else rtol
        if tolerance is None and global_hook_problem():
            reparameterize = False  # nothing would judge the merges
        registered = inputs is not None and reparameterize and \
            has_registered_blocks(model)
        if inputs is not None:
            observed = TracedForward(model, inputs)
    # What this call changes, put back if it raises (a model whose
    # forward, or output check, fails on a change): every fold made
    # (undoing one twice changes nothing) and every merge.
    made: List[AppliedFold] = []
    merges = None

    def apply(fold_plan: FusionPlan,
              folds: Optional[List[Fold]] = None) -> List[AppliedFold]:
        done = apply_plan(model, fold_plan, folds)
        made.extend(done)
        return done

    try:
        reference = None
        unmerged_evidence = None
        if inputs is None:
            if reparameterize:
                merges = merge_blocks(model)
            evidence = None  # read from structure, below
        else:
            # The model as given, observed once: its data flow, its output
            # (the reference) and the blocks that may sum branches a merge
            # can take; only those are traced for the generic merge, registry
            # entries apply anywhere.  The merged model is not observed
            # again: the flow the merges leave alone is the one observed.
            reference = observed.run()
            if tolerance is not None:
                check = output_check(reference, tolerance)
            evidence = observed.evidence()
            observed.let_go()
            if reparameterize and (registered or observed.sum_blocks):
                merges = merge_blocks(model,
                                      generic_blocks=observed.sum_blocks,
                                      reached=observed.reached)
                if merges.groups:
                    unmerged_evidence = evidence
                    evidence = _evidence_after_merges(unmerged_evidence,
                                                      merges)
        with tree_unchanged():  # discovery walks the model many times
            if evidence is None:
                evidence = collect_structural_evidence(model)
            plan, num_norms, num_foldable = plan_and_count(
                model, evidence, plain_convs)
            if fold_not_run and tolerance is not None:
                _add_folds_not_run(model, plan, (evidence, unmerged_evidence),
                                   plain_convs)
            if tolerance is None:
                plan = _unverified(plan)
        report = FusionReport(
            mode=evidence.mode,
            left=list(plan.skipped),
            num_norms=num_norms,
            num_foldable=num_foldable,
            reparameterized=[] if merges is None else merges.records)
        applied = apply(plan)
        if tolerance is not None:
            report.rtol = tolerance

            def passes() -> bool:
                try:
                    with torch.no_grad():
                        output = model(*fresh_inputs(inputs))
                except Exception:  # a change broke the forward: it fails
                    check.no_output()
                    return False
                return check(output)

            # With nothing changed the model is the one whose output the
            # reference is (the traced pass ran it as it stands): another
            # forward pass would give the same output.
            changed = bool(applied) or unmerged_evidence is not None
            passed = passes() if changed else check(reference)
            if not passed and unmerged_evidence is not None:
                # Merges and folds together fail: judge the merges alone
                # (undoing those that fail), then the folds on what stands.
                together = check.last_output  # None: the forward raised
                undo_folds(applied)
                undone = merges.verify(inputs, check)
                if undone:
                    with tree_unchanged():
                        evidence = _evidence_after_merges(unmerged_evidence,
                                                          merges)
                        plan, num_norms, num_foldable = plan_and_count(
                            model, evidence, plain_convs)
                        if fold_not_run:
                            _add_folds_not_run(model, plan,
                                               (evidence, unmerged_evidence),
                                               plain_convs)
                    report.left = list(plan.skipped)
                    report.num_norms, report.num_foldable = num_norms, \
                        num_foldable
                applied = apply(plan)
                if not applied:
                    passed = True  # the merges alone, just verified
                elif undone or together is None:
                    passed = passes()
                else:
                    # Every merge stands: the same folds again give the same
                    # weights, and the output that failed together (judged
                    # again, against what the merges' check may have added).
                    passed = check(together)
            elif unmerged_evidence is not None:
                merges.record_check(check)
            if not passed:
                undo_folds(applied)
                # The unfused model's own rounding may be what failed: measure
                # it once in a wider dtype (see OutputCheck), unmerged where
                # merges stand (every change judged from the model as given).
                # If the fused output passes then, every fold stands (made
                # again: the same weights); else keep the folds that stay
                # acceptable.
                if unmerged_evidence is not None:
                    merges.measure_unmerged(check, inputs)
                bad, dropped, unchecked = [], [], []
                wide = check.passes_wider(
                    model, inputs, keep_rough=unmerged_evidence is None)
                judged = None
                if not wide and check.too_rough and unmerged_evidence is None:
                    # Too rough in its dtype to judge folds by: judge them on
                    # a wider twin, where exact ones change nothing.
                    judged = _judge_on_twin(model, inputs, plan, check)
                if wide:
                    applied = apply(plan)
                elif judged is not None:
                    right, wrong, unreproduced, not_reached = judged
                    report.twin = check.yardstick
                    for fold in wrong:
                        report.undone.append(
                            Skip(fold.norm, 'undone: it changes the output of '
                                 f'the {report.twin} twin by more than '
                                 f'rtol={tolerance:g}'))
                    for fold in unreproduced:
                        report.undone.append(
                            Skip(fold.norm, 'undone: the twin\'s output could '
                                 'not be reproduced, with it or without'))
                    _note_unchecked(report, not_reached, 'the twin')
                    applied = apply(FusionPlan(), right)
                    if not passes():
                        # Exact folds, yet the model's dtype makes too much of
                        # some (an overflow): bisect on the model itself.
                        undo_folds(applied)
                        applied, bad, dropped, unchecked = isolate_failures(
                            right,
                            lambda folds: apply(FusionPlan(), folds),
                            undo_folds, passes, search_checks(len(right)))
                else:  # all the folds together fail this check: bisect
                    applied, bad, dropped, unchecked = isolate_failures(
                        plan.folds,
                        lambda folds: apply(FusionPlan(), folds),
                        undo_folds, passes, search_checks(len(plan.folds)))
                for fold in bad:
                    report.undone.append(
                        Skip(fold.norm, 'undone: verification found the '
                             f'output {check.failure()} with it'))
                for kept in dropped:
                    report.undone.append(
                        Skip(kept.fold.norm, 'undone: the output could not be '
                             'reproduced, fused or not'))
                _note_unchecked(report, unchecked, 'the model')
            report.verified = True
            report.max_abs_error = check.abs_error
            report.max_rel_error = check.rel_error
            report.yardstick = check.yardstick
            report.precise_rel_error = check.precise_error
            report.unfused_precise_rel_error = check.own_error
        report.folded = [a.fold for a in applied]
        report.seconds = time.perf_counter() - start
        return report
    except BaseException:
        undo_folds(made)
        if merges is not None:
            merges.undo_all()
        raise


def _judge_on_twin(
        model: nn.Module, inputs: Tuple, plan: FusionPlan,
        check: OutputCheck
) -> Optional[Tuple[List[Fold], List[Fold], List[Fold], List[Fold]]]:
    """Judge the folds of ``plan`` on a :class:`WiderTwin` of ``model``
    (unfused now, and too rough in its dtype to judge them by): those that
    change the twin's output are wrong, found by bisection there in exact
    enough arithmetic.  ``check`` then measures against the twin's
    output (:meth:`OutputCheck.use_twin`).

    Args:
        model: The model, unfused.
        inputs: Its example inputs.
        plan: The folds to judge.
        check: The check whose yardstick was too rough.

    Returns:
        ``(right, wrong, unreproduced, unchecked)``: the folds that leave
        the twin's output where it was, those that move it, those whose
        output the bisection could not reproduce and those it did not
        reach (see :func:`~mmfuse.verify.search_checks`); ``None`` where
        no twin can be made or changed (the reason is added to
        ``check.yardstick``).
    """
    dtype = precise_dtype(model)
    try:
        # It starts from the wider output the check measured (and refused
        # as a yardstick): one wider pass fewer where every fold holds.
        unchanged, check.rough = check.rough, None
        twin = WiderTwin(model, inputs, check, dtype, unchanged=unchanged)
        tried = apply_plan(twin.model, plan)
        holds = twin.holds()
        if not holds and twin.borrowed:
            # The twin's own unchanged output, against which the fused
            # output is judged again before a search.
            undo_folds(tried)
            tried = []
            twin.measure()
            holds = twin.held_own()
    except (TwinError, AttributeError, RuntimeError, ValueError,
            FusionError) as error:
        check.yardstick += f'; no twin: {error}'
        return None
    if holds:
        right, wrong, unreproduced, unchecked = list(plan.folds), [], [], []
    else:
        undo_folds(tried)
        kept, wrong, dropped, unchecked = isolate_failures(
            plan.folds,
            lambda folds: apply_plan(twin.model, FusionPlan(), folds),
            undo_folds, twin.holds, search_checks(len(plan.folds)))
        right = [applied.fold for applied in kept]
        unreproduced = [applied.fold for applied in dropped]
    check.use_twin(twin)
    return right, list(wrong), unreproduced, list(unchecked)


def _note_unchecked(report: FusionReport, unchecked: List[Fold],
                    where: str) -> None:
    """Report the folds a search on ``where`` (the model, its twin) for
    those that fail verification did not reach (see
    :func:`~mmfuse.verify.search_checks`): they stay undone."""
    for fold in unchecked:
        report.undone.append(
            Skip(fold.norm, 'undone: not checked: the search on '
                 f'{where} for the folds that fail verification stopped '
                 'after its checks (a forward pass each) before this one'))


def _evidence_after_merges(unmerged: Evidence, merges: Merges) -> Evidence:
    """The data flow of the model with the merges that stand now, from
    that observed before any.

    Without the calls the merged blocks made (those of their layers from
    elsewhere stay): what stays of a block (an activation after the sum,
    a conv and norm after it) is read from the ``nn.Sequential`` holding
    it now, with the merged conv.  What the merged conv feeds outside the
    block is not taken from the calls observed: the block may be reached
    otherwise than through the attribute the merge replaced (a second
    name, a plain list), so a norm after it stays.
    """
    replaced, replacements = merges.standing()
    evidence = unmerged.without(
        {id(m) for m in replaced},
        'its input came from a block since re-parameterized')
    evidence.unproven.extend(
        (m, 'data flow not proven: called from a block since '
         're-parameterized') for m in replaced)
    with tree_unchanged():
        for module in replacements:
            evidence.extend(collect_structural_evidence(module))
    return evidence


# Outside inference mode: the tensors made are normal ones (parameters
# that inference tensors would keep from autograd later).
@torch.inference_mode(False)
def fuse_conv_bn(module: nn.Module, *, plain_convs: bool = True) -> nn.Module:
    """Drop-in replacement for ``mmcv.cnn.fuse_conv_bn``.

    Same call: fuses in place and returns the module.  Unlike mmcv's, a norm
    is folded only where the model's structure proves it consumes exactly
    the conv's output (``nn.Sequential`` adjacency, ``ConvModule.order``, or
    a torch.fx trace of the module that calls them); registration order is
    never used.  Use :func:`fuse_model` for the report and verification.

    Args:
        module: The model, in eval mode.
        plain_convs: See :func:`fuse_model`.

    Returns:
        The same ``module``, fused.
    """
    model = unwrap_model(module)
    if _nothing_to_fold(model):
        return module
    with tree_unchanged():  # discovery walks the model many times
        check_eval(model)
        plan = _unverified(
            plan_folds(model, collect_structural_evidence(model),
                       plain_convs))
    apply_plan(model, plan, undoable=False)
    return module


def _nothing_to_fold(model: nn.Module) -> bool:
    """Whether ``model`` has no norm that a fold could take (ConvNeXt,
    transformers): then there is nothing to discover.  Looks no further
    than the first such norm.

    Raises:
        FusionError: A module met on the way is in training mode (see
            :func:`check_eval`).
    """
    for module in unique_modules(model):
        if module.training:
            check_eval(model)  # raises, naming the first such module
        if is_norm_layer(module) and norm_fold_problem(module) is None:
            return False
    return True
