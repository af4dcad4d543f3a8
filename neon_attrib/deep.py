"""NEON heads on CNN feature maps (SPEC §4): :class:`DeepNeon`, the VGG-16 conv base, its preprocessing and images.

A head (:class:`~neon_attrib.models.KDEOutlier`, :class:`~neon_attrib.models.KDEInlier` or
:class:`~neon_attrib.models.KMeansMembership`) sits on the output ``A ∈ R^{n×C×H×W}`` of a feature extractor (VGG-16
``features``, i.e. the output of block 5) and treats every spatial location as one data point: the rows
``(n·H·W, C)``. Location scores are pooled into one score per image by a :class:`LocationPool`. Explaining it::

    pixels ◄── Zennit LRP (EpsilonGammaBox / EpsilonPlusFlat) ◄── A ◄── head's activation rule ◄── pool rule ◄── score

* the pool rule (:class:`LocationPoolRule`) gives location ``l`` its share ``s_l / Σ_l' s_l' · R`` of the score (not the
  gradient, which would hand every location the whole ``R``);
* the head's *activation* rule (:class:`~neon_attrib.rules.KDEOutlierActivationRule` etc., closed forms of SPEC's CNN
  rules) hands each location's relevance to its active channels only (``a_i = 0`` receives exactly 0);
* standard LRP rules carry the relevance from block 5 down to the pixels, ZBox on the first convolution with the input
  bounds of the preprocessing (:class:`Preprocessing`).

Everything is registered for one call and removed afterwards (Zennit composites): nothing is left on the model.

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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat
from zennit.core import Composite

from ._utils import ArrayLike, as_float_tensor, as_targets, check_int, module_dtype_device, safe_divide
from .attribution import attribution_output
from .composites import NeonComposite
from .fast import LRPExplainer
from .layers import _CaptumRule, squared_distance
from .models import KDEInlier, KDEOutlier, KMeansMembership
from .rules import _BetaHook, _EpsHook, _NeonHook

__all__ = [
    "DeepNeon",
    "DeepRelevance",
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
    "median_gamma",
    "load_image",
    "check_image_size",
    "VGG16_MIN_SIZE",
]

#: VGG-16 halves the resolution five times: smaller images have no location left at block 5.
VGG16_MIN_SIZE = 32

PoolMode = Literal["sum", "mean", "max", "positive"]
_POOLS = ("sum", "mean", "max", "positive")
_COMPOSITES = ("epsilon_gamma_box", "epsilon_plus_flat")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")


# ---------------------------------------------------------------------------------------------------------------------
# preprocessing
@dataclass(frozen=True)
class Preprocessing:
    """How RGB images in ``[0, 1]`` become network inputs: ``(x[order] − mean) / std`` per channel.

    Parameters
    ----------
    name : str
        Short name (``"torchvision"``, ``"caffe"``, ``"caffe_rgb"``).
    mean, std : tuple of 3 floats
        Per channel, in the network's channel order and in ``[0, 1]`` units (caffe: ``mean / 255``, ``std = 1/255``).
    bgr : bool
        Whether the network expects BGR channel order (Caffe / Keras "caffe" mode).

    Examples
    --------
    >>> caffe = get_preprocessing("caffe")
    >>> x = caffe(torch.ones(1, 3, 2, 2))  # white: 255 − mean, in BGR order
    >>> [round(v, 3) for v in x[0, :, 0, 0].tolist()]
    [151.061, 138.221, 131.32]
    >>> low, high = caffe.bounds()
    >>> bool((low <= x).all() and (x <= high).all())
    True
    """

    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    bgr: bool = False

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.mean, dtype=like.dtype, device=like.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=like.dtype, device=like.device).view(-1, 1, 1)
        return mean, std

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """RGB images in ``[0, 1]`` of shape (3, H, W) or (n, 3, H, W) -> network input of the same shape."""
        images = _check_rgb(images, f"Preprocessing({self.name!r})")
        if self.bgr:
            images = images.flip(-3)
        mean, std = self._stats(images)
        return (images - mean) / std

    def inverse(self, inputs: torch.Tensor) -> torch.Tensor:
        """Network input -> RGB images in ``[0, 1]`` (for display)."""
        mean, std = self._stats(inputs)
        images = inputs * std + mean
        return images.flip(-3) if self.bgr else images

    def bounds(self, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """The lowest and highest possible network inputs, (1, 3, 1, 1) each: black and white pixels, preprocessed.

        These are the ``low``/``high`` of the ZBox rule on the first convolution (Zennit's ``EpsilonGammaBox``).
        """
        mean = torch.tensor(self.mean, dtype=dtype, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=dtype, device=device).view(1, 3, 1, 1)
        return (0.0 - mean) / std, (1.0 - mean) / std


#: The preprocessings of the VGG-16 weights we know: torchvision's ImageNet classifiers (RGB, mean/std), Caffe / Keras
#: "caffe" mode (BGR, 0-255, mean subtracted; the weights in ``shared/data/vgg16_imagenet_features``), and the RGB
#: Caffe port of torchvision's ``VGG16_Weights.IMAGENET1K_FEATURES``.
PREPROCESSINGS: dict[str, Preprocessing] = {
    "torchvision": Preprocessing("torchvision", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "caffe": Preprocessing("caffe", (103.939 / 255, 116.779 / 255, 123.68 / 255), (1 / 255,) * 3, bgr=True),
    "caffe_rgb": Preprocessing("caffe_rgb", (0.48235, 0.45882, 0.40784), (1 / 255,) * 3),
}


def get_preprocessing(preprocessing: str | Preprocessing) -> Preprocessing:
    """Look up a :class:`Preprocessing` by name (``"torchvision"``, ``"caffe"``, ``"caffe_rgb"``), or pass one through.

    Raises
    ------
    ValueError
        For an unknown name.
    """
    if isinstance(preprocessing, Preprocessing):
        return preprocessing
    if isinstance(preprocessing, str) and preprocessing in PREPROCESSINGS:
        return PREPROCESSINGS[preprocessing]
    raise ValueError(f"Unknown preprocessing {preprocessing!r}. Expected one of {sorted(PREPROCESSINGS)} "
                     f"or a Preprocessing instance.")


def _check_rgb(images: torch.Tensor, owner: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim not in (3, 4) or images.shape[-3] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{owner} expects RGB images of shape (3, H, W) or (n, 3, H, W). Got {shape}.")
    return images if images.is_floating_point() else images.float() / 255.0


# ---------------------------------------------------------------------------------------------------------------------
# VGG-16
_VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _vgg16_conv_stack() -> nn.Sequential:
    """``torchvision.models.vgg16().features`` (same modules, indices and init) without building the classifier."""
    layers: list[nn.Module] = []
    channels = 3
    for value in _VGG16_CONFIG:
        if value == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            conv = nn.Conv2d(channels, value, kernel_size=3, padding=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.constant_(conv.bias, 0)
            layers += [conv, nn.ReLU(inplace=True)]
            channels = value
    return nn.Sequential(*layers)


def vgg16_features(weights: Any = None) -> nn.Sequential:
    """The VGG-16 conv base (``torchvision.models.vgg16(...).features``, output of block 5, 512 channels, stride 32).

    Parameters
    ----------
    weights : None, str, path, torchvision ``VGG16_Weights`` or dict
        * ``None``: random weights (torchvision's initialisation), for tests.
        * ``"IMAGENET1K_V1"``, ``"IMAGENET1K_FEATURES"``, ``"DEFAULT"`` or a ``VGG16_Weights`` member: torchvision's
          weights (downloaded once into the torch hub cache; needs internet the first time). Their preprocessing is
          ``"torchvision"`` (V1) or ``"caffe_rgb"`` (FEATURES), see :func:`weights_preprocessing`.
        * a path to a ``torch.save``'d state_dict (loaded with ``weights_only=True``), keyed like ``vgg16().features``
          (``"0.weight"``) or like the whole ``vgg16()`` (``"features.0.weight"``; classifier keys are ignored).
          ``shared/data/vgg16_imagenet_features/vgg16_features_keras_imagenet.pth`` is such a file
          (``"caffe"`` preprocessing).
        * a state_dict itself.

    Returns
    -------
    torch.nn.Sequential
        The conv base in eval mode, on the CPU, float32.

    Raises
    ------
    FileNotFoundError
        If a path is given and no file is there.
    ValueError
        If the file is not a state_dict, or its keys or shapes do not fit VGG-16's conv base.
    RuntimeError
        If torchvision's weights cannot be downloaded (no internet): pass a local path instead.

    Examples
    --------
    >>> features = vgg16_features()
    >>> features(torch.zeros(1, 3, 64, 64)).shape
    torch.Size([1, 512, 2, 2])
    """
    import torchvision

    enum = torchvision.models.VGG16_Weights
    if isinstance(weights, str) and weights in enum.__members__:
        weights = enum[weights]
    if isinstance(weights, enum):
        try:
            return torchvision.models.vgg16(weights=weights).features.eval()
        except Exception as exc:  # urllib / hub errors of many kinds
            raise RuntimeError(f"Could not load torchvision's {weights} (it is downloaded on first use). "
                               f"Without internet, pass the path of a local VGG-16 state_dict instead.") from exc
    features = _vgg16_conv_stack()
    if weights is None:
        return features.eval()
    if isinstance(weights, Mapping):
        state, source = dict(weights), "the given state_dict"
    elif isinstance(weights, (str, os.PathLike)):
        state, source = _read_state_dict(Path(weights)), str(weights)
    else:
        raise TypeError(f"vgg16_features expects None, a VGG16_Weights name or member, a path or a state_dict. "
                        f"Got {type(weights).__name__}.")
    _load_vgg16_state(features, state, source)
    return features.eval()


def weights_preprocessing(weights: Any) -> str | None:
    """The preprocessing name that torchvision's VGG-16 ``weights`` expect (None for paths and random weights)."""
    import torchvision

    enum = torchvision.models.VGG16_Weights
    if isinstance(weights, str) and weights in enum.__members__:
        weights = enum[weights]
    if isinstance(weights, enum):
        return "caffe_rgb" if weights == enum.IMAGENET1K_FEATURES else "torchvision"
    return None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"VGG-16 weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and unpickler errors
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"Could not read {path} as a torch state_dict: torch.load(..., weights_only=True) "
                         f"failed ({reason}).") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state_dict of tensors.")
    return dict(state)


def _load_vgg16_state(features: nn.Sequential, state: dict[str, Any], source: str) -> None:
    state = {key.removeprefix("module."): value for key, value in state.items()}
    if any(key.startswith("features.") for key in state):
        state = {key.removeprefix("features."): value for key, value in state.items() if key.startswith("features.")}
    expected = features.state_dict()
    missing = sorted(set(expected) - set(state), key=_key_order)
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source} does not fit VGG-16's conv base (torchvision's vgg16().features): "
                         f"missing keys {missing[:6]}{' …' if len(missing) > 6 else ''}, "
                         f"unexpected keys {unexpected[:6]}{' …' if len(unexpected) > 6 else ''}. "
                         f"Expected keys like '0.weight' or 'features.0.weight'.")
    wrong = [f"{key}: {tuple(state[key].shape)} instead of {tuple(value.shape)}" for key, value in expected.items()
             if not isinstance(state[key], torch.Tensor) or state[key].shape != value.shape]
    if wrong:
        raise ValueError(f"{source} has tensors of the wrong shape for VGG-16's conv base: {wrong[:4]}")
    features.load_state_dict(state, strict=True)


