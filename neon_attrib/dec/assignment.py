"""DEC's cluster assignment (Xie et al., 2016): the Student-t soft assignment ``q``, the auxiliary target ``p`` and the
stopping criterion, on embeddings that are already computed.

The Student-t log-kernel itself is :func:`neon_attrib.core.functional.student_t_logits`; everything here builds on it.
"""

from __future__ import annotations

import torch

from ..core.functional import student_t_logits

__all__ = ["assignment_change", "hard_assignment", "kl_divergence", "student_t_assignment", "target_distribution"]


def student_t_assignment(z: torch.Tensor, centroids: torch.Tensor, alpha: float = 100.0) -> torch.Tensor:
    """Soft assignment of embeddings to centroids with a Student-t kernel (DEC's ``q``).

    ``q_k(z) = (1 + |z - mu_k|^2 / alpha)^(-(alpha + 1) / 2) / sum_k' (...)``, computed in log space (a softmax of
    ``-(alpha + 1) / 2 * log1p(|z - mu_k|^2 / alpha)``) so that large ``alpha`` or far points do not underflow.

    Parameters
    ----------
    z : torch.Tensor
        Embeddings, shape ``(n, d)``.
    centroids : torch.Tensor
        Centroids, shape ``(K, d)``.
    alpha : float
        Degrees of freedom of the Student-t kernel.

    Returns
    -------
    torch.Tensor
        ``q``, shape ``(n, K)``; every row sums to one.

    Examples
    --------
    >>> q = student_t_assignment(torch.zeros(1, 2), torch.tensor([[0.0, 0.0], [3.0, 4.0]]), alpha=1.0)
    >>> torch.allclose(q, torch.tensor([[26 / 27, 1 / 27]]))
    True
    """
    dist2 = torch.cdist(z, centroids.to(z.dtype)).pow(2)
    logits = student_t_logits(dist2, alpha)
    return torch.softmax(logits, dim=1)


def hard_assignment(z: torch.Tensor, centroids: torch.Tensor, alpha: float) -> torch.Tensor:
    """``argmax_k q_k`` (``= argmin_k |z - mu_k|``), shape ``(n,)``: exactly the computation of ``DEC.predict``."""
    return student_t_assignment(z, centroids.to(z.device), alpha).argmax(dim=1)


def target_distribution(q: torch.Tensor) -> torch.Tensor:
    """DEC's auxiliary target ``p_ik = (q_ik^2 / f_k) / sum_k' (q_ik'^2 / f_k')`` with ``f_k = sum_i q_ik``.

    Squaring sharpens the assignments and dividing by the soft cluster size ``f_k`` keeps large clusters from
    swallowing the rest.

    Parameters
    ----------
    q : torch.Tensor
        Soft assignments, shape ``(n, K)``.

    Returns
    -------
    torch.Tensor
        ``p``, shape ``(n, K)``, rows summing to one.
    """
    weight = q.pow(2) / q.sum(dim=0).clamp_min(torch.finfo(q.dtype).tiny)
    return weight / weight.sum(dim=1, keepdim=True)


def kl_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """Mean over rows of ``KL(p_i || q_i)``, DEC's clustering loss, as a float (for the training history)."""
    return float((p * (p.clamp_min(1e-30).log() - q.clamp_min(1e-30).log())).sum(1).mean())


def assignment_change(previous: torch.Tensor, current: torch.Tensor) -> float:
    """Fraction of hard assignments that differ between two label vectors (DEC's stopping criterion)."""
    if previous.shape != current.shape:
        raise ValueError(f"Assignment vectors must have the same shape. Got {tuple(previous.shape)} and "
                         f"{tuple(current.shape)} instead.")
    return float((previous != current).float().mean()) if previous.numel() else 0.0
