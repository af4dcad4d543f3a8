"""Neuralized layers: the building blocks that rewrite KDE and k-means as neural networks.

Every layer is a plain :class:`torch.nn.Module`, batched over the first dimension, of any floating dtype and device.
Support points, centroids and random weights are *buffers*, not parameters: nobody trains them by accident, Zennit's
``ParamMod`` leaves them alone, and ``.to(device)``, ``.double()`` and ``state_dict()`` just work. Buffers may be
empty placeholders until a model is fitted; ``load_state_dict`` resizes them to the stored shapes.

=====================  ==========================================  ===========================
layer                  computes                                    used by
=====================  ==========================================  ===========================
SquaredDistance        ``h_k = ‖x − u_k‖²``                        KDE outlier, layer 1
LogMeanExpPool         ``LME^α_k{h_k} = 1/α log mean_k e^{α h_k}``  KDE outlier, layer 2
RandomCosineFeatures   ``h_j = √2 cos(ω_jᵀx + b_j) μ_j``           KDE inlier, layer 1
MeanPool               ``1/H Σ_j h_j``                             KDE inlier, layer 2
ClusterDifference      ``h_ck = w_ckᵀx + b_ck`` for all c, k ≠ c   k-means, layer 1
MinPool                ``min_k h_ck``                              k-means, layer 2
LocationPool           ``Σ_l s_l`` (or mean, max, positive part)   heads on CNN feature maps
KMinPool               ``1/k Σ_{j ∈ kNN} h_j`` (k smallest)        k-NN outlier, layer 2
SquareRoot             ``√o``                                      k-NN outlier (Euclidean)
MahalanobisDistance    ``m_k = (x − μ_k)ᵀ P_k (x − μ_k)``          Mahalanobis, PCA, GMM
WeightedLogSumExpPool  ``1/α log Σ_k w_k e^{α h_k}``               GMM, one-class SVM
LinearClusterDiff.     ``h_ck = w_ckᵀx + b_ck`` (given w, b)       tied-GMM membership
PositionalMahalanobis  ``m_p = (a_p − μ_p)ᵀ P_p (a_p − μ_p)``      PaDiM (one Gaussian per position)
=====================  ==========================================  ===========================
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from .functional import (
    DEFAULT_CHUNK,
    fused_outlier_score,
    log_mean_exp,
    random_cosine_features,
    safe_sqrt,
    soft_min_pass,
    squared_distance,
    squared_mahalanobis,
    support_centre,
    weighted_log_sum_exp,
)

__all__ = [
    "ResizableBuffers",
    "SquaredDistance",
    "LogMeanExpPool",
    "RandomCosineFeatures",
    "MeanPool",
    "ClusterDifference",
    "MinPool",
    "LocationPool",
    "KMinPool",
    "SquareRoot",
    "MahalanobisDistance",
    "WeightedLogSumExpPool",
    "LinearClusterDifference",
    "PositionalMahalanobisDistance",
]

# formulas re-exported for code that imported them from here (they live in neon_attrib.core.functional)
_FORMULAS = (DEFAULT_CHUNK, fused_outlier_score, log_mean_exp, soft_min_pass, squared_distance)


class ResizableBuffers(nn.Module):
    """Base class for modules whose buffers are empty placeholders until fitted.

    ``load_state_dict`` resizes each placeholder buffer to the stored shape instead of failing, so a fitted module's
    ``state_dict()`` loads into a freshly constructed, unfitted one. Subclass it for your own fitted layers.

    Examples
    --------
    >>> class Centres(ResizableBuffers):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.register_buffer("centres", torch.empty(0, 0))
    >>> fresh = Centres()
    >>> fresh.load_state_dict({"centres": torch.ones(3, 2)})
    <All keys matched successfully>
    >>> fresh.centres.shape
    torch.Size([3, 2])
    """

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name, buffer in list(self._buffers.items()):
            stored = state_dict.get(prefix + name)
            if buffer is not None and stored is not None and stored.shape != buffer.shape:
                self._buffers[name] = torch.empty(stored.shape, dtype=buffer.dtype, device=buffer.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class SquaredDistance(ResizableBuffers):
    """Layer 1 of the KDE outlier network: ``h_k = ‖x − u_k‖²`` for every support point ``u_k``.

    Parameters
    ----------
    support : torch.Tensor, optional
        Support points (N, d). An empty placeholder when omitted (a model fills it at ``fit``).
    eps : float
        Default stabiliser of :class:`~neon_attrib.core.rules.SquaredDifferenceRule` for this layer (set by the model).

    Examples
    --------
    >>> layer = SquaredDistance(torch.tensor([[0.0, 0.0], [3.0, 4.0]]))
    >>> layer(torch.tensor([[0.0, 0.0]]))
    tensor([[ 0., 25.]])
    """

    support: torch.Tensor
    centre: torch.Tensor

    def __init__(self, support: torch.Tensor | None = None, eps: float = 0.0):
        super().__init__()
        self.register_buffer("support", torch.empty(0, 0) if support is None else support.detach().clone())
        # the mean of the support points: distances are expanded around it (precision far from the origin); derived
        # from the support, so not saved in the state dict
        self.register_buffer("centre", support_centre(self.support), persistent=False)
        self.eps = eps

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name == "support" and "centre" in self._buffers:  # a new support set: its centre
            self.refresh_centre()

    @torch.no_grad()
    def refresh_centre(self) -> None:
        """Recompute :attr:`centre` from the support points (call it after changing ``support`` in place)."""
        self._buffers["centre"] = support_centre(self.support)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh_centre()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return squared_distance(x, self.support, centre=self.centre)

    def extra_repr(self) -> str:
        return f"n_support={self.support.shape[0]}, n_features={self.support.shape[-1]}, eps={self.eps:g}"


class LogMeanExpPool(nn.Module):
    """Layer 2 of the KDE outlier network: ``LME^α_k{h_k}`` over the last dimension (α < 0: soft min).

    Parameters
    ----------
    alpha : float
        Non-zero sharpness; the KDE outlier score uses ``α = −γ``.
    beta : float, optional
        Default sharpness of the soft-argmin redistribution (:class:`~neon_attrib.core.rules.SoftArgminRule`);
        ``None`` means ``|α|`` (β = γ).
    chunk_size : int
        Support points reduced at once.
    """

    def __init__(self, alpha: float = -1.0, beta: float | None = None, chunk_size: int = DEFAULT_CHUNK):
        super().__init__()
        if alpha == 0:
            raise ValueError("The 'alpha' parameter of LogMeanExpPool must be non-zero. Got 0 instead.")
        self.alpha = float(alpha)
        self.beta = beta
        self.chunk_size = chunk_size

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return log_mean_exp(h, self.alpha, self.chunk_size)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}, beta={self.beta}"


class RandomCosineFeatures(ResizableBuffers):
    """Layer 1 of the KDE inlier network: ``h_j = √2 cos(ω_jᵀx + b_j) · μ_j`` (random Fourier features).

    Parameters
    ----------
    omega : torch.Tensor, optional
        Frequencies (H, d), drawn from ``N(0, 2γ I)``.
    bias : torch.Tensor, optional
        Phases (H,), drawn from ``U(0, 2π)``.
    mean : torch.Tensor, optional
        ``μ_j = 1/N Σ_k √2 cos(ω_jᵀu_k + b_j)`` (H,), the support set's mean feature.
    """

    omega: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor

    def __init__(self, omega: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 mean: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("omega", torch.empty(0, 0) if omega is None else omega.detach().clone())
        self.register_buffer("bias", torch.empty(0) if bias is None else bias.detach().clone())
        self.register_buffer("mean", torch.empty(0) if mean is None else mean.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return random_cosine_features(x, self.omega, self.bias) * self.mean

    def extra_repr(self) -> str:
        return f"n_features={self.omega.shape[0]}, n_inputs={self.omega.shape[-1]}"


class MeanPool(nn.Module):
    """Layer 2 of the KDE inlier network: the average over the last dimension."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mean(-1)