def _key_order(key: str) -> tuple[int, str]:
    head, _, tail = key.partition(".")
    return (int(head) if head.isdigit() else -1, tail)


# ---------------------------------------------------------------------------------------------------------------------
# images
def load_image(path: str | os.PathLike, size: int | None = None, *, min_size: int = VGG16_MIN_SIZE) -> torch.Tensor:
    """Read an image file as an RGB float tensor (3, H, W) in ``[0, 1]`` (grey images get three equal channels).

    Parameters
    ----------
    path : str or path
        Any format Pillow reads (PNG, JPEG, BMP, TIFF, …).
    size : int, optional
        Resize (bilinear, antialiased) so that the *shorter* side is ``size``, keeping the aspect ratio
        (torchvision's ``Resize(size)``).
    min_size : int
        The smallest height and width accepted, before and after resizing (VGG-16: 32).

    Raises
    ------
    FileNotFoundError
        If there is no file at ``path``.
    ValueError
        If the file is not a readable image, or the image is smaller than ``min_size``.
    """
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Image not found: {path}")
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ValueError(f"Could not read {path} as an image: {exc}") from exc
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255.0
    check_image_size(tensor, min_size=min_size, name=str(path))
    if size is not None:
        check_int(size, owner="load_image", name="size", minimum=min_size)
        from torchvision.transforms.functional import resize

        tensor = resize(tensor, [size], antialias=True).clamp(0.0, 1.0)
        check_image_size(tensor, min_size=min_size, name=f"{path} resized to shorter side {size}")
    return tensor


