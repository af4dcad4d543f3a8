"""Formulas, each written once: distances, log-mean-exp pooling, soft-min weights, random Fourier features.

The bottom of the package: plain functions of tensors that import nothing else of ``neon_attrib``. Layers
(:mod:`neon_attrib.core.layers`), rules (:mod:`neon_attrib.core.rules`) and estimators (:mod:`neon_attrib.models`) call
them,
so every formula of the maths page has exactly one implementation.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "DEFAULT_CHUNK",
    "safe_divide",
    "safe_sqrt",
    "squared_distance",
    "support_centre",
    "log_mean_exp",
    "soft_argmin",
    "soft_min_pass",
    "fused_outlier_score",
    "random_cosine_features",
    "cosine_activation_coefficients",
    "student_t_logits",
    "k_nearest",
    "weighted_log_sum_exp",
    "whiten",
    "squared_mahalanobis",
    "precision_product",
]

#: Number of support points processed at once by the chunked reductions (bounds temporaries to batch × chunk).
DEFAULT_CHUNK = 16384


def safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator`` with 0 where the denominator is exactly 0 (instead of NaN or inf)."""
    zero = denominator == 0
    return torch.where(zero, torch.zeros_like(numerator), numerator / torch.where(zero, 1, denominator))


class _SafeSqrt(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o: torch.Tensor) -> torch.Tensor:
        root = o.clamp_min(0.0).sqrt()
        ctx.save_for_backward(root)
        return root

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (root,) = ctx.saved_tensors
        return safe_divide(grad, 2 * root)  # torch's sqrt backward, grad / (2 √o), where √o > 0


def safe_sqrt(o: torch.Tensor) -> torch.Tensor:
    """``√max(o, 0)`` with the gradient ``1 / (2√o)`` where ``o > 0`` (bit for bit torch's) and 0 where ``o <= 0``.

    A distance of exactly 0 (a point of the support set explained, or rounding below 0) has an infinite derivative
    under the square root; multiplied by the zero gradient of the distance it would give NaN. Here it gives 0, so
    the relevance of a zero score is 0.

    Examples
    --------
    >>> o = torch.tensor([0.0, -1e-12, 4.0], requires_grad=True)
    >>> safe_sqrt(o).sum().backward()
    >>> o.grad
    tensor([0.0000, 0.0000, 0.2500])
    """
    return _SafeSqrt.apply(o)


def soft_argmin(h: torch.Tensor, beta: float) -> torch.Tensor:
    """``exp(−β h_k) / Σ_k' exp(−β h_k')`` over the last dimension (a stable softmax).

    Computed as ``softmax(−β (h_k − min h))`` with the minimum's logit exactly 0, so a product ``β h`` beyond the
    float range (a huge β, or distances that overflowed to inf) gives the hard argmin's weights, never NaN.
    """
    gap = h - h.amin(-1, keepdim=True)
    return torch.softmax(torch.where(gap == 0, 0.0, -beta * gap), dim=-1)


def squared_distance(x: torch.Tensor, support: torch.Tensor, chunk_size: int = DEFAULT_CHUNK,
                     centre: torch.Tensor | None = None) -> torch.Tensor:
    """Squared Euclidean distances ``‖x_n − u_k‖²`` of shape (n, N), via ``‖x‖² + ‖u‖² − 2xᵀu``, clamped at 0.

    Matrix products over chunks of support points: no (n, N, d) intermediate and no N × d temporary. The expansion
    cancels: it loses absolute precision ~ eps·(‖x‖² + ‖u‖²). Pass ``centre`` (e.g. the mean of the support points,
    :func:`support_centre`) to expand around it instead of the origin: distances are translation invariant, and
    data far from the origin (an offset of 10³ on unit-scale features) then keeps float32 precision.
    """
    if centre is not None:
        x = x - centre
    x_sq = (x * x).sum(-1, keepdim=True)
    parts = []
    for chunk in support.split(chunk_size):
        if centre is not None:
            chunk = chunk - centre
        parts.append(torch.addmm(x_sq + (chunk * chunk).sum(-1), x, chunk.T, alpha=-2.0))
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    return out.clamp_min(0.0)


def support_centre(support: torch.Tensor) -> torch.Tensor:
    """The mean of the support points (d,), accumulated in float64: the expansion point of :func:`squared_distance`."""
    if support.shape[0] == 0:
        return torch.zeros(support.shape[-1], dtype=support.dtype, device=support.device)
    return support.to(torch.float64).mean(0).to(support.dtype)


