"""The evidence discovery collects, in a form both discovery modes share.

An :class:`Occurrence` is one call of a leaf conv or norm module, found
either in a real forward pass or in a module's proven structure.  A
:class:`Link` says that the data flow *proves* a norm call consumes exactly
the output of one conv call (or a sum of them) and nothing else consumes
that output; or, for :data:`~mmfuse.plan.PRE`, that the norm's output feeds
exactly one conv and nothing else.
"""
from dataclasses import dataclass, field
from typing import Collection, Dict, List, Optional, Tuple

from torch import nn

from ..plan import PRE

__all__ = ['Site', 'Occurrence', 'Link', 'Evidence']

#: Where a module is called from: the module object holding it and the
#: attribute name.  ``None`` when the caller could not be resolved.
Site = Optional[Tuple[nn.Module, str]]


@dataclass(eq=False)
class Occurrence:
    """One call of a leaf conv or norm module.

    Args:
        module: The called module.
        site: Through which attribute it was called, when known.
        link: The link this call takes part in, if any: for a conv call,
            the one on its output side (a norm after it).
        input_link: For a conv call, the :data:`~mmfuse.plan.PRE` link
            of a norm that runs right before it, if any.
        reason: Why it is not linked, for norm calls.
        caller: The module whose forward made the call (seen in a traced
            forward pass; ``None`` when not known).
    """
    module: nn.Module
    site: Site
    link: Optional['Link'] = None
    input_link: Optional['Link'] = None
    reason: Optional[str] = None
    caller: Optional[nn.Module] = None

    def side(self, kind: str) -> Optional['Link']:
        """This conv call's link on the side a link of ``kind`` takes."""
        return self.input_link if kind == PRE else self.link


@dataclass(eq=False)
class Link:
    """A proven data flow between a norm call and conv call(s)."""
    kind: str
    norm: Occurrence
    convs: List[Occurrence]
    evidence: str


@dataclass
class Evidence:
    """Everything one discovery pass proved.

    Args:
        occurrences: Every conv and norm call found.
        unproven: Modules whose forward could not be analysed, with the
            reason; used to explain norms with no occurrence.
        mode: ``'traced'`` or ``'structural'``.
        norm_problems: What ``norm_fold_problem`` said of norms, by
            ``id``, where discovery asked (the planner asks of the others).
    """
    mode: str
    occurrences: List[Occurrence] = field(default_factory=list)
    unproven: List[Tuple[nn.Module, str]] = field(default_factory=list)
    norm_problems: Dict[int, Optional[str]] = field(default_factory=dict)

    def link(self, kind: str, norm: Occurrence, convs: List[Occurrence],
             evidence: str) -> Optional[Link]:
        """Record a link between occurrences already in the list.

        A conv call takes part in one link on each side at most (a norm
        after it, a norm right before it): when one of ``convs`` is already
        linked on that side, nothing is recorded and the norm gets the
        reason.
        """
        taken = [c for c in convs if c.side(kind) is not None]
        if taken:
            norm.reason = 'its conv already absorbs another norm'
            return None
        link = Link(kind, norm, convs, evidence)
        norm.link = link
        for conv in convs:
            if kind == PRE:
                conv.input_link = link
            else:
                conv.link = link
        return link

    def without(self, callers: Collection[int], reason: str) -> 'Evidence':
        """A copy without the calls that ``callers`` (ids of modules) made:
        for a model in which they no longer run.  A call linked with one
        of them loses the link (a norm call gets ``reason``); ``self`` is
        not changed.  Calls of the same layers made by other modules stay.
        """
        copies: Dict[int, Occurrence] = {}
        for occ in self.occurrences:
            if occ.caller is None or id(occ.caller) not in callers:
                copies[id(occ)] = Occurrence(occ.module, occ.site,
                                             reason=occ.reason,
                                             caller=occ.caller)
        kept = Evidence(self.mode, list(copies.values()), list(self.unproven))
        for occ in self.occurrences:
            link = occ.link
            norm = copies.get(id(occ))
            if norm is None or link is None or link.norm is not occ:
                continue
            convs = [copies.get(id(conv)) for conv in link.convs]
            if any(conv is None for conv in convs):
                norm.reason = reason
                continue
            kept.link(link.kind, norm, convs, link.evidence)
        return kept

    def extend(self, other: 'Evidence') -> None:
        """Add ``other``'s calls and unproven modules (of modules that
        ``self`` has no calls of)."""
        self.occurrences.extend(other.occurrences)
        self.unproven.extend(other.unproven)
        self.norm_problems.update(other.norm_problems)
