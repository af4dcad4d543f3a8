"""Fast LRP rules (neon_attrib.vision.fast) against Zennit's rules and composites.

Ground truth is Zennit itself: the same model, the same ``attr_output``, Zennit's ``Gradient`` attributor with
``EpsilonGammaBox`` / ``EpsilonPlusFlat`` (or the single Zennit rule). Errors are measured as
``max |fast - zennit| / max |zennit|``: 1e-5 in float32, 1e-9 in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from conftest import accept_zero_eps, assert_no_hooks, assert_repeatable
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from zennit.attribution import Gradient
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat, LayerMapComposite
from zennit.rules import Pass, ZBox

from neon_attrib.core.deferred import Bound, DeferredChecks, decide, holds
from neon_attrib.pipeline.engine import ConservationWarning, _Step, isolated
from neon_attrib.vision.fast import (
    FastAlphaBeta,
    FastEpsilon,
    FastEpsilonGammaBox,
    FastEpsilonPlusFlat,
    FastFlat,
    FastGamma,
    FastNorm,
    FastPass,
    FastZBox,
    FastZPlus,
    LRPExplainer,
)

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-9}
LOW, HIGH = -3.0, 3.0


def max_rel_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    return ((result - reference).abs().max() / reference.abs().max()).item()


def composites(name: str, canonizers: tuple = ()):
    """(zennit composite, fast composite) pairs."""
    if name == "epsilon_gamma_box":
        return (EpsilonGammaBox(low=LOW, high=HIGH, canonizers=list(canonizers)),
                FastEpsilonGammaBox(low=LOW, high=HIGH, canonizers=list(canonizers)))
    return EpsilonPlusFlat(canonizers=list(canonizers)), FastEpsilonPlusFlat(canonizers=list(canonizers))


def explain_both(model, x, attr_output, name, canonizers: tuple = ()):
    """Relevance from Zennit (on a copy: canonizers change it) and from the fast composite, plus the fast rules' paths
    (shortcut / exact)."""
    zennit_composite, fast_composite = composites(name, canonizers)
    with accept_zero_eps():  # Zennit 1.0's merged batch norms (eps = 0) where PyTorch refuses them
        _, reference = Gradient(isolated(model), zennit_composite)(x, attr_output)
    with LRPExplainer(model, fast_composite) as explainer:
        _, relevance = explainer(x, attr_output)
        paths = [hook.last_path for hook in fast_composite.hook_refs if hasattr(hook, "last_path")]
    assert_no_hooks(model)
    return relevance, reference, paths


@pytest.fixture(scope="module")
def vgg16_features() -> nn.Sequential:
    """torchvision's ``vgg16(weights=None).features`` (built once: the classifier's init is slow), with small random
    biases so that the bias terms of the rules matter."""
    torch.manual_seed(0)
    features = torchvision.models.vgg16(weights=None).features.eval()
    with torch.no_grad():
        for module in features:
            if isinstance(module, nn.Conv2d):
                module.bias.uniform_(-0.05, 0.05)
    return features


@pytest.fixture
def vgg_features(vgg16_features):
    return lambda dtype: copy.deepcopy(vgg16_features).to(dtype)


def tiny_cnn(dtype: torch.dtype = torch.float64, batch_norm: bool = True) -> nn.Sequential:
    """Conv / ReLU (in place) / max pool / strided, bias-free, dilated convolutions / batch norm / average pooling /
    linear layers: every layer type the composites map. ``batch_norm=False``: an identity in the batch norm's place,
    for tests of the explainer's mechanics without a canonizer (an unmerged batch norm is refused)."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, stride=2, padding=2, dilation=2), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.Conv2d(16, 16, 1, groups=4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10), nn.ReLU(), nn.Linear(10, 5),
    )
    with torch.no_grad():
        model[6].running_mean.uniform_(-0.5, 0.5)
        model[6].running_var.uniform_(0.5, 2.0)
    if not batch_norm:
        model[6] = nn.Identity()
    return model.eval().to(dtype)