def log_mean_exp(h: torch.Tensor, alpha: float, chunk_size: int = DEFAULT_CHUNK,
                 count: torch.Tensor | int | None = None) -> torch.Tensor:
    """Stable ``LME^α{h} = (1/α) log(1/N Σ_k exp(α h_k))`` over the last dimension, chunked over ``k``.

    Computed as ``(m + log1p(1/N Σ_k expm1(α h_k − m))) / α`` with ``m = max_k α h_k``: the maximum is subtracted
    before exponentiating (points far from all support points give large finite values, never inf or NaN), and
    ``expm1``/``log1p`` keep the small differences that ``log Σ exp`` rounds away when ``|α| h`` is tiny (a very
    wide kernel: ``o(x) → mean_k h_k`` as ``γ → 0``, where the plain formula returns ``min_k h_k`` or 0).
    Temporaries are bounded by ``batch × chunk_size``.

    Parameters
    ----------
    count : int or tensor, optional
        The number ``N`` of terms in the mean (default: the size of the last dimension). Entries with
        ``α h_k = −inf`` are excluded terms: pass the number of the others.
    """
    n_support = h.shape[-1] if count is None else count
    chunks = h.split(chunk_size, dim=-1)
    scaled_max = torch.stack([(alpha * c).amax(-1) for c in chunks], -1).amax(-1)
    # an infinite maximum (distances that overflowed) is not subtracted: the terms then give the limit, ±inf, not NaN
    shift = torch.where(torch.isfinite(scaled_max), scaled_max, 0.0).unsqueeze(-1)
    excess = sum(torch.expm1(alpha * c - shift).sum(-1) for c in chunks)
    if count is not None:
        excess = excess + (h.shape[-1] - count)  # the excluded terms contributed expm1(−inf) = −1 each
    return (scaled_max + torch.log1p(excess / n_support)) / alpha


