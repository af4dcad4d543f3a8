"""The Captum bridge: NEON models in existing Captum workflows.

Three ways in, from the most to the least exact:

* :class:`NeonLRP`: a :class:`captum.attr.GradientAttribution` with Captum's ``attribute`` contract that returns
  exactly :func:`neon_attrib.explain`'s relevance (the same Zennit rules and composite, for any NEON model, deep
  heads included). It plugs into ``NoiseTunnel``, ``visualize_image_attr``, ``infidelity`` and ``sensitivity_max``.
* Captum's own :class:`captum.attr.LRP`: our layers carry a class-level ``rule`` (a :class:`NeonRule`), so
  ``LRP(model).attribute(x, target=c)`` works without set-up and on every call, although Captum deletes ``module.rule``
  after each call (its issue #1059). On input-space models it equals ``explain``; on deep heads Captum's own rules run
  on the CNN layers (see :class:`NeonRule` and ``docs/captum.md`` for what is exact there).
* Every other Captum method (Saliency, IntegratedGradients, KernelShap, ...) runs on NEON models as on any module:
  :func:`compare` puts them next to NEON, with run times and deletion curves (:mod:`neon_attrib.evaluation`).

How :class:`NeonRule` fits Captum's machinery: Captum's LRP passes *normalised* relevance (relevance divided by the
score) backwards as the gradient, and rescales by the score at the end. A linear layer's rule is a pair of tensor
hooks around the autograd step (``grad / z`` on the output, ``grad · x`` on the input). Our layers are not linear, so a
:class:`NeonRule` instead replaces the layer's output by an autograd node whose backward *is* the NEON rule: it maps the
incoming relevance to the input relevance with the rule's ``relevance(module, x, out, R)``. Every NEON rule is linear
in ``R``, so starting from 1 and rescaling by the score gives the same numbers as starting from the score.
"""

from __future__ import annotations

import sys
import typing
from collections.abc import Callable
from typing import Any, Literal

import torch
from captum._utils.common import (
    _format_additional_forward_args,
    _format_output,
    _format_tensor_into_tuples,
    _is_tuple,
)
from captum._utils.typing import TargetType, TensorOrTupleOfTensorsGeneric
from captum.attr import GradientAttribution
from captum.attr._utils.lrp_rules import PropagationRule
from captum.log import log_usage
from torch import nn
from zennit.core import Composite

from ._utils import module_dtype_device
from .composites import NeonComposite
from .evaluation import DEFAULT_METHODS, Comparison, compare  # noqa: F401 (re-exported: compare lives in evaluation)
from .layers import CAPTUM_LAYERS, LocationPool, register_captum_rules  # noqa: F401 (CAPTUM_LAYERS: re-exported)
from .models import KDEInlier, KDEOutlier, KMeansMembership
from .pipeline import resolve_composite
from .pipeline import run as run_pipeline
from .rules import LocationPoolRule, NeonHook

__all__ = ["NeonLRP", "NeonRule", "compare", "Comparison", "DEFAULT_METHODS"]


