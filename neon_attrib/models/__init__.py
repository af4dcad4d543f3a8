"""Estimators that *are* their neuralized networks: KDE outlierness, KDE inlierness and k-means membership.

Each class is an :class:`torch.nn.Module` built from the layers of :mod:`neon_attrib.core.layers` and behaves like a
scikit-learn estimator: hyperparameters are stored as given, validated at :meth:`fit`, fitted state lives in buffers
and in attributes ending in ``_``, and ``fit`` returns ``self``. ``model(x)`` computes the original model's output
exactly (no retraining, no approximation except the random features of :class:`KDEInlier`, which converge as ``H``
grows).

Dtype and device follow torch: ``fit`` casts the data to the module's dtype and device, so ``model.double().fit(X)``
fits in float64 and ``model.to("cuda")`` moves everything. A fitted model's ``state_dict()`` loads into a freshly
constructed one of the same class.
"""

from ..core.estimator import NeonEstimator
from .kde import KDEInlier, KDEOutlier
from .kmeans import BisectingKMeansMembership, KMeansMembership

__all__ = ["NeonEstimator", "KDEOutlier", "KDEInlier", "KMeansMembership", "BisectingKMeansMembership"]