class ClusterDifference(ResizableBuffers):
    """Layer 1 of the k-means network: all ``K·(K−1)`` linear cluster differences at once.

    ``h[n, c, j] = w_ckᵀx_n + b_ck`` where ``k = others[c, j]`` runs over the clusters other than ``c``,
    ``w_ck = 2(μ_c − μ_k)`` and ``b_ck = ‖μ_k‖² − ‖μ_c‖²``, so ``h_ck = ‖x − μ_k‖² − ‖x − μ_c‖²`` exactly.

    Parameters
    ----------
    centroids : torch.Tensor, optional
        Cluster centres (K, d), K >= 2.

    Examples
    --------
    >>> layer = ClusterDifference(torch.tensor([[0.0], [2.0]]))
    >>> layer(torch.tensor([[0.5]]))  # ‖x−μ_1‖² − ‖x−μ_0‖² = 2.25 − 0.25, and the reverse
    tensor([[[ 2.],
             [-2.]]])
    """

    centroids: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    others: torch.Tensor

    def __init__(self, centroids: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("centroids", torch.empty(0, 0))
        self.register_buffer("weight", torch.empty(0, 0, 0))
        self.register_buffer("bias", torch.empty(0, 0))
        self.register_buffer("others", torch.empty(0, 0, dtype=torch.long))
        if centroids is not None:
            self.set_centroids(centroids)

    @torch.no_grad()
    def set_centroids(self, centroids: torch.Tensor) -> None:
        """Replace the centroids (K, d) and recompute the weights, biases and the ``others`` index table."""
        if centroids.ndim != 2 or centroids.shape[0] < 2:
            raise ValueError(f"ClusterDifference needs centroids of shape (K >= 2, d). Got {tuple(centroids.shape)}.")
        k = centroids.shape[0]
        others = torch.tensor([[j for j in range(k) if j != c] for c in range(k)], device=centroids.device)
        mu_c = centroids.unsqueeze(1)  # (K, 1, d)
        mu_k = centroids[others]  # (K, K-1, d)
        sq = (centroids * centroids).sum(-1)
        self.centroids = centroids.detach().clone()
        self.weight = 2.0 * (mu_c - mu_k)
        self.bias = sq[others] - sq.unsqueeze(1)
        self.others = others

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # h = wᵀx + b = wᵀ(x − c) + b_c around the centroids' mean c: no cancellation for data far from the origin
        k, m, d = self.weight.shape
        centre = self.centroids.mean(0)
        sq = ((self.centroids - centre) ** 2).sum(-1)
        centred_bias = sq[self.others] - sq.unsqueeze(1)
        return ((x - centre) @ self.weight.reshape(k * m, d).T).reshape(-1, k, m) + centred_bias

    def extra_repr(self) -> str:
        return f"n_clusters={self.centroids.shape[0]}, n_features={self.centroids.shape[-1]}"


class MinPool(nn.Module):
    """Layer 2 of the k-means network: the minimum over the last dimension (hard min, exactly as k-means).

    Parameters
    ----------
    beta : float
        Default sharpness of the soft-argmin redistribution on this layer (set by
        :class:`~neon_attrib.models.KMeansMembership` at ``fit``).
    """

    def __init__(self, beta: float = 1.0):
        super().__init__()
        self.beta = beta

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.amin(-1)

    def extra_repr(self) -> str:
        return f"beta={self.beta:g}"


PoolMode = Literal["sum", "mean", "max", "positive"]
_POOLS = ("sum", "mean", "max", "positive")


class LocationPool(nn.Module):
    """Pool location scores ``s`` (…, L) into one score per image (…), over the last dimension.

    ========== =========================== ===============================================================
    mode       image score                 relevance of location ``l``
    (:class:`~neon_attrib.core.rules.LocationPoolRule`)
    ========== =========================== ===============================================================
    sum        ``Σ_l s_l`` (the default)   ``s_l / Σ s · R``  (``= s_l`` at the top)
    mean       ``1/L Σ_l s_l``             ``s_l / Σ s · R``  (same shares as the sum)
    positive   ``Σ_l max(0, s_l)``         ``max(0, s_l) / Σ max(0, s) · R``: only locations with evidence
    max        ``max_l s_l``               all of ``R`` to the (first) maximal location
    ========== =========================== ===============================================================

    ``positive`` suits k-means (``f_c > 0`` exactly on the locations assigned to cluster ``c``: the image score is
    the cluster's total evidence, and the other locations get no relevance); ``sum`` and ``mean`` suit KDE scores,
    which are >= 0 (outlier) or ~ >= 0 (inlier) everywhere.

    Examples
    --------
    >>> LocationPool("positive")(torch.tensor([[1.0, -2.0, 3.0]]))
    tensor([4.])
    """

    def __init__(self, mode: PoolMode = "sum"):
        super().__init__()
        if mode not in _POOLS:
            raise ValueError(f"The 'mode' parameter of LocationPool must be one of {_POOLS}. Got {mode!r} instead.")
        self.mode = mode

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        if self.mode == "sum":
            return scores.sum(-1)
        if self.mode == "mean":
            return scores.mean(-1)
        if self.mode == "positive":
            return scores.clamp_min(0.0).sum(-1)
        return scores.amax(-1)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


# ---------------------------------------------------------------------------------------------------------------------
# layers of more models (k-NN, Mahalanobis, PCA, Gaussian mixtures, one-class SVM, PaDiM)
class KMinPool(nn.Module):
    """k-min pooling: the mean of the ``k`` smallest entries over the last dimension (layer 2 of the k-NN outlier).

    ``o = 1/k Σ_{j ∈ kNN} h_j``; ``k = 1`` is the hard minimum.

    Parameters
    ----------
    k : int
        Number of smallest entries averaged (>= 1, at most the size of the pooled dimension).
    beta : float, optional
        Default of :class:`~neon_attrib.core.rules.KMinPoolRule`: ``None`` (default) hands each of the k smallest its
        share ``h_j / Σ_{kNN} h`` (exact, ``h_j / k`` when the relevance is the score); a float β > 0 redistributes by
        the soft-argmin ``softmin_β(h)`` over all entries instead.

    Examples
    --------
    >>> KMinPool(k=2)(torch.tensor([[4.0, 1.0, 3.0, 9.0]]))
    tensor([2.])
    """

    def __init__(self, k: int = 1, beta: float | None = None):
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"The 'k' parameter of KMinPool must be an int >= 1. Got {k!r} instead.")
        self.k = k
        self.beta = beta

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.shape[-1] < self.k:
            raise ValueError(f"KMinPool with k={self.k} needs at least {self.k} entries to pool. Got {h.shape[-1]}.")
        return h.topk(self.k, dim=-1, largest=False).values.mean(-1)

    def extra_repr(self) -> str:
        return f"k={self.k}, beta={self.beta}"