def check_image_size(images: torch.Tensor, min_size: int = VGG16_MIN_SIZE, name: str = "images") -> None:
    """Raise a ValueError if ``images`` (…, H, W) are smaller than ``min_size`` in height or width."""
    height, width = images.shape[-2:]
    if height < min_size or width < min_size:
        raise ValueError(f"{name} is {height}x{width} pixels, smaller than VGG-16's minimum of "
                         f"{min_size}x{min_size} (five 2x2 max pools leave no location at block 5).")


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


# ---------------------------------------------------------------------------------------------------------------------
# pooling over locations
class LocationPool(nn.Module):
    """Pool location scores ``s`` (…, L) into one score per image (…), over the last dimension.

    ========== =========================== ===============================================================
    mode       image score                 relevance of location ``l`` (:class:`LocationPoolRule`)
    ========== =========================== ===============================================================
    sum        ``Σ_l s_l`` (SPEC default)  ``s_l / Σ s · R``  (``= s_l`` at the top)
    mean       ``1/L Σ_l s_l``             ``s_l / Σ s · R``  (same shares as the sum)
    positive   ``Σ_l max(0, s_l)``         ``max(0, s_l) / Σ max(0, s) · R``: only locations with evidence
    max        ``max_l s_l``               all of ``R`` to the (first) maximal location
    ========== =========================== ===============================================================

    ``positive`` suits k-means (``f_c > 0`` exactly on the locations assigned to cluster ``c``: the image score is
    the cluster's total evidence, and the other locations get no relevance); ``sum`` and ``mean`` suit KDE scores,
    which are >= 0 (outlier) or ~ >= 0 (inlier) everywhere.

    ``rule`` is the pool's rule for :class:`captum.attr.LRP` (see :mod:`neon_attrib.captum`).
    """

    rule = _CaptumRule()

    def __init__(self, mode: PoolMode = "sum"):
        super().__init__()
        if mode not in _POOLS:
            raise ValueError(f"The 'mode' parameter of LocationPool must be one of {_POOLS}. Got {mode!r} instead.")
        self.mode = mode

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        if self.mode == "sum":
            return scores.sum(-1)
        if self.mode == "mean":
            return scores.mean(-1)
        if self.mode == "positive":
            return scores.clamp_min(0.0).sum(-1)
        return scores.amax(-1)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


