"""The result store of a data-set run: one zarr group (a folder), written block by block by any number of ranks.

==========================  =====================  ===========================================================
array                       shape, dtype           chunks / written by
==========================  =====================  ===========================================================
``relevance``               (n, C, H, W) f2 / f4   one image per chunk; NaN where an image failed or is pending
``id``                      (n,) str               at creation, by rank 0
``status``                  (n,) u1                0 pending, 1 explained, 2 failed (see ``error``)
``score``                   (n,) f8                the explained score (the relevance put on the output)
``output``                  (n, K) f8              the model output (K = 1 for scalar heads, clusters for k-means)
``target``                  (n,) i8                the explained output index (-1 for scalar heads)
``audit_ok``                (n,) bool              the conservation audit passed (:class:`~neon_attrib.Audit`)
``audit_relative_error``    (n,) f8                the audit's relative mismatch (NaN without audit)
``relevance_sum``           (n,) f8                Σ relevance, before rounding to the store's dtype
``error``                   (n,) str               why an image failed ('' otherwise)
``digest``                  (n,) str               the content digest of the image as explained ('' if unreadable)
``done``                    (n_blocks,) u1         1 once a block is completely written; one chunk per block
==========================  =====================  ===========================================================

The table arrays are chunked by block (``batch_size`` rows), so every block is written by one rank into chunks of its
own, and ``done[b]`` is written last: a run killed at any point leaves only whole blocks marked done, and a later run
redoes the rest. zarr writes each chunk file atomically (a temporary file renamed). The group's attributes hold the
settings (refused when they differ), the data source, ``complete`` and a summary; rank 0 writes ``scores.csv`` beside
the arrays (one row per image, in index order) when every block is done.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from .data import update_digest

__all__ = ["FORMAT", "TABLE_COLUMNS", "create_store", "open_store", "check_settings", "write_block", "read_table",
           "write_csv", "model_fingerprint", "is_store", "arrays_of", "done_blocks", "set_attrs",
           "get_attrs"]

#: identifies our stores and their layout version
FORMAT = "neon_attrib.explain_dataset/1"

PENDING, EXPLAINED, FAILED = 0, 1, 2

#: the 1-D table arrays besides ``output``, and their dtypes
TABLE_COLUMNS: dict[str, Any] = {
    "status": "u1", "score": "f8", "target": "i8", "audit_ok": "bool", "audit_relative_error": "f8",
    "relevance_sum": "f8", "error": str, "digest": str,
}
_FILLS = {"status": PENDING, "score": math.nan, "target": -1, "audit_ok": False, "audit_relative_error": math.nan,
          "relevance_sum": math.nan, "error": "", "digest": ""}
_ATTRS = "neon_attrib"


# ---------------------------------------------------------------------------------------------------------------------
# zarr 2 and 3
def _create_array(group: Any, name: str, *, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: Any,
                  fill_value: Any) -> Any:
    if hasattr(group, "create_array"):  # zarr >= 3
        return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill_value)
    extra: dict[str, Any] = {}
    if dtype is str:  # zarr 2: variable-length strings are object arrays with a codec
        import numcodecs

        dtype, extra["object_codec"] = object, numcodecs.VLenUTF8()
    return group.create_dataset(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill_value, **extra)


def is_store(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a zarr group (v3 ``zarr.json`` or v2 ``.zgroup``)."""
    path = Path(path)
    return (path / "zarr.json").is_file() or (path / ".zgroup").is_file()


def _attrs(group: Any) -> dict[str, Any]:
    return dict(group.attrs.get(_ATTRS) or {})


def set_attrs(group: Any, **values: Any) -> None:
    """Update our attributes of the group (rank 0 only)."""
    group.attrs[_ATTRS] = {**_attrs(group), **_jsonable(values)}


def get_attrs(group: Any) -> dict[str, Any]:
    return _attrs(group)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# ---------------------------------------------------------------------------------------------------------------------
