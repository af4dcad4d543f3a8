"""The training checks of :class:`~neon_attrib.dec.DEC` and :class:`DECTrainingWarning`.

Three checks (documented in DEC's Notes section): an unconverged autoencoder (from the loss of every pretraining
step), empty, tiny or dominant clusters (after the k-means initialisation and after fine-tuning), and fine-tuning
that lowered the cluster quality (class purity with labels, else the centroid silhouette). Each returns the numbers
it looked at, for ``DEC.diagnostics_``, and a message per problem found.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .assignment import hard_assignment

__all__ = ["DECTrainingWarning", "clustering_report", "pretrain_report"]


class DECTrainingWarning(UserWarning):
    """A DEC model trained badly: unconverged autoencoder, empty or dominant clusters, or harmful fine-tuning.

    The same findings are stored in ``diagnostics_["warnings"]`` of the fitted estimator, so they can be read (or the
    warning silenced with ``warnings.simplefilter("ignore", DECTrainingWarning)``) without losing them.
    """


# Diagnostic thresholds (documented in DEC's Notes section).
_MIN_STEPS = 100       # fewer pretraining steps are never taken as converged (plateaus can precede further drops)
_WINDOW = 0.1          # the last two windows of this fraction of the pretraining steps are compared
_STILL_FALLING = 0.05  # ... and the autoencoder is unconverged when the last one is more than 5 % lower
_MIN_GAIN = 0.9        # ... or when the final loss is not below 90 % of the initial loss
_TINY_CLUSTER = 0.01   # a cluster with fewer than 1 % of the points is "tiny" (not used)
_QUALITY_TOL = 0.01    # fine-tuning "lowers the quality" when purity / silhouette drop by more than this


def pretrain_report(losses: Sequence[float]) -> tuple[dict, str | None]:
    """The convergence check of the pretraining from the loss of every step: diagnostics and a message or None.

    Keys: ``pretrain_steps``, ``pretrain_initial_loss`` (the first minibatch's), ``pretrain_final_loss`` (the mean
    of the last ``max(1, steps // 10)`` steps), ``pretrain_last_decrease`` and ``pretrain_converged`` (all ``None``
    but the first when there was no pretraining).
    """
    steps = len(losses)
    out: dict = {"pretrain_steps": steps, "pretrain_initial_loss": None, "pretrain_final_loss": None,
                 "pretrain_last_decrease": None, "pretrain_converged": None}
    if steps == 0:
        return out, None
    w = max(1, int(steps * _WINDOW))
    final = float(np.mean(losses[-w:]))
    initial = float(losses[0])
    decrease = None
    if steps >= 2 * w:
        before = float(np.mean(losses[-2 * w:-w]))
        decrease = 1.0 - final / before if before > 0 else 0.0
    out.update(pretrain_initial_loss=initial, pretrain_final_loss=final, pretrain_last_decrease=decrease)
    reasons = []
    if steps < _MIN_STEPS:
        reasons.append(f"fewer than {_MIN_STEPS} steps are too few to tell (the loss often plateaus and then "
                       f"falls again)")
    if decrease is not None and decrease > _STILL_FALLING:
        reasons.append(f"the reconstruction loss still fell by {decrease:.2%} over the last {w} steps "
                       f"(converged: at most {_STILL_FALLING:.0%})")
    if initial > 1e-12 and final >= _MIN_GAIN * initial:
        reasons.append(f"the loss is still {final / initial:.0%} of its initial value {initial:.4g} "
                       f"(converged: below {_MIN_GAIN:.0%})")
    out["pretrain_converged"] = not reasons
    if not reasons:
        return out, None
    return out, (f"the autoencoder has not converged after {steps} pretraining steps: {'; and '.join(reasons)}. "
                 f"Increase pretrain_steps (or lr); clusters of an untrained embedding are poor.")


def clustering_report(z_init: torch.Tensor, centers_init: torch.Tensor, z: torch.Tensor, centers: torch.Tensor, *,
                      alpha: float, y: torch.Tensor | None, n_iter: int,
                      keep_best: bool) -> tuple[dict, list[str], torch.Tensor]:
    """The cluster checks after the k-means initialisation and after fine-tuning, and which of the two to keep.

    Parameters
    ----------
    z_init, centers_init : torch.Tensor
        Training embeddings and centroids after the k-means initialisation.
    z, centers : torch.Tensor
        The same after ``n_iter`` fine-tuning steps.
    alpha : float
        The Student-t degrees of freedom (hard assignments are ``DEC.predict``'s).
    y : torch.Tensor or None
        Class labels: the quality is their purity in the clusters, else the centroid silhouette.
    n_iter : int
        Fine-tuning steps run (0: only the initialisation is checked).
    keep_best : bool
        Whether harmful fine-tuning reverts to the initialisation.

    Returns
    -------
    diagnostics : dict
        ``cluster_sizes_init``, ``cluster_sizes_finetuned``, ``cluster_sizes`` (of the kept model),
        ``quality_measure``, ``quality_init``, ``quality_finetuned`` and ``finetuning_kept`` (``False``: revert to
        the initialisation).
    messages : list of str
        One per problem found.
    labels : torch.Tensor
        Hard assignments of the training data by the kept model.
    """
    n, n_clusters = z.shape[0], centers.shape[0]
    labels_init = hard_assignment(z_init, centers_init, alpha)
    labels = hard_assignment(z, centers, alpha)
    sizes_init = torch.bincount(labels_init, minlength=n_clusters).tolist()
    sizes = torch.bincount(labels, minlength=n_clusters).tolist()
    if y is not None:
        measure = "purity"
        q_init, q_final = _purity(labels_init, y, n_clusters), _purity(labels, y, n_clusters)
    else:
        measure = "silhouette"
        q_init, q_final = _centroid_silhouette(z_init, centers_init), _centroid_silhouette(z, centers)
    messages = []
    problem = _cluster_problems(sizes_init, n)
    if problem:
        messages.append(f"after the k-means initialisation, {problem}. Try fewer clusters (n_clusters), a longer "
                        f"pretraining (pretrain_steps) or check the activations.")
    kept = True
    if n_iter > 0:
        problem = _cluster_problems(sizes, n)
        if problem:
            messages.append(f"after fine-tuning, {problem}. Try a lower finetune_lr, fewer fine-tuning steps "
                            f"(max_iter) or fewer clusters.")
        used_init, used = _used_clusters(sizes_init, n), _used_clusters(sizes, n)
        if q_final < q_init - _QUALITY_TOL or used < used_init:
            kept = not keep_best
            what = ("kept the k-means initialisation instead (keep_best=True)" if not kept
                    else "kept the fine-tuned model (keep_best=False)")
            messages.append(f"fine-tuning lowered the cluster quality ({measure} {q_init:.3f} after k-means, "
                            f"{q_final:.3f} after fine-tuning; {used_init} -> {used} clusters with at least 1% of "
                            f"the points); {what}. Try a lower finetune_lr, fewer steps (max_iter) or "
                            f"reconstruction_weight > 0.")
    diagnostics = {
        "cluster_sizes_init": sizes_init,
        "cluster_sizes_finetuned": sizes,
        "cluster_sizes": list(sizes if kept else sizes_init),
        "quality_measure": measure,
        "quality_init": q_init,
        "quality_finetuned": q_final,
        "finetuning_kept": kept,
    }
    return diagnostics, messages, labels if kept else labels_init


def _centroid_silhouette(z: torch.Tensor, centers: torch.Tensor) -> float:
    """Simplified (centroid) silhouette: mean over points of ``(b - a) / max(a, b)``, in [0, 1].

    ``a`` is the distance to the nearest centroid and ``b`` to the second nearest (Hruschka et al., 2004).
    """
    two = torch.cdist(z.double(), centers.double()).topk(2, dim=1, largest=False).values
    a, b = two[:, 0], two[:, 1]
    return float(((b - a) / torch.maximum(a, b).clamp_min(torch.finfo(torch.float64).tiny)).mean())


def _purity(labels: torch.Tensor, y: torch.Tensor, n_clusters: int) -> float:
    """Fraction of points whose class is the majority class of their cluster."""
    n_classes = int(y.max()) + 1
    counts = torch.zeros(n_clusters, n_classes, dtype=torch.float64)
    counts.index_put_((labels, y), torch.ones(y.shape[0], dtype=torch.float64), accumulate=True)
    return float(counts.max(dim=1).values.sum() / max(1, y.shape[0]))


def _used_clusters(sizes: Sequence[int], n: int) -> int:
    return sum(1 for s in sizes if s > 0 and s >= _TINY_CLUSTER * n)


def _cluster_problems(sizes: Sequence[int], n: int) -> str | None:
    """A sentence on empty, tiny (< 1 %) or dominant clusters, or None when the sizes look healthy.

    A cluster is dominant when it holds more than ``(1 + 1/K) / 2`` of the points: more than halfway from its fair
    share ``1/K`` to all of them (75 % for K = 2, 53 % for K = 15).
    """
    k = len(sizes)
    parts = []
    empty = [c for c, s in enumerate(sizes) if s == 0]
    tiny = [c for c, s in enumerate(sizes) if 0 < s < _TINY_CLUSTER * n]
    if empty:
        parts.append(f"{len(empty)} of {k} clusters are empty ({empty})")
    if tiny:
        parts.append(f"{len(tiny)} of {k} clusters hold fewer than 1% of the points ({tiny})")
    largest = int(np.argmax(sizes))
    if n and sizes[largest] / n > (1 + 1 / k) / 2:
        parts.append(f"cluster {largest} holds {sizes[largest] / n:.0%} of the points")
    if not parts:
        return None
    return f"{'; '.join(parts)} (cluster sizes {list(sizes)})"