# ---------------------------------------------------------------------------------------------------------------------
# whole networks against Zennit's composites
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["epsilon_gamma_box", "epsilon_plus_flat"])
def test_vgg16_features_output_relevance(vgg_features, dtype, name):
    """attr_output = output: relevance only where the last ReLU is active, so every Gamma/ZPlus layer shortcuts."""
    model = vgg_features(dtype)
    x = torch.randn(1, 3, 32, 32, dtype=dtype, generator=torch.Generator().manual_seed(0))
    relevance, reference, paths = explain_both(model, x, lambda out: out, name)
    assert max_rel_error(relevance, reference) < TOLERANCE[dtype]
    assert paths.count("shortcut") == 12 and paths.count("exact") == 1  # the first layer (ZBox / Flat) is exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vgg16_features_signed_relevance_at_zero_activations(vgg_features, dtype):
    """Signed relevance on every output, zeros included (max pool hands it to a ReLU output of 0, i.e. z <= 0):
    the last convolution must fall back, and still equal Zennit."""
    model = vgg_features(dtype)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 32, 32, dtype=dtype, generator=generator)
    with torch.no_grad():
        out = model(x)
    assert (out == 0).any()
    attr = torch.randn(out.shape, dtype=dtype, generator=generator)
    relevance, reference, paths = explain_both(model, x, attr, "epsilon_gamma_box")
    assert max_rel_error(relevance, reference) < TOLERANCE[dtype]
    assert paths.count("exact") >= 2  # ZBox and at least the last Gamma layer


@pytest.mark.parametrize("name", ["epsilon_gamma_box", "epsilon_plus_flat"])
def test_tiny_cnn_all_layer_types(name):
    model = tiny_cnn()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    # the batch norm merged (a batch norm passed through unmerged is refused)
    relevance, reference, paths = explain_both(model, x, lambda out: out, name, (SequentialMergeBatchNorm(),))
    assert max_rel_error(relevance, reference) < 1e-9
    assert "shortcut" in paths
    # the model is left as it was: in-place flags and outputs
    assert model[1].inplace and model[7].inplace


# ---------------------------------------------------------------------------------------------------------------------
# fallbacks
# ---------------------------------------------------------------------------------------------------------------------


def _conv(c_in, c_out):
    return nn.Conv2d(c_in, c_out, 3, padding=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["epsilon_gamma_box", "epsilon_plus_flat"])
@pytest.mark.parametrize("between", ["nothing", "leaky_relu"])
def test_negative_layer_inputs_fall_back(dtype, name, between):
    """A convolution fed by a convolution without ReLU, or through a LeakyReLU, sees negative inputs."""
    torch.manual_seed(3)
    middle = [] if between == "nothing" else [nn.LeakyReLU(0.1)]
    model = nn.Sequential(_conv(3, 6), nn.ReLU(), _conv(6, 6), *middle, _conv(6, 6), nn.ReLU(), _conv(6, 4), nn.ReLU())
    model = model.eval().to(dtype)
    x = torch.randn(2, 3, 12, 12, dtype=dtype, generator=torch.Generator().manual_seed(3))
    relevance, reference, paths = explain_both(model, x, lambda out: out, name)
    assert max_rel_error(relevance, reference) < TOLERANCE[dtype]
    # exact: the first layer, the negative-input layer and, for Gamma, the layer below it (its output z < 0 gets
    # relevance); ZPlus does not look at the relevance
    exact = 3 if name == "epsilon_gamma_box" else 2
    assert paths.count("exact") == exact and paths.count("shortcut") == 4 - exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_relevance_at_negative_outputs_falls_back(dtype):
    """A model ending in a convolution (no ReLU) with signed relevance everywhere: relevance arrives where z < 0."""
    torch.manual_seed(4)
    model = nn.Sequential(_conv(3, 6), nn.ReLU(inplace=True), _conv(6, 6), nn.ReLU(inplace=True), _conv(6, 5))
    model = model.eval().to(dtype)
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 10, 10, dtype=dtype, generator=generator)
    attr = torch.randn(2, 5, 10, 10, dtype=dtype, generator=generator)
    relevance, reference, paths = explain_both(model, x, attr, "epsilon_gamma_box")
    assert max_rel_error(relevance, reference) < TOLERANCE[dtype]
    assert paths.count("exact") == 2 and paths.count("shortcut") == 1


