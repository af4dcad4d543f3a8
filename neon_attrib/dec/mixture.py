"""The surrogate's class probabilities: the class posteriors of the clusters, the per-layer surrogate
``p_j(y|x) = sum_k p(y | z^j = k) q^j_k(x)``, and the weighted mixture ``sum_j w_j p_j(y|x) / sum_j w_j`` with its
checked layer weights."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["check_layer_weights", "class_posteriors", "layer_proba", "mix_layers"]


def check_layer_weights(value: Any, layers: Sequence[str], owner: str) -> torch.Tensor:
    """Layer weights as a float64 tensor ``(len(layers),)`` in the order of ``layers``.

    ``value`` is ``None`` (equal weights), a sequence with one weight per layer or a ``{layer: weight}`` dict (missing
    layers weigh 0). Raises ``ValueError`` for a wrong length, unknown layers, negative or non-finite values or all
    zeros, and ``TypeError`` for values that are not numbers; errors name ``owner``.
    """
    layers = list(layers)
    if value is None:
        return torch.ones(len(layers), dtype=torch.float64)
    if isinstance(value, Mapping):
        unknown = set(value) - set(layers)
        if unknown:
            raise ValueError(f"The 'weights' parameter of {owner} names unknown layer(s) {sorted(unknown)}; "
                             f"expected names from layers={layers}. Got {dict(value)!r} instead.")
        value = [value.get(layer, 0.0) for layer in layers]
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        w = torch.as_tensor(np.asarray(value, dtype=np.float64))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"The 'weights' parameter of {owner} must be numbers (a sequence or a dict). "
                        f"Got {value!r} instead.") from exc
    if w.ndim != 1 or w.shape[0] != len(layers):
        raise ValueError(f"The 'weights' parameter of {owner} must have one entry per layer ({len(layers)}). "
                         f"Got shape {tuple(w.shape)} instead.")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"The 'weights' parameter of {owner} must be finite, >= 0 and not all zero. "
                         f"Got {w.tolist()} instead.")
    return w


def class_posteriors(assignments: torch.Tensor, labels: torch.Tensor, n_clusters: int, n_classes: int,
                     prior: torch.Tensor) -> torch.Tensor:
    """``p(y | z = k)``, shape ``(n_clusters, n_classes)`` (float32): the label frequencies of the training examples
    assigned to each cluster; an empty cluster gets ``prior``."""
    counts = torch.zeros(n_clusters, n_classes, dtype=torch.float64)
    counts.index_put_((assignments, labels), torch.ones(labels.shape[0], dtype=torch.float64), accumulate=True)
    totals = counts.sum(dim=1, keepdim=True)
    post = torch.where(totals > 0, counts / totals.clamp_min(1), prior.unsqueeze(0))
    return post.float()


def layer_proba(decs: Mapping[str, Any], posteriors: Mapping[str, torch.Tensor],
                z: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-layer surrogate ``p_j(y|x) = q^j(x) @ P_j`` for the embeddings ``z`` of every layer, from each layer's
    fitted DEC (``proba_from_embedding``) and class posteriors ``P_j``."""
    return {layer: decs[layer].proba_from_embedding(z_layer) @ posteriors[layer] for layer, z_layer in z.items()}


def mix_layers(layer_proba: Mapping[str, torch.Tensor], layers: Sequence[str], weights: torch.Tensor) -> torch.Tensor:
    """The full surrogate ``sum_j w_j p_j / sum_j w_j`` for checked ``weights`` in the order of ``layers``."""
    total = sum(float(weights[j]) * layer_proba[layer] for j, layer in enumerate(layers))
    return total / float(weights.sum())
