"""Explain a whole data set into a store: :func:`explain_dataset`."""

from __future__ import annotations

import collections
import hashlib
import os
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.validation import check_int, module_dtype_device
from ..pipeline.engine import ConservationWarning, Explainer, attribution_output, resolve_composite, resolve_targets
from ..vision import Preprocessing
from . import store as _store
from ._dist import Ranks, ensure_process_group, on_rank0
from .data import (
    ImageFiles,
    Source,
    block_loader,
    blocks_of_rank,
    data_fingerprint,
    first_readable,
    read_item,
    resolve_source,
)
from .results import Results, open_results

__all__ = ["explain_dataset"]

_DTYPES = {"float16": "float16", "float32": "float32", "half": "float16", "float": "float32"}


def explain_dataset(model: nn.Module, dataset: Any, out: str | os.PathLike, *, batch_size: int | None = None,
                    num_workers: int | None = None, dtype: Any = "float32", resume: bool = True,
                    overwrite: bool = False, target: int | None = None, composite: Any = None,
                    beta: float | None = None, eps: float | None = None, audit: bool = True,
                    ids: list[str] | None = None, image_size: int | None = None,
                    settings: dict[str, Any] | None = None, device: torch.device | str | None = None,
                    explainer_options: dict[str, Any] | None = None, progress: bool = True) -> Results:
    """Explain every image of ``dataset`` with ``model`` and write pixel relevance and scores to the store ``out``.

    The explainer's hooks are registered once; images are loaded ahead by DataLoader workers (pinned memory on
    CUDA), explained a batch at a time, and written by a background thread while the next batch is explained. Each
    batch is one *block* of ``batch_size`` consecutive images; a block is marked done once written, so a run that is
    killed restarts at the first unfinished block and ends with the same store as an uninterrupted run. Images that
    cannot be read (corrupt files, errors raised by your ``Dataset``, another shape) are recorded as failures.

    Under ``torch.distributed`` (e.g. ``torchrun --nproc-per-node N``; a default process group is initialized from
    ``torchrun``'s environment if there is none: NCCL on GPUs, gloo on CPUs) every rank takes the blocks ``b`` with
    ``b mod N == rank`` (disjoint, no padding), writes them, and rank 0 writes the final table. The store equals a
    single-process run's: the same blocks are the same batches. Call it on every rank with the same model (checked).

    Parameters
    ----------
    model : torch.nn.Module
        A :class:`~neon_attrib.vision.deep.DeepNeon` (or any model with ``explainer()``), or a model with NEON layers
        (then
        :class:`~neon_attrib.pipeline.Explainer` with :func:`~neon_attrib.pipeline.resolve_composite` is used).
    dataset : Dataset, DataLoader or path
        A map-style data set of image tensors ``(C, H, W)`` (or ``(image, label, ...)`` tuples) already as the
        network's input; a DataLoader over one without shuffling (its batch size and workers are the defaults); or
        a folder of image files, read with :class:`~neon_attrib.scale.ImageFiles` and the model's preprocessing.
    out : path
        The store (a folder, created; see :mod:`neon_attrib.scale.store` for the layout).
    batch_size : int, optional
        Images per batch and per block (default 16, or the DataLoader's). Part of the store's settings.
    num_workers : int, optional
        DataLoader worker processes per rank (default 2, or the DataLoader's; 0 loads in the main process).
    dtype : {"float32", "float16"}
        Storage dtype of the relevance (the explanation runs in the model's dtype).
    resume : bool
        Continue a store written with the same settings (default). ``False``: refuse an existing store.
    overwrite : bool
        Delete an existing store and start over.
    target : int, optional
        The output explained for every image (a k-means cluster); default the model's default (the assigned cluster;
        the score itself for scalar heads).
    composite, beta, eps :
        As in :func:`~neon_attrib.explain`.
    audit : bool
        Record the conservation audit of every image (``audit_ok``, ``audit_relative_error``); one warning at the end
        counts the failures instead of one per batch.
    ids : list of str, optional
        One unique id per image; default the data set's ``ids`` (relative paths for folders) or the indices.
    image_size : int, optional
        For folders: resize the shorter side and centre-crop to this square size.
    settings : dict, optional
        JSON-able description of anything else that decides the inputs (e.g. your transform), recorded and compared
        on resume.
    device : torch.device or str, optional
        Move the model there first (``model.to(device)``, in place). Default: where the model is.
    explainer_options : dict, optional
        Further options of the explainer (``channels_last``, ``autocast_dtype``...).
    progress : bool
        A tqdm progress bar (rank 0).

    Returns
    -------
    Results
        :func:`open_results` of the finished store (on every rank).

    Raises
    ------
    ValueError
        For invalid arguments, an existing store written with other settings (or not a store), ranks holding
        different models, or a data set none of whose items can be read.
    FileExistsError
        If the store exists and ``resume=False`` (without ``overwrite``).

    Examples
    --------
    >>> import tempfile, torch
    >>> from neon_attrib import DeepNeon, KDEOutlier
    >>> cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(4))
    >>> images = torch.rand(6, 3, 16, 16)
    >>> model = DeepNeon(cnn, KDEOutlier(gamma=0.1)).fit(images, progress=False)
    >>> results = explain_dataset(model, images, tempfile.mkdtemp() + "/run.zarr", batch_size=4, num_workers=0,
    ...                           progress=False)
    >>> len(results), results.heatmap(0).shape
    (6, (3, 16, 16))
    """
    ranks = ensure_process_group()
    owner = "explain_dataset"
    storage = _check_dtype(dtype)
    preprocessing = getattr(model, "preprocessing", None)
    source = resolve_source(dataset, ids=ids, image_size=image_size,
                            preprocessing=preprocessing if isinstance(preprocessing, Preprocessing) else None)
    block = (source.batch_size or 16) if batch_size is None else batch_size
    check_int(block, owner=owner, name="batch_size", minimum=1)
    workers = (source.num_workers if source.num_workers is not None else 2) if num_workers is None else num_workers
    check_int(workers, owner=owner, name="num_workers", minimum=0)
    if target is not None:
        check_int(target, owner=owner, name="target", minimum=0)
    path = Path(out)
    if device is not None:
        model.to(device)
    model_dtype, model_device = module_dtype_device(model)
    ranks.bind(model_device)
    fingerprints = ranks.all_gather(_store.model_fingerprint(model))
    if len(set(fingerprints)) > 1:
        raise ValueError(f"{owner}: the ranks hold different models (fingerprints differ: rank "
                         f"{[i for i, f in enumerate(fingerprints) if f != fingerprints[0]]} vs rank 0). Seed the "
                         f"random weights, or load the same weights, on every rank.")
    wanted = {
        "n": len(source.ids), "ids_sha256": hashlib.sha256("\0".join(source.ids).encode()).hexdigest(),
        "data_sha256": data_fingerprint(source.dataset),
        "dtype": storage, "batch_size": block, "model": fingerprints[0],
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}", "data": source.description,
        "target": target, "audit": bool(audit), "composite": None if composite is None else type(composite).__name__,
        "beta": beta, "eps": eps,
        "explainer_options": {k: repr(v) for k, v in sorted((explainer_options or {}).items())},
        "user": settings,
    }

    def prepare() -> dict[str, Any]:
        return _prepare(path, model, source, wanted, resume=resume, overwrite=overwrite, model_dtype=model_dtype,
                        model_device=model_device)

    layout = on_rank0(ranks, prepare)
    group = _store.open_store(path, mode="r+")
    done = _store.done_blocks(group)
    mine = [b for b in blocks_of_rank(len(source.ids), block, ranks.rank, ranks.world_size) if not done[b]]
    if mine:
        _explain_blocks(model, source, group, mine, block=block, workers=workers, storage=storage,
                        shape=tuple(layout["shape"]), target=target, composite=composite, beta=beta, eps=eps,
                        audit=audit, options=explainer_options or {}, ranks=ranks, progress=progress,
                        dtype=model_dtype, device=model_device)
    ranks.barrier()
    on_rank0(ranks, lambda: _finish(path, audit))
    return open_results(path)


