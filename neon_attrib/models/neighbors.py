"""The k-nearest-neighbour outlier score as a neural network: :class:`KNNOutlier`.

``o(x) = 1/k Σ_{j ∈ kNN(x)} ‖x − u_j‖²`` is a :class:`~neon_attrib.core.layers.SquaredDistance` layer followed by a
k-min pooling (:class:`~neon_attrib.core.layers.KMinPool`); ``sqrt=True`` puts a
:class:`~neon_attrib.core.layers.SquareRoot`
on top, which for ``k = 1`` is the Euclidean distance to the nearest support point: PatchCore's patch score against
its memory bank. The relevance of the k-min goes to the k nearest support points in proportion to their distances
(exact), or by a soft-argmin over all of them (``beta``); the squared-difference rule then hands each support point's
relevance to the features that make ``x`` far from it.

Large support sets (PatchCore memory banks of 10^6 patches) are searched in chunks (:func:`~neon_attrib.core.functional.
k_nearest`): :meth:`KNNOutlier.score`, :meth:`KNNOutlier.kneighbors` and the ``fused`` forward never build the
(n, N) distance matrix.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..core.estimator import NeonEstimator
from ..core.functional import DEFAULT_CHUNK, k_nearest
from ..core.layers import KMinPool, SquaredDistance, SquareRoot
from ..core.registry import Neuralization, register_model
from ..core.rules import KNNOutlierActivationRule
from ..core.validation import ArrayLike, Boolean, Integer, Real, check_int

__all__ = ["KNNOutlier"]


class KNNOutlier(NeonEstimator):
    """k-nearest-neighbour outlier score ``o(x) = 1/k Σ_{j ∈ kNN(x)} ‖x − u_j‖²`` (or ``√o`` with ``sqrt=True``).

    Three layers: :class:`~neon_attrib.core.layers.SquaredDistance` (``h_j = ‖x − u_j‖²``),
    :class:`~neon_attrib.core.layers.
    KMinPool` (the mean of the k smallest) and, with ``sqrt``, :class:`~neon_attrib.core.layers.SquareRoot`. The squared
    distances to the neighbours equal scikit-learn's ``NearestNeighbors.kneighbors`` distances squared.

    Parameters
    ----------
    n_neighbors : int
        k >= 1 (at most the number of support points).
    sqrt : bool
        Output ``√o``: the Euclidean distance to the nearest support point for ``k = 1`` (PatchCore), the root mean
        square of the k distances otherwise. The relevance of the root passes down unchanged, so the explanation of
        ``√o`` shares ``√o`` in the proportions that explain ``o``.
    beta : float, optional
        ``None`` (default): each of the k nearest support points gets ``R_j = h_j / k`` (exact: how the score is
        computed). A float β > 0: ``R_j = softmin_β(h)_j · o`` over all support points (smooth in x).
    eps : float
        Stabiliser of the squared-difference rule (default 0: exact conservation; with the hard k-min share the rule
        never divides by a vanishing distance, since ``R_j / h_j = R / Σ_{kNN} h``).
    chunk_size : int
        Support points searched at once (bounded memory in :meth:`score`, :meth:`kneighbors` and the fused forward).
    fused : bool
        ``forward`` searches the k nearest in chunks and computes their distances directly (no (n, N) matrix, for
        large support sets and heads on feature maps) instead of running the two layers: the same values, and the
        activation rule works with it; the input-space layer rules need the layers
        (``NeonComposite(mode="input")`` refuses a fused model).

    Attributes
    ----------
    n_features_in_ : int
        Number of features seen at ``fit``.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).normal(size=(100, 3))
    >>> model = KNNOutlier(n_neighbors=1, sqrt=True).double().fit(X)
    >>> distances, indices = model.kneighbors(X[:2] + 0.01)
    >>> bool(torch.allclose(model(X[:2] + 0.01), distances[:, 0]))
    True
    """

    _state_attributes = ("n_neighbors", "sqrt", "beta", "eps", "chunk_size", "fused", "n_features_in_")

    def __init__(self, n_neighbors: int = 5, *, sqrt: bool = False, beta: float | None = None, eps: float = 0.0,
                 chunk_size: int = DEFAULT_CHUNK, fused: bool = False):
        super().__init__()
        self.n_neighbors = n_neighbors
        self.sqrt = sqrt
        self.beta = beta
        self.eps = eps
        self.chunk_size = chunk_size
        self.fused = fused
        self.distance = SquaredDistance()
        self.pool = KMinPool(k=1)
        self.root = SquareRoot()

    _parameter_checks = {"n_neighbors": Integer(1), "sqrt": Boolean(), "fused": Boolean(),
                         "beta": Real(allow_none=True), "eps": Real(closed=True), "chunk_size": Integer(1)}

    def _validate_hyperparameters(self) -> None:
        super()._validate_hyperparameters()
        if self.__sklearn_is_fitted__() and self.n_neighbors > self.distance.support.shape[0]:
            raise ValueError(f"The 'n_neighbors' parameter of {self._name} must be <= the "
                             f"{self.distance.support.shape[0]} support points. Got {self.n_neighbors} instead.")

    def _configure_layers(self) -> None:
        self.pool.k = int(self.n_neighbors)
        self.pool.beta = None if self.beta is None else float(self.beta)
        self.distance.eps = float(self.eps)

    def fit(self, X: ArrayLike, y: Any = None) -> KNNOutlier:
        """Use the rows of ``X`` (n_samples, n_features) as the support points. Returns ``self``."""
        self._validate_hyperparameters()
        support = self._as_tensor(X, check_features=False)
        if support.shape[0] < self.n_neighbors:
            raise ValueError(f"{self._name} with n_neighbors={self.n_neighbors} needs at least that many samples. "
                             f"Got {support.shape[0]}.")
        self.distance.support = support.detach().clone()
        self.n_features_in_ = int(support.shape[1])
        self._refresh_fitted()
        return self

    @property
    def support_(self) -> torch.Tensor:
        """The support points (N, d) (PatchCore: the memory bank)."""
        self._check_fitted()
        return self.distance.support

    def forward(self, x: ArrayLike) -> torch.Tensor:
        """Outlier scores ``o(x)`` (or ``√o(x)``) of shape (n,) for ``x`` of shape (n, d)."""
        self._check_fitted()
        x = self._as_tensor(x)
        if self.fused:
            h, _ = k_nearest(x, self.distance.support, self.n_neighbors, self.chunk_size, centre=self._centre())
            score = h.mean(-1)
        else:
            score = self.pool(self.distance(x))
        return self.root(score) if self.sqrt else score

    #: autograd's gradient of this forward is the hard k-min's, ``2(x − ū)``: the activation rule reuses it
    _kmin_gradient_forward = forward

    def _centre(self) -> torch.Tensor | None:
        return getattr(self.distance, "centre", None)

    @torch.no_grad()
    def kneighbors(self, x: ArrayLike, n_neighbors: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Euclidean distances (n, k) to the k nearest support points, ascending, and their indices (n, k), as
        scikit-learn's ``NearestNeighbors.kneighbors(x)``; chunked over the support set.

        Parameters
        ----------
        x : array-like (n, d)
        n_neighbors : int, optional
            k (default: the model's).
        """
        self._check_fitted()
        k = self.n_neighbors if n_neighbors is None else n_neighbors
        check_int(k, owner=self._name, name="n_neighbors", minimum=1)
        if k > self.distance.support.shape[0]:
            raise ValueError(f"n_neighbors passed to {self._name}.kneighbors must be <= the "
                             f"{self.distance.support.shape[0]} support points. Got {k}.")
        h, index = k_nearest(self._as_tensor(x), self.distance.support, k, self.chunk_size, centre=self._centre())
        return h.sqrt(), index

    @torch.no_grad()
    def score(self, x: ArrayLike) -> torch.Tensor:
        """``o(x)`` (or ``√o``) like ``forward``, chunked over the support set: never builds the (n, N) matrix."""
        self._check_fitted()
        h, _ = k_nearest(self._as_tensor(x), self.distance.support, self.n_neighbors, self.chunk_size,
                         centre=self._centre())
        score = h.mean(-1)
        return score.clamp_min(0).sqrt() if self.sqrt else score

    @classmethod
    def from_sklearn(cls, neighbors: Any, k: int | None = None, **kwargs: Any) -> KNNOutlier:
        """Build from a fitted :class:`sklearn.neighbors.NearestNeighbors` with the Euclidean metric (float64).

        Parameters
        ----------
        neighbors : sklearn.neighbors.NearestNeighbors
            Fitted, ``metric="euclidean"`` (or ``"minkowski"`` with ``p=2``), dense data.
        k : int, optional
            Number of neighbours (default: its ``n_neighbors``).
        **kwargs
            Further parameters of :class:`KNNOutlier` (``sqrt``, ``beta``, ``eps``, ``chunk_size``, ``fused``).

        Raises
        ------
        TypeError
            If ``neighbors`` is not a NearestNeighbors.
        ValueError
            If it is not fitted, uses another metric (or a precomputed one), or was fitted on sparse data.
        """
        from scipy import sparse
        from sklearn.exceptions import NotFittedError
        from sklearn.neighbors import NearestNeighbors

        if not isinstance(neighbors, NearestNeighbors):
            raise TypeError(f"{cls.__name__}.from_sklearn expects a fitted sklearn.neighbors.NearestNeighbors. "
                            f"Got {type(neighbors).__name__}.")
        if not hasattr(neighbors, "n_samples_fit_"):
            raise NotFittedError(f"This NearestNeighbors instance is not fitted yet. Call 'fit' before "
                                 f"{cls.__name__}.from_sklearn.")
        metric = getattr(neighbors, "effective_metric_", neighbors.metric)
        if neighbors.metric == "precomputed" or metric != "euclidean" or getattr(
                neighbors, "effective_metric_params_", None):
            raise ValueError(f"{cls.__name__}.from_sklearn needs the Euclidean metric: the 'metric' parameter of the "
                             f"NearestNeighbors must be 'euclidean' (or 'minkowski' with p=2, without metric_params). "
                             f"Got metric={neighbors.metric!r}, p={neighbors.p!r}.")
        if sparse.issparse(neighbors._fit_X):
            raise ValueError(f"{cls.__name__}.from_sklearn needs NearestNeighbors fitted on dense data. Got a sparse "
                             f"matrix.")
        k = neighbors.n_neighbors if k is None else k
        return cls(n_neighbors=k, **kwargs).double().fit(np.asarray(neighbors._fit_X, dtype=np.float64))


register_model(KNNOutlier, lambda beta, eps: KNNOutlierActivationRule(beta=beta),
               layers=(SquaredDistance, KMinPool, SquareRoot),
               neuralization=Neuralization(("sklearn.neighbors.NearestNeighbors",), "NearestNeighbors (Euclidean)",
                                           ("k", "sqrt", "beta", "eps", "chunk_size", "fused"),
                                           KNNOutlier.from_sklearn))
