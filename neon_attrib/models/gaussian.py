"""Gaussian models as neural networks: Mahalanobis outlier, PCA reconstruction error, Gaussian mixture
outlier and membership, and the per-position Gaussian head of PaDiM.

All of them are quadratic forms of the input, ``m_k(x) = (x − μ_k)ᵀ P_k (x − μ_k) = ‖L_kᵀ(x − μ_k)‖²``
(:class:`~neon_attrib.core.layers.MahalanobisDistance`), pooled:

====================================  ==========================================  ====================================
estimator                             score                                       scikit-learn
====================================  ==========================================  ====================================
:class:`MahalanobisOutlier`           ``o = (x − μ)ᵀ P (x − μ)``                   ``EmpiricalCovariance.mahalanobis``
                                                                                  (``MinCovDet``, ``EllipticEnvelope``)
:class:`PCAResidual`                  ``o = ‖x − x̂‖² = (x − μ)ᵀ(I − WᵀW)(x − μ)``  ``PCA`` reconstruction error
:class:`GaussianMixtureOutlier`       ``o = −log p(x)``                            ``−GaussianMixture.score_samples``
:class:`GaussianMixtureMembership`    ``f_c = min_{k≠c} ℓ_c − ℓ_k`` (tied)         ``GaussianMixture.predict``
:class:`PositionalMahalanobis`        ``m_p`` per spatial position (PaDiM)         —
====================================  ==========================================  ====================================

The input rule of a quadratic form is ``R_i = (x − μ)_i [P(x − μ)]_i``: it sums to ``o`` exactly, and a feature can
get negative relevance through correlations (given the other features, its value makes ``x`` *more* typical).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..core.estimator import SEED_CONSTRAINTS, MembershipEstimator, NeonEstimator
from ..core.layers import (
    LinearClusterDifference,
    MahalanobisDistance,
    MeanPool,
    MinPool,
    WeightedLogSumExpPool,
)
from ..core.registry import Neuralization, register_model
from ..core.rules import GaussianActivationRule, KMeansActivationRule
from ..core.validation import ArrayLike, Boolean, Constraint, Integer, Options, Real, module_dtype_device
from .positional import REG, PositionalMahalanobis

__all__ = [
    "MahalanobisOutlier",
    "PCAResidual",
    "GaussianMixtureOutlier",
    "GaussianMixtureMembership",
    "PositionalMahalanobis",
    "precision_factor",
]

_COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
#: the GaussianMixture settings both mixture estimators pass on, and the explanation's sharpness
_MIXTURE_CONSTRAINTS: dict[str, Constraint] = {"n_init": Integer(1), "max_iter": Integer(1), "reg_covar": Real(),
                                               "beta": Real(allow_none=True)}


def precision_factor(precision: np.ndarray) -> np.ndarray:
    """A factor ``L`` (d, d) with ``L Lᵀ = P`` of a symmetric positive semi-definite precision matrix ``P``.

    From the eigendecomposition (``L = V √Λ``, negative rounding noise in Λ clipped to 0), so singular precisions
    (``pinvh`` of a rank-deficient covariance) work too.

    Examples
    --------
    >>> L = precision_factor(np.array([[2.0, 1.0], [1.0, 2.0]]))
    >>> np.allclose(L @ L.T, [[2.0, 1.0], [1.0, 2.0]])
    True
    """
    precision = np.asarray(precision, dtype=np.float64)
    values, vectors = np.linalg.eigh((precision + precision.T) / 2)
    return vectors * np.sqrt(np.clip(values, 0.0, None))


def _as_module_tensor(model: torch.nn.Module, array: Any) -> torch.Tensor:
    dtype, device = module_dtype_device(model)
    return torch.as_tensor(np.asarray(array, dtype=np.float64)).to(dtype=dtype, device=device)


def _fit_array(model: NeonEstimator, X: ArrayLike, minimum: int) -> np.ndarray:
    data = model._as_tensor(X, check_features=False)
    if data.shape[0] < minimum:
        raise ValueError(f"{model._name} needs at least {minimum} samples to fit. Got {data.shape[0]}.")
    return data.detach().cpu().double().numpy()


def _check_fitted_sklearn(estimator: Any, attribute: str, owner: str) -> None:
    from sklearn.exceptions import NotFittedError

    if not hasattr(estimator, attribute):
        raise NotFittedError(f"This {type(estimator).__name__} instance is not fitted yet. Call 'fit' before "
                             f"{owner}.from_sklearn.")


# ---------------------------------------------------------------------------------------------------------------------
class _QuadraticForm(NeonEstimator):
    """One Gaussian: a :class:`~neon_attrib.core.layers.MahalanobisDistance` with K = 1 and a (trivial) mean pool."""

    def __init__(self):
        super().__init__()
        self.distance = MahalanobisDistance()
        self.pool = MeanPool()

    def _set_form(self, mean: np.ndarray, factor: np.ndarray) -> None:
        self.distance.means = _as_module_tensor(self, mean).reshape(1, -1)
        self.distance.factors = _as_module_tensor(self, factor).reshape(1, factor.shape[0], factor.shape[1])
        self.n_features_in_ = int(factor.shape[0])
        self._refresh_fitted()

    def forward(self, x: ArrayLike) -> torch.Tensor:
        """The quadratic form ``o(x)`` of shape (n,) for ``x`` of shape (n, d)."""
        self._check_fitted()
        return self.pool(self.distance(self._as_tensor(x)))

    @property
    def location_(self) -> torch.Tensor:
        """The centre μ (d,)."""
        self._check_fitted()
        return self.distance.means[0]

    @property
    def precision_(self) -> torch.Tensor:
        """The matrix ``P = L Lᵀ`` (d, d) of the quadratic form."""
        self._check_fitted()
        factor = self.distance.factors[0]
        return factor @ factor.T


class MahalanobisOutlier(_QuadraticForm):
    """Squared Mahalanobis distance ``o(x) = (x − μ)ᵀ P (x − μ)`` to a Gaussian fitted on the data.

    Equals scikit-learn's ``EmpiricalCovariance.mahalanobis`` (and that of ``MinCovDet``, ``EllipticEnvelope`` and
    the other covariance estimators): build it with :meth:`from_sklearn` or :func:`~neon_attrib.models.neuralize`.
    Relevance: ``R_i = (x − μ)_i [P(x − μ)]_i``, exact.

    Parameters
    ----------
    robust : bool
        Fit with the minimum covariance determinant (``sklearn.covariance.MinCovDet``) instead of the empirical
        covariance (robust to outliers in the training data).
    reg : float
        Added to the covariance's diagonal before inverting it (PaDiM uses 0.01); 0 (default) inverts it as it is
        (a pseudo-inverse if it is singular).
    random_state : int, optional
        Seed of MinCovDet's random subsets.
    seed : int, optional
        Deprecated alias of ``random_state`` (a ``FutureWarning`` at ``fit``); removed in the next release.

    Attributes
    ----------
    offset_ : float or None
        ``EllipticEnvelope``'s threshold when built from one: :meth:`decision_function` is then its decision function.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).normal(size=(200, 3))
    >>> model = MahalanobisOutlier().double().fit(X)
    >>> model(np.zeros((1, 3))).shape
    torch.Size([1])
    """

    _state_attributes = ("robust", "reg", "random_state", "seed", "n_features_in_", "offset_")
    _refit_parameters = ("robust", "reg", "random_state", "seed")

    _parameter_checks = {"robust": Boolean(), "reg": REG, **SEED_CONSTRAINTS}

    def __init__(self, robust: bool = False, reg: float = 0.0, random_state: int | None = None, *,
                 seed: int | None = None):
        super().__init__()
        self.robust = robust
        self.reg = reg
        self.random_state = random_state
        self.seed = seed  # deprecated alias of random_state
        self.offset_: float | None = None

    def fit(self, X: ArrayLike, y: Any = None) -> MahalanobisOutlier:
        """Estimate μ and the covariance of ``X`` (n_samples >= 2), invert it. Returns ``self``."""
        from scipy.linalg import pinvh
        from sklearn.covariance import EmpiricalCovariance, MinCovDet

        self._validate_hyperparameters()
        data = _fit_array(self, X, 2)
        estimator = MinCovDet(random_state=self._random_state()) if self.robust else EmpiricalCovariance()
        estimator.fit(data)
        if self.reg:
            precision = pinvh(estimator.covariance_ + self.reg * np.eye(data.shape[1]))
        else:
            precision = estimator.get_precision()
        self.offset_ = None
        self._set_form(estimator.location_, precision_factor(precision))
        return self

    @torch.no_grad()
    def mahalanobis(self, x: ArrayLike) -> torch.Tensor:
        """Squared Mahalanobis distances (n,), as scikit-learn's ``mahalanobis(x)``."""
        return self(x)

    @torch.no_grad()
    def decision_function(self, x: ArrayLike) -> torch.Tensor:
        """``−o(x) − offset_``: ``EllipticEnvelope.decision_function`` (> 0 for inliers); needs ``offset_``."""
        self._check_fitted()
        if self.offset_ is None:
            raise ValueError(f"This {self._name} has no decision threshold ('offset_'): build it from a fitted "
                             f"EllipticEnvelope to use decision_function.")
        return -self(x) - self.offset_

    @classmethod
    def from_sklearn(cls, estimator: Any, **kwargs: Any) -> MahalanobisOutlier:
        """Build from a fitted scikit-learn covariance estimator (``EmpiricalCovariance``, ``MinCovDet``,
        ``EllipticEnvelope``, ``LedoitWolf``, ...): its ``location_`` and ``get_precision()``. float64.

        Raises
        ------
        TypeError
            If ``estimator`` is not an ``sklearn.covariance.EmpiricalCovariance`` (or subclass).
        sklearn.exceptions.NotFittedError
            If it is not fitted.
        """
        from sklearn.covariance import EllipticEnvelope, EmpiricalCovariance, MinCovDet

        if not isinstance(estimator, EmpiricalCovariance):
            raise TypeError(f"{cls.__name__}.from_sklearn expects a fitted sklearn.covariance estimator "
                            f"(EmpiricalCovariance, MinCovDet, EllipticEnvelope, ...). Got {type(estimator).__name__}.")
        _check_fitted_sklearn(estimator, "location_", cls.__name__)
        seed = getattr(estimator, "random_state", None)
        model = cls(robust=isinstance(estimator, MinCovDet),
                    random_state=seed if isinstance(seed, int) else None,
                    **kwargs).double()
        model._validate_hyperparameters()
        model._set_form(estimator.location_, precision_factor(estimator.get_precision()))
        model.offset_ = float(estimator.offset_) if isinstance(estimator, EllipticEnvelope) else None
        return model


