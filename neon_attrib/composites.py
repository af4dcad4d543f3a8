"""Composites that map the neuralized layers to their NEON rules, beside any Zennit composite for the other layers."""

from __future__ import annotations

from typing import Literal

import torch
from zennit.core import Composite, Hook

from .layers import ClusterDifference, LogMeanExpPool, MeanPool, MinPool, RandomCosineFeatures, SquaredDistance
from .models import KDEInlier, KDEOutlier, KMeansMembership
from .rules import (
    CosineShareRule,
    KDEInlierActivationRule,
    KDEOutlierActivationRule,
    KMeansActivationRule,
    ProportionalRule,
    SoftArgminRule,
    SquaredDifferenceRule,
    WeightShareRule,
)

__all__ = ["NeonComposite"]

Mode = Literal["input", "activation"]


class NeonComposite(Composite):
    """A :class:`zennit.core.Composite` that puts NEON rules on the neuralized layers.

    Parameters
    ----------
    beta : float, optional
        Soft-argmin sharpness for every soft-min layer; ``None`` keeps each layer's default (γ for KDE, 1 / mean
        training evidence for k-means).
    eps : float, optional
        Stabiliser of the squared-difference rule (input mode) or of the random-feature cosine part (activation mode);
        ``None`` keeps each model's default.
    mode : {"input", "activation"}
        ``"input"`` (default): one input-space rule per layer (SPEC "raw features"): for feature vectors.
        ``"activation"``: the rules for heads on non-negative CNN activations, which give relevance only to active
        neurons and dissipate the rest; they attach to the whole :class:`~neon_attrib.models.KDEOutlier`,
        :class:`~neon_attrib.models.KDEInlier` or :class:`~neon_attrib.models.KMeansMembership` module (its layers
        get no rule of their own). Layers used outside those models keep their input rules.
    base : zennit.core.Composite, optional
        A Zennit composite (e.g. ``EpsilonGammaBox(low, high)`` or ``EpsilonPlusFlat()``) for every module that is not
        ours; its canonizers are applied too.
    layer_map : list of (type, Hook), optional
        Extra ``(module type, rule)`` pairs checked before ours, for your own layers.
    canonizers : list, optional
        Extra Zennit canonizers.

    Examples
    --------
    >>> from zennit.attribution import Gradient
    >>> import numpy as np
    >>> model = KDEOutlier(gamma=1.0).fit(np.random.default_rng(0).normal(size=(20, 3)))
    >>> x = torch.zeros(2, 3, requires_grad=True)
    >>> with Gradient(model, NeonComposite()) as attributor:
    ...     out, relevance = attributor(x, lambda o: o)
    >>> relevance.shape
    torch.Size([2, 3])
    """

    def __init__(self, beta: float | None = None, eps: float | None = None, mode: Mode = "input",
                 base: Composite | None = None, layer_map: list[tuple[type, Hook]] | None = None,
                 canonizers: list | None = None):
        if mode not in ("input", "activation"):
            raise ValueError(f"The 'mode' parameter of NeonComposite must be 'input' or 'activation'. Got {mode!r}.")
        if base is not None and not isinstance(base, Composite):
            raise TypeError(f"The 'base' parameter of NeonComposite must be a zennit Composite. Got {type(base)}.")
        self.beta, self.eps, self.mode, self.base = beta, eps, mode, base
        self.layer_map = list(layer_map or [])
        self.input_map: list[tuple[type, Hook]] = [
            (SquaredDistance, SquaredDifferenceRule(eps=eps)),
            ((LogMeanExpPool, MinPool), SoftArgminRule(beta=beta)),
            (RandomCosineFeatures, CosineShareRule()),
            (MeanPool, ProportionalRule()),
            (ClusterDifference, WeightShareRule()),
        ]
        self.activation_map: list[tuple[type, Hook]] = [
            (KDEOutlier, KDEOutlierActivationRule(beta=beta)),
            (KDEInlier, KDEInlierActivationRule(eps=eps)),
            (KMeansMembership, KMeansActivationRule(beta=beta)),
        ]
        all_canonizers = list(base.canonizers if base is not None else []) + list(canonizers or [])
        super().__init__(module_map=self._map, canonizers=all_canonizers)

    def register(self, module: torch.nn.Module) -> None:
        """Apply canonizers and hooks to ``module``; if that fails half-way, remove what was applied, then raise."""
        try:
            super().register(module)
        except Exception:
            self.remove()
            raise

    def _map(self, ctx: dict, name: str, module: torch.nn.Module) -> Hook | None:
        covered = ctx.setdefault("neon_covered", [])
        if self.mode == "activation" and any(name.startswith(prefix) for prefix in covered):
            return None  # inside a model that carries an activation rule (ours or one from layer_map)
        head_types = tuple(types for types, _ in self.activation_map)
        for types, rule in self.layer_map:
            if isinstance(module, types):
                if self.mode == "activation" and isinstance(module, head_types):
                    covered.append(f"{name}." if name else "")
                return rule
        if self.mode == "activation":
            for types, rule in self.activation_map:
                if isinstance(module, types):
                    covered.append(f"{name}." if name else "")
                    return rule
        if isinstance(module, KDEOutlier) and module.fused:
            raise ValueError(f"NeonComposite(mode='input') needs the layered forward of {name or 'the model'}: "
                             "set its 'fused' attribute to False, or use mode='activation'.")
        for types, rule in self.input_map:
            if isinstance(module, types):
                return rule
        if self.base is not None:
            return self.base.module_map(ctx, name, module)
        return None