class LocationPoolRule(_NeonHook):
    """LRP rule of :class:`LocationPool`: each location gets its share of the image's relevance (see the table there).

    Conserves exactly (a pool of all-zero contributions passes nothing). Unlike the gradient, which hands every
    location the whole ``R`` under sum pooling, the shares add up to ``R``.

    Examples
    --------
    >>> LocationPoolRule().copy()
    LocationPoolRule()
    """

    def relevance(self, module, x, out, relevance_out):
        if module.mode == "max":
            winner = torch.nn.functional.one_hot(x.argmax(-1), x.shape[-1]).to(x.dtype)
            return winner * relevance_out.unsqueeze(-1)
        contributions = x.clamp_min(0.0) if module.mode == "positive" else x
        return contributions * safe_divide(relevance_out, contributions.sum(-1)).unsqueeze(-1)


# ---------------------------------------------------------------------------------------------------------------------
# leave-one-out heads for a model fitted on the image it explains
class _SelfFitted:
    """Mixin: input row ``r`` is the location that was support point ``r mod N``; it is left out of its own model."""

    _name: str

    def _self_index(self, x: torch.Tensor, n_support: int) -> torch.Tensor:
        if n_support < 2:
            raise ValueError(f"{self._name} needs at least 2 support points (locations) to leave one out. "
                             f"Got {n_support}.")
        if x.shape[0] % n_support:
            raise ValueError(f"{self._name} scores the locations it was fitted on, row r against all support points "
                             f"but r mod {n_support}; got {x.shape[0]} rows, not a multiple of {n_support}. Explain "
                             f"the image(s) it was fitted on (DeepNeon.fit_self), in the same order.")
        return torch.arange(x.shape[0], device=x.device) % n_support


