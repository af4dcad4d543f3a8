"""Faithfulness of a heatmap to an anomaly score: deletion and insertion curves with *normal* content, and the area
between them (ABPC).

A heatmap is faithful to the image score when removing the pixels it ranks highest removes the anomaly. "Removing" a
region of an anomaly detector's input must not create a new anomaly (a grey or black patch is itself unusual to a
texture model), so a removed region is replaced by normal content:

* :func:`nearest_normal`: the aligned pixels of the nearest normal image (e.g. of the fit set; Euclidean distance in
  the model's input space). Removing everything gives that normal image, whose score is low.
* :func:`~neon_attrib.evaluation.blur_reference`: the Gaussian-blurred image itself (no normal images needed; a blur
  keeps brightness but also erases normal texture, so it can look unusual to a texture model).

**Deletion** replaces the most relevant share of the image, in ``n_steps`` steps, and records the image score: the
faster it falls, the more faithful the heatmap. **Insertion** starts from the normal content and puts the image back,
most relevant first: the faster the score rises, the better. :func:`deletion_insertion` returns both curves
(:class:`~neon_attrib.evaluation.FlipCurve`) and the **area between the perturbation curves** (ABPC, insertion area
minus deletion area), normalised by ``f(x) − f(reference)``: 1 at best, about 0 for a random ranking, negative for a
misleading one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..evaluation import FlipCurve, Reference, flip_curve, patch_mask

__all__ = ["Faithfulness", "deletion_insertion", "nearest_normal"]


@dataclass
class Faithfulness:
    """What :func:`deletion_insertion` returns.

    Attributes
    ----------
    deletion, insertion : neon_attrib.evaluation.FlipCurve
        The two curves, (n, n_steps + 1) scores each.
    """

    deletion: FlipCurve
    insertion: FlipCurve

    @property
    def abpc(self) -> torch.Tensor:
        """Area between the curves per image, in score units: insertion area − deletion area, (n,)."""
        return self.insertion.area - self.deletion.area

    @property
    def normalized_abpc(self) -> torch.Tensor:
        """``abpc / (f(x) − f(reference))`` per image, (n,): 1 at best (NaN where the two scores coincide)."""
        return self.insertion.normalized_area - self.deletion.normalized_area

    @property
    def mean_normalized_abpc(self) -> float:
        """ABPC of the average curves over the batch, normalised by the mean ``f(x) − f(reference)`` (images count in
        proportion to how far their score is from the reference's; see
        :attr:`~neon_attrib.evaluation.FlipCurve.mean_normalized_area`)."""
        return self.insertion.mean_normalized_area - self.deletion.mean_normalized_area


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
                       n_steps: int = 16, patch: int = 1, batch_size: int = 16, target: Any = None) -> Faithfulness:
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
        over channels). Pixels are removed in order of decreasing value (ties in pixel order).
    reference : tensor or callable
        The normal content: ``nearest_normal(images, fit_images)``, ``neon_attrib.evaluation.blur_reference()``, a
        tensor broadcastable to ``images`` or a function of them.
    n_steps : int
        Steps of each curve (the shares ``0, 1/n_steps, ..., 1`` are removed / restored).
    patch : int
        Remove square patches of ``patch`` pixels (ranked by their summed heatmap) instead of single pixels.
    batch_size : int
        Perturbed images per forward pass.
    target : optional
        The output column for multi-output models, as in :func:`~neon_attrib.evaluation.flip_curve`.

    Returns
    -------
    Faithfulness

    Examples
    --------
    >>> class Corner(nn.Module):  # the score is the sum of the top-left 2x2 pixels
    ...     def forward(self, x):
    ...         return x[:, :, :2, :2].sum((1, 2, 3))
    >>> heat = torch.zeros(1, 4, 4); heat[0, :2, :2] = 1.0
    >>> result = deletion_insertion(Corner(), torch.ones(1, 1, 4, 4), heat, 0.0, n_steps=4)
    >>> result.deletion.scores.tolist()
    [[4.0, 0.0, 0.0, 0.0, 0.0]]
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
    relevance = heat.unsqueeze(1).expand(images.shape[0], images.shape[1], *heat.shape[-2:]) / images.shape[1]
    mask = patch_mask(tuple(images.shape[1:]), patch).to(images.device)
    options = dict(reference=reference, feature_mask=mask, n_steps=n_steps, batch_size=batch_size, target=target)
    return Faithfulness(deletion=flip_curve(model, images, relevance, mode="deletion", **options),
                        insertion=flip_curve(model, images, relevance, mode="insertion", **options))


def _shape(value: Any) -> Any:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
