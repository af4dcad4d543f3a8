"""NEON rules inside Captum's LRP: :class:`LRP` and :class:`LayerLRP`, Captum's own classes with our rules attached.

Captum's :class:`captum.attr.LRP` reads a rule from ``module.rule`` on every leaf module; it knows rules for linear
layers only and refuses a leaf without one. Our :class:`LRP` (and :class:`LayerLRP`) puts a :class:`NeonRule` on each
NEON layer of the model *for the duration of one* ``attribute`` *call*, the rule :func:`neon_attrib.explain` would use
there (the model's composite decides, so a head inside a :class:`~neon_attrib.vision.deep.DeepNeon` gets its activation
rule),
and afterwards leaves the model as it found it: Captum deletes every ``module.rule`` after a call (its issue #1059) and
leaves an ``activations`` dict on each leaf; we put back the rules you set and remove the leftovers. Nothing is
attached to our classes, nothing is stored on the model between calls.

How :class:`NeonRule` fits Captum's machinery: Captum's LRP passes *normalised* relevance (relevance divided by the
score) backwards as the gradient, and rescales by the score at the end. A linear layer's rule is a pair of tensor
hooks around the autograd step (``grad / z`` on the output, ``grad · x`` on the input). Our layers are not linear, so a
:class:`NeonRule` instead replaces the layer's output by an autograd node whose backward *is* the NEON rule: it maps the
incoming relevance to the input relevance with the rule's ``relevance(module, x, out, R)``. Every NEON rule is linear
in ``R``, so starting from 1 and rescaling by the score gives the same numbers as starting from the score.
"""

from __future__ import annotations

import contextlib
import typing
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from captum._utils.typing import TargetType, TensorOrTupleOfTensorsGeneric
from captum.attr import LRP as CaptumLRP
from captum.attr import LayerLRP as CaptumLayerLRP
from captum.attr._utils.lrp_rules import PropagationRule
from captum.log import log_usage
from torch import nn

from ..core.composites import NeonComposite
from ..core.layers import LocationPool
from ..core.registry import captum_split_forwards
from ..core.rules import LocationPoolRule, NeonHook
from ..pipeline.engine import resolve_composite
from ..pipeline.graph import TRACE_LOCK

__all__ = ["LRP", "LayerLRP", "NeonRule", "captum_rules"]


# ---------------------------------------------------------------------------------------------------------------------
# the rules
class _RelevanceStep(torch.autograd.Function):
    """Identity on the layer output in the forward pass; the NEON rule in the backward pass (output → input)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out: torch.Tensor, rule: Callable[[torch.Tensor], torch.Tensor]):
        ctx.rule = rule
        return out.clone()

    @staticmethod
    def backward(ctx, relevance_out: torch.Tensor):
        return ctx.rule(relevance_out), None, None


class NeonRule(PropagationRule):
    """A Captum propagation rule that applies a NEON rule: put it on a layer for :class:`LRP`.

    :class:`LRP` puts the right one on every NEON layer itself, so you only need this class to change a rule's
    hyperparameters, e.g. ``model.pool.rule = NeonRule(SoftArgminRule(beta=2.0))``; :class:`LRP` keeps a rule you set
    (Captum's own LRP deletes it after the call), and ``del model.pool.rule`` restores the default.

    Captum normally implements a rule as tensor hooks around the layer's gradient (``grad / z`` on the output,
    ``grad · x`` on the input), which is LRP for linear layers only. Our layers are not linear, so this rule replaces
    the layer output by an autograd node whose backward maps the relevance arriving at the output to the input with the
    NEON rule. It never modifies weights, keeps no state between calls, and leaves no hooks or attributes behind.

    Parameters
    ----------
    hook : neon_attrib.core.rules rule, optional
        A NEON rule (:class:`~neon_attrib.core.rules.SoftArgminRule`, ...). ``None``: the rule
        :class:`~neon_attrib.core.composites.NeonComposite` puts on the layer (input mode: one rule per layer).

    Examples
    --------
    >>> from neon_attrib.core.rules import SoftArgminRule
    >>> NeonRule(SoftArgminRule(beta=2.0))
    NeonRule(SoftArgminRule(beta=2.0))
    """

    def __init__(self, hook: NeonHook | None = None) -> None:
        if hook is not None and not isinstance(hook, NeonHook):
            raise TypeError(f"NeonRule wraps a NEON rule from neon_attrib.core.rules. Got {type(hook).__name__}.")
        self.hook = hook

    def _resolve(self, module: nn.Module) -> NeonHook:
        hook = self.hook if self.hook is not None else _default_hook(module)
        if hook is None:
            raise TypeError(f"NeonRule has no default NEON rule for {type(module).__name__}; pass one: NeonRule(rule).")
        return hook

    def forward_hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], outputs: torch.Tensor) -> torch.Tensor:
        _check_not_empty(inputs)
        hook = self._resolve(module)
        x, out = inputs[0], outputs.detach()
        x_data = x.detach()

        def rule(relevance_out: torch.Tensor) -> torch.Tensor:
            return hook.relevance(module, x_data, out, relevance_out).to(relevance_out.dtype)

        return _RelevanceStep.apply(x, out, rule)

    def forward_hook_weights(self, module: nn.Module, inputs: Any, outputs: Any) -> None:
        """Captum's first pass (weight modification and activation caching): nothing to do for NEON rules."""

    def forward_pre_hook_activations(self, module: nn.Module, inputs: Any) -> None:
        """Captum's second pass restores cached activations; NEON rules change no weights, so the inputs are kept."""

    def _manipulate_weights(self, module: nn.Module, inputs: Any, outputs: Any) -> None:
        """NEON rules never modify weights."""

    def __repr__(self) -> str:
        return f"NeonRule({self.hook!r})" if self.hook is not None else "NeonRule()"