class LeaveOneOutKDEOutlier(_SelfFitted, KDEOutlier):
    """A :class:`~neon_attrib.models.KDEOutlier` for the locations of the image it was fitted on (the book's wood).

    Row ``r`` of the input is scored against every support point *but* ``r mod N`` (itself, when the input is the
    fitted data in the fitted order)::

        o_r(a) = −(1/γ) log( 1/(N−1) Σ_{k ≠ r} exp(−γ ‖a − u_k‖²) )

    Without leaving itself out, a location's own support point dominates its density (``exp(0) = 1``), every score
    is close to ``log(N)/γ`` and the explanation ``a_i(a_i − Σ_k p_k u_ik)`` vanishes exactly where the location is
    unusual. :meth:`DeepNeon.fit_self` builds one; its CNN rule is :class:`LeaveOneOutKDEOutlierRule`.
    """

    @classmethod
    def from_head(cls, head: KDEOutlier) -> LeaveOneOutKDEOutlier:
        """An unfitted copy of ``head``'s hyperparameters, on its dtype and device."""
        dtype, device = module_dtype_device(head)
        return cls(head.gamma, beta=head.beta, eps=head.eps, chunk_size=head.chunk_size).to(dtype=dtype,
                                                                                            device=device)

    def fit(self, X: ArrayLike, y: Any = None) -> LeaveOneOutKDEOutlier:
        super().fit(X, y)
        if self.distance.support.shape[0] < 2:
            raise ValueError(f"{self._name} needs at least 2 support points (locations). Got 1.")
        return self

    def distances(self, x: torch.Tensor) -> torch.Tensor:
        """``‖x_r − u_k‖²`` (rows, N) with ``+inf`` at ``k = r mod N``."""
        support = self.distance.support
        index = self._self_index(x, support.shape[0])
        h = squared_distance(x, support)
        mask = torch.nn.functional.one_hot(index, support.shape[0]).bool()
        return h.masked_fill(mask, math.inf)

    def forward(self, x: ArrayLike) -> torch.Tensor:
        self._check_fitted()
        x = self._as_tensor(x)
        n_support = self.distance.support.shape[0]
        alpha = -float(self.gamma)
        return (torch.logsumexp(alpha * self.distances(x), -1) - math.log(n_support - 1)) / alpha

    @torch.no_grad()
    def score(self, x: ArrayLike) -> torch.Tensor:
        return self(x)


class LeaveOneOutKDEOutlierRule(_BetaHook):
    """CNN rule of :class:`LeaveOneOutKDEOutlier`: :class:`~neon_attrib.rules.KDEOutlierActivationRule` with the
    soft-argmin over ``k ≠ r``: ``R_i = a_i (a_i − Σ_{k≠r} p_k u_ik) · R / o_r(a)``.
    """

    def relevance(self, module, x, out, relevance_out):
        beta = self.beta if self.beta is not None else module.beta_
        weights = torch.softmax(-beta * module.distances(x), dim=-1)
        return x * (x - weights @ module.distance.support) * safe_divide(relevance_out, out).unsqueeze(-1)


