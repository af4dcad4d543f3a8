"""DEC surrogates of a classifier: Deep Embedded Clustering of activations, the surrogate, similar
examples, concepts, and attributable heads that explain cluster membership and class evidence with LRP.

Modules, each importing only those listed before it: ``assignment`` (Student-t ``q``, target ``p``), ``encoders``
(the autoencoder), ``estimator`` (shared estimator checks), ``diagnostics`` (training checks,
:class:`DECTrainingWarning`), ``training`` (pretraining, k-means, fine-tuning), ``model`` (:class:`DEC`), ``heads``
(attributable heads), ``activations`` (layer capture), ``mixture`` (class posteriors and layer mixture),
``similarity`` (similar examples, concepts), ``surrogate`` (:class:`ActivationClusteringSurrogate`) and ``plots``.
Every public name is importable from here and from the module it was first defined in (``model``, ``surrogate``).

See ``docs/dec.md``.
"""

from .activations import capture_activations
from .assignment import assignment_change, student_t_assignment, target_distribution
from .diagnostics import DECTrainingWarning
from .encoders import DECEncoder, FeatureScale, SphereNorm
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
from .model import DEC
from .surrogate import ActivationClusteringSurrogate

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
