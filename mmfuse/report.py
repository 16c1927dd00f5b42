"""The :class:`FusionReport`: what was folded, what was left and why."""
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from .plan import Fold, FusionPlan, Skip

__all__ = ['FusionReport']


@dataclass
class FusionReport:
    """The outcome of one fusion.

    Attributes:
        mode: ``'traced'`` (data flow observed in a forward pass) or
            ``'structural'`` (proven from the model's structure).
        folded: The folds applied, in model order.
        left: Normalisation layers left unfolded, with the reason.
        undone: Folds undone because verification found them wrong (or
            its search for those did not reach them: ``not checked``).
        num_norms: Normalisation layers in the model before fusion.
        num_foldable: Of those, the ones whose type and mode allow folding
            (batch norms with running statistics, in eval mode).
        verified: Whether the fused output was compared with the unfused.
        max_abs_error: Largest absolute output error, when verified.
        max_rel_error: Largest relative output error, when verified.
        rtol: The tolerance verification used.
        yardstick: The dtype of the wider copy of the unfused model the
            output was also measured against (``'float64'`` for a float32
            model, ``'float32'`` for a float16/bfloat16 one), or why none
            was used (``'none: ...'``); ``None`` when no copy was
            measured (the output was within ``rtol`` at once, and no merge
            before the folds needed one).
        twin: The dtype of the twin of the unfused model on which the
            folds themselves were judged (``'float64'``), where the
            model's own rounding was too rough to judge them in its dtype
            (see :class:`mmfuse.verify.WiderTwin`); ``None`` otherwise.
            ``yardstick`` is then the same twin's output.
        precise_rel_error: The fused output's relative error against that
            copy.
        unfused_precise_rel_error: The unfused model's own error against
            that copy: what its dtype costs without any fold.
        seconds: Wall time of the whole fusion.
        reparameterized: One dict per multi-branch block considered by
            :func:`mmfuse.reparam.reparameterize` before folding (merged
            into one conv, or left with the reason).
    """
    mode: str
    folded: List[Fold] = field(default_factory=list)
    left: List[Skip] = field(default_factory=list)
    undone: List[Skip] = field(default_factory=list)
    num_norms: int = 0
    num_foldable: int = 0
    verified: bool = False
    max_abs_error: Optional[float] = None
    max_rel_error: Optional[float] = None
    rtol: Optional[float] = None
    yardstick: Optional[str] = None
    twin: Optional[str] = None
    precise_rel_error: Optional[float] = None
    unfused_precise_rel_error: Optional[float] = None
    seconds: float = 0.0
    reparameterized: List[Dict] = field(default_factory=list)

    @property
    def folded_names(self) -> List[str]:
        """Dotted names of the folded norms."""
        return [fold.norm for fold in self.folded]

    @property
    def plan(self) -> FusionPlan:
        """The folds applied, as a plan that can be re-applied."""
        return FusionPlan(folds=list(self.folded), skipped=list(self.left))

    def to_dict(self) -> Dict:
        """A JSON-serialisable dict of the report."""
        data = asdict(self)
        data['folded'] = [fold.to_dict() for fold in self.folded]
        return data

    def summary(self) -> str:
        """One line: how many norms were folded, and the error."""
        line = (f'mmfuse: folded {len(self.folded)} of {self.num_foldable} '
                f'foldable norms ({self.num_norms} norms in all), '
                f'{len(self.left)} left, {len(self.undone)} undone')
        merged = sum(1 for r in self.reparameterized if r.get('merged'))
        if merged:
            line += f'; re-parameterized {merged} blocks'
        if self.verified:
            line += (f'; max abs error {self.max_abs_error:.3g}, max rel '
                     f'error {self.max_rel_error:.3g}')
            if self.precise_rel_error is not None:
                line += (f' (against {self.yardstick}: '
                         f'{self.precise_rel_error:.3g}, unfused '
                         f'{self.unfused_precise_rel_error:.3g})')
            elif self.yardstick is not None:
                line += f' (wider yardstick {self.yardstick})'
            if self.twin is not None:
                line += f'; folds judged on a {self.twin} twin'
        else:
            line += '; not verified'
        return line

    def __str__(self) -> str:
        rows = [('norm', 'result', 'into / reason')]
        for fold in self.folded:
            into = ', '.join(
                t.name + (' (own copy)' if t.copy else '')
                for t in fold.convs)
            rows.append((fold.norm, f'folded:{fold.kind}', into))
        for skip in self.undone:
            rows.append((skip.name, 'undone', skip.reason))
        for skip in self.left:
            rows.append((skip.name, 'left', skip.reason))
        for record in self.reparameterized:
            if record.get('merged'):
                convs = record.get('convs') or []
                detail = '; '.join(' + '.join(c['branches']) for c in convs)
                rows.append((record['module'], f"reparam:{record['rule']}",
                             detail or record.get('structure', '')))
            else:
                rows.append((record['module'], 'reparam:left',
                             record['reason']))
        width = [min(60, max(len(r[i]) for r in rows)) for i in range(2)]
        lines = [self.summary()]
        for index, (norm, result, detail) in enumerate(rows):
            lines.append(f'{norm:<{width[0]}}  {result:<{width[1]}}  '
                         f'{detail}')
            if index == 0:
                lines.append('-' * (width[0] + width[1] + 20))
        return '\n'.join(lines)