class _AddInPlace(nn.Module):
    """An unhooked module that writes into its input: the stored convolution output changes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.add_(0.5)


def test_output_changed_in_place_is_recomputed():
    torch.manual_seed(5)
    model = nn.Sequential(_conv(3, 6), nn.ReLU(), _conv(6, 6), _AddInPlace(), nn.ReLU(), _conv(6, 4), nn.ReLU())
    model = model.eval().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    relevance, reference, _ = explain_both(model, x, lambda out: out, "epsilon_gamma_box")
    assert max_rel_error(relevance, reference) < 1e-9


def test_transposed_convolution_uses_zennit_rule():
    torch.manual_seed(6)
    model = nn.Sequential(_conv(3, 4), nn.ReLU(), nn.ConvTranspose2d(4, 4, 2, stride=2), nn.ReLU(), _conv(4, 2))
    model = model.eval().double()
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    relevance, reference, _ = explain_both(model, x, lambda out: out.clamp(min=0), "epsilon_gamma_box")
    assert max_rel_error(relevance, reference) < 1e-9


# ---------------------------------------------------------------------------------------------------------------------
# single layers, many configurations (hypothesis)
# ---------------------------------------------------------------------------------------------------------------------

RULES = {
    "gamma": lambda: FastGamma(gamma=0.5),
    "zplus": lambda: FastZPlus(),
    "alpha2beta1": lambda: FastAlphaBeta(alpha=2.0, beta=1.0),
    "epsilon": lambda: FastEpsilon(epsilon=0.1),
    "zbox": lambda: FastZBox(low=-2.0, high=torch.tensor([[[[1.5]], [[2.0]], [[2.5]], [[3.0]]]], dtype=torch.float64)),
    "flat": lambda: FastFlat(),
}


@settings(max_examples=30, deadline=None)
@given(
    rule=st.sampled_from(sorted(RULES)),
    layer=st.sampled_from(["conv2d", "conv1d", "linear"]),
    stride=st.integers(1, 2),
    padding=st.sampled_from([0, 1, "same", "valid"]),
    dilation=st.integers(1, 2),
    groups=st.sampled_from([1, 2]),
    bias=st.booleans(),
    padding_mode=st.sampled_from(["zeros", "zeros", "reflect"]),
    input_sign=st.sampled_from(["nonneg", "signed"]),
    relevance_kind=st.sampled_from(["masked", "signed"]),
    zero_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_single_layer_rule_matches_zennit(rule, layer, stride, padding, dilation, groups, bias, padding_mode,
                                          input_sign, relevance_kind, zero_bias, seed):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if layer == "linear":
        module, shape = nn.Linear(8, 6, bias=bias), (3, 8)
    else:
        if padding == "same":
            stride = 1
        conv = nn.Conv2d if layer == "conv2d" else nn.Conv1d
        module = conv(4, 6, 3, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias,
                      padding_mode=padding_mode)
        shape = (2, 4, 7, 7) if layer == "conv2d" else (2, 4, 9)
    module = module.double()
    if rule == "zbox" and layer != "conv2d":
        rule = "gamma"
    fast = RULES[rule]()
    if zero_bias and rule != "flat":
        fast = type(fast)(**{**fast._hyperparameters(), "zero_params": ["bias"]})
    x = torch.randn(shape, dtype=torch.float64, generator=generator)
    if input_sign == "nonneg":
        x = x.clamp(min=0)
    if rule == "zbox":
        x = x.clamp(-2.0, 1.5)
    with torch.no_grad():
        z = module(x)
    attr = torch.randn(z.shape, dtype=torch.float64, generator=generator)
    if relevance_kind == "masked":
        attr = attr * (z > 0)
    model = nn.Sequential(module)
    _, reference = Gradient(model, LayerMapComposite([(type(module), fast.to_zennit())]))(x, attr)
    with LRPExplainer(model, LayerMapComposite([(type(module), fast)])) as explainer:
        _, relevance = explainer(x, attr)
    assert_no_hooks(model)
    assert torch.allclose(relevance, reference, rtol=1e-9, atol=1e-9 * reference.abs().max().item())


# ---------------------------------------------------------------------------------------------------------------------
# hyperparameters, hooks, the explainer
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule, attribute, value", [
    (FastGamma(gamma=3), "gamma", 3),
    (FastGamma(stabilizer=1e-3), "stabilizer", 1e-3),
    (FastEpsilon(epsilon=0.25), "epsilon", 0.25),
    (FastZPlus(stabilizer=1e-2), "stabilizer", 1e-2),
    (FastAlphaBeta(alpha=3, beta=2), "alpha", 3),
    (FastAlphaBeta(alpha=3, beta=2), "beta", 2),
    (FastZBox(low=-1.0, high=2.0), "low", -1.0),
    (FastZBox(low=-1.0, high=2.0, zero_params="bias"), "zero_params", ("bias",)),
    (FastFlat(stabilizer=1e-4), "stabilizer", 1e-4),
    (FastNorm(stabilizer=1e-4), "stabilizer", 1e-4),
])
def test_copy_keeps_hyperparameters(rule, attribute, value):
    copy = rule.copy()
    assert type(copy) is type(rule) and copy is not rule
    assert getattr(copy, attribute) == value
    assert repr(copy) == repr(rule)


def test_invalid_hyperparameters():
    with pytest.raises(ValueError, match="'gamma' parameter of FastGamma"):
        FastGamma(gamma=-1.0)
    with pytest.raises(ValueError, match="FastAlphaBeta"):
        FastAlphaBeta(alpha=1.0, beta=1.0)
    with pytest.raises(TypeError, match="'epsilon' parameter of FastEpsilon"):
        FastEpsilon(epsilon="small")
    with pytest.raises(TypeError, match="ConvTranspose2d"):
        FastGamma().register(nn.ConvTranspose2d(2, 2, 3))
    with pytest.raises(TypeError, match="LRPExplainer"):
        LRPExplainer(nn.ReLU(), EpsilonGammaBox)
    with pytest.raises(ValueError, match="autocast_dtype"):
        LRPExplainer(nn.ReLU(), FastEpsilonPlusFlat(), autocast_dtype=torch.float64)


def test_explainer_reuse_determinism_and_cleanup():
    model = tiny_cnn(torch.float32, batch_norm=False)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        plain = model(x)
    explainer = LRPExplainer(model, FastEpsilonGammaBox(low=LOW, high=HIGH))
    out1, first = explainer(x, lambda out: out)
    out2, second = explainer(x, lambda out: out)
    _, other = explainer(x[:1] * 2, lambda out: out)
    assert_repeatable(first, second)
    assert_repeatable(out1, out2)
    assert_repeatable(out1, plain)
    assert other.shape == (1, 3, 16, 16)
    assert not first.requires_grad and not out1.requires_grad
    explainer.close()
    explainer.close()  # idempotent
    assert_no_hooks(model)
    with pytest.raises(RuntimeError, match="closed"):
        explainer(x)
    with torch.no_grad():
        assert torch.equal(model(x), plain)
    assert model[1].inplace and not model[3].inplace


def test_explainer_attr_output_forms_and_channels_last():
    model = tiny_cnn(torch.float32, batch_norm=False)[:10]  # ends with a (1x1, grouped) conv and ReLU: (2, 16, 4, 4)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(8))
    with LRPExplainer(model, FastEpsilonGammaBox(low=LOW, high=HIGH)) as explainer:
        out, by_default = explainer(x)
        _, by_tensor = explainer(x, out)
        _, by_broadcast = explainer(x, torch.ones(1, 16, 1, 1))
        _, by_ones = explainer(x, torch.ones_like(out))
    with LRPExplainer(model, FastEpsilonGammaBox(low=LOW, high=HIGH), channels_last=True) as explainer:
        _, channels_last = explainer(x)
    assert torch.equal(by_default, by_tensor) and torch.equal(by_broadcast, by_ones)
    assert channels_last.is_contiguous() and max_rel_error(channels_last, by_default) < 1e-5
    assert_no_hooks(model)


def test_autocast_is_approximate():
    model = tiny_cnn(torch.float32, batch_norm=False)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    with LRPExplainer(model, FastEpsilonGammaBox(low=LOW, high=HIGH)) as explainer:
        _, exact = explainer(x)
    with LRPExplainer(model, FastEpsilonGammaBox(low=LOW, high=HIGH), autocast_dtype=torch.bfloat16) as explainer:
        _, approx = explainer(x)
    assert approx.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(approx.flatten(), exact.flatten(), dim=0)
    assert cosine > 0.9


def test_custom_layer_map_in_front():
    class Scale(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * x

    torch.manual_seed(10)
    model = nn.Sequential(_conv(3, 4), nn.ReLU(), Scale(), _conv(4, 4), nn.ReLU()).double()
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    _, reference = Gradient(model, EpsilonGammaBox(low=LOW, high=HIGH, layer_map=[(Scale, Pass())]))(x)
    composite = FastEpsilonGammaBox(low=LOW, high=HIGH, layer_map=[(Scale, FastPass())])
    with LRPExplainer(model, composite) as explainer:
        assert explainer._work[2]._forward_hooks  # the custom entry was used (on the explainer's copy)
        _, relevance = explainer(x)
    assert max_rel_error(relevance, reference) < 1e-9
    assert_no_hooks(model)


def test_weight_changes_are_seen():
    """The rules cache modified weights; an in-place weight update must invalidate them."""
    model = tiny_cnn(batch_norm=False)
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    with LRPExplainer(model, FastEpsilonGammaBox(low=LOW, high=HIGH)) as explainer:
        _, before = explainer(x)
        with torch.no_grad():
            model[2].weight.mul_(-1.5)
        _, after = explainer(x)
    _, reference = Gradient(model, EpsilonGammaBox(low=LOW, high=HIGH))(x)
    assert not torch.allclose(before, after)
    assert max_rel_error(after, reference) < 1e-9


def test_second_backward_is_refused():
    model = nn.Sequential(_conv(3, 4), nn.ReLU(), _conv(4, 2), nn.ReLU())
    composite = FastEpsilonGammaBox(low=LOW, high=HIGH)
    with composite.context(model):
        x = torch.randn(1, 3, 5, 5, requires_grad=True)
        out = model(x)
        torch.autograd.grad(out, x, out, retain_graph=True)
        with pytest.raises(RuntimeError, match="one backward pass"):
            torch.autograd.grad(out, x, out)
    assert_no_hooks(model)


@pytest.mark.parametrize("case", ["unbatched_conv2d", "conv3d", "unbatched_linear"])
@pytest.mark.parametrize("rule", ["gamma", "zbox", "flat", "epsilon"])
def test_other_input_shapes(case, rule):
    torch.manual_seed(12)
    generator = torch.Generator().manual_seed(12)
    if case == "unbatched_conv2d":
        module, shape = nn.Conv2d(4, 3, 3, padding=1), (4, 5, 5)
    elif case == "conv3d":
        module, shape = nn.Conv3d(4, 3, 3, padding=1), (2, 4, 4, 4, 4)
    else:
        module, shape = nn.Linear(4, 3), (4,)
    module = module.double()
    fast = {"gamma": FastGamma(), "zbox": FastZBox(low=-3.0, high=3.0), "flat": FastFlat(), "epsilon": FastEpsilon()}
    fast = fast[rule]
    x = torch.randn(shape, dtype=torch.float64, generator=generator).clamp(-3.0, 3.0)
    model = nn.Sequential(module)
    _, reference = Gradient(model, LayerMapComposite([(type(module), fast.to_zennit())]))(x)
    with LRPExplainer(model, LayerMapComposite([(type(module), fast)])) as explainer:
        _, relevance = explainer(x)
    assert max_rel_error(relevance, reference) < 1e-9


# ---------------------------------------------------------------------------------------------------------------------
# deferred shortcut checks: one host read per explanation, exact when a prediction fails
# ---------------------------------------------------------------------------------------------------------------------


def _sign_switching_model(dtype: torch.dtype) -> nn.Sequential:
    """A convolution fed by a convolution without ReLU: its inputs are non-negative for non-negative images (all
    first-layer weights and biases >= 0) and signed for negative ones."""
    torch.manual_seed(11)
    first = _conv(3, 6)
    with torch.no_grad():
        first.weight.abs_()
        first.bias.abs_()
    return nn.Sequential(first, _conv(6, 6), nn.ReLU(), _conv(6, 6), nn.ReLU(), _conv(6, 4), nn.ReLU()).eval().to(dtype)


@pytest.mark.parametrize("name", ["epsilon_gamma_box", "epsilon_plus_flat"])
def test_deferred_checks_failing_prediction_is_recomputed(name, monkeypatch):
    """Predictions learnt on non-negative images fail on negative ones: that explanation is taken again with host
    checks, so every call equals Zennit; from the second call on every condition is deferred, and the shortcuts come
    back once the images are non-negative again."""
    dtype = torch.float64
    model = _sign_switching_model(dtype)
    generator = torch.Generator().manual_seed(12)
    positive = torch.rand(2, 3, 10, 10, dtype=dtype, generator=generator)
    negative = -4 * torch.rand(2, 3, 10, 10, dtype=dtype, generator=generator)
    zennit_composite, fast_composite = composites(name)
    takes, deferred = [], []
    take, settle = _Step._take, DeferredChecks.settle
    monkeypatch.setattr(_Step, "_take", classmethod(lambda cls, *a, **k: takes.append(1) or take(*a, **k)))
    monkeypatch.setattr(DeferredChecks, "settle", lambda self: deferred.append(
        sum(not isinstance(entry[2], bool) for entry in self._entries)) or settle(self))
    paths = []
    with LRPExplainer(model, fast_composite) as explainer:
        # the first negative batch is taken twice (a followed prediction failed); a wrong prediction that was not
        # followed (the general formula, exact for any input) costs nothing
        for x, expect_takes in [(positive, 1), (positive, 1), (negative, 2), (negative, 1), (positive, 1),
                                (positive, 1)]:
            takes.clear()
            deferred.clear()
            _, relevance = explainer(x, lambda out: out)
            _, reference = Gradient(isolated(model), zennit_composite)(x, lambda out: out)
            assert max_rel_error(relevance, reference) < TOLERANCE[dtype]
            assert len(takes) == expect_takes
            paths.append([hook.last_path for hook in fast_composite.hook_refs if hasattr(hook, "last_path")])
            # none deferred before the rules have predictions; afterwards every rule but the first layer's defers
            assert deferred[0] == 0 if len(paths) == 1 else deferred[0] >= 3
    assert paths[1] == paths[5] and paths[2] != paths[1] and "shortcut" in paths[1]


def test_deferred_checks_settle():
    checks, first, second = DeferredChecks(), {}, {"nonneg": False}
    assert checks.settle() is True  # nothing recorded
    assert decide(first, "shortcut", torch.tensor(True), checks) is True  # no prediction yet: read on the host
    assert checks.settle() is True and first == {"shortcut": True} and checks._entries == []
    assert decide(first, "shortcut", torch.tensor(False), checks) is True  # followed, recorded
    assert decide(second, "nonneg", torch.tensor(True), checks) is False  # not followed, recorded: may flip back
    assert checks.settle() is False
    assert first == {"shortcut": False} and second == {"nonneg": True} and checks._entries == []
    # a rule called twice: its prediction is whether the condition held in both calls, whatever the order
    for values in ((True, False), (False, True)):
        assert decide(second, "nonneg", torch.tensor(values[0]), checks) is True
        assert decide(second, "nonneg", torch.tensor(values[1]), checks) is True
        assert checks.settle() is False and second == {"nonneg": False}
        second["nonneg"] = True
    # not deferring (the retake): read on the host, recorded, combined alike
    retake = DeferredChecks(defer=False)
    assert decide(second, "nonneg", torch.tensor(False), retake) is False
    assert decide(second, "nonneg", torch.tensor(True), retake) is True
    assert second == {"nonneg": True}  # not yet: settled at the end
    assert retake.settle() is True and second == {"nonneg": False}


@pytest.mark.parametrize("zero_params", [None, "bias"])
def test_gamma_signed_relevance_on_token_inputs_and_empty_batches(zero_params):
    """The general Gamma formula for non-negative inputs with signed relevance (both halves stacked) on a Linear layer
    applied to (batch, tokens, features) equals Zennit; an empty batch gives an empty relevance, no error."""
    torch.manual_seed(22)
    linear = nn.Linear(5, 4).double()
    x = torch.rand(2, 3, 5, dtype=torch.float64)
    attr = torch.randn(2, 3, 4, dtype=torch.float64)
    fast = FastGamma(gamma=0.5, zero_params=zero_params)
    _, reference = Gradient(nn.Sequential(linear), LayerMapComposite([(nn.Linear, fast.to_zennit())]))(x, attr)
    composite = LayerMapComposite([(nn.Linear, fast)])
    with Gradient(nn.Sequential(linear), composite) as attributor:
        _, relevance = attributor(x, attr)
        assert [hook.last_path for hook in composite.hook_refs] == ["exact"]
    assert max_rel_error(relevance, reference) < TOLERANCE[torch.float64]
    model = nn.Sequential(_conv(3, 4), nn.ReLU(), _conv(4, 2)).eval()
    _, empty = Gradient(model, FastEpsilonGammaBox(low=LOW, high=HIGH))(torch.rand(0, 3, 8, 8), lambda out: out)
    assert empty.shape == (0, 3, 8, 8)


def test_gamma_shortcut_refused_for_nan_relevance_where_output_not_positive():
    """NaN relevance where a layer's output is not positive breaks the shortcut's condition: the general formula runs
    (NaN where Zennit has NaN), on the host check and in an explanation after a prediction learnt on clean seeds."""
    torch.manual_seed(21)
    model = nn.Sequential(_conv(3, 4), nn.ReLU(), _conv(4, 4)).eval().double()
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)

    def poisoned(out: torch.Tensor) -> torch.Tensor:
        return torch.where(out <= 0, torch.full_like(out, float("nan")), out)

    _, reference = Gradient(isolated(model), EpsilonGammaBox(low=LOW, high=HIGH))(x, poisoned)
    assert reference.isnan().any()
    composite = FastEpsilonGammaBox(low=LOW, high=HIGH)
    with Gradient(isolated(model), composite) as attributor:
        _, relevance = attributor(x, poisoned)
        gamma = [hook for hook in composite.hook_refs if isinstance(hook, FastGamma)]
        assert gamma and gamma[0].last_path == "exact"
    torch.testing.assert_close(relevance, reference, equal_nan=True, rtol=1e-9, atol=0)
    with LRPExplainer(model, composite) as explainer:
        explainer(x, lambda out: out.clamp(min=0))  # learns the prediction "shortcut"
        gamma = [hook for hook in composite.hook_refs if isinstance(hook, FastGamma)]
        assert gamma[0].last_path == "shortcut"
        with pytest.warns(ConservationWarning, match="not finite"):
            _, relevance = explainer(x, poisoned)
        assert gamma[0].last_path == "exact"
    torch.testing.assert_close(relevance, reference, equal_nan=True, rtol=1e-9, atol=0)


@pytest.mark.parametrize("deferred", [True, False])
def test_deferred_bounds(deferred):
    """Bounds hold at the boundary (0 counts), fail by the smallest margin and for NaN, are compared in their own
    dtype (a float64 bound of 1e-300 is not rounded to float32's 0 by the float32 ones it is stacked with), and a
    condition holds only if all of its bounds do, read on the host or settled alike."""
    nan, tiny = float("nan"), torch.tensor(1e-300, dtype=torch.float64)
    cases = {
        "empty": ((), True),
        "zero": ((Bound(torch.tensor(0.0), True), Bound(torch.tensor(-0.0), False)), True),
        "lower": ((Bound(torch.tensor(1e-45), True), Bound(torch.tensor(-1e-45), True)), False),
        "upper": ((Bound(torch.tensor(-2.0), False), Bound(torch.tensor(1e-45), False)), False),
        "nan_lower": ((Bound(torch.tensor(nan), True),), False),
        "nan_upper": ((Bound(torch.tensor(nan), False),), False),
        "float64": ((Bound(torch.tensor(0.0), False), Bound(tiny, False)), False),
        "bfloat16": ((Bound(torch.tensor(3.0, dtype=torch.bfloat16), True), Bound(torch.tensor(0.5), True)), True),
        "tensor": (torch.tensor(False), False),
        "value": (True, True),
    }
    for condition, expected in cases.values():
        assert holds(condition) is expected
    checks, predictions = DeferredChecks(defer=deferred), {key: True for key in cases}
    for key, (condition, _) in cases.items():
        decide(predictions, key, condition, checks)
    assert checks.settle() is (not deferred or all(expected for _, expected in cases.values()))
    assert predictions == {key: expected for key, (_, expected) in cases.items()}


class _Twice(nn.Module):
    """One convolution applied twice: to non-negative inputs, then to signed ones."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        torch.manual_seed(14)
        self.first, self.shared, self.last = _conv(3, 4), _conv(4, 4), _conv(4, 4)
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.shared(torch.relu(self.first(x)))
        return torch.relu(self.last(torch.relu(self.shared(h))))


def test_deferred_checks_of_a_module_called_twice_settle(monkeypatch):
    """A shared convolution whose shortcut holds in one call and fails in the other: after the first explanation no
    explanation is taken twice (the prediction is the condition of every call), and all equal the rules checking
    every condition on the host (used outside an explanation)."""
    dtype = torch.float64
    model = _Twice(dtype).eval()
    x = torch.randn(2, 3, 8, 8, dtype=dtype, generator=torch.Generator().manual_seed(15))
    _, checking = composites("epsilon_gamma_box")
    _, fast_composite = composites("epsilon_gamma_box")
    work = isolated(model)
    with checking.context(work):
        leaf = x.clone().requires_grad_()
        out = work(leaf)
        (reference,) = torch.autograd.grad(out, leaf, out)
    takes = []
    take = _Step._take
    monkeypatch.setattr(_Step, "_take", classmethod(lambda cls, *a, **k: takes.append(1) or take(*a, **k)))
    with LRPExplainer(model, fast_composite) as explainer:
        for call in range(4):
            takes.clear()
            _, relevance = explainer(x, lambda out: out)
            assert max_rel_error(relevance, reference) < TOLERANCE[dtype]
            assert call == 0 or len(takes) == 1
        shared = [hook for hook in fast_composite.hook_refs if isinstance(hook, FastGamma)]
        assert any(hook._predicted.get("shortcut") is False for hook in shared)


def test_rules_used_through_zennit_check_on_the_host():
    """Outside an explanation of neon_attrib (Zennit's attributor) nothing collects the conditions: every layer reads
    its condition, and a prediction from an earlier explanation is not followed blindly."""
    dtype = torch.float64
    model = _sign_switching_model(dtype)
    generator = torch.Generator().manual_seed(13)
    positive = torch.rand(1, 3, 8, 8, dtype=dtype, generator=generator)
    negative = -4 * torch.rand(1, 3, 8, 8, dtype=dtype, generator=generator)
    zennit_composite, fast_composite = composites("epsilon_gamma_box")
    work = isolated(model)
    with fast_composite.context(work):
        for x in (positive, positive, negative):
            leaf = x.clone().requires_grad_()
            out = work(leaf)
            (relevance,) = torch.autograd.grad(out, leaf, out)
            _, reference = Gradient(isolated(model), zennit_composite)(x, lambda out: out)
            assert max_rel_error(relevance, reference) < TOLERANCE[dtype]
    assert DeferredChecks.active() is None


def test_in_place_activation_hands_its_input_on():
    """An in-place ReLU under FastPass returns its input tensor itself (no autograd node of its own; the graph of the
    layer below carries the relevance down unchanged), a ReLU that is not in place a new tensor; the heatmap equals
    Zennit's either way."""
    model = tiny_cnn(torch.float64, batch_norm=False)  # model[1]: ReLU(inplace=True), model[3]: ReLU()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(23))
    outputs: dict[int, torch.Tensor] = {}
    composite = FastEpsilonGammaBox(low=LOW, high=HIGH)
    with LRPExplainer(model, composite) as explainer:
        for index in range(4):  # after the rules' hooks: the outputs the next modules receive
            explainer._work[index].register_forward_hook(
                lambda module, args, output, index=index: outputs.__setitem__(index, output))
        _, relevance = explainer(x, lambda out: out)
    assert outputs[1] is outputs[0] and outputs[3] is not outputs[2]
    _, reference = Gradient(isolated(model), EpsilonGammaBox(low=LOW, high=HIGH))(x, lambda out: out)
    assert max_rel_error(relevance, reference) < TOLERANCE[torch.float64]


def test_zbox_bounds_made_once_and_renewed_when_changed():
    """ZBox's bound tensors are made once per input shape (no copy per call) and made again when a bound tensor is
    changed in place: the heatmap follows Zennit's with the new bounds."""
    model = nn.Sequential(_conv(3, 4), nn.ReLU()).eval().double()  # ZBox on its only convolution
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(26))
    low = torch.full((1, 3, 1, 1), -1.0, dtype=torch.float64)
    high = torch.full((1, 3, 1, 1), 2.0, dtype=torch.float64)
    composite = LayerMapComposite([(nn.Conv2d, FastZBox(low=low, high=high))])
    with LRPExplainer(model, composite) as explainer:
        for change in (False, False, True):
            if change:
                low.sub_(0.5)
            _, relevance = explainer(x, lambda out: out)
            _, reference = Gradient(isolated(model), LayerMapComposite([(nn.Conv2d, ZBox(low=low, high=high))]))(
                x, lambda out: out)
            assert max_rel_error(relevance, reference) < TOLERANCE[torch.float64]
