"""Heatmaps and figures: relevance as images (red positive, blue negative, symmetric scale), overlays, grids.

Nothing here touches pyplot's global state: figures are :class:`matplotlib.figure.Figure` objects drawn with the Agg
canvas, so saving PNGs works headless and never changes the backend of the caller's session.

Non-finite relevance (NaN, ±inf) cannot be shown on a colour scale (one NaN used to blank a whole heatmap, one inf
to recolour most of it), so :func:`heatmap`, :func:`overlay`, :func:`save_heatmap` and :func:`heatmap_grid` raise a
ValueError that counts them; find where they come from, or replace them yourself (``numpy.nan_to_num``) if that is
what you mean. :func:`symmetric_limit` computes the scale over the finite values.

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


def _to_numpy(array: Any, owner: str, name: str) -> np.ndarray:
    if hasattr(array, "detach"):
        if array.is_complex():
            raise ValueError(f"{owner}: '{name}' must hold real numbers. Got a complex tensor.")
        array = array.detach().cpu().double().numpy()
    try:
        complex_values = np.iscomplexobj(array)  # a float64 conversion would drop the imaginary part, with a warning
        converted = None if complex_values else np.asarray(array, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{owner}: '{name}' must be an array of real numbers (numpy array or torch tensor). "
                         f"Got {type(array).__name__} ({exc}).") from None
    if complex_values:
        raise ValueError(f"{owner}: '{name}' must hold real numbers. Got a complex {type(array).__name__}.")
    return converted


def _relevance_map(relevance: Any, owner: str) -> np.ndarray:
    array = _to_numpy(relevance, owner, "relevance")
    if array.ndim == 4:
        if array.shape[0] != 1:
            raise ValueError(f"{owner} takes the relevance of one image; got a batch of {array.shape[0]}. "
                             f"Index it first (relevance[i]).")
        array = array[0]
    if array.ndim == 3:
        array = array.sum(0)
    if array.ndim != 2:
        raise ValueError(f"{owner}: relevance must be (H, W), (C, H, W) or (1, C, H, W). Got shape {array.shape}.")
    if array.size == 0:
        raise ValueError(f"{owner}: relevance has no pixels (shape {array.shape}).")
    return array


def _finite_map(relevance: Any, owner: str) -> np.ndarray:
    """:func:`relevance_map`, with a ValueError naming ``owner`` and the count when any value is NaN or ±inf."""
    values = _relevance_map(relevance, owner)
    finite = np.isfinite(values)
    if not finite.all():
        bad = values.size - int(finite.sum())
        nan = int(np.isnan(values).sum())
        raise ValueError(f"{owner}: relevance has {bad} non-finite value(s) ({nan} NaN, {bad - nan} ±inf) out of "
                         f"{values.size} pixels; a colour scale cannot show them. Find where they come from, or "
                         f"replace them (numpy.nan_to_num) if you mean to.")
    return values


def _check_scale(owner: str, percentile: float, limit: float | None) -> None:
    if not (isinstance(percentile, (int, float, np.number)) and 0.0 <= float(percentile) <= 100.0):
        raise ValueError(f"The 'percentile' parameter of {owner} must be a number in [0, 100]. Got {percentile!r}.")
    if limit is not None:
        ok = isinstance(limit, (int, float, np.number)) and np.isfinite(limit) and float(limit) > 0
        if not ok:
            raise ValueError(f"The 'limit' parameter of {owner} must be a finite number > 0 (or None). "
                             f"Got {limit!r}.")


def relevance_map(relevance: Any) -> np.ndarray:
    """Pixel relevance (H, W): ``relevance`` (H, W), (C, H, W) or (1, C, H, W) summed over channels.

    Non-finite values are passed through (a NaN channel gives a NaN pixel); the drawing functions reject them.

    Raises
    ------
    ValueError
        If ``relevance`` is not numeric, is a batch of more than one image, has another shape, or has no pixels.
    """
    return _relevance_map(relevance, "relevance_map")


def symmetric_limit(relevance: Any, percentile: float = 99.5) -> float:
    """The colour scale ``v`` of :func:`heatmap`: the ``percentile`` of ``|R|`` (so a few extreme pixels do not wash
    out the rest); the maximum when ``percentile=100``. At least the smallest positive float, so 0 maps to the centre.

    Computed over the finite values only (NaN and ±inf are ignored; the smallest positive float when none is finite).

    Examples
    --------
    >>> symmetric_limit(np.array([[0.0, -2.0], [np.nan, 1.0]]), percentile=100)
    2.0
    """
    _check_scale("symmetric_limit", percentile, None)
    values = np.abs(_relevance_map(relevance, "symmetric_limit"))
    values = values[np.isfinite(values)]
    limit = float(np.percentile(values, percentile)) if values.size else 0.0
    if limit <= 0.0:
        limit = float(values.max()) if values.size else 0.0
    return max(limit, np.finfo(np.float64).tiny)


def _colormap(cmap: Any, owner: str):
    import matplotlib

    if isinstance(cmap, str):
        try:
            return matplotlib.colormaps[cmap]
        except KeyError:
            raise ValueError(f"The 'cmap' parameter of {owner} must be a matplotlib colormap or its name (e.g. "
                             f"'bwr', 'seismic', 'coolwarm'). Got {cmap!r}.") from None
    if not callable(cmap):
        raise ValueError(f"The 'cmap' parameter of {owner} must be a matplotlib colormap or its name. Got {cmap!r}.")
    return cmap


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

    Raises
    ------
    ValueError
        If ``relevance`` has a NaN or infinite value (the count is in the message), the wrong shape, or ``percentile``
        / ``limit`` are out of range.
    """
    return _heatmap(relevance, cmap, percentile, limit, "heatmap")


