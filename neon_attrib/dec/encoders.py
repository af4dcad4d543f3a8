"""The DEC autoencoder: encoder to the sphere, mirrored decoder, and the fixed input scaling.

Architecture (documented because the attributable heads in :mod:`neon_attrib.dec.heads` reuse the encoder):

* **vectors** ``(n, d)`` and any input that is neither a vector nor a feature map (flattened), an MLP as in Xie et
  al.: ``Flatten -> FeatureScale -> [Linear -> ReLU] * len(hidden_dims) -> Linear(embedding_dim) -> SphereNorm``,
  ``hidden_dims = (500, 500, 2000)`` by default, and the mirrored decoder.
* **feature maps** ``(n, C, H, W)``, a small convolutional encoder: ``FeatureScale`` (one positive scale per channel),
  an average pooling for maps larger than ``pool_to`` (16 by default: 32x32 maps are pooled 2x2), then stride-2
  3x3 convolutions with ReLU (channels from ``conv_channels``) until the map is at most 4x4, then
  ``Flatten -> Linear(dense_dim) -> ReLU -> Linear(embedding_dim) -> SphereNorm``. The decoder mirrors it with
  transposed convolutions that restore the exact input size.

``FeatureScale`` divides by the root mean square of each feature (vectors) or channel (maps) of the training data;
a positive per-feature scaling keeps zero at zero (so convolution padding means the same in both spaces) and is
explained exactly by passing relevance through.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["DECEncoder", "FeatureScale", "SphereNorm", "build_autoencoder", "feature_rms", "reconstruction_target"]


class FeatureScale(nn.Module):
    """Divide each feature (``dim = 1``) by a fixed positive scale, kept as a buffer.

    Parameters
    ----------
    scale : torch.Tensor
        Positive scales, shape ``(C,)``; broadcast over any trailing spatial dimensions.
    """

    scale: torch.Tensor

    def __init__(self, scale: torch.Tensor):
        super().__init__()
        scale = torch.as_tensor(scale, dtype=torch.float32)
        if scale.ndim != 1 or not bool((scale > 0).all()):
            raise ValueError("The 'scale' of FeatureScale must be a 1-d tensor of positive values.")
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return x / self.scale.view(shape)


class SphereNorm(nn.Module):
    """Project onto the sphere of radius ``radius``: ``z = radius * e / |e|`` (row-wise).

    Parameters
    ----------
    radius : float
        Radius of the sphere (8 in the activation-clustering paper).
    eps : float
        Lower bound on ``|e|`` to avoid dividing by zero.
    """

    def __init__(self, radius: float = 8.0, eps: float = 1e-12):
        super().__init__()
        self.radius = float(radius)
        self.eps = float(eps)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.radius * e / e.norm(dim=1, keepdim=True).clamp_min(self.eps)

    def extra_repr(self) -> str:
        return f"radius={self.radius}"


class DECEncoder(nn.Sequential):
    """The DEC encoder, an ``nn.Sequential`` from activations to the sphere (last module: :class:`SphereNorm`)."""


def feature_rms(X: torch.Tensor, conv: bool) -> torch.Tensor:
    """The scales of :class:`FeatureScale`: root mean square per channel (``conv``) or per flattened feature.

    Features that are always zero keep scale one.
    """
    dims = [0, *range(2, X.ndim)] if conv else [0]
    flat = X if conv else X.reshape(X.shape[0], -1)
    rms = flat.double().pow(2).mean(dim=dims).sqrt().float()
    return torch.where(rms > 0, rms, torch.ones_like(rms))


def build_autoencoder(in_shape: tuple[int, ...], *, conv: bool, embedding_dim: int, radius: float,
                      scale: torch.Tensor, hidden_dims: Sequence[int], conv_channels: Sequence[int], dense_dim: int,
                      pool_to: int | None) -> tuple[DECEncoder, nn.Sequential, int]:
    """Encoder and decoder for samples of shape ``in_shape`` (see the module docstring).

    Returns
    -------
    encoder : DECEncoder
    decoder : torch.nn.Sequential
        From the sphere back to the input as the encoder's first layers see it (:func:`reconstruction_target`).
    pool : int
        The average-pooling factor of the conv encoder (1: none; always 1 for the MLP).
    """
    if conv:
        return _build_conv(in_shape, embedding_dim, radius, scale, conv_channels, dense_dim, pool_to)
    encoder, decoder = _build_mlp(in_shape, embedding_dim, radius, scale, hidden_dims)
    return encoder, decoder, 1


def reconstruction_target(x: torch.Tensor, encoder: DECEncoder, conv: bool, pool: int = 1) -> torch.Tensor:
    """What the decoder reconstructs: ``x`` as the encoder's first layers see it (feature-scaled, pooled)."""
    scale = next(m for m in encoder if isinstance(m, FeatureScale))
    if conv:
        x = scale(x)
        return nn.functional.avg_pool2d(x, pool, ceil_mode=True) if pool > 1 else x
    return scale(x.reshape(x.shape[0], -1)).reshape(x.shape)


