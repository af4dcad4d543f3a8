"""CNN backbones and their weights: the VGG-16 conv base, from torchvision's weights API or a local state_dict."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["vgg16_features", "weights_preprocessing", "read_state_dict"]


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
        state, source = read_state_dict(Path(weights)), str(weights)
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


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
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