def _check_dtype(dtype: Any) -> str:
    name = str(dtype).replace("torch.", "")
    if isinstance(dtype, np.dtype) or (isinstance(dtype, type) and issubclass(dtype, np.generic)):
        name = np.dtype(dtype).name
    if name not in _DTYPES:
        raise ValueError(f"The 'dtype' parameter of explain_dataset must be float16 or float32 (the relevance's "
                         f"storage dtype). Got {dtype!r} instead.")
    return _DTYPES[name]


def _prepare(path: Path, model: nn.Module, source: Source, wanted: dict[str, Any], *, resume: bool, overwrite: bool,
             model_dtype: torch.dtype, model_device: torch.device) -> dict[str, Any]:
    """Rank 0: probe the input shape and the output width, then create the store or check the existing one."""
    if path.exists() and not _store.is_store(path) and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"explain_dataset: {path} exists and is not a store (a file, or a folder that is not empty "
                         f"and holds no zarr group); it is never overwritten. Choose another 'out'.")
    stored = _store.open_store(path, mode="r") if _store.is_store(path) else None  # refuses other zarr groups
    _, image = first_readable(source.dataset)
    with torch.no_grad():
        output = model(image.unsqueeze(0).to(device=model_device, dtype=model_dtype))
    layout = {"shape": list(image.shape), "n_outputs": int(output[0].numel()) if output.ndim > 1 else 1}
    wanted = {**wanted, **layout}
    if stored is not None and not overwrite:
        if not resume:
            raise FileExistsError(f"explain_dataset: the store {path} exists. Pass resume=True to continue it, or "
                                  f"overwrite=True to start over.")
        attrs = _store.get_attrs(stored)
        _store.check_settings(path, attrs.get("settings", {}), wanted)
        _check_items(path, stored, source)
        return layout
    description = source.dataset.describe() if isinstance(source.dataset, ImageFiles) else source.description
    where = {"root": str(source.dataset.root.resolve())} if isinstance(source.dataset, ImageFiles) else {}
    _store.create_store(path, settings=wanted, source={**description, **where}, ids=source.ids,
                        shape=tuple(image.shape), dtype=wanted["dtype"], n_outputs=layout["n_outputs"],
                        block=wanted["batch_size"])
    return layout