def _heatmap(relevance: Any, cmap: Any, percentile: float, limit: float | None, owner: str) -> np.ndarray:
    _check_scale(owner, percentile, limit)
    values = _finite_map(relevance, owner)
    limit = symmetric_limit(values, percentile) if limit is None else float(limit)
    scaled = np.clip(values / limit, -1.0, 1.0) * 0.5 + 0.5
    rgb = _colormap(cmap, owner)(scaled)[..., :3]
    return np.round(rgb * 255).astype(np.uint8)


#: Float images may exceed [0, 1] by this much (rounding in an inverse preprocessing) and are clipped; more is an error.
_IMAGE_TOLERANCE = 1e-3


def _image_rgb(image: Any, owner: str) -> np.ndarray:
    """(H, W, 3) floats in [0, 1] from (3, H, W) / (1, 3, H, W) / (H, W, 3) / (H, W) floats in [0, 1] or uint8."""
    is_uint8 = getattr(image, "dtype", None) in (np.uint8,) or str(getattr(image, "dtype", "")) == "torch.uint8"
    array = _to_numpy(image, owner, "image")
    if is_uint8:
        array = array / 255.0
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3) or array.size == 0:
        raise ValueError(f"{owner}: image must be (3, H, W), (H, W, 3) or (H, W). Got shape {np.shape(image)}.")
    finite = np.isfinite(array)
    if not finite.all():
        raise ValueError(f"{owner}: image has {array.size - int(finite.sum())} non-finite value(s) (NaN or ±inf).")
    low, high = float(array.min()), float(array.max())
    if low < -_IMAGE_TOLERANCE or high > 1.0 + _IMAGE_TOLERANCE:
        raise ValueError(f"{owner}: image values must lie in [0, 1] (floats) or be uint8; got [{low:.4g}, {high:.4g}]. "
                         f"Pass the RGB image, not the network input (Preprocessing.inverse(x) gives it back), or "
                         f"divide 0-255 floats by 255.")
    return np.clip(np.broadcast_to(array, (*array.shape[:2], 3)), 0.0, 1.0)


def overlay(image: Any, relevance: Any, *, alpha: float = 0.8, cmap: Any = "bwr", percentile: float = 99.5,
            limit: float | None = None) -> np.ndarray:
    """Blend the heatmap over a grey, dimmed copy of ``image``: irrelevant pixels stay grey (as in the book).

    Each pixel's colour weight is ``alpha · min(1, |R|/v)``, so strong relevance shows its colour and weak relevance
    shows the image underneath.

    Parameters
    ----------
    image : array-like or torch.Tensor
        RGB in ``[0, 1]`` (3, H, W) or (H, W, 3) (use :meth:`~neon_attrib.vision.deep.Preprocessing.inverse` on network
        inputs), or uint8.
    relevance : array-like or torch.Tensor
        Relevance of the same H, W.

    Returns
    -------
    numpy.ndarray
        (H, W, 3) uint8 RGB.

    Raises
    ------
    ValueError
        As :func:`heatmap`; also if ``image`` is not RGB in ``[0, 1]`` / uint8, or its H, W differ from the
        relevance's.
    """
    return _overlay(image, relevance, alpha, cmap, percentile, limit, "overlay")


def _overlay(image: Any, relevance: Any, alpha: float, cmap: Any, percentile: float, limit: float | None,
             owner: str) -> np.ndarray:
    if not (isinstance(alpha, (int, float, np.number)) and 0.0 <= float(alpha) <= 1.0):
        raise ValueError(f"The 'alpha' parameter of {owner} must be a number in [0, 1]. Got {alpha!r}.")
    _check_scale(owner, percentile, limit)
    rgb = _image_rgb(image, owner)
    values = _finite_map(relevance, owner)
    if values.shape != rgb.shape[:2]:
        raise ValueError(f"{owner}: image is {rgb.shape[:2]} but relevance is {values.shape}; they must match.")
    limit = symmetric_limit(values, percentile) if limit is None else float(limit)
    grey = 0.25 + 0.5 * (rgb @ np.array([0.299, 0.587, 0.114]))[..., None]
    colour = _heatmap(values, cmap, percentile, limit, owner).astype(np.float64) / 255.0
    weight = alpha * np.clip(np.abs(values) / limit, 0.0, 1.0)[..., None]
    return np.round(((1.0 - weight) * grey + weight * colour) * 255).astype(np.uint8)


