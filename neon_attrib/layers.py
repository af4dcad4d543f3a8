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
=====================  ==========================================  ===========================
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from .functional import DEFAULT_CHUNK, fused_outlier_score, log_mean_exp, random_cosine_features, soft_min_pass
from .functional import squared_distance

__all__ = [
    "ResizableBuffers",
    "SquaredDistance",
    "LogMeanExpPool",
    "RandomCosineFeatures",
    "MeanPool",
    "ClusterDifference",
    "MinPool",
    "LocationPool",
]

# formulas re-exported for code that imported them from here (they live in neon_attrib.functional)
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
        Default stabiliser of :class:`~neon_attrib.rules.SquaredDifferenceRule` for this layer (set by the model).

    Examples
    --------
    >>> layer = SquaredDistance(torch.tensor([[0.0, 0.0], [3.0, 4.0]]))
    >>> layer(torch.tensor([[0.0, 0.0]]))
    tensor([[ 0., 25.]])
    """

    def __init__(self, support: torch.Tensor | None = None, eps: float = 0.0):
        super().__init__()
        self.register_buffer("support", torch.empty(0, 0) if support is None else support.detach().clone())
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return squared_distance(x, self.support)

    def extra_repr(self) -> str:
        return f"n_support={self.support.shape[0]}, n_features={self.support.shape[-1]}, eps={self.eps:g}"


class LogMeanExpPool(nn.Module):
    """Layer 2 of the KDE outlier network: ``LME^α_k{h_k}`` over the last dimension (α < 0: soft min).

    Parameters
    ----------
    alpha : float
        Non-zero sharpness; the KDE outlier score uses ``α = −γ``.
    beta : float, optional
        Default sharpness of the soft-argmin redistribution (:class:`~neon_attrib.rules.SoftArgminRule`);
        ``None`` means ``|α|`` (SPEC: β = γ).
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
        k, m, d = self.weight.shape
        return (x @ self.weight.reshape(k * m, d).T).reshape(-1, k, m) + self.bias

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
    mode       image score                 relevance of location ``l`` (:class:`~neon_attrib.rules.LocationPoolRule`)
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