def _default_hook(module: nn.Module) -> NeonHook | None:
    """The NEON rule :class:`~neon_attrib.core.composites.NeonComposite` puts on ``module`` alone (input mode), if
    any."""
    hook = NeonComposite()._map({}, "", module)
    if hook is None and isinstance(module, LocationPool):
        hook = LocationPoolRule()
    return hook if isinstance(hook, NeonHook) else None


def _check_not_empty(inputs: tuple[torch.Tensor, ...]) -> None:
    if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].ndim and inputs[0].shape[0] == 0:
        raise ValueError("Captum's LRP cannot explain an empty batch (Captum indexes the first example). "
                         "Use neon_attrib.integrations.captum.NeonLRP, which returns an empty relevance for an empty "
                         "batch.")


class _HeadInputRule(NeonRule):
    """The rule of a head's *input* layer when the explained model puts one rule on the whole head (activation mode).

    Captum's LRP visits leaf modules only, but NEON's rules for heads on CNN activations (e.g.
    :class:`~neon_attrib.core.rules.KDEOutlierActivationRule`) are defined on the whole head. The head's top layer keeps
    its conserving default rule, so the relevance reaching this layer's output sums to the head's output relevance
    ``R`` over the last dimension; this rule sums it back, recomputes the head's output from its own output with the top
    layer, and applies the head's rule: ``R_in = head_rule.relevance(head, a, head(a), R)``. Exactly ``explain``'s head
    relevance, up to rounding.
    """

    def __init__(self, head: nn.Module, head_hook: NeonHook, top: nn.Module) -> None:
        super().__init__(head_hook)
        self.head, self.top = head, top

    def forward_hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], outputs: torch.Tensor) -> torch.Tensor:
        _check_not_empty(inputs)
        x, out = inputs[0], outputs.detach()
        x_data, head, top, hook = x.detach(), self.head, self.top, self.hook
        assert hook is not None  # set by __init__

        def rule(relevance_out: torch.Tensor) -> torch.Tensor:
            head_out = top.forward(out)  # .forward: no hooks (Captum's are registered on ``top`` right now)
            head_relevance = relevance_out.sum(-1)
            return hook.relevance(head, x_data, head_out, head_relevance).to(relevance_out.dtype)

        return _RelevanceStep.apply(x, out, rule)

    def __repr__(self) -> str:
        return f"_HeadInputRule({self.hook!r} on {type(self.head).__name__})"


def _leaves(model: nn.Module) -> list[nn.Module]:
    """The modules Captum's LRP visits: the leaves below ``model`` (not ``model`` itself)."""
    return [module for module in model.modules() if module is not model and next(module.children(), None) is None]


