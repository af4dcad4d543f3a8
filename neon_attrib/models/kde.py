"""Kernel density estimates as networks: the outlier score :class:`KDEOutlier` and the inlier score :class:`KDEInlier`.

``KDEOutlier``: ``o(x) = −(1/γ) log(1/N Σ_k exp(−γ‖x − u_k‖²))``, a squared-distance layer and a log-mean-exp pooling.
``KDEInlier``: ``i(x) = 1/N Σ_k exp(−γ‖x − u_k‖²)`` through random Fourier features and a mean pooling.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..core.estimator import SEED_CONSTRAINTS, NeonEstimator, _check_index
from ..core.functional import (
    DEFAULT_CHUNK,
    fused_outlier_score,
    log_mean_exp,
    random_cosine_features,
    squared_distance,
    support_centre,
)
from ..core.layers import LogMeanExpPool, MeanPool, RandomCosineFeatures, SquaredDistance
from ..core.registry import Neuralization, register_model
from ..core.rules import KDEInlierActivationRule, KDEOutlierActivationRule
from ..core.validation import ArrayLike, Boolean, Integer, Real, check_int

__all__ = ["KDEOutlier", "KDEInlier"]


class KDEOutlier(NeonEstimator):
    """Kernel density outlier score ``o(x) = −(1/γ) log(1/N Σ_k exp(−γ‖x − u_k‖²))`` as a two-layer network.

    ``o(x) = LME^{−γ}_k {‖x − u_k‖²}``: a :class:`~neon_attrib.core.layers.SquaredDistance` layer followed by a
    :class:`~neon_attrib.core.layers.LogMeanExpPool`. ``o(x) >= min_k ‖x − u_k‖² >= 0``; larger means more anomalous.

    Parameters
    ----------
    gamma : float
        Kernel sharpness γ > 0 of ``exp(−γ‖x − x'‖²)`` (scikit-learn's bandwidth h gives γ = 1/(2h²)).
    beta : float, optional
        Soft-argmin sharpness of the explanation. Default ``None`` = γ: the redistribution then weighs each
        support point by its share of the density, ``R_k = exp(−γh_k)/Σ exp(−γh_k') · o(x)``.
    eps : float, optional
        Stabiliser of the input rule. Default ``None`` = ``0.01 / γ``: a hundredth of the kernel's squared length
        scale. Support points closer than that are "the same point" at the kernel's resolution; their share is
        dissipated instead of being spread over numerically meaningless coordinate differences. The explanation
        conserves ``o(x)`` up to that share (``eps=0`` conserves exactly).
    chunk_size : int
        Support points processed at once in the chunked computations (:meth:`score`, activation rule).
    fused : bool
        If True, ``forward`` computes ``o(x)`` and its gradient in one chunked pass over the support set
        (:func:`~neon_attrib.core.layers.fused_outlier_score`) instead of through the two layers: bounded memory for
        large
        N × batch (heads on CNN feature maps), same values. The activation rule works with it; the input-space layer
        rules need the layers, so ``NeonComposite(mode="input")`` refuses a fused model.

    Attributes
    ----------
    n_features_in_ : int
        Number of features seen at ``fit``.
    beta_, eps_ : float
        The effective hyperparameters after ``fit``.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).normal(size=(100, 3))
    >>> model = KDEOutlier(gamma=0.5).fit(X)
    >>> model(X[:4]).shape
    torch.Size([4])
    """

    _state_attributes = ("gamma", "beta", "eps", "fused", "n_features_in_", "beta_", "eps_")
    _dtype_parameters = ("gamma", "eps_")

    _parameter_checks = {"gamma": Real(), "beta": Real(allow_none=True), "eps": Real(closed=True, allow_none=True),
                         "chunk_size": Integer(1), "fused": Boolean()}

    def __init__(self, gamma: float = 1.0, *, beta: float | None = None, eps: float | None = None,
                 chunk_size: int = DEFAULT_CHUNK, fused: bool = False):
        super().__init__()
        self.gamma = gamma
        self.fused = fused
        self.beta = beta
        self.eps = eps
        self.chunk_size = chunk_size
        self.beta_: float | None = None
        self.eps_: float | None = None
        self.distance = SquaredDistance()
        self.pool = LogMeanExpPool(alpha=-1.0, chunk_size=chunk_size)

    def _configure_layers(self) -> None:
        if not self.__sklearn_is_fitted__():
            return
        self.pool.alpha = -float(self.gamma)
        self.pool.beta = self.beta_
        self.pool.chunk_size = self.chunk_size
        self.distance.eps = float(self.eps_ if self.eps_ is not None else 0.0)  # set with beta_ by _refresh_fitted

    def fit(self, X: ArrayLike, y: Any = None) -> KDEOutlier:
        """Use the rows of ``X`` (n_samples, n_features) as the support points. Returns ``self``."""
        self._validate_hyperparameters()
        support = self._as_tensor(X, check_features=False)
        if support.shape[0] < 1:
            raise ValueError(f"{self._name} needs at least 1 sample to fit. Got 0.")
        self._set_support(support)
        return self

    def _set_support(self, support: torch.Tensor) -> None:
        self.distance.support = support.detach().clone()
        self.n_features_in_ = int(support.shape[1])
        self._refresh_fitted()

    def _refresh_fitted(self) -> None:
        self.beta_ = float(self.beta if self.beta is not None else self.gamma)
        self.eps_ = float(self.eps if self.eps is not None else 0.01 / self.gamma)
        self._configure_layers()

    @property
    def support_(self) -> torch.Tensor:
        """The support points (N, d)."""
        self._check_fitted()
        return self.distance.support

    def forward(self, x: ArrayLike) -> torch.Tensor:
        """Outlier scores ``o(x)`` of shape (n,) for ``x`` of shape (n, d)."""
        self._check_fitted()
        x = self._as_tensor(x)
        if self.fused:
            return fused_outlier_score(x, self.distance.support, self.gamma, self.chunk_size, self.distance.centre)
        return self.pool(self.distance(x))

    #: autograd's gradient of this forward is ``2(x − Σ_k p_k u_k)`` (β = γ): the activation rule reuses it
    _softmin_gradient_forward = forward

    @torch.no_grad()
    def score_samples(self, x: ArrayLike) -> torch.Tensor:
        """Log-density of the normalised Gaussian KDE, as scikit-learn's ``KernelDensity.score_samples``, shape (n,).

        ``log p̂(x) = −γ o(x) − (d/2) log(π/γ)`` with bandwidth ``h = 1/√(2γ)``.
        """
        return -float(self.gamma) * self.score(x) - 0.5 * self.n_features_in_ * math.log(math.pi / self.gamma)

    @torch.no_grad()
    def score(self, x: ArrayLike) -> torch.Tensor:
        """``o(x)`` like ``forward`` but chunked over the support set: never builds the (n, N) distance matrix.

        Use it to score large batches against large support sets (N = 10^6) in bounded memory.
        """
        self._check_fitted()
        return fused_outlier_score(self._as_tensor(x), self.distance.support, self.gamma, self.chunk_size,
                                   self.distance.centre)

    def density(self, x: ArrayLike) -> torch.Tensor:
        """The exact unnormalised density ``p(x) = exp(−γ o(x))`` (the KDE inlier score), shape (n,)."""
        return torch.exp(-self.gamma * self(x))

    @classmethod
    def from_sklearn(cls, kde: Any, **kwargs: Any) -> KDEOutlier:
        """Build from a fitted :class:`sklearn.neighbors.KernelDensity` with a Gaussian kernel.

        γ = 1 / (2 · bandwidth²); the support points are the fitted data. ``o(x)`` then equals
        ``−(1/γ) (score_samples(x) + d/2 · log(2π bandwidth²))``. The model is float64 (scikit-learn's precision).

        Raises
        ------
        TypeError
            If ``kde`` is not a KernelDensity.
        ValueError
            If it is not fitted, uses another kernel or metric, or was fitted with sample weights.
        """
        support, gamma = _sklearn_kde_support(kde, cls.__name__)
        return cls(gamma=gamma, **kwargs).double().fit(support)

    def leave_one_out(self, index: int) -> KDEOutlier:
        """A copy of this model whose support set lacks row ``index``: the model to explain a training point with.

        Examples
        --------
        >>> import numpy as np
        >>> X = np.random.default_rng(0).normal(size=(50, 2))
        >>> full = KDEOutlier(gamma=1.0).double().fit(X)
        >>> loo = full.leave_one_out(3)
        >>> bool(torch.isclose(loo(X[3:4])[0], full.score_training()[3]))
        True
        """
        self._check_fitted()
        support = self.distance.support
        index = _check_index(index, support.shape[0], self._name)
        if support.shape[0] < 2:
            raise ValueError(f"{self._name} needs at least 2 support points to leave one out.")
        keep = torch.ones(support.shape[0], dtype=torch.bool, device=support.device)
        keep[index] = False
        clone = type(self)(self.gamma, beta=self.beta, eps=self.eps, chunk_size=self.chunk_size, fused=self.fused)
        clone.to(dtype=support.dtype, device=support.device)
        clone._set_support(support[keep])
        return clone

    @torch.no_grad()
    def reduced(self, n_support: int, method: str = "herding", seed: int | None = None,
                n_candidates: int | None = None) -> KDEOutlier:
        """A copy with a smaller support set, for faster scoring and explanation of large KDEs (N = 10^5–10^6).

        Parameters
        ----------
        n_support : int
            Support points to keep.
        method : {"herding", "random"}
            ``"random"``: a uniform subsample. ``"herding"``: kernel herding (Chen et al., 2010), a greedy choice
            whose empirical kernel mean tracks the full set's, so the reduced density matches the full one better
            than a random subsample of the same size. Herding scores ``n_candidates`` random candidates against a
            random reference sample of the same size (cost ~ ``n_candidates² + n_support · n_candidates``).
        seed : int, optional
            Seed of the random choices.
        n_candidates : int, optional
            Herding's candidate pool (default ``min(N, max(4 · n_support, 2000))``).

        Returns
        -------
        KDEOutlier
            Same hyperparameters, ``n_support`` support points. Measure the fidelity loss on your data, e.g.
            ``(reduced.score(x) − full.score(x)).abs()``; ``benchmarks/bench_kde.py --reduced`` reports it.
        """
        self._check_fitted()
        support = self.distance.support
        n_total = support.shape[0]
        check_int(n_support, owner=self._name, name="n_support", minimum=1)
        if n_support > n_total:
            raise ValueError(f"n_support={n_support} exceeds the {n_total} support points of this {self._name}.")
        if n_candidates is not None:
            check_int(n_candidates, owner=f"{self._name}.reduced", name="n_candidates", minimum=n_support)
        if method not in ("herding", "random"):
            raise ValueError(f"The 'method' parameter of {self._name}.reduced must be 'herding' or 'random'. "
                             f"Got {method!r}.")
        generator = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(2**62, (1,))))
        if method == "random":
            chosen = torch.randperm(n_total, generator=generator)[:n_support].to(support.device)
        else:
            pool = min(n_total, n_candidates or max(4 * n_support, 2000))
            order = torch.randperm(n_total, generator=generator).to(support.device)
            candidates, reference = support[order[:pool]], support[order[-pool:]]
            target = torch.zeros(pool, dtype=support.dtype, device=support.device)
            for start in range(0, pool, 1024):  # kernel mean of the reference sample at each candidate
                block = squared_distance(candidates[start:start + 1024], reference)
                target[start:start + 1024] = torch.exp(-self.gamma * block).mean(-1)
            picked_sum = torch.zeros_like(target)
            taken = torch.zeros(pool, dtype=torch.bool, device=support.device)
            picks = []
            for t in range(n_support):
                gain = target - picked_sum / (t + 1)
                gain[taken] = -math.inf
                best = int(gain.argmax())
                picks.append(best)
                taken[best] = True
                picked_sum += torch.exp(-self.gamma * squared_distance(candidates, candidates[best:best + 1]))[:, 0]
            chosen = order[:pool][torch.tensor(picks, device=support.device)]
        clone = type(self)(self.gamma, beta=self.beta, eps=self.eps, chunk_size=self.chunk_size, fused=self.fused)
        clone.to(dtype=support.dtype, device=support.device)
        clone._set_support(support[chosen])
        return clone

    @torch.no_grad()
    def score_training(self, leave_one_out: bool = True) -> torch.Tensor:
        """Scores of the support points themselves, each left out of its own model when ``leave_one_out``."""
        self._check_fitted()
        support = self.distance.support
        if not leave_one_out:
            return self.score(support)
        n = support.shape[0]
        if n < 2:
            raise ValueError(f"{self._name} needs at least 2 support points to leave one out.")
        out = []
        centre = self.distance.centre
        for start in range(0, n, 1024):
            h = squared_distance(support[start:start + 1024], support, centre=centre)
            rows = torch.arange(h.shape[0], device=h.device)
            h[rows, rows + start] = math.inf  # exp(−γ·inf) = 0: the point is out of its own sum
            out.append(log_mean_exp(h, -float(self.gamma), self.chunk_size, count=n - 1))
        return torch.cat(out)


def _sklearn_kde_support(kde: Any, owner: str) -> tuple[np.ndarray, float]:
    from sklearn.neighbors import KernelDensity

    if not isinstance(kde, KernelDensity):
        raise TypeError(f"{owner}.from_sklearn expects a fitted sklearn.neighbors.KernelDensity. Got {type(kde)}.")
    if not hasattr(kde, "tree_"):
        raise ValueError(f"This KernelDensity instance is not fitted yet. Call 'fit' before {owner}.from_sklearn.")
    if kde.kernel != "gaussian":
        raise ValueError(f"{owner}.from_sklearn needs kernel='gaussian'. Got kernel={kde.kernel!r}.")
    if kde.metric != "euclidean":
        raise ValueError(f"{owner}.from_sklearn needs metric='euclidean'. Got metric={kde.metric!r}.")
    if getattr(kde.tree_, "sample_weight", None) is not None:
        raise ValueError(f"{owner}.from_sklearn does not support a KernelDensity fitted with sample_weight.")
    bandwidth = float(getattr(kde, "bandwidth_", kde.bandwidth))
    return np.asarray(kde.tree_.data), 1.0 / (2.0 * bandwidth**2)


# ---------------------------------------------------------------------------------------------------------------------
class KDEInlier(NeonEstimator):
    """Kernel density inlier score ``i(x) = 1/N Σ_k exp(−γ‖x − u_k‖²)`` through H random Fourier features.

    ``î(x) = 1/H Σ_j √2 cos(ω_jᵀx + b_j) μ_j`` with ``ω_j ~ N(0, 2γ I)``, ``b_j ~ U(0, 2π)`` and
    ``μ_j = 1/N Σ_k √2 cos(ω_jᵀu_k + b_j)``: a :class:`~neon_attrib.core.layers.RandomCosineFeatures` layer and a
    :class:`~neon_attrib.core.layers.MeanPool`. ``î → i`` as H grows (error ~ 1/√H); :meth:`exact` gives ``i(x)``.

    Parameters
    ----------
    gamma : float
        Kernel sharpness γ > 0.
    n_features : int
        Number H of random features (the book uses 2500).
    random_state : int, optional
        Seed of the random draw. The draw is made on the CPU in float64 and then cast, so the same seed gives the same
        model on every device and dtype. ``None`` draws from a fresh, non-reproducible seed.
    eps : float, optional
        Stabiliser of the activation rule (:class:`~neon_attrib.core.rules.KDEInlierActivationRule`); default 1.0.
    seed : int, optional
        Deprecated alias of ``random_state`` (a ``FutureWarning`` at ``fit``); removed in the next release.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).normal(size=(100, 3))
    >>> model = KDEInlier(gamma=0.5, n_features=4000, random_state=0).double().fit(X)
    >>> bool((model(X[:5]) - model.exact(X[:5])).abs().max() < 0.05)
    True
    """

    _state_attributes = ("gamma", "n_features", "random_state", "seed", "eps", "n_features_in_", "eps_")
    _dtype_parameters = ("gamma", "eps_")
    _refit_parameters = ("gamma", "n_features", "random_state", "seed")

    support: torch.Tensor

    _parameter_checks = {"gamma": Real(), "n_features": Integer(1), **SEED_CONSTRAINTS, "eps": Real(allow_none=True)}

    def __init__(self, gamma: float = 1.0, n_features: int = 2500, random_state: int | None = None, *,
                 eps: float | None = None, seed: int | None = None):
        super().__init__()
        self.gamma = gamma
        self.n_features = n_features
        self.random_state = random_state
        self.seed = seed  # deprecated alias of random_state
        self.eps = eps
        self.eps_: float | None = None
        self.features = RandomCosineFeatures()
        self.pool = MeanPool()
        self.register_buffer("support", torch.empty(0, 0))

    def fit(self, X: ArrayLike, y: Any = None) -> KDEInlier:
        """Draw the random features (seeded) and average them over the rows of ``X``. Returns ``self``."""
        self._validate_hyperparameters()
        support = self._as_tensor(X, check_features=False)
        if support.shape[0] < 1:
            raise ValueError(f"{self._name} needs at least 1 sample to fit. Got 0.")
        random_state = self._random_state()
        generator = torch.Generator().manual_seed(
            random_state if random_state is not None else int(torch.randint(2**62, (1,)).item()))
        d = support.shape[1]
        omega = torch.randn(self.n_features, d, generator=generator, dtype=torch.float64) * math.sqrt(2 * self.gamma)
        bias = torch.rand(self.n_features, generator=generator, dtype=torch.float64) * (2 * math.pi)
        self._set(support, omega.to(support), bias.to(support))
        return self

    def _refresh_fitted(self) -> None:
        self.eps_ = float(self.eps if self.eps is not None else 1.0)

    def _set(self, support: torch.Tensor, omega: torch.Tensor, bias: torch.Tensor) -> None:
        mean = torch.zeros_like(bias)
        for chunk in support.split(4096):
            mean += random_cosine_features(chunk, omega, bias).sum(0)
        self.features.omega, self.features.bias = omega.clone(), bias.clone()
        self.features.mean = mean / support.shape[0]
        self.support = support.detach().clone()
        self.n_features_in_ = int(support.shape[1])
        self._refresh_fitted()

    def forward(self, x: ArrayLike) -> torch.Tensor:
        """Approximate inlier scores ``î(x)`` of shape (n,)."""
        self._check_fitted()
        return self.pool(self.features(self._as_tensor(x)))

    @torch.no_grad()
    def exact(self, x: ArrayLike) -> torch.Tensor:
        """The exact inlier score ``i(x) = 1/N Σ_k exp(−γ‖x − u_k‖²)`` (what ``forward`` approximates)."""
        self._check_fitted()
        h = squared_distance(self._as_tensor(x), self.support, centre=support_centre(self.support))
        return torch.exp(log_mean_exp(h, -float(self.gamma)) * -float(self.gamma))

    def score_samples(self, x: ArrayLike) -> torch.Tensor:
        """Log of the exact normalised Gaussian KDE density (scikit-learn's ``KernelDensity.score_samples``), (n,)."""
        return torch.log(self.exact(x)) - 0.5 * self.n_features_in_ * math.log(math.pi / self.gamma)

    def uniform_relevance(self, x: ArrayLike) -> torch.Tensor:
        """The baseline explanation of the exact inlier score: ``R_i = i(x) / d`` for every feature."""
        scores = self.exact(x)
        return scores.unsqueeze(-1).expand(-1, self.n_features_in_) / self.n_features_in_

    def leave_one_out(self, index: int) -> KDEInlier:
        """A copy with the *same* random features whose mean feature ``μ`` lacks support point ``index``."""
        self._check_fitted()
        index = _check_index(index, self.support.shape[0], self._name)
        if self.support.shape[0] < 2:
            raise ValueError(f"{self._name} needs at least 2 support points to leave one out.")
        keep = torch.ones(self.support.shape[0], dtype=torch.bool, device=self.support.device)
        keep[index] = False
        clone = type(self)(**self.get_params(deep=False))
        clone.to(dtype=self.support.dtype, device=self.support.device)
        clone._set(self.support[keep], self.features.omega, self.features.bias)
        return clone

    @torch.no_grad()
    def score_training(self, leave_one_out: bool = True) -> torch.Tensor:
        """``î`` of the support points, each left out of its own mean feature when ``leave_one_out``."""
        self._check_fitted()
        phi = random_cosine_features(self.support, self.features.omega, self.features.bias)
        mean = self.features.mean
        if leave_one_out:
            n = self.support.shape[0]
            if n < 2:
                raise ValueError(f"{self._name} needs at least 2 support points to leave one out.")
            mean = (n * mean - phi) / (n - 1)
        return (phi * mean).mean(-1)


def _unweighted(kde: Any, options: Any) -> bool:
    """A KernelDensity fitted without sample weights (with them: a WeightedKDEOutlier)."""
    return getattr(kde.tree_, "sample_weight", None) is None


register_model(KDEOutlier, lambda beta, eps: KDEOutlierActivationRule(beta=beta),
               layers=(SquaredDistance, LogMeanExpPool), captum_split=True,
               neuralization=Neuralization(("sklearn.neighbors.KernelDensity",), "KernelDensity (kernel='gaussian')",
                                           ("beta", "eps", "chunk_size", "fused"), KDEOutlier.from_sklearn,
                                           applies=_unweighted))
register_model(KDEInlier, lambda beta, eps: KDEInlierActivationRule(eps=eps), layers=(RandomCosineFeatures, MeanPool),
               captum_split=True)
