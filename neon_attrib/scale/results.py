"""Reading a store back: :func:`open_results` and :class:`Results` (table, heatmaps by id, contact sheet)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..viz import heatmap
from . import store as _store
from .data import load_square

__all__ = ["Results", "open_results"]


def open_results(store: str | os.PathLike) -> Results:
    """Open the store of :func:`~neon_attrib.explain_dataset` for reading (also while a run is writing it).

    Examples
    --------
    >>> results = open_results("run.zarr")  # doctest: +SKIP
    >>> table = results.table()             # numpy structured array, one row per image
    >>> results.top(3)["id"]                # the three most anomalous images
    >>> relevance = results.heatmap("cracks/017.png")  # (C, H, W), read lazily
    >>> results.contact_sheet(16).savefig("top16.png")
    """
    return Results(store)


class Results:
    """A store of :func:`~neon_attrib.explain_dataset`, read lazily: only what is asked for is read from disk.

    Attributes
    ----------
    path : pathlib.Path
        The store.
    settings : dict
        What the store was written with (model fingerprint, dtype, shape, batch size, data description...).
    source : dict
        Where the images came from (for folders: ``root``, ``size``... used to show them).
    relevance : zarr.Array
        (n, C, H, W), one chunk per image; NaN for failed or pending images.
    """

    def __init__(self, store: str | os.PathLike):
        self.path = Path(store)
        self._group = _store.open_store(self.path, mode="r")
        attrs = _store.get_attrs(self._group)
        self.settings: dict[str, Any] = attrs.get("settings", {})
        self.source: dict[str, Any] = attrs.get("source", {})
        self.relevance = self._group["relevance"]
        self._ids: list[str] | None = None
        self._positions: dict[str, int] | None = None

    def __len__(self) -> int:
        return int(self.relevance.shape[0])

    def __repr__(self) -> str:
        return (f"Results({str(self.path)!r}, n={len(self)}, shape={tuple(self.relevance.shape[1:])}, "
                f"dtype={self.settings.get('dtype')}, complete={self.complete})")

    @property
    def complete(self) -> bool:
        """Whether every block was written and the final table made (re-read each time)."""
        group = _store.open_store(self.path, mode="r")
        return bool(_store.get_attrs(group).get("complete", False))

    @property
    def summary(self) -> dict[str, int]:
        """Counts of the finished run: ``n``, ``explained``, ``failed``, ``audit_failed`` (empty until complete)."""
        group = _store.open_store(self.path, mode="r")
        return dict(_store.get_attrs(group).get("summary", {}))

    @property
    def ids(self) -> list[str]:
        """The image ids, in index order."""
        if self._ids is None:
            self._ids = [str(i) for i in np.asarray(self._group["id"][:]).tolist()]
        return self._ids

    def index(self, key: str | int) -> int:
        """The index of an image given by id or index."""
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            if not -len(self) <= key < len(self):
                raise IndexError(f"Image index {key} is out of range for a store of {len(self)} images.")
            return int(key) % len(self)
        if self._positions is None:
            self._positions = {value: position for position, value in enumerate(self.ids)}
        if key not in self._positions:
            raise KeyError(f"No image with id {key!r} in {self.path}.")
        return self._positions[key]

    def table(self) -> np.ndarray:
        """The scores table as a numpy structured array, one row per image in index order.

        Fields: ``index``, ``id``, ``status`` (0 pending, 1 explained, 2 failed), ``ok``, ``score``, ``target``
        (-1 for scalar heads), ``audit_ok``, ``audit_relative_error``, ``relevance_sum``, ``output`` (K values),
        ``error``.
        """
        return _store.read_table(self._group)

    def rows(self) -> list[dict[str, Any]]:
        """The table as a list of dicts (plain Python values; ``output`` as a list)."""
        table = self.table()
        return [{name: (row[name].tolist() if name == "output" else row[name].item()) for name in table.dtype.names}
                for row in table]

    def failures(self) -> list[dict[str, Any]]:
        """``{"index", "id", "error"}`` of every image that could not be explained."""
        table = self.table()
        return [{"index": int(row["index"]), "id": str(row["id"]), "error": str(row["error"])}
                for row in table[table["status"] == _store.FAILED]]

    def heatmap(self, key: str | int) -> np.ndarray:
        """The pixel relevance (C, H, W) of one image (by id or index), as stored (float16 or float32)."""
        return np.asarray(self.relevance[self.index(key)])

    def top(self, k: int = 16, *, largest: bool = True) -> np.ndarray:
        """The table rows of the ``k`` explained images of highest score (``largest=False``: lowest, e.g. for
        inlier scores where low means anomalous); ties by index."""
        table = self.table()
        table = table[table["ok"] & np.isfinite(table["score"])]
        order = np.lexsort((table["index"], -table["score"] if largest else table["score"]))
        return table[order[:max(0, int(k))]]

    def image(self, key: str | int) -> np.ndarray | None:
        """The image as explained (RGB in ``[0, 1]``, (3, H, W)) when the store was made from a folder that is still
        there; None otherwise."""
        root = self.source.get("root")
        if self.source.get("kind") != "ImageFiles" or root is None:
            return None
        path = Path(root) / self.ids[self.index(key)]
        if not path.is_file():
            return None
        return load_square(path, self.source.get("size"), min_size=self.source.get("min_size", 1),
                           value_range=self.source.get("value_range")).numpy()

    def contact_sheet(self, k: int = 16, *, largest: bool = True, ncols: int = 4,
                      images: Callable[[str], Any] | bool | None = None, percentile: float = 99.5,
                      cmap: Any = "bwr"):
        """A figure of the ``k`` most anomalous images (highest score; ``largest=False``: lowest) and their heatmaps.

        Parameters
        ----------
        k, largest :
            As in :meth:`top`.
        ncols : int
            Images per row (each takes two panels when the image is shown).
        images : callable, bool or None
            ``images(id)`` returning the image to show (3, H, W) or (H, W, 3) in ``[0, 1]``; None (default): the
            folder's images when the store was made from one (:meth:`image`); False: heatmaps only.
        percentile, cmap :
            As in :func:`~neon_attrib.viz.heatmap` (each heatmap on its own symmetric scale).

        Returns
        -------
        matplotlib.figure.Figure
            Not attached to pyplot (save it with ``fig.savefig``).
        """
        from matplotlib.figure import Figure

        rows = self.top(k, largest=largest)
        if images is None:
            def images(key: str) -> Any:
                return self.image(key)
        panels = 2 if images is not False else 1
        count = max(1, len(rows))
        ncols = max(1, min(int(ncols), count))
        nrows = -(-count // ncols)
        figure = Figure(figsize=(2.2 * ncols * panels, 2.5 * nrows), layout="constrained")
        axes = np.atleast_2d(figure.subplots(nrows, ncols * panels, squeeze=False))
        for ax in axes.ravel():
            ax.set_axis_off()
        for position, row in enumerate(rows):
            r, c = divmod(position, ncols)
            key = str(row["id"])
            title = f"#{position + 1} {key}\nscore {float(row['score']):.4g}"
            heat_ax = axes[r, c * panels + panels - 1]
            relevance = self.heatmap(int(row["index"])).astype(np.float32)
            if np.isfinite(relevance).all():
                heat_ax.imshow(heatmap(relevance, cmap=cmap, percentile=percentile))
            else:
                heat_ax.text(0.5, 0.5, "non-finite\nrelevance", ha="center", va="center", transform=heat_ax.transAxes)
            if panels == 2:
                picture = images(key) if callable(images) else None
                image_ax = axes[r, c * panels]
                if picture is not None:
                    image_ax.imshow(_as_hwc(picture))
                image_ax.set_title(title, fontsize=7)
                heat_ax.set_title("relevance", fontsize=7)
            else:
                heat_ax.set_title(title, fontsize=7)
        if not len(rows):
            axes[0, 0].text(0.5, 0.5, "no explained images", ha="center", va="center")
        figure.suptitle(f"{self.path.name}: top {len(rows)} by {'highest' if largest else 'lowest'} score",
                        fontsize=9)
        return figure


def _as_hwc(image: Any) -> np.ndarray:
    array = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image, dtype=np.float32)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)
    return np.clip(array.squeeze(), 0.0, 1.0)
