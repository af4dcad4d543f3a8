"""neon_attrib: explain unsupervised models and deep clusterings with layer-wise relevance propagation (NEON).

Kernel density estimates and k-means are rewritten, without retraining, as exactly equivalent neural networks
(:mod:`neon_attrib.layers`, :mod:`neon_attrib.models`), and Zennit rules (:mod:`neon_attrib.rules`,
:class:`NeonComposite`) explain their predictions in input features or, stacked on a CNN, in pixels.
"""

from .attribution import attribution_output, explain
from .composites import NeonComposite
from .layers import ClusterDifference, LogMeanExpPool, MeanPool, MinPool, RandomCosineFeatures, SquaredDistance
from .models import KDEInlier, KDEOutlier, KMeansMembership
from .rules import (
    CosineShareRule,
    KDEInlierActivationRule,
    KDEOutlierActivationRule,
    KMeansActivationRule,
    ProportionalRule,
    SoftArgminRule,
    SquaredDifferenceRule,
    WeightShareRule,
)

__version__ = "0.1.0"

__all__ = [
    "explain",
    "attribution_output",
    "NeonComposite",
    "KDEOutlier",
    "KDEInlier",
    "KMeansMembership",
    "SquaredDistance",
    "LogMeanExpPool",
    "RandomCosineFeatures",
    "MeanPool",
    "ClusterDifference",
    "MinPool",
    "SoftArgminRule",
    "SquaredDifferenceRule",
    "ProportionalRule",
    "CosineShareRule",
    "WeightShareRule",
    "KDEOutlierActivationRule",
    "KDEInlierActivationRule",
    "KMeansActivationRule",
]