#: items of a resumed store read again and compared with the digests recorded when they were explained
_CHECKED_ITEMS = 8


def _check_items(path: Path, group: Any, source: Source) -> None:
    """Rank 0, resuming: read up to :data:`_CHECKED_ITEMS` of the items already in the store (evenly spread) and
    compare their content digests with the recorded ones, so that another data set with the same ids and shapes
    (a ``Dataset`` that has no complete fingerprint) is refused instead of handed the stored results."""
    status = np.asarray(group["status"][:])
    seen = np.flatnonzero(status != _store.PENDING)
    if seen.size == 0:
        return
    picks = seen[np.unique(np.linspace(0, seen.size - 1, min(_CHECKED_ITEMS, seen.size)).round().astype(int))]
    recorded = group["digest"]
    for index in picks.tolist():
        _, error, digest = read_item(source.dataset, index)
        before = str(np.asarray(recorded[index:index + 1])[0])
        if digest != before:
            now = f"now: {error}" if not digest else "its content differs"
            raise ValueError(f"explain_dataset: item {index} ({source.ids[index]!r}) is not the item explained into "
                             f"the store {path} ({now}); the data set changed. Use another 'out', or overwrite=True "
                             f"to explain it again.")


def _make_explainer(model: nn.Module, composite: Any, beta: Any, eps: Any, audit: bool,
                    options: dict[str, Any]) -> Explainer:
    factory = getattr(model, "explainer", None)
    if callable(factory):
        return factory(beta=beta, eps=eps, composite=composite, audit=audit, **options)
    return Explainer(model, resolve_composite(model, composite, beta=beta, eps=eps), audit=audit, **options)


class _Seed:
    """The relevance put on the output, remembering the explained target and score of each image."""

    def __init__(self, model: nn.Module, target: int | None):
        self.model, self.target = model, target
        self.targets: torch.Tensor | None = None
        self.seed: torch.Tensor | None = None

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        self.targets = resolve_targets(self.model, output, self.target)
        self.seed = attribution_output(output, self.targets)
        return self.seed


def _explain_blocks(model: nn.Module, source: Source, group: Any, blocks: list[int], *, block: int, workers: int,
                    storage: str, shape: tuple[int, ...], target: int | None, composite: Any, beta: Any, eps: Any,
                    audit: bool, options: dict[str, Any], ranks: Ranks, progress: bool, dtype: torch.dtype,
                    device: torch.device) -> None:
    n = len(source.ids)
    arrays = _store.arrays_of(group)
    n_outputs = arrays["output"].shape[1]
    loader = block_loader(source.dataset, blocks, block, num_workers=workers, pin_memory=device.type == "cuda",
                          shape=shape, digests=True)
    total = sum(min(n, (b + 1) * block) - b * block for b in blocks)
    label = "explain_dataset" + (f" (rank {ranks.rank}/{ranks.world_size})" if ranks.distributed else "")
    writes: collections.deque[Future] = collections.deque()
    seed = _Seed(model, target)
    explainer = _make_explainer(model, composite, beta, eps, audit, options)
    bar = tqdm(total=total, unit="image", desc=label, disable=not progress or not ranks.is_main)
    failed = overflow = 0
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="explain_dataset-writer") as writer, \
                warnings.catch_warnings():
            warnings.simplefilter("ignore", ConservationWarning)  # recorded per image, counted once at the end
            try:
                for batch in loader:
                    start, count = batch.indices[0], len(batch.indices)
                    columns, output_rows = _empty_rows(count, n_outputs)
                    relevance_rows = np.full((count, *shape), np.nan, dtype=storage)
                    for index, digest in batch.digests.items():
                        columns["digest"][index - start] = digest
                    for index, message in batch.errors.items():
                        columns["status"][index - start] = _store.FAILED
                        columns["error"][index - start] = message
                    for indices, images in batch.groups:
                        rows = [index - start for index in indices]
                        x = images.to(device=device, dtype=dtype, non_blocking=True)
                        output, relevance = explainer(x, seed)
                        stored = _fill(columns, output_rows, rows, output, relevance, seed, explainer, audit)
                        relevance_rows[rows] = stored.to(getattr(torch, storage)).cpu().numpy()
                        overflow += int((~np.isfinite(relevance_rows[rows]).reshape(len(rows), -1).all(1)
                                         & np.isfinite(columns["relevance_sum"][rows])).sum())
                    failed += len(batch.errors)
                    while len(writes) >= 2:  # bounded memory: at most two blocks wait to be written
                        writes.popleft().result()
                    writes.append(writer.submit(_store.write_block, arrays, batch.block, start, relevance_rows,
                                                columns, output_rows))
                    bar.update(count)
                    if failed:
                        bar.set_postfix(failed=failed, refresh=False)
            finally:
                # blocks explained before an interruption are still written (and marked done)
                pending = list(writes)
                writes.clear()
        for future in pending:
            future.result()
    finally:
        bar.close()
        explainer.close()
    if overflow:
        warnings.warn(f"explain_dataset: the relevance of {overflow} image(s) does not fit {storage} (values beyond "
                      f"its range became inf); use dtype='float32'.", RuntimeWarning, stacklevel=3)


