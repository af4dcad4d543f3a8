"""CNN backbones and their weights: VGG-11/13/16/19 (with or without batch norm), ResNet-18/34/50/101, Wide-ResNet-50-2
(torchvision's architectures) and the CIFAR-10 ResNets with option-A shortcuts; the canonizers that make them fit
for LRP (:func:`default_canonizers`); the preprocessing their weights expect (:func:`weights_preprocessing`).

=======================================  ==========================================================================
name                                     feature extractor (what :func:`backbone` returns)
=======================================  ==========================================================================
``vgg11`` … ``vgg19``, ``vgg16_bn`` …    ``torchvision.models.vgg*().features``: block 5, 512 channels, stride 32
``resnet18`` … ``wide_resnet50_2``       torchvision's ResNet without ``avgpool``/``fc``: ``layer4``, stride 32
``cifar_resnet20`` … ``cifar_resnet56``  :class:`CifarResNet` without ``avgpool``/``linear``: ``layer3``, 64 channels,
                                         stride 4 (8x8 on CIFAR images)
=======================================  ==========================================================================

Module names are torchvision's (``"layer2"``, ``"features.15"``), so :class:`~neon_attrib.vision.taps.FeatureTaps`
can tap them and torchvision's state_dicts load into them.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from zennit.canonizers import Canonizer
from zennit.layer import Sum

from ..core.composites import is_neon_module
from ..core.validation import BATCH_NORMS
from ..pipeline.graph import GraphCanonizer, needs_graph_canonizer, register_documented
from .fast import FastResNetCanonizer, MergeBatchNorms
from .taps import BilinearResize, ChannelPool

__all__ = [
    "BACKBONES",
    "backbone",
    "vgg16_features",
    "weights_preprocessing",
    "read_state_dict",
    "default_canonizers",
    "CifarResNet",
    "CifarBasicBlock",
    "ShortcutA",
]


_VGG_CONFIGS: dict[str, tuple] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}
_VGG16_CONFIG = _VGG_CONFIGS["vgg16"]
_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "wide_resnet50_2")
_CIFAR_DEPTHS = {"cifar_resnet20": 20, "cifar_resnet32": 32, "cifar_resnet44": 44, "cifar_resnet56": 56}

#: The names :func:`backbone` knows.
BACKBONES: tuple[str, ...] = (*_VGG_CONFIGS, *(f"{name}_bn" for name in _VGG_CONFIGS), *_RESNETS, *_CIFAR_DEPTHS)

#: Keys of a whole-classifier state_dict that a feature extractor does not have (ignored when loading).
_CLASSIFIER_PREFIXES = ("fc.", "linear.", "classifier.", "avgpool.")


# ---------------------------------------------------------------------------------------------------------------------
# CIFAR-10 ResNets with option-A shortcuts (He et al. 2016, Section 4.2)
# ---------------------------------------------------------------------------------------------------------------------


class ShortcutA(nn.Module):
    """The parameter-free option-A shortcut: keep every other row and column, zero-pad ``pad`` channels on each side.

    A selection followed by zeros: every output is one input or 0, with weight 1, so its gradient *is* the z-rule
    (``R_in = x * R_out / x`` for the selected entries): LRP passes it without a rule of its own, exactly and
    conservatively. The zero channels receive no relevance from the :class:`zennit.layer.Sum` after them (the Norm
    rule hands ``0 / sum`` to a zero input).

    Examples
    --------
    >>> ShortcutA(pad=4)(torch.ones(1, 8, 6, 6)).shape
    torch.Size([1, 16, 3, 3])
    """

    def __init__(self, pad: int):
        super().__init__()
        self.pad = int(pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class CifarBasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with the addition as a :class:`zennit.layer.Sum` module
    over stacked inputs, and one ReLU module per call site, so that LRP rules reach every step.

    Parameter names are those of the akamaster checkpoints (``conv1``, ``bn1``, ``conv2``, ``bn2``).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = ShortcutA(planes // 4) if stride != 1 or in_planes != planes else nn.Identity()
        self.add = Sum(dim=1)  # branches stacked after the batch axis: block copies and sums (FastResNetCanonizer)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(self.add(torch.stack([out, self.shortcut(x)], dim=1)))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 CIFAR images with option-A shortcuts (ResNet-20: ``n = 3``, ResNet-56: ``n = 9``).

    Stages of 16, 32 and 64 channels, strides 1, 2, 2; global average pooling and a linear classifier. The state_dict
    keys are those of Yerlan Idelbayev's checkpoints (``akamaster/pytorch_resnet_cifar10``, ``"module."`` stripped),
    which expect torchvision's ImageNet normalisation (``"torchvision"`` preprocessing).

    Parameters
    ----------
    depth : int
        ``6n + 2``: 20, 32, 44, 56, 110, …
    num_classes : int
        Outputs of the classifier.

    Examples
    --------
    >>> CifarResNet(20)(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    def __init__(self, depth: int = 56, num_classes: int = 10):
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"The 'depth' parameter of CifarResNet must be 6n + 2 (20, 32, 44, 56, ...). "
                             f"Got {depth!r} instead.")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._stage(16, 16, n, 1)
        self.layer2 = self._stage(16, 32, n, 2)
        self.layer3 = self._stage(32, 64, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(64, num_classes)
        for module in self.modules():  # the akamaster initialisation
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [CifarBasicBlock(in_planes, planes, stride)] + [CifarBasicBlock(planes, planes) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x))))))
        return self.linear(self.flatten(self.avgpool(x)))

    def extra_repr(self) -> str:
        return f"depth={self.depth}"


# ---------------------------------------------------------------------------------------------------------------------
# architectures
# ---------------------------------------------------------------------------------------------------------------------


def _vgg_conv_stack(config: tuple, batch_norm: bool = False) -> nn.Sequential:
    """``torchvision.models.vgg*(...).features`` (same modules, indices and init) without building the classifier."""
    layers: list[nn.Module] = []
    channels = 3
    for value in config:
        if value == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        conv = nn.Conv2d(channels, value, kernel_size=3, padding=1)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.constant_(conv.bias, 0)
        layers.append(conv)
        if batch_norm:
            layers.append(nn.BatchNorm2d(value))
        layers.append(nn.ReLU(inplace=True))
        channels = value
    return nn.Sequential(*layers)


def _vgg16_conv_stack() -> nn.Sequential:
    return _vgg_conv_stack(_VGG16_CONFIG)


def _strip_classifier(model: nn.Module) -> nn.Module:
    """The feature extractor of a known classifier (sharing its modules); any other module as it is."""
    if isinstance(model, torchvision.models.VGG):
        return model.features
    if isinstance(model, torchvision.models.ResNet):
        names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
        return nn.Sequential(OrderedDict((name, getattr(model, name)) for name in names))
    if isinstance(model, CifarResNet):
        names = ("conv1", "bn1", "relu", "layer1", "layer2", "layer3")
        return nn.Sequential(OrderedDict((name, getattr(model, name)) for name in names))
    return model


def _architecture(name: str) -> nn.Module:
    """The feature extractor ``name`` with random weights (the architecture's own initialisation)."""
    if name in _CIFAR_DEPTHS:
        return _strip_classifier(CifarResNet(_CIFAR_DEPTHS[name]))
    if name.removesuffix("_bn") in _VGG_CONFIGS:
        return _vgg_conv_stack(_VGG_CONFIGS[name.removesuffix("_bn")], batch_norm=name.endswith("_bn"))
    return _strip_classifier(getattr(torchvision.models, name)(weights=None))


def _torchvision_weights(name: str, weights: Any) -> Any:
    """The torchvision weights enum member that ``weights`` names for ``name``, or None if it names none."""
    if name in _CIFAR_DEPTHS:
        return None
    enum = torchvision.models.get_model_weights(name)
    if isinstance(weights, str) and weights in enum.__members__:
        return enum[weights]
    if isinstance(weights, torchvision.models.WeightsEnum):
        if not isinstance(weights, enum):
            raise ValueError(f"{weights} are not weights of {name}; expected a member of {enum.__name__} "
                             f"({', '.join(enum.__members__)}).")
        return weights
    return None


def backbone(name: str | nn.Module, weights: Any = None) -> nn.Module:
    """A CNN feature extractor by name (or from a classifier module), with random, torchvision's or local weights.

    Parameters
    ----------
    name : str or torch.nn.Module
        One of :data:`BACKBONES`: ``"vgg11"``, ``"vgg13"``, ``"vgg16"``, ``"vgg19"`` and their ``"_bn"`` variants (the
        conv base ``features``), ``"resnet18"``, ``"resnet34"``, ``"resnet50"``, ``"resnet101"``,
        ``"wide_resnet50_2"`` (torchvision's ResNet up to ``layer4``), ``"cifar_resnet20"``, ``"cifar_resnet32"``,
        ``"cifar_resnet44"``, ``"cifar_resnet56"`` (:class:`CifarResNet` up to ``layer3``). Or a module: a torchvision
        VGG or ResNet, or a :class:`CifarResNet`, loses its classifier (the result shares its modules); any other
        module is used as it is.
    weights : None, str, path, torchvision weights or dict
        * ``None``: random weights (the architecture's initialisation), or the module's own.
        * a torchvision weights name (``"IMAGENET1K_V1"``, ``"DEFAULT"``, …) or enum member, for a name: torchvision's
          weights, downloaded once into the torch hub cache (needs internet the first time).
        * a path to a ``torch.save``'d state_dict, loaded with ``weights_only=True``: keyed like the feature extractor
          or like the whole classifier (``"features.0.weight"``, ``"fc.weight"``, ``"module."`` prefixes: classifier
          keys are ignored). ``{"state_dict": ...}`` checkpoints (e.g. the akamaster CIFAR ResNets) work too.
        * a state_dict itself.

    Returns
    -------
    torch.nn.Module
        The feature extractor in eval mode, returning (n, C, h, w): VGG 512 channels at stride 32, ResNet-18/34 512 and
        ResNet-50/101/WRN-50-2 2048 channels at stride 32, CIFAR ResNets 64 channels at stride 4.

    Raises
    ------
    ValueError
        For an unknown name, weights of another architecture, or a file whose keys or shapes do not fit.
    FileNotFoundError
        If a path is given and no file is there.
    RuntimeError
        If torchvision's weights cannot be downloaded (no internet): pass a local path instead.

    Examples
    --------
    >>> features = backbone("resnet18")
    >>> features(torch.zeros(1, 3, 64, 64)).shape
    torch.Size([1, 512, 2, 2])
    >>> backbone("cifar_resnet20")(torch.zeros(1, 3, 32, 32)).shape
    torch.Size([1, 64, 8, 8])
    """
    if isinstance(name, nn.Module):
        features, label = _strip_classifier(name), type(name).__name__
        if weights is not None and not isinstance(weights, (Mapping, str, os.PathLike)):
            raise TypeError(f"backbone(module, weights) expects weights as a path or a state_dict. "
                            f"Got {type(weights).__name__}.")
    elif isinstance(name, str):
        if name not in BACKBONES:
            raise ValueError(f"Unknown backbone {name!r}. Expected one of {list(BACKBONES)} or a torch.nn.Module.")
        label = name
        member = _torchvision_weights(name, weights)
        if member is not None:
            return _download(name, member)
        if isinstance(weights, (str, os.PathLike)) and not Path(weights).exists():
            raise FileNotFoundError(f"Weights file not found: {weights} ({_weights_names(name)})")
        features = _architecture(name)
    else:
        raise TypeError(f"The 'name' parameter of backbone must be a str ({list(BACKBONES)}) or a torch.nn.Module. "
                        f"Got {type(name).__name__}.")
    if weights is None:
        return features.eval()
    if isinstance(weights, Mapping):
        state, source = dict(weights), "the given state_dict"
    elif isinstance(weights, (str, os.PathLike)):
        state, source = read_state_dict(Path(weights)), str(weights)
    else:
        raise TypeError(f"backbone expects weights as None, a torchvision weights name or member, a path or a "
                        f"state_dict. Got {type(weights).__name__}.")
    _load_state(features, state, source, label)
    return features.eval()


def _weights_names(name: str) -> str:
    if name in _CIFAR_DEPTHS:
        return f"{name} has no torchvision weights: pass a checkpoint's path, e.g. akamaster's resnet56-4bfd9763.th"
    names = ", ".join(torchvision.models.get_model_weights(name).__members__)
    return f"nor a torchvision weights name of {name}: {names}"


def _download(name: str, member: Any) -> nn.Module:
    try:
        model = getattr(torchvision.models, name)(weights=member)
    except Exception as exc:  # urllib / hub errors of many kinds
        raise RuntimeError(f"Could not load torchvision's {member} for {name} (it is downloaded on first use into "
                           f"the torch hub cache, {torch.hub.get_dir()}). Without internet, pass the path of a local "
                           f"state_dict instead: backbone({name!r}, weights='path/to/{name}.pth').") from exc
    return _strip_classifier(model).eval()


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
          A conversion of the Keras ImageNet weights is such a file (``"caffe"`` preprocessing).
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
        state, source = read_state_dict(Path(weights)), str(weights)
    else:
        raise TypeError(f"vgg16_features expects None, a VGG16_Weights name or member, a path or a state_dict. "
                        f"Got {type(weights).__name__}.")
    _load_vgg16_state(features, state, source)
    return features.eval()


# ---------------------------------------------------------------------------------------------------------------------
# weights: preprocessing, files, loading
# ---------------------------------------------------------------------------------------------------------------------


def weights_preprocessing(weights: Any, name: str = "vgg16") -> str | None:
    """The preprocessing name (:data:`~neon_attrib.vision.PREPROCESSINGS`) that ``weights`` of backbone ``name`` expect.

    * torchvision's weights (a name of ``name``'s weights enum, or any torchvision weights member): ``"torchvision"``,
      except VGG-16's ``IMAGENET1K_FEATURES`` (``"caffe_rgb"``);
    * any weights of a CIFAR ResNet (``name = "cifar_resnet*"``): ``"torchvision"``, the normalisation the akamaster
      checkpoints were trained with (ImageNet statistics, not CIFAR's);
    * None for random weights and for other paths (the file does not say).

    Examples
    --------
    >>> weights_preprocessing("IMAGENET1K_FEATURES"), weights_preprocessing("IMAGENET1K_V2", "resnet50")
    ('caffe_rgb', 'torchvision')
    >>> weights_preprocessing("resnet56-4bfd9763.th", "cifar_resnet56")
    'torchvision'
    """
    if weights is None:
        return None
    if name in _CIFAR_DEPTHS:
        return "torchvision"
    member = weights if isinstance(weights, torchvision.models.WeightsEnum) else None
    if member is None and isinstance(weights, str) and name in BACKBONES:
        member = _torchvision_weights(name, weights)
    if member is None:
        return None
    if member == torchvision.models.VGG16_Weights.IMAGENET1K_FEATURES:
        return "caffe_rgb"
    return "torchvision"


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from a file, loaded with ``weights_only=True`` (``{"state_dict": ...}`` / ``{"model": ...}``
    checkpoints are unwrapped).

    Raises
    ------
    FileNotFoundError
        If no file is at ``path``.
    ValueError
        If the file is not a torch file of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Weights file not found: {path}")
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
    _load_state(features, state, source, "vgg16", description="VGG-16's conv base (torchvision's vgg16().features)",
                hint="Expected keys like '0.weight' or 'features.0.weight'.")


def _load_state(features: nn.Module, state: dict[str, Any], source: str, label: str, description: str | None = None,
                hint: str = "") -> None:
    """Load ``state`` into ``features`` after checking every key and shape (``num_batches_tracked`` may be missing)."""
    description = description or f"the {label} feature extractor"
    state = {key.removeprefix("module."): value for key, value in state.items()}
    if any(key.startswith("features.") for key in state):  # a whole torchvision VGG
        state = {key.removeprefix("features."): value for key, value in state.items() if key.startswith("features.")}
    state = {key: value for key, value in state.items() if not key.startswith(_CLASSIFIER_PREFIXES)}
    expected = features.state_dict()
    missing = [key for key in expected if key not in state and not key.endswith("num_batches_tracked")]
    unexpected = sorted(set(state) - set(expected), key=_key_order)
    if missing or unexpected:
        raise ValueError(f"{source} does not fit {description}: "
                         f"missing keys {missing[:6]}{' …' if len(missing) > 6 else ''}, "
                         f"unexpected keys {unexpected[:6]}{' …' if len(unexpected) > 6 else ''}. "
                         f"{hint or 'Expected the keys of ' + label + ' (torchvision naming).'}")
    wrong = [f"{key}: {tuple(getattr(state[key], 'shape', ()))} instead of {tuple(value.shape)}"
             for key, value in expected.items() if key in state and
             (not isinstance(state[key], torch.Tensor) or state[key].shape != value.shape)]
    if wrong:
        raise ValueError(f"{source} has tensors of the wrong shape for {description}: {wrong[:4]}")
    for key, value in expected.items():
        if key not in state:  # num_batches_tracked of old checkpoints
            state[key] = value
    features.load_state_dict(state, strict=True)


def _key_order(key: str) -> tuple:
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in key.split("."))


