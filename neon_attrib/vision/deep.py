"""NEON heads on CNN feature maps: :class:`DeepNeon`.

A head (:class:`~neon_attrib.models.KDEOutlier`, :class:`~neon_attrib.models.KDEInlier` or
:class:`~neon_attrib.models.KMeansMembership`) sits on the output ``A ∈ R^{n×C×H×W}`` of a feature extractor (VGG-16
``features``, i.e. the output of block 5) and treats every spatial location as one data point: the rows
``(n·H·W, C)``. Location scores are pooled into one score per image by a :class:`~neon_attrib.core.layers.LocationPool`.
Explaining it::

    pixels ◄── Zennit LRP (EpsilonGammaBox / EpsilonPlusFlat) ◄── A ◄── head's activation rule ◄── pool rule ◄── score

* the pool rule (:class:`~neon_attrib.core.rules.LocationPoolRule`) gives location ``l`` its share ``s_l / Σ_l' s_l' ·
R``
  of the score (not the gradient, which would hand every location the whole ``R``);
* the head's *activation* rule (:class:`~neon_attrib.core.rules.KDEOutlierActivationRule` etc.) hands each location's
  relevance to its active channels only (``a_i = 0`` receives exactly 0);
* standard LRP rules carry the relevance from block 5 down to the pixels, ZBox on the first convolution with the input
  bounds of the preprocessing (:class:`~neon_attrib.vision.Preprocessing`).

Preprocessing, backbones and image files live in :mod:`neon_attrib.vision`, the leave-one-out heads of
:meth:`DeepNeon.fit_self` in :mod:`neon_attrib.models.leave_one_out`; their names are importable from here too.

Examples
--------
>>> from neon_attrib import KDEOutlier, explain
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> model = DeepNeon(vgg16_features(), KDEOutlier(gamma=1e-3), preprocessing="torchvision")
>>> images = torch.randn(4, 3, 64, 64)
>>> model = model.fit(images, progress=False)
>>> model(images).shape, model.location_scores(images).shape
(torch.Size([4]), torch.Size([4, 2, 2]))
>>> explain(model, images[:1]).shape
torch.Size([1, 3, 64, 64])
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from sklearn.base import clone
from torch import nn
from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat
from zennit.core import Composite
from zennit.rules import Pass

from ..core.composites import NeonComposite, is_neon_module, register_activation_children
from ..core.layers import LocationPool, PoolMode
from ..core.rules import LeaveOneOutKDEInlierRule, LeaveOneOutKDEOutlierRule, LocationPoolRule
from ..core.validation import BATCH_NORMS, ArrayLike, as_float_tensor, check_int, module_dtype_device
from ..models import KDEInlier, KDEOutlier
from ..models.leave_one_out import LeaveOneOutKDEInlier, LeaveOneOutKDEOutlier
from ..pipeline.engine import Audit, Explainer, resolve_composite, run
from ..pipeline.graph import GraphCanonizer, register_trusted_container
from . import (
    IMAGE_SUFFIXES,
    PREPROCESSINGS,
    VGG16_MIN_SIZE,
    Preprocessing,
    check_image_size,
    default_canonizers,
    get_preprocessing,
    load_image,
    vgg16_features,
    weights_preprocessing,
)
from .fast import FastEpsilonGammaBox, FastEpsilonPlusFlat

__all__ = [
    "DeepNeon",
    "DeepRelevance",
    "median_gamma",
    # defined in neon_attrib.core.layers, .rules, .leave_one_out and .vision; importable from here too
    "LocationPool",
    "LocationPoolRule",
    "LeaveOneOutKDEOutlier",
    "LeaveOneOutKDEOutlierRule",
    "LeaveOneOutKDEInlier",
    "LeaveOneOutKDEInlierRule",
    "Preprocessing",
    "PREPROCESSINGS",
    "get_preprocessing",
    "vgg16_features",
    "weights_preprocessing",
    "load_image",
    "check_image_size",
    "VGG16_MIN_SIZE",
]

_COMPOSITES = ("epsilon_gamma_box", "epsilon_plus_flat")
_IMAGE_SUFFIXES = IMAGE_SUFFIXES


def _plain(value: Any) -> Any:
    """Tuples as lists, so that settings compare equal after a round trip through a file."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def median_gamma(rows: torch.Tensor, max_rows: int = 2000, seed: int = 0) -> float:
    """A kernel sharpness matched to the data: ``γ = 1 / median ‖a − a'‖²`` over pairs of distinct rows.

    The scale of CNN features depends on the weights and the preprocessing (VGG-16 block-5 locations of the Keras
    weights with caffe inputs have squared distances of 10³–10⁴, where the book's γ = 0.05 turns the KDE into a hard
    nearest-neighbour distance and random features into noise). At most ``max_rows`` rows, drawn with ``seed``, are
    compared.

    Examples
    --------
    >>> median_gamma(torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]]))  # squared distances 25, 25, 100
    0.04
    """
    if rows.ndim != 2 or rows.shape[0] < 2:
        raise ValueError(f"median_gamma needs at least 2 rows (n, d). Got shape {tuple(rows.shape)}.")
    if rows.shape[0] > max_rows:
        rows = rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))[:max_rows]]
    rows = rows.detach().cpu().double()
    distances = torch.cdist(rows, rows).pow(2)
    positive = distances[distances > 0]
    if positive.numel() == 0:
        raise ValueError("median_gamma: all rows are identical; there is no scale to match.")
    return float(1.0 / positive.median())


