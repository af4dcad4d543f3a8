"""Faithfulness of a heatmap to an anomaly score: deletion and insertion curves with *normal* content, and the area
between them (ABPC).

A heatmap is faithful to the image score when removing the pixels it ranks highest removes the anomaly. "Removing" a
region of an anomaly detector's input must not create a new anomaly (a grey or black patch is itself unusual to a
texture model), so a removed region is replaced by normal content:

* :func:`nearest_normal`: the aligned pixels of the nearest normal image (e.g. of the fit set; Euclidean distance in
  the model's input space). Removing everything gives that normal image, whose score is low.
* :func:`~neon_attrib.evaluation.blur_reference`: the Gaussian-blurred image itself (no normal images needed; a blur
  keeps brightness but also erases normal texture, so it can look unusual to a texture model).

**Deletion** replaces the most relevant shares of the image (``fractions``) and records the image score: the faster it
falls, the more faithful the heatmap. **Insertion** starts from the normal content and puts the image back, most
relevant first: the faster the score rises, the better. :func:`deletion_insertion` returns both curves and the **area
between the perturbation curves** (ABPC: insertion minus deletion, averaged over the shares), normalised by
``f(x) − f(reference)``: higher is more faithful. Defects cover a few per cent of an image, so the shares can stop
early and step finely (e.g. ``np.linspace(0, 0.2, 9)``); the general curves of :mod:`neon_attrib.evaluation` step
evenly over the whole input. The scale depends on the shares: for a score that adds up its pixels, a random ranking
gives about 0 with shares up to 1 but ``s_max − 1`` (−0.8 for ``s_max = 0.2``) with shares up to ``s_max``, and a
score that reacts to the replacement itself (seams, sharp edges on a blurred copy) can take the curves past ``f(x)``
and the ABPC past 1. Compare heatmaps with each other and with a random ranking on the same images and shares.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..evaluation.curves import Reference, model_score, patch_mask

__all__ = ["Faithfulness", "deletion_insertion", "nearest_normal"]


@dataclass
class Faithfulness:
    """What :func:`deletion_insertion` returns.

    Attributes
    ----------
    fractions : torch.Tensor
        (S,) the shares of the image removed (deletion) or restored (insertion), increasing from 0.
    deletion, insertion : torch.Tensor
        (n, S) the score at each share. Deletion starts at ``f(x)``, insertion at ``f(reference)``.
    input_score, reference_score : torch.Tensor
        (n,) ``f(x)`` and ``f(reference)``.
    """

    fractions: torch.Tensor
    deletion: torch.Tensor
    insertion: torch.Tensor
    input_score: torch.Tensor
    reference_score: torch.Tensor

    def _mean_over_shares(self, curves: torch.Tensor) -> torch.Tensor:
        width = float(self.fractions[-1] - self.fractions[0])
        return torch.trapezoid(curves, self.fractions, dim=-1) / width

    @property
    def abpc(self) -> torch.Tensor:
        """Insertion minus deletion, averaged over the shares (trapezoid), per image in score units, (n,)."""
        return self._mean_over_shares(self.insertion - self.deletion)

    @property
    def normalized_abpc(self) -> torch.Tensor:
        """``abpc / (f(x) − f(reference))`` per image, (n,); higher is more faithful (NaN where the two scores
        coincide)."""
        span = self.input_score - self.reference_score
        scale = torch.maximum(self.input_score.abs(), self.reference_score.abs()).clamp_min(1e-30)
        degenerate = span.abs() <= 1e-9 * scale
        out = self.abpc / torch.where(degenerate, torch.ones_like(span), span)
        return torch.where(degenerate, torch.full_like(out, math.nan), out)

    @property
    def mean_normalized_abpc(self) -> float:
        """ABPC of the average curves, over the mean ``f(x) − f(reference)``: images count in proportion to how far
        their score is from the reference's, so none whose score barely differs from it dominates (NaN when the
        means coincide)."""
        span = float((self.input_score - self.reference_score).mean())
        if abs(span) <= 1e-9 * max(float(self.input_score.abs().mean()), 1e-30):
            return math.nan
        return float(self.abpc.mean()) / span


def nearest_normal(images: torch.Tensor, normal: torch.Tensor) -> torch.Tensor:
    """For each image (n, C, H, W), the nearest of the ``normal`` images (m, C, H, W), Euclidean in input space.

    Use it as ``reference`` of :func:`deletion_insertion`: a removed pixel then takes the value of the same pixel in
    the most similar normal image. Pass normal images the model has seen (its fit set) or held-out ones; never the
    explained image itself.

    Examples
    --------
    >>> normal = torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4)])
    >>> nearest_normal(torch.full((1, 1, 4, 4), 0.8), normal).flatten().tolist()[:2]
    [1.0, 1.0]
    """
    if not (isinstance(images, torch.Tensor) and isinstance(normal, torch.Tensor) and images.ndim == 4
            and normal.ndim == 4 and images.shape[1:] == normal.shape[1:] and normal.shape[0] > 0):
        raise ValueError(f"nearest_normal needs images (n, C, H, W) and normal images (m >= 1, C, H, W) of one image "
                         f"shape. Got {_shape(images)} and {_shape(normal)}.")
    support = normal.to(device=images.device, dtype=images.dtype)
    index = torch.cdist(images.flatten(1).double(), support.flatten(1).double()).argmin(1)
    return support[index]


def deletion_insertion(model: nn.Module, images: torch.Tensor, heatmaps: Any, reference: Reference, *,
                       fractions: Any = None, patch: int = 1, batch_size: int = 16, target: Any = None
                       ) -> Faithfulness:
    """Deletion and insertion curves of ``model``'s score for images ranked by heatmaps, with normal content.

    Parameters
    ----------
    model : torch.nn.Module
        The score to be explained, one value per image: e.g. a detector with ``with_target("max")`` (the image score,
        whatever heatmap is tested) or any scalar model.
    images : torch.Tensor
        (n, C, H, W) inputs as the model takes them.
    heatmaps : array-like
        (n, H, W) one value per pixel (e.g. relevance summed over channels, an anomaly map) or (n, C, H, W) (summed
        over channels). Pixels are removed in order of decreasing value; ties in pixel order.
    reference : tensor or callable
        The normal content: ``nearest_normal(images, fit_images)``, ``neon_attrib.evaluation.blur_reference()``, a
        tensor broadcastable to ``images`` or a function of them.
    fractions : array-like, optional
        Increasing shares of the pixels (patches) to remove / restore, from 0 (default 0, 1/16, ..., 1).
    patch : int
        Remove square patches of ``patch`` pixels (ranked by their summed heatmap) instead of single pixels.
    batch_size : int
        Perturbed images per forward pass.
    target : optional
        The output column of a multi-output model, as in :func:`~neon_attrib.evaluation.model_score`.

    Returns
    -------
    Faithfulness

    Examples
    --------
    >>> class Corner(nn.Module):  # the score is the sum of the top-left 2x2 pixels
    ...     def forward(self, x):
    ...         return x[:, :, :2, :2].sum((1, 2, 3))
    >>> heat = torch.zeros(1, 4, 4); heat[0, :2, :2] = 1.0
    >>> result = deletion_insertion(Corner(), torch.ones(1, 1, 4, 4), heat, 0.0, fractions=[0, 0.25, 0.5, 1])
    >>> result.deletion.tolist(), result.insertion.tolist()
    ([[4.0, 0.0, 0.0, 0.0]], [[0.0, 4.0, 4.0, 4.0]])
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(f"deletion_insertion needs images (n, C, H, W). Got {_shape(images)}.")
    heat = torch.as_tensor(heatmaps).detach().to(device=images.device, dtype=torch.float64)
    if heat.ndim == 4 and heat.shape == images.shape:
        heat = heat.sum(1)
    if heat.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(f"deletion_insertion needs heatmaps (n, H, W) or (n, C, H, W) matching the images "
                         f"{tuple(images.shape)}. Got {tuple(heat.shape)}.")
    if not torch.isfinite(heat).all():
        raise ValueError("deletion_insertion: the heatmaps contain NaN or infinity.")
    shares = np.linspace(0, 1, 17) if fractions is None else np.asarray(fractions, dtype=np.float64)
    if shares.ndim != 1 or shares.size < 2 or shares[0] != 0 or np.any(np.diff(shares) <= 0) or shares[-1] > 1:
        raise ValueError(f"The 'fractions' parameter of deletion_insertion must increase from 0 to at most 1 (two or "
                         f"more values). Got {fractions!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"The 'batch_size' parameter of deletion_insertion must be an int >= 1. Got {batch_size!r}.")
    ref = reference(images) if callable(reference) else torch.as_tensor(reference)
    try:
        ref = torch.broadcast_to(ref.to(device=images.device, dtype=images.dtype), images.shape)
    except RuntimeError as exc:
        raise ValueError(f"deletion_insertion: a reference of shape {tuple(ref.shape)} does not broadcast to the "
                         f"images {tuple(images.shape)}.") from exc
    groups = patch_mask(tuple(images.shape[1:]), patch).to(images.device)[0]  # (H, W) ids
    n, n_groups = images.shape[0], int(groups.max()) + 1
    group_heat = torch.zeros(n, n_groups, dtype=torch.float64, device=images.device)
    group_heat.scatter_add_(1, groups.flatten().expand(n, -1), heat.flatten(1))
    rank = torch.empty(n, n_groups, dtype=torch.long, device=images.device)
    order = torch.argsort(-group_heat, dim=1, stable=True)
    rank.scatter_(1, order, torch.arange(n_groups, device=images.device).expand(n, -1).contiguous())
    pixel_rank = rank[:, groups.flatten()].reshape(n, 1, *images.shape[-2:])  # (n, 1, H, W)
    counts = np.round(shares * n_groups).astype(int)

    input_score = model_score(model, images, target).double().cpu()
    reference_score = model_score(model, ref, target).double().cpu()
    curves = {"deletion": torch.empty(n, shares.size, dtype=torch.float64),
              "insertion": torch.empty(n, shares.size, dtype=torch.float64)}
    jobs = [(mode, i, k) for mode in curves for i in range(n) for k in range(shares.size)]
    done = {(mode, i, k) for mode in curves for i in range(n) for k in range(shares.size)
            if counts[k] in (0, n_groups)}
    for mode, i, k in done:  # nothing or everything flipped: the input's or the reference's score
        first = (mode == "deletion") == (counts[k] == 0)
        curves[mode][i, k] = input_score[i] if first else reference_score[i]
    jobs = [job for job in jobs if job not in done]
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        rows = torch.tensor([i for _, i, _ in chunk], device=images.device)
        limits = torch.tensor([counts[k] for _, _, k in chunk], device=images.device).view(-1, 1, 1, 1)
        flipped = pixel_rank[rows] < limits
        deleting = torch.tensor([mode == "deletion" for mode, _, _ in chunk], device=images.device).view(-1, 1, 1, 1)
        batch = torch.where(flipped == deleting, ref[rows], images[rows])
        for (mode, i, k), value in zip(chunk, model_score(model, batch, target).double().cpu()):
            curves[mode][i, k] = value
    return Faithfulness(fractions=torch.as_tensor(shares), deletion=curves["deletion"],
                        insertion=curves["insertion"], input_score=input_score, reference_score=reference_score)


def _shape(value: Any) -> Any:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
