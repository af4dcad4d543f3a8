"""Relevance of an anomaly score stopped at a layer of the backbone, upsampled to the image: a resolution between the
patch map and the pixels (what Captum's ``LayerLRP`` with ``LayerAttribution.interpolate`` gives a classifier).

LRP conserves relevance layer by layer, so the relevance arriving at an intermediate layer (e.g. the ReLU closing
VGG-16's block 2, stride 2) is a complete account of the explained score at that layer's resolution: coarser and
smoother than pixel relevance (no texture of the input's own edges), finer than the patch grid (stride 4–8).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from zennit.core import Composite

from ..core.validation import module_dtype_device
from ..pipeline.engine import Audit, run
from ._detector import AnomalyDetector

__all__ = ["LayerRelevance", "layer_relevance"]


@dataclass
class LayerRelevance:
    """What :func:`layer_relevance` returns.

    Attributes
    ----------
    relevance : torch.Tensor
        (n, C, h, w): the relevance arriving at the layer's output.
    map : torch.Tensor
        (n, H, W): ``relevance`` summed over channels and upsampled to the image, as a density: each pixel holds its
        share of the relevance of the layer position it falls in, so the map sums to the layer's total (exactly with
        ``mode="nearest"`` and an integer stride, approximately with ``"bilinear"``).
    output : torch.Tensor
        (n,) the explained score.
    audit : Audit or None
        The conservation audit (:class:`~neon_attrib.pipeline.Audit`) between the score and the relevance at the
        layer.
    """

    relevance: torch.Tensor
    map: torch.Tensor
    output: torch.Tensor
    audit: Audit | None = None


def layer_relevance(model: AnomalyDetector, images: torch.Tensor, layer: str, target: Any = None, *,
                    composite: Composite | None = None, beta: float | None = None, eps: float | None = None,
                    mode: str = "bilinear", strict: bool = False) -> LayerRelevance:
    """LRP of a detector's explained score, from the score down to the output of ``layer`` of its backbone.

    The same rules as :func:`~neon_attrib.explain` (the head's NEON rule, the taps' z-rule, ``composite`` or the
    default ``EpsilonGammaBox`` in the backbone), stopped at ``layer``: the relevance there sums to what the pixel
    relevance sums to where the rules below the layer conserve, and a layer position's relevance equals the pixel
    relevance summed over its receptive field where that field is its own (1x1 convolutions, non-overlapping pools).

    Parameters
    ----------
    model : AnomalyDetector
        A fitted :class:`~neon_attrib.anomaly.PatchCore` or :class:`~neon_attrib.anomaly.PaDiM`.
    images : torch.Tensor
        (n, C, H, W) inputs as the model takes them (preprocessed).
    layer : str
        A module of the backbone (a name of ``model.taps.backbone.named_modules()``, as the tapped ``layers``) that
        every path from the input to the tapped layers passes through: for VGG-16 any layer up to the first tap (e.g.
        ``"8"``, the ReLU closing block 2), for a ResNet a whole stage (``"layer1"``) or the stem.
    target : optional
        Explanation target (``"max"``, ``"sum"``, ``"excess"``, ``(row, col)``); default the model's.
    composite, beta, eps :
        As in :func:`~neon_attrib.explain`.
    mode : {"bilinear", "nearest"}
        Upsampling of the channel-summed relevance to the image.
    strict : bool
        Raise :class:`~neon_attrib.pipeline.ConservationError` instead of warning when the conservation audit (from the
        score to the layer) fails.

    Returns
    -------
    LayerRelevance

    Raises
    ------
    ValueError
        For an unknown layer, one that does not run (after the last tap) or does not return a feature map, one that
        part of the score bypasses (e.g. a convolution inside a residual block), or an unknown ``mode``.

    Examples
    --------
    >>> from torch import nn
    >>> from neon_attrib.anomaly import PaDiM
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(4, 6, 3, padding=1),
    ...                     nn.ReLU())
    >>> model = PaDiM(net, ["4"], n_channels=None).fit(torch.rand(4, 3, 16, 16), progress=False)
    >>> result = layer_relevance(model, torch.rand(2, 3, 16, 16), "2", "sum")  # after the pool: 8x8 positions
    >>> tuple(result.relevance.shape), tuple(result.map.shape)
    ((2, 4, 8, 8), (2, 16, 16))
    """
    owner = f"layer_relevance({type(model).__name__})"
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"The 'mode' parameter of layer_relevance must be 'bilinear' or 'nearest'. Got {mode!r}.")
    if not isinstance(model, AnomalyDetector):
        raise TypeError(f"layer_relevance explains a PatchCore or PaDiM. Got {type(model).__name__}.")
    work_model = model if target is None else model.with_target(target)
    work_model._check_fitted()
    work_model._check_images(images)
    names = dict(work_model.taps.backbone.named_modules())
    if not isinstance(layer, str) or layer not in names or layer == "":
        close = [name for name in names if name and isinstance(layer, str) and layer in name][:5]
        raise ValueError(f"{owner}: {layer!r} is not a module of the backbone "
                         f"({type(work_model.taps.backbone).__name__}). Some names: "
                         f"{close or [name for name in names if name][:8]}.")
    dtype, device = module_dtype_device(work_model)
    name = next(path for path, module in work_model.named_modules() if module is names[layer])
    result = run(work_model, (images.to(dtype=dtype, device=device),), composite=composite, beta=beta, eps=eps,
                 stop_at=name, strict=strict, owner=owner)
    relevance = result.at[name]
    if relevance.ndim != 4:
        raise ValueError(f"{owner}: layer {layer!r} returns {tuple(relevance.shape)}, not a feature map (n, C, h, w).")
    h, w = relevance.shape[-2:]
    size = tuple(images.shape[-2:])
    density = relevance.sum(1, keepdim=True) * (h * w) / (size[0] * size[1])
    if mode == "nearest":
        upsampled = F.interpolate(density, size=size, mode="nearest")
    else:
        upsampled = F.interpolate(density, size=size, mode="bilinear", align_corners=False)
    return LayerRelevance(relevance=relevance, map=upsampled[:, 0], output=result.output, audit=result.audit)
