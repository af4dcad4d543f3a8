"""Heatmaps and figures: relevance as images (red positive, blue negative, symmetric scale), overlays, grids.

Nothing here touches pyplot's global state: figures are :class:`matplotlib.figure.Figure` objects drawn with the Agg
canvas, so saving PNGs works headless and never changes the backend of the caller's session.

=================  =====================================================================================
function           gives
=================  =====================================================================================
relevance_map      (H, W) float array: relevance summed over channels
heatmap            (H, W, 3) uint8: colour-coded relevance, white/grey = irrelevant
overlay            (H, W, 3) uint8: the heatmap blended over a grey copy of the image
save_heatmap       a PNG of either of them
heatmap_grid       a Figure: the image and one panel per head or cluster (the book's Figures 7 and 8)
=================  =====================================================================================

Examples
--------
>>> import numpy as np
>>> relevance = np.zeros((3, 8, 8)); relevance[:, 2, 2] = 1.0; relevance[:, 5, 5] = -1.0
>>> rgb = heatmap(relevance)
>>> rgb.shape, rgb.dtype, rgb[2, 2].tolist(), rgb[5, 5].tolist()
((8, 8, 3), dtype('uint8'), [255, 0, 0], [0, 0, 255])
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["relevance_map", "heatmap", "overlay", "save_heatmap", "heatmap_grid", "symmetric_limit"]


def _to_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):
        array = array.detach().cpu().double().numpy()
    return np.asarray(array, dtype=np.float64)


def relevance_map(relevance: Any) -> np.ndarray:
    """Pixel relevance (H, W): ``relevance`` (H, W), (C, H, W) or (1, C, H, W) summed over channels."""
    array = _to_numpy(relevance)
    if array.ndim == 4:
        if array.shape[0] != 1:
            raise ValueError(f"relevance_map takes one image; got a batch of {array.shape[0]}. Index it first.")
        array = array[0]
    if array.ndim == 3:
        array = array.sum(0)
    if array.ndim != 2:
        raise ValueError(f"relevance must be (H, W), (C, H, W) or (1, C, H, W). Got shape {array.shape}.")
    return array


def symmetric_limit(relevance: Any, percentile: float = 99.5) -> float:
    """The colour scale ``v`` of :func:`heatmap`: the ``percentile`` of ``|R|`` (so a few extreme pixels do not wash
    out the rest); the maximum when ``percentile=100``. At least the smallest positive float, so 0 maps to the centre.
    """
    values = np.abs(relevance_map(relevance))
    limit = float(np.percentile(values, percentile)) if values.size else 0.0
    if limit <= 0.0:
        limit = float(values.max()) if values.size else 0.0
    return max(limit, np.finfo(np.float64).tiny)


def _colormap(cmap: Any):
    import matplotlib

    return matplotlib.colormaps[cmap] if isinstance(cmap, str) else cmap


def heatmap(relevance: Any, *, cmap: Any = "bwr", percentile: float = 99.5, limit: float | None = None) -> np.ndarray:
    """Colour-code relevance on a symmetric scale ``[−v, v]``: red positive, blue negative, white zero.

    Parameters
    ----------
    relevance : array-like or torch.Tensor
        (H, W), (C, H, W) or (1, C, H, W); channels are summed.
    cmap : str or matplotlib colormap
        Diverging colormap centred at 0 (``"bwr"``; ``"seismic"`` is darker, ``"coolwarm"`` softer).
    percentile, limit : float
        ``v`` is ``limit`` if given (use one limit to compare panels), else the ``percentile`` of ``|R|``.

    Returns
    -------
    numpy.ndarray
        (H, W, 3) uint8 RGB.
    """
    values = relevance_map(relevance)
    limit = symmetric_limit(values, percentile) if limit is None else float(limit)
    scaled = np.clip(values / limit, -1.0, 1.0) * 0.5 + 0.5
    rgb = _colormap(cmap)(scaled)[..., :3]
    return np.round(rgb * 255).astype(np.uint8)


def _image_rgb(image: Any) -> np.ndarray:
    """(H, W, 3) floats in [0, 1] from (3, H, W) / (1, 3, H, W) / (H, W, 3) / (H, W) floats in [0, 1] or uint8."""
    is_uint8 = getattr(image, "dtype", None) in (np.uint8,) or str(getattr(image, "dtype", "")) == "torch.uint8"
    array = _to_numpy(image)
    if is_uint8:
        array = array / 255.0
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3):
        raise ValueError(f"image must be (3, H, W), (H, W, 3) or (H, W). Got shape {np.shape(image)}.")
    return np.clip(np.broadcast_to(array, (*array.shape[:2], 3)), 0.0, 1.0)


def overlay(image: Any, relevance: Any, *, alpha: float = 0.8, cmap: Any = "bwr", percentile: float = 99.5,
            limit: float | None = None) -> np.ndarray:
    """Blend the heatmap over a grey, dimmed copy of ``image``: irrelevant pixels stay grey (as in the book).

    Each pixel's colour weight is ``alpha · min(1, |R|/v)``, so strong relevance shows its colour and weak relevance
    shows the image underneath.

    Parameters
    ----------
    image : array-like or torch.Tensor
        RGB in ``[0, 1]`` (3, H, W) or (H, W, 3) (use :meth:`~neon_attrib.deep.Preprocessing.inverse` on network
        inputs), or uint8.
    relevance : array-like or torch.Tensor
        Relevance of the same H, W.

    Returns
    -------
    numpy.ndarray
        (H, W, 3) uint8 RGB.
    """
    rgb = _image_rgb(image)
    values = relevance_map(relevance)
    if values.shape != rgb.shape[:2]:
        raise ValueError(f"image is {rgb.shape[:2]} but relevance is {values.shape}.")
    limit = symmetric_limit(values, percentile) if limit is None else float(limit)
    grey = 0.25 + 0.5 * (rgb @ np.array([0.299, 0.587, 0.114]))[..., None]
    colour = heatmap(values, cmap=cmap, limit=limit).astype(np.float64) / 255.0
    weight = alpha * np.clip(np.abs(values) / limit, 0.0, 1.0)[..., None]
    return np.round(((1.0 - weight) * grey + weight * colour) * 255).astype(np.uint8)


def save_heatmap(relevance: Any, path: str | os.PathLike, *, image: Any = None, **kwargs: Any) -> Path:
    """Save :func:`heatmap` (or :func:`overlay` when ``image`` is given) as a PNG at the relevance's resolution."""
    from PIL import Image

    rgb = overlay(image, relevance, **kwargs) if image is not None else heatmap(relevance, **kwargs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return path


def heatmap_grid(image: Any, relevances: Mapping[str, Any] | Sequence[Any], *, titles: Sequence[str] | None = None,
                 path: str | os.PathLike | None = None, ncols: int | None = None, use_overlay: bool = False,
                 shared_scale: bool = False, panel_size: float = 2.4, dpi: int = 100, cmap: Any = "bwr",
                 percentile: float = 99.5, suptitle: str | None = None):
    """A figure with the image and one heatmap per head or cluster, like the book's Figures 7 (inlier / outlier)
    and 8 (five k-means clusters).

    Parameters
    ----------
    image : array-like or torch.Tensor
        RGB in ``[0, 1]``, (3, H, W) or (H, W, 3).
    relevances : mapping of title -> relevance, or sequence of relevances
        One panel each, in order.
    titles : sequence of str, optional
        Panel titles for a sequence of relevances.
    path : path, optional
        Save the figure there (PNG by the suffix).
    ncols : int, optional
        Panels per row (default: all in one row, at most 6).
    use_overlay : bool
        Draw :func:`overlay` instead of the plain heatmap.
    shared_scale : bool
        One colour scale for all panels (compare magnitudes) instead of one per panel (compare patterns).

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(relevances, Mapping):
        titles, maps = list(relevances.keys()), list(relevances.values())
    else:
        maps = list(relevances)
        titles = list(titles) if titles is not None else [f"{i}" for i in range(len(maps))]
    if len(titles) != len(maps):
        raise ValueError(f"Got {len(maps)} relevances but {len(titles)} titles.")
    maps = [relevance_map(m) for m in maps]
    limit = max(symmetric_limit(m, percentile) for m in maps) if shared_scale and maps else None
    panels = 1 + len(maps)
    ncols = ncols or min(panels, 6)
    nrows = -(-panels // ncols)
    rgb = _image_rgb(image)
    aspect = rgb.shape[0] / rgb.shape[1]
    figure = Figure(figsize=(panel_size * ncols, panel_size * aspect * nrows + (0.4 if suptitle else 0.2)), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(rgb)
    axes.flat[0].set_title("input", fontsize=9)
    for ax, title, values in zip(list(axes.flat)[1:], titles, maps):
        if use_overlay:
            ax.imshow(overlay(rgb, values, cmap=cmap, percentile=percentile, limit=limit))
        else:
            ax.imshow(heatmap(values, cmap=cmap, percentile=percentile, limit=limit))
        ax.set_title(str(title), fontsize=9)
    if suptitle:
        figure.suptitle(suptitle, fontsize=10)
    figure.tight_layout()
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=dpi)
    return figure
