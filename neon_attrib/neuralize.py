"""``neuralize``: a fitted scikit-learn estimator in, the exactly equivalent NEON network out.

=============================================================  ===============================  ======================
scikit-learn estimator                                         NEON model                       equals scikit-learn's
=============================================================  ===============================  ======================
``KernelDensity(kernel="gaussian")``                           ``KDEOutlier``                   ``score_samples``
``KernelDensity`` fitted with ``sample_weight``                ``WeightedKDEOutlier``           ``score_samples``
``KMeans``, ``MiniBatchKMeans``                                ``KMeansMembership``             ``predict``
``BisectingKMeans``                                           ``BisectingKMeansMembership``    ``predict``
``NearestNeighbors`` (Euclidean)                               ``KNNOutlier``                   ``kneighbors``
``EmpiricalCovariance``, ``MinCovDet``, ``EllipticEnvelope``   ``MahalanobisOutlier``           ``mahalanobis``
``PCA``, ``IncrementalPCA`` (``whiten=False``)                 ``PCAResidual``                  reconstruction error
``GaussianMixture`` (any covariance type)                      ``GaussianMixtureOutlier``       ``−score_samples``
``GaussianMixture(covariance_type="tied")``, ``membership``    ``GaussianMixtureMembership``    ``predict``
``OneClassSVM(kernel="rbf")``                                  ``OneClassSVMOutlier``           ``decision_function``
=============================================================  ===============================  ======================

The models live in :mod:`neon_attrib.models`, :mod:`neon_attrib.neighbors`, :mod:`neon_attrib.gaussian` and
:mod:`neon_attrib.kernels`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ._utils import ArrayLike
from .estimator import NeonEstimator
from .gaussian import GaussianMixtureMembership, GaussianMixtureOutlier, MahalanobisOutlier, PCAResidual
from .kde import KDEOutlier
from .kernels import OneClassSVMOutlier, WeightedKDEOutlier
from .kmeans import BisectingKMeansMembership, KMeansMembership
from .neighbors import KNNOutlier

__all__ = ["neuralize", "SUPPORTED"]

#: What :func:`neuralize` accepts (scikit-learn class → NEON model), for messages and docs.
SUPPORTED: dict[str, str] = {
    "KernelDensity (kernel='gaussian')": "KDEOutlier / WeightedKDEOutlier",
    "KMeans, MiniBatchKMeans": "KMeansMembership",
    "BisectingKMeans": "BisectingKMeansMembership",
    "NearestNeighbors (Euclidean)": "KNNOutlier",
    "EmpiricalCovariance, MinCovDet, EllipticEnvelope (any sklearn.covariance estimator)": "MahalanobisOutlier",
    "PCA, IncrementalPCA (whiten=False)": "PCAResidual",
    "GaussianMixture": "GaussianMixtureOutlier (membership=True, tied: GaussianMixtureMembership)",
    "OneClassSVM (kernel='rbf')": "OneClassSVMOutlier",
}


def neuralize(estimator: Any, *, dtype: torch.dtype = torch.float32, **options: Any) -> NeonEstimator:
    """Rewrite a fitted scikit-learn estimator, without retraining, as an exactly equivalent NEON network.

    The result is an ``nn.Module`` (batched, on the CPU, in ``dtype``) and a NEON estimator: ``explain``,
    :class:`~neon_attrib.captum.NeonLRP` and :class:`~neon_attrib.deep.DeepNeon` work on it unchanged. The
    correspondence is in the module docstring and in ``docs/models.md``.

    Parameters
    ----------
    estimator : fitted scikit-learn estimator
        One of :data:`SUPPORTED`.
    dtype : torch.dtype
        ``torch.float32`` (default, like the other estimators) or ``torch.float64``. Ask for float64 here when you
        need scikit-learn's precision: ``.double()`` on a float32 model cannot restore the digits already rounded away.
    **options
        Per model (unknown ones raise a ``TypeError`` that lists the accepted ones):

        * ``KernelDensity``: ``beta``, ``eps``, ``chunk_size`` (and ``fused`` without sample weights);
        * ``KMeans`` / ``MiniBatchKMeans`` / ``BisectingKMeans``: ``X`` (the training data: default β), ``beta``;
        * ``NearestNeighbors``: ``k`` (default: its ``n_neighbors``), ``sqrt``, ``beta``, ``eps``, ``chunk_size``,
          ``fused``;
        * ``GaussianMixture``: ``membership`` (True: :class:`~neon_attrib.gaussian.GaussianMixtureMembership`,
          tied covariance only), ``beta``, ``X`` (membership only);
        * ``OneClassSVM``: ``beta``, ``eps``, ``chunk_size``;
        * covariance estimators, ``PCA``: none.

    Returns
    -------
    NeonEstimator

    Raises
    ------
    TypeError
        For an unsupported estimator (the message lists the supported ones) or an unknown option.
    ValueError
        For unsupported settings (a non-Gaussian kernel, a non-Euclidean or precomputed metric, ``whiten=True``, a
        non-RBF SVM, membership of a non-tied mixture).
    sklearn.exceptions.NotFittedError
        If the estimator is not fitted.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.neighbors import NearestNeighbors
    >>> X = np.random.default_rng(0).normal(size=(100, 3))
    >>> model = neuralize(NearestNeighbors(n_neighbors=1).fit(X), sqrt=True, dtype=torch.float64)
    >>> type(model).__name__, model(X[:2] + 0.1).shape
    ('KNNOutlier', torch.Size([2]))
    """
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"The 'dtype' parameter of neuralize must be a floating torch dtype (torch.float32 or "
                        f"torch.float64). Got {dtype!r}.")
    handler = _handler(estimator)
    if handler is None:
        supported = "; ".join(SUPPORTED)
        raise TypeError(f"neuralize does not support {type(estimator).__name__}: it has no exact neuralization here. "
                        f"Supported: {supported}.")
    accepted, build = handler
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(f"neuralize got unexpected option(s) {unknown} for {type(estimator).__name__}. "
                        f"Accepted: {sorted(accepted) or 'none'}.")
    _check_fitted(estimator)
    return build(estimator, **options).to(dtype)


def _handler(estimator: Any) -> tuple[tuple[str, ...], Any] | None:
    from sklearn.cluster import BisectingKMeans, KMeans, MiniBatchKMeans
    from sklearn.covariance import EmpiricalCovariance
    from sklearn.decomposition import PCA, IncrementalPCA
    from sklearn.mixture import GaussianMixture
    from sklearn.neighbors import KernelDensity, NearestNeighbors
    from sklearn.svm import OneClassSVM

    table = (
        (KernelDensity, ("beta", "eps", "chunk_size", "fused"), _kernel_density),
        ((KMeans, MiniBatchKMeans), ("X", "beta"), KMeansMembership.from_sklearn),
        (BisectingKMeans, ("X", "beta"), BisectingKMeansMembership.from_sklearn),
        (NearestNeighbors, ("k", "sqrt", "beta", "eps", "chunk_size", "fused"), KNNOutlier.from_sklearn),
        (EmpiricalCovariance, (), MahalanobisOutlier.from_sklearn),
        ((PCA, IncrementalPCA), (), PCAResidual.from_sklearn),
        (GaussianMixture, ("membership", "beta", "X"), _gaussian_mixture),
        (OneClassSVM, ("beta", "eps", "chunk_size"), OneClassSVMOutlier.from_sklearn),
    )
    for types, accepted, build in table:  # no class here subclasses another one of the table
        if isinstance(estimator, types):
            return accepted, build
    return None


def _check_fitted(estimator: Any) -> None:
    from sklearn.utils.validation import check_is_fitted

    check_is_fitted(estimator, msg=f"This {type(estimator).__name__} instance is not fitted yet. Call 'fit' before "
                                   f"neuralize.")


def _kernel_density(kde: Any, **options: Any) -> NeonEstimator:
    if getattr(kde.tree_, "sample_weight", None) is None:
        return KDEOutlier.from_sklearn(kde, **options)
    if "fused" in options:
        raise TypeError("neuralize got the option 'fused' for a KernelDensity fitted with sample weights "
                        "(a WeightedKDEOutlier, which has no fused forward). Accepted: ['beta', 'chunk_size', 'eps'].")
    return WeightedKDEOutlier.from_sklearn(kde, **options)


def _gaussian_mixture(gmm: Any, membership: bool = False, X: ArrayLike | None = None,
                      **options: Any) -> NeonEstimator:
    if not isinstance(membership, (bool, np.bool_)):
        raise TypeError(f"The 'membership' option of neuralize must be a bool. Got {membership!r}.")
    if membership:
        return GaussianMixtureMembership.from_sklearn(gmm, X=X, **options)
    if X is not None:
        raise TypeError("neuralize got the option 'X' for a GaussianMixture outlier score, which does not use it "
                        "(X sets the default β of membership=True).")
    return GaussianMixtureOutlier.from_sklearn(gmm, **options)