def _conv_out(size: int) -> int:
    # 3x3 kernel, stride 2, padding 1
    return (size - 1) // 2 + 1


def _build_conv(in_shape: tuple[int, ...], embedding_dim: int, radius: float, scale: torch.Tensor,
                conv_channels: Sequence[int], dense_dim: int,
                pool_to: int | None) -> tuple[DECEncoder, nn.Sequential, int]:
    c, h, w = in_shape
    enc: list[nn.Module] = [FeatureScale(scale)]
    pool = 1
    if pool_to is not None and max(h, w) > pool_to:
        pool = -(-max(h, w) // pool_to)
        enc.append(nn.AvgPool2d(pool, ceil_mode=True))
        h, w = -(-h // pool), -(-w // pool)
    sizes = [(h, w)]
    chans = [c]
    i = 0
    while max(sizes[-1]) > 4 or i == 0:
        out_c = conv_channels[min(i, len(conv_channels) - 1)]
        enc += [nn.Conv2d(chans[-1], out_c, 3, stride=2, padding=1), nn.ReLU()]
        sizes.append((_conv_out(sizes[-1][0]), _conv_out(sizes[-1][1])))
        chans.append(out_c)
        i += 1
    flat = chans[-1] * sizes[-1][0] * sizes[-1][1]
    enc += [nn.Flatten(), nn.Linear(flat, dense_dim), nn.ReLU(), nn.Linear(dense_dim, embedding_dim),
            SphereNorm(radius)]
    dec: list[nn.Module] = [nn.Linear(embedding_dim, dense_dim), nn.ReLU(), nn.Linear(dense_dim, flat), nn.ReLU(),
                            nn.Unflatten(1, (chans[-1], *sizes[-1]))]
    for j in range(len(chans) - 1, 0, -1):
        target = sizes[j - 1]
        pad = tuple(t - (2 * s - 1) for t, s in zip(target, sizes[j]))
        dec.append(nn.ConvTranspose2d(chans[j], chans[j - 1], 3, stride=2, padding=1, output_padding=pad))
        if j > 1:
            dec.append(nn.ReLU())
    return DECEncoder(*enc), nn.Sequential(*dec), pool


def _build_mlp(in_shape: tuple[int, ...], embedding_dim: int, radius: float, scale: torch.Tensor,
               hidden_dims: Sequence[int]) -> tuple[DECEncoder, nn.Sequential]:
    d = int(np.prod(in_shape))
    dims = [d, *hidden_dims]
    enc: list[nn.Module] = [nn.Flatten(), FeatureScale(scale)]
    for a, b in zip(dims[:-1], dims[1:]):
        enc += [nn.Linear(a, b), nn.ReLU()]
    enc += [nn.Linear(dims[-1], embedding_dim), SphereNorm(radius)]
    dec: list[nn.Module] = []
    back = [embedding_dim, *reversed(dims)]
    for i, (a, b) in enumerate(zip(back[:-1], back[1:])):
        dec.append(nn.Linear(a, b))
        if i < len(back) - 2:
            dec.append(nn.ReLU())
    dec.append(nn.Unflatten(1, in_shape))
    return DECEncoder(*enc), nn.Sequential(*dec)
