"""Fast drop-ins for Zennit's ``EpsilonGammaBox`` and ``EpsilonPlusFlat`` composites."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from zennit.composites import SpecialFirstLayerMapComposite
from zennit.core import Hook
from zennit.layer import Sum
from zennit.types import Activation, AvgPool, BatchNorm, Convolution

from ...core.canonical import ChannelAffine, ConstantNormGroupNorm, ConstantNormLayerNorm, Gate, Scale
from ...core.validation import BATCH_NORMS
from ._core import FastNorm, FastPass, LayerMap, StabilizerLike, _supports
from .rules import FastEpsilon, FastFlat, FastGamma, FastZBox, FastZPlus, _LinearRule

__all__ = ["FastEpsilonGammaBox", "FastEpsilonPlusFlat"]


# ---------------------------------------------------------------------------------------------------------------------
# composites
# ---------------------------------------------------------------------------------------------------------------------


def _layer_map_base(stabilizer: StabilizerLike) -> LayerMap:
    """The fast counterpart of :func:`zennit.composites.layer_map_base`."""
    return [
        (Activation, FastPass()),
        (Sum, FastNorm(stabilizer=stabilizer)),
        (AvgPool, FastNorm(stabilizer=stabilizer)),
        ((Gate, Scale), FastPass()),  # the graph canonizer's layers (neon_attrib.core.canonical): gate held constant
        ((ChannelAffine, ConstantNormLayerNorm, ConstantNormGroupNorm), FastNorm(stabilizer=stabilizer)),
        ((BatchNorm, *BATCH_NORMS), FastPass()),
    ]


class _FastMapMixin:
    """Map a fast rule to Zennit's equivalent rule for modules it does not support (e.g. transposed convolutions)."""

    def mapping(self, ctx: dict, name: str, module: nn.Module) -> Hook | None:
        hook = super().mapping(ctx, name, module)
        if isinstance(hook, _LinearRule) and not _supports(module):
            return hook.to_zennit()
        return hook


class FastEpsilonGammaBox(_FastMapMixin, SpecialFirstLayerMapComposite):
    """Zennit's :class:`~zennit.composites.EpsilonGammaBox` with the fast rules.

    ZBox for the first convolution, Gamma for the other convolutions, Epsilon for ``torch.nn.Linear``, Pass for
    activations and batch norm, Norm for average pooling and :class:`zennit.layer.Sum`; max pooling keeps its
    gradient. Same mapping, same numbers as Zennit's composite. The layers of the graph canonizer
    (:mod:`neon_attrib.core.canonical`) get Pass (gates) and Norm (affine and normalisation layers).

    Parameters
    ----------
    low, high : float or torch.Tensor
        Lowest and highest input values for the ZBox rule.
    epsilon : float or callable, optional
        Stabilizer of the Epsilon rule.
    gamma : float, optional
        Gamma of the Gamma rule.
    stabilizer : float or callable, optional
        Stabilizer of the other rules.
    layer_map : list of (type or tuple of types, Hook), optional
        Put in front of the composite's layer map (rules for your own layer types).
    first_map : list of (type or tuple of types, Hook), optional
        Put in front of the composite's first-layer map.
    zero_params : str or list of str, optional
        Parameter names set to zero by the rules.
    canonizers : list of zennit.canonizers.Canonizer, optional
        Applied before the hooks are registered.

    Examples
    --------
    >>> composite = FastEpsilonGammaBox(low=-3.0, high=3.0, layer_map=[(torch.nn.Tanh, FastPass())])
    """

    def __init__(self, low: float | torch.Tensor, high: float | torch.Tensor, epsilon: StabilizerLike = 1e-6,
                 gamma: float = 0.25, stabilizer: StabilizerLike = 1e-6, layer_map: LayerMap | None = None,
                 first_map: LayerMap | None = None, zero_params: str | Sequence[str] | None = None,
                 canonizers: list | None = None):
        layer_map = list(layer_map or []) + _layer_map_base(stabilizer) + [
            (Convolution, FastGamma(gamma=gamma, stabilizer=stabilizer, zero_params=zero_params)),
            (nn.Linear, FastEpsilon(epsilon=epsilon, zero_params=zero_params)),
        ]
        first_map = list(first_map or []) + [
            (Convolution, FastZBox(low=low, high=high, stabilizer=stabilizer, zero_params=zero_params)),
        ]
        super().__init__(layer_map=layer_map, first_map=first_map, canonizers=canonizers)


class FastEpsilonPlusFlat(_FastMapMixin, SpecialFirstLayerMapComposite):
    """Zennit's :class:`~zennit.composites.EpsilonPlusFlat` with the fast rules.

    Flat for the first linear or convolutional layer, ZPlus for the other convolutions, Epsilon for
    ``torch.nn.Linear``, Pass for activations and batch norm, Norm for average pooling and :class:`zennit.layer.Sum`
    (and the graph canonizer's layers, as in :class:`FastEpsilonGammaBox`).

    Parameters
    ----------
    epsilon : float or callable, optional
        Stabilizer of the Epsilon rule.
    stabilizer : float or callable, optional
        Stabilizer of the other rules.
    layer_map : list of (type or tuple of types, Hook), optional
        Put in front of the composite's layer map (rules for your own layer types).
    first_map : list of (type or tuple of types, Hook), optional
        Put in front of the composite's first-layer map.
    zero_params : str or list of str, optional
        Parameter names set to zero by the rules.
    canonizers : list of zennit.canonizers.Canonizer, optional
        Applied before the hooks are registered.

    Examples
    --------
    >>> composite = FastEpsilonPlusFlat(epsilon=1e-4)
    """

    def __init__(self, epsilon: StabilizerLike = 1e-6, stabilizer: StabilizerLike = 1e-6,
                 layer_map: LayerMap | None = None, first_map: LayerMap | None = None,
                 zero_params: str | Sequence[str] | None = None, canonizers: list | None = None):
        layer_map = list(layer_map or []) + _layer_map_base(stabilizer) + [
            (Convolution, FastZPlus(stabilizer=stabilizer, zero_params=zero_params)),
            (nn.Linear, FastEpsilon(epsilon=epsilon, zero_params=zero_params)),
        ]
        first_map = list(first_map or []) + [
            ((Convolution, nn.Linear), FastFlat(stabilizer=stabilizer, zero_params=zero_params)),
        ]
        super().__init__(layer_map=layer_map, first_map=first_map, canonizers=canonizers)