class PCAResidual(_QuadraticForm):
    """PCA reconstruction error ``o(x) = ‖x − x̂‖² = (x − μ)ᵀ(I − WᵀW)(x − μ)``, ``x̂`` the projection of x on the
    principal subspace (``W`` = the components).

    Equals ``‖x − pca.inverse_transform(pca.transform(x))‖²`` for a scikit-learn ``PCA(whiten=False)``. Stored as the
    squared norm of ``Bᵀ(x − μ)``, ``B`` an orthonormal basis of the residual space (d − r columns). Relevance:
    ``R_i = (x − μ)_i [(I − WᵀW)(x − μ)]_i = r_i (x − μ)_i`` with ``r = x − x̂`` the residual, exact.

    Parameters
    ----------
    n_components : int
        Number r of principal components (1 <= r < d for a non-trivial residual).

    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).normal(size=(100, 4))
    >>> model = PCAResidual(n_components=2).double().fit(X)
    >>> model.residual_basis_.shape
    torch.Size([4, 2])
    """

    _state_attributes = ("n_components", "n_features_in_")
    _refit_parameters = ("n_components",)

    _parameter_checks = {"n_components": Integer(1)}

    def __init__(self, n_components: int = 1):
        super().__init__()
        self.n_components = n_components

    def fit(self, X: ArrayLike, y: Any = None) -> PCAResidual:
        """Principal components of ``X`` (scikit-learn's ``PCA``, full SVD). Returns ``self``."""
        from sklearn.decomposition import PCA

        self._validate_hyperparameters()
        data = _fit_array(self, X, 2)
        if self.n_components > min(data.shape):
            raise ValueError(f"The 'n_components' parameter of {self._name} must be <= min(n_samples, n_features) "
                             f"= {min(data.shape)}. Got {self.n_components} instead.")
        pca = PCA(n_components=self.n_components, svd_solver="full").fit(data)
        self._set_pca(pca.mean_, pca.components_)
        return self

    def _set_pca(self, mean: np.ndarray, components: np.ndarray) -> None:
        components = np.asarray(components, dtype=np.float64)
        r, d = components.shape
        _, _, vt = np.linalg.svd(components, full_matrices=True)
        self._set_form(mean, vt[r:].T.copy())  # (d, d − r): orthonormal, orthogonal to every component

    @property
    def residual_basis_(self) -> torch.Tensor:
        """Orthonormal basis B (d, d − r) of the residual space: ``o(x) = ‖Bᵀ(x − μ)‖²``."""
        self._check_fitted()
        return self.distance.factors[0]

    @torch.no_grad()
    def reconstruction_error(self, x: ArrayLike) -> torch.Tensor:
        """``‖x − x̂‖²`` (n,), the same as ``forward``."""
        return self(x)

    @classmethod
    def from_sklearn(cls, pca: Any, **kwargs: Any) -> PCAResidual:
        """Build from a fitted ``sklearn.decomposition.PCA`` (or ``IncrementalPCA``) with ``whiten=False`` (float64).

        Raises
        ------
        TypeError
            If ``pca`` is not a PCA / IncrementalPCA.
        ValueError
            If it whitens (then ``inverse_transform`` rescales, and the residual is not a fixed quadratic form of x).
        sklearn.exceptions.NotFittedError
            If it is not fitted.
        """
        from sklearn.decomposition import PCA, IncrementalPCA

        if not isinstance(pca, (PCA, IncrementalPCA)):
            raise TypeError(f"{cls.__name__}.from_sklearn expects a fitted sklearn.decomposition.PCA or "
                            f"IncrementalPCA. Got {type(pca).__name__}.")
        if pca.whiten:
            raise ValueError(f"{cls.__name__}.from_sklearn needs whiten=False: the 'whiten' parameter of the "
                             f"{type(pca).__name__} must be False. Got whiten=True.")
        _check_fitted_sklearn(pca, "components_", cls.__name__)
        model = cls(n_components=int(pca.components_.shape[0]), **kwargs).double()
        model._validate_hyperparameters()
        model._set_pca(pca.mean_, pca.components_)
        return model


