"""What neon_attrib relies on in Zennit, checked on whichever Zennit is installed (0.5.1 and 1.0 are supported).

Zennit 1.0 changed three things under us: its hooks take the forward's keyword arguments (``forward(module, args,
kwargs, output)``, ``pre_forward(module, args, kwargs)``) and wrap every tensor argument and output in an autograd node;
its batch-norm merge replaces weights by plain tensors and sets the batch norm's ``eps`` to 0; its rules reload
modified parameters with ``load_state_dict(assign=True)``. Each test below holds on both versions; the suite runs
against Zennit 1.0 with it on ``PYTHONPATH`` (see docs/architecture.md).
"""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import accept_zero_eps, assert_no_hooks, assert_repeatable
from torch import nn
from zennit.attribution import Gradient
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import EpsilonGammaBox, LayerMapComposite
from zennit.core import Hook
from zennit.rules import Epsilon, Pass
from zennit.types import Convolution, Linear

from neon_attrib import NeonHook
from neon_attrib.pipeline.engine import isolated
from neon_attrib.vision.fast import (
    FastAlphaBeta,
    FastEpsilon,
    FastEpsilonGammaBox,
    FastFlat,
    FastGamma,
    FastNorm,
    FastPass,
    FastZBox,
    FastZPlus,
    LRPExplainer,
)

F64 = torch.float64
LOW, HIGH = -3.0, 3.0
#: Zennit >= 1.0: hooks see the forward's keyword arguments (feature detection, not a version string)
KWARGS_HOOKS = "kwargs" in inspect.signature(Hook.pre_forward).parameters