class SquareRoot(nn.Module):
    """``√o`` elementwise (o >= 0): a monotone scalar on top of a score, e.g. the Euclidean k = 1 nearest-neighbour
    distance of PatchCore on top of the squared one. Its rule (:class:`~neon_attrib.core.rules.PassThroughRule`) passes
    the relevance down unchanged."""

    def forward(self, o: torch.Tensor) -> torch.Tensor:
        return safe_sqrt(o)


class MahalanobisDistance(ResizableBuffers):
    """Squared Mahalanobis distances to K Gaussians: ``m_k = (x − μ_k)ᵀ P_k (x − μ_k) = ‖L_kᵀ(x − μ_k)‖²``, (n, K).

    Layer 1 of the Mahalanobis outlier (K = 1, ``P`` the precision), of the PCA reconstruction error (K = 1,
    ``L`` an orthonormal basis of the residual space) and of the Gaussian mixture (one per component).

    Parameters
    ----------
    means : torch.Tensor, optional
        Centres μ (K, d).
    factors : torch.Tensor, optional
        Precision factors L (K, d, e) with ``P_k = L_k L_kᵀ`` (e may be < d: a low-rank quadratic form).
    eps : float
        Default stabiliser of :class:`~neon_attrib.core.rules.MahalanobisRule` (0: exact conservation).

    Examples
    --------
    >>> layer = MahalanobisDistance(torch.zeros(1, 2), torch.eye(2).unsqueeze(0) * 0.5)  # P = I/4
    >>> layer(torch.tensor([[2.0, 4.0]]))
    tensor([[5.]])
    """

    means: torch.Tensor
    factors: torch.Tensor

    def __init__(self, means: torch.Tensor | None = None, factors: torch.Tensor | None = None, eps: float = 0.0):
        super().__init__()
        self.register_buffer("means", torch.empty(0, 0) if means is None else means.detach().clone())
        self.register_buffer("factors", torch.empty(0, 0, 0) if factors is None else factors.detach().clone())
        self.eps = eps

    def differences(self, x: torch.Tensor) -> torch.Tensor:
        """``x_n − μ_k``, shape (n, K, d)."""
        return x.unsqueeze(1) - self.means

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return squared_mahalanobis(self.differences(x), self.factors)

    def extra_repr(self) -> str:
        k, d = self.means.shape
        return f"n_components={k}, n_features={d}, rank={self.factors.shape[-1]}, eps={self.eps:g}"


