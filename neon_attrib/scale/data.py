"""Data sets for data-set runs: image folders, any map-style ``Dataset``, blocks of indices, failures as records.

* :class:`ImageFiles`: the image files under a folder (sorted, recursive), read with
  :func:`~neon_attrib.vision.load_image`, optionally resized and centre-cropped to a square and preprocessed.
* Every item is read through a guard (:func:`read_item`): an item that raises (a corrupt file, a decoding error in
  your ``Dataset``) or holds NaN / inf is a *failure record* ``(index, None, message)``, not the end of the run.
* Fingerprints (:func:`data_fingerprint`, :func:`item_digest`) tie a store to the data it was computed from.
* Work is cut into **blocks** of consecutive indices (``batch_size`` images each, the last one shorter). Block ``b``
  belongs to rank ``b mod world_size``: disjoint shards, no padding, and the same blocks (so the same batches)
  whatever the number of processes.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, SequentialSampler, TensorDataset

from ..vision import VGG16_MIN_SIZE, Preprocessing, check_not_constant, get_preprocessing, image_files, load_image

__all__ = ["ImageFiles", "Source", "resolve_source", "Batch", "block_loader", "blocks_of_rank", "n_blocks",
           "first_readable", "load_square", "data_fingerprint", "item_digest", "update_digest", "read_item"]


class ImageFiles(Dataset):
    """The image files under ``root`` as a map-style data set of ``(3, H, W)`` float tensors.

    Parameters
    ----------
    root : str or path
        A folder; image files (:data:`~neon_attrib.vision.IMAGE_SUFFIXES`) are found recursively and sorted by their
        path relative to ``root``, which is also their id.
    size : int, optional
        Resize so that the shorter side is ``size`` and crop the centre ``size × size`` square (torchvision's
        ``Resize`` + ``CenterCrop``), so that every image has the same shape. Default: as stored (images of another
        shape than the first are then failures of a data-set run).
    preprocessing : str or Preprocessing, optional
        Applied after loading (e.g. ``"torchvision"``); default none: RGB in ``[0, 1]``.
    value_range : (float, float), optional
        Raw values that mean black and white (16-bit or float images), as in :func:`~neon_attrib.vision.load_image`.
    min_size : int
        Smallest height and width accepted (VGG-16: 32); smaller images are failures.
    pattern : str, optional
        Only the files matching this glob relative to ``root`` (``"**/*.jpg"``), as in
        :func:`~neon_attrib.vision.image_files`; default every image file below ``root``.
    skip_constant : bool
        Make constant images (every pixel one value, e.g. the black masks of defect-free samples) failures, so that
        :func:`~neon_attrib.scale.fit_dataset` and :func:`~neon_attrib.scale.sample_locations` leave them out (what
        ``neon-attrib explain-dataset`` fits on). Default False.

    Raises
    ------
    NotADirectoryError
        If ``root`` is not a folder.
    ValueError
        If it holds no image file.
    """

    def __init__(self, root: str | os.PathLike, *, size: int | None = None,
                 preprocessing: str | Preprocessing | None = None, value_range: Sequence[float] | None = None,
                 min_size: int = VGG16_MIN_SIZE, pattern: str | None = None, skip_constant: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise NotADirectoryError(f"ImageFiles: {self.root} is not a folder (the 'root' argument).")
        self.size = size
        self.preprocessing = None if preprocessing is None else get_preprocessing(preprocessing)
        self.value_range = None if value_range is None else tuple(float(v) for v in value_range)
        self.min_size = min_size
        self.pattern = pattern
        self.skip_constant = bool(skip_constant)
        try:
            self.files = image_files(self.root, pattern, recursive=True)
        except ValueError as exc:
            raise ValueError(f"ImageFiles: {exc}") from None
        self.ids = [p.relative_to(self.root).as_posix() for p in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def image(self, index: int) -> torch.Tensor:
        """The image ``index`` as shown: RGB in ``[0, 1]``, resized and cropped, not preprocessed."""
        return load_square(self.files[index], self.size, min_size=self.min_size, value_range=self.value_range)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self.image(index)
        if self.skip_constant:
            check_not_constant(image, self.ids[index])
        return self.preprocessing(image) if self.preprocessing is not None else image

    def describe(self) -> dict[str, Any]:
        """What decides the network inputs (recorded with a store; a store of other inputs is refused)."""
        prep = self.preprocessing
        return {"kind": "ImageFiles", "size": self.size, "value_range": self.value_range, "min_size": self.min_size,
                "pattern": self.pattern, "skip_constant": self.skip_constant,
                "preprocessing": None if prep is None else {"name": prep.name, "mean": list(prep.mean),
                                                            "std": list(prep.std), "bgr": prep.bgr}}

    def __repr__(self) -> str:
        return f"ImageFiles({str(self.root)!r}, n={len(self)}, size={self.size})"


def load_square(path: str | os.PathLike, size: int | None, *, min_size: int = VGG16_MIN_SIZE,
                value_range: Sequence[float] | None = None) -> torch.Tensor:
    """:func:`~neon_attrib.vision.load_image`, then (with ``size``) the centre ``size × size`` square."""
    image = load_image(path, size, min_size=min_size, value_range=value_range)
    if size is not None:
        height, width = image.shape[-2:]
        top, left = (height - size) // 2, (width - size) // 2
        image = image[:, top:top + size, left:left + size].contiguous()
    return image


@dataclass
class Source:
    """A data set resolved for a run: the map-style ``dataset``, one id per item, and its description."""

    dataset: Any
    ids: list[str]
    description: dict[str, Any]
    batch_size: int | None = None
    num_workers: int | None = None


def resolve_source(data: Any, *, ids: Sequence[str] | None = None, image_size: int | None = None,
                   preprocessing: Preprocessing | None = None, owner: str = "explain_dataset") -> Source:
    """A :class:`Source` from a folder path, a map-style ``Dataset`` (or anything with ``__len__`` and
    ``__getitem__``) or a ``DataLoader`` over one (in order: its batch size and workers are the defaults).

    Ids: ``ids`` if given, else the data set's ``ids`` attribute (e.g. :class:`ImageFiles`: relative paths), else the
    indices as strings.
    """
    batch_size = num_workers = None
    if isinstance(data, (str, os.PathLike)):
        data = ImageFiles(data, size=image_size, preprocessing=preprocessing)
    elif image_size is not None:
        raise ValueError(f"The 'image_size' parameter of {owner} applies to folders only; resize in your Dataset.")
    if isinstance(data, DataLoader):
        if not isinstance(data.sampler, SequentialSampler):
            raise ValueError(f"{owner} reads items in index order: pass a DataLoader with shuffle=False and no "
                             f"sampler, or the Dataset itself. Got a DataLoader with {type(data.sampler).__name__}.")
        batch_size, num_workers = data.batch_size, data.num_workers
        data = data.dataset
    if isinstance(data, IterableDataset) or not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise TypeError(f"{owner} needs a map-style data set (with __len__ and __getitem__; an IterableDataset cannot "
                        f"be split into resumable blocks), a DataLoader over one, or a folder. "
                        f"Got {type(data).__name__}.")
    n = len(data)
    if n == 0:
        raise ValueError(f"{owner}: the data set is empty.")
    if ids is None:
        ids = getattr(data, "ids", None)
    ids = [str(i) for i in range(n)] if ids is None else [str(i) for i in ids]
    if len(ids) != n:
        raise ValueError(f"{owner}: {len(ids)} ids for a data set of {n} items.")
    if len(set(ids)) != n:
        raise ValueError(f"{owner}: the ids must be unique (they name the heatmaps).")
    describe = getattr(data, "describe", None)
    description = describe() if callable(describe) else {"kind": type(data).__qualname__}
    return Source(dataset=data, ids=ids, description=description, batch_size=batch_size, num_workers=num_workers)


# ---------------------------------------------------------------------------------------------------------------------
# fingerprints of the data
#: bytes hashed at a time (tensors on a GPU travel to the CPU in slices of this size)
_DIGEST_CHUNK = 1 << 26


def update_digest(digest: Any, array: torch.Tensor | np.ndarray) -> None:
    """Feed ``array``'s dtype, shape and bytes to ``digest`` (a hashlib object), in slices along the first axis (no
    copy of the whole array, on the CPU or a GPU)."""
    digest.update(f"{array.dtype}:{tuple(array.shape)}".encode())
    if array.ndim == 0:
        array = array.reshape(1)
    row_bytes = max(1, (array.nbytes if isinstance(array, np.ndarray) else array.numel() * array.element_size())
                    // max(1, array.shape[0]))
    step = max(1, _DIGEST_CHUNK // row_bytes)
    for start in range(0, array.shape[0], step):
        part = array[start:start + step]
        if isinstance(part, torch.Tensor):
            part = part.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        digest.update(np.ascontiguousarray(part).reshape(-1).view(np.uint8))


def item_digest(image: torch.Tensor) -> str:
    """The content digest of one item as the network gets it (recorded per image in a store; compared on resume)."""
    digest = hashlib.sha256()
    update_digest(digest, image)
    return digest.hexdigest()[:32]


def data_fingerprint(dataset: Any) -> str | None:
    """A digest of a whole data set, where one is cheap and complete; None otherwise.

    * a tensor or numpy array (of images), a ``TensorDataset``: the contents (hashed in slices: one pass over
      memory);
    * :class:`ImageFiles`: every file's id, size and modification time (one ``stat`` per file, no decoding);
    * any other ``Dataset``: None: its items are checked one by one instead, against the per-item digests a store
      records (:func:`item_digest`).
    """
    digest = hashlib.sha256()
    if isinstance(dataset, ImageFiles):
        digest.update(b"ImageFiles")
        for name, path in zip(dataset.ids, dataset.files):
            stat = path.stat()
            digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()
    if isinstance(dataset, (torch.Tensor, np.ndarray)):
        tensors = [dataset]
    elif isinstance(dataset, TensorDataset):
        tensors = list(dataset.tensors)
    else:
        return None
    for tensor in tensors:
        update_digest(digest, tensor)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# items, blocks and batches
def read_item(dataset: Any, index: int, digest: bool = True) -> tuple[torch.Tensor | None, str | None, str]:
    """``(image or None, error message or None, content digest or '')`` of item ``index``: an item that raises, is
    not a float image tensor (C, H, W) or holds NaN / inf is a failure with its message, not the end of a run.
    ``digest=False``: no digest (``''``), for passes that do not record one (fitting)."""
    try:
        item = dataset[index]
    except Exception as exc:  # a corrupt item is a record of the run, not its end
        return None, f"{type(exc).__name__}: {exc}", ""
    if isinstance(item, (tuple, list)) and item:
        item = item[0]  # (image, label, ...)
    if not isinstance(item, torch.Tensor) or item.ndim != 3 or not item.is_floating_point():
        got = f"shape {tuple(item.shape)} {item.dtype}" if isinstance(item, torch.Tensor) else type(item).__name__
        return None, f"TypeError: expected a float image tensor (C, H, W), got {got}", ""
    content = item_digest(item) if digest else ""
    finite = torch.isfinite(item)
    if not bool(finite.all()):
        bad = int(finite.numel() - finite.sum())
        return None, f"ValueError: the image has {bad} non-finite value(s) (NaN or inf) of {item.numel()}", content
    return item, None, content


class _Guarded(Dataset):
    """``(index, image or None, error message or None, content digest)`` for every index (:func:`read_item`)."""

    def __init__(self, dataset: Any, digests: bool = False):
        self.dataset, self.digests = dataset, digests

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None, str]:
        return (index, *read_item(self.dataset, index, self.digests))


@dataclass
class Batch:
    """One block as loaded: every index, the readable images in groups of one shape, and the failures."""

    block: int
    indices: list[int]
    groups: list[tuple[list[int], torch.Tensor]]  # (indices, stacked images (m, C, H, W)) per shape
    errors: dict[int, str]  # index -> message
    digests: dict[int, str]  # index -> content digest ('' where the item could not be read)

    @property
    def good(self) -> list[int]:
        return [index for indices, _ in self.groups for index in indices]

    def pin_memory(self) -> Batch:
        self.groups = [(indices, images.pin_memory()) for indices, images in self.groups]
        return self


class _Collate:
    """Stack the readable images of a block by shape; with ``shape``, images of another shape are failures."""

    def __init__(self, block_size: int, shape: tuple[int, ...] | None):
        self.block_size = block_size
        self.shape = None if shape is None else tuple(shape)

    def __call__(self, items: list[tuple[int, torch.Tensor | None, str | None, str]]) -> Batch:
        errors: dict[int, str] = {}
        by_shape: dict[tuple[int, ...], tuple[list[int], list[torch.Tensor]]] = {}
        for index, image, error, _ in items:
            if image is None:
                errors[index] = error or "unreadable"
            elif self.shape is not None and tuple(image.shape) != self.shape:
                errors[index] = (f"ValueError: the image is {tuple(image.shape)}, the store holds {self.shape} "
                                 f"(give every image the same shape, e.g. image_size=)")
            else:
                group = by_shape.setdefault(tuple(image.shape), ([], []))
                group[0].append(index)
                group[1].append(image)
        indices = [index for index, _, _, _ in items]
        groups = [(group_indices, torch.stack(images)) for group_indices, images in by_shape.values()]
        return Batch(block=indices[0] // self.block_size, indices=indices, groups=groups, errors=errors,
                     digests={index: digest for index, _, _, digest in items})


class _Blocks(Sampler):
    """Yields the index list of each given block (a batch sampler)."""

    def __init__(self, blocks: Sequence[int], block_size: int, n: int):
        self.blocks, self.block_size, self.n = list(blocks), block_size, n

    def __len__(self) -> int:
        return len(self.blocks)

    def __iter__(self) -> Iterator[list[int]]:
        for block in self.blocks:
            yield list(range(block * self.block_size, min(self.n, (block + 1) * self.block_size)))


def n_blocks(n: int, block_size: int) -> int:
    return math.ceil(n / block_size)


def blocks_of_rank(n: int, block_size: int, rank: int, world_size: int) -> list[int]:
    """Block ``b`` belongs to rank ``b mod world_size``."""
    return list(range(rank, n_blocks(n, block_size), world_size))


def block_loader(dataset: Any, blocks: Sequence[int], block_size: int, *, num_workers: int, pin_memory: bool,
                 shape: tuple[int, ...] | None = None, digests: bool = False) -> DataLoader:
    """A DataLoader yielding one :class:`Batch` per block, loaded by ``num_workers`` worker processes ahead of use
    (with ``digests``, each item's :func:`item_digest` in :attr:`Batch.digests`)."""
    return DataLoader(_Guarded(dataset, digests), batch_sampler=_Blocks(blocks, block_size, len(dataset)),
                      num_workers=num_workers, collate_fn=_Collate(block_size, shape), pin_memory=pin_memory,
                      prefetch_factor=2 if num_workers else None, persistent_workers=False)


def first_readable(dataset: Any) -> tuple[int, torch.Tensor]:
    """The first item that loads: ``(index, image)``. Raises a ValueError naming the first failure if none does."""
    guarded = _Guarded(dataset)
    first_error = None
    for index in range(len(guarded)):
        _, image, error, _ = guarded[index]
        if image is not None:
            return index, image
        first_error = first_error or f"item {index}: {error}"
    raise ValueError(f"None of the {len(guarded)} items could be read ({first_error}).")
