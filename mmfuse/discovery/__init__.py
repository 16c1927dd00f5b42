"""Discovery: which conv feeds which norm.  Never mutates the model."""
from .occurrence import Evidence, Link, Occurrence
from .planner import module_paths, plan_and_count, plan_folds
from .structural import collect_structural_evidence
from .traced import collect_traced_evidence

__all__ = [
    'Evidence', 'Link', 'Occurrence', 'collect_structural_evidence',
    'collect_traced_evidence', 'module_paths', 'plan_and_count', 'plan_folds'
]