class LeaveOneOutKDEInlier(_SelfFitted, KDEInlier):
    """A :class:`~neon_attrib.models.KDEInlier` for the locations of the image it was fitted on.

    Row ``r`` uses the mean random feature of the support set without ``u_{r mod N}``:
    ``μ^{(−r)} = (N μ − φ(u_r)) / (N − 1)``, so its score approximates ``1/(N−1) Σ_{k≠r} exp(−γ‖a − u_k‖²)``
    instead of adding the constant ``1/N`` of a location's similarity to itself. CNN rule:
    :class:`LeaveOneOutKDEInlierRule`.
    """

    @classmethod
    def from_head(cls, head: KDEInlier) -> LeaveOneOutKDEInlier:
        """An unfitted copy of ``head``'s hyperparameters, on its dtype and device."""
        dtype, device = module_dtype_device(head)
        return cls(head.gamma, head.n_features, head.seed, eps=head.eps).to(dtype=dtype, device=device)

    def fit(self, X: ArrayLike, y: Any = None) -> LeaveOneOutKDEInlier:
        super().fit(X, y)
        if self.support.shape[0] < 2:
            raise ValueError(f"{self._name} needs at least 2 support points (locations). Got 1.")
        return self

    def row_means(self, x: torch.Tensor) -> torch.Tensor:
        """``μ^{(−r)}`` for every row of ``x``, (rows, H)."""
        layer, support = self.features, self.support
        index = self._self_index(x, support.shape[0])
        phi = math.sqrt(2.0) * torch.cos(torch.addmm(layer.bias, support, layer.omega.T))  # (N, H)
        n = support.shape[0]
        return ((n * layer.mean - phi) / (n - 1))[index]

    def forward(self, x: ArrayLike) -> torch.Tensor:
        self._check_fitted()
        x = self._as_tensor(x)
        layer = self.features
        phi = math.sqrt(2.0) * torch.cos(torch.addmm(layer.bias, x, layer.omega.T))
        return (phi * self.row_means(x)).mean(-1)


class LeaveOneOutKDEInlierRule(_EpsHook):
    """CNN rule of :class:`LeaveOneOutKDEInlier`: :class:`~neon_attrib.rules.KDEInlierActivationRule` with the
    row's own mean feature ``μ^{(−r)}`` in ``c_j = √2 μ_j / H``.
    """

    def relevance(self, module, x, out, relevance_out):
        eps = self.eps if self.eps is not None else module.eps_
        layer = module.features
        z = x @ layer.omega.T  # (rows, H)
        coef = math.sqrt(2.0) * module.row_means(x) / layer.omega.shape[0]
        sin_part = -torch.sin(layer.bias) * torch.sinc(z / math.pi)  # sin(z)/z, finite at z = 0
        sign = torch.where(z >= 0, 1.0, -1.0).to(z.dtype)
        cos_part = torch.cos(layer.bias) * torch.cos(z) / (z + sign * eps)
        g = coef * (sin_part + cos_part) * safe_divide(relevance_out, out).unsqueeze(-1)
        return x * (g @ layer.omega)