# ---------------------------------------------------------------------------------------------------------------------
def _mixture_components(weights: np.ndarray, means: np.ndarray, precisions_cholesky: np.ndarray,
                        covariance_type: str) -> tuple[np.ndarray, np.ndarray]:
    """Per component: the precision factor ``L_k`` (K, d, d) and ``c_k = log π_k + log det L_k − (d/2) log 2π``
    (scikit-learn's ``_estimate_log_gaussian_prob`` plus the log weight)."""
    means = np.asarray(means, dtype=np.float64)
    chol = np.asarray(precisions_cholesky, dtype=np.float64)
    k, d = means.shape
    if covariance_type == "full":
        factors = chol
        log_det = np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(1)
    elif covariance_type == "tied":
        factors = np.broadcast_to(chol, (k, d, d)).copy()
        log_det = np.full(k, np.log(np.diag(chol)).sum())
    elif covariance_type == "diag":
        factors = np.stack([np.diag(row) for row in chol])
        log_det = np.log(chol).sum(1)
    else:  # spherical
        factors = chol[:, None, None] * np.eye(d)
        log_det = d * np.log(chol)
    log_weights = np.log(np.asarray(weights, dtype=np.float64)) + log_det - 0.5 * d * math.log(2 * math.pi)
    return factors, log_weights