def small_cnn() -> nn.Sequential:
    """Conv / batch norm / in-place ReLU / average pooling / linear, float64, with non-trivial batch-norm statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
        nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 5),
    )
    with torch.no_grad():
        for module in model:
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model.eval().to(F64)


def inputs(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(seed))


def attr_output(out: torch.Tensor) -> torch.Tensor:
    return out * torch.linspace(-1.0, 1.0, out.shape[1], dtype=out.dtype)


def max_rel_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    return ((result - reference).abs().max() / reference.abs().max()).item()


def state(model: nn.Module) -> dict:
    """Values, keys and parameter objects of ``model``, and every attribute that shadows a parameter or buffer."""
    return {
        "values": {key: value.detach().clone() for key, value in model.state_dict().items()},
        "parameters": [(name, id(p)) for name, p in model.named_parameters()],
        "shadows": [(name, key) for name, module in model.named_modules() for key in vars(module)
                    if key in module._parameters or key in module._buffers],
        "forwards": [name for name, module in model.named_modules() if "forward" in vars(module)],
    }


def assert_same_state(model: nn.Module, before: dict) -> None:
    after = state(model)
    assert list(after["values"]) == list(before["values"])
    assert all(torch.equal(after["values"][key], value) for key, value in before["values"].items())
    assert after["parameters"] == before["parameters"]
    assert after["shadows"] == before["shadows"] == []
    assert after["forwards"] == before["forwards"] == []


# ---------------------------------------------------------------------------------------------------------------------
# the fast rules equal Zennit's, one rule at a time, with Zennit's batch-norm merge
# ---------------------------------------------------------------------------------------------------------------------


RULES = [FastEpsilon(epsilon=0.1), FastGamma(gamma=0.5), FastZPlus(), FastAlphaBeta(alpha=2.0, beta=1.0), FastFlat(),
         FastZBox(low=LOW, high=HIGH)]


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: type(rule).__name__)
def test_each_fast_rule_equals_its_zennit_rule(rule):
    """On every Linear / Conv layer (batch norms merged), with Pass / Norm on the rest: the fast rule, Zennit's
    equivalent (``to_zennit()``), and a mix of both give the same relevance, and no hook or canonizer is left."""
    model = small_cnn()
    before = state(model)
    x = inputs()

    def composite(linear_rule, pass_rule, norm_rule):
        return LayerMapComposite(
            layer_map=[(nn.ReLU, pass_rule), (nn.BatchNorm2d, pass_rule), (nn.AvgPool2d, norm_rule),
                       (Convolution, linear_rule), (Linear, linear_rule)],
            canonizers=[SequentialMergeBatchNorm()])

    fast = composite(rule, FastPass(), FastNorm())
    zennit = composite(rule.to_zennit(), Pass(), FastNorm().to_zennit())
    mixed = composite(rule.to_zennit(), FastPass(), FastNorm())  # Zennit's hooks feeding the fast ones
    results = []
    for chosen in (zennit, fast, mixed):
        copy = isolated(model)
        with accept_zero_eps(), Gradient(copy, chosen) as attributor:  # Zennit's own merge: eps = 0 on Zennit 1.0
            results.append(attributor(x, attr_output)[1])
        assert_no_hooks(copy)
        assert not chosen.handles and not chosen.hook_refs
    assert results[0].abs().sum() > 0
    assert max_rel_error(results[1], results[0]) < 1e-9
    assert max_rel_error(results[2], results[0]) < 1e-9
    assert_same_state(model, before)


def test_rules_keep_their_hyperparameters_through_copy():
    """Zennit calls ``copy()`` once per module; every rule rebuilds itself with its arguments."""
    for rule in RULES + [FastNorm(stabilizer=1e-3)]:
        assert repr(rule.copy()) == repr(rule)
    assert FastGamma(gamma=0.5).copy().gamma == 0.5


# ---------------------------------------------------------------------------------------------------------------------
# hooks and canonizers: applied to a copy, removed completely
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["zennit", "fast"])
def test_explainer_leaves_the_model_untouched(kind):
    """Zennit's own composite (its rules reload parameters) or the fast one, with the batch-norm merge, through the
    pipeline: the model keeps its parameter objects, values, state_dict keys and attributes, carries no hook, and
    two calls on one explainer give the same relevance as Zennit's attributor on a copy."""
    model = small_cnn()
    before = state(model)
    x = inputs(1)
    cls = EpsilonGammaBox if kind == "zennit" else FastEpsilonGammaBox
    with LRPExplainer(model, cls(low=LOW, high=HIGH, canonizers=[SequentialMergeBatchNorm()])) as explainer:
        _, relevance = explainer(x, attr_output)
        _, again = explainer(x, attr_output)
        assert explainer.last_audit.ok, explainer.last_audit
    with accept_zero_eps():
        _, reference = Gradient(isolated(model), EpsilonGammaBox(
            low=LOW, high=HIGH, canonizers=[SequentialMergeBatchNorm()]))(x, attr_output)
    assert_repeatable(relevance, again)
    assert max_rel_error(relevance, reference) < 1e-9
    assert_no_hooks(model)
    assert_same_state(model, before)


def test_merged_batch_norm_follows_the_installed_zennit():
    """Zennit 0.5's merge leaves ``x / sqrt(1 + eps)`` in each batch norm, Zennit 1.0 sets ``eps`` to 0: the canonized
    network differs from the model by ~eps/2 per batch norm on 0.5 and only by rounding on 1.0 (documented in
    ``default_canonizers``); our pipeline applies whichever the installed Zennit does."""
    model = small_cnn()
    x = inputs(2)
    with torch.no_grad():
        expected = model(x)
    copy = isolated(model)
    canonizer = SequentialMergeBatchNorm()
    handles = canonizer.apply(copy)
    try:
        merged_eps = [module.eps for module in copy if isinstance(module, nn.BatchNorm2d)]
        with torch.no_grad(), accept_zero_eps():
            canonized = copy(x)
    finally:
        for handle in handles:
            handle.remove()
    error = max_rel_error(canonized, expected)
    if merged_eps == [0.0, 0.0]:  # Zennit 1.0
        assert error < 1e-12
    else:  # Zennit 0.5: the batch norms keep eps = 1e-5
        assert merged_eps == [1e-5, 1e-5]
        assert 1e-8 < error < 2e-5


