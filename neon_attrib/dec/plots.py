"""Figures for DEC surrogates: image grids (similar examples, concepts) and relevance heatmaps.

Images are ``(n, 3, H, W)`` tensors with values in [0, 1] (undo your normalisation first) or ``(n, H, W)`` gray.

The figures are plain :class:`matplotlib.figure.Figure` objects drawn on an Agg canvas: nothing here touches
matplotlib's global state (the backend, ``pyplot``'s list of open figures), so importing this module or saving a
figure changes nothing for the rest of the process. A returned figure is not registered with ``pyplot``: display it
in a notebook as the cell's value, or save it with ``fig.savefig(...)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["image_grid", "similar_examples_figure", "concepts_figure", "heatmap_figure"]


def _to_hwc(image: torch.Tensor) -> np.ndarray:
    array = image.detach().cpu().float().numpy()
    if array.ndim == 3:
        array = array.transpose(1, 2, 0)
    return np.clip(array, 0.0, 1.0)


def image_grid(rows: Sequence[Sequence[torch.Tensor]], *, titles: Sequence[Sequence[str]] | None = None,
               row_labels: Sequence[str] | None = None, highlight_first: bool = False, scale: int = 2,
               title: str | None = None, path: str | Path | None = None):
    """A grid of small images drawn pixel-exactly (each image upscaled ``scale`` times, nearest neighbour).

    The grid is one mosaic array shown 1:1, which keeps PNG files small; captions are drawn as text.

    Parameters
    ----------
    rows : sequence of sequences of torch.Tensor
        Images per row (``(3, H, W)`` in [0, 1]; rows may differ in length; all images share one size).
    titles : sequence of sequences of str, optional
        A small caption under each image.
    row_labels : sequence of str, optional
        A label left of each row.
    highlight_first : bool
        Draw a red frame around the first image of every row (the query).
    scale : int
        Integer upscaling of every image.
    title : str, optional
        Figure title.
    path : str or Path, optional
        Save there (PNG, parent folders are created) and return None; otherwise return the figure.

    Returns
    -------
    matplotlib.figure.Figure or None
        The figure (not registered with ``pyplot``) when ``path`` is None.
    """
    first = _to_hwc(rows[0][0])
    h, w = first.shape[0] * scale, first.shape[1] * scale
    pad, cap = 4, (11 if titles is not None else 0)
    left = 70 if row_labels is not None else 0
    top = 18 if title else 0
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    cell_h, cell_w = h + cap + pad, w + pad
    canvas = np.ones((top + n_rows * cell_h + pad, left + n_cols * cell_w + pad, 3))
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            array = _to_hwc(image)
            if array.ndim == 2:
                array = np.repeat(array[..., None], 3, axis=2)
            array = np.kron(array, np.ones((scale, scale, 1)))
            y0, x0 = top + pad + i * cell_h, left + pad + j * cell_w
            if highlight_first and j == 0:
                canvas[y0 - 2:y0 + h + 2, x0 - 2:x0 + w + 2] = (0.85, 0.0, 0.0)
            canvas[y0:y0 + h, x0:x0 + w] = array
    dpi = 100
    fig = _figure(figsize=(canvas.shape[1] / dpi, canvas.shape[0] / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    for i in range(n_rows):
        y0 = top + pad + i * cell_h
        if row_labels is not None:
            ax.text(left - 4, y0 + h / 2, row_labels[i], fontsize=6, ha="right", va="center")
        if titles is not None:
            for j, text in enumerate(titles[i]):
                ax.text(left + pad + j * cell_w + w / 2, y0 + h + 1, text, fontsize=5, ha="center", va="top")
    if title:
        ax.text(canvas.shape[1] / 2, 3, title, fontsize=7, ha="center", va="top")
    return _finish(fig, path, dpi)


def _figure(**kwargs) -> Figure:
    """A figure with its own Agg canvas, outside ``pyplot`` (no global registry, no backend switch)."""
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _finish(fig: Figure, path, dpi) -> Figure | None:
    if path is None:
        return fig
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # a 256-colour palette PNG is ~3x smaller than RGB and looks the same for these thumbnails
        from PIL import Image

        fig.set_dpi(dpi)
        fig.canvas.draw()
        rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3]
        Image.fromarray(rgb).quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    except ImportError:  # pragma: no cover - Pillow ships with matplotlib
        fig.savefig(path, dpi=dpi)
    return None  # the figure is garbage once unreferenced: pyplot never knew it


def similar_examples_figure(queries: torch.Tensor, train_images: torch.Tensor, indices: torch.Tensor,
                            query_titles: Sequence[str], train_titles: Sequence[str], *, title: str | None = None,
                            path: str | Path | None = None):
    """Query images (red frame) followed by their nearest training images, one row per query.

    Parameters
    ----------
    queries : torch.Tensor
        Query images ``(n_queries, 3, H, W)`` in [0, 1].
    train_images : torch.Tensor
        Training images ``(n_train, 3, H, W)`` in [0, 1].
    indices : torch.Tensor
        ``(n_queries, k)`` indices into ``train_images`` (e.g. from ``similar_examples``).
    query_titles : sequence of str
        One caption per query.
    train_titles : sequence of str
        One caption per training image.
    title : str, optional
        Figure title.
    path : str or Path, optional
        Save there (PNG) and return None; otherwise return the figure.

    Returns
    -------
    matplotlib.figure.Figure or None
    """
    rows, titles = [], []
    for q, idx in enumerate(indices.tolist()):
        rows.append([queries[q]] + [train_images[i] for i in idx])
        titles.append([query_titles[q]] + [train_titles[i] for i in idx])
    return image_grid(rows, titles=titles, highlight_first=True, title=title, path=path)


def concepts_figure(train_images: torch.Tensor, indices: torch.Tensor, train_titles: Sequence[str] | None = None, *,
                    title: str | None = None, path: str | Path | None = None):
    """One row per cluster: the training images nearest its centroid.

    Parameters
    ----------
    train_images : torch.Tensor
        Training images ``(n_train, 3, H, W)`` in [0, 1].
    indices : torch.Tensor
        ``(n_clusters, per_cluster)`` indices into ``train_images`` (from ``concepts``).
    train_titles : sequence of str, optional
        One caption per training image.
    title : str, optional
        Figure title.
    path : str or Path, optional
        Save there (PNG) and return None; otherwise return the figure.

    Returns
    -------
    matplotlib.figure.Figure or None
    """
    rows = [[train_images[i] for i in row] for row in indices.tolist()]
    titles = None if train_titles is None else [[train_titles[i] for i in row] for row in indices.tolist()]
    return image_grid(rows, titles=titles, row_labels=[f"concept {k}" for k in range(len(rows))], title=title,
                      path=path)


def heatmap_figure(images: torch.Tensor, relevances: Sequence[torch.Tensor], column_titles: Sequence[str],
                   image_titles: Sequence[str] | None = None, *, title: str | None = None,
                   path: str | Path | None = None, dpi: int = 80, cell: float = 0.9):
    """Images in the first row, then one row of pixel heatmaps per relevance tensor.

    Heatmaps use a symmetric red (positive) / blue (negative) colour scale per image.

    Parameters
    ----------
    images : torch.Tensor
        ``(n, 3, H, W)`` images in [0, 1].
    relevances : sequence of torch.Tensor
        Each ``(n, C, H, W)`` (summed over channels) or ``(n, H, W)``.
    column_titles : sequence of str
        One label per relevance tensor (shown left of its row).
    image_titles : sequence of str, optional
        One caption per image.
    title : str, optional
        Figure title.
    path : str or Path, optional
        Save there (PNG) and return None; otherwise return the figure.
    dpi : int
        Resolution of the saved PNG.
    cell : float
        Size of one image in inches.

    Returns
    -------
    matplotlib.figure.Figure or None
    """
    n = images.shape[0]
    n_rows = 1 + len(relevances)
    fig = _figure(figsize=(n * cell + 1.0, n_rows * (cell + 0.15) + 0.3))
    axes = fig.subplots(n_rows, n, squeeze=False)
    for j in range(n):
        axes[0, j].imshow(_to_hwc(images[j]), interpolation="nearest")
        if image_titles is not None:
            axes[0, j].set_title(image_titles[j], fontsize=6, pad=1)
        for r, rel in enumerate(relevances, start=1):
            heat = rel[j].detach().cpu().float()
            heat = heat.sum(0) if heat.ndim == 3 else heat
            bound = float(heat.abs().max()) or 1.0
            axes[r, j].imshow(heat.numpy(), cmap="bwr", vmin=-bound, vmax=bound, interpolation="nearest")
    for r in range(n_rows):
        for j in range(n):
            axes[r, j].set_xticks([])
            axes[r, j].set_yticks([])
        axes[r, 0].set_ylabel(["image", *column_titles][r], fontsize=6, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.subplots_adjust(wspace=0.05, hspace=0.3, left=0.16, right=0.99, top=0.88 if title else 0.95, bottom=0.01)
    return _finish(fig, path, dpi)