# ---------------------------------------------------------------------------------------------------------------------
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
    """

    pixels: torch.Tensor | None
    features: torch.Tensor
    locations: torch.Tensor
    output: torch.Tensor
    target: torch.Tensor | None


class DeepNeon(nn.Module):
    """A NEON head on a CNN's feature map: every spatial location is one data point (SPEC §4).

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
        Location pooling (:class:`LocationPool`); SPEC's default is the sum. ``"positive"`` suits k-means.
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
        Use the fast exact equivalents of :mod:`neon_attrib.fast` (``FastEpsilonGammaBox``, ``FastEpsilonPlusFlat``)
        for the named composites (default): the same numbers as Zennit's rules (checked at run time, with a fallback
        to the general formula) at about 4-5x their speed. ``fast=False`` runs Zennit's own rule implementations: the
        reference path. Ignored when ``composite`` is a Composite instance.

    Notes
    -----
    For large support sets give the head ``KDEOutlier(gamma, fused=True)``: the score and its gradient in one chunked
    pass over the support set, no (rows, N) matrix, so N = 10^6 support locations fit in bounded memory. The CNN rule
    takes the soft-argmin weights from that gradient (β = γ, the default), so an explanation makes one pass over the
    support set in all. (Captum's ``LRP``, which hooks leaf layers, needs the layered forward: use
    :class:`~neon_attrib.captum.NeonLRP` for fused heads.)

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
    >>> model = DeepNeon(vgg16_features(), KMeansMembership(n_clusters=2, n_init=1, seed=0), pool="positive")
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
        if not isinstance(head, (KDEOutlier, KDEInlier, KMeansMembership)):
            raise TypeError(f"The 'head' parameter of DeepNeon must be a KDEOutlier, KDEInlier or KMeansMembership. "
                            f"Got {type(head).__name__}.")
        if isinstance(composite, str) and composite not in _COMPOSITES:
            raise ValueError(f"The 'composite' parameter of DeepNeon must be one of {_COMPOSITES} or a zennit "
                             f"Composite. Got {composite!r} instead.")
        if not isinstance(composite, (str, Composite)):
            raise TypeError(f"The 'composite' parameter of DeepNeon must be a name or a zennit Composite. "
                            f"Got {type(composite).__name__}.")
        if (low is None) != (high is None):
            raise ValueError("Pass both 'low' and 'high' to DeepNeon, or neither (then the preprocessing's are used).")
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
        return scores.reshape(n, h * w, -1).transpose(1, 2)

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
            same sample.
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
        rows = self.feature_rows(images, batch_size=batch_size, max_locations=max_locations, seed=seed,
                                 progress=progress)
        return self.fit_head(rows)

    def fit_head(self, rows: ArrayLike) -> DeepNeon:
        """Fit the head on location vectors (rows, C) computed before (:meth:`feature_rows`): one pass of the
        feature extractor can serve several heads. The head is moved to the features' dtype and device first.
        Returns ``self``.
        """
        dtype, device = _features_dtype_device(self.features)
        self.head.to(dtype=dtype, device=device)
        rows = as_float_tensor(rows, dtype=dtype, device=device, owner="DeepNeon", name="rows", strict_float=False)
        self.head.fit(rows)
        self.n_locations_fit_ = int(rows.shape[0])
        self.n_channels_ = int(rows.shape[1])
        return self

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
        if leave_one_out:
            if isinstance(self.head, KDEOutlier) and not isinstance(self.head, LeaveOneOutKDEOutlier):
                self.head = LeaveOneOutKDEOutlier.from_head(self.head)
            elif isinstance(self.head, KDEInlier) and not isinstance(self.head, LeaveOneOutKDEInlier):
                self.head = LeaveOneOutKDEInlier.from_head(self.head)
        if isinstance(images, torch.Tensor) and images.ndim == 3:
            images = images.unsqueeze(0)
        return self.fit(images, batch_size=max(1, len(images)) if isinstance(images, torch.Tensor) else 32,
                        progress=progress)

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
        if self.fast:
            try:
                from .fast import FastEpsilonGammaBox, FastEpsilonPlusFlat
            except ImportError as exc:  # pragma: no cover - depends on the optional module
                raise ImportError("DeepNeon(fast=True) needs neon_attrib.fast (FastEpsilonGammaBox, "
                                  "FastEpsilonPlusFlat), which this installation lacks. Use fast=False.") from exc
            if self.composite == "epsilon_gamma_box":
                low, high = self.input_bounds()
                return FastEpsilonGammaBox(low, high, gamma=self.lrp_gamma, layer_map=layer_map)
            return FastEpsilonPlusFlat(layer_map=layer_map)
        if self.composite == "epsilon_gamma_box":
            low, high = self.input_bounds()
            return EpsilonGammaBox(low=low, high=high, gamma=self.lrp_gamma, layer_map=layer_map)
        return EpsilonPlusFlat(layer_map=layer_map)

    def neon_composite(self, beta: float | None = None, eps: float | None = None) -> NeonComposite:
        """The composite :func:`~neon_attrib.explain` uses: the head's CNN rules, the pool rule, and
        :meth:`base_composite` for everything else.

        Parameters
        ----------
        beta, eps : float, optional
            Override the head's soft-argmin sharpness / random-feature stabiliser.
        """
        ours = [
            (LocationPool, LocationPoolRule()),
            (LeaveOneOutKDEOutlier, LeaveOneOutKDEOutlierRule(beta=beta)),
            (LeaveOneOutKDEInlier, LeaveOneOutKDEInlierRule(eps=eps)),
        ]
        return NeonComposite(beta=beta, eps=eps, mode="activation", base=self.base_composite(), layer_map=ours)

    def explainer(self, *, beta: float | None = None, eps: float | None = None, composite: Composite | None = None,
                  **options: Any):
        """A reusable explainer: the composite is registered once, then every call explains one batch.

        Cheaper than :func:`~neon_attrib.explain` in a loop (no hook registration and no target-probing forward pass
        per batch). Close it (or use it as a context manager) to remove the hooks.

        Parameters
        ----------
        beta, eps : float, optional
            Passed to :meth:`neon_composite`.
        composite : zennit.core.Composite, optional
            Instead of :meth:`neon_composite`.
        **options
            ``channels_last``, ``autocast_dtype`` (approximate) and ``cudnn_benchmark`` of
            :class:`~neon_attrib.fast.LRPExplainer`.

        Returns
        -------
        neon_attrib.fast.LRPExplainer
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
        if composite is None:
            composite = self.neon_composite(beta=beta, eps=eps)
        elif beta is not None or eps is not None:
            raise ValueError("Pass beta/eps either to explainer or to your composite, not both.")
        return _DeepNeonExplainer(self, composite, **options)

    def relevance(self, images: torch.Tensor, target: Any = None, *, beta: float | None = None,
                  eps: float | None = None, composite: Composite | None = None,
                  to_pixels: bool = True) -> DeepRelevance:
        """Explain like :func:`~neon_attrib.explain`, and also return the relevance at the feature map and locations.

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
            the head's and the pool's rules only, at the cost of one forward pass.

        Returns
        -------
        DeepRelevance
        """
        dtype, device = module_dtype_device(self)
        inputs = as_float_tensor(images, dtype=dtype, device=device, owner="DeepNeon", name="images")
        inputs = inputs.detach().clone()
        if composite is None:
            composite = self.neon_composite(beta=beta, eps=eps)
        elif beta is not None or eps is not None:
            raise ValueError("Pass beta/eps either to relevance or to your composite, not both.")
        with torch.no_grad():
            probe = self(inputs)
        targets = None
        if probe.ndim > 1:
            targets = (self.default_target(probe) if target is None else
                       as_targets(target, n=probe.shape[0], n_outputs=probe.shape[1], owner="DeepNeon",
                                  device=probe.device))
        inputs.requires_grad_(to_pixels)
        with composite.context(self):
            with torch.set_grad_enabled(to_pixels):
                fmap = self._feature_map(inputs)
            if not to_pixels:
                fmap.requires_grad_(True)
            scores = self._scores(fmap)
            output = self.pool(scores)
            wrt = (inputs, fmap, scores) if to_pixels else (fmap, scores)
            grads = torch.autograd.grad(output, wrt, grad_outputs=attribution_output(output, targets))
        pixels = grads[0].detach() if to_pixels else None
        features, locations = grads[-2:]
        if locations.ndim == 3:  # (n, K, L): only the target row is non-zero
            locations = locations.sum(1)
        return DeepRelevance(pixels=pixels, features=features.detach(),
                             locations=locations.detach().reshape(-1, *fmap.shape[-2:]), output=output.detach(),
                             target=targets)

    def extra_repr(self) -> str:
        composite = self.composite if isinstance(self.composite, str) else type(self.composite).__name__
        return f"preprocessing={self.preprocessing.name!r}, composite={composite!r}, fast={self.fast}"


# ---------------------------------------------------------------------------------------------------------------------
class _DeepNeonExplainer(LRPExplainer):
    """:class:`~neon_attrib.fast.LRPExplainer` for a :class:`DeepNeon`: checks the images, and for k-means explains the
    default target (the cluster of highest pooled score) unless an ``attr_output`` is given."""

    def __call__(self, images: Any, attr_output: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        dtype, device = module_dtype_device(self.model)
        images = as_float_tensor(images, dtype=dtype, device=device, owner="DeepNeon.explainer", name="images")
        if images.ndim != 4:
            raise ValueError(f"DeepNeon.explainer expects a batch of images (n, channels, H, W). "
                             f"Got {tuple(images.shape)}.")
        if attr_output is None:
            def attr_output(output: torch.Tensor) -> torch.Tensor:
                return attribution_output(output, self.model.default_target(output) if output.ndim > 1 else None)
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