# ---------------------------------------------------------------------------------------------------------------------
# canonizers
# ---------------------------------------------------------------------------------------------------------------------


def default_canonizers(model: nn.Module) -> list[Canonizer]:
    """The canonizers that make ``model`` fit for LRP.

    * The documented backbones (every module a torchvision ResNet / VGG, their blocks, :class:`CifarResNet`, a
      ``Sequential`` or a standard layer):

      - torchvision ResNets (any module containing torchvision ``BasicBlock``/``Bottleneck``):
        :class:`~neon_attrib.vision.fast.FastResNetCanonizer` (Zennit's ``ResNetCanonizer``, same numbers, faster):
        batch
        norms merged into the convolution before them, the residual addition as a :class:`zennit.layer.Sum` module
        (Norm rule: each branch gets its proportional share);
      - VGG with batch norm and :class:`CifarResNet` (additions are already ``Sum`` modules):
        :class:`~neon_attrib.vision.fast.MergeBatchNorms` (Zennit's ``SequentialMergeBatchNorm``, also for torchvision's
        ``FrozenBatchNorm2d``);
      - nothing for them without batch norms.

    * Any other model: :class:`~neon_attrib.pipeline.graph.GraphCanonizer`, which canonizes it from its ``torch.fx``
    graph
      (additions, functional activations and pools, batch norms merged by data flow, gates, layer norms) or refuses
      it, naming the operation without a rule, when the canonizer is applied.

    The model is searched whole, so a backbone inside a :class:`~neon_attrib.vision.taps.FeatureTaps` or a
    :class:`~neon_attrib.vision.deep.DeepNeon` is found. Canonizers are applied by the composite to the private copy the
    explain pipeline hooks, never to ``model`` itself.

    Note that Zennit 0.5's merge leaves each batch norm computing ``x / sqrt(1 + eps)``: the canonized network's output
    differs from the model's by a relative ~``eps / 2`` per batch norm (5e-6 with PyTorch's default ``eps = 1e-5``).
    Zennit 1.0 also sets the merged batch norm's ``eps`` to 0, so its canonized network computes the model's output up
    to rounding. Relevance therefore differs between the two Zennit versions by about that much; within one version
    the fast rules and Zennit's agree. The graph canonizer folds the batch norm into the convolution and replaces it by
    ``nn.Identity``: the model's output up to rounding with either version.

    Examples
    --------
    >>> [type(c).__name__ for c in default_canonizers(backbone("resnet18"))]
    ['FastResNetCanonizer']
    >>> [type(c).__name__ for c in default_canonizers(backbone("vgg11_bn"))], default_canonizers(backbone("vgg11"))
    (['MergeBatchNorms'], [])
    >>> [type(c).__name__ for c in default_canonizers(torchvision.models.densenet121(weights=None))]
    ['GraphCanonizer']
    """
    if needs_graph_canonizer(model):
        return [GraphCanonizer()]
    modules = [module for module in model.modules() if not is_neon_module(module)]
    if any(isinstance(module, (BasicBlock, Bottleneck)) for module in modules):
        return [FastResNetCanonizer()]
    if not any(isinstance(module, BATCH_NORMS) for module in modules):
        return []
    if all(_mergeable(parent, name) for parent in modules for name, child in parent.named_children()
           if isinstance(child, BATCH_NORMS)):
        return [MergeBatchNorms()]
    return [GraphCanonizer()]


register_documented((CifarResNet, CifarBasicBlock, ShortcutA, BilinearResize, ChannelPool))


def _mergeable(parent: nn.Module, name: str) -> bool:
    """Whether the batch norm ``parent.<name>`` directly follows a convolution / linear layer in the data flow."""
    if not isinstance(parent, (nn.Sequential, CifarBasicBlock, CifarResNet)):
        return False
    names = list(parent._modules)
    index = names.index(name)
    previous = parent._modules[names[index - 1]] if index else None
    return isinstance(previous, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
