"""A fusion plan: which norms fold into which layers, by module name.

Discovery produces a :class:`FusionPlan`; surgery applies it.  A plan names
modules by their dotted path so it can be stored (e.g. in a fused
checkpoint's ``meta``) and re-applied to a freshly built model.
"""
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Tuple

__all__ = [
    'POST', 'PRE', 'SUM', 'CONCAT', 'NOT_RUN', 'ConvTarget', 'Fold', 'Skip',
    'FusionPlan'
]

#: A norm right after a conv: folded into the conv's output channels.
POST = 'post'
#: A norm right before a conv that pads with no zeros: folded into the conv's
#: input channels.
PRE = 'pre'
#: A norm over a sum of convs: folded into each, the shift into the first.
SUM = 'sum'
#: A norm over a channel concat of convs: each conv takes its slice.
CONCAT = 'concat'
#: Added to a fold's evidence where the fold was proven from structure for
#: layers that a traced forward pass never ran (``fuse_model``).
NOT_RUN = 'not run by the example input'


@dataclass(frozen=True)
class ConvTarget:
    """One conv (or linear) layer that absorbs a norm.

    Args:
        name: Dotted path of the place the fold happens.  When ``copy`` is
            set the conv module at that path is shared with other places and
            gets its own folded copy there.
        copy: Whether to replace the module at ``name`` with a folded copy
            instead of rewriting the shared module in place.
        shift: Whether this conv takes the norm's shift (only one conv of a
            normalised sum does).
        plain: Whether the layer transforms its weight in forward and is
            first replaced by a plain conv with identical output.
        offset: The first norm channel this conv's output channels meet (a
            normalised concat of convs); 0 otherwise.
    """
    name: str
    copy: bool = False
    shift: bool = True
    plain: bool = False
    offset: int = 0


@dataclass(frozen=True)
class Fold:
    """One norm folded away.

    Args:
        kind: :data:`POST`, :data:`PRE`, :data:`SUM` or :data:`CONCAT`.
        norm: Dotted path of the norm (its first site).
        norm_sites: Every path where the norm is replaced by an identity.
        convs: The layers that absorb it.
        evidence: How the data flow was proven (``'traced'``,
            ``'sequential'``, ``'conv_module'``, ``'fx'``; with
            ``'; '`` and :data:`NOT_RUN` after it for layers the traced
            pass of ``fuse_model`` did not run).
    """
    kind: str
    norm: str
    norm_sites: Tuple[str, ...]
    convs: Tuple[ConvTarget, ...]
    evidence: str

    def to_dict(self) -> Dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict) -> 'Fold':
        return cls(
            kind=data['kind'],
            norm=data['norm'],
            norm_sites=tuple(data['norm_sites']),
            convs=tuple(ConvTarget(**c) for c in data['convs']),
            evidence=data['evidence'])


@dataclass(frozen=True)
class Skip:
    """A normalisation layer (or a pair) left unfolded, and why."""
    name: str
    reason: str


@dataclass
class FusionPlan:
    """What discovery found: the folds to make and what is left."""
    folds: List[Fold] = field(default_factory=list)
    skipped: List[Skip] = field(default_factory=list)

    def to_dict(self) -> Dict:
        return {
            'folds': [f.to_dict() for f in self.folds],
            'skipped': [asdict(s) for s in self.skipped]
        }

    @classmethod
    def from_dict(cls, data: Dict) -> 'FusionPlan':
        return cls(
            folds=[Fold.from_dict(f) for f in data.get('folds', [])],
            skipped=[Skip(**s) for s in data.get('skipped', [])])
