"""k-means cluster membership as a network: :class:`KMeansMembership`, and bisecting k-means as one:
:class:`BisectingKMeansMembership`.

``f_c(x) = min_{k≠c} {‖x − μ_k‖² − ‖x − μ_c‖²}``: all linear cluster differences and a min pooling; ``f_c > 0`` exactly
for the assigned cluster. A bisecting k-means assigns down its tree of bisections instead, which is a min over other
linear differences (one per competing cluster: the decision where their paths part).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..core.estimator import SEED_CONSTRAINTS, MembershipEstimator
from ..core.layers import ClusterDifference, LinearClusterDifference, MinPool
from ..core.registry import Neuralization, register_model
from ..core.rules import KMeansActivationRule
from ..core.validation import ArrayLike, Integer, Options, Real, module_dtype_device

__all__ = ["KMeansMembership", "BisectingKMeansMembership"]


class KMeansMembership(MembershipEstimator):
    """k-means cluster membership evidence ``f_c(x) = min_{k≠c} {‖x − μ_k‖² − ‖x − μ_c‖²}`` for every cluster c.

    A :class:`~neon_attrib.core.layers.ClusterDifference` layer (all ``K(K−1)`` linear differences) and a
    :class:`~neon_attrib.core.layers.MinPool`. ``model(x)`` has shape (n, K); ``f_c(x) > 0`` exactly for the cluster
    ``x`` is assigned to (all entries are <= 0 on a border), so ``argmax`` equals k-means' ``predict``.

    Parameters
    ----------
    n_clusters : int
        Number of clusters K >= 2.
    n_init : int
        k-means restarts; the run with the lowest objective is kept (scikit-learn's KMeans).
    random_state : int, optional
        Seed of the k-means initialisations (scikit-learn's ``random_state``).
    max_iter : int
        Maximum Lloyd iterations per restart.
    centroid_norm : float, optional
        If set, centroids are rescaled to this norm after clustering (the book's choice for CNN features, where the
        activation scale varies across locations). Changes assignments; ``None`` keeps plain k-means.
    beta : float, optional
        Soft-argmin sharpness of the explanation. Default ``None`` = ``1 / mean_x f_{c(x)}(x)`` over the training
        data: a competitor whose difference exceeds the typical evidence by one unit of it gets ``e^{-1}`` of the
        weight. This makes the default invariant to rescaling the data.
    seed : int, optional
        Deprecated alias of ``random_state`` (a ``FutureWarning`` at ``fit``); removed in the next release.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.r_[np.zeros((5, 2)), np.ones((5, 2)) * 4]
    >>> model = KMeansMembership(n_clusters=2, random_state=0).double().fit(X)
    >>> model.predict(X).tolist() == model.labels_.tolist()
    True
    """

    _state_attributes = ("n_clusters", "n_init", "random_state", "seed", "max_iter", "centroid_norm", "beta",
                         "n_features_in_")
    _refit_parameters = ("n_clusters", "n_init", "random_state", "seed", "max_iter", "centroid_norm")

    difference: ClusterDifference
    _parameter_checks = {"n_clusters": Integer(2), "n_init": Integer(1), **SEED_CONSTRAINTS, "max_iter": Integer(1),
                         "centroid_norm": Real(allow_none=True), "beta": Real(allow_none=True)}

    def __init__(self, n_clusters: int = 8, n_init: int = 10, random_state: int | None = None, *,
                 max_iter: int = 300, centroid_norm: float | None = None, beta: float | None = None,
                 seed: int | None = None):
        super().__init__()
        self.n_clusters = n_clusters
        self.n_init = n_init
        self.random_state = random_state
        self.seed = seed  # deprecated alias of random_state
        self.max_iter = max_iter
        self.centroid_norm = centroid_norm
        self.beta = beta
        self.difference = ClusterDifference()
        self.pool = MinPool()
        self.labels_: np.ndarray | None = None
        self.default_beta_: float | None = None

    def fit(self, X: ArrayLike, y: Any = None) -> KMeansMembership:
        """Run k-means (scikit-learn, float64, ``n_init`` restarts) on ``X`` and neuralize the result."""
        from sklearn.cluster import KMeans

        self._validate_hyperparameters()
        data = self._as_tensor(X, check_features=False)
        if data.shape[0] < self.n_clusters:
            raise ValueError(f"{self._name} with n_clusters={self.n_clusters} needs at least that many samples. "
                             f"Got {data.shape[0]}.")
        kmeans = KMeans(n_clusters=self.n_clusters, n_init=self.n_init, max_iter=self.max_iter,
                        random_state=self._random_state()).fit(data.detach().cpu().double().numpy())
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
        self.default_beta_ = self._mean_evidence_beta(data)
        self._refresh_fitted()

    def _refresh_fitted(self) -> None:
        self.pool.beta = float(self.beta if self.beta is not None else self.default_beta_)  # type: ignore[arg-type]

    def _configure_layers(self) -> None:  # the pool's beta travels in the extra state
        pass

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
        seed = kmeans.random_state if isinstance(kmeans.random_state, int) else None
        model = cls(n_clusters=centers.shape[0], n_init=kmeans.n_init if isinstance(kmeans.n_init, int) else 1,
                    random_state=seed, **kwargs).double()
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


register_model(KMeansMembership, lambda beta, eps: KMeansActivationRule(beta=beta), layers=(ClusterDifference, MinPool),
               captum_split=True,
               neuralization=Neuralization(("sklearn.cluster.KMeans", "sklearn.cluster.MiniBatchKMeans"),
                                           "KMeans, MiniBatchKMeans", ("X", "beta"), KMeansMembership.from_sklearn))


class BisectingKMeansMembership(MembershipEstimator):
    """Cluster membership of a bisecting k-means (scikit-learn's ``BisectingKMeans``), exactly as its ``predict``.

    A bisecting k-means assigns a point down its tree of bisections: at every split, to the nearer of the two
    children's centres. That is not always the nearest leaf centre (the splits' borders are the bisectors of the
    *parents'* centres), so :class:`KMeansMembership` would disagree near borders. The tree is a network of the same
    form: for clusters ``c ≠ k``, let ``v`` be the split where their paths part, ``a`` the centre of ``v``'s child
    holding ``c`` and ``b`` the other child's. Then

        ``h_ck(x) = ‖x − b‖² − ‖x − a‖²`` (linear in x),    ``f_c(x) = min_{k≠c} h_ck(x)``,

    and ``f_c(x) > 0`` exactly when every split on the path to ``c`` sends ``x`` towards ``c``: the cluster
    ``predict`` gives. A :class:`~neon_attrib.core.layers.LinearClusterDifference` and a
    :class:`~neon_attrib.core.layers.MinPool`; the k-means rules apply (w²-share in input space, the soft-argmin over
    the
    competitors on CNN activations, each competitor weighed by the split that separates it).

    Parameters
    ----------
    n_clusters : int
        Number of clusters K >= 2.
    random_state : int, optional
        Seed of the bisections' initialisations.
    n_init, max_iter : int
        k-means restarts per bisection, and their maximum Lloyd iterations.
    bisecting_strategy : {"biggest_inertia", "largest_cluster"}
        Which cluster to split next (scikit-learn's).
    beta : float, optional
        Soft-argmin sharpness of the explanation; ``None`` = 1 / mean training evidence (as
        :class:`KMeansMembership`), 1 when built without data.
    seed : int, optional
        Deprecated alias of ``random_state`` (a ``FutureWarning`` at ``fit``); removed in the next release.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).normal(size=(60, 2))
    >>> model = BisectingKMeansMembership(n_clusters=4, random_state=0).double().fit(X)
    >>> from sklearn.cluster import BisectingKMeans
    >>> reference = BisectingKMeans(n_clusters=4, random_state=0).fit(X)
    >>> bool((model.predict(X).numpy() == reference.predict(X)).all())
    True
    """

    _state_attributes = ("n_clusters", "random_state", "seed", "n_init", "max_iter", "bisecting_strategy", "beta",
                         "n_features_in_", "default_beta_")
    _refit_parameters = ("n_clusters", "random_state", "seed", "n_init", "max_iter", "bisecting_strategy")

    centroids: torch.Tensor

    difference: LinearClusterDifference
    _parameter_checks = {"n_clusters": Integer(2), **SEED_CONSTRAINTS, "n_init": Integer(1), "max_iter": Integer(1),
                         "bisecting_strategy": Options("biggest_inertia", "largest_cluster"),
                         "beta": Real(allow_none=True)}

    def __init__(self, n_clusters: int = 8, random_state: int | None = None, *, n_init: int = 1,
                 max_iter: int = 300, bisecting_strategy: str = "biggest_inertia", beta: float | None = None,
                 seed: int | None = None):
        super().__init__()
        self.n_clusters = n_clusters
        self.random_state = random_state
        self.seed = seed  # deprecated alias of random_state
        self.n_init = n_init
        self.max_iter = max_iter
        self.bisecting_strategy = bisecting_strategy
        self.beta = beta
        self.default_beta_: float | None = None
        self.labels_: np.ndarray | None = None
        self.register_buffer("centroids", torch.empty(0, 0))
        self.difference = LinearClusterDifference()
        self.pool = MinPool()

    def fit(self, X: ArrayLike, y: Any = None) -> BisectingKMeansMembership:
        """Run scikit-learn's ``BisectingKMeans`` (float64) on ``X`` and neuralize its tree. Returns ``self``."""
        from sklearn.cluster import BisectingKMeans

        self._validate_hyperparameters()
        data = self._as_tensor(X, check_features=False)
        if data.shape[0] < self.n_clusters:
            raise ValueError(f"{self._name} with n_clusters={self.n_clusters} needs at least that many samples. "
                             f"Got {data.shape[0]}.")
        bisecting = BisectingKMeans(n_clusters=self.n_clusters, random_state=self._random_state(), n_init=self.n_init,
                                    max_iter=self.max_iter, bisecting_strategy=self.bisecting_strategy)
        self._set_tree(bisecting.fit(data.detach().cpu().double().numpy()), data)
        return self

    @torch.no_grad()
    def _set_tree(self, bisecting: Any, data: torch.Tensor | None) -> None:
        root = bisecting._bisecting_tree
        # the tree's centres are relative to the training mean when scikit-learn centred the (dense) data
        offset = np.asarray(getattr(bisecting, "_X_mean", 0.0), dtype=np.float64)
        paths: dict[int, list[tuple[int, int]]] = {}  # leaf label -> [(split id, side 0 = left / 1 = right), ...]
        splits: list[tuple[np.ndarray, np.ndarray]] = []  # (left centre, right centre) per split

        def walk(node: Any, path: list[tuple[int, int]]) -> None:
            if node.left is None:
                paths[int(node.label)] = path
                return
            splits.append((np.asarray(node.left.center, dtype=np.float64) + offset,
                           np.asarray(node.right.center, dtype=np.float64) + offset))
            split = len(splits) - 1
            walk(node.left, [*path, (split, 0)])
            walk(node.right, [*path, (split, 1)])

        walk(root, [])
        k = len(paths)
        centres = np.asarray(bisecting.cluster_centers_, dtype=np.float64)
        centre = centres.mean(0)  # expansion point: data far from the origin keeps its precision
        others = [[j for j in range(k) if j != c] for c in range(k)]
        weight = np.empty((k, k - 1, centres.shape[1]))
        bias = np.empty((k, k - 1))
        for c, row in enumerate(others):
            for j, other in enumerate(row):
                depth = next(i for i, (a, b) in enumerate(zip(paths[c], paths[other])) if a != b)
                split, side = paths[c][depth]
                own, rival = splits[split][side] - centre, splits[split][1 - side] - centre
                # ‖x − rival‖² − ‖x − own‖² = 2 (own − rival)ᵀ(x − x₀) + ‖rival − x₀‖² − ‖own − x₀‖²
                weight[c, j] = 2.0 * (own - rival)
                bias[c, j] = rival @ rival - own @ own
        dtype, device = module_dtype_device(self)
        as_tensor = lambda array: torch.as_tensor(array).to(dtype=dtype, device=device)  # noqa: E731
        self.difference.weight, self.difference.bias = as_tensor(weight), as_tensor(bias)
        self.difference.centre = as_tensor(centre)
        self.difference.others = torch.tensor(others, dtype=torch.long, device=device)
        self.centroids = as_tensor(centres)
        self.n_features_in_ = int(centres.shape[1])
        self.default_beta_ = self._mean_evidence_beta(None if data is None else data.to(dtype=dtype, device=device))
        self.labels_ = np.asarray(bisecting.labels_) if hasattr(bisecting, "labels_") else None
        self._refresh_fitted()

    @classmethod
    def from_sklearn(cls, bisecting: Any, X: ArrayLike | None = None, **kwargs: Any) -> BisectingKMeansMembership:
        """Build from a fitted :class:`sklearn.cluster.BisectingKMeans` (float64); ``X`` (optional, the training
        data) sets the default β.

        Raises
        ------
        TypeError
            If ``bisecting`` is not a BisectingKMeans.
        ValueError
            If it is not fitted or has fewer than 2 clusters.
        """
        from sklearn.cluster import BisectingKMeans

        if not isinstance(bisecting, BisectingKMeans):
            raise TypeError(f"{cls.__name__}.from_sklearn expects a fitted sklearn.cluster.BisectingKMeans. "
                            f"Got {type(bisecting)}.")
        if not hasattr(bisecting, "cluster_centers_"):
            raise ValueError(f"This {type(bisecting).__name__} instance is not fitted yet. Call 'fit' before "
                             f"{cls.__name__}.from_sklearn.")
        if not hasattr(bisecting, "_bisecting_tree"):  # scikit-learn's (private) tree: 1.1 to at least 1.9
            raise ValueError(f"{cls.__name__}.from_sklearn reads the tree of bisections scikit-learn keeps in "
                             f"'_bisecting_tree', which this scikit-learn version does not have; fit "
                             f"{cls.__name__}(n_clusters, random_state) on the data instead.")
        centres = np.asarray(bisecting.cluster_centers_)
        if centres.shape[0] < 2:
            raise ValueError(f"{cls.__name__} needs a BisectingKMeans with n_clusters >= 2. Got {centres.shape[0]}.")
        seed = bisecting.random_state if isinstance(bisecting.random_state, int) else None
        model = cls(n_clusters=centres.shape[0], random_state=seed, n_init=bisecting.n_init,
                    max_iter=bisecting.max_iter,
                    bisecting_strategy=bisecting.bisecting_strategy, **kwargs).double()
        model._validate_hyperparameters()
        data = None
        if X is not None:
            model.n_features_in_ = int(centres.shape[1])
            try:
                data = model._as_tensor(X)
            finally:
                model._unfit()
        model._set_tree(bisecting, data)
        return model

    @property
    def cluster_centers_(self) -> torch.Tensor:
        """The leaf centres (K, d), in the order of scikit-learn's ``cluster_centers_`` and labels."""
        self._check_fitted()
        return self.centroids


register_model(BisectingKMeansMembership, lambda beta, eps: KMeansActivationRule(beta=beta),
               layers=(LinearClusterDifference, MinPool), captum_split=True,
               neuralization=Neuralization(("sklearn.cluster.BisectingKMeans",), "BisectingKMeans", ("X", "beta"),
                                           BisectingKMeansMembership.from_sklearn))
