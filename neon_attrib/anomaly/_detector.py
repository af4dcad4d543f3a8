"""The common base of :class:`~neon_attrib.anomaly.PatchCore` and :class:`~neon_attrib.anomaly.PaDiM`: a
:class:`~neon_attrib.vision.deep.DeepNeon` on multi-layer taps whose location scores are patch scores, with anomaly
maps,
calibration (threshold, normal level τ, normalised scores) and a choice of explained score.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.exceptions import NotFittedError
from torch import nn
from zennit.core import Composite

from ..core.composites import register_activation_children
from ..core.validation import module_dtype_device
from ..pipeline.attribution import explain as _explain
from ..pipeline.engine import isolated
from ..vision import FeatureTaps, backbone
from ..vision.deep import DeepNeon, DeepRelevance
from ._layers import PatchPool, check_explain_target, gaussian_blur, upsample

__all__ = ["AnomalyDetector", "Detection", "default_layers"]


@dataclass
class Detection:
    """What :meth:`AnomalyDetector.detect` returns, per image.

    Attributes
    ----------
    scores : torch.Tensor
        (n,) image scores (the maximal patch score; PatchCore's re-weighted one if asked for).
    patch_scores : torch.Tensor
        (n, h, w) patch scores on the feature grid.
    maps : torch.Tensor
        (n, H, W) anomaly maps: patch scores bilinearly upsampled to the image and Gaussian-blurred.
    verdicts : torch.Tensor or None
        (n,) bool, ``score > threshold`` (None before :meth:`~AnomalyDetector.calibrate`).
    normalized : torch.Tensor or None
        (n,) normalised scores in [0, 1], 0.5 at the threshold (None before calibration).
    """

    scores: torch.Tensor
    patch_scores: torch.Tensor
    maps: torch.Tensor
    verdicts: torch.Tensor | None
    normalized: torch.Tensor | None


def default_layers(network: nn.Module, kind: str) -> list[str]:
    """The layers PatchCore (``kind="patchcore"``) or PaDiM (``"padim"``) taps by default.

    * ResNets (a ``layer3`` module): ``["layer2", "layer3"]`` (PatchCore), ``["layer1", "layer2", "layer3"]`` (PaDiM);
    * a plain sequence of convolutions and max pools (a VGG conv base): the modules just before its 3rd and 4th max
      pool, i.e. the ReLUs closing blocks 3 and 4 (``["15", "22"]`` in VGG-16), for both.

    Raises
    ------
    ValueError
        For any other network: pass ``layers`` yourself.
    """
    names = dict(network.named_modules())
    if "layer3" in names and "layer2" in names:
        return ["layer2", "layer3"] if kind == "patchcore" else [name for name in ("layer1", "layer2", "layer3")
                                                                 if name in names]
    if isinstance(network, nn.Sequential):
        keys = list(network._modules)
        pools = [i for i, key in enumerate(keys) if isinstance(network._modules[key], nn.MaxPool2d)]
        if len(pools) >= 4 and pools[2] > 0:
            return [keys[pools[2] - 1], keys[pools[3] - 1]]
    raise ValueError(f"No default layers to tap in a {type(network).__name__}: pass layers=[...] with names of "
                     f"network.named_modules() (e.g. ['layer2', 'layer3'] for a ResNet, ['15', '22'] for VGG-16).")


class _ImageBatches:
    """Image batches of one size from a tensor, a sequence of images / batches or an iterable of batches (a
    DataLoader yielding tensors or ``(images, labels)`` pairs); sized when the input is."""

    def __init__(self, images: Any, batch_size: int, owner: str):
        if isinstance(images, (str, bytes, os.PathLike)) or not isinstance(images, (torch.Tensor, Iterable)):
            raise TypeError(f"{owner} expects images as a tensor (n, C, H, W), a sequence of image tensors or an "
                            f"iterable of batches (e.g. a DataLoader). Got {type(images).__name__}.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"The 'batch_size' parameter of {owner} must be an int >= 1. Got {batch_size!r}.")
        if isinstance(images, torch.Tensor) and images.ndim == 3:
            images = images.unsqueeze(0)
        if isinstance(images, torch.Tensor) and images.ndim != 4:
            raise ValueError(f"{owner} expects images of shape (n, C, H, W) or (C, H, W). Got {tuple(images.shape)}.")
        if isinstance(images, torch.Tensor) and images.shape[0] == 0:
            raise ValueError(f"{owner} got no images (an empty tensor).")
        if isinstance(images, (list, tuple)) and not images:
            raise ValueError(f"{owner} got no images (an empty sequence).")
        self.images, self.batch_size, self.owner = images, batch_size, owner
        self.size: tuple[int, int] | None = None

    def __len__(self) -> int:
        if isinstance(self.images, torch.Tensor):
            return math.ceil(self.images.shape[0] / self.batch_size)
        if isinstance(self.images, (list, tuple)) and all(isinstance(item, torch.Tensor) for item in self.images):
            count = sum(1 if item.ndim == 3 else item.shape[0] for item in self.images)
            return math.ceil(count / self.batch_size)  # single images are gathered into batches
        return len(self.images)  # type: ignore[arg-type]  # raises TypeError for unsized iterables (tqdm copes)

    def _check(self, batch: Any) -> torch.Tensor:
        if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
            batch = batch[0]  # (images, labels)
        if not isinstance(batch, torch.Tensor):
            raise TypeError(f"{self.owner}: every image or batch must be a tensor or an (images, labels) pair. "
                            f"Got {type(batch).__name__}.")
        batch = batch.unsqueeze(0) if batch.ndim == 3 else batch
        if batch.ndim != 4:
            raise ValueError(f"{self.owner}: every image must be (C, H, W) or a batch (n, C, H, W). Got "
                             f"{tuple(batch.shape)}.")
        size = (int(batch.shape[-2]), int(batch.shape[-1]))
        if self.size is None:
            self.size = size
        elif size != self.size:
            raise ValueError(f"{self.owner}: the images have different sizes ({self.size[0]}x{self.size[1]} and "
                             f"{size[0]}x{size[1]}). Resize them to one size first, e.g. with "
                             f"torchvision.transforms.functional.resize(image, [H, W]).")
        return batch

    def __iter__(self) -> Iterator[torch.Tensor]:
        self.size = None
        if isinstance(self.images, torch.Tensor):
            for batch in self.images.split(self.batch_size):
                yield self._check(batch)
            return
        pending: list[torch.Tensor] = []
        seen = False
        for item in self.images:
            seen = True
            batch = self._check(item)
            if isinstance(self.images, (list, tuple)):  # single images: gather them into batches
                pending.append(batch)
                if sum(b.shape[0] for b in pending) >= self.batch_size:
                    yield torch.cat(pending)
                    pending = []
            else:
                yield batch
        if pending:
            yield torch.cat(pending)
        if not seen:
            raise ValueError(f"{self.owner} got no images (an empty iterable).")


def _build_taps(features: Any, layers: Sequence[str] | str | None, weights: Any, aggregate: int | None,
                reduce_to: int | None, owner: str, kind: str) -> FeatureTaps:
    if isinstance(features, FeatureTaps):
        if layers is not None and tuple([layers] if isinstance(layers, str) else layers) != features.layers:
            raise ValueError(f"{owner} got a FeatureTaps tapping {list(features.layers)} and layers={layers!r}; "
                             f"pass one of them.")
        if weights is not None:
            raise ValueError(f"{owner}: 'weights' applies to a backbone name, not to a ready FeatureTaps.")
        return features
    if isinstance(features, str):
        network = backbone(features, weights)
    elif isinstance(features, nn.Module):
        network = backbone(features, weights) if weights is not None else features
    else:
        raise TypeError(f"The 'features' parameter of {owner} must be a backbone name (e.g. 'resnet18', 'vgg16'), a "
                        f"torch.nn.Module or a FeatureTaps. Got {type(features).__name__}.")
    if layers is None:
        layers = default_layers(network, kind)
    return FeatureTaps(network.eval(), layers, aggregate=aggregate, reduce_to=reduce_to)


class AnomalyDetector(DeepNeon):
    """Base of :class:`~neon_attrib.anomaly.PatchCore` and :class:`~neon_attrib.anomaly.PaDiM` (not used directly).

    ``model(images)`` returns the *explained* score (n,) chosen by :attr:`explain_target` (default: the image score);
    :meth:`score`, :meth:`anomaly_map`, :meth:`patch_scores` and :meth:`detect` always give the detector's outputs.
    """

    _kind = "patchcore"

    image_size_: torch.Tensor

    def __init__(self, features: Any, layers: Sequence[str] | str | None, head: nn.Module, *, weights: Any,
                 aggregate: int | None, reduce_to: int | None, preprocessing: Any, explain_target: Any,
                 sigma: float | None, composite: str | Composite, lrp_gamma: float, fast: bool,
                 extra: nn.Module | None = None):
        owner = type(self).__name__
        taps = _build_taps(features, layers, weights, aggregate, reduce_to, owner, self._kind)
        network: nn.Module = taps if extra is None else nn.Sequential(OrderedDict(taps=taps, select=extra))
        if sigma is not None and not (isinstance(sigma, (int, float)) and not isinstance(sigma, bool)
                                      and math.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"The 'sigma' parameter of {owner} must be a finite float >= 0 or None. Got {sigma!r}.")
        super().__init__(network, head, "max", preprocessing=preprocessing, composite=composite,
                         lrp_gamma=lrp_gamma, fast=fast)
        self.pool = PatchPool(check_explain_target(explain_target, owner))
        self.sigma = sigma
        self.register_buffer("image_size_", torch.zeros(2, dtype=torch.long))
        for name in ("threshold_", "score_min_", "score_max_"):
            self.register_buffer(name, torch.tensor(float("nan")))
        self.eval()

    # -- configuration -----------------------------------------------------------------------------------------------
    def saved_settings(self) -> dict[str, Any]:
        """:meth:`DeepNeon.saved_settings <neon_attrib.vision.deep.DeepNeon.saved_settings>` with the taps (``layers``,
        ``aggregate``, ``reduce_to``) and the anomaly map's ``sigma``; ``explain_target`` is a choice of what to
        explain (see :meth:`with_target`), not saved."""
        settings = super().saved_settings()
        del settings["pool"]  # the patch pool's target is explain_target
        taps = self.taps
        return {**settings, "layers": list(taps.layers), "aggregate": taps.aggregate, "reduce_to": taps.reduce_to,
                "sigma": None if self.sigma is None else float(self.sigma)}

    @property
    def taps(self) -> FeatureTaps:
        """The :class:`~neon_attrib.vision.FeatureTaps` reading the backbone."""
        return self.features if isinstance(self.features, FeatureTaps) else self.features.taps

    @property
    def explain_target(self) -> str | tuple[int, int]:
        """What ``model(images)`` and :func:`~neon_attrib.explain` explain: ``"max"`` (the image score, default),
        ``"sum"`` (all patch scores), ``"excess"`` (``Σ max(0, s − τ)``, needs :meth:`calibrate`) or ``(row, col)``
        (one patch of the feature grid)."""
        return self.pool.target

    @explain_target.setter
    def explain_target(self, target: Any) -> None:
        self.pool.target = check_explain_target(target, type(self).__name__)

    @property
    def tau_(self) -> torch.Tensor:
        """The normal level τ of the patch scores (from :meth:`calibrate`; NaN before)."""
        return self.pool.tau

    @property
    def is_fitted(self) -> bool:
        return getattr(self.head, "n_features_in_", None) is not None

    @property
    def is_calibrated(self) -> bool:
        return bool(torch.isfinite(self.threshold_))

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(f"This {type(self).__name__} instance is not fitted yet. Call 'fit' first.")

    def _check_images(self, images: Any) -> None:
        """Checks before a forward pass (subclasses add theirs)."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"{type(self).__name__} expects a batch of images (n, C, H, W). Got {shape}.")

    def with_target(self, target: Any) -> AnomalyDetector:
        """A copy explaining ``target`` (see :attr:`explain_target`) that shares every tensor with this model (no
        memory, later calibration is seen); this model keeps its own target.

        Examples
        --------
        >>> relevance = explain(model.with_target("excess"), images)  # doctest: +SKIP
        """
        copy = isolated(self)
        copy.explain_target = target
        return copy

    def explain(self, images: Any, target: Any = None, **kwargs: Any) -> Any:
        """:func:`~neon_attrib.explain` of ``target`` (default :attr:`explain_target`); ``kwargs`` as there
        (``return_audit``, ``return_output``, ``composite``, ``strict``)."""
        return _explain(self if target is None else self.with_target(target), images, **kwargs)

    # -- forward -----------------------------------------------------------------------------------------------------
    def _feature_map(self, images: torch.Tensor) -> torch.Tensor:
        try:
            return super()._feature_map(images)
        except RuntimeError as exc:
            if "too small" not in str(exc) and "Output size" not in str(exc):
                raise
            raise ValueError(f"{type(self).__name__}: images of {images.shape[-2]}x{images.shape[-1]} pixels are too "
                             f"small for the tapped layers {list(self.taps.layers)} ({exc}). Use larger images or "
                             f"tap earlier layers.") from exc

    def _patch_grid(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature map (n, C, h, w) and patch scores (n, h, w)."""
        self._check_fitted()
        self._check_images(images)
        fmap = self._feature_map(images)
        n, _, h, w = fmap.shape
        return fmap, self._scores(fmap).reshape(n, h, w)

    def _image_weights(self, fmap: torch.Tensor, scores: torch.Tensor) -> torch.Tensor | None:
        """Per-image factors of the image score (PatchCore's re-weighting), or None."""
        return None

    def _pooled(self, pool: PatchPool, fmap: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        weights = self._image_weights(fmap, scores) if pool.target == "max" else None
        return pool(scores) if weights is None else pool(scores, weights=weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The explained score (n,) (:attr:`explain_target`; by default the image score, as :meth:`score`)."""
        fmap, scores = self._patch_grid(images)
        return self._pooled(self.pool, fmap, scores)

    @torch.no_grad()
    def location_scores(self, images: torch.Tensor) -> torch.Tensor:
        """Patch scores (n, h, w) of a batch."""
        return self._patch_grid(images)[1]

    @torch.no_grad()
    def _detect_batch(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fmap, scores = self._patch_grid(images)
        weights = self._image_weights(fmap, scores)
        image_scores = scores.flatten(1).amax(1)
        if weights is not None:
            image_scores = image_scores * weights
        maps = gaussian_blur(upsample(scores, images.shape[-2:]), self.sigma)
        return image_scores, scores, maps

    def _batches(self, images: Any, batch_size: int, owner: str) -> _ImageBatches:
        return _ImageBatches(images, batch_size, f"{type(self).__name__}.{owner}")

    @torch.no_grad()
    def detect(self, images: Any, *, batch_size: int = 8, progress: bool = False) -> Detection:
        """Image scores, patch scores, anomaly maps and (once calibrated) verdicts and normalised scores, in one
        forward pass per batch.

        Parameters
        ----------
        images : torch.Tensor, sequence or iterable
            Network inputs (preprocessed) of one size: (n, C, H, W), a sequence of (C, H, W) images, or batches.
        batch_size : int
            Images per forward pass (the patch-to-memory distances of a batch are its largest temporaries).
        progress : bool
            Show a tqdm progress bar.
        """
        from tqdm.auto import tqdm

        batches = self._batches(images, batch_size, "detect")
        parts = [self._detect_batch(self._to_model(batch)) for batch in
                 tqdm(batches, desc=f"{type(self).__name__}: detect", unit="batch", disable=not progress)]
        scores, patches, maps = (torch.cat(column) for column in zip(*parts))
        verdicts = normalized = None
        if self.is_calibrated:
            verdicts = scores > self.threshold_
            normalized = self._normalize(scores)
        return Detection(scores=scores, patch_scores=patches, maps=maps, verdicts=verdicts, normalized=normalized)

    def _to_model(self, batch: torch.Tensor) -> torch.Tensor:
        dtype, device = module_dtype_device(self.features)
        return batch.to(device=device, dtype=dtype)

    def score(self, images: Any, *, batch_size: int = 8) -> torch.Tensor:
        """Image scores (n,): the maximal patch score (PatchCore: re-weighted if ``reweight``)."""
        return self.detect(images, batch_size=batch_size).scores

    def patch_scores(self, images: Any, *, batch_size: int = 8) -> torch.Tensor:
        """Patch scores (n, h, w) on the feature grid."""
        return self.detect(images, batch_size=batch_size).patch_scores

    def anomaly_map(self, images: Any, *, batch_size: int = 8) -> torch.Tensor:
        """Anomaly maps (n, H, W): patch scores bilinearly upsampled to the image size and blurred (σ = ``sigma``)."""
        return self.detect(images, batch_size=batch_size).maps

    # -- calibration -------------------------------------------------------------------------------------------------
    def _reset_calibration(self) -> None:
        for tensor in (self.threshold_, self.score_min_, self.score_max_, self.pool.tau):
            tensor.fill_(float("nan"))

    @torch.no_grad()
    def calibrate(self, images: Any, labels: Any = None, *, percentile: float = 99.0, tau_percentile: float = 99.0,
                  batch_size: int = 8, progress: bool = False) -> AnomalyDetector:
        """Choose the decision threshold and the normal level τ on held-out images (not those of :meth:`fit`).

        * ``labels`` None: every image is normal; the threshold is the ``percentile`` of their image scores (so about
          ``100 − percentile`` % of normal images are flagged).
        * ``labels`` given (1 / True = defective, 0 = normal, both present): the threshold maximising F1 of
          ``score > threshold`` on these images (the midpoint between two consecutive scores).

        τ (the ``"excess"`` target's normal level) is the ``tau_percentile`` of the patch scores of the normal images.
        Normalised scores (:meth:`normalized_score`) map the threshold to 0.5 and the range of the calibration
        scores to a unit interval around it (anomalib's min-max normalisation), clipped to [0, 1]. Returns ``self``.

        Raises
        ------
        ValueError
            If no images are given, ``labels`` does not match them or has no normal image, or a percentile is
            outside [0, 100].
        """
        owner = f"{type(self).__name__}.calibrate"
        for value, name in ((percentile, "percentile"), (tau_percentile, "tau_percentile")):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
                raise ValueError(f"The '{name}' parameter of {owner} must be a number in [0, 100]. Got {value!r}.")
        detection = self.detect(images, batch_size=batch_size, progress=progress)
        scores = detection.scores.detach().double().cpu()
        if labels is None:
            normal = torch.ones_like(scores, dtype=torch.bool)
        else:
            normal = ~_as_labels(labels, scores.shape[0], owner)
        if not bool(normal.any()):
            raise ValueError(f"{owner}: the labels mark every image as defective; τ and the threshold need normal "
                             f"images (label 0).")
        if bool(normal.all()):
            threshold = float(np.percentile(scores.numpy(), percentile))
            self.calibration_ = {"method": "percentile", "percentile": float(percentile)}
        else:
            threshold, f1 = _f1_threshold(scores.numpy(), (~normal).numpy())
            self.calibration_ = {"method": "f1", "f1": f1}
        patches = detection.patch_scores[normal.to(detection.patch_scores.device)].detach().double().flatten().cpu()
        tau = float(np.percentile(patches.numpy(), tau_percentile))
        self.calibration_.update(n_images=int(scores.shape[0]), n_normal=int(normal.sum()),
                                 tau_percentile=float(tau_percentile))
        self.threshold_.fill_(threshold)
        self.score_min_.fill_(float(scores.min()))
        self.score_max_.fill_(float(scores.max()))
        self.pool.tau.fill_(tau)
        return self

    def _check_calibrated(self, owner: str) -> None:
        if not self.is_calibrated:
            raise ValueError(f"This {type(self).__name__} is not calibrated yet: call calibrate(normal_images) (or "
                             f"with labels) before '{owner}'.")

    def _normalize(self, scores: torch.Tensor) -> torch.Tensor:
        span = self.score_max_ - self.score_min_
        span = torch.where(span > 0, span, torch.ones_like(span))
        return ((scores - self.threshold_) / span + 0.5).clamp(0.0, 1.0)

    def predict(self, images: Any, *, batch_size: int = 8) -> torch.Tensor:
        """Verdicts (n,) bool: ``True`` = anomalous (``score > threshold``). Needs :meth:`calibrate`."""
        self._check_calibrated("predict")
        return self.detect(images, batch_size=batch_size).verdicts

    def normalized_score(self, images: Any, *, batch_size: int = 8) -> torch.Tensor:
        """Scores normalised to [0, 1] with the threshold at 0.5 (see :meth:`calibrate`). Needs calibration."""
        self._check_calibrated("normalized_score")
        return self.detect(images, batch_size=batch_size).normalized

    # -- explaining --------------------------------------------------------------------------------------------------
    def relevance(self, images: torch.Tensor, target: Any = None, *, beta: float | None = None,
                  eps: float | None = None, composite: Composite | None = None,
                  to_pixels: bool = True, strict: bool = False, precision: str = "exact") -> DeepRelevance:
        """Explain like :meth:`explain` and also return the relevance at the feature map and of every patch score.

        ``target`` is an explanation target (``"max"``, ``"sum"``, ``"excess"``, ``(row, col)``; default
        :attr:`explain_target`). ``locations`` of the result are the patches' relevances (n, h, w). The explanation
        is audited as :meth:`explain`'s (``audit`` of the result; a failing audit warns, or raises with
        ``strict=True``); the other parameters are :meth:`DeepNeon.relevance
        <neon_attrib.vision.deep.DeepNeon.relevance>`'s.
        """
        model = self if target is None else self.with_target(target)
        dtype, device = module_dtype_device(model)
        model._check_fitted()
        model._check_images(images)
        return model._staged(images.to(dtype=dtype, device=device), None, beta=beta, eps=eps, composite=composite,
                             to_pixels=to_pixels, strict=strict, precision=precision)

    def fit_self(self, images: Any, **kwargs: Any) -> AnomalyDetector:
        """Not available: an anomaly detector compares images with *normal* images. Fit it with :meth:`fit` (and give
        ``model_randomization`` ``refit=normal_images``)."""
        raise TypeError(f"{type(self).__name__} has no fit_self: fit it on normal images with fit(images) (for "
                        f"neon_attrib.evaluation.sanity.model_randomization pass refit=normal_images or refit=None).")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, explain_target={self.explain_target!r}, sigma={self.sigma}"


def _as_labels(labels: Any, n: int, owner: str) -> torch.Tensor:
    array = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
    if array.shape != (n,) or not np.isin(array, (0, 1)).all():
        raise ValueError(f"The 'labels' of {owner} must be {n} values of 0 (normal) or 1 (defective), one per image. "
                         f"Got {array.shape[0] if array.ndim == 1 else array.shape} value(s): {array.tolist()[:8]}.")
    return torch.from_numpy(array.astype(bool))


def _f1_threshold(scores: np.ndarray, defective: np.ndarray) -> tuple[float, float]:
    """The threshold maximising F1 of ``score > threshold`` (midpoints between consecutive distinct scores, and one
    below the lowest), and that F1."""
    values = np.unique(scores)
    candidates = np.concatenate([[values[0] - max(1.0, abs(values[0])) * 1e-6], (values[:-1] + values[1:]) / 2])
    positives = defective.sum()
    best, best_f1 = float(candidates[0]), -1.0
    for threshold in candidates:
        flagged = scores > threshold
        true_positives = (flagged & defective).sum()
        f1 = 2 * true_positives / (flagged.sum() + positives)
        if f1 > best_f1:
            best, best_f1 = float(threshold), float(f1)
    return best, best_f1


register_activation_children(AnomalyDetector, ("head",))