def save_heatmap(relevance: Any, path: str | os.PathLike, *, image: Any = None, **kwargs: Any) -> Path:
    """Save :func:`heatmap` (or :func:`overlay` when ``image`` is given) as an image at the relevance's resolution.

    Parameters
    ----------
    relevance : array-like or torch.Tensor
        As :func:`heatmap`.
    path : path
        The file; its suffix picks the format (``.png``). Missing parent folders are created.
    image : array-like or torch.Tensor, optional
        Draw :func:`overlay` on it.
    **kwargs
        ``cmap``, ``percentile``, ``limit`` (and ``alpha`` with ``image``).

    Returns
    -------
    pathlib.Path

    Raises
    ------
    ValueError
        As :func:`heatmap` / :func:`overlay` (non-finite relevance, shapes), or for a suffix Pillow cannot write;
        nothing is written then.
    """
    from PIL import Image

    unknown = set(kwargs) - ({"cmap", "percentile", "limit", "alpha"} if image is not None else
                             {"cmap", "percentile", "limit"})
    if unknown:
        raise TypeError(f"save_heatmap got unexpected keyword argument(s) {sorted(unknown)}.")
    options = {"cmap": "bwr", "percentile": 99.5, "limit": None, **kwargs}
    if image is not None:
        rgb = _overlay(image, relevance, options.pop("alpha", 0.8), options["cmap"], options["percentile"],
                       options["limit"], "save_heatmap")
    else:
        rgb = _heatmap(relevance, options["cmap"], options["percentile"], options["limit"], "save_heatmap")
    path = Path(path)
    if path.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"save_heatmap: cannot tell the image format of {path} from its suffix "
                         f"{path.suffix or '(none)'!r}. Use .png.")
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

    Raises
    ------
    ValueError
        If a panel's relevance has NaN or infinite values (the panel and the count are named) or a shape other than
        the image's, if ``titles`` and ``relevances`` differ in length, or a layout argument is out of range. Nothing
        is saved then.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    owner = "heatmap_grid"
    if isinstance(relevances, Mapping):
        titles, maps = list(relevances.keys()), list(relevances.values())
    else:
        if isinstance(relevances, (str, bytes)) or not hasattr(relevances, "__iter__"):
            raise TypeError(f"{owner}: 'relevances' must be a mapping title -> relevance or a sequence of "
                            f"relevances. Got {type(relevances).__name__}.")
        maps = list(relevances)
        titles = list(titles) if titles is not None else [f"{i}" for i in range(len(maps))]
    if len(titles) != len(maps):
        raise ValueError(f"{owner}: got {len(maps)} relevances but {len(titles)} titles.")
    if ncols is not None and not (isinstance(ncols, (int, np.integer)) and not isinstance(ncols, bool) and ncols >= 1):
        raise ValueError(f"The 'ncols' parameter of {owner} must be an int >= 1 (or None). Got {ncols!r}.")
    for name, value in (("panel_size", panel_size), ("dpi", dpi)):
        if not (isinstance(value, (int, float, np.number)) and np.isfinite(value) and value > 0):
            raise ValueError(f"The '{name}' parameter of {owner} must be a finite number > 0. Got {value!r}.")
    _check_scale(owner, percentile, None)
    rgb = _image_rgb(image, owner)
    checked = []
    for title, values in zip(titles, maps):
        values = _finite_map(values, f"{owner} (panel {str(title)!r})")
        if use_overlay and values.shape != rgb.shape[:2]:
            raise ValueError(f"{owner}: panel {str(title)!r} has relevance {values.shape} but the image is "
                             f"{rgb.shape[:2]}; they must match.")
        checked.append(values)
    maps = checked
    limit = max(symmetric_limit(m, percentile) for m in maps) if shared_scale and maps else None
    panels = 1 + len(maps)
    ncols = ncols or min(panels, 6)
    nrows = -(-panels // ncols)
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
            ax.imshow(_overlay(rgb, values, 0.8, cmap, percentile, limit, owner))
        else:
            ax.imshow(_heatmap(values, cmap, percentile, limit, owner))
        ax.set_title(str(title), fontsize=9)
    if suptitle:
        figure.suptitle(suptitle, fontsize=10)
    figure.tight_layout()
    if path is not None:
        path = Path(path)
        formats = figure.canvas.get_supported_filetypes()
        if path.suffix and path.suffix[1:].lower() not in formats:
            raise ValueError(f"{owner}: cannot save a figure as {path.suffix!r} ({path}). Use one of "
                             f"{', '.join('.' + f for f in sorted(formats))}.")
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=dpi)
    return figure
