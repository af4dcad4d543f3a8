"""The explain pipeline: private copies, canonizers, precision policy, forward and gradient, audit; ``explain`` on
top."""

from .attribution import (
    explain,
)
from .engine import (
    PRECISIONS,
    Audit,
    ConservationError,
    ConservationWarning,
    Explainer,
    Explanation,
    attribution_output,
    check_coverage,
    guard_batch_norms,
    hooked,
    isolated,
    precision_mode,
    resolve_composite,
    resolve_targets,
    run,
)

__all__ = [
    "attribution_output",
    "resolve_targets",
    "resolve_composite",
    "isolated",
    "check_coverage",
    "hooked",
    "Audit",
    "ConservationWarning",
    "ConservationError",
    "Explanation",
    "run",
    "Explainer",
    "PRECISIONS",
    "precision_mode",
    "guard_batch_norms",
    "explain",
]