# ---------------------------------------------------------------------------------------------------------------------
# NeonLRP: explain() behind Captum's attribute() contract
class NeonLRP(GradientAttribution):
    """NEON relevance with Captum's interface: ``NeonLRP(model).attribute(inputs, target)``.

    The relevance is exactly :func:`neon_attrib.explain`'s: the same composite (``model.neon_composite()`` if the model
    defines one, else :class:`~neon_attrib.composites.NeonComposite`), the same default target, and the top relevance
    is the score, so the relevance sums to the score where the rules conserve it. Hooks live for one call only.

    Parameters
    ----------
    model : torch.nn.Module
        A NEON model (:class:`~neon_attrib.models.KDEOutlier`, :class:`~neon_attrib.models.KDEInlier`,
        :class:`~neon_attrib.models.KMeansMembership`, a deep head, or any module built from NEON layers).
    composite : zennit.core.Composite, optional
        The composite to use instead of the model's default.

    Examples
    --------
    >>> import numpy as np
    >>> from neon_attrib import KDEOutlier
    >>> model = KDEOutlier(gamma=1.0).double().fit(np.random.default_rng(0).normal(size=(30, 3)))
    >>> x = torch.zeros(2, 3, dtype=torch.float64)
    >>> relevance, delta = NeonLRP(model).attribute(x, return_convergence_delta=True)
    >>> relevance.shape, delta.shape
    (torch.Size([2, 3]), torch.Size([2]))
    """

    def __init__(self, model: nn.Module, composite: Composite | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"NeonLRP needs a torch.nn.Module. Got {type(model).__name__}.")
        if composite is not None and not isinstance(composite, Composite):
            raise TypeError(f"The 'composite' parameter of NeonLRP must be a zennit Composite. Got {type(composite)}.")
        GradientAttribution.__init__(self, model)
        self.model = model
        self.composite = composite

    @property
    def multiplies_by_inputs(self) -> bool:
        """True: like Captum's LRP, NEON relevance is a *global* attribution (it sums to the score), not a local
        sensitivity; there is no separate "multiply by inputs" step to switch off (Captum's NoiseTunnel and metrics
        read this flag)."""
        return True

    def has_convergence_delta(self) -> bool:
        return True

    @typing.overload
    def attribute(self, inputs: TensorOrTupleOfTensorsGeneric, target: TargetType = None,
                  additional_forward_args: Any = None, *,
                  return_convergence_delta: Literal[True]) -> tuple[TensorOrTupleOfTensorsGeneric, torch.Tensor]: ...

    @typing.overload
    def attribute(self, inputs: TensorOrTupleOfTensorsGeneric, target: TargetType = None,
                  additional_forward_args: Any = None,
                  return_convergence_delta: Literal[False] = False) -> TensorOrTupleOfTensorsGeneric: ...

    @log_usage()
    def attribute(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        target: TargetType = None,
        additional_forward_args: Any = None,
        return_convergence_delta: bool = False,
    ) -> TensorOrTupleOfTensorsGeneric | tuple[TensorOrTupleOfTensorsGeneric, torch.Tensor]:
        """Relevance of every input feature for the model's score, shaped like ``inputs``.

        Parameters
        ----------
        inputs : torch.Tensor or tuple of torch.Tensor
            Inputs batched over the first dimension (a tuple for models with several inputs; only inputs the score
            depends on through the rules receive relevance, the others get zeros).
        target : int, sequence or tensor, optional
            The output index per example for models with several outputs (the cluster for k-means). ``None``: the
            model's ``default_target`` (the assigned cluster for k-means), else the argmax, as in ``explain``.
            Ignored for scalar scores (KDE): pass ``None`` there, as Captum expects for scalar outputs.
        additional_forward_args : optional
            Extra arguments passed to the model after the inputs (no relevance is computed for them).
        return_convergence_delta : bool
            Also return ``score − Σ relevance`` per example (0 where the rules conserve; the share dissipated by the
            KDE ``eps`` otherwise).

        Returns
        -------
        torch.Tensor or tuple of torch.Tensor
            Relevance like ``inputs`` (and the convergence delta of shape (n,), if asked for).
        """
        is_tuple = _is_tuple(inputs)
        relevances, scores = _neon_relevance(self.model, _format_tensor_into_tuples(inputs), target,
                                             additional_forward_args, self.composite)
        formatted = _format_output(is_tuple, relevances)
        if return_convergence_delta:
            return formatted, self.compute_convergence_delta(relevances, scores)
        return formatted

    def compute_convergence_delta(self, attributions: torch.Tensor | tuple[torch.Tensor, ...],
                                  output: torch.Tensor) -> torch.Tensor:
        """``output − Σ attributions`` per example (Captum's LRP convention): the relevance not conserved.

        Parameters
        ----------
        attributions : torch.Tensor or tuple of torch.Tensor
            Relevance, batched over the first dimension.
        output : torch.Tensor
            The explained score per example, shape (n,).
        """
        attributions = _format_tensor_into_tuples(attributions)
        total = sum(a.reshape(a.shape[0], -1).sum(1) for a in attributions)
        return output.reshape(-1) - total.reshape(-1)


def _neon_relevance(model: nn.Module, inputs: tuple[torch.Tensor, ...], target: Any, additional_forward_args: Any,
                    composite: Composite | None) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Relevance for every input tensor and the explained scores (n,): :func:`neon_attrib.explain` for tuples."""
    extra = _format_additional_forward_args(additional_forward_args) or ()
    dtype, _ = module_dtype_device(model)  # integer inputs are cast to the model's dtype, as explain does
    inputs = tuple(x if x.is_floating_point() else x.to(dtype) for x in inputs)
    result = run_pipeline(model, inputs, _captum_target(target), composite=composite, extra_args=extra, owner="NeonLRP")
    return result.relevance, result.score


def _captum_target(target: Any) -> Any:
    """Captum's 1-tuple targets as plain indices (our outputs are (n,) or (n, K))."""
    if isinstance(target, tuple):  # Captum's tuple targets index the trailing dims; our outputs are (n, K)
        if len(target) != 1:
            raise ValueError(f"NeonLRP accepts a tuple target only for (n, K) outputs, as (k,). Got {target!r}.")
        target = target[0]
    if isinstance(target, list) and target and isinstance(target[0], tuple):
        target = [t[0] for t in target]
    return target