def captum_rules(model: nn.Module) -> dict[nn.Module, PropagationRule]:
    """The Captum rule of every NEON leaf layer of ``model``: the rule :func:`neon_attrib.explain` gives it.

    The composite ``explain`` would use on ``model`` decides (the model's own, else
    :class:`~neon_attrib.core.composites.NeonComposite`). A layer inside a head that carries one rule for all of it
    (a head on CNN activations) gets that rule split over the head's two layers (:class:`_HeadInputRule` on its input
    layer, the conserving default on its pooling), for the heads registered with ``captum_split=True``
    (:func:`neon_attrib.core.registry.register_model`); any other such head is a TypeError that points to ``NeonLRP``.
    Leaves that are not NEON layers are left to Captum's own rules.

    Examples
    --------
    >>> import numpy as np
    >>> from neon_attrib import KDEOutlier
    >>> model = KDEOutlier(gamma=1.0).fit(np.random.default_rng(0).normal(size=(10, 2)))
    >>> sorted(type(layer).__name__ for layer in captum_rules(model))
    ['LogMeanExpPool', 'SquaredDistance']
    """
    composite = resolve_composite(model)
    assigned: dict[int, tuple[str, Any]] = {}
    ctx: dict = {}
    for name, module in model.named_modules():
        assigned[id(module)] = (name, composite.module_map(ctx, name, module))
    split_forwards = captum_split_forwards()
    rules: dict[nn.Module, PropagationRule] = {}
    for layer in _leaves(model):
        rule = _rule_in_context(model, layer, assigned, split_forwards)
        if rule is not None:
            rules[layer] = rule
    return rules


def _rule_in_context(root: nn.Module, layer: nn.Module, assigned: dict[int, tuple[str, Any]],
                     split_forwards: tuple[Callable, ...]) -> PropagationRule | None:
    name, hook = assigned.get(id(layer), ("", None))
    # inside a head that carries one rule for all of it (activation mode)? The outermost such head wins, as in Zennit,
    # where the head's hook replaces whatever its inner layers' hooks computed.
    for head_name, head in root.named_modules():
        head_hook = assigned[id(head)][1]
        if head is layer or not isinstance(head_hook, NeonHook) or not name.startswith(f"{head_name}."):
            continue
        leaves = _leaves(head)
        if type(head).forward not in split_forwards or len(leaves) != 2 or getattr(head, "fused", False):
            raise TypeError(
                f"Captum's LRP cannot apply {type(head_hook).__name__} to {type(head).__name__}: Captum only hooks "
                f"leaf modules, and this head's forward does not run through exactly two NEON layers (its input layer "
                f"and its pooling; a fused KDEOutlier skips them). Use neon_attrib.integrations.captum.NeonLRP, "
                f"which gives "
                "explain()'s relevance for any model.")
        if layer is leaves[0]:
            return _HeadInputRule(head, head_hook, leaves[-1])
        return NeonRule()
    if isinstance(hook, NeonHook):
        return NeonRule(hook)
    if _default_hook(layer) is not None:
        return NeonRule()  # a NEON layer the composite leaves without a rule: its own default
    return None


@contextlib.contextmanager
def neon_rules_attached(model: nn.Module) -> Iterator[None]:
    """``layer.rule`` on every NEON leaf layer of ``model`` while the block runs; the model as it was afterwards.

    A rule you set on a layer (``layer.rule = NeonRule(...)``, or a Captum rule on a CNN layer) is used, and put back
    after Captum deleted it; the ``activations`` Captum leaves on the leaves it visits are removed. Both attributes end
    as they were before the call, also when it fails. A rule of ``None`` means Captum's default for this call (Captum
    sets ``None`` on activation layers itself, and a failed call of Captum's own LRP leaves it behind, which would make
    Captum's next call fail on ``None.relevance_input``).
    """
    leaves = _leaves(model)
    rules = captum_rules(model)
    kept = ("rule", "activations")  # what Captum sets on the leaves it visits
    saved = {layer: {key: vars(layer)[key] for key in kept if key in vars(layer)} for layer in leaves}
    try:
        for layer in leaves:
            if "rule" in saved[layer] and saved[layer]["rule"] is None:
                del layer.rule
            if saved[layer].get("rule") is None and layer in rules:  # your own rule wins
                layer.rule = rules[layer]
        yield
    finally:
        for layer in leaves:
            for key in kept:
                vars(layer).pop(key, None)
            vars(layer).update(saved[layer])


