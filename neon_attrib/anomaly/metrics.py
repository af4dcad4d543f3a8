"""Pixel-level metrics of anomaly maps and heatmaps against defect masks: :func:`pixel_auroc` and :func:`pro_auc`."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["pixel_auroc", "pro_auc"]


def _arrays(maps: Any, masks: Any, owner: str) -> tuple[np.ndarray, np.ndarray]:
    maps = np.asarray(maps.detach().cpu() if hasattr(maps, "detach") else maps, dtype=np.float64)
    masks = np.asarray(masks.detach().cpu() if hasattr(masks, "detach") else masks).astype(bool)
    if maps.ndim == 2:
        maps, masks = maps[None], masks[None] if masks.ndim == 2 else masks
    if maps.ndim != 3 or maps.shape != masks.shape:
        raise ValueError(f"{owner} needs maps and masks of one shape (n, H, W). Got {maps.shape} and {masks.shape}.")
    if not np.isfinite(maps).all():
        raise ValueError(f"{owner}: the maps contain NaN or infinity.")
    return maps, masks


def pixel_auroc(maps: Any, masks: Any) -> float:
    """ROC AUC of the map values as a per-pixel defect detector, over every pixel of every image (NaN if the masks
    are all 0 or all 1).

    Examples
    --------
    >>> mask = np.zeros((1, 4, 4), bool); mask[0, :2] = True
    >>> pixel_auroc(mask * 1.0, mask)
    1.0
    """
    from sklearn.metrics import roc_auc_score

    maps, masks = _arrays(maps, masks, "pixel_auroc")
    if masks.all() or not masks.any():
        return float("nan")
    return float(roc_auc_score(masks.ravel(), maps.ravel()))


def pro_auc(maps: Any, masks: Any, max_fpr: float = 0.3, steps: int = 1000) -> float:
    """Area under the per-region-overlap curve up to ``max_fpr`` false positive rate, divided by ``max_fpr``
    (Bergmann et al., MVTec AD, 2021): 1 is perfect, about ``max_fpr / 2`` is chance.

    Each connected defect region (8-connectivity, per image) counts equally, whatever its size: at a threshold ``t``
    the PRO is the mean over regions of the share of the region's pixels with ``map > t``, and the FPR the share of
    defect-free pixels (of every image) with ``map > t``. Thresholds are the defect-free pixels' quantiles at
    ``steps`` + 1 evenly spaced FPRs in ``[0, max_fpr]`` (and 10 beyond), each also taken just below itself (ties),
    FPR and PRO are computed exactly there, and the curve, closed at (0, 0) and (1, 1), is interpolated linearly at
    ``max_fpr``.

    Returns NaN if there is no defect region or no defect-free pixel.

    Examples
    --------
    >>> mask = np.zeros((1, 8, 8), bool); mask[0, 1:3, 1:3] = True; mask[0, 5:7, 5:7] = True
    >>> pro_auc(mask * 1.0, mask)  # a perfect map
    1.0
    """
    from scipy.ndimage import label

    maps, masks = _arrays(maps, masks, "pro_auc")
    if not 0 < max_fpr <= 1:
        raise ValueError(f"The 'max_fpr' parameter of pro_auc must lie in (0, 1]. Got {max_fpr!r}.")
    normal = np.sort(maps[~masks])
    regions = []
    for image, mask in zip(maps, masks):
        labelled, count = label(mask, structure=np.ones((3, 3), dtype=int))
        regions.extend(np.sort(image[labelled == index]) for index in range(1, count + 1))
    if not regions or normal.size == 0:
        return float("nan")
    levels = np.concatenate([np.linspace(0.0, max_fpr, steps + 1), np.linspace(max_fpr, 1.0, 11)])
    thresholds = np.quantile(normal, 1.0 - levels)
    # just below each threshold too: tied values (a flat background) make the curve jump there
    thresholds = np.unique(np.concatenate([thresholds, np.nextafter(thresholds, -np.inf)]))
    # share of values > t in a sorted array: 1 − searchsorted(..., side="right") / size
    fpr = 1.0 - np.searchsorted(normal, thresholds, side="right") / normal.size
    pro = np.mean([1.0 - np.searchsorted(region, thresholds, side="right") / region.size for region in regions],
                  axis=0)
    fpr = np.concatenate([[0.0], fpr, [1.0]])
    pro = np.concatenate([[0.0], pro, [1.0]])
    order = np.lexsort((pro, fpr))
    fpr, pro = fpr[order], pro[order]
    cut = np.interp(max_fpr, fpr, pro) if np.all(np.diff(fpr) >= 0) else pro[-1]
    keep = fpr <= max_fpr
    x = np.concatenate([fpr[keep], [max_fpr]])
    y = np.concatenate([pro[keep], [cut]])
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2) / max_fpr)