# ---------------------------------------------------------------------------------------------------------------------
# NeonRule: our rules inside captum.attr.LRP
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
    """A Captum propagation rule that applies a NEON rule: put it on a layer for :class:`captum.attr.LRP`.

    Our layers already carry one (their class-level ``rule``), so you only need this class to change a rule's
    hyperparameters for Captum's LRP, e.g. ``model.pool.rule = NeonRule(SoftArgminRule(beta=2.0))`` (unlike Captum's
    own rules, it survives the call; ``model.pool.rule = None`` restores the default).

    Captum normally implements a rule as tensor hooks around the layer's gradient (``grad / z`` on the output,
    ``grad · x`` on the input), which is LRP for linear layers only. Our layers are not linear, so this rule replaces
    the layer output by an autograd node whose backward maps the relevance arriving at the output to the input with the
    NEON rule. It never modifies weights, keeps no state between calls, and leaves no hooks or attributes behind.

    Parameters
    ----------
    hook : neon_attrib.rules rule, optional
        A NEON rule (:class:`~neon_attrib.rules.SoftArgminRule`, ...). ``None``: the rule
        :class:`~neon_attrib.composites.NeonComposite` puts on the layer (input mode: one rule per layer).
    """

    def __init__(self, hook: NeonHook | None = None) -> None:
        if hook is not None and not isinstance(hook, NeonHook):
            raise TypeError(f"NeonRule wraps a NEON rule from neon_attrib.rules. Got {type(hook).__name__}.")
        self.hook = hook

    def _resolve(self, module: nn.Module) -> NeonHook:
        if self.hook is not None:
            return self.hook
        hook = NeonComposite()._map({}, "", module)
        if hook is None and isinstance(module, LocationPool):
            hook = LocationPoolRule()
        if not isinstance(hook, NeonHook):
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


def _check_not_empty(inputs: tuple[torch.Tensor, ...]) -> None:
    if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].ndim and inputs[0].shape[0] == 0:
        raise ValueError("captum.attr.LRP cannot explain an empty batch (Captum indexes the first example). "
                         "Use neon_attrib.captum.NeonLRP, which returns an empty relevance for an empty batch.")


