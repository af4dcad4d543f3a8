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

The models live in :mod:`neon_attrib.models`, :mod:`neon_attrib.models.neighbors`, :mod:`neon_attrib.models.gaussian`
and
:mod:`neon_attrib.models.kernels`.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.estimator import NeonEstimator
from ..core.registry import Neuralization, registered_models
from . import gaussian, kde, kernels, kmeans, neighbors  # noqa: F401 (their models register their neuralizations)

__all__ = ["neuralize", "SUPPORTED"]


def _neuralizations() -> list[tuple[type, Neuralization]]:
    """``(model class, neuralization)`` of every model registered with one, in order of registration."""
    return [(entry.model, entry.neuralization) for entry in registered_models() if entry.neuralization is not None]


#: What :func:`neuralize` accepts (scikit-learn estimators → NEON model), for messages and docs: one row per model
#: registered with a neuralization (:func:`neon_attrib.core.registry.register_model`).
SUPPORTED: dict[str, str] = {how.label: model.__name__ for model, how in _neuralizations()}


def neuralize(estimator: Any, *, dtype: torch.dtype = torch.float32, **options: Any) -> NeonEstimator:
    """Rewrite a fitted scikit-learn estimator, without retraining, as an exactly equivalent NEON network.

    The result is an ``nn.Module`` (batched, on the CPU, in ``dtype``) and a NEON estimator: ``explain``,
    :class:`~neon_attrib.integrations.captum.NeonLRP` and :class:`~neon_attrib.vision.deep.DeepNeon` work on it
    unchanged. The
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
        * ``GaussianMixture``: ``membership`` (True: :class:`~neon_attrib.models.gaussian.GaussianMixtureMembership`,
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
    registered = _neuralizations()
    candidates = [(model, how) for model, how in registered if how.matches(estimator)]
    if not candidates:
        supported = "; ".join(how.label for _, how in registered)
        raise TypeError(f"neuralize does not support {type(estimator).__name__}: it has no exact neuralization here. "
                        f"Supported: {supported}.")
    _check_fitted(estimator)
    chosen = [(model, how) for model, how in candidates if how.applies is None or how.applies(estimator, options)]
    if not chosen:
        names = ", ".join(model.__name__ for model, _ in candidates)
        raise TypeError(f"neuralize has no model for this {type(estimator).__name__} with the options "
                        f"{sorted(options)}: {names} declined it.")
    model, how = chosen[0]
    unknown = sorted(set(options) - set(how.options))
    if unknown:
        raise TypeError(f"neuralize got unexpected option(s) {unknown} for {type(estimator).__name__} (neuralized as "
                        f"{model.__name__}). Accepted: {sorted(how.options) or 'none'}.")
    return how.build(estimator, **options).to(dtype)


def _check_fitted(estimator: Any) -> None:
    from sklearn.utils.validation import check_is_fitted

    check_is_fitted(estimator, msg=f"This {type(estimator).__name__} instance is not fitted yet. Call 'fit' before "
                                   f"neuralize.")