def _check_mixture(gmm: Any, owner: str) -> None:
    from sklearn.mixture import GaussianMixture

    if not isinstance(gmm, GaussianMixture):
        raise TypeError(f"{owner}.from_sklearn expects a fitted sklearn.mixture.GaussianMixture. "
                        f"Got {type(gmm).__name__}.")
    _check_fitted_sklearn(gmm, "precisions_cholesky_", owner)


class _MixtureParameters:
    """The scikit-learn mixture the two mixture estimators fit."""

    # provided by the estimator classes (annotations only: nothing is defined here)
    n_components: int
    n_init: int
    max_iter: int
    reg_covar: float
    beta: float | None
    _name: str
    _random_state: Callable[[], int | None]

    def _sklearn_mixture(self, covariance_type: str) -> Any:
        from sklearn.mixture import GaussianMixture

        return GaussianMixture(n_components=self.n_components, covariance_type=covariance_type, n_init=self.n_init,
                               max_iter=self.max_iter, reg_covar=self.reg_covar, random_state=self._random_state())


class GaussianMixtureOutlier(_MixtureParameters, NeonEstimator):
    """Gaussian mixture outlier score ``o(x) = −log p(x) = −log Σ_k π_k N(x | μ_k, Σ_k)`` (all covariance types).

    Two layers: :class:`~neon_attrib.core.layers.MahalanobisDistance` gives the energies ``h_k = m_k(x)/2`` (half the
    squared Mahalanobis distances), :class:`~neon_attrib.core.layers.WeightedLogSumExpPool` with α = −1 and
    ``log w_k = log π_k + ½ log det P_k − (d/2) log 2π`` gives ``o = −log Σ_k exp(log w_k − h_k)``. Equals
    ``−GaussianMixture.score_samples(x)``.

    The top rule gives component ``k`` its posterior share ``R_k = r_k(x) · o(x)`` (``predict_proba``); the
    Mahalanobis rule then hands it to the features, ``R_i = Σ_k (x − μ_k)_i [P_k(x − μ_k)]_i / m_k · R_k``. Both
    conserve exactly. ``o(x)`` is negative where the density exceeds 1 (narrow components, small-scale features): a
    negative outlierness means "more typical than a unit density"; the relevance then sums to that negative score,
    with negative relevance on the features that make x typical.

    Parameters
    ----------
    n_components : int
        Number of components K.
    covariance_type : {"full", "tied", "diag", "spherical"}
        As scikit-learn's.
    random_state : int, optional
        Seed of the initialisation.
    n_init, max_iter, reg_covar :
        As scikit-learn's ``GaussianMixture``.
    beta : float, optional
        Sharpness of the responsibilities in the explanation; ``None`` (default) = 1: the posterior.
    seed : int, optional
        Deprecated alias of ``random_state`` (a ``FutureWarning`` at ``fit``); removed in the next release.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).normal(size=(200, 2))
    >>> model = GaussianMixtureOutlier(n_components=2, random_state=0).double().fit(X)
    >>> bool(torch.allclose(model.predict_proba(X[:3]).sum(1), torch.ones(3, dtype=torch.float64)))
    True
    """

    _state_attributes = ("n_components", "covariance_type", "random_state", "seed", "n_init", "max_iter", "reg_covar",
                         "beta", "n_features_in_")
    _refit_parameters = ("n_components", "covariance_type", "random_state", "seed", "n_init", "max_iter",
                         "reg_covar")
    _parameter_checks = {"n_components": Integer(1), "covariance_type": Options(*_COVARIANCE_TYPES), **SEED_CONSTRAINTS,
                         **_MIXTURE_CONSTRAINTS}

    def __init__(self, n_components: int = 1, covariance_type: str = "full", random_state: int | None = None, *,
                 n_init: int = 1, max_iter: int = 100, reg_covar: float = 1e-6, beta: float | None = None,
                 seed: int | None = None):
        super().__init__()
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.random_state = random_state
        self.seed = seed  # deprecated alias of random_state
        self.n_init = n_init
        self.max_iter = max_iter
        self.reg_covar = reg_covar
        self.beta = beta
        self.distance = MahalanobisDistance()
        self.pool = WeightedLogSumExpPool(alpha=-1.0)

    def _configure_layers(self) -> None:
        self.pool.beta = None if self.beta is None else float(self.beta)

    def fit(self, X: ArrayLike, y: Any = None) -> GaussianMixtureOutlier:
        """Fit scikit-learn's ``GaussianMixture`` on ``X`` (float64) and neuralize it. Returns ``self``."""
        self._validate_hyperparameters()
        data = _fit_array(self, X, max(2, self.n_components))
        gmm = self._sklearn_mixture(self.covariance_type).fit(data)
        self._set_mixture(gmm)
        return self

    def _set_mixture(self, gmm: Any) -> None:
        factors, log_weights = _mixture_components(gmm.weights_, gmm.means_, gmm.precisions_cholesky_,
                                                   gmm.covariance_type)
        self.distance.means = _as_module_tensor(self, gmm.means_)
        self.distance.factors = _as_module_tensor(self, factors / math.sqrt(2.0))  # h_k = m_k / 2
        self.pool.log_weights = _as_module_tensor(self, log_weights)
        self.n_features_in_ = int(factors.shape[1])
        self._refresh_fitted()

    def forward(self, x: ArrayLike) -> torch.Tensor:
        """Outlier scores ``o(x) = −log p(x)`` (n,)."""
        self._check_fitted()
        return self.pool(self.distance(self._as_tensor(x)))

    @torch.no_grad()
    def score_samples(self, x: ArrayLike) -> torch.Tensor:
        """``log p(x)`` (n,), as scikit-learn's ``GaussianMixture.score_samples``."""
        return -self(x)

    @torch.no_grad()
    def predict_proba(self, x: ArrayLike) -> torch.Tensor:
        """Posterior responsibilities (n, K), as ``GaussianMixture.predict_proba``."""
        self._check_fitted()
        h = self.distance(self._as_tensor(x))
        return torch.softmax(self.pool.log_weights - h, dim=-1)

    @torch.no_grad()
    def predict(self, x: ArrayLike) -> torch.Tensor:
        """The most probable component (n,), as ``GaussianMixture.predict``."""
        self._check_fitted()
        return (self.pool.log_weights - self.distance(self._as_tensor(x))).argmax(-1)

    @classmethod
    def from_sklearn(cls, gmm: Any, **kwargs: Any) -> GaussianMixtureOutlier:
        """Build from a fitted ``sklearn.mixture.GaussianMixture`` of any covariance type (float64).

        Raises
        ------
        TypeError
            If ``gmm`` is not a GaussianMixture (``BayesianGaussianMixture`` weighs its components differently).
        sklearn.exceptions.NotFittedError
            If it is not fitted.
        """
        _check_mixture(gmm, cls.__name__)
        seed = gmm.random_state if isinstance(gmm.random_state, int) else None
        model = cls(n_components=gmm.n_components, covariance_type=gmm.covariance_type, random_state=seed,
                    n_init=gmm.n_init, max_iter=gmm.max_iter, reg_covar=gmm.reg_covar, **kwargs).double()
        model._validate_hyperparameters()
        model._set_mixture(gmm)
        return model