# ---------------------------------------------------------------------------------------------------------------------
# Captum's LRP and LayerLRP with the NEON rules
class LRP(CaptumLRP):
    """Captum's :class:`captum.attr.LRP` with the NEON rules on the NEON layers: ``LRP(model).attribute(x, target)``.

    On NEON models of feature vectors it equals :func:`neon_attrib.explain` (to rounding); on a
    :class:`~neon_attrib.vision.deep.DeepNeon` the head gets exactly ``explain``'s rules and the CNN layers Captum's own
    (its ``EpsilonRule``). Rules you set on layers (``layer.rule = ...``) are used and kept across calls. Captum's own
    ``captum.attr.LRP`` refuses NEON layers ("has no rule defined"): use this class instead, or
    :class:`~neon_attrib.integrations.captum.NeonLRP` for ``explain``'s relevance with any composite.

    Parameters
    ----------
    model : torch.nn.Module
        A NEON model, or any module built from NEON layers and layers Captum has rules for.

    Raises
    ------
    TypeError
        For a head whose one rule Captum's leaf hooks cannot apply (a fused KDE, a leave-one-out head).

    Notes
    -----
    Captum's LRP puts its hooks and rules on the model itself while it runs, so calls take turns with each other and
    with every explanation (:data:`neon_attrib.pipeline.graph.TRACE_LOCK`): from several threads each gets its own
    answer.

    Examples
    --------
    >>> import numpy as np
    >>> from neon_attrib import KDEOutlier, explain
    >>> model = KDEOutlier(gamma=1.0).double().fit(np.random.default_rng(0).normal(size=(30, 3)))
    >>> x = torch.ones(2, 3, dtype=torch.float64)
    >>> torch.allclose(LRP(model).attribute(x), explain(model, x))
    True
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        captum_rules(model)  # a head Captum cannot explain: the TypeError now, not at the first call

    @typing.overload
    def attribute(self, inputs: TensorOrTupleOfTensorsGeneric, target: TargetType = None,
                  additional_forward_args: Any = None, *, return_convergence_delta: Literal[True],
                  verbose: bool = False) -> tuple[TensorOrTupleOfTensorsGeneric, torch.Tensor]: ...

    @typing.overload
    def attribute(self, inputs: TensorOrTupleOfTensorsGeneric, target: TargetType = None,
                  additional_forward_args: Any = None, return_convergence_delta: Literal[False] = False,
                  verbose: bool = False) -> TensorOrTupleOfTensorsGeneric: ...

    @log_usage()
    def attribute(self, inputs: TensorOrTupleOfTensorsGeneric, target: TargetType = None,
                  additional_forward_args: Any = None, return_convergence_delta: bool = False,
                  verbose: bool = False) -> Any:
        """Captum's :meth:`captum.attr.LRP.attribute`, with the NEON rules attached for this call."""
        with TRACE_LOCK, neon_rules_attached(self.model):
            return super().attribute(inputs, target, additional_forward_args,
                                     return_convergence_delta=return_convergence_delta,
                                     verbose=verbose)


class LayerLRP(CaptumLayerLRP):
    """Captum's :class:`captum.attr.LayerLRP` (relevance at a layer) with the NEON rules, as :class:`LRP`.

    Parameters
    ----------
    model : torch.nn.Module
        A NEON model, or any module built from NEON layers and layers Captum has rules for.
    layer : torch.nn.Module or list of torch.nn.Module
        The layer(s) whose relevance is returned.
    """

    def __init__(self, model: nn.Module, layer: Any) -> None:
        super().__init__(model, layer)
        captum_rules(model)

    @log_usage()
    def attribute(self, inputs: TensorOrTupleOfTensorsGeneric, target: TargetType = None,
                  additional_forward_args: Any = None, return_convergence_delta: bool = False,
                  attribute_to_layer_input: bool = False, verbose: bool = False) -> Any:
        """Captum's :meth:`captum.attr.LayerLRP.attribute`, with the NEON rules attached for this call."""
        with TRACE_LOCK, neon_rules_attached(self.model):
            return super().attribute(inputs, target, additional_forward_args,
                                     return_convergence_delta=return_convergence_delta,
                                     attribute_to_layer_input=attribute_to_layer_input, verbose=verbose)
