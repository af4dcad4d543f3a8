"""neon_attrib: explain unsupervised models and deep clusterings with layer-wise relevance propagation (NEON).

Kernel density estimates and k-means are rewritten, without retraining, as exactly equivalent neural networks
(:mod:`neon_attrib.core.layers`, :mod:`neon_attrib.models`), and Zennit rules (:mod:`neon_attrib.core.rules`,
:class:`NeonComposite`) explain their predictions in input features or, stacked on a CNN, in pixels.

The package is layered in folders; each imports only the folders below it:

==========================  ==================================================================================
folder (layer, top first)   what it holds
==========================  ==================================================================================
``cli``                     the ``neon-attrib`` command and its sub-commands, the demo
``scale``                   data-set scale runs (stores, fitting, explaining, ``torch.distributed``)
``integrations``, ``viz``   Captum's LRP on our models; heatmap images
``anomaly``                 PatchCore, PaDiM, their evidence metrics
``dec``, ``evaluation``     DEC surrogates; deletion/insertion curves, sanity checks, Captum comparison
``vision``                  CNN backbones, feature taps, images, ``DeepNeon``, fast exact LRP rules (``fast``)
``pipeline``                private copies, canonizers (any CNN's graph too), precision, forward/gradient, audit,
                            ``explain``
``models``                  the neuralized models (KDE, k-means, kNN, Gaussian, kernels, positional), ``neuralize``
``core``                    formulas, layers, rules, canonical layers, composites, estimator base, validation
``datasets``                the embedded data sets
==========================  ==================================================================================

Submodules are attributes of the package (``neon_attrib.vision.deep``, ``neon_attrib.dec``, ...), loaded on first
access, so
``import neon_attrib`` stays light; their main names are importable from here too.
"""

import importlib

from .core.composites import NeonComposite, register_rule
from .core.layers import (
    ClusterDifference,
    LocationPool,
    LogMeanExpPool,
    MeanPool,
    MinPool,
    RandomCosineFeatures,
    ResizableBuffers,
    SquaredDistance,
)
from .core.registry import register_model
from .core.rules import (
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
from .models import BisectingKMeansMembership, KDEInlier, KDEOutlier, KMeansMembership, NeonEstimator
from .pipeline.attribution import attribution_output, explain
from .pipeline.engine import Audit, ConservationError, ConservationWarning

__version__ = "0.1.0"

#: Subpackages and modules reachable as attributes, imported on first access (PEP 562).
_SUBMODULES = ("anomaly", "cli", "core", "datasets", "dec", "evaluation", "integrations", "models", "pipeline",
               "scale", "vision", "viz")

#: Names re-exported from submodules, imported on first access.
_LAZY = {
    "DeepNeon": "vision.deep", "vgg16_features": "vision", "get_preprocessing": "vision", "load_image": "vision",
    "FastEpsilonGammaBox": "vision.fast", "FastEpsilonPlusFlat": "vision.fast", "LRPExplainer": "vision.fast",
    "Explainer": "pipeline", "NeonLRP": "integrations.captum", "NeonRule": "integrations.captum",
    "compare": "integrations.captum", "deletion_curve": "evaluation", "insertion_curve": "evaluation",
    "heatmap": "viz", "overlay": "viz", "save_heatmap": "viz", "DEC": "dec", "ActivationClusteringSurrogate": "dec",
    "DECHead": "dec", "neuralize": "models.neuralize", "KNNOutlier": "models.neighbors",
    "MahalanobisOutlier": "models.gaussian", "PCAResidual": "models.gaussian",
    "GaussianMixtureOutlier": "models.gaussian", "GaussianMixtureMembership": "models.gaussian",
    "PositionalMahalanobis": "models.positional", "WeightedKDEOutlier": "models.kernels",
    "OneClassSVMOutlier": "models.kernels", "explain_dataset": "scale", "fit_dataset": "scale",
    "open_results": "scale", "PatchCore": "anomaly", "PaDiM": "anomaly",
}

# the function and its module share a name: bind the function now, or importing the module would shadow it
from .models.neuralize import neuralize  # noqa: E402, F401

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