# settings
def model_fingerprint(model: torch.nn.Module) -> str:
    """A digest of everything in ``model`` that decides its explanations: the classes and scalar attributes of every
    submodule (hyperparameters such as a head's γ or DeepNeon's ``lrp_gamma``), tensor attributes (e.g. ZBox bounds),
    and every entry of the state dict (weights, buffers, extra state), byte for byte."""
    digest = hashlib.sha256()
    for name, module in model.named_modules():
        digest.update(f"{name}:{type(module).__module__}.{type(module).__qualname__}".encode())
        for key, value in sorted(vars(module).items()):
            if key.startswith("_"):
                continue
            if isinstance(value, torch.Tensor):
                _update_tensor(digest, key, value)
            elif isinstance(value, (bool, int, float, str, type(None))) or (
                    isinstance(value, tuple) and all(isinstance(v, (bool, int, float, str)) for v in value)):
                digest.update(f"{key}={value!r}".encode())
            elif hasattr(value, "name") and isinstance(value.name, str):  # e.g. Preprocessing
                digest.update(f"{key}={_no_addresses(repr(value))}".encode())
    for key, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            _update_tensor(digest, key, value)
        else:
            digest.update(f"{key}={_no_addresses(repr(value))}".encode())
    return digest.hexdigest()


def _update_tensor(digest: Any, key: str, tensor: torch.Tensor) -> None:
    digest.update(f"{key}:".encode())
    update_digest(digest, tensor)


def _no_addresses(text: str) -> str:
    return re.sub(r"0x[0-9a-fA-F]+", "0x", text)


