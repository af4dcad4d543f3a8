"""Weighted Gaussian-kernel outlier scores as neural networks: :class:`WeightedKDEOutlier` and
:class:`OneClassSVMOutlier`.

Both are §1's KDE outlier with a weight per support point, the weights entering as log-weights in the pooling:

    o(x) = −(1/γ) log Σ_k w_k exp(−γ ‖x − u_k‖²)

(:class:`~neon_attrib.core.layers.SquaredDistance`, then :class:`~neon_attrib.core.layers.WeightedLogSumExpPool` with α
= −γ).
For a KDE fitted with sample weights ``w`` are the normalised weights (``w_k = 1/N`` gives
:class:`~neon_attrib.models.KDEOutlier`); for an RBF one-class SVM ``w`` are its dual coefficients and
``decision_function(x) = exp(−γ o(x)) − ρ``. The explanation is §1's with the weighted soft-argmin
``p_k ∝ w_k exp(−β h_k)``: each support vector's share of the decision.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..core.estimator import NeonEstimator
from ..core.functional import DEFAULT_CHUNK
from ..core.layers import SquaredDistance, WeightedLogSumExpPool
from ..core.registry import Neuralization, register_model
from ..core.rules import WeightedKDEOutlierActivationRule
from ..core.validation import ArrayLike, Integer, Real, check_positive_float, module_dtype_device

__all__ = ["WeightedKDEOutlier", "OneClassSVMOutlier"]

#: Rows scored at once by :meth:`WeightedKDEOutlier.score` (temporaries rows × N).
_ROW_BLOCK = 1024


class WeightedKDEOutlier(NeonEstimator):
    """Weighted kernel density outlier score ``o(x) = −(1/γ) log Σ_k w_k exp(−γ‖x − u_k‖²)``.

    ``fit(X, sample_weight)`` normalises the weights to sum to 1 (a weighted density; without weights it is exactly
    :class:`~neon_attrib.models.KDEOutlier`); :meth:`from_sklearn` reads a ``KernelDensity`` fitted with
    ``sample_weight``. :class:`OneClassSVMOutlier` keeps a one-class SVM's unnormalised dual coefficients.

    Parameters
    ----------
    gamma : float
        Kernel sharpness γ > 0 (scikit-learn's bandwidth h gives γ = 1/(2h²)).
    beta : float, optional
        Sharpness of the weighted soft-argmin; ``None`` = γ: ``R_k = w_k e^{−γh_k} / Σ_k' w_k' e^{−γh_k'} · o(x)``,
        each support point's share of the density.
    eps : float, optional
        Stabiliser of the squared-difference rule; ``None`` = ``0.01 / γ`` (as KDEOutlier).
    chunk_size : int
        Support points reduced at once in the pooling.

    Attributes
    ----------
    gamma_, beta_, eps_ : float
        The effective hyperparameters after ``fit``.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).normal(size=(50, 2))
    >>> model = WeightedKDEOutlier(gamma=0.5).double().fit(X, sample_weight=np.arange(1, 51))
    >>> model(X[:3]).shape
    torch.Size([3])
    """

    _state_attributes = ("gamma", "beta", "eps", "chunk_size", "n_features_in_", "gamma_", "beta_", "eps_")
    _dtype_parameters = ("gamma_", "eps_")

    def __init__(self, gamma: float = 1.0, *, beta: float | None = None, eps: float | None = None,
                 chunk_size: int = DEFAULT_CHUNK):
        super().__init__()
        self.gamma = gamma
        self.beta = beta
        self.eps = eps
        self.chunk_size = chunk_size
        self.gamma_: float | None = None
        self.beta_: float | None = None
        self.eps_: float | None = None
        self.distance = SquaredDistance()
        self.pool = WeightedLogSumExpPool(alpha=-1.0, chunk_size=chunk_size)

    def _validate_gamma(self) -> None:
        check_positive_float(self.gamma, owner=self._name, name="gamma")

    _parameter_checks = {"beta": Real(allow_none=True), "eps": Real(closed=True, allow_none=True),
                         "chunk_size": Integer(1)}

    def _validate_hyperparameters(self) -> None:
        self._validate_gamma()  # a float > 0 here; OneClassSVMOutlier also takes scikit-learn's 'scale' and 'auto'
        super()._validate_hyperparameters()

    def _effective_gamma(self) -> float:
        return float(self.gamma)

    def _refresh_fitted(self) -> None:
        self.gamma_ = self._effective_gamma()
        self.beta_ = float(self.beta if self.beta is not None else self.gamma_)
        self.eps_ = float(self.eps if self.eps is not None else 0.01 / self.gamma_)
        self._configure_layers()

    def _configure_layers(self) -> None:
        if self.gamma_ is None:
            return
        self.pool.alpha = -float(self.gamma_)
        self.pool.beta = self.beta_
        self.pool.chunk_size = self.chunk_size
        self.distance.eps = self.eps_

    def fit(self, X: ArrayLike, y: Any = None, sample_weight: ArrayLike | None = None) -> WeightedKDEOutlier:
        """Support points ``X`` (N, d) with weights ``sample_weight`` (N,) > 0, normalised to sum to 1 (default: all
        equal). Returns ``self``."""
        self._validate_hyperparameters()
        support = self._as_tensor(X, check_features=False)
        if support.shape[0] < 1:
            raise ValueError(f"{self._name} needs at least 1 sample to fit. Got 0.")
        weights = _check_weights(sample_weight, support.shape[0], self._name)
        self._set(support, np.log(weights / weights.sum()))
        return self

    def _set(self, support: torch.Tensor, log_weights: np.ndarray) -> None:
        dtype, device = module_dtype_device(self)
        self.distance.support = support.detach().clone().to(dtype=dtype, device=device)
        self.pool.log_weights = torch.as_tensor(np.asarray(log_weights, dtype=np.float64)).to(dtype=dtype,
                                                                                              device=device)
        self.n_features_in_ = int(support.shape[1])
        self._refresh_fitted()

    @property
    def support_(self) -> torch.Tensor:
        """The support points (N, d)."""
        self._check_fitted()
        return self.distance.support

    @property
    def weights_(self) -> torch.Tensor:
        """The weights ``w_k`` (N,)."""
        self._check_fitted()
        return self.pool.log_weights.exp()

    def forward(self, x: ArrayLike) -> torch.Tensor:
        """Outlier scores ``o(x)`` of shape (n,)."""
        self._check_fitted()
        return self.pool(self.distance(self._as_tensor(x)))

    @torch.no_grad()
    def score(self, x: ArrayLike) -> torch.Tensor:
        """``o(x)`` like ``forward``, in blocks of rows (temporaries ``1024 × N``): for large batches."""
        self._check_fitted()
        x = self._as_tensor(x)
        return torch.cat([self.pool(self.distance(block)) for block in x.split(_ROW_BLOCK)]) if len(x) else \
            x.new_zeros(0)

    @torch.no_grad()
    def density(self, x: ArrayLike) -> torch.Tensor:
        """``Σ_k w_k exp(−γ‖x − u_k‖²) = exp(−γ o(x))`` (n,)."""
        return torch.exp(-self.gamma_ * self.score(x))

    @torch.no_grad()
    def score_samples(self, x: ArrayLike) -> torch.Tensor:
        """Log of the normalised weighted Gaussian KDE (``KernelDensity.score_samples`` with sample weights), (n,):
        ``−γ o(x) − (d/2) log(π/γ)``. Meaningful when the weights sum to 1 (as after :meth:`fit`)."""
        return -self.gamma_ * self.score(x) - 0.5 * self.n_features_in_ * math.log(math.pi / self.gamma_)

    @classmethod
    def from_sklearn(cls, kde: Any, **kwargs: Any) -> WeightedKDEOutlier:
        """Build from a fitted Gaussian ``sklearn.neighbors.KernelDensity``, with or without sample weights (float64).

        Raises
        ------
        TypeError
            If ``kde`` is not a KernelDensity.
        ValueError
            If it uses another kernel or metric.
        sklearn.exceptions.NotFittedError
            If it is not fitted.
        """
        from sklearn.exceptions import NotFittedError
        from sklearn.neighbors import KernelDensity

        if not isinstance(kde, KernelDensity):
            raise TypeError(f"{cls.__name__}.from_sklearn expects a fitted sklearn.neighbors.KernelDensity. "
                            f"Got {type(kde).__name__}.")
        if not hasattr(kde, "tree_"):
            raise NotFittedError(f"This KernelDensity instance is not fitted yet. Call 'fit' before "
                                 f"{cls.__name__}.from_sklearn.")
        if kde.kernel != "gaussian":
            raise ValueError(f"{cls.__name__}.from_sklearn needs kernel='gaussian'. The 'kernel' parameter of the "
                             f"KernelDensity is {kde.kernel!r}.")
        if kde.metric != "euclidean":
            raise ValueError(f"{cls.__name__}.from_sklearn needs metric='euclidean'. The 'metric' parameter of the "
                             f"KernelDensity is {kde.metric!r}.")
        bandwidth = float(getattr(kde, "bandwidth_", kde.bandwidth))
        support = np.asarray(kde.tree_.data, dtype=np.float64)
        weights = getattr(kde.tree_, "sample_weight", None)
        weights = np.ones(len(support)) if weights is None else np.asarray(weights, dtype=np.float64)
        model = cls(gamma=1.0 / (2.0 * bandwidth**2), **kwargs).double()
        model._validate_hyperparameters()
        model._set(torch.as_tensor(support), np.log(weights / weights.sum()))
        return model


class OneClassSVMOutlier(WeightedKDEOutlier):
    """An RBF one-class SVM as a weighted KDE outlier: ``o(x) = −(1/γ) log Σ_k α_k exp(−γ‖x − u_k‖²)`` with the
    support vectors ``u_k`` and dual coefficients ``α_k``, so that ``decision_function(x) = exp(−γ o(x)) − ρ``.

    Build it from a fitted ``sklearn.svm.OneClassSVM(kernel="rbf")`` (:meth:`from_sklearn`,
    :func:`~neon_attrib.models.neuralize`) or fit one (:meth:`fit` runs scikit-learn's solver). ``o`` is monotone in the
    SVM's decision (larger = more outlying); ``o(x) < 0`` where ``Σ α_k k(x, u_k) > 1`` (the dual coefficients sum
    to ``ν·n``, not 1). Explanation: the weighted soft-argmin over support vectors, then the squared-difference rule.

    Parameters
    ----------
    gamma : float or {"scale", "auto"}
        As scikit-learn's (resolved at ``fit``; the effective value is ``gamma_``).
    nu : float
        Upper bound on the fraction of training errors, in (0, 1].
    tol : float
        Solver tolerance.
    beta, eps, chunk_size :
        As :class:`WeightedKDEOutlier` (β and ε defaults use ``gamma_``).

    Attributes
    ----------
    offset_ : float
        ρ, the SVM's threshold: ``decision_function = exp(−γ o) − offset_``.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).normal(size=(100, 2))
    >>> model = OneClassSVMOutlier(gamma=0.5, nu=0.1).double().fit(X)
    >>> bool(((model.decision_function(X) >= 0) == (model.predict(X) == 1)).all())
    True
    """

    _state_attributes = ("gamma", "nu", "tol", "beta", "eps", "chunk_size", "n_features_in_", "gamma_", "beta_",
                         "eps_", "offset_")
    _refit_parameters = ("gamma", "nu", "tol")

    def __init__(self, gamma: float | str = "scale", nu: float = 0.5, tol: float = 1e-3, *,
                 beta: float | None = None, eps: float | None = None, chunk_size: int = DEFAULT_CHUNK):
        super().__init__(gamma, beta=beta, eps=eps, chunk_size=chunk_size)
        self.nu = nu
        self.tol = tol
        self.offset_: float | None = None

    _parameter_checks = {"nu": Real(high=1.0), "tol": Real(), **WeightedKDEOutlier._parameter_checks}

    def _validate_gamma(self) -> None:
        if self.gamma not in ("scale", "auto"):
            check_positive_float(self.gamma, owner=self._name, name="gamma")

    def _effective_gamma(self) -> float:
        return float(self.gamma_)

    def fit(self, X: ArrayLike, y: Any = None, sample_weight: ArrayLike | None = None) -> OneClassSVMOutlier:
        """Train scikit-learn's ``OneClassSVM(kernel="rbf")`` on ``X`` (float64) and neuralize it. Returns ``self``."""
        from sklearn.svm import OneClassSVM

        self._validate_hyperparameters()
        data = self._as_tensor(X, check_features=False)
        if data.shape[0] < 1:
            raise ValueError(f"{self._name} needs at least 1 sample to fit. Got 0.")
        svm = OneClassSVM(kernel="rbf", gamma=self.gamma, nu=self.nu, tol=self.tol)
        svm.fit(data.detach().cpu().double().numpy(), sample_weight=sample_weight)
        self._set_svm(svm)
        return self

    def _set_svm(self, svm: Any) -> None:
        alpha = np.asarray(svm.dual_coef_, dtype=np.float64).ravel()
        keep = alpha > 0  # support vectors with α = 0 contribute nothing (and have no logarithm)
        self.gamma_ = float(svm._gamma)
        self.offset_ = float(np.asarray(svm.offset_).ravel()[0])
        self._set(torch.as_tensor(np.asarray(svm.support_vectors_, dtype=np.float64)[keep]), np.log(alpha[keep]))

    @torch.no_grad()
    def score_samples(self, x: ArrayLike) -> torch.Tensor:
        """``Σ_k α_k exp(−γ‖x − u_k‖²) = exp(−γ o(x))`` (n,), as ``OneClassSVM.score_samples``."""
        return self.density(x)

    @torch.no_grad()
    def decision_function(self, x: ArrayLike) -> torch.Tensor:
        """``exp(−γ o(x)) − ρ`` (n,), as ``OneClassSVM.decision_function`` (> 0: inlier)."""
        self._check_fitted()
        return self.density(x) - self.offset_

    @torch.no_grad()
    def predict(self, x: ArrayLike) -> torch.Tensor:
        """+1 for inliers (decision >= 0), −1 for outliers (n,), as ``OneClassSVM.predict``."""
        decision = self.decision_function(x)
        return torch.where(decision >= 0, 1, -1)

    @classmethod
    def from_sklearn(cls, svm: Any, **kwargs: Any) -> OneClassSVMOutlier:
        """Build from a fitted ``sklearn.svm.OneClassSVM`` with ``kernel="rbf"`` (float64).

        Raises
        ------
        TypeError
            If ``svm`` is not a OneClassSVM.
        ValueError
            If its kernel is not ``"rbf"``.
        sklearn.exceptions.NotFittedError
            If it is not fitted.
        """
        from sklearn.exceptions import NotFittedError
        from sklearn.svm import OneClassSVM

        if not isinstance(svm, OneClassSVM):
            raise TypeError(f"{cls.__name__}.from_sklearn expects a fitted sklearn.svm.OneClassSVM. "
                            f"Got {type(svm).__name__}.")
        if svm.kernel != "rbf":
            raise ValueError(f"{cls.__name__}.from_sklearn needs kernel='rbf' (a Gaussian kernel). The 'kernel' "
                             f"parameter of the OneClassSVM is {svm.kernel!r}.")
        if not hasattr(svm, "dual_coef_"):
            raise NotFittedError(f"This OneClassSVM instance is not fitted yet. Call 'fit' before "
                                 f"{cls.__name__}.from_sklearn.")
        model = cls(gamma=svm.gamma, nu=svm.nu, tol=svm.tol, **kwargs).double()
        model._validate_hyperparameters()
        model._set_svm(svm)
        return model


def _check_weights(sample_weight: Any, n: int, owner: str) -> np.ndarray:
    if sample_weight is None:
        return np.ones(n)
    weights = np.asarray(sample_weight, dtype=np.float64).reshape(-1)
    if weights.shape[0] != n:
        raise ValueError(f"sample_weight passed to {owner} must have one weight per sample ({n}). "
                         f"Got {weights.shape[0]}.")
    if not (np.isfinite(weights).all() and (weights > 0).all()):
        raise ValueError(f"sample_weight passed to {owner} must be finite and > 0.")
    return weights


def _weighted(kde: Any, options: Any) -> bool:
    """A KernelDensity fitted with sample weights (without them: a KDEOutlier)."""
    return getattr(kde.tree_, "sample_weight", None) is not None


register_model(WeightedKDEOutlier, lambda beta, eps: WeightedKDEOutlierActivationRule(beta=beta),
               layers=(SquaredDistance, WeightedLogSumExpPool),
               neuralization=Neuralization(("sklearn.neighbors.KernelDensity",),
                                           "KernelDensity fitted with sample_weight", ("beta", "eps", "chunk_size"),
                                           WeightedKDEOutlier.from_sklearn, applies=_weighted))
register_model(OneClassSVMOutlier, lambda beta, eps: WeightedKDEOutlierActivationRule(beta=beta),
               layers=(SquaredDistance, WeightedLogSumExpPool),
               neuralization=Neuralization(("sklearn.svm.OneClassSVM",), "OneClassSVM (kernel='rbf')",
                                           ("beta", "eps", "chunk_size"), OneClassSVMOutlier.from_sklearn))
