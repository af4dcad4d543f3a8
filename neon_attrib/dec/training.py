"""DEC's three training stages as functions of the modules and the data: autoencoder pretraining, the k-means
initialisation of the centroids, and ``KL(P || Q)`` fine-tuning. :class:`~neon_attrib.dec.DEC` validates the
hyperparameters, seeds the random generators and calls these; the stages are logged here."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from .assignment import assignment_change, kl_divergence, student_t_assignment, target_distribution
from .encoders import DECEncoder, reconstruction_target

__all__ = ["embed", "finetune", "kmeans_centroids", "minibatches", "pretrain"]

logger = logging.getLogger(__name__)


def minibatches(n: int, batch_size: int, generator: torch.Generator | None) -> Iterator[torch.Tensor]:
    """Index batches of one pass over ``n`` samples: shuffled with ``generator``, in order without one."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


@torch.no_grad()
def embed(encoder: nn.Module, X: torch.Tensor, device: torch.device, batch_size: int,
          embedding_dim: int) -> torch.Tensor:
    """The encoder's output for ``X`` in eval mode, batch by batch on ``device``, collected on the CPU."""
    was_training = encoder.training
    encoder.eval()
    out = [encoder(X[idx].to(device, torch.float32)).cpu() for idx in minibatches(X.shape[0], batch_size, None)]
    encoder.train(was_training)
    return torch.cat(out) if out else torch.empty(0, embedding_dim)


class _Steps:
    """An endless stream of minibatch indices: a new shuffled pass is drawn only when needed (reproducible)."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.batches: Iterator[torch.Tensor] = iter(())

    def next(self) -> torch.Tensor:
        try:
            return next(self.batches)
        except StopIteration:
            self.batches = minibatches(self.n, self.batch_size, self.generator)
            return next(self.batches)


def pretrain(encoder: DECEncoder, decoder: nn.Module, X: torch.Tensor, *, steps: int, lr: float, batch_size: int,
             generator: torch.Generator, device: torch.device, conv: bool, pool: int, progress: bool,
             name: str) -> list[float]:
    """Adam on the reconstruction MSE for ``steps`` minibatches; returns the loss of every step."""
    losses: list[float] = []
    if steps == 0:
        return losses
    opt = torch.optim.Adam(list(encoder.parameters()) + list(decoder.parameters()), lr=lr)
    encoder.train()
    decoder.train()
    batches = _Steps(X.shape[0], batch_size, generator)
    bar = tqdm(total=steps, desc=f"{name} pretrain", disable=not progress, leave=False)
    for step in range(steps):
        xb = X[batches.next()].to(device, torch.float32)
        loss = nn.functional.mse_loss(decoder(encoder(xb)), reconstruction_target(xb, encoder, conv, pool))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    logger.info("%s: pretrained the autoencoder for %d steps (loss %.5f -> %.5f).", name, steps, losses[0],
                losses[-1])
    return losses


def kmeans_centroids(z: torch.Tensor, n_clusters: int, n_init: int, seed: int | None, name: str) -> torch.Tensor:
    """scikit-learn's k-means (``n_init`` restarts) on the embeddings: the initial centroids (float32, CPU)."""
    from sklearn.cluster import KMeans  # deferred: importing sklearn.cluster is slow

    random_state = None if seed is None else int(seed)
    km = KMeans(n_clusters=n_clusters, n_init=n_init, random_state=random_state).fit(z.double().numpy())
    logger.info("%s: k-means initialisation on %d embeddings (inertia %.3f).", name, z.shape[0], km.inertia_)
    return torch.as_tensor(km.cluster_centers_, dtype=torch.float32)


def finetune(encoder: DECEncoder, decoder: nn.Module, X: torch.Tensor, centers: torch.Tensor, *, alpha: float,
             max_iter: int, update_interval: int, tol: float, lr: float, reconstruction_weight: float,
             batch_size: int, embedding_dim: int, generator: torch.Generator, device: torch.device, conv: bool,
             pool: int, progress: bool, name: str, history: dict[str, list[float]]) -> tuple[torch.Tensor, int, bool]:
    """Minimise ``KL(P || Q)`` over encoder and centroids (Adam, ``lr``) for at most ``max_iter`` steps.

    The target ``P`` is recomputed on all of ``X`` every ``update_interval`` steps; training stops when fewer than a
    fraction ``tol`` of the hard assignments changed since the previous refresh. ``reconstruction_weight > 0`` adds
    the reconstruction loss (IDEC) and trains the decoder too. Appends the KL divergence and the changed fraction of
    every refresh to ``history["kl"]`` and ``history["delta_label"]``.

    Returns
    -------
    centers : torch.Tensor
        The fine-tuned centroids (CPU).
    n_iter : int
        Steps run.
    converged : bool
        Whether the ``tol`` stop triggered.
    """
    mu = nn.Parameter(centers.to(device).clone())
    params = list(encoder.parameters()) + [mu]
    if reconstruction_weight > 0:
        params += list(decoder.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    prev = None
    p_all = None
    step = 0
    converged = False
    bar = tqdm(total=max_iter, desc=f"{name} fine-tune", disable=not progress, leave=False)
    batches = _Steps(X.shape[0], batch_size, generator)
    while step < max_iter:
        if step % update_interval == 0:
            q_all = student_t_assignment(embed(encoder, X, device, batch_size, embedding_dim), mu.detach().cpu(),
                                         alpha)
            p_all = target_distribution(q_all)
            labels = q_all.argmax(dim=1)
            kl = kl_divergence(p_all, q_all)
            history["kl"].append(kl)
            if prev is not None:
                delta = assignment_change(prev, labels)
                history["delta_label"].append(delta)
                bar.set_postfix(delta=f"{delta:.4f}", kl=f"{kl:.4f}")
                if delta < tol:
                    converged = True
                    logger.info("%s: stopping early at step %d: %.4f%% of assignments changed (< tol = %.4f%%).",
                                name, step, 100 * delta, 100 * tol)
                    break
            prev = labels
            encoder.train()
        idx = batches.next()
        xb = X[idx].to(device, torch.float32)
        z = encoder(xb)
        q = student_t_assignment(z, mu, alpha)
        loss = nn.functional.kl_div(q.clamp_min(1e-30).log(), p_all[idx].to(device), reduction="batchmean")
        if reconstruction_weight > 0:
            loss = loss + reconstruction_weight * nn.functional.mse_loss(
                decoder(z), reconstruction_target(xb, encoder, conv, pool))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
    bar.close()
    if not converged and max_iter > 0:
        logger.info("%s: reached max_iter=%d fine-tuning steps without meeting tol=%g.", name, max_iter, tol)
    return mu.detach().cpu(), step, converged
