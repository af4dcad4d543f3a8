"""Neuralized layers: the building blocks that rewrite KDE and k-means as neural networks (SPEC §1-3).

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
=====================  ==========================================  ===========================
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "SquaredDistance",
    "LogMeanExpPool",
    "RandomCosineFeatures",
    "MeanPool",
    "ClusterDifference",
    "MinPool",
    "squared_distance",
    "log_mean_exp",
    "soft_min_pass",
    "fused_outlier_score",
]

#: Number of support points processed at once by the chunked reductions (bounds temporaries to batch × chunk).
DEFAULT_CHUNK = 16384


class _ResizableBuffers(nn.Module):
    """Mixin: ``load_state_dict`` resizes placeholder buffers to the stored shapes instead of failing."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name, buffer in list(self._buffers.items()):
            stored = state_dict.get(prefix + name)
            if buffer is not None and stored is not None and stored.shape != buffer.shape:
                self._buffers[name] = torch.empty(stored.shape, dtype=buffer.dtype, device=buffer.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def squared_distance(x: torch.Tensor, support: torch.Tensor, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Squared Euclidean distances ``‖x_n − u_k‖²`` of shape (n, N), via ``‖x‖² + ‖u‖² − 2xᵀu``, clamped at 0.

    Matrix products over chunks of support points: no (n, N, d) intermediate and no N × d temporary. The expansion
    loses absolute precision ~ eps·‖x‖² when x and u nearly coincide (as in scikit-learn's ``euclidean_distances``);
    use float64 where that matters.
    """
    x_sq = (x * x).sum(-1, keepdim=True)
    parts = [torch.addmm(x_sq + (chunk * chunk).sum(-1), x, chunk.T, alpha=-2.0)
             for chunk in support.split(chunk_size)]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    return out.clamp_min(0.0)


def log_mean_exp(h: torch.Tensor, alpha: float, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Stable ``LME^α{h} = (1/α) log(1/N Σ_k exp(α h_k))`` over the last dimension, chunked over ``k``.

    The maximum of ``α h`` is subtracted before exponentiating (log-sum-exp), so points far from all support points
    give large finite values in float32, never inf or NaN. Temporaries are bounded by ``batch × chunk_size``.
    """
    n_support = h.shape[-1]
    if n_support <= chunk_size:
        return (torch.logsumexp(alpha * h, dim=-1) - math.log(n_support)) / alpha
    scaled_max = torch.stack([(alpha * c).amax(-1) for c in h.split(chunk_size, dim=-1)], -1).amax(-1)
    total = sum(torch.exp(alpha * c - scaled_max.unsqueeze(-1)).sum(-1) for c in h.split(chunk_size, dim=-1))
    return (torch.log(total) + scaled_max - math.log(n_support)) / alpha


def soft_min_pass(x: torch.Tensor, support: torch.Tensor, beta: float, chunk_size: int = DEFAULT_CHUNK,
                  weighted_mean: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunked pass over the support set: ``log Σ_k exp(−β h_k)`` and ``Σ_k softmin_β(h)_k u_k`` per row of x.

    An online softmax (running maximum, rescaled accumulators) keeps it stable; temporaries are (n, chunk) and
    (n, d): no (n, N) matrix. ``o(x) = −(lse − log N)/γ`` with β = γ, and ``∇o(x) = 2(x − weighted mean)``.

    Returns
    -------
    (torch.Tensor, torch.Tensor or None)
        The log-sum-exp (n,) and, if ``weighted_mean``, the soft-min weighted mean of the support points (n, d).
    """
    running_max = torch.full((x.shape[0], 1), -math.inf, dtype=x.dtype, device=x.device)
    total = torch.zeros((x.shape[0], 1), dtype=x.dtype, device=x.device)
    accum = torch.zeros_like(x) if weighted_mean else None
    for chunk in support.split(chunk_size):
        logits = -beta * squared_distance(x, chunk, chunk_size)
        new_max = torch.maximum(running_max, logits.amax(-1, keepdim=True))
        rescale = torch.exp(running_max - new_max)
        weights = torch.exp(logits - new_max)
        total = total * rescale + weights.sum(-1, keepdim=True)
        if accum is not None:
            accum = accum * rescale + weights @ chunk
        running_max = new_max
    lse = (torch.log(total) + running_max).squeeze(-1)
    return lse, (accum / total if accum is not None else None)


class _FusedOutlierScore(torch.autograd.Function):
    """``o(x)`` with its exact gradient, in one chunked pass (see :func:`soft_min_pass`)."""

    @staticmethod
    def forward(ctx, x, support, gamma, chunk_size):
        lse, mean = soft_min_pass(x, support, gamma, chunk_size, weighted_mean=ctx.needs_input_grad[0])
        if mean is not None:
            ctx.save_for_backward(x, mean)
        return -(lse - math.log(support.shape[0])) / gamma

    @staticmethod
    def backward(ctx, grad_out):
        x, mean = ctx.saved_tensors
        return 2.0 * (x - mean) * grad_out.unsqueeze(-1), None, None, None


def fused_outlier_score(x: torch.Tensor, support: torch.Tensor, gamma: float,
                        chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """KDE outlier score ``o(x)`` (n,) and its gradient without the (n, N) distance matrix: for large N."""
    return _FusedOutlierScore.apply(x, support, float(gamma), chunk_size)


class SquaredDistance(_ResizableBuffers):
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


class RandomCosineFeatures(_ResizableBuffers):
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
        return math.sqrt(2.0) * torch.cos(torch.addmm(self.bias, x, self.omega.T)) * self.mean

    def extra_repr(self) -> str:
        return f"n_features={self.omega.shape[0]}, n_inputs={self.omega.shape[-1]}"


class MeanPool(nn.Module):
    """Layer 2 of the KDE inlier network: the average over the last dimension."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mean(-1)


class ClusterDifference(_ResizableBuffers):
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


# -- Captum bridge (owned by neon_attrib/captum.py) ----------------------------------------------------------------
class _CaptumRule:
    """``layer.rule``: the layer's NEON rule as a Captum ``PropagationRule``, for :class:`captum.attr.LRP`.

    Captum reads ``module.rule`` on every leaf module and *deletes* it after each call (Captum issue #1059). This data
    descriptor lives on the class, so Captum's ``del layer.rule`` cannot remove it: ``LRP(model)`` works on NEON
    models without set-up, call after call. ``layer.rule = r`` stores an override (``None`` restores the default).
    The logic is in :mod:`neon_attrib.captum`, imported on first use.
    """

    def __get__(self, layer, owner=None):
        if layer is None:
            return self
        try:
            from .captum import _get_layer_rule
        except ImportError as exc:  # no Captum: behave like a missing attribute (hasattr → False)
            raise AttributeError("rule") from exc
        return _get_layer_rule(layer)

    def __set__(self, layer, rule):
        from .captum import _set_layer_rule

        _set_layer_rule(layer, rule)

    def __delete__(self, layer):
        from .captum import _delete_layer_rule

        _delete_layer_rule(layer)


for _layer_class in (SquaredDistance, LogMeanExpPool, RandomCosineFeatures, MeanPool, ClusterDifference, MinPool):
    _layer_class.rule = _CaptumRule()
del _layer_class
