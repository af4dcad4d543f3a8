"""Anomaly detectors on CNN features, neuralized and explained to pixels: :class:`PatchCore` and
:class:`PaDiM`.

=========================  ===========================================================================================
module                     contents
=========================  ===========================================================================================
``anomaly.patchcore``      :class:`PatchCore`: coreset memory bank, nearest-neighbour patch score
``anomaly.padim``          :class:`PaDiM`: one Gaussian per patch position, Mahalanobis patch score
``anomaly._detector``      :class:`AnomalyDetector` (their base: maps, calibration, targets), :class:`Detection`
``anomaly._layers``        :class:`PatchPool` and its rule, :class:`ChannelSelect`, :func:`greedy_coreset`,
                           :func:`gaussian_blur`, :func:`upsample`
``anomaly.metrics``        :func:`pixel_auroc`, :func:`pro_auc` (per-region overlap), :func:`aupimo` (per image)
``anomaly.faithfulness``   :func:`deletion_insertion` with normal content (:func:`nearest_normal`), ABPC
``anomaly.resolution``     :func:`layer_relevance`: relevance stopped at a backbone layer, upsampled
=========================  ===========================================================================================
"""

from ._detector import AnomalyDetector, Detection, default_layers
from ._layers import (
    EXPLAIN_TARGETS,
    ChannelSelect,
    PatchPool,
    PatchPoolRule,
    gaussian_blur,
    greedy_coreset,
    upsample,
)
from .faithfulness import Faithfulness, deletion_insertion, nearest_normal
from .metrics import aupimo, pixel_auroc, pro_auc
from .padim import PaDiM
from .patchcore import PatchCore
from .resolution import LayerRelevance, layer_relevance

__all__ = [
    "PatchCore",
    "PaDiM",
    "AnomalyDetector",
    "Detection",
    "default_layers",
    "PatchPool",
    "PatchPoolRule",
    "ChannelSelect",
    "EXPLAIN_TARGETS",
    "greedy_coreset",
    "gaussian_blur",
    "upsample",
    "pixel_auroc",
    "pro_auc",
    "aupimo",
    "deletion_insertion",
    "nearest_normal",
    "Faithfulness",
    "layer_relevance",
    "LayerRelevance",
]
