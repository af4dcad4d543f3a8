"""The modules that the graph canonizer (:mod:`neon_attrib.pipeline.graph`) puts in place of operations hidden in a
CNN's
``forward``, and the one rule of their own they need.

Each is a modelling choice of the LRP literature, written so that the usual rules apply to it:

* :class:`Gate` ``x * g`` (squeeze-and-excitation, ConvNeXt's layer scale) and :class:`Scale` ``x * c``: the gate
  is held constant, so all relevance follows the signal ``x`` ("signal takes all", Arras et al. 2017; the identity rule
  of AttnLRP, Achtibat et al. 2024): :class:`GateRule` hands the output relevance to ``x``; the gate's branch gets none.
* :class:`ChannelAffine`: a batch norm that no convolution feeds alone (after a concatenation, DenseNet), as the
  affine per-channel map ``x * s + t`` it computes in eval mode; its rule is the z-rule (Zennit's ``Norm``,
  ``R_in = x * J^T (R / stab(out))``): the shift's share is dissipated, like a bias.
* :class:`ConstantNormLayerNorm`, :class:`ConstantNormGroupNorm`: the normaliser ``1 / sigma`` treated as a constant
  (Ali et al. 2022, "XAI for transformers: better explanations through conservative propagation"), which leaves a
  linear map (centring, scaling, the affine part); the z-rule on it (``Norm``) is exact LRP for that map.
* :class:`Mean`: ``x.mean(dims)``, an average pooling (a subclass of ``AdaptiveAvgPool1d``, so every Zennit composite
  gives it the average-pooling rule, Norm).
* :class:`Resample`: linear (bilinear, trilinear) interpolation, whose outputs are weighted means of inputs: an
  average pooling too (Norm).

Examples
--------
>>> gate = Gate()
>>> gate(torch.ones(1, 2, 3, 3), torch.full((1, 2, 1, 1), 0.5)).shape
torch.Size([1, 2, 3, 3])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .rules import NeonHook

__all__ = ["Gate", "Scale", "ChannelAffine", "ConstantNormLayerNorm", "ConstantNormGroupNorm", "Mean", "Resample",
           "GateRule"]


class Gate(nn.Module):
    """``x * gate`` with the gate held constant (detached): LRP gives all relevance to ``x`` (:class:`GateRule`).

    The output equals ``x * gate`` exactly; the gate's own branch (e.g. the squeeze-and-excitation MLP) receives no
    relevance and no gradient.
    """

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return x * gate.detach()


class Scale(nn.Module):
    """``x * factor`` for a number ``factor`` (``x / c`` is ``x * (1 / c)``): the z-rule of a one-input map gives all
    relevance to ``x`` (:class:`GateRule`).

    Parameters
    ----------
    factor : float
        The constant factor.
    """

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor!r}"


class ChannelAffine(nn.Module):
    """``x * scale + shift`` per channel (dimension 1): a batch norm in eval mode that is not merged into a convolution.

    Parameters
    ----------
    scale, shift : torch.Tensor
        (C,) each; kept as buffers.

    Examples
    --------
    >>> ChannelAffine(torch.tensor([2.0]), torch.tensor([1.0]))(torch.ones(1, 1, 2, 2))[0, 0, 0, 0].item()
    3.0
    """

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    @staticmethod
    def batch_norm_affine(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, shift)`` in float64 of the map ``x * scale + shift`` a batch norm computes in eval mode."""
        scale = torch.rsqrt(norm.running_var.detach().double() + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight.detach().double()
        shift = -norm.running_mean.detach().double() * scale
        if norm.bias is not None:
            shift = shift + norm.bias.detach().double()
        return scale, shift

    @classmethod
    def from_batch_norm(cls, norm: nn.Module) -> ChannelAffine:
        """The affine map a batch norm computes in eval mode (computed in float64, stored in its dtype)."""
        scale, shift = cls.batch_norm_affine(norm)
        dtype = norm.running_var.dtype
        return cls(scale.to(dtype), shift.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return torch.addcmul(self.shift.reshape(shape), x, self.scale.reshape(shape))


class ConstantNormLayerNorm(nn.Module):
    """Layer normalisation over the last ``len(normalized_shape)`` dimensions with ``1 / sigma`` held constant.

    The output equals :func:`torch.nn.functional.layer_norm` up to rounding; the Jacobian is the centring and scaling
    with sigma fixed, so the z-rule (Norm) on it is the linear LRP rule of Ali et al. (2022).

    Parameters
    ----------
    normalized_shape : sequence of int
    weight, bias : torch.Tensor or None
        Shared with the layer norm it replaces.
    eps : float
    """

    def __init__(self, normalized_shape: Sequence[int], weight: torch.Tensor | None, bias: torch.Tensor | None,
                 eps: float):
        super().__init__()
        self.normalized_shape = tuple(normalized_shape)
        self.eps = float(eps)
        self.weight = weight
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(-len(self.normalized_shape), 0))
        centred = x - x.mean(dims, keepdim=True)
        std = torch.sqrt(centred.detach().pow(2).mean(dims, keepdim=True) + self.eps)
        out = centred / std
        if self.weight is not None:
            out = out * self.weight
        if self.bias is not None:
            out = out + self.bias
        return out

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"


class ConstantNormGroupNorm(nn.Module):
    """Group normalisation of (n, C, ...) with ``1 / sigma`` held constant (see :class:`ConstantNormLayerNorm`).

    Parameters
    ----------
    num_groups : int
    weight, bias : torch.Tensor or None
        (C,), shared with the group norm it replaces.
    eps : float
    """

    def __init__(self, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float):
        super().__init__()
        self.num_groups = int(num_groups)
        self.eps = float(eps)
        self.weight = weight
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grouped = x.reshape(x.shape[0], self.num_groups, -1)
        centred = grouped - grouped.mean(-1, keepdim=True)
        std = torch.sqrt(centred.detach().pow(2).mean(-1, keepdim=True) + self.eps)
        out = (centred / std).reshape(x.shape)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        if self.weight is not None:
            out = out * self.weight.reshape(shape)
        if self.bias is not None:
            out = out + self.bias.reshape(shape)
        return out

    def extra_repr(self) -> str:
        return f"{self.num_groups}, eps={self.eps}"


class Mean(nn.AdaptiveAvgPool1d):
    """``x.mean(dim, keepdim)``: an average pooling, so every composite gives it the average-pooling rule (Norm).

    Parameters
    ----------
    dim : int or tuple of int
    keepdim : bool

    Examples
    --------
    >>> Mean((2, 3))(torch.ones(2, 4, 3, 3)).shape
    torch.Size([2, 4])
    """

    def __init__(self, dim: int | Sequence[int], keepdim: bool = False):
        super().__init__(1)
        self.dim = dim if isinstance(dim, int) else tuple(dim)
        self.keepdim = bool(keepdim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(self.dim, keepdim=self.keepdim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, keepdim={self.keepdim}"


class Resample(nn.AdaptiveAvgPool1d):
    """``F.interpolate`` with a linear mode (``linear``, ``bilinear``, ``trilinear``; no antialiasing): every output is
    a weighted mean of its neighbouring inputs (weights ``>= 0`` summing to 1), an average pooling to LRP, so every
    composite gives it the average-pooling rule (Norm, the z-rule: ``R_in = x * J^T (R / stab(out))``).

    Parameters
    ----------
    size, scale_factor, mode, align_corners, recompute_scale_factor
        As :func:`torch.nn.functional.interpolate` (constants).

    Examples
    --------
    >>> Resample(scale_factor=2, mode="bilinear")(torch.ones(1, 2, 3, 3)).shape
    torch.Size([1, 2, 6, 6])
    """

    def __init__(self, size: Any = None, scale_factor: Any = None, mode: str = "bilinear",
                 align_corners: bool | None = None, recompute_scale_factor: bool | None = None):
        super().__init__(1)
        if mode not in ("linear", "bilinear", "trilinear"):
            raise ValueError(f"Resample averages with a linear mode ('linear', 'bilinear', 'trilinear'). Got {mode!r}.")
        self.size, self.scale_factor, self.mode = size, scale_factor, mode
        self.align_corners, self.recompute_scale_factor = align_corners, recompute_scale_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, self.size, self.scale_factor, self.mode, self.align_corners,
                             self.recompute_scale_factor)

    def extra_repr(self) -> str:
        target = f"size={self.size}" if self.size is not None else f"scale_factor={self.scale_factor}"
        return f"{target}, mode={self.mode!r}, align_corners={self.align_corners}"


class GateRule(NeonHook):
    """All relevance of the output to the first input (the signal): the rule of :class:`Gate` and :class:`Scale`.

    Examples
    --------
    >>> GateRule().copy()
    GateRule()
    """

    def relevance(self, module, x, out, relevance_out):
        return relevance_out