class _HeadInputRule(NeonRule):
    """The rule of a head's *input* layer when the explained model puts one rule on the whole head (activation mode).

    Captum's LRP visits leaf modules only, but NEON's rules for heads on CNN activations (e.g.
    :class:`~neon_attrib.rules.KDEOutlierActivationRule`) are defined on the whole head. The head's top layer keeps
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

        def rule(relevance_out: torch.Tensor) -> torch.Tensor:
            head_out = top.forward(out)  # .forward: no hooks (Captum's are registered on ``top`` right now)
            head_relevance = relevance_out.sum(-1)
            return hook.relevance(head, x_data, head_out, head_relevance).to(relevance_out.dtype)

        return _RelevanceStep.apply(x, out, rule)

    def __repr__(self) -> str:
        return f"_HeadInputRule({self.hook!r} on {type(self.head).__name__})"


class _CaptumRule:
    """``layer.rule``: the layer's NEON rule as a Captum ``PropagationRule``, for :class:`captum.attr.LRP`.

    Captum reads ``module.rule`` on every leaf module and *deletes* it after each call (Captum issue #1059). This data
    descriptor lives on the class, so Captum's ``del layer.rule`` cannot remove it: ``LRP(model)`` works on NEON
    models without set-up, call after call. ``layer.rule = r`` stores an override (``None`` restores the default).
    Importing this module installs it on the NEON layers.
    """

    def __get__(self, layer, owner=None):
        if layer is None:
            return self
        return _get_layer_rule(layer)

    def __set__(self, layer, rule):
        _set_layer_rule(layer, rule)

    def __delete__(self, layer):
        _delete_layer_rule(layer)


_OVERRIDE = "_neon_captum_rule"
#: Heads whose forward is ``pool(layer(x))`` through their two NEON layers (leave-one-out heads compute it directly).
_HEAD_FORWARDS = (KDEOutlier.forward, KDEInlier.forward, KMeansMembership.forward)


def _get_layer_rule(layer: nn.Module) -> PropagationRule:
    """``layer.rule`` (``neon_attrib.layers._CaptumRule``): the user's override, else the rule the explained model's
    composite gives the layer (when Captum's LRP asks), else the layer's default NeonRule. Fresh on every access."""
    override = layer.__dict__.get(_OVERRIDE)
    if override is not None:
        return override
    root = _calling_lrp_model()
    rule = _rule_in_context(root, layer) if root is not None else None
    return rule if rule is not None else NeonRule()


def _calling_lrp(max_depth: int = 8) -> Any:
    """The :class:`captum.attr.LRP` whose method is reading (or deleting) ``layer.rule`` right now, if any.

    Captum reads ``module.rule`` from LRP's own methods (``_check_rules``, ``_check_and_attach_rules``,
    ``_register_forward_hooks``, ``_remove_rules``, ...), whose ``self`` is the LRP instance, a few frames up the
    stack. This tells a layer which model is being explained (a head inside a :class:`~neon_attrib.deep.DeepNeon`
    needs its activation rule) without storing anything on the model.
    """
    from captum.attr import LRP

    frame = sys._getframe(1)
    for _ in range(max_depth):
        frame = frame.f_back
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, LRP):
            return owner
    return None


def _calling_lrp_model() -> nn.Module | None:
    lrp = _calling_lrp()
    model = getattr(lrp, "model", None)
    return model if isinstance(model, nn.Module) else None


def _rule_in_context(root: nn.Module, layer: nn.Module) -> PropagationRule | None:
    """The Captum rule for ``layer`` under the composite ``explain`` would use on ``root`` (None: the default)."""
    composite = resolve_composite(root)
    assigned: dict[int, tuple[str, Any]] = {}
    ctx: dict = {}
    for name, module in root.named_modules():
        assigned[id(module)] = (name, composite.module_map(ctx, name, module))
    name, hook = assigned.get(id(layer), ("", None))
    # inside a head that carries one rule for all of it (activation mode)? The outermost such head wins, as in Zennit,
    # where the head's hook replaces whatever its inner layers' hooks computed.
    for head_name, head in root.named_modules():
        head_hook = assigned[id(head)][1]
        if head is layer or not isinstance(head_hook, NeonHook) or not name.startswith(f"{head_name}."):
            continue
        leaves = [m for m in head.modules() if next(m.children(), None) is None]
        if type(head).forward not in _HEAD_FORWARDS or len(leaves) != 2 or getattr(head, "fused", False):
            raise TypeError(
                f"captum.attr.LRP cannot apply {type(head_hook).__name__} to {type(head).__name__}: Captum only hooks "
                f"leaf modules, and this head's forward does not run through exactly two NEON layers (its input layer "
                f"and its pooling; a fused KDEOutlier skips them). Use neon_attrib.captum.NeonLRP, which gives "
                "explain()'s relevance for any model.")
        if layer is leaves[0]:
            return _HeadInputRule(head, head_hook, leaves[-1])
        return NeonRule()
    if isinstance(hook, NeonHook):
        return NeonRule(hook)
    return None


def _set_layer_rule(layer: nn.Module, rule: PropagationRule | None) -> None:
    if rule is None:
        layer.__dict__.pop(_OVERRIDE, None)
        return
    if not isinstance(rule, PropagationRule):
        raise TypeError(f"The rule of {type(layer).__name__} must be a captum PropagationRule (e.g. NeonRule(...)). "
                        f"Got {type(rule).__name__}.")
    layer.__dict__[_OVERRIDE] = rule


def _delete_layer_rule(layer: nn.Module) -> None:
    """Captum's ``LRP`` deletes every layer's rule after each call (``_remove_rules``): ours stay.

    Captum also leaves an ``activations`` dict on every leaf it visited (its ``_clear_properties`` deletes
    ``activation``, singular): we remove it from this layer and, when called from that clean-up, from all the LRP's
    layers, so that no attribute is left on the user's model.
    """
    layer.__dict__.pop("activations", None)
    lrp = _calling_lrp()
    for visited in getattr(lrp, "layers", None) or ():
        visited.__dict__.pop("activations", None)


# the class-level ``rule`` slot of CAPTUM_LAYERS (neon_attrib.layers.CaptumRuleSlot) is answered by this module
register_captum_rules(_CaptumRule())