# ---------------------------------------------------------------------------------------------------------------------
# NeonHook: the same contract with either hook API
# ---------------------------------------------------------------------------------------------------------------------


class Scale(nn.Module):
    """``sum(x * s)`` over the last axis; ``s`` by position or keyword."""

    def forward(self, x: torch.Tensor, s: torch.Tensor | float = 1.0) -> torch.Tensor:
        return (x * s).sum(-1)


class Share(NeonHook):
    """Each of the d features gets 1/d of the output's relevance."""

    def relevance(self, module, x, out, relevance_out):
        return relevance_out.unsqueeze(-1).expand_as(x) / x.shape[-1]


def run(call) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(x, d/dx, d/ds)`` of ``call(module, x, s).sum()`` with :class:`Share` on the module; checks the cleanup."""
    module, hook = Scale(), Share()
    handles = hook.register(module)
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    s = torch.randn(2, 3, dtype=F64, requires_grad=True)
    try:
        out = call(module, x, s)
        return (x, *torch.autograd.grad(out.sum(), (x, s), allow_unused=True))
    finally:
        handles.remove()
        assert_no_hooks(module)
        assert not hook.stored_tensors


def test_neon_hook_detects_the_hook_api():
    """NeonHook's ``pre_forward`` takes Zennit 1.0's keyword arguments when Zennit passes them, and none otherwise."""
    module, hook = Scale(), Share()
    handles = hook.register(module)
    try:
        with_kwargs = any(module._forward_pre_hooks_with_kwargs.values())
    finally:
        handles.remove()
    assert with_kwargs == KWARGS_HOOKS


@pytest.mark.parametrize("how", ["x", "x, s", "x, s=s"])
def test_neon_hook_gives_the_relevance_to_the_first_input(how):
    """With either Zennit: the first input receives the rule's relevance, a second positional tensor none (only the
    first input receives relevance), a keyword tensor its plain gradient (Zennit's hooks leave keywords alone)."""
    calls = {"x": lambda m, x, s: m(x), "x, s": lambda m, x, s: m(x, s), "x, s=s": lambda m, x, s: m(x, s=s)}
    x, grad_x, grad_s = run(calls[how])
    torch.testing.assert_close(grad_x, torch.full((2, 3), 1 / 3, dtype=F64))
    if how == "x, s=s":
        torch.testing.assert_close(grad_s, x.detach())  # d/ds sum(x * s)
    else:
        assert grad_s is None


def test_neon_hook_refuses_what_the_zennit_versions_do_differently():
    """A constant first input next to a differentiable one (Zennit 0.5 would pass the plain gradient, 1.0 nothing) and a
    positional non-tensor (either version's hook breaks): the same clear error on both, and no hook left."""
    with pytest.raises(ValueError, match="first input"):
        run(lambda m, x, s: m(x.detach(), s))
    with pytest.raises(TypeError, match="positional arguments of the module must be tensors"):
        run(lambda m, x, s: m(x, 2.0))
    with torch.no_grad():  # no gradient needed: nothing to refuse
        module, hook = Scale(), Share()
        handles = hook.register(module)
        assert module(torch.ones(1, 3), 2.0).item() == 6.0
        handles.remove()


def test_mixed_zennit_and_fast_hooks_with_in_place_relu():
    """Zennit's Epsilon on the convolutions feeds an in-place ReLU under FastPass (Zennit 1.0 clones the outputs of its
    hooked modules, 0.5 does not): same relevance as Zennit's rules alone."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3), nn.ReLU(inplace=True),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).to(F64).eval()
    x = inputs(4)
    results = []
    for relu_rule, linear_rule in ((Pass(), Epsilon()), (FastPass(), FastEpsilon())):
        composite = LayerMapComposite([(nn.ReLU, relu_rule), (nn.Conv2d, Epsilon()), (nn.Linear, linear_rule)])
        copy = isolated(model)
        results.append(Gradient(copy, composite)(x, attr_output)[1])
        assert_no_hooks(copy)
    assert max_rel_error(results[1], results[0]) < 1e-12
