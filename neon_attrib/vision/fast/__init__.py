"""Fast exact LRP rules for ReLU CNNs, drop-in replacements for Zennit's rules and composites.

Zennit computes a rule such as the generalized Gamma rule by re-running the layer up to five times with modified
parameters and differentiating through it, after autograd has already computed (and thrown away) the layer's plain
gradient. The hooks here compute the *same numbers* directly: one forward convolution (the model's own), one
modified-weight convolution and one transposed convolution (``convolution_backward`` for the input only) per layer, with
no re-forward of the unmodified layer and no wasted plain backward. This is about 3/2 of a plain gradient's work.

The shortcuts rest on two conditions that hold in ReLU networks and are **checked at run time** on every call:

1. the layer input is non-negative (it comes from a ReLU or a max-pool after one): the negative-input terms of Gamma,
   ZPlus and AlphaBeta vanish;
2. (Gamma only) the relevance of the layer output is zero wherever the output ``z <= 0``: the ``z < 0`` branch of the
   generalized Gamma rule vanishes and the ``z = 0`` entries that Zennit drops are zero anyway.

When a condition fails, the rule computes the general formula, equal to Zennit's rule (same modified parameters, same
stabilizer, same sum order). Rules for layers a shortcut does not cover (transposed convolutions) are mapped to Zennit's
own rule by the composites.

Public objects
--------------
Rules (:class:`zennit.core.Hook` subclasses): :class:`FastEpsilon`, :class:`FastGamma`, :class:`FastZPlus`,
:class:`FastAlphaBeta`, :class:`FastZBox`, :class:`FastFlat`, :class:`FastPass`, :class:`FastNorm`.
Composites: :class:`FastEpsilonGammaBox`, :class:`FastEpsilonPlusFlat`. Canonizer: :class:`FastResNetCanonizer`
(Zennit's ``ResNetCanonizer``, faster, same numbers). Reusable explainer: :class:`LRPExplainer` (the
:class:`neon_attrib.pipeline.Explainer`).

Examples
--------
>>> import torch, torchvision
>>> features = torchvision.models.vgg16(weights=None).features.eval()
>>> composite = FastEpsilonGammaBox(low=-3.0, high=3.0)
>>> with LRPExplainer(features, composite) as explainer:
...     output, relevance = explainer(torch.randn(2, 3, 64, 64), lambda out: out)
>>> relevance.shape
torch.Size([2, 3, 64, 64])
"""

from __future__ import annotations

from ...pipeline.engine import Explainer
from ._core import FastHook, FastNorm, FastPass
from .canonizers import FastResNetCanonizer, GuardBatchNorms, MergeBatchNorms
from .composites import FastEpsilonGammaBox, FastEpsilonPlusFlat
from .rules import FastAlphaBeta, FastEpsilon, FastFlat, FastGamma, FastZBox, FastZPlus

__all__ = [
    "FastHook",
    "FastPass",
    "FastNorm",
    "FastEpsilon",
    "FastGamma",
    "FastZPlus",
    "FastAlphaBeta",
    "FastZBox",
    "FastFlat",
    "FastEpsilonGammaBox",
    "FastEpsilonPlusFlat",
    "FastResNetCanonizer",
    "GuardBatchNorms",
    "MergeBatchNorms",
    "LRPExplainer",
]


class LRPExplainer(Explainer):
    """Register a composite once and explain many batches (see :class:`neon_attrib.pipeline.Explainer`).

    The hooks live on a structural copy of the model, so nothing is ever left on the model itself.

    Examples
    --------
    >>> import torchvision
    >>> features = torchvision.models.vgg16(weights=None).features.eval()
    >>> with LRPExplainer(features, FastEpsilonGammaBox(low=-3.0, high=3.0)) as explainer:
    ...     output, relevance = explainer(torch.randn(2, 3, 32, 32), lambda out: out)
    >>> relevance.shape
    torch.Size([2, 3, 32, 32])
    """
