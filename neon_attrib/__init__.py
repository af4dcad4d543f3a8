"""neon_attrib: explain unsupervised models and deep clusterings with layer-wise relevance propagation (NEON).

Kernel density estimates and k-means are rewritten, without retraining, as exactly equivalent neural networks
(:mod:`neon_attrib.layers`, :mod:`neon_attrib.models`), and Zennit rules (:mod:`neon_attrib.rules`,
:class:`NeonComposite`) explain their predictions in input features or, stacked on a CNN, in pixels.

The package is layered; each layer imports only the layers below it:

==========================================  ==============================================================
layer                                       modules
==========================================  ==============================================================
command line                                ``cli`` (``_explain_cli``, ``_dataset_cli``, ``_detect_cli``), ``demo``
data-set scale                              ``scale``
integrations                                ``captum``, ``viz``
anomaly detectors                           ``anomaly``
heads on feature maps, DEC, evaluation      ``deep``, ``dec``, ``evaluation``, ``sanity``
vision                                      ``vision``
fast rules, ``explain``, Captum's LRP       ``fast``, ``attribution``, ``_captum_lrp``
the explain pipeline                        ``pipeline``
graph canonizer                             ``graph``, ``canonical``
estimators                                  ``models``, ``neuralize``, ``leave_one_out``, ``kde``, ``kmeans``,
                                            ``neighbors``, ``gaussian``, ``kernels``, ``positional``, ``estimator``
the model registry                          ``registry``
composites                                  ``composites``
rules                                       ``rules``
layers                                      ``layers``
formulas and checks                         ``functional``, ``_utils``, ``datasets``
==========================================  ==============================================================

Submodules are attributes of the package (``neon_attrib.deep``, ``neon_attrib.dec``, ...), loaded on first access, so
``import neon_attrib`` stays light; their main names are importable from here too.
"""

import importlib

from .attribution import attribution_output, explain
from .composites import NeonComposite, register_rule
from .layers import (
    ClusterDifference,
    LocationPool,
    LogMeanExpPool,
    MeanPool,
    MinPool,
    RandomCosineFeatures,
    ResizableBuffers,
    SquaredDistance,
)
from .models import BisectingKMeansMembership, KDEInlier, KDEOutlier, KMeansMembership, NeonEstimator
from .pipeline import Audit, ConservationError, ConservationWarning
from .registry import register_model
from .rules import (
    BetaHook,
    CosineShareRule,
    KDEInlierActivationRule,
    KDEOutlierActivationRule,
    KMeansActivationRule,
    LocationPoolRule,
    NeonHook,
    ProportionalRule,
    SoftArgminRule,
    SquaredDifferenceRule,
    WeightShareRule,
)

__version__ = "0.1.0"

#: Subpackages and modules reachable as attributes, imported on first access (PEP 562).
_SUBMODULES = ("attribution", "captum", "cli", "composites", "datasets", "dec", "deep", "demo", "evaluation", "fast",
               "functional", "layers", "leave_one_out", "models", "pipeline", "rules", "viz", "vision",
               "gaussian", "kernels", "neighbors", "positional", "estimator", "kde", "kmeans", "sanity", "scale",
               "anomaly", "registry", "graph", "canonical")

#: Names re-exported from submodules, imported on first access.
_LAZY = {
    "DeepNeon": "deep", "vgg16_features": "vision", "get_preprocessing": "vision", "load_image": "vision",
    "FastEpsilonGammaBox": "fast", "FastEpsilonPlusFlat": "fast", "LRPExplainer": "fast", "Explainer": "pipeline",
    "NeonLRP": "captum", "NeonRule": "captum", "compare": "captum",
    "deletion_curve": "evaluation", "insertion_curve": "evaluation",
    "heatmap": "viz", "overlay": "viz", "save_heatmap": "viz",
    "DEC": "dec", "ActivationClusteringSurrogate": "dec", "DECHead": "dec",
    "neuralize": "neuralize", "KNNOutlier": "neighbors", "MahalanobisOutlier": "gaussian", "PCAResidual": "gaussian",
    "GaussianMixtureOutlier": "gaussian", "GaussianMixtureMembership": "gaussian",
    "PositionalMahalanobis": "positional", "WeightedKDEOutlier": "kernels", "OneClassSVMOutlier": "kernels",
    "explain_dataset": "scale", "fit_dataset": "scale", "open_results": "scale",
    "PatchCore": "anomaly", "PaDiM": "anomaly",
}

# the function and its module share a name: bind the function now, or importing the module would shadow it
from .neuralize import neuralize  # noqa: E402, F401

__all__ = [
    "explain",
    "attribution_output",
    "NeonComposite",
    "register_rule",
    "register_model",
    "NeonEstimator",
    "KDEOutlier",
    "KDEInlier",
    "KMeansMembership",
    "BisectingKMeansMembership",
    "ResizableBuffers",
    "SquaredDistance",
    "LogMeanExpPool",
    "RandomCosineFeatures",
    "MeanPool",
    "ClusterDifference",
    "MinPool",
    "LocationPool",
    "NeonHook",
    "BetaHook",
    "SoftArgminRule",
    "SquaredDifferenceRule",
    "ProportionalRule",
    "CosineShareRule",
    "WeightShareRule",
    "KDEOutlierActivationRule",
    "KDEInlierActivationRule",
    "KMeansActivationRule",
    "LocationPoolRule",
    "Audit",
    "ConservationWarning",
    "ConservationError",
]
__all__ += list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))