def soft_min_pass(x: torch.Tensor, support: torch.Tensor, beta: float, chunk_size: int = DEFAULT_CHUNK,
                  weighted_mean: bool = True,
                  centre: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunked pass over the support set: ``log(1/N Σ_k exp(−β h_k))`` and ``Σ_k softmin_β(h)_k u_k`` per row.

    An online softmax (running maximum, rescaled accumulators) keeps it stable, and the sum is kept as
    ``Σ expm1(·)`` (see :func:`log_mean_exp`) so a tiny ``β h`` keeps its precision; temporaries are (n, chunk) and
    (n, d): no (n, N) matrix. ``o(x) = −lme / γ`` with β = γ, and ``∇o(x) = 2(x − weighted mean)``. ``centre``:
    see :func:`squared_distance`.

    Returns
    -------
    (torch.Tensor, torch.Tensor or None)
        The log-mean-exp ``log(1/N Σ_k exp(−β h_k))`` (n,) and, if ``weighted_mean``, the soft-min weighted mean of
        the support points (n, d).
    """
    running_max = torch.full((x.shape[0], 1), -math.inf, dtype=x.dtype, device=x.device)
    excess = torch.zeros((x.shape[0], 1), dtype=x.dtype, device=x.device)  # Σ expm1(logit − running max)
    seen = 0
    accum = torch.zeros_like(x) if weighted_mean else None
    for chunk in support.split(chunk_size):
        logits = -beta * squared_distance(x, chunk, chunk_size, centre=centre)
        new_max = torch.maximum(running_max, logits.amax(-1, keepdim=True))
        # <= 0; -inf before the first chunk; 0 while every distance so far overflowed (both maxima -inf)
        shift = torch.where(new_max == running_max, 0.0, running_max - new_max)
        rescale = torch.exp(shift)
        top = torch.where(torch.isfinite(new_max), new_max, 0.0)  # -inf logits then stay -inf (weights 0), not NaN
        excess = (excess * rescale + seen * torch.expm1(shift) if seen else excess) \
            + torch.expm1(logits - top).sum(-1, keepdim=True)
        if accum is not None:
            centred = chunk - centre if centre is not None else chunk
            accum = accum * rescale + torch.exp(logits - top) @ centred
        seen += chunk.shape[0]
        running_max = new_max
    total = excess + seen  # Σ exp(logit − max) >= 1
    lme = (running_max + torch.log1p(excess / seen)).squeeze(-1)
    if accum is None:
        return lme, None
    mean = accum / total
    return lme, (mean + centre if centre is not None else mean)


class _FusedOutlierScore(torch.autograd.Function):
    """``o(x)`` with its exact gradient, in one chunked pass (see :func:`soft_min_pass`)."""

    @staticmethod
    def forward(ctx, x, support, gamma, chunk_size, centre):
        lme, mean = soft_min_pass(x, support, gamma, chunk_size, weighted_mean=ctx.needs_input_grad[0],
                                  centre=centre)
        if mean is not None:
            ctx.save_for_backward(x, mean)
        return -lme / gamma

    @staticmethod
    def backward(ctx, grad_out):
        x, mean = ctx.saved_tensors
        return 2.0 * (x - mean) * grad_out.unsqueeze(-1), None, None, None, None


def fused_outlier_score(x: torch.Tensor, support: torch.Tensor, gamma: float, chunk_size: int = DEFAULT_CHUNK,
                        centre: torch.Tensor | None = None) -> torch.Tensor:
    """KDE outlier score ``o(x)`` (n,) and its gradient without the (n, N) distance matrix: for large N."""
    return _FusedOutlierScore.apply(x, support, float(gamma), chunk_size, centre)


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


def k_nearest(x: torch.Tensor, support: torch.Tensor, k: int, chunk_size: int = DEFAULT_CHUNK,
              centre: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` smallest squared distances ``‖x_n − u_j‖²`` (n, k), ascending, and their support indices (n, k).

    The neighbours are found by a chunked top-k over the support set (temporaries (n, chunk + k): no (n, N) matrix,
    so N = 10^6 support points fit in bounded memory), then their distances are recomputed from the differences
    ``x − u_j`` (no cancellation, unlike the expansion of :func:`squared_distance`): the values are accurate to the
    dtype's precision. ``centre`` (d,), e.g. the support's mean, is subtracted before the expansion that ranks the
    candidates. The distances are differentiable in ``x``; the choice of neighbours is not (the gradient of their mean
    is that of the k-min, ``2/k Σ_j (x − u_j)``).
    """
    n_support = support.shape[0]
    if not 1 <= k <= n_support:
        raise ValueError(f"k_nearest needs 1 <= k <= {n_support} (the number of support points). Got k={k}.")
    with torch.no_grad():
        query = x.detach() if centre is None else x.detach() - centre
        best_h: torch.Tensor | None = None
        best_i: torch.Tensor | None = None
        for start in range(0, n_support, chunk_size):
            chunk = support[start:start + chunk_size]
            h = squared_distance(query, chunk if centre is None else chunk - centre, chunk_size)
            values, index = h.topk(min(k, h.shape[1]), dim=1, largest=False)
            index = index + start
            if best_h is not None:
                values, pick = torch.cat([best_h, values], 1).topk(k, dim=1, largest=False)
                index = torch.cat([best_i, index], 1).gather(1, pick)
            best_h, best_i = values, index
    diff = x.unsqueeze(1) - support[best_i]
    h = (diff * diff).sum(-1)
    order = h.detach().argsort(dim=1, stable=True)
    return h.gather(1, order), best_i.gather(1, order)


def weighted_log_sum_exp(h: torch.Tensor, alpha: float, log_weights: torch.Tensor,
                         chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """``(1/α) log Σ_k w_k exp(α h_k)`` over the last dimension: :func:`log_mean_exp` with log-weights ``log w_k``
    (``w_k = 1/N`` gives ``LME^α``), stable and chunked.

    With α = −γ it is a weighted KDE outlier score (a one-class SVM's, with ``w`` its dual coefficients); with α = −1
    on half the squared Mahalanobis distances and ``log w_k = log π_k + log det L_k − (d/2) log 2π``, the negative
    log-likelihood of a Gaussian mixture.
    """
    return log_mean_exp(h + log_weights / alpha, alpha, chunk_size) + math.log(h.shape[-1]) / alpha


def whiten(diff: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """``z_nk = L_kᵀ(x_n − μ_k)``: differences (n, K, d) and precision factors (K, d, e) give (n, K, e)."""
    return torch.einsum("nkd,kde->nke", diff, factors)


def squared_mahalanobis(diff: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """``m_nk = (x_n − μ_k)ᵀ P_k (x_n − μ_k) = ‖L_kᵀ(x_n − μ_k)‖²`` with ``P_k = L_k L_kᵀ``, shape (n, K).

    ``diff`` (n, K, d) holds ``x_n − μ_k`` for K Gaussians (mixture components, or one per spatial position for
    PaDiM), ``factors`` (K, d, e) their precision factors. A squared norm: never negative, whatever the rounding.
    """
    z = whiten(diff, factors)
    return (z * z).sum(-1)


def precision_product(diff: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """``P_k(x_n − μ_k) = L_k L_kᵀ(x_n − μ_k)``, shape (n, K, d): the second factor of the Mahalanobis rules
    (``Σ_i diff_i [P diff]_i = m``)."""
    return torch.einsum("nke,kde->nkd", whiten(diff, factors), factors)

