"""neon_attrib: explain unsupervised models and deep clusterings with layer-wise relevance propagation (NEON).

Kernel density estimates and k-means are rewritten, without retraining, as exactly equivalent neural networks
(:mod:`neon_attrib.layers`, :mod:`neon_attrib.models`), and Zennit rules (:mod:`neon_attrib.rules`,
:class:`NeonComposite`) explain their predictions in input features or, stacked on a CNN, in pixels.

Submodules: :mod:`~neon_attrib.deep` (heads on VGG-16 feature maps), :mod:`~neon_attrib.fast` (fast exact LRP rules
for ReLU CNNs), :mod:`~neon_attrib.captum` (Captum drop-in), :mod:`~neon_attrib.evaluation` (deletion/insertion
curves), :mod:`~neon_attrib.viz` (heatmaps), :mod:`~neon_attrib.dec` (DEC surrogates of a classifier). Their main
names are importable from here too; they are loaded on first use, so ``import neon_attrib`` stays light.
"""

import importlib

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

#: Names re-exported from submodules, imported on first access (PEP 562).
_LAZY = {
    "DeepNeon": "deep", "vgg16_features": "deep", "get_preprocessing": "deep", "load_image": "deep",
    "FastEpsilonGammaBox": "fast", "FastEpsilonPlusFlat": "fast", "LRPExplainer": "fast",
    "NeonLRP": "captum", "NeonRule": "captum", "compare": "captum",
    "deletion_curve": "evaluation", "insertion_curve": "evaluation",
    "heatmap": "viz", "overlay": "viz", "save_heatmap": "viz",
    "DEC": "dec", "ActivationClusteringSurrogate": "dec", "DECHead": "dec",
}

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
__all__ += list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