@dataclass
class DeepRelevance:
    """Relevance at every stage of a :class:`DeepNeon` explanation (:meth:`DeepNeon.relevance`).

    Attributes
    ----------
    pixels : torch.Tensor or None
        (n, 3, H, W): relevance of the input (what :func:`~neon_attrib.explain` returns); None with
        ``to_pixels=False``.
    features : torch.Tensor
        (n, C, h, w): relevance arriving at the feature map (block 5), from the head's CNN rule.
    locations : torch.Tensor
        (n, h, w): relevance of each location's score (the pool rule's shares).
    output : torch.Tensor
        (n,) or (n, K): the model output.
    target : torch.Tensor or None
        (n,) the explained output index (k-means), None for scalar heads.
    audit : Audit or None
        The conservation audit of the explanation (:class:`~neon_attrib.pipeline.Audit`): between the score and the
        pixels, or the feature map with ``to_pixels=False``.
    """

    pixels: torch.Tensor | None
    features: torch.Tensor
    locations: torch.Tensor
    output: torch.Tensor
    target: torch.Tensor | None
    audit: Audit | None = None


class DeepNeon(nn.Module):
    """A NEON head on a CNN's feature map: every spatial location is one data point.

    ``model(images)`` runs ``features`` to a map (n, C, h, w), scores its rows (n·h·w, C) with ``head`` and pools the
    location scores into the image score: (n,) for KDE heads, (n, K) for k-means (one evidence per cluster).
    :func:`~neon_attrib.explain` then gives pixel relevance through :meth:`neon_composite` and :meth:`default_target`.

    Parameters
    ----------
    features : torch.nn.Module
        Feature extractor returning (n, C, h, w) with ``C`` = the head's feature count, non-negative (after a ReLU
        or max pool: the head's CNN rules give relevance to active channels only). E.g. :func:`vgg16_features`.
    head : KDEOutlier, KDEInlier or KMeansMembership
        Unfitted (fit it with :meth:`fit`) or fitted on location vectors of ``C`` channels.
    pool : {"sum", "mean", "positive", "max"}
        Location pooling (:class:`LocationPool`); the default is the sum. ``"positive"`` suits k-means.
    preprocessing : str or Preprocessing
        How the inputs were made (:data:`PREPROCESSINGS`): sets the ZBox bounds of the first convolution.
        ``"torchvision"`` (default) for torchvision's weights, ``"caffe"`` for the Keras/Caffe weights.
    low, high : float or torch.Tensor, optional
        Explicit input bounds (broadcastable to the input, e.g. (1, 3, 1, 1)) instead of the preprocessing's; for your
        own CNN.
    composite : {"epsilon_gamma_box", "epsilon_plus_flat"} or zennit.core.Composite
        LRP rules for the feature extractor: Zennit's ``EpsilonGammaBox(low, high, gamma=lrp_gamma)`` (default: ZBox on
        the first convolution, gamma on the others) or ``EpsilonPlusFlat`` (flat first layer, z+ on the others), or
        any Zennit composite.
    lrp_gamma : float
        γ of the gamma rule in ``EpsilonGammaBox`` (Zennit's default 0.25).
    fast : bool
        Use the fast exact equivalents of :mod:`neon_attrib.vision.fast` (``FastEpsilonGammaBox``,
        ``FastEpsilonPlusFlat``)
        for the named composites (default): the same numbers as Zennit's rules (checked at run time, with a fallback
        to the general formula) at about 4-5x their speed. ``fast=False`` runs Zennit's own rule implementations: the
        reference path. Ignored when ``composite`` is a Composite instance.

    Notes
    -----
    For large support sets give the head ``KDEOutlier(gamma, fused=True)``: the score and its gradient in one chunked
    pass over the support set, no (rows, N) matrix, so N = 10^6 support locations fit in bounded memory. The CNN rule
    takes the soft-argmin weights from that gradient (β = γ, the default), so an explanation makes one pass over the
    support set in all. (Captum's ``LRP``, which hooks leaf layers, needs the layered forward: use
    :class:`~neon_attrib.integrations.captum.NeonLRP` for fused heads.)

    Attributes
    ----------
    n_locations_fit_ : int
        Number of location vectors the head was fitted on.
    n_channels_ : int
        Channels ``C`` of the feature map.

    Examples
    --------
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = DeepNeon(vgg16_features(), KMeansMembership(n_clusters=2, n_init=1, random_state=0), pool="positive")
    >>> images = torch.randn(3, 3, 64, 64)
    >>> model.fit(images, progress=False).location_scores(images).shape
    torch.Size([3, 2, 2, 2])
    """

    def __init__(self, features: nn.Module, head: nn.Module, pool: PoolMode | LocationPool = "sum", *,
                 preprocessing: str | Preprocessing = "torchvision", low: Any = None, high: Any = None,
                 composite: str | Composite = "epsilon_gamma_box", lrp_gamma: float = 0.25, fast: bool = True):
        super().__init__()
        if not isinstance(features, nn.Module):
            raise TypeError(f"The 'features' parameter of DeepNeon must be a torch.nn.Module. Got {type(features)}.")
        if not (isinstance(head, nn.Module) and is_neon_module(head) and callable(getattr(head, "fit", None))):
            raise TypeError(f"The 'head' parameter of DeepNeon must be a NEON estimator with a registered rule "
                            f"(KDEOutlier, KDEInlier, KMeansMembership, ...). Got {type(head).__name__}.")
        if isinstance(composite, str) and composite not in _COMPOSITES:
            raise ValueError(f"The 'composite' parameter of DeepNeon must be one of {_COMPOSITES} or a zennit "
                             f"Composite. Got {composite!r} instead.")
        if not isinstance(composite, (str, Composite)):
            raise TypeError(f"The 'composite' parameter of DeepNeon must be a name or a zennit Composite. "
                            f"Got {type(composite).__name__}.")
        if (low is None) != (high is None):
            raise ValueError("Pass both 'low' and 'high' to DeepNeon, or neither (then the preprocessing's are used).")
        if low is not None:
            low, high = _check_bounds(low, high)
        if isinstance(lrp_gamma, bool) or not isinstance(lrp_gamma, (int, float)) or not math.isfinite(lrp_gamma) \
                or lrp_gamma < 0:
            raise ValueError(f"The 'lrp_gamma' parameter of DeepNeon must be a finite float >= 0. Got {lrp_gamma!r}.")
        self.features = features
        self.head = head
        self.pool = pool if isinstance(pool, LocationPool) else LocationPool(pool)
        self.preprocessing = get_preprocessing(preprocessing)
        self.low, self.high = low, high
        self.composite = composite
        self.lrp_gamma = lrp_gamma
        self.fast = fast
        self.n_locations_fit_: int | None = None
        self.n_channels_: int | None = getattr(head, "n_features_in_", None)
        self.eval()

    # -- state dict ------------------------------------------------------------------------------------------------
    def saved_settings(self) -> dict[str, Any]:
        """The settings that decide this model's outputs and explanations besides its tensors: saved in
        ``state_dict()['_extra_state']`` and compared on ``load_state_dict`` (a state is refused by a model built
        with other settings). Subclasses add theirs (PatchCore: ``aggregate``, ``sigma``, ``reweight``, ...)."""
        composite = self.composite if isinstance(self.composite, str) else type(self.composite).__qualname__
        prep = self.preprocessing
        bounds = None if self.low is None else [torch.as_tensor(self.low).tolist(), torch.as_tensor(self.high).tolist()]
        return {"pool": getattr(self.pool, "mode", None), "composite": composite, "lrp_gamma": float(self.lrp_gamma),
                "preprocessing": {"name": prep.name, "mean": [float(v) for v in prep.mean],
                                  "std": [float(v) for v in prep.std], "bgr": bool(prep.bgr)},
                "bounds": bounds}

    def get_extra_state(self) -> dict[str, Any]:
        return {"class": type(self).__name__, "settings": self.saved_settings(),
                "n_locations_fit_": self.n_locations_fit_, "n_channels_": self.n_channels_}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        name = type(self).__name__
        if not isinstance(state, dict) or "settings" not in state:
            raise ValueError(f"Cannot load this state into a {name}: its '_extra_state' holds no settings.")
        if state.get("class", name) != name:
            raise ValueError(f"Cannot load the state of a {state['class']} into a {name}.")
        mine = self.saved_settings()
        differ = [key for key in sorted(set(mine) | set(state["settings"]))
                  if _plain(state["settings"].get(key)) != _plain(mine.get(key))]
        if differ:
            listed = "; ".join(f"{key}={state['settings'].get(key)!r} in the state, {mine.get(key)!r} here"
                               for key in differ)
            raise ValueError(f"Cannot load this state into this {name}: it was saved by a {name} built with other "
                             f"settings, which would change its outputs ({listed}). Build the {name} with the saved "
                             f"settings.")
        self.n_locations_fit_ = state.get("n_locations_fit_")
        self.n_channels_ = state.get("n_channels_")

    def load_state_dict(self, state_dict: Any, strict: bool = True, **kwargs: Any) -> Any:
        if strict and "_extra_state" not in state_dict:
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}: the state has no "
                               f"'_extra_state' (the settings it was saved with, which neon_attrib checks on load; a "
                               f"state saved by an older version has none): build the {type(self).__name__} with the "
                               f"settings it was saved with and load the state with strict=False.")
        return super().load_state_dict(state_dict, strict=strict, **kwargs)

    # -- forward ---------------------------------------------------------------------------------------------------
    def _feature_map(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"DeepNeon expects a batch of images (n, channels, H, W). Got {shape}.")
        fmap = self.features(images)
        if not isinstance(fmap, torch.Tensor) or fmap.ndim != 4:
            raise ValueError(f"DeepNeon's features must return a feature map (n, C, h, w). Got "
                             f"{tuple(fmap.shape) if isinstance(fmap, torch.Tensor) else type(fmap).__name__}.")
        return fmap

    @staticmethod
    def _rows(fmap: torch.Tensor) -> torch.Tensor:
        """(n, C, h, w) -> (n·h·w, C), location-major per image (row ``i·h·w + y·w + x``)."""
        return fmap.permute(0, 2, 3, 1).reshape(-1, fmap.shape[1])

    def _scores(self, fmap: torch.Tensor) -> torch.Tensor:
        """Location scores (n, L) for KDE heads, (n, K, L) for k-means."""
        n, _, h, w = fmap.shape
        check_map_shape = getattr(self.head, "check_map_shape", None)
        if check_map_shape is not None:  # heads with one model per position: rows alone cannot tell the map shape
            check_map_shape((h, w))
        rows = self._rows(fmap)
        if torch.is_autocast_enabled(rows.device.type):
            # reduced-precision features (autocast): the head runs in its own precision, outside autocast, since its
            # log-sum-exp and distance differences lose everything in bfloat16
            head_dtype, _ = module_dtype_device(self.head)
            with torch.autocast(rows.device.type, enabled=False):
                scores = self.head(rows.to(head_dtype))
        else:
            scores = self.head(rows)
        if scores.ndim == 1:
            return scores.reshape(n, h * w)
        return scores.reshape(n, h * w, scores.shape[-1]).transpose(1, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Image scores: (n,) for KDE heads, (n, K) cluster evidences for k-means."""
        return self.pool(self._scores(self._feature_map(images)))

    @torch.no_grad()
    def location_scores(self, images: torch.Tensor) -> torch.Tensor:
        """Per-location scores: (n, h, w) for KDE heads, (n, K, h, w) for k-means."""
        fmap = self._feature_map(images)
        scores = self._scores(fmap)
        return scores.reshape(*scores.shape[:-1], *fmap.shape[-2:])

    def default_target(self, output: torch.Tensor) -> torch.Tensor:
        """The output :func:`~neon_attrib.explain` explains when none is given: the cluster of highest pooled score."""
        return output.argmax(-1)

    # -- fitting ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def feature_rows(self, images: Any, *, batch_size: int = 32, max_locations: int | None = None, seed: int = 0,
                     progress: bool = True) -> torch.Tensor:
        """The location vectors (rows, C) of ``images`` (see :meth:`fit`), on the CPU, in the features' dtype."""
        if max_locations is not None:
            check_int(max_locations, owner="DeepNeon", name="max_locations", minimum=1)
        check_int(batch_size, owner="DeepNeon", name="batch_size", minimum=1)
        check_int(seed, owner="DeepNeon", name="seed", minimum=0)
        from tqdm.auto import tqdm

        dtype, device = _features_dtype_device(self.features)
        generator = torch.Generator().manual_seed(int(seed))
        kept_rows: torch.Tensor | None = None
        kept_keys: torch.Tensor | None = None
        total = _batch_count(images, batch_size)
        for batch in tqdm(_iter_batches(images, batch_size), total=total, desc="DeepNeon.fit: features",
                          unit="batch", disable=not progress):
            rows = self._rows(self._feature_map(batch.to(device=device, dtype=dtype))).cpu()
            if max_locations is None:
                kept_rows = rows if kept_rows is None else torch.cat([kept_rows, rows])
                continue
            # uniform sample without replacement, streamed: keep the rows with the smallest random keys
            keys = torch.rand(rows.shape[0], generator=generator, dtype=torch.float64)
            kept_rows = rows if kept_rows is None else torch.cat([kept_rows, rows])
            kept_keys = keys if kept_keys is None else torch.cat([kept_keys, keys])
            if kept_rows.shape[0] > max_locations:
                order = torch.topk(kept_keys, max_locations, largest=False).indices.sort().values
                kept_rows, kept_keys = kept_rows[order], kept_keys[order]
        if kept_rows is None:
            raise ValueError("DeepNeon.fit got no images (an empty tensor or iterable).")
        return kept_rows

    def fit(self, images: Any, y: Any = None, *, max_locations: int | None = None, seed: int = 0,
            batch_size: int = 32, progress: bool = True) -> DeepNeon:
        """Fit the head on the location vectors of ``images``. Returns ``self``.

        Parameters
        ----------
        images : torch.Tensor or iterable
            Network inputs (already preprocessed), either one tensor (n, 3, H, W) (sent through ``features`` in
            batches of ``batch_size``) or an iterable of batches, e.g. a ``DataLoader``, yielding tensors or
            ``(images, labels)`` pairs. Batches may differ in size (H, W). ``features`` runs under ``torch.no_grad()``.
        y : ignored
        max_locations : int, optional
            Fit on a uniform random sample of this many location vectors (without replacement, streamed: memory stays
            bounded by ``max_locations`` + one batch). Seeded by ``seed``: the same data in the same batches gives the
            same sample. A head that models each position of the map (``PositionalMahalanobis``) is fitted on whole
            maps instead, streamed into its ``partial_fit``; ``max_locations`` is refused for it.
        seed : int
            Seed of the location sample (the head has its own seed for k-means / random features).
        batch_size : int
            Batch size when ``images`` is a tensor.
        progress : bool
            Show a tqdm progress bar.

        Notes
        -----
        The book's settings: KDE with γ = 0.05 on VGG-16 block-5 locations; k-means with K = 5 and centroids rescaled
        to a fixed norm (``KMeansMembership(n_clusters=5, centroid_norm=1.0)``: with equal norms the membership
        ``f_c`` is linear, ``2aᵀ(μ_c − μ_k)``, and its bias-free relevance all goes to active channels).
        """
        check_int(seed, owner="DeepNeon", name="seed", minimum=0)
        if getattr(self.head, "_fits_on_feature_maps", False):
            return self._fit_head_on_maps(images, max_locations, batch_size, progress)
        rows = self.feature_rows(images, batch_size=batch_size, max_locations=max_locations, seed=seed,
                                 progress=progress)
        return self.fit_head(rows)

    @torch.no_grad()
    def _fit_head_on_maps(self, images: Any, max_locations: int | None, batch_size: int, progress: bool) -> DeepNeon:
        """Fit a head that models each position of the feature map (``PositionalMahalanobis``) on whole maps,
        streamed batch by batch into its ``partial_fit`` (memory: its running statistics + one batch); a failure
        leaves the model as it was."""
        name = type(self.head).__name__
        if max_locations is not None:
            raise ValueError(f"DeepNeon.fit: a {name} head models each position of the feature map, so it fits on "
                             f"whole maps, not on a sample of locations; leave max_locations=None.")
        check_int(batch_size, owner="DeepNeon", name="batch_size", minimum=1)
        from tqdm.auto import tqdm

        dtype, device = _features_dtype_device(self.features)
        head = clone(self.head).to(dtype=dtype, device=device)  # unfitted, same hyperparameters: starts over
        locations = 0
        for batch in tqdm(_iter_batches(images, batch_size), total=_batch_count(images, batch_size),
                          desc="DeepNeon.fit: features", unit="batch", disable=not progress):
            fmap = self._feature_map(batch.to(device=device, dtype=dtype))
            head.partial_fit(fmap, finalize=False)  # refuses maps of another shape than the first
            locations += fmap.shape[0] * fmap.shape[2] * fmap.shape[3]
        if locations == 0:
            raise ValueError("DeepNeon.fit got no images (an empty tensor or iterable).")
        self.head = head.finalize()
        self.n_locations_fit_ = locations
        self.n_channels_ = int(head.n_features_in_)
        return self

    def fit_head(self, rows: ArrayLike) -> DeepNeon:
        """Fit the head on location vectors (rows, C) computed before (:meth:`feature_rows`): one pass of the
        feature extractor can serve several heads. The head is moved to the features' dtype and device first.
        Returns ``self``.
        """
        self._fit_head_as(self.head, rows)
        return self

    def _fit_head_as(self, head: nn.Module, rows: ArrayLike) -> None:
        """Fit ``head`` on ``rows`` and make it this model's head; a failure leaves the model as it was."""
        dtype, device = _features_dtype_device(self.features)
        rows = as_float_tensor(rows, dtype=dtype, device=device, owner="DeepNeon", name="rows", strict_float=False)
        if rows.ndim != 2 or rows.shape[0] == 0:
            raise ValueError(f"DeepNeon needs location rows of shape (n_rows >= 1, C) to fit its head. "
                             f"Got {tuple(rows.shape)}.")
        head.to(dtype=dtype, device=device)
        head.fit(rows)
        self.head = head
        self.n_locations_fit_ = int(rows.shape[0])
        self.n_channels_ = int(rows.shape[1])

    def fit_self(self, images: torch.Tensor, *, leave_one_out: bool = True, progress: bool = False) -> DeepNeon:
        """Fit the head on the locations of the image(s) it will explain (the book's wood example, Figure 7).

        Each location is then scored against the *other* locations of the image: with ``leave_one_out`` (default) a
        KDE head is replaced by :class:`LeaveOneOutKDEOutlier` / :class:`LeaveOneOutKDEInlier`, which leave each
        location out of its own density (otherwise a location's similarity to itself dominates its score, and the
        KDE outlier explanation vanishes exactly where the location is unusual). Explain ``images`` themselves, in
        the same order, afterwards. k-means heads are fitted as they are (Figure 8: clusters of one image's
        locations).

        Returns ``self``.
        """
        head = self.head
        if leave_one_out:
            if isinstance(head, KDEOutlier) and not isinstance(head, LeaveOneOutKDEOutlier):
                head = LeaveOneOutKDEOutlier.from_head(head)
            elif isinstance(head, KDEInlier) and not isinstance(head, LeaveOneOutKDEInlier):
                head = LeaveOneOutKDEInlier.from_head(head)
        if isinstance(images, torch.Tensor) and images.ndim == 3:
            images = images.unsqueeze(0)
        batch_size = max(1, len(images)) if isinstance(images, torch.Tensor) else 32
        rows = self.feature_rows(images, batch_size=batch_size, progress=progress)
        self._fit_head_as(head, rows)  # the model changes only once the new head is fitted
        return self

    # -- explaining ------------------------------------------------------------------------------------------------
    def input_bounds(self) -> tuple[Any, Any]:
        """``(low, high)`` of the ZBox rule: the explicit bounds if given, else the preprocessing's (1, 3, 1, 1)."""
        if self.low is not None:
            return self.low, self.high
        dtype, device = _features_dtype_device(self.features)
        return self.preprocessing.bounds(dtype=dtype, device=device)

    def base_composite(self, layer_map: list | None = None) -> Composite:
        """The Zennit composite for the feature extractor (see ``composite``, ``lrp_gamma`` and ``fast``)."""
        if isinstance(self.composite, Composite):
            return self.composite
        if not self.fast:  # every batch norm passes relevance, as in Zennit 1.0 (0.5 leaves FrozenBatchNorm2d out)
            layer_map = list(layer_map or []) + [(BATCH_NORMS, Pass())]
        if self.composite == "epsilon_gamma_box":
            low, high = self.input_bounds()
            cls = FastEpsilonGammaBox if self.fast else EpsilonGammaBox
            return cls(low=low, high=high, gamma=self.lrp_gamma, layer_map=layer_map,
                       canonizers=default_canonizers(self.features))
        return (FastEpsilonPlusFlat if self.fast else EpsilonPlusFlat)(layer_map=layer_map,
                                                                       canonizers=default_canonizers(self.features))

    def neon_composite(self, beta: float | None = None, eps: float | None = None,
                       base: Composite | None = None) -> NeonComposite:
        """The composite every explanation of this model uses: the head's CNN rules, the pool rule, and ``base``
        (default :meth:`base_composite`) for the feature extractor.

        Parameters
        ----------
        beta, eps : float, optional
            Override the head's soft-argmin sharpness / random-feature stabiliser.
        base : zennit.core.Composite, optional
            Rules for the feature extractor instead of :meth:`base_composite` (what ``explain(model, x,
            composite=...)`` passes): the head and the pool keep their rules. For features outside the documented
            backbones, the graph canonizer (:func:`~neon_attrib.vision.default_canonizers`) runs before the base's
            own canonizers.
        """
        if base is None and not isinstance(self.composite, Composite):
            return NeonComposite(beta=beta, eps=eps, base=self.base_composite())
        # a composite of the user's: the graph canonizer (for architectures that need it) runs before its canonizers
        base = base if base is not None else self.composite
        first = [] if any(isinstance(c, GraphCanonizer) for c in base.canonizers) else [
            c for c in default_canonizers(self.features) if isinstance(c, GraphCanonizer)]
        return NeonComposite(beta=beta, eps=eps, base=base, pre_canonizers=first)

    def explainer(self, *, beta: float | None = None, eps: float | None = None, composite: Composite | None = None,
                  audit: bool = True, strict: bool = False, **options: Any) -> Explainer:
        """A reusable explainer: the composite is registered once, then every call explains one batch.

        Cheaper than :func:`~neon_attrib.explain` in a loop (no hook registration per batch). The hooks live on a
        private copy of the model: the explainer may be used with or without ``with`` and leaves nothing on the model.

        Parameters
        ----------
        beta, eps : float, optional
            Passed to :meth:`neon_composite`.
        composite : zennit.core.Composite, optional
            Rules for the feature extractor (a NeonComposite is used as it is), as in :func:`~neon_attrib.explain`.
        audit, strict : bool
            Conservation audit per batch (:class:`~neon_attrib.pipeline.Audit`; the last in ``last_audit``).
        **options
            ``precision`` (``"exact"`` or ``"fast"``), ``channels_last``, ``autocast_dtype`` (approximate),
            ``cudnn_benchmark``, ``fused`` (compiled element-wise kernels, the same numbers) and ``cuda_graphs``
            (replayed CUDA graphs for repeated shapes) of
            :class:`~neon_attrib.pipeline.Explainer`.

        Returns
        -------
        neon_attrib.pipeline.Explainer
            ``explainer(images)`` returns ``(output, pixel_relevance)``; for k-means the default target (the cluster
            of highest pooled score) unless ``explainer(images, attr_output)`` says otherwise.

        Examples
        --------
        >>> model = DeepNeon(vgg16_features(), KDEOutlier(gamma=1e-3)).fit(torch.rand(2, 3, 32, 32), progress=False)
        >>> with model.explainer() as explainer:
        ...     for batch in (torch.rand(2, 3, 32, 32), torch.rand(3, 3, 32, 32)):
        ...         output, relevance = explainer(batch)
        >>> relevance.shape
        torch.Size([3, 3, 32, 32])
        """
        return _DeepNeonExplainer(self, resolve_composite(self, composite, beta=beta, eps=eps), audit=audit,
                                  strict=strict, default_target=self._explained_target, owner="DeepNeon", **options)

    def _explained_target(self, output: torch.Tensor) -> torch.Tensor | None:
        return self.default_target(output) if output.ndim > 1 else None

    def relevance(self, images: torch.Tensor, target: Any = None, *, beta: float | None = None,
                  eps: float | None = None, composite: Composite | None = None,
                  to_pixels: bool = True, strict: bool = False, precision: str = "exact") -> DeepRelevance:
        """Explain like :func:`~neon_attrib.explain`, and also return the relevance at the feature map and locations.

        One explanation (:func:`~neon_attrib.pipeline.run`), audited like every other
        (:class:`~neon_attrib.pipeline.Audit`): a failing audit warns, or raises with ``strict=True``.

        Parameters
        ----------
        images : torch.Tensor
            (n, 3, H, W) network inputs.
        target : int, sequence or tensor, optional
            Cluster to explain per image (k-means); default :meth:`default_target`.
        beta, eps : float, optional
            Passed to :meth:`neon_composite`.
        composite : zennit.core.Composite, optional
            Instead of :meth:`neon_composite`.
        to_pixels : bool
            Propagate down to the pixels (default). ``False`` stops at the feature map (``pixels`` is then None):
            the head's and the pool's rules only, and the audit checks the relevance at the feature map.
        strict : bool
            Raise :class:`~neon_attrib.pipeline.ConservationError` instead of warning when the audit fails.
        precision : {"exact", "fast"}
            The precision policy on CUDA, as in :func:`~neon_attrib.explain`.

        Returns
        -------
        DeepRelevance
        """
        dtype, device = module_dtype_device(self)
        inputs = as_float_tensor(images, dtype=dtype, device=device, owner="DeepNeon", name="images")
        return self._staged(inputs, target, beta=beta, eps=eps, composite=composite, to_pixels=to_pixels,
                            strict=strict, precision=precision)

    def _staged(self, inputs: torch.Tensor, target: Any, *, to_pixels: bool, **options: Any) -> DeepRelevance:
        """:meth:`relevance` for checked ``inputs``: relevance at the pixels (unless ``to_pixels`` is False: the
        backward pass stops at the feature map), at the feature map and at the head's output."""
        result = run(self, (inputs,), target, at=("features", "head"), stop_at=None if to_pixels else "features",
                     **options)
        features, head = result.at["features"], result.at["head"]
        n, _, h, w = features.shape
        # the head scores the rows (n·h·w, C): (n·h·w,) scores, or (n·h·w, K) for k-means (only the target's non-zero)
        locations = head.reshape(n, h, w, *head.shape[1:])
        locations = locations.sum(-1) if head.ndim == 2 else locations
        return DeepRelevance(pixels=result.relevance[0] if to_pixels else None, features=features,
                             locations=locations, output=result.output, target=result.target, audit=result.audit)

    def extra_repr(self) -> str:
        composite = self.composite if isinstance(self.composite, str) else type(self.composite).__name__
        return f"preprocessing={self.preprocessing.name!r}, composite={composite!r}, fast={self.fast}"


# ---------------------------------------------------------------------------------------------------------------------
def _check_bounds(low: Any, high: Any) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """ZBox bounds: finite numbers or tensors with ``low < high`` everywhere."""
    values = []
    for value, name in ((low, "low"), (high, "high")):
        tensor = torch.as_tensor(value, dtype=torch.float64) if not isinstance(value, torch.Tensor) else value
        if not tensor.is_floating_point() and not tensor.dtype.is_signed and tensor.dtype != torch.uint8:
            raise TypeError(f"The '{name}' parameter of DeepNeon must be numeric. Got {value!r}.")
        if not bool(torch.isfinite(tensor.double()).all()):
            raise ValueError(f"The '{name}' parameter of DeepNeon must be finite. Got {value!r}.")
        values.append(tensor.double())
    try:
        ordered = bool((values[0] < values[1]).all())
    except RuntimeError as exc:
        raise ValueError(f"DeepNeon's 'low' and 'high' must broadcast against each other. Got shapes "
                         f"{tuple(values[0].shape)} and {tuple(values[1].shape)}.") from exc
    if not ordered:
        raise ValueError("DeepNeon's 'low' must be below 'high' everywhere (the lowest and highest network input).")
    return low, high


class _DeepNeonExplainer(Explainer):
    """:class:`~neon_attrib.pipeline.Explainer` for a :class:`DeepNeon` that checks the images first."""

    def __call__(self, images: Any, attr_output: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        dtype, device = module_dtype_device(self.model)
        images = as_float_tensor(images, dtype=dtype, device=device, owner="DeepNeon.explainer", name="images")
        if images.ndim != 4:
            raise ValueError(f"DeepNeon.explainer expects a batch of images (n, channels, H, W). "
                             f"Got {tuple(images.shape)}.")
        return super().__call__(images, attr_output)


def _features_dtype_device(features: nn.Module) -> tuple[torch.dtype, torch.device]:
    for tensor in list(features.parameters()) + list(features.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype, tensor.device
    return torch.get_default_dtype(), torch.device("cpu")


def _iter_batches(images: Any, batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            images = images.unsqueeze(0)
        yield from images.split(batch_size)
        return
    if isinstance(images, (str, bytes, os.PathLike)) or not isinstance(images, Iterable):
        raise TypeError(f"DeepNeon.fit expects a tensor of images or an iterable of batches (e.g. a DataLoader). "
                        f"Got {type(images).__name__}.")
    for batch in images:
        if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
            batch = batch[0]  # (images, labels)
        if not isinstance(batch, torch.Tensor):
            raise TypeError(f"DeepNeon.fit: every batch must be a tensor or an (images, labels) pair. "
                            f"Got {type(batch).__name__}.")
        yield batch.unsqueeze(0) if batch.ndim == 3 else batch


def _batch_count(images: Any, batch_size: int) -> int | None:
    if isinstance(images, torch.Tensor):
        return math.ceil((1 if images.ndim == 3 else images.shape[0]) / batch_size)
    try:
        return len(images)
    except TypeError:
        return None


register_activation_children(DeepNeon, ("head",))
register_trusted_container(DeepNeon)  # features, head, pool: the graph canonizer canonizes the features