class WeightedLogSumExpPool(ResizableBuffers):
    """Weighted log-sum-exp pooling ``(1/α) log Σ_k w_k exp(α h_k)`` over the last dimension (α < 0: a soft min).

    With ``w_k = 1/N`` it is :class:`LogMeanExpPool`. Layer 2 of the weighted KDE / one-class SVM outlier
    (α = −γ, ``w`` = dual coefficients) and of the Gaussian mixture outlier (α = −1 on ``m_k / 2``, ``log w_k`` =
    log mixing weight + log det of the precision factor − (d/2) log 2π).

    Parameters
    ----------
    alpha : float
        Non-zero sharpness.
    log_weights : torch.Tensor, optional
        ``log w_k`` (K,).
    beta : float, optional
        Default sharpness of :class:`~neon_attrib.core.rules.WeightedSoftArgminRule`; ``None`` means ``|α|`` (the
        weights
        ``∝ w_k exp(α h_k)`` are then each term's share of the sum: the posterior responsibilities of a mixture).
    chunk_size : int
        Terms reduced at once.

    Examples
    --------
    >>> pool = WeightedLogSumExpPool(-1.0, torch.log(torch.tensor([0.5, 0.5])))
    >>> pool(torch.tensor([[1.0, 1.0]]))
    tensor([1.])
    """

    log_weights: torch.Tensor

    def __init__(self, alpha: float = -1.0, log_weights: torch.Tensor | None = None, beta: float | None = None,
                 chunk_size: int = DEFAULT_CHUNK):
        super().__init__()
        if alpha == 0:
            raise ValueError("The 'alpha' parameter of WeightedLogSumExpPool must be non-zero. Got 0 instead.")
        self.alpha = float(alpha)
        self.beta = beta
        self.chunk_size = chunk_size
        self.register_buffer("log_weights", torch.empty(0) if log_weights is None else log_weights.detach().clone())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return weighted_log_sum_exp(h, self.alpha, self.log_weights, self.chunk_size)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}, n_terms={self.log_weights.shape[0]}, beta={self.beta}"