def check_settings(path: Path, stored: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Raise a ValueError naming what differs when a store was written with other settings."""
    wanted = _jsonable(wanted)
    if stored == wanted:
        return
    lines = []
    for key in sorted(set(stored) | set(wanted)):
        if stored.get(key) != wanted.get(key):
            if key in ("model", "ids_sha256", "data_sha256"):
                what = {"model": "the model (weights, head or hyperparameters)",
                        "ids_sha256": "the image ids (another data set or order)",
                        "data_sha256": "the data (the tensors' contents, or the files' sizes or modification "
                                       "times)"}[key]
                lines.append(f"{key}: {what} differ")
            else:
                lines.append(f"{key}: {_short(stored.get(key))} in the store, {_short(wanted.get(key))} now")
    raise ValueError(f"The store {path} was written with other settings; refusing to mix results. Differences: "
                     f"{'; '.join(lines)}. Use another 'out', or overwrite=True to start this store over.")


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ---------------------------------------------------------------------------------------------------------------------
# creating and opening
def create_store(path: Path, *, settings: dict[str, Any], source: dict[str, Any], ids: list[str],
                 shape: tuple[int, ...], dtype: str, n_outputs: int, block: int) -> Any:
    """Create the group and every array (rank 0); replaces whatever ``path`` held."""
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    group = zarr.open_group(str(path), mode="w")
    n = len(ids)
    _create_array(group, "relevance", shape=(n, *shape), chunks=(1, *shape), dtype=dtype, fill_value=math.nan)
    id_array = _create_array(group, "id", shape=(n,), chunks=(max(1, min(n, 65536)),), dtype=str, fill_value="")
    id_array[:] = np.asarray(ids, dtype=object if not hasattr(group, "create_array") else str)
    for name, column_dtype in TABLE_COLUMNS.items():
        _create_array(group, name, shape=(n,), chunks=(block,), dtype=column_dtype, fill_value=_FILLS[name])
    _create_array(group, "output", shape=(n, n_outputs), chunks=(block, n_outputs), dtype="f8", fill_value=math.nan)
    blocks = math.ceil(n / block)
    _create_array(group, "done", shape=(blocks,), chunks=(1,), dtype="u1", fill_value=0)
    group.attrs[_ATTRS] = _jsonable({"format": FORMAT, "settings": settings, "source": source, "complete": False})
    return group


def open_store(path: str | os.PathLike, mode: str = "r") -> Any:
    """Open a store written by :func:`~neon_attrib.explain_dataset`; a ValueError if ``path`` is not one."""
    path = Path(path)
    if not is_store(path):
        raise FileNotFoundError(f"No explain_dataset store at {path} (no zarr group there).")
    group = zarr.open_group(str(path), mode=mode)
    if _attrs(group).get("format") != FORMAT:
        raise ValueError(f"{path} is a zarr group, but not a store written by neon_attrib.explain_dataset "
                         f"(format {_attrs(group).get('format')!r}, expected {FORMAT!r}).")
    return group


def done_blocks(group: Any) -> np.ndarray:
    """(n_blocks,) bool: which blocks are completely written."""
    return np.asarray(group["done"][:]).astype(bool)


# ---------------------------------------------------------------------------------------------------------------------
# writing and reading rows
def arrays_of(group: Any) -> dict[str, Any]:
    """The group's arrays by name, opened once (each lookup reads metadata)."""
    return {name: group[name] for name in ("relevance", "output", "done", *TABLE_COLUMNS)}


def write_block(arrays: dict[str, Any], block: int, start: int, relevance: np.ndarray,
                columns: dict[str, np.ndarray], output: np.ndarray) -> None:
    """Write one block (rows ``start:start + len(relevance)``), then mark it done."""
    stop = start + relevance.shape[0]
    arrays["relevance"][start:stop] = relevance
    for name, values in columns.items():
        arrays[name][start:stop] = values
    arrays["output"][start:stop] = output
    arrays["done"][block:block + 1] = np.ones(1, dtype="u1")


def read_table(group: Any) -> np.ndarray:
    """The whole table as a numpy structured array, in index order (see the module docstring for the fields)."""
    ids = [str(i) for i in np.asarray(group["id"][:]).tolist()]
    errors = [str(e) for e in np.asarray(group["error"][:]).tolist()]
    output = np.asarray(group["output"][:], dtype=np.float64)
    n = len(ids)
    id_width = max([1, *map(len, ids)])
    error_width = max([1, *map(len, errors)])
    dtype = [("index", "i8"), ("id", f"U{id_width}"), ("status", "u1"), ("ok", "bool"), ("score", "f8"),
             ("target", "i8"), ("audit_ok", "bool"), ("audit_relative_error", "f8"), ("relevance_sum", "f8"),
             ("output", "f8", (output.shape[1],)), ("error", f"U{error_width}")]
    table = np.zeros(n, dtype=dtype)
    table["index"] = np.arange(n)
    table["id"] = ids
    table["error"] = errors
    table["output"] = output
    for name in ("status", "score", "target", "audit_ok", "audit_relative_error", "relevance_sum"):
        table[name] = np.asarray(group[name][:])
    table["ok"] = table["status"] == EXPLAINED
    return table


def write_csv(table: np.ndarray, path: Path) -> None:
    """``scores.csv``: one row per image; outputs as ``output_0``... (written to a temporary file, then renamed)."""
    n_outputs = table.dtype["output"].shape[0] if table.dtype["output"].shape else 1
    names = ["index", "id", "status", "score", "target", "audit_ok", "audit_relative_error", "relevance_sum"]
    header = names + [f"output_{k}" for k in range(n_outputs)] + ["error"]
    status = {PENDING: "pending", EXPLAINED: "ok", FAILED: "failed"}
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for row in table:
            values = [int(row["index"]), str(row["id"]), status[int(row["status"])], _num(row["score"]),
                      int(row["target"]), int(bool(row["audit_ok"])), _num(row["audit_relative_error"]),
                      _num(row["relevance_sum"])]
            values += [_num(v) for v in np.atleast_1d(row["output"])]
            writer.writerow(values + [str(row["error"])])
    os.replace(temporary, path)


def _num(value: Any) -> str:
    value = float(value)
    return repr(value) if math.isfinite(value) else ""