def _empty_rows(count: int, n_outputs: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    columns = {
        "status": np.zeros(count, dtype="u1"), "score": np.full(count, np.nan), "target": np.full(count, -1),
        "audit_ok": np.zeros(count, dtype=bool), "audit_relative_error": np.full(count, np.nan),
        "relevance_sum": np.full(count, np.nan), "error": np.full(count, "", dtype=object),
        "digest": np.full(count, "", dtype=object),
    }
    return columns, np.full((count, n_outputs), np.nan)


def _fill(columns: dict[str, np.ndarray], output_rows: np.ndarray, rows: list[int], output: torch.Tensor,
          relevance: torch.Tensor, seed: _Seed, explainer: Explainer, audit: bool) -> torch.Tensor:
    """Put one explained group's table values into the block's columns; returns the relevance to store."""
    m = len(rows)
    outputs = output.detach().reshape(m, -1).to(torch.float64).cpu()
    output_rows[rows] = outputs.numpy()
    columns["score"][rows] = seed.seed.detach().reshape(m, -1).to(torch.float64).sum(1).cpu().numpy()
    if seed.targets is not None:
        columns["target"][rows] = seed.targets.reshape(m).cpu().numpy()
    columns["relevance_sum"][rows] = relevance.detach().reshape(m, -1).to(torch.float64).sum(1).cpu().numpy()
    columns["status"][rows] = _store.EXPLAINED
    if audit and explainer.last_audit is not None:
        result = explainer.last_audit
        error = result.relative_error.detach().to(torch.float64).cpu().reshape(-1)
        passed = result.passed.cpu().reshape(-1)
        columns["audit_relative_error"][rows] = error.expand(m).numpy() if error.numel() == 1 else error.numpy()
        columns["audit_ok"][rows] = passed.expand(m).numpy() if passed.numel() == 1 else passed.numpy()
    return relevance.detach()


def _finish(path: Path, audit: bool) -> None:
    """Rank 0, after every rank finished: check that every block is done, write ``scores.csv`` and the summary."""
    group = _store.open_store(path, mode="r+")
    done = _store.done_blocks(group)
    if not done.all():
        missing = np.flatnonzero(~done)
        raise RuntimeError(f"explain_dataset: {missing.size} block(s) of {path} are not written (first: block "
                           f"{int(missing[0])}); run again to finish them.")
    table = _store.read_table(group)
    _store.write_csv(table, path / "scores.csv")
    failed = int((table["status"] == _store.FAILED).sum())
    audit_failed = int((table["ok"] & ~table["audit_ok"]).sum()) if audit else 0
    _store.set_attrs(group, complete=True, summary={"n": int(table.size), "explained": int(table["ok"].sum()),
                                                     "failed": failed, "audit_failed": audit_failed})
    if audit_failed:
        warnings.warn(f"explain_dataset: {audit_failed} of {int(table['ok'].sum())} explanations failed the "
                      f"conservation audit (relevance created or destroyed where no rule ran, or NaN/inf values; see "
                      f"the 'audit_ok' and 'audit_relative_error' columns of {path}).", ConservationWarning,
                      stacklevel=3)
