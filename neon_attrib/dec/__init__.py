"""DEC surrogates of a classifier (SPEC §5): Deep Embedded Clustering of activations, the surrogate, similar
examples, concepts, and attributable heads that explain cluster membership and class evidence with LRP.

See ``docs/dec.md``.
"""

from .heads import (
    ClassEvidence,
    ClassEvidenceRule,
    DECHead,
    DECHeadComposite,
    DECMembership,
    SphereMembershipRule,
    SurrogateClassHead,
    TruncatedModel,
)
from .model import (
    DEC,
    DECEncoder,
    DECTrainingWarning,
    FeatureScale,
    SphereNorm,
    assignment_change,
    student_t_assignment,
    target_distribution,
)
from .surrogate import ActivationClusteringSurrogate, capture_activations

__all__ = [
    "DEC",
    "DECTrainingWarning",
    "ActivationClusteringSurrogate",
    "DECHead",
    "SurrogateClassHead",
    "DECHeadComposite",
    "DECMembership",
    "SphereMembershipRule",
    "ClassEvidence",
    "ClassEvidenceRule",
    "TruncatedModel",
    "DECEncoder",
    "FeatureScale",
    "SphereNorm",
    "student_t_assignment",
    "target_distribution",
    "assignment_change",
    "capture_activations",
]
