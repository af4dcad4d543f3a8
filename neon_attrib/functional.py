"""Formulas, each written once: distances, log-mean-exp pooling, soft-min weights, random Fourier features.

The bottom of the package: plain functions of tensors that import nothing else of ``neon_attrib``. Layers
(:mod:`neon_attrib.layers`), rules (:mod:`neon_attrib.rules`) and estimators (:mod:`neon_attrib.models`) call them,
so every formula of the maths page has exactly one implementation.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "DEFAULT_CHUNK",
    "safe_divide",
    "squared_distance",
    "log_mean_exp",
    "soft_argmin",
    "soft_min_pass",
    "fused_outlier_score",
    "random_cosine_features",
    "cosine_activation_coefficients",
    "student_t_logits",
]

#: Number of support points processed at once by the chunked reductions (bounds temporaries to batch × chunk).
DEFAULT_CHUNK = 16384


def safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator`` with 0 where the denominator is exactly 0 (instead of NaN or inf)."""
    zero = denominator == 0
    return torch.where(zero, torch.zeros_like(numerator), numerator / torch.where(zero, 1, denominator))


def soft_argmin(h: torch.Tensor, beta: float) -> torch.Tensor:
    """``exp(−β h_k) / Σ_k' exp(−β h_k')`` over the last dimension (a stable softmax)."""
    return torch.softmax(-beta * h, dim=-1)


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


def random_cosine_features(x: torch.Tensor, omega: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Random Fourier features ``φ_j(x) = √2 cos(ω_jᵀx + b_j)``, shape (n, H), for ``x`` (n, d), ``ω`` (H, d)."""
    return math.sqrt(2.0) * torch.cos(torch.addmm(bias, x, omega.T))


def cosine_activation_coefficients(z: torch.Tensor, bias: torch.Tensor, coef: torch.Tensor,
                                   eps: float) -> torch.Tensor:
    """Per-feature factors ``g_j`` of the random-feature CNN rule: ``R_i = a_i Σ_j ω_ij g_j``.

    With ``z_j = ω_jᵀa`` and ``c_j = √2 μ_j / H`` (``coef``), ``g_j = c_j [−sin(b_j) sin(z_j)/z_j +
    cos(b_j) cos(z_j)/(ε_j + z_j)]`` where the sign-matched ``ε_j`` dissipates the cosine part when ``z_j ≈ 0``;
    ``sin(z)/z`` is evaluated as a sinc (finite at 0).
    """
    sin_part = -torch.sin(bias) * torch.sinc(z / math.pi)
    sign = torch.where(z >= 0, 1.0, -1.0).to(z.dtype)
    cos_part = torch.cos(bias) * torch.cos(z) / (z + sign * eps)
    return coef * (sin_part + cos_part)


def student_t_logits(dist2: torch.Tensor, alpha: float) -> torch.Tensor:
    """Log-kernel of DEC's Student-t assignment, ``−(α + 1)/2 · log(1 + d²/α)``; a softmax over clusters gives ``q``."""
    return -(alpha + 1.0) / 2.0 * torch.log1p(dist2 / alpha)