class GaussianMixtureMembership(_MixtureParameters, MembershipEstimator):
    """Membership evidence of a tied-covariance Gaussian mixture, ``f_c(x) = min_{k≠c} (ℓ_c(x) − ℓ_k(x))`` for every
    component c, ``ℓ_k = log π_k N(x | μ_k, Σ)``.

    With one shared covariance the log-likelihood ratios are linear in x, exactly as for k-means:
    ``h_ck = w_ckᵀx + b_ck`` with ``w_ck = P(μ_c − μ_k)`` (:class:`~neon_attrib.core.layers.LinearClusterDifference`),
    then a min pooling (:class:`~neon_attrib.core.layers.MinPool`). ``model(x)`` has shape (n, K); ``f_c(x) > 0``
    exactly
    for the component ``GaussianMixture.predict`` assigns x to. The k-means rules apply (w²-share in input space,
    ``R_i = a_i Σ_k p_k w_ki`` on CNN activations).

    Other covariance types give quadratic log-likelihood ratios and raise.

    Parameters
    ----------
    n_components : int
        K >= 2.
    random_state, n_init, max_iter, reg_covar :
        As scikit-learn's ``GaussianMixture`` (``covariance_type="tied"``).
    beta : float, optional
        Soft-argmin sharpness; ``None`` = 1 / mean training evidence (as :class:`~neon_attrib.models.KMeansMembership`),
        1 when built without data.
    seed : int, optional
        Deprecated alias of ``random_state`` (a ``FutureWarning`` at ``fit``); removed in the next release.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.r_[np.zeros((20, 2)), np.ones((20, 2)) * 5] + np.random.default_rng(0).normal(size=(40, 2))
    >>> model = GaussianMixtureMembership(n_components=2, random_state=0).double().fit(X)
    >>> model(X).shape
    torch.Size([40, 2])
    """

    _state_attributes = ("n_components", "random_state", "seed", "n_init", "max_iter", "reg_covar", "beta",
                         "n_features_in_", "default_beta_")
    _refit_parameters = ("n_components", "random_state", "seed", "n_init", "max_iter", "reg_covar")
    _parameter_checks = {"n_components": Integer(2), **SEED_CONSTRAINTS, **_MIXTURE_CONSTRAINTS}

    def __init__(self, n_components: int = 2, random_state: int | None = None, *, n_init: int = 1,
                 max_iter: int = 100, reg_covar: float = 1e-6, beta: float | None = None,
                 seed: int | None = None):
        super().__init__()
        self.n_components = n_components
        self.random_state = random_state
        self.seed = seed  # deprecated alias of random_state
        self.n_init = n_init
        self.max_iter = max_iter
        self.reg_covar = reg_covar
        self.beta = beta
        self.default_beta_: float | None = None
        self.difference = LinearClusterDifference()
        self.pool = MinPool()

    def fit(self, X: ArrayLike, y: Any = None) -> GaussianMixtureMembership:
        """Fit a tied-covariance ``GaussianMixture`` on ``X`` (float64) and neuralize it. Returns ``self``."""
        self._validate_hyperparameters()
        data = _fit_array(self, X, self.n_components)
        gmm = self._sklearn_mixture("tied").fit(data)
        self._set_tied(gmm, data)
        return self

    @torch.no_grad()
    def _set_tied(self, gmm: Any, data: np.ndarray | torch.Tensor | None) -> None:
        means = np.asarray(gmm.means_, dtype=np.float64)
        chol = np.asarray(gmm.precisions_cholesky_, dtype=np.float64)  # (d, d), P = chol cholᵀ
        k = means.shape[0]
        centre = means.mean(0)
        whitened = (means - centre) @ chol  # ν_k = Lᵀ(μ_k − x₀): μ'ᵀPμ' = ‖ν‖²
        log_pi = np.log(np.asarray(gmm.weights_, dtype=np.float64))
        sq = (whitened**2).sum(1)
        others = [[j for j in range(k) if j != c] for c in range(k)]
        weight = np.stack([np.stack([(whitened[c] - whitened[j]) @ chol.T for j in row]) for c, row in
                           enumerate(others)])
        bias = np.stack([[0.5 * (sq[j] - sq[c]) + log_pi[c] - log_pi[j] for j in row] for c, row in enumerate(others)])
        self.difference.weight = _as_module_tensor(self, weight)
        self.difference.bias = _as_module_tensor(self, bias)
        self.difference.centre = _as_module_tensor(self, centre)
        self.difference.others = torch.tensor(others, dtype=torch.long, device=self.difference.weight.device)
        self.n_features_in_ = int(means.shape[1])
        self.default_beta_ = self._mean_evidence_beta(None if data is None else _as_module_tensor(self, data))
        self._refresh_fitted()

    @classmethod
    def from_sklearn(cls, gmm: Any, X: ArrayLike | None = None, **kwargs: Any) -> GaussianMixtureMembership:
        """Build from a fitted ``GaussianMixture(covariance_type="tied")`` (float64); ``X`` (optional, the training
        data) sets the default β.

        Raises
        ------
        TypeError
            If ``gmm`` is not a GaussianMixture.
        ValueError
            If its covariance type is not ``"tied"`` (the log-likelihood ratios are then quadratic, not linear).
        sklearn.exceptions.NotFittedError
            If it is not fitted.
        """
        _check_mixture(gmm, cls.__name__)
        if gmm.covariance_type != "tied":
            raise ValueError(f"{cls.__name__} needs covariance_type='tied' (linear log-likelihood ratios, like "
                             f"k-means); the 'covariance_type' parameter of the GaussianMixture is "
                             f"{gmm.covariance_type!r}. Use GaussianMixtureOutlier (neuralize(gmm)) for the "
                             f"outlier score of any covariance type.")
        if gmm.n_components < 2:
            raise ValueError(f"{cls.__name__} needs a GaussianMixture with n_components >= 2. "
                             f"Got {gmm.n_components}.")
        seed = gmm.random_state if isinstance(gmm.random_state, int) else None
        model = cls(n_components=gmm.n_components, random_state=seed, n_init=gmm.n_init, max_iter=gmm.max_iter,
                    reg_covar=gmm.reg_covar, **kwargs).double()
        model._validate_hyperparameters()
        data = None
        if X is not None:
            model.n_features_in_ = int(np.asarray(gmm.means_).shape[1])
            try:
                data = model._as_tensor(X)
            finally:
                model._unfit()
        model._set_tied(gmm, data)
        return model


