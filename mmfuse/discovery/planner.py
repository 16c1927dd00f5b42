"""Turn discovery evidence into a :class:`~mmfuse.plan.FusionPlan`.

The planner decides, for every normalisation layer of the model, whether the
evidence proves a fold and where the folded parameters go:

* a norm folds only if *every* call of it is linked, with one kind of link;
* a conv absorbs a norm in place only if every call of the conv, at every
  place it is registered, feeds that norm; a conv shared between places
  (e.g. one conv called once per pyramid level, each time through another
  parent, with a BN per level) gets a folded copy at each place instead;
* a conv absorbs at most one norm after it and one right before it;
* no fold may take a float16 weight or bias out of its range (it would
  be inf): such a fold is computed first.

Everything that is not folded is listed with the reason.
"""
from collections import Counter, defaultdict
from dataclasses import replace
from typing import Dict, List, Optional, Set, Tuple

import torch
from torch import nn

from ..folding import (fold_affine_into_input, fold_affine_into_output,
                       norm_affine)
from ..layers import (conv_fold_problem, conv_geometry, conv_in_channels,
                      conv_out_channels, input_fold_problem, is_norm_layer,
                      norm_affine_params, norm_channels, norm_fold_problem)
from ..module_walk import find_submodule, has_children, walk_modules
from ..plain_conv import plain_conv_of
from ..plan import (CONCAT, NOT_RUN, POST, PRE, SUM, ConvTarget, Fold,
                    FusionPlan, Skip)
from .occurrence import Evidence, Link, Occurrence, Site

__all__ = [
    'module_paths', 'plan_folds', 'plan_and_count', 'NOT_CALLED',
    'not_called_norms', 'add_folds_not_run'
]

#: Why a traced plan leaves a norm the forward pass never called.
NOT_CALLED = 'not called in the traced forward pass'


def module_paths(model: nn.Module) -> Dict[int, List[str]]:
    """Every dotted path of every module, keyed by ``id(module)``."""
    paths: Dict[int, List[str]] = defaultdict(list)
    for name, module in walk_modules(model, remove_duplicate=False):
        paths[id(module)].append(name)
    return paths


def _site_name(site: Site, paths: Dict[int, List[str]]) -> Optional[str]:
    if site is None:
        return None
    holder, attr = site
    holder_paths = paths.get(id(holder))
    if not holder_paths:
        return None
    prefix = holder_paths[0]
    return f'{prefix}.{attr}' if prefix else attr


#: Not yet asked (``norm_fold_problem`` answers ``None`` for foldable).
_UNKNOWN = object()

#: Dtypes whose range a folded weight or bias may leave: a norm's scale
#: (``gamma / sqrt(var + eps)``, up to ``gamma / sqrt(eps)``) can take a
#: float16 weight past 65504, which rounds to inf.  (bfloat16 has the
#: range of float32.)
_NARROW_RANGE = (torch.float16, )


def _finite(tensor: Optional[torch.Tensor],
            fill: float) -> Optional[torch.Tensor]:
    """``tensor`` with every inf or nan replaced by ``fill`` (a copy)."""
    if tensor is None:
        return None
    tensor = tensor.detach()
    return torch.where(torch.isfinite(tensor), tensor,
                       torch.full_like(tensor, fill))


