"""Explanations by examples in the per-layer DEC embeddings: the training examples nearest to a query by the weighted
distance ``sum_j w_j |z^j(x) - z^j(x')|``, and the training examples nearest to each centroid (a layer's concepts)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from .estimator import is_int

__all__ = ["check_chunk_size", "nearest_to_centroids", "nearest_training_examples"]


def check_chunk_size(chunk_size: object, owner: str) -> int:
    """``chunk_size`` if it is an int >= 1, else a ValueError naming ``owner`` (a chunk of 0 or fewer examples
    would compare the queries with nothing)."""
    if not is_int(chunk_size, 1):
        raise ValueError(f"The 'chunk_size' parameter of {owner} must be an int >= 1. Got {chunk_size!r} instead.")
    return int(chunk_size)


def nearest_training_examples(z: Mapping[str, torch.Tensor], train_embeddings: Mapping[str, torch.Tensor],
                              layers: Sequence[str], weights: torch.Tensor, k: int,
                              chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` training examples nearest to each query by ``sum_j w_j |z^j(x) - z^j(x')|``.

    Parameters
    ----------
    z, train_embeddings : dict of str to torch.Tensor
        Embeddings of the queries ``(n, d)`` and of the training examples ``(n_train, d)`` per layer.
    layers : sequence of str
        The layers, in the order of ``weights``; layers of weight 0 are skipped.
    weights : torch.Tensor
        Checked layer weights.
    k : int
        Number of neighbours (at most ``n_train``).
    chunk_size : int
        Training examples compared at once (memory ``n x (chunk_size + k)``).

    Returns
    -------
    indices, distances : torch.Tensor
        ``(n, k)`` training indices (int64) and distances (float64), nearest first.
    """
    chunk_size = check_chunk_size(chunk_size, "nearest_training_examples")
    n = next(iter(z.values())).shape[0]
    n_train = next(iter(train_embeddings.values())).shape[0]
    best_d = torch.full((n, 0), math.inf, dtype=torch.float64)
    best_i = torch.zeros((n, 0), dtype=torch.long)
    for start in range(0, n_train, chunk_size):
        stop = min(start + chunk_size, n_train)
        dist = torch.zeros(n, stop - start, dtype=torch.float64)
        for j, layer in enumerate(layers):
            if float(weights[j]) != 0.0:
                train = train_embeddings[layer][start:stop].double()
                dist += float(weights[j]) * torch.cdist(z[layer].double(), train)
        cand_d = torch.cat([best_d, dist], dim=1)
        cand_i = torch.cat([best_i, torch.arange(start, stop).expand(n, -1)], dim=1)
        top = torch.topk(cand_d, min(k, cand_d.shape[1]), dim=1, largest=False, sorted=True)
        best_d, best_i = top.values, torch.gather(cand_i, 1, top.indices)
    return best_i, best_d


def nearest_to_centroids(centers: torch.Tensor, train_embeddings: torch.Tensor,
                         per_cluster: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per centroid, the ``per_cluster`` nearest training embeddings: ``(K, per_cluster)`` indices and distances."""
    dist = torch.cdist(centers.double(), train_embeddings.double())
    top = torch.topk(dist, per_cluster, dim=1, largest=False, sorted=True)
    return top.indices, top.values