class LinearClusterDifference(ResizableBuffers):
    """All ``K·(K−1)`` linear cluster differences ``h[n, c, j] = w_cjᵀ(x_n − x₀) + b_cj`` with given weights.

    :class:`ClusterDifference` derives ``w`` and ``b`` from k-means centroids; this layer takes them as they are (a
    tied-covariance Gaussian mixture: ``w_ck = P(μ_c − μ_k)``). The bias is the value at the expansion point ``x₀``
    (``centre``, e.g. the mean of the means), so data far from the origin keeps its precision.

    Parameters
    ----------
    weight : torch.Tensor, optional
        (K, K−1, d): row ``[c, j]`` compares cluster ``c`` with ``others[c, j]`` (the clusters other than ``c``, in
        increasing order).
    bias : torch.Tensor, optional
        (K, K−1), the differences at ``x = centre``.
    centre : torch.Tensor, optional
        (d,), default 0.

    Examples
    --------
    >>> layer = LinearClusterDifference(torch.tensor([[[1.0]], [[-1.0]]]), torch.tensor([[0.5], [-0.5]]))
    >>> layer(torch.tensor([[2.0]]))
    tensor([[[ 2.5000],
             [-2.5000]]])
    """

    weight: torch.Tensor
    bias: torch.Tensor
    centre: torch.Tensor
    others: torch.Tensor

    def __init__(self, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 centre: torch.Tensor | None = None):
        super().__init__()
        weight = torch.empty(0, 0, 0) if weight is None else weight.detach().clone()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", torch.empty(0, 0) if bias is None else bias.detach().clone())
        centre = torch.zeros(weight.shape[-1], dtype=weight.dtype) if centre is None else centre.detach().clone()
        self.register_buffer("centre", centre)
        k = weight.shape[0]
        others = torch.tensor([[j for j in range(k) if j != c] for c in range(k)], dtype=torch.long)
        self.register_buffer("others", others.reshape(k, max(k - 1, 0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, m, d = self.weight.shape
        return ((x - self.centre) @ self.weight.reshape(k * m, d).T).reshape(-1, k, m) + self.bias

    def extra_repr(self) -> str:
        return f"n_clusters={self.weight.shape[0]}, n_features={self.weight.shape[-1]}"


class PositionalMahalanobisDistance(ResizableBuffers):
    """One Gaussian per spatial position (PaDiM): ``m_p = (a_p − μ_p)ᵀ P_p (a_p − μ_p)`` for every position ``p``.

    Shape contract (L = h·w positions, row-major: ``p = y·w + x``):

    * a feature map (n, C, h, w) gives scores (n, h, w);
    * location rows (n·L, C), location-major per image (row ``i·L + p``, the layout of
      :class:`~neon_attrib.vision.deep.DeepNeon`), give scores (n·L,): each row is scored against its own position's
      Gaussian.

    Parameters
    ----------
    means : torch.Tensor, optional
        (L, C).
    factors : torch.Tensor, optional
        Precision factors (L, C, e), ``P_p = L_p L_pᵀ``.
    map_shape : tuple of int, optional
        ``(h, w)``; feature maps must have it. ``None``: only ``h·w = L`` is checked.
    """

    means: torch.Tensor
    factors: torch.Tensor

    def __init__(self, means: torch.Tensor | None = None, factors: torch.Tensor | None = None,
                 map_shape: tuple[int, int] | None = None):
        super().__init__()
        self.register_buffer("means", torch.empty(0, 0) if means is None else means.detach().clone())
        self.register_buffer("factors", torch.empty(0, 0, 0) if factors is None else factors.detach().clone())
        self.map_shape = None if map_shape is None else (int(map_shape[0]), int(map_shape[1]))

    @property
    def n_positions(self) -> int:
        return int(self.means.shape[0])

    def as_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """``x`` as (n, L, C) location vectors, position by position, and the shape of the scores."""
        n_pos, channels = self.means.shape
        if x.ndim == 4:
            n, c, h, w = x.shape
            if c != channels or h * w != n_pos or (self.map_shape is not None and (h, w) != self.map_shape):
                shape = f"{self.map_shape[0]}, {self.map_shape[1]}" if self.map_shape is not None else "h, w"
                raise ValueError(f"PositionalMahalanobisDistance expects feature maps (n, {channels}, {shape}) with "
                                 f"h·w = {n_pos} positions. Got {tuple(x.shape)}.")
            return x.permute(0, 2, 3, 1).reshape(n, n_pos, c), (n, h, w)
        if x.ndim == 2:
            if x.shape[1] != channels or x.shape[0] % max(n_pos, 1):
                raise ValueError(f"PositionalMahalanobisDistance expects location rows (n·{n_pos}, {channels}), "
                                 f"location-major per image. Got {tuple(x.shape)}.")
            return x.reshape(-1, n_pos, channels), (x.shape[0],)
        raise ValueError(f"PositionalMahalanobisDistance expects (n, C, h, w) feature maps or (n·L, C) rows. "
                         f"Got shape {tuple(x.shape)}.")

    def positions(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """``a_p − μ_p`` (n, L, C) and the shape of the scores."""
        rows, shape = self.as_rows(x)
        return rows - self.means, shape

    def restore(self, per_position: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-position vectors (n, L, C) back into the layout of ``x``."""
        if x.ndim == 4:
            n, c, h, w = x.shape
            return per_position.reshape(n, h, w, c).permute(0, 3, 1, 2)
        return per_position.reshape(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        diff, shape = self.positions(x)
        return squared_mahalanobis(diff, self.factors).reshape(shape)  # position p: its own factor L_p

    def extra_repr(self) -> str:
        return f"n_positions={self.n_positions}, n_channels={self.means.shape[-1]}, map_shape={self.map_shape}"
