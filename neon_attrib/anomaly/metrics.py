"""Pixel-level metrics of anomaly maps and heatmaps against defect masks: :func:`pixel_auroc`, :func:`pro_auc` and
:func:`aupimo`."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["pixel_auroc", "pro_auc", "aupimo"]


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


def aupimo(maps: Any, masks: Any, fpr_bounds: tuple[float, float] = (1e-5, 1e-4)) -> np.ndarray:
    """AUPIMO per image (Bertoldo et al., 2024, arXiv 2401.01984): the area under each anomalous image's per-image
    overlap curve, on a log axis of false-positive rates shared by the normal images, in ``fpr_bounds``, in [0, 1].

    Images whose mask is empty are the normal images. At a threshold ``t`` (a pixel is flagged if ``map >= t``):

    * the shared FPR is the mean over the normal images of each image's share of flagged pixels;
    * an anomalous image's TPR is the share of its mask's pixels that are flagged.

    AUPIMO of an anomalous image is ``∫ TPR d(log FPR)`` over FPR in ``fpr_bounds``, divided by
    ``log(high / low)``: the image's average TPR when the normal images show between ``low`` and ``high`` false
    positives (1e-5 to 1e-4: practically none). It is computed exactly: the shared FPR only changes at the normal
    pixels' values, where the curve is interpolated linearly in log FPR between the TPR at ``t`` and just above (the
    limit of anomalib's ``aupimo_scores`` as its number of linearly spaced thresholds grows). Every image is weighed
    alike, whatever its defect's size, and the normal images decide the threshold, as an inspector would set it.

    Parameters
    ----------
    maps : array-like
        Anomaly maps or heatmaps (n, H, W) (or (H, W)); higher = more anomalous. Images may differ in nothing but
        their values: one shape for all.
    masks : array-like
        Defect masks of the same shape, nonzero = defect; at least one image without and one with a defect.
    fpr_bounds : tuple of float
        ``(low, high)``, ``0 < low < high <= 1``.

    Returns
    -------
    numpy.ndarray
        (n,) AUPIMO of each anomalous image, NaN for the normal images (average with ``np.nanmean``).

    Raises
    ------
    ValueError
        If there is no normal or no anomalous image, the bounds are invalid, or the normal images cannot reach the
        lower bound: the smallest positive shared FPR they give (one pixel above all others, ``1 / (n_normal · H·W)``
        at best) is above ``low`` (too few normal pixels, or tied maxima): more or larger normal images are needed.

    Examples
    --------
    >>> maps = np.zeros((2, 400, 500)); masks = np.zeros((2, 400, 500), bool)
    >>> maps[0].flat[:20] = 1.0                            # the normal image: 20 false positives (FPR 1e-4) at t <= 1
    >>> maps[0].flat[:2] = 3.0                             # 2 of them (1e-5) up to t = 3
    >>> masks[1, :10, :10] = True; maps[1, :10, :10] = 2.0  # the defect is flagged while FPR > 1e-5
    >>> aupimo(maps, masks).round(6).tolist()
    [nan, 1.0]
    """
    maps, masks = _arrays(maps, masks, "aupimo")
    low, high = (float(bound) for bound in fpr_bounds)
    if not 0 < low < high <= 1:
        raise ValueError(f"The 'fpr_bounds' parameter of aupimo must be (low, high) with 0 < low < high <= 1. "
                         f"Got {fpr_bounds!r}.")
    anomalous = masks.reshape(masks.shape[0], -1).any(1)
    if anomalous.all() or not anomalous.any():
        raise ValueError(f"aupimo needs normal images (empty masks) and anomalous images. Got {int(anomalous.sum())} "
                         f"anomalous of {anomalous.size}.")
    normal = [np.sort(image.ravel()) for image in maps[~anomalous]]
    thresholds = np.unique(np.concatenate(normal))
    at = np.mean([_share_flagged(image, thresholds, "left") for image in normal], axis=0)  # shared FPR, map >= t
    above = np.mean([_share_flagged(image, thresholds, "right") for image in normal], axis=0)  # just above t
    smallest = at[at > 0].min()
    if smallest > low * (1 + 1e-9):
        raise ValueError(f"aupimo: the normal images reach no shared FPR below {smallest:.3g}, above the lower bound "
                         f"{low:g} ({len(normal)} normal image(s) of {normal[0].size} pixels). Use more or larger "
                         f"normal images, or a higher lower bound.")
    # as t passes a normal value the shared FPR falls from `at` to `above`: a segment [log above, log at] of the log
    # FPR axis, clipped to the bounds; the last one (to FPR 0) lies below the lower bound after the check above
    log_low, log_high = np.log(low), np.log(high)
    with np.errstate(divide="ignore"):
        log_at, log_above = np.log(at), np.log(above)
    start, stop = np.maximum(log_above, log_low), np.minimum(log_at, log_high)
    keep = stop > start
    thresholds, log_at, log_above, start, stop = (a[keep] for a in (thresholds, log_at, log_above, start, stop))
    finite = np.isfinite(log_above)
    span = np.where(finite, log_at - log_above, 1.0)
    result = np.full(maps.shape[0], np.nan)
    for index in np.flatnonzero(anomalous):
        region = np.sort(maps[index][masks[index]])
        tpr_at = _share_flagged(region, thresholds, "left")
        tpr_above = _share_flagged(region, thresholds, "right")
        # TPR linear in log FPR from (log above, tpr_above) to (log at, tpr_at)
        slope = np.where(finite, (tpr_at - tpr_above) / span, 0.0)
        y_start, y_stop = tpr_at - slope * (log_at - start), tpr_at - slope * (log_at - stop)
        result[index] = np.sum((stop - start) * (y_start + y_stop) / 2) / (log_high - log_low)
    return result


def _share_flagged(sorted_values: np.ndarray, thresholds: np.ndarray, side: str) -> np.ndarray:
    """Share of ``sorted_values`` that are ``>= t`` (``side="left"``) or ``> t`` (``"right"``) for each threshold."""
    return 1.0 - np.searchsorted(sorted_values, thresholds, side=side) / sorted_values.size