def _finite_affine(norm: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """``norm``'s ``(scale, shift)`` with what is not finite made the
    identity's (1 and 0)."""
    scale, shift = norm_affine(*norm_affine_params(norm))
    return _finite(scale, 1.0), _finite(shift, 0.0)


def _folded(kind: str, affine: Tuple[torch.Tensor, torch.Tensor],
            conv: nn.Module, target: ConvTarget, weight: torch.Tensor,
            bias: Optional[torch.Tensor]
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(weight, bias)`` of ``conv`` once the norm whose ``(scale,
    shift)`` is ``affine`` is folded into it, from ``weight`` and
    ``bias``, as surgery computes them."""
    scale, shift = affine
    transposed, groups = conv_geometry(conv)
    with torch.no_grad():
        if kind == PRE:
            return fold_affine_into_input(weight, bias, scale, shift, groups)
        part = slice(target.offset, target.offset + conv_out_channels(conv)) \
            if kind == CONCAT else slice(None)
        return fold_affine_into_output(weight, bias, scale[part],
                                       shift[part] if target.shift else None,
                                       transposed, groups)


#: A fold into a conv: ``(kind, norm, target)``.
_FoldInto = Tuple[str, nn.Module, ConvTarget]


def overflow_problem(kind: str, norm: nn.Module,
                     convs: List[Tuple[nn.Module, ConvTarget]],
                     across: Optional[Dict[str, _FoldInto]] = None
                     ) -> Optional[str]:
    """Why folding ``norm`` (a fold of ``kind``) into ``convs`` (each conv
    with its target) would give a weight or bias its dtype cannot hold, or
    ``None``.

    Only convs of a narrow-range dtype (float16) are asked: there the fold
    is computed once here, as surgery would compute it, and its values
    tested (a bound on them would refuse folds whose largest products
    still fit).  Where a conv also takes a fold on its other side
    (``across``, by the target's name), surgery applies the two in turn,
    the second to what the first wrote, in the order of their norms in
    the model: that is tested too, in both orders, after the fold alone.
    Values not finite to begin with (in the conv's weight or bias, in a
    norm's statistics) are not the fold's doing: they are computed as 0
    (the conv's) or as the identity (the norm's), so that only what the
    fold itself takes out of range counts.
    """
    narrow = [(conv, target) for conv, target in convs
              if conv.weight.dtype in _NARROW_RANGE]
    if not narrow:
        return None
    affine = _finite_affine(norm)
    for conv, target in narrow:
        this = (kind, affine, target)
        other = (across or {}).get(target.name)
        orders = [[this]]
        if other is not None:
            theirs = (other[0], _finite_affine(other[1]), other[2])
            orders += [[this, theirs], [theirs, this]]
        for order in orders:
            weight, bias = _finite(conv.weight, 0.0), _finite(conv.bias, 0.0)
            for folded_kind, folded_affine, folded_target in order:
                weight, bias = _folded(folded_kind, folded_affine, conv,
                                       folded_target, weight, bias)
            for name, value in (('weight', weight), ('bias', bias)):
                if not bool(torch.isfinite(value).all()):
                    both = '' if len(order) == 1 else \
                        ' (which also takes a norm on its other side)'
                    return (f'folding it would take the {name} of '
                            f'{target.name}{both} out of the range of '
                            f'{str(value.dtype).replace("torch.", "")} '
                            f'(past {torch.finfo(value.dtype).max:g})')
    return None


class _Planner:

    def __init__(self, model: nn.Module, evidence: Evidence,
                 plain_convs: bool):
        self.model = model
        self.plain_convs = plain_convs
        self.plain_cache: Dict[int, Optional[nn.Module]] = {}
        self.evidence = evidence
        self.paths = module_paths(model)
        # How many modules hold each table of parameters (by ``id``; made
        # when first needed): a module and its ``copy.copy`` hold one.
        self.tables: Optional[Counter] = None
        self.calls: Dict[int, List[Occurrence]] = defaultdict(list)
        for occ in evidence.occurrences:
            self.calls[id(occ.module)].append(occ)
        self.unproven = {id(m): reason for m, reason in evidence.unproven}
        self.norm_problems = evidence.norm_problems
        self.plan = FusionPlan()
        # (conv path, 'input' or 'output') -> the norm folded there.
        self.used_targets: Dict[Tuple[str, str], str] = {}
        # Of those, the ones whose fold replaces the conv (a copy, a plain
        # conv): nothing else may fold into it.
        self.replaced: Set[Tuple[str, str]] = set()
        # The fold each conv folded in place takes on each side, by the
        # conv's path and the side (``used_targets`` names its norm).
        self.folds_into: Dict[Tuple[str, str], _FoldInto] = {}
        # Norm layers of the model (each module once), and of those the
        # foldable ones.
        self.num_norms = self.num_foldable = 0

    # -- helpers -----------------------------------------------------------
    def name(self, module: nn.Module) -> str:
        return self.paths[id(module)][0]

    def why_no_call(self, module: nn.Module) -> str:
        for path in self.paths[id(module)]:
            parent = path
            while parent:
                parent = parent.rpartition('.')[0]
                holder = find_submodule(self.model, parent)
                if id(holder) in self.unproven:
                    return self.unproven[id(holder)]
        if self.evidence.mode == 'traced':
            return NOT_CALLED
        return ('data flow not proven: not called as a module by any '
                'analysable parent forward')

    def conv_target(self, occ: Occurrence, link: Link,
                    shift: bool) -> Tuple[Optional[ConvTarget], str]:
        """Where ``occ``'s conv absorbs the norm of ``link``."""
        conv = occ.module
        if isinstance(conv, nn.Linear) and self.evidence.mode != 'traced':
            # Linear maps the last dim, BatchNorm1d normalises dim 1: the
            # same channels only on 2-D tensors.
            return None, (f'{self.name(conv)} is a linear layer: whether '
                          'the norm normalises its features depends on '
                          'the rank of the tensors, which structure alone '
                          'cannot show (an example input can)')
        problem = conv_fold_problem(conv)
        # (A conv's calls carry a reason only for a use no fold may
        # change: its parameters read outside a call of it.)
        used = next((c.reason for c in self.calls[id(conv)]
                     if c.reason and c.link is None and c.input_link is None),
                    None)
        if used:
            return None, f'{self.name(conv)}: {used}'
        if self.tables is None:
            self.tables = Counter(
                id(module._parameters)
                for _, module in walk_modules(self.model))
        if self.tables[id(conv._parameters)] > 1:
            return None, (f'{self.name(conv)} shares its table of '
                          'parameters with another module (a shallow '
                          'copy): a fold would change that one too')
        plain = False
        if problem and self.plain_convs and \
                plain_conv_of(conv, self.plain_cache) is not None:
            problem, plain = None, True
        if problem:
            return None, problem
        conv_paths = self.paths[id(conv)]
        all_calls = self.calls[id(conv)]
        if len(conv_paths) == 1 and all(
                c.side(link.kind) is link or (
                    c.side(link.kind) is not None
                    and c.side(link.kind).norm.module is link.norm.module
                    and c.side(link.kind).kind == link.kind)
                for c in all_calls):
            return ConvTarget(conv_paths[0], False, shift, plain), ''
        if link.kind != POST:
            return None, (f'{self.name(conv)} is shared or also used '
                          'elsewhere')
        site_name = _site_name(occ.site, self.paths)
        if site_name is None or any(
                _site_name(c.site, self.paths) is None for c in all_calls):
            # (A call from an unknown place would keep the shared conv.)
            return None, (f'shared conv {self.name(conv)} called from a '
                          'place that could not be resolved')
        same_site = [c for c in all_calls if c.site == occ.site]
        if any(c.link is None or c.link.kind != POST
               or c.link.norm.module is not link.norm.module
               for c in same_site):
            return None, (f'conv {site_name} is called more than once at the '
                          'same place, not always before this norm')
        copy = len(conv_paths) > 1
        return ConvTarget(site_name, copy, shift, plain), ''

    def norm_sites(self, norm: nn.Module,
                   calls: List[Occurrence]) -> Optional[Tuple[str, ...]]:
        norm_paths = self.paths[id(norm)]
        if len(norm_paths) == 1:
            return (norm_paths[0], )
        names = []
        for occ in calls:
            site_name = _site_name(occ.site, self.paths)
            if site_name is None:
                return None
            if site_name not in names:
                names.append(site_name)
        return tuple(names)

    # -- the plan ----------------------------------------------------------
    def skip(self, name: str, reason: str) -> None:
        self.plan.skipped.append(Skip(name, reason))

    def plan_norm(self, norm: nn.Module) -> None:
        name = self.name(norm)
        problem = self.norm_problems.get(id(norm), _UNKNOWN)
        if problem is _UNKNOWN:
            problem = norm_fold_problem(norm)
        if problem:
            self.skip(name, problem)
            return
        self.num_foldable += 1
        calls = self.calls[id(norm)]
        if not calls:
            self.skip(name, self.why_no_call(norm))
            return
        for occ in calls:
            if occ.link is None:
                self.skip(name, occ.reason or 'input not proven to be '
                          'exactly one conv output')
                return
        kinds = {occ.link.kind for occ in calls}
        if len(kinds) > 1:
            self.skip(name, 'called in places with different producers')
            return
        kind = kinds.pop()
        sites = self.norm_sites(norm, calls)
        if sites is None:
            self.skip(name, 'shared norm called from a place that could not '
                      'be resolved')
            return
        targets: List[ConvTarget] = []
        # Each target with the conv whose weight it folds into.
        convs: List[Tuple[nn.Module, ConvTarget]] = []
        for occ in calls:
            link = occ.link
            offset = 0
            for index, conv_occ in enumerate(link.convs):
                target, reason = self.conv_target(
                    conv_occ, link, shift=index == 0 or kind == CONCAT)
                if target is None:
                    self.skip(name, reason)
                    return
                channels = (conv_in_channels(conv_occ.module) if kind == PRE
                            else conv_out_channels(conv_occ.module))
                check = True
                if kind == CONCAT:
                    target = replace(target, offset=offset)
                    offset += channels
                    check = index + 1 == len(link.convs)
                    channels = offset
                if check and channels != norm_channels(norm):
                    self.skip(name, f'{norm_channels(norm)} channels but '
                              f'{target.name} has {channels}')
                    return
                problem = input_fold_problem(conv_occ.module) \
                    if kind == PRE else None
                if problem:
                    self.skip(name, f'runs before {target.name}, which '
                              f'{problem}')
                    return
                if target not in targets:
                    targets.append(target)
                    convs.append((conv_occ.module, target))
        if kind in (SUM, CONCAT) and (len(calls) != 1 or any(
                len(self.calls[id(c.module)]) != 1
                for c in calls[0].link.convs)):
            self.skip(name, f'normalises a {kind} of convs that are also '
                      'called elsewhere')
            return
        # One norm on each side of a conv at most; both sides only where
        # the conv is folded in place as it is (the second fold reads what
        # the first wrote).
        side = 'input' if kind == PRE else 'output'
        other = 'output' if kind == PRE else 'input'
        for target in targets:
            owner = self.used_targets.get((target.name, side))
            across = self.used_targets.get((target.name, other))
            if owner is None and across is not None and (
                    target.copy or target.plain
                    or (target.name, other) in self.replaced):
                owner = across
            if owner is not None:
                self.skip(name, f'{target.name} already absorbs {owner}')
                return
        problem = overflow_problem(
            kind, norm,
            [(plain_conv_of(conv, self.plain_cache) if target.plain else conv,
              target) for conv, target in convs],
            {target.name: self.folds_into[(target.name, other)]
             for target in targets
             if (target.name, other) in self.folds_into})
        if problem:
            self.skip(name, problem)
            return
        for target in targets:
            if not (target.copy or target.plain):
                self.folds_into[(target.name, side)] = (kind, norm, target)
        for target in targets:
            self.used_targets[(target.name, side)] = name
            if target.copy or target.plain:
                self.replaced.add((target.name, side))
        evidence = calls[0].link.evidence
        self.plan.folds.append(
            Fold(kind, name, sites, tuple(targets), evidence))

    def run(self) -> FusionPlan:
        norms = []
        seen = set()
        for _, module in walk_modules(self.model):
            if id(module) in seen or has_children(module) or \
                    not is_norm_layer(module):
                continue
            seen.add(id(module))
            norms.append(module)
        self.num_norms = len(norms)
        # Norms after a conv first: they win a conv over norms before it.

        def priority(norm: nn.Module) -> int:
            calls = self.calls[id(norm)]
            if calls and calls[0].link is not None and \
                    calls[0].link.kind == PRE:
                return 1
            return 0

        for norm in sorted(norms, key=priority):
            self.plan_norm(norm)
        order = {self.name(n): i for i, n in enumerate(norms)}
        self.plan.folds.sort(key=lambda f: order[f.norm])
        self.plan.skipped.sort(key=lambda s: order.get(s.name, -1))
        return self.plan


def plan_folds(model: nn.Module,
               evidence: Evidence,
               plain_convs: bool = True) -> FusionPlan:
    """Decide the folds that ``evidence`` proves for ``model``.

    Args:
        model: The model the evidence was collected on.
        evidence: What discovery proved.
        plain_convs: Let a conv that transforms its weight in forward take
            part, once turned into a plain conv with identical output.
    """
    return _Planner(model, evidence, plain_convs).run()


def plan_and_count(model: nn.Module,
                   evidence: Evidence,
                   plain_convs: bool = True) -> Tuple[FusionPlan, int, int]:
    """:func:`plan_folds`, with the number of norm layers in ``model``
    (each module once) and how many of them are foldable."""
    planner = _Planner(model, evidence, plain_convs)
    plan = planner.run()
    return plan, planner.num_norms, planner.num_foldable


def not_called_norms(plan: FusionPlan) -> List[str]:
    """The norms ``plan``, made from a traced forward pass, leaves
    because the pass never called them (:data:`NOT_CALLED`)."""
    return [skip.name for skip in plan.skipped if skip.reason == NOT_CALLED]


def add_folds_not_run(model: nn.Module, plan: FusionPlan,
                      structural: FusionPlan, called: Set[int]) -> None:
    """Add to ``plan``, made from a traced forward pass, the folds of
    ``structural`` (structure-only discovery of the same model, for the
    norms of :func:`not_called_norms` alone: an mmseg segmentor's
    auxiliary heads, run only in its training step) into convs the pass
    never called either, in model order, their evidence marked
    :data:`~mmfuse.plan.NOT_RUN`; their norms are taken off
    ``plan.skipped``, and the others there say why structure did not
    fold them.

    Args:
        model: The model both plans were made for.
        plan: The traced pass's plan; changed in place.
        structural: The structure-only plan.
        called: ``id`` of every conv and norm the pass saw called or
            otherwise used.
    """
    found = []
    # Why each norm not called stays, where structure says more.
    why = {
        skip.name: f'{NOT_CALLED}; from structure: {skip.reason}'
        for skip in structural.skipped
    }
    for fold in structural.folds:
        ran = next((target.name for target in fold.convs
                    if id(find_submodule(model, target.name)) in called),
                   None)
        if ran is None:
            found.append(
                replace(fold, evidence=f'{fold.evidence}; {NOT_RUN}'))
        else:
            why[fold.norm] = f'{NOT_CALLED}, but its conv {ran} was'
    folded = {fold.norm for fold in found}
    plan.skipped = [
        Skip(skip.name, why.get(skip.name, skip.reason))
        if skip.reason == NOT_CALLED else skip for skip in plan.skipped
        if skip.name not in folded
    ]
    if not found:
        return
    order = {
        name: index
        for index, (name, _) in enumerate(
            walk_modules(model, remove_duplicate=False))
    }
    plan.folds = sorted(plan.folds + found,
                        key=lambda fold: order.get(fold.norm, len(order)))
