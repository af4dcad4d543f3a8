"""Fitting a head on a streamed data set, on one process or many: :func:`sample_locations`, :func:`fit_dataset`.

**The sample.** Every location ``l`` of image ``i`` gets a key ``u(seed, i, l)`` uniform in ``[0, 1)`` from a
counter-based generator (numpy's ``default_rng([seed, i])``): the sample is the ``max_locations`` locations of
smallest key, a uniform sample without replacement. Each rank keeps the smallest keys of its shard as it streams
(memory: ``max_locations`` rows + one batch), rank 0 merges them. Since a key depends on the image and the location
only, the sample is the same for any number of ranks, any batch size and any order.

**The head.** Rank 0 fits it on the sample (KDE: the support set; k-means: scikit-learn's k-means on the sample),
optionally refines k-means centroids by ``lloyd_steps`` Lloyd iterations over *all* locations (each a full pass:
every rank sums its locations per nearest centroid, the sums and counts are all-reduced), and broadcasts the head's
state, so that every rank explains with the same model. A head with one model per map position
(``PositionalMahalanobis``) is fitted on every location instead: each rank streams its maps into running statistics,
rank 0 merges them.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from sklearn.base import clone
from torch import nn
from tqdm.auto import tqdm

from ..core.validation import check_int
from ..models.kmeans import KMeansMembership
from ._dist import Ranks, ensure_process_group, on_rank0
from .data import block_loader, blocks_of_rank, resolve_source

__all__ = ["sample_locations", "fit_dataset"]

#: a location's position ``i · _STRIDE + l`` (image, location) orders the sample; feature maps have fewer locations
_STRIDE = 1 << 24


def sample_locations(model: nn.Module, dataset: Any, *, max_locations: int | None, seed: int = 0,
                     batch_size: int = 32, num_workers: int = 0, progress: bool = True) -> torch.Tensor:
    """A uniform random sample of the location vectors ``(rows, C)`` of ``model.features`` over ``dataset``.

    Parameters
    ----------
    model : DeepNeon
        Anything with a ``features`` module returning (n, C, h, w).
    dataset : Dataset, DataLoader or path
        As in :func:`~neon_attrib.explain_dataset` (a folder is read with the model's preprocessing). Unreadable
        items are skipped; images may differ in size.
    max_locations : int or None
        Sample size; None keeps every location (memory grows with the data set).
    seed : int
        Seed of the keys: the same seed gives the same sample for any number of ranks and any batch size.
    batch_size, num_workers : int
        Images per block and DataLoader workers per rank.
    progress : bool
        A tqdm progress bar (rank 0).

    Returns
    -------
    torch.Tensor
        (rows, C) on the CPU in the features' dtype, ordered by (image, location); the same on every rank.
    """
    ranks = ensure_process_group()
    if max_locations is not None:
        check_int(max_locations, owner="sample_locations", name="max_locations", minimum=1)
    check_int(seed, owner="sample_locations", name="seed", minimum=0)
    check_int(batch_size, owner="sample_locations", name="batch_size", minimum=1)
    features = _features(model)
    ranks.bind(_dtype_device(features)[1])
    source = _source(model, dataset)
    kept: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # keys, positions, rows
    failures: list[tuple[str, str]] = []
    for keys, positions, rows in _stream(features, source, ranks, batch_size, num_workers, progress, seed,
                                         "sample_locations", failures):
        kept = _smallest(kept, (keys, positions, rows), max_locations)
    gathered = ranks.gather((kept, failures))

    def merge() -> torch.Tensor:
        parts = [part for part, _ in gathered if part is not None]
        left_out = [failure for _, shard in gathered for failure in shard]
        if left_out:
            listed = "; ".join(f"{name}: {message}" for name, message in left_out[:3])
            more = f" and {len(left_out) - 3} more" if len(left_out) > 3 else ""
            if not parts:
                raise ValueError(f"sample_locations: none of the {len(source.ids)} items of the data set could be "
                                 f"used ({listed}{more}); nothing to sample.")
            warnings.warn(f"sample_locations: left out {len(left_out)} of {len(source.ids)} items that could not be "
                          f"used ({listed}{more}).", RuntimeWarning, stacklevel=3)
        if not parts:
            raise ValueError("sample_locations: no image of the data set could be read; nothing to sample.")
        merged = None
        for part in parts:
            merged = _smallest(merged, part, max_locations)
        keys, positions, rows = merged
        return rows[torch.argsort(positions)]

    return on_rank0(ranks, merge)


def fit_dataset(model: nn.Module, dataset: Any = None, *, max_locations: int | None = None, seed: int = 0,
                rows: torch.Tensor | None = None, lloyd_steps: int = 0, batch_size: int = 32, num_workers: int = 0,
                progress: bool = True) -> nn.Module:
    """Fit a :class:`~neon_attrib.vision.deep.DeepNeon`'s head on a streamed data set, on one or many ranks. Returns
    ``model``.

    Parameters
    ----------
    model : DeepNeon
        Its head is fitted (on every rank: call this on every rank with the same model).
    dataset : Dataset, DataLoader or path
        As in :func:`sample_locations`; optional when ``rows`` is given and ``lloyd_steps`` is 0.
    max_locations, seed, batch_size, num_workers, progress :
        As in :func:`sample_locations`.
    rows : torch.Tensor, optional
        A sample made before by :func:`sample_locations` (e.g. to choose γ from it with
        :func:`~neon_attrib.vision.deep.median_gamma`, or to fit several heads on one pass).
    lloyd_steps : int
        k-means heads only: after k-means on the sample, this many Lloyd iterations over every location of the data
        set (one pass each, all-reduced over the ranks). 0 (default): the sample's k-means.

    A head with one model per map position (``PositionalMahalanobis``, PaDiM's) is fitted on every location of the
    whole maps (``max_locations``, ``rows`` and ``lloyd_steps`` are refused): one streamed pass, running statistics
    per rank, merged on rank 0 (:meth:`~neon_attrib.models.positional.PositionalMahalanobis.merge_statistics`).

    Examples
    --------
    >>> from neon_attrib import DeepNeon, KDEOutlier
    >>> cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(4))
    >>> model = fit_dataset(DeepNeon(cnn, KDEOutlier(gamma=0.1)), torch.rand(8, 3, 16, 16), max_locations=50,
    ...                     progress=False)
    >>> model.head.support_.shape
    torch.Size([50, 4])
    """
    ranks = ensure_process_group()
    check_int(lloyd_steps, owner="fit_dataset", name="lloyd_steps", minimum=0)
    head = getattr(model, "head", None)
    if head is None or not callable(getattr(model, "fit_head", None)):
        raise TypeError(f"fit_dataset fits the head of a DeepNeon (a model with 'features', 'head' and 'fit_head'). "
                        f"Got {type(model).__name__}.")
    if getattr(head, "_fits_on_feature_maps", False):
        if max_locations is not None or rows is not None or lloyd_steps or dataset is None:
            raise ValueError(f"fit_dataset: a {type(head).__name__} head models each position of the feature map, so "
                             f"it is fitted on the whole maps of the dataset: pass the dataset, without "
                             f"max_locations, rows or lloyd_steps.")
        _fit_positional(model, _source(model, dataset), ranks, batch_size, num_workers, progress)
        return model
    if lloyd_steps and not isinstance(head, KMeansMembership):
        raise ValueError(f"The 'lloyd_steps' parameter of fit_dataset applies to k-means heads only. Got a "
                         f"{type(head).__name__} head.")
    if rows is None:
        if dataset is None:
            raise ValueError("fit_dataset needs a dataset (or rows from sample_locations).")
        rows = sample_locations(model, dataset, max_locations=max_locations, seed=seed, batch_size=batch_size,
                                num_workers=num_workers, progress=progress)
    state = on_rank0(ranks, lambda: _fit_on_rank0(model, rows))
    if lloyd_steps:
        if dataset is None:
            raise ValueError("fit_dataset: lloyd_steps needs the dataset.")
        centroids = _lloyd(model, _source(model, dataset), state["centroids"], lloyd_steps, ranks, batch_size,
                           num_workers, progress)
        state = on_rank0(ranks, lambda: _kmeans_head_on_rank0(model, rows, state["sklearn"], centroids))
    if not ranks.is_main:
        _load_head(model, state)
    return model


# ---------------------------------------------------------------------------------------------------------------------
def _features(model: nn.Module) -> nn.Module:
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Module):
        raise TypeError(f"sample_locations needs a model with a 'features' module (a DeepNeon). "
                        f"Got {type(model).__name__}.")
    return features


def _source(model: nn.Module, dataset: Any):
    preprocessing = getattr(model, "preprocessing", None)
    return resolve_source(dataset, preprocessing=preprocessing if hasattr(preprocessing, "bounds") else None,
                          owner="fit_dataset")


def _dtype_device(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype, tensor.device
    return torch.get_default_dtype(), torch.device("cpu")


def _feature_maps(features: nn.Module, source, ranks: Ranks, batch_size: int, num_workers: int, progress: bool,
                  label: str, failures: list[tuple[str, str]] | None = None):
    """``(indices, feature maps)`` per group of same-size images of this rank's shard; the items that could not be
    read are appended to ``failures`` as ``(id, message)``."""
    dtype, device = _dtype_device(features)
    n = len(source.ids)
    blocks = blocks_of_rank(n, batch_size, ranks.rank, ranks.world_size)
    loader = block_loader(source.dataset, blocks, batch_size, num_workers=num_workers,
                          pin_memory=device.type == "cuda")
    total = sum(min(n, (b + 1) * batch_size) - b * batch_size for b in blocks)
    with tqdm(total=total, unit="image", desc=label, disable=not progress or not ranks.is_main) as bar:
        for batch in loader:
            if failures is not None:
                failures.extend((source.ids[index], message) for index, message in sorted(batch.errors.items()))
            for indices, images in batch.groups:
                with torch.no_grad():
                    yield indices, features(images.to(device=device, dtype=dtype, non_blocking=True))
            bar.update(len(batch.indices))


def _stream(features: nn.Module, source, ranks: Ranks, batch_size: int, num_workers: int, progress: bool,
            seed: int | None, label: str, failures: list[tuple[str, str]] | None = None):
    """``(keys, positions, rows)`` per group of images of this rank's shard (keys None without a seed)."""
    for indices, fmap in _feature_maps(features, source, ranks, batch_size, num_workers, progress, label,
                                       failures):
        locations = fmap.shape[-2] * fmap.shape[-1]
        rows = fmap.permute(0, 2, 3, 1).reshape(-1, fmap.shape[1]).cpu()
        positions = torch.as_tensor([i * _STRIDE + l for i in indices for l in range(locations)], dtype=torch.int64)
        keys = None
        if seed is not None:
            keys = torch.from_numpy(np.concatenate([np.random.default_rng([seed, i]).random(locations)
                                                    for i in indices]))
        yield keys, positions, rows


def _fit_positional(model: nn.Module, source, ranks: Ranks, batch_size: int, num_workers: int,
                    progress: bool) -> None:
    """A head with one model per map position (PositionalMahalanobis) on every location of the dataset: each rank
    streams its shard's maps into running statistics, rank 0 merges them (Chan et al.'s update, float64), fits the
    Gaussians and gives every rank the head. A failure on any rank raises on every rank."""
    dtype, device = _dtype_device(model.features)
    local = clone(model.head).to(dtype=dtype, device=device)  # unfitted, the same hyperparameters
    locations = 0
    try:
        for _, fmap in _feature_maps(model.features, source, ranks, batch_size, num_workers, progress,
                                     "fit_dataset: feature maps"):
            local.partial_fit(fmap, finalize=False)
            locations += fmap.shape[0] * fmap.shape[2] * fmap.shape[3]
        # other ranks' statistics travel pickled through the CPU; one process keeps them where they are
        outcome: tuple[str, Any] = ("ok", (local.cpu() if ranks.distributed else local, locations))
    except Exception as exc:  # every rank must learn of it: reported through rank 0
        if not ranks.distributed:
            raise
        outcome = ("error", (type(exc).__name__, f"rank {ranks.rank}: {exc}"))
    parts = ranks.gather(outcome)

    def merge() -> dict[str, Any]:
        errors = [detail for kind, detail in parts if kind == "error"]
        if errors:
            name, message = errors[0]
            raise (ValueError if name == "ValueError" else TypeError if name == "TypeError" else RuntimeError)(
                message)
        head = clone(model.head).to(dtype=dtype, device=device)
        for _, (shard, _) in parts:
            head.merge_statistics(shard)
        if head.moments.empty:
            raise ValueError("fit_dataset got no images.")
        model.head = head.finalize()
        model.n_locations_fit_ = sum(count for _, (_, count) in parts)
        model.n_channels_ = int(head.n_features_in_)
        return _head_state(model)

    state = on_rank0(ranks, merge)
    if not ranks.is_main:
        _load_head(model, state)


def _smallest(kept, new, limit: int | None):
    """The ``limit`` entries of smallest key among ``kept`` and ``new`` (all of them without a limit)."""
    if kept is None:
        keys, positions, rows = new
    else:
        keys, positions, rows = (torch.cat([a, b]) for a, b in zip(kept, new))
    if limit is not None and keys.shape[0] > limit:
        # ties (probability ~0) are broken by position, so the result never depends on the order of arrival
        order = np.lexsort((positions.numpy(), keys.numpy()))[:limit]
        order = torch.from_numpy(np.sort(order))
        keys, positions, rows = keys[order], positions[order], rows[order]
    return keys, positions, rows


def _fit_on_rank0(model: nn.Module, rows: torch.Tensor) -> dict[str, Any]:
    """Fit the head on the sample; returns what the other ranks need (the head's state; k-means' centroids)."""
    head = model.head
    if isinstance(head, KMeansMembership):
        from sklearn.cluster import KMeans

        data = rows.detach().cpu().double().numpy()
        if data.shape[0] < head.n_clusters:
            raise ValueError(f"fit_dataset: {data.shape[0]} sampled locations for {head.n_clusters} clusters.")
        kmeans = KMeans(n_clusters=head.n_clusters, n_init=head.n_init, max_iter=head.max_iter,
                        random_state=head._random_state()).fit(data)
        _set_kmeans_head(model, rows, kmeans)
        return {"centroids": torch.as_tensor(kmeans.cluster_centers_), "sklearn": kmeans, **_head_state(model)}
    model.fit_head(rows)
    return _head_state(model)


def _set_kmeans_head(model: nn.Module, rows: torch.Tensor, kmeans: Any) -> None:
    """Make ``model.head`` the KMeansMembership of the fitted scikit-learn ``kmeans`` (the head's settings kept)."""
    head = model.head
    dtype, device = _dtype_device(model.features)
    fitted = type(head).from_sklearn(kmeans, X=rows.detach().cpu().double(), max_iter=head.max_iter,
                                     centroid_norm=head.centroid_norm, beta=head.beta)
    model.head = fitted.to(dtype=dtype, device=device)
    model.n_locations_fit_ = int(rows.shape[0])
    model.n_channels_ = int(rows.shape[1])


def _kmeans_head_on_rank0(model: nn.Module, rows: torch.Tensor, kmeans: Any, centroids: torch.Tensor):
    kmeans.cluster_centers_ = centroids.double().numpy()
    kmeans.labels_ = None
    _set_kmeans_head(model, rows, kmeans)
    return _head_state(model)


def _head_state(model: nn.Module) -> dict[str, Any]:
    state = {key: value.detach().cpu() if isinstance(value, torch.Tensor) else value
             for key, value in model.head.state_dict().items()}
    return {"head": state, "n_locations_fit_": model.n_locations_fit_, "n_channels_": model.n_channels_}


def _load_head(model: nn.Module, state: dict[str, Any]) -> None:
    dtype, device = _dtype_device(model.features)
    model.head.load_state_dict(state["head"])
    model.head.to(dtype=dtype, device=device)
    model.n_locations_fit_ = state["n_locations_fit_"]
    model.n_channels_ = state["n_channels_"]


def _lloyd(model: nn.Module, source, centroids: torch.Tensor, steps: int, ranks: Ranks, batch_size: int,
           num_workers: int, progress: bool) -> torch.Tensor:
    """``steps`` Lloyd iterations over every location, sums and counts all-reduced in float64."""
    centroids = centroids.double()
    for step in range(steps):
        sums = torch.zeros_like(centroids)
        counts = torch.zeros(centroids.shape[0], dtype=torch.float64)
        for _, _, rows in _stream(model.features, source, ranks, batch_size, num_workers, progress, None,
                                  f"fit_dataset: Lloyd step {step + 1}/{steps}"):
            rows = rows.double()
            nearest = torch.cdist(rows, centroids).argmin(1)
            sums.index_add_(0, nearest, rows)
            counts += torch.bincount(nearest, minlength=centroids.shape[0]).double()
        sums, counts = ranks.all_reduce_sum(sums), ranks.all_reduce_sum(counts)
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centroids)
    return centroids