def _membership(gmm: Any, options: Any) -> bool:
    """``neuralize(gmm, membership=True)``: the membership network; else the outlier score."""
    membership = options.get("membership", False)
    if not isinstance(membership, (bool, np.bool_)):
        raise TypeError(f"The 'membership' option of neuralize must be a bool. Got {membership!r}.")
    return bool(membership)


def _mixture_outlier(gmm: Any, membership: bool = False, **options: Any) -> GaussianMixtureOutlier:
    return GaussianMixtureOutlier.from_sklearn(gmm, **options)


def _mixture_membership(gmm: Any, membership: bool = True, **options: Any) -> GaussianMixtureMembership:
    return GaussianMixtureMembership.from_sklearn(gmm, **options)


register_model(MahalanobisOutlier, lambda beta, eps: GaussianActivationRule(beta=beta),
               layers=(MahalanobisDistance, MeanPool),
               neuralization=Neuralization(("sklearn.covariance.EmpiricalCovariance",),
                                           "EmpiricalCovariance, MinCovDet, EllipticEnvelope (any sklearn.covariance "
                                           "estimator)", (), MahalanobisOutlier.from_sklearn))
register_model(PCAResidual, lambda beta, eps: GaussianActivationRule(beta=beta), layers=(MahalanobisDistance, MeanPool),
               neuralization=Neuralization(("sklearn.decomposition.PCA", "sklearn.decomposition.IncrementalPCA"),
                                           "PCA, IncrementalPCA (whiten=False)", (), PCAResidual.from_sklearn))
register_model(GaussianMixtureOutlier, lambda beta, eps: GaussianActivationRule(beta=beta),
               layers=(MahalanobisDistance, WeightedLogSumExpPool),
               neuralization=Neuralization(("sklearn.mixture.GaussianMixture",), "GaussianMixture",
                                           ("membership", "beta"), _mixture_outlier,
                                           applies=lambda gmm, options: not _membership(gmm, options)))
register_model(GaussianMixtureMembership, lambda beta, eps: KMeansActivationRule(beta=beta),
               layers=(LinearClusterDifference, MinPool), captum_split=True,
               neuralization=Neuralization(("sklearn.mixture.GaussianMixture",),
                                           "GaussianMixture (covariance_type='tied'), membership=True",
                                           ("membership", "beta", "X"), _mixture_membership, applies=_membership))
