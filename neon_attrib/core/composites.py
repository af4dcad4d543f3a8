"""Composites that map every NEON layer to its rule, beside any Zennit composite for the other layers.

:class:`NeonComposite` looks rules up in a **registry** (:func:`register_rule`): the layers of
:mod:`neon_attrib.core.layers` register their input-space rules here, and the modules defined further up (estimators,
heads on feature maps, DEC heads, your own) register theirs when they are defined. A composite therefore never imports
the modules it covers, and a new model joins every entry point (``explain``, ``NeonLRP``, Zennit's ``Gradient``) by
one :func:`register_rule` call.

Two rule families exist for the estimators: *input* rules, one per layer, for raw feature vectors, and *activation*
rules, one per whole head, for heads on non-negative CNN activations (they give relevance only to active neurons).
In the default ``mode="auto"`` a head gets its activation rule when it sits where a model declares CNN activations
(e.g. ``DeepNeon.head``, see :func:`register_activation_children`), and its input rules otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from zennit.core import Composite, Hook

from .layers import (
    ClusterDifference,
    KMinPool,
    LinearClusterDifference,
    LocationPool,
    LogMeanExpPool,
    MahalanobisDistance,
    MeanPool,
    MinPool,
    PositionalMahalanobisDistance,
    RandomCosineFeatures,
    SquaredDistance,
    SquareRoot,
    WeightedLogSumExpPool,
)
from .rules import (
    CosineShareRule,
    KMinPoolRule,
    LocationPoolRule,
    MahalanobisRule,
    PassThroughRule,
    PositionalMahalanobisRule,
    ProportionalRule,
    SoftArgminRule,
    SquaredDifferenceRule,
    WeightedSoftArgminRule,
    WeightShareRule,
)

__all__ = ["NeonComposite", "register_rule", "register_activation_children", "is_neon_module", "covers_children"]

Mode = Literal["auto", "input", "activation"]
RuleFactory = Callable[[float | None, float | None], Hook]


@dataclass(frozen=True)
class _Entry:
    types: tuple[type, ...]
    factory: RuleFactory
    mode: str  # "input", "activation" or "any"
    covers_children: bool


_REGISTRY: list[_Entry] = []
_ACTIVATION_CHILDREN: list[tuple[tuple[type, ...], tuple[str, ...]]] = []


def register_rule(types: type | tuple[type, ...], factory: RuleFactory, *,
                  mode: Literal["input", "activation", "any"] = "input", covers_children: bool = False) -> None:
    """Register the NEON rule of a module type for :class:`NeonComposite` (and so for every entry point).

    Parameters
    ----------
    types : type or tuple of types
        Module classes (subclasses match too; the entry registered last wins).
    factory : callable
        ``factory(beta, eps) -> zennit.core.Hook``: the rule, given the composite's ``beta``/``eps`` overrides (None:
        keep the module's defaults).
    mode : {"input", "activation", "any"}
        Which rule family it belongs to: ``"input"`` for raw feature vectors, ``"activation"`` for a head on CNN
        activations, ``"any"`` for both (e.g. a pooling over locations).
    covers_children : bool
        The rule replaces the whole module, so its submodules get no rule of their own (a head's closed form).

    Examples
    --------
    >>> from neon_attrib.core.rules import SoftArgminRule
    >>> class SoftMinPool(torch.nn.Module):
    ...     beta = 1.0
    ...     def forward(self, h):
    ...         return -torch.logsumexp(-h, -1)
    >>> register_rule(SoftMinPool, lambda beta, eps: SoftArgminRule(beta=beta))
    >>> is_neon_module(SoftMinPool())
    True
    """
    types = types if isinstance(types, tuple) else (types,)
    if not types or not all(isinstance(t, type) and issubclass(t, torch.nn.Module) for t in types):
        raise TypeError(f"register_rule needs torch.nn.Module subclasses. Got {types!r}.")
    if mode not in ("input", "activation", "any"):
        raise ValueError(f"The 'mode' parameter of register_rule must be 'input', 'activation' or 'any'. Got {mode!r}.")
    if not callable(factory):
        raise TypeError(f"The 'factory' parameter of register_rule must be callable (beta, eps) -> Hook. "
                        f"Got {factory!r}.")
    _REGISTRY.insert(0, _Entry(types, factory, mode, covers_children))


def register_activation_children(types: type | tuple[type, ...], children: tuple[str, ...]) -> None:
    """Declare that the named submodules of ``types`` see CNN activations (``mode="auto"`` gives them activation rules).

    Examples
    --------
    >>> class MyDeepHead(torch.nn.Module):
    ...     def __init__(self, cnn, head):
    ...         super().__init__()
    ...         self.cnn, self.head = cnn, head
    >>> register_activation_children(MyDeepHead, ("head",))
    """
    types = types if isinstance(types, tuple) else (types,)
    _ACTIVATION_CHILDREN.insert(0, (types, tuple(children)))


def _entry(module: torch.nn.Module, modes: tuple[str, ...]) -> _Entry | None:
    for entry in _REGISTRY:
        if entry.mode in modes and isinstance(module, entry.types):
            return entry
    return None


def is_neon_module(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a NEON layer or head that must receive a NEON rule (or lie inside one that has)."""
    return _entry(module, ("input", "any")) is not None or _entry(module, ("activation",)) is not None


def covers_children(module: torch.nn.Module) -> bool:
    """Whether the rule of ``module`` (a head with a closed-form rule) replaces the rules of its submodules."""
    entry = _entry(module, ("activation", "any"))
    return entry is not None and entry.covers_children


def needs_own_rule(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a NEON *layer* that needs a rule of its own (heads may leave it to their layers)."""
    return _entry(module, ("input", "any")) is not None


class NeonComposite(Composite):
    """A :class:`zennit.core.Composite` that puts NEON rules on every NEON module and ``base`` on the rest.

    Parameters
    ----------
    beta : float, optional
        Soft-argmin sharpness for every soft-min rule; ``None`` keeps each module's default (γ for KDE, 1 / mean
        training evidence for k-means).
    eps : float, optional
        Stabiliser of the squared-difference rule (input rules) or of the random-feature cosine part (activation
        rules); ``None`` keeps each model's default.
    mode : {"auto", "input", "activation"}
        ``"auto"`` (default): heads get their activation rules where a model declares CNN activations (the head of a
        :class:`~neon_attrib.vision.deep.DeepNeon`), and one input rule per layer elsewhere (feature vectors).
        ``"input"`` / ``"activation"``: one family for every head.
    base : zennit.core.Composite, optional
        A Zennit composite (e.g. ``EpsilonGammaBox(low, high)`` or ``EpsilonPlusFlat()``) for every module that is not
        a NEON module; its canonizers are applied too.
    layer_map : list of (type, Hook), optional
        Extra ``(module type, rule)`` pairs checked before ours, for your own layers.
    canonizers : list, optional
        Extra Zennit canonizers.
    pre_canonizers : list, optional
        Canonizers applied before ``base``'s (e.g. :class:`~neon_attrib.pipeline.graph.GraphCanonizer`, so that the
        base's own
        canonizers see the canonical graph). A canonizer of ``base`` that fails raises a ``ValueError`` naming it.

    Examples
    --------
    >>> from zennit.attribution import Gradient
    >>> import numpy as np
    >>> from neon_attrib import KDEOutlier
    >>> model = KDEOutlier(gamma=1.0).fit(np.random.default_rng(0).normal(size=(20, 3)))
    >>> x = torch.zeros(2, 3, requires_grad=True)
    >>> with Gradient(model, NeonComposite()) as attributor:
    ...     out, relevance = attributor(x, lambda o: o)
    >>> relevance.shape
    torch.Size([2, 3])
    """

    def __init__(self, beta: float | None = None, eps: float | None = None, mode: Mode = "auto",
                 base: Composite | None = None, layer_map: list[tuple[type, Hook]] | None = None,
                 canonizers: list | None = None, pre_canonizers: list | None = None):
        if mode not in ("auto", "input", "activation"):
            raise ValueError(f"The 'mode' parameter of NeonComposite must be 'auto', 'input' or 'activation'. "
                             f"Got {mode!r}.")
        if base is not None and not isinstance(base, Composite):
            raise TypeError(f"The 'base' parameter of NeonComposite must be a zennit Composite. Got {type(base)}.")
        if isinstance(base, NeonComposite):
            raise TypeError("The 'base' parameter of NeonComposite is for the non-NEON layers; got a NeonComposite. "
                            "Pass its own base instead, or use it directly.")
        for value, name in ((beta, "beta"), (eps, "eps")):
            if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                          and value == value and value not in (float("inf"),)):
                raise ValueError(f"The '{name}' parameter of NeonComposite must be a finite float. Got {value!r}.")
        if beta is not None and not beta > 0:
            raise ValueError(f"The 'beta' parameter of NeonComposite must be a float > 0. Got {beta!r}.")
        if eps is not None and not eps >= 0:
            raise ValueError(f"The 'eps' parameter of NeonComposite must be a float >= 0. Got {eps!r}.")
        self.beta, self.eps, self.mode, self.base = beta, eps, mode, base
        self.layer_map = list(layer_map or [])
        base_canonizers = [_Reported(canonizer) for canonizer in (base.canonizers if base is not None else [])]
        all_canonizers = list(pre_canonizers or []) + base_canonizers + list(canonizers or [])
        super().__init__(module_map=self._map, canonizers=all_canonizers)

    def register(self, module: torch.nn.Module) -> None:
        """Apply canonizers and hooks to ``module``; if that fails half-way, remove what was applied, then raise."""
        try:
            super().register(module)
        except Exception:
            self.remove()
            raise

    def _mode_of(self, ctx: dict, name: str, module: torch.nn.Module) -> str:
        if self.mode != "auto":
            return self.mode
        contexts = ctx.setdefault("neon_activation_prefixes", [])
        for types, children in _ACTIVATION_CHILDREN:
            if isinstance(module, types):
                contexts.extend(f"{name}.{child}" if name else child for child in children)
        inside = any(name == prefix or name.startswith(prefix + ".") for prefix in contexts)
        return "activation" if inside else "input"

    def _map(self, ctx: dict, name: str, module: torch.nn.Module) -> Hook | None:
        covered = ctx.setdefault("neon_covered", [])
        if any(name.startswith(prefix) for prefix in covered):
            return None  # inside a module that carries one rule for all of it
        mode = self._mode_of(ctx, name, module)
        for types, rule in self.layer_map:
            if isinstance(module, types):
                if covers_children(module) and (mode == "activation" or _entry(module, ("any",))):
                    covered.append(f"{name}." if name else "")
                return rule
        if mode == "activation":  # a head's rule; NEON layers outside heads keep their input rules
            entry = _entry(module, ("activation", "any")) or _entry(module, ("input",))
        else:
            entry = _entry(module, ("input", "any"))
            if entry is None and _entry(module, ("activation",)) is not None:
                _check_layered(module, name)
        if entry is not None:
            if entry.covers_children:
                covered.append(f"{name}." if name else "")
            return entry.factory(self.beta, self.eps)
        if self.base is not None and not is_neon_module(module):
            return self.base.module_map(ctx, name, module)
        return None


class _Reported:
    """A canonizer of a user's composite whose failure names it (Zennit's own errors are bare shape errors)."""

    def __init__(self, canonizer: Any):
        self.canonizer = canonizer

    def apply(self, root_module: torch.nn.Module) -> list:
        try:
            return self.canonizer.apply(root_module)
        except Exception as exc:  # any error of a third-party canonizer
            name = type(self.canonizer).__name__
            raise ValueError(f"The canonizer {name} of the composite failed on {type(root_module).__name__} "
                             f"({type(exc).__name__}: {exc}). It cannot apply to this architecture (e.g. a batch-norm "
                             f"merge that follows the registration order of modules, not the data flow); neon_attrib "
                             f"canonizes CNNs from their graph itself (neon_attrib.vision.default_canonizers), so "
                             f"remove {name} from the composite's canonizers.") from exc

    def __getattr__(self, name: str) -> Any:
        if name == "canonizer":
            raise AttributeError(name)
        return getattr(self.canonizer, name)


def _check_layered(module: torch.nn.Module, name: str) -> None:
    """Input rules sit on a head's layers: refuse a head whose forward bypasses them (a fused KDE)."""
    if getattr(module, "fused", False):
        raise ValueError(f"Input-space rules need the layered forward of {name or 'the model'} "
                         f"({type(module).__name__}): set its 'fused' attribute to False, or use the activation rules "
                         f"(NeonComposite(mode='activation')).")


register_rule(SquaredDistance, lambda beta, eps: SquaredDifferenceRule(eps=eps))
register_rule((LogMeanExpPool, MinPool), lambda beta, eps: SoftArgminRule(beta=beta))
register_rule(RandomCosineFeatures, lambda beta, eps: CosineShareRule())
register_rule(MeanPool, lambda beta, eps: ProportionalRule())
register_rule(ClusterDifference, lambda beta, eps: WeightShareRule())
register_rule(LocationPool, lambda beta, eps: LocationPoolRule(), mode="any")
register_rule(KMinPool, lambda beta, eps: KMinPoolRule(beta=beta))
register_rule(SquareRoot, lambda beta, eps: PassThroughRule())
register_rule(MahalanobisDistance, lambda beta, eps: MahalanobisRule(eps=eps))
register_rule(WeightedLogSumExpPool, lambda beta, eps: WeightedSoftArgminRule(beta=beta))
register_rule(LinearClusterDifference, lambda beta, eps: WeightShareRule())
register_rule(PositionalMahalanobisDistance, lambda beta, eps: PositionalMahalanobisRule(eps=eps))
