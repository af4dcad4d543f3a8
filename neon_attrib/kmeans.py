"""k-means cluster membership as a network: :class:`KMeansMembership`.

``f_c(x) = min_{k≠c} {‖x − μ_k‖² − ‖x − μ_c‖²}``: all linear cluster differences and a min pooling; ``f_c > 0`` exactly
for the assigned cluster.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ._utils import ArrayLike, check_int, check_positive_float
from .composites import register_rule
from .estimator import NeonEstimator
from .layers import ClusterDifference, MinPool
from .rules import KMeansActivationRule

__all__ = ["KMeansMembership"]


class KMeansMembership(NeonEstimator):
    """k-means cluster membership evidence ``f_c(x) = min_{k≠c} {‖x − μ_k‖² − ‖x − μ_c‖²}`` for every cluster c.

    A :class:`~neon_attrib.layers.ClusterDifference` layer (all ``K(K−1)`` linear differences) and a
    :class:`~neon_attrib.layers.MinPool`. ``model(x)`` has shape (n, K); ``f_c(x) > 0`` exactly for the cluster
    ``x`` is assigned to (all entries are <= 0 on a border), so ``argmax`` equals k-means' ``predict``.

    Parameters
    ----------
    n_clusters : int
        Number of clusters K >= 2.
    n_init : int
        k-means restarts; the run with the lowest objective is kept (scikit-learn's KMeans).
    seed : int, optional
        Seed of the k-means initialisations.
    max_iter : int
        Maximum Lloyd iterations per restart.
    centroid_norm : float, optional
        If set, centroids are rescaled to this norm after clustering (the book's choice for CNN features, where the
        activation scale varies across locations). Changes assignments; ``None`` keeps plain k-means.
    beta : float, optional
        Soft-argmin sharpness of the explanation. Default ``None`` = ``1 / mean_x f_{c(x)}(x)`` over the training
        data: a competitor whose difference exceeds the typical evidence by one unit of it gets ``e^{-1}`` of the
        weight. This makes the default invariant to rescaling the data.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.r_[np.zeros((5, 2)), np.ones((5, 2)) * 4]
    >>> model = KMeansMembership(n_clusters=2, seed=0).double().fit(X)
    >>> model.predict(X).tolist() == model.labels_.tolist()
    True
    """

    _state_attributes = ("n_clusters", "n_init", "seed", "max_iter", "centroid_norm", "beta", "n_features_in_")
    _refit_parameters = ("n_clusters", "n_init", "seed", "max_iter", "centroid_norm")

    def __init__(self, n_clusters: int = 8, n_init: int = 10, seed: int | None = None, *, max_iter: int = 300,
                 centroid_norm: float | None = None, beta: float | None = None):
        super().__init__()
        self.n_clusters = n_clusters
        self.n_init = n_init
        self.seed = seed
        self.max_iter = max_iter
        self.centroid_norm = centroid_norm
        self.beta = beta
        self.difference = ClusterDifference()
        self.pool = MinPool()
        self.labels_: np.ndarray | None = None
        self.default_beta_: float | None = None

    def _validate_hyperparameters(self) -> None:
        check_int(self.n_clusters, owner=self._name, name="n_clusters", minimum=2)
        check_int(self.n_init, owner=self._name, name="n_init", minimum=1)
        check_int(self.max_iter, owner=self._name, name="max_iter", minimum=1)
        if self.seed is not None:
            check_int(self.seed, owner=self._name, name="seed", minimum=0)
        check_positive_float(self.centroid_norm, owner=self._name, name="centroid_norm", allow_none=True)
        check_positive_float(self.beta, owner=self._name, name="beta", allow_none=True)

    def fit(self, X: ArrayLike, y: Any = None) -> KMeansMembership:
        """Run k-means (scikit-learn, float64, ``n_init`` restarts) on ``X`` and neuralize the result."""
        from sklearn.cluster import KMeans

        self._validate_hyperparameters()
        data = self._as_tensor(X, check_features=False)
        if data.shape[0] < self.n_clusters:
            raise ValueError(f"{self._name} with n_clusters={self.n_clusters} needs at least that many samples. "
                             f"Got {data.shape[0]}.")
        kmeans = KMeans(n_clusters=self.n_clusters, n_init=self.n_init, max_iter=self.max_iter,
                        random_state=self.seed).fit(data.detach().cpu().double().numpy())
        self._set_centroids(torch.as_tensor(kmeans.cluster_centers_).to(data), data)
        self.labels_ = kmeans.labels_
        self.inertia_ = float(kmeans.inertia_)
        return self

    @torch.no_grad()
    def _set_centroids(self, centroids: torch.Tensor, data: torch.Tensor | None) -> None:
        if self.centroid_norm is not None:
            centroids = centroids * (self.centroid_norm / centroids.norm(dim=1, keepdim=True).clamp_min(1e-30))
        self.difference.set_centroids(centroids)
        self.n_features_in_ = int(centroids.shape[1])
        evidence = self.pool(self.difference(data)).amax(-1) if data is not None else None
        mean_evidence = float(evidence.clamp_min(0).mean()) if evidence is not None else 0.0
        self.default_beta_ = 1.0 / mean_evidence if mean_evidence > 0 else 1.0
        self._refresh_fitted()

    def _refresh_fitted(self) -> None:
        self.pool.beta = float(self.beta if self.beta is not None else self.default_beta_)

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "pool_beta": self.pool.beta, "default_beta_": self.default_beta_}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self.pool.beta = state.get("pool_beta", self.pool.beta)
        self.default_beta_ = state.get("default_beta_", self.pool.beta)

    @property
    def kmeans_labels_(self) -> np.ndarray | None:
        """The same as :attr:`labels_` (the training assignments of k-means); kept for older code."""
        return self.labels_

    @classmethod
    def from_sklearn(cls, kmeans: Any, X: ArrayLike | None = None, **kwargs: Any) -> KMeansMembership:
        """Build from a fitted :class:`sklearn.cluster.KMeans` or ``MiniBatchKMeans`` (float64). ``X`` (optional) sets
        the default β.

        Raises
        ------
        TypeError
            If ``kmeans`` is not a KMeans or MiniBatchKMeans.
        ValueError
            If it is not fitted or has fewer than 2 clusters.
        """
        from sklearn.cluster import KMeans, MiniBatchKMeans

        if not isinstance(kmeans, (KMeans, MiniBatchKMeans)):
            raise TypeError(f"{cls.__name__}.from_sklearn expects a fitted sklearn.cluster.KMeans or MiniBatchKMeans. "
                            f"Got {type(kmeans)}.")
        if not hasattr(kmeans, "cluster_centers_"):
            raise ValueError(f"This {type(kmeans).__name__} instance is not fitted yet. Call 'fit' before "
                             f"{cls.__name__}.from_sklearn.")
        centers = torch.as_tensor(np.asarray(kmeans.cluster_centers_, dtype=np.float64))
        model = cls(n_clusters=centers.shape[0], n_init=kmeans.n_init if isinstance(kmeans.n_init, int) else 1,
                    seed=kmeans.random_state if isinstance(kmeans.random_state, int) else None, **kwargs).double()
        model._validate_hyperparameters()
        data = None
        if X is not None:
            model.n_features_in_ = centers.shape[1]
            data = model._as_tensor(X)
        model._set_centroids(centers, data)
        model.labels_ = getattr(kmeans, "labels_", None)
        return model

    @property
    def cluster_centers_(self) -> torch.Tensor:
        """The (possibly rescaled) centroids (K, d)."""
        self._check_fitted()
        return self.difference.centroids

    def forward(self, x: ArrayLike) -> torch.Tensor:
        """Cluster evidence ``f_c(x)`` for every cluster, shape (n, K)."""
        self._check_fitted()
        return self.pool(self.difference(self._as_tensor(x)))

    @torch.no_grad()
    def predict(self, x: ArrayLike) -> torch.Tensor:
        """The assigned cluster ``argmax_c f_c(x) = argmin_c ‖x − μ_c‖²``, shape (n,)."""
        return self(x).argmax(-1)

    def default_target(self, output: torch.Tensor) -> torch.Tensor:
        """The target :func:`~neon_attrib.explain` uses when none is given: the assigned cluster."""
        return output.argmax(-1)


register_rule(KMeansMembership, lambda beta, eps: KMeansActivationRule(beta=beta), mode="activation",
              covers_children=True)
