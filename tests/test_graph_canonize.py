"""The graph canonizer (neon_attrib.pipeline.graph) and the rules of its layers (neon_attrib.core.canonical).

* each rule against a naive float64 replica written from its formula;
* hand-written networks (a ResNet with ``out + identity``, ``F.relu`` and batch norms as attributes; a ``torch.cat``
  skip net) and MobileNetV2 / SqueezeNet against Zennit's own rules on a copy canonized *by hand* in this file;
* twelve torchvision CNNs with calibrated batch-norm statistics: the canonized copy computes the model's output, keeps
  no batch norm, the fast classifier heatmap equals Zennit's rules, the audit is silent (relevance conserved through
  every operation), the DeepNeon head heatmap equals the Zennit-rule path, and nothing is left on the model;
* refusals: ViT-B/16, Swin-T, an operation without a rule, an untraceable module, a batch norm in training mode, a
  composite without rules for the canonical layers, an unmerged batch norm, a failing user canonizer, channels-last
  taps.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from zennit.attribution import Gradient
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import EpsilonGammaBox
from zennit.layer import Sum
from zennit.rules import Epsilon, Norm

from neon_attrib import KDEOutlier, explain
from neon_attrib.core.canonical import (
    ChannelAffine,
    ConstantNormGroupNorm,
    ConstantNormLayerNorm,
    Gate,
    GateRule,
    Mean,
    Resample,
    Scale,
)
from neon_attrib.pipeline.engine import isolated
from neon_attrib.pipeline.graph import RULES_NEEDED, GraphCanonizer, canonical_layer_map
from neon_attrib.vision import FeatureTaps, default_canonizers
from neon_attrib.vision.deep import DeepNeon
from neon_attrib.vision.fast import FastEpsilonGammaBox, FastNorm, LRPExplainer

LOW, HIGH = -3.0, 3.0
BATCH_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def max_rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))


def calibrated(model: nn.Module, size: int = 64, dtype: torch.dtype = torch.float64) -> nn.Module:
    """Batch-norm statistics from a few forward passes on random data (fresh statistics are the identity and hide
    canonization errors), then eval mode."""
    generator = torch.Generator().manual_seed(1)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, size, size, generator=generator) * 2 + 0.5)
    return model.eval().to(dtype)


def state(model: nn.Module) -> dict:
    return {"params": {k: v.clone() for k, v in model.state_dict().items()},
            "objects": [id(p) for p in model.parameters()],
            "modules": [(n, type(m)) for n, m in model.named_modules()],
            "forwards": [n for n, m in model.named_modules() if "forward" in m.__dict__],
            "hooks": [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()]}


def assert_same_state(model: nn.Module, before: dict) -> None:
    after = state(model)
    assert after["objects"] == before["objects"] and after["modules"] == before["modules"]
    assert after["forwards"] == before["forwards"] and after["hooks"] == before["hooks"]
    assert all(torch.equal(value, before["params"][key]) for key, value in after["params"].items())
    assert RULES_NEEDED not in model.__dict__


def zennit_composite(canonizers=()) -> EpsilonGammaBox:
    """Zennit's own rules, with its rules for the canonical layers (Norm, the gate rule)."""
    return EpsilonGammaBox(low=LOW, high=HIGH, layer_map=canonical_layer_map(), canonizers=list(canonizers))


def fast_relevance(model: nn.Module, x: torch.Tensor, attr) -> tuple[torch.Tensor, object]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ConservationWarning
        with LRPExplainer(model, FastEpsilonGammaBox(low=LOW, high=HIGH,
                                                     canonizers=default_canonizers(model))) as explainer:
            _, relevance = explainer(x, attr)
            return relevance, explainer.last_audit


def one_hot(output: torch.Tensor) -> torch.Tensor:
    return output * torch.eye(output.shape[1], dtype=output.dtype)[output.argmax(1)]


# ---------------------------------------------------------------------------------------------------------------------
# the rules against naive float64 replicas
# ---------------------------------------------------------------------------------------------------------------------

def relevance_of(module: nn.Module, rule, x: torch.Tensor, relevance_out: torch.Tensor, *extra) -> torch.Tensor:
    x = x.clone().requires_grad_()
    handles = rule.copy().register(module)
    try:
        out = module(x, *extra)
        (relevance,) = torch.autograd.grad(out, x, relevance_out)
    finally:
        handles.remove()
    return relevance


def stab(z: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z)


def test_gate_rule_gives_all_relevance_to_the_signal():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    gate = torch.rand(2, 3, 1, 1, dtype=torch.float64, requires_grad=True)
    relevance_out = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    assert torch.equal(Gate()(x, gate), x * gate)
    assert torch.equal(relevance_of(Gate(), GateRule(), x, relevance_out, gate), relevance_out)
    assert torch.equal(relevance_of(Scale(0.25), GateRule(), x, relevance_out), relevance_out)


def test_channel_affine_z_rule_equals_replica():
    norm = nn.BatchNorm2d(3).double().eval()
    with torch.no_grad():
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.normal_()
        norm.bias.normal_()
    affine = ChannelAffine.from_batch_norm(norm)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    relevance_out = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    assert torch.allclose(affine(x), norm(x), rtol=1e-12, atol=1e-12)
    s = norm.weight.detach().reshape(1, 3, 1, 1) / torch.sqrt(norm.running_var.reshape(1, 3, 1, 1) + norm.eps)
    t = norm.bias.detach().reshape(1, 3, 1, 1) - norm.running_mean.reshape(1, 3, 1, 1) * s
    expected = x * s * relevance_out / stab(x * s + t)
    assert torch.allclose(relevance_of(affine, Norm(), x, relevance_out), expected, rtol=1e-10, atol=1e-12)


def test_constant_norm_layer_norm_equals_replica():
    """The linear rule through centring and scaling, 1/sigma constant (Ali et al. 2022), written as a matrix."""
    layer = nn.LayerNorm(5).double()
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    module = ConstantNormLayerNorm(layer.normalized_shape, layer.weight, layer.bias, layer.eps)
    x = torch.randn(3, 5, dtype=torch.float64)
    relevance_out = torch.randn(3, 5, dtype=torch.float64)
    assert torch.allclose(module(x), layer(x), rtol=1e-12, atol=1e-12)
    relevance = relevance_of(module, Norm(), x, relevance_out)
    centring = torch.eye(5, dtype=torch.float64) - 1 / 5
    for row in range(3):
        sigma = torch.sqrt(x[row].var(unbiased=False) + layer.eps)
        jacobian = layer.weight.detach()[:, None] * centring / sigma  # d y_j / d x_i, sigma constant
        y = layer(x[row : row + 1])[0].detach()
        expected = x[row] * (jacobian.T @ (relevance_out[row] / stab(y)))
        assert torch.allclose(relevance[row], expected, rtol=1e-10, atol=1e-12)


def test_constant_norm_group_norm_equals_replica():
    layer = nn.GroupNorm(2, 4).double()
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    module = ConstantNormGroupNorm(2, layer.weight, layer.bias, layer.eps)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    relevance_out = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    assert torch.allclose(module(x), layer(x), rtol=1e-12, atol=1e-12)
    relevance = relevance_of(module, Norm(), x, relevance_out)
    y = layer(x).detach()
    groups = x.reshape(2, 2, 18)
    sigma = torch.sqrt(groups.var(-1, unbiased=False) + layer.eps)  # (n, G)
    ratio = (relevance_out / stab(y) * layer.weight.detach().reshape(1, 4, 1, 1)).reshape(2, 2, 18)
    # J^T g for centring then scaling: (g - mean(g)) / sigma, per group
    expected = groups * (ratio - ratio.mean(-1, keepdim=True)) / sigma[..., None]
    assert torch.allclose(relevance, expected.reshape(x.shape), rtol=1e-10, atol=1e-12)


def test_sum_and_mean_are_proportional():
    terms = torch.randn(2, 3, 4, dtype=torch.float64)
    relevance_out = torch.randn(2, 4, dtype=torch.float64)
    expected = terms * (relevance_out / stab(terms.sum(1)))[:, None]
    assert torch.allclose(relevance_of(Sum(dim=1), Norm(), terms, relevance_out), expected, rtol=1e-10)
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    relevance_out = torch.randn(2, 3, dtype=torch.float64)
    expected = x / 16 * (relevance_out / stab(x.mean((2, 3))))[..., None, None]
    assert torch.allclose(relevance_of(Mean((2, 3)), Norm(), x, relevance_out), expected, rtol=1e-10)


def interpolation_matrix(shape_in: tuple[int, ...], **kwargs) -> torch.Tensor:
    """The matrix (outputs x inputs) of ``F.interpolate(., **kwargs)``, from the images of the basis vectors."""
    n = math.prod(shape_in)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, 1, *shape_in)
    return F.interpolate(basis, **kwargs).reshape(n, -1).T


@pytest.mark.parametrize("shape, kwargs", [
    ((3, 4), dict(scale_factor=2, mode="bilinear", align_corners=False)),
    ((3, 4), dict(scale_factor=2, mode="bilinear", align_corners=True)),
    ((5, 7), dict(size=(3, 4), mode="bilinear", align_corners=False)),
    ((6,), dict(scale_factor=1.5, mode="linear", align_corners=False)),
    ((2, 3, 2), dict(scale_factor=2, mode="trilinear", align_corners=False)),
])
def test_linear_interpolation_is_a_weighted_mean_with_the_z_rule(shape, kwargs):
    """Every output of a linear interpolation is a weighted mean of inputs (the modelling assumption behind giving it
    the average-pooling rule), and the rule is the z-rule on that matrix: ``R_in = x * W^T (R / stab(W x))``."""
    matrix = interpolation_matrix(shape, **kwargs)
    assert (matrix >= 0).all() and torch.allclose(matrix.sum(1), torch.ones(matrix.shape[0], dtype=torch.float64))
    x = torch.rand(2, 3, *shape, dtype=torch.float64)
    flat = x.flatten(2)
    out = flat @ matrix.T
    relevance_out = torch.randn_like(out)
    expected = (flat * ((relevance_out / stab(out)) @ matrix)).reshape(x.shape)
    module = Resample(**kwargs)
    assert torch.equal(module(x).flatten(2), F.interpolate(x, **kwargs).flatten(2))
    assert torch.allclose(module(x).flatten(2), out, rtol=1e-12)
    for rule in (Norm(), FastNorm()):
        relevance = relevance_of(module, rule, x, relevance_out.reshape(module(x).shape))
        assert torch.allclose(relevance, expected, rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------------------------------------------------------------
# hand-written networks against a copy canonized by hand
# ---------------------------------------------------------------------------------------------------------------------

class HandBlock(nn.Module):
    """A user's residual block: batch norms as attributes, ``out + identity`` and ``F.relu`` in forward."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        identity = x
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return torch.relu(out)


class HandResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.block1 = HandBlock(8)
        self.block2 = HandBlock(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.norm(self.stem(x)), inplace=True)
        x = self.block2(self.block1(x))
        return self.fc(x.mean((2, 3)))


class CatSkip(nn.Module):
    """A ``torch.cat`` skip: the batch norm after the concatenation cannot be merged (an affine layer)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.norm = nn.BatchNorm2d(12)
        self.conv3 = nn.Conv2d(12, 4, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        a = F.relu(self.conv1(x))
        b = F.relu(self.conv2(a))
        x = F.relu(self.norm(torch.cat([a, b], 1)))
        return torch.flatten(self.pool(self.conv3(x)), 1)


def fold(conv: nn.Module, norm: nn.Module) -> None:
    """Merge ``norm`` into ``conv`` by hand (float64)."""
    with torch.no_grad():
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        conv.weight.mul_(scale.reshape(-1, *[1] * (conv.weight.ndim - 1)))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
        conv.bias = nn.Parameter((bias - norm.running_mean) * scale + norm.bias)


class _Plus(nn.Module):
    def __init__(self):
        super().__init__()
        self.sum = Sum(dim=-1)

    def forward(self, *terms):
        return self.sum(torch.stack(terms, dim=-1))


def by_hand_hand_resnet(model: HandResNet) -> nn.Module:
    reference = copy.deepcopy(model)
    fold(reference.stem, reference.norm)
    reference.norm = nn.Identity()
    for block in (reference.block1, reference.block2):
        fold(block.conv1, block.bn1)
        fold(block.conv2, block.bn2)
        block.bn1, block.bn2 = nn.Identity(), nn.Identity()
        block.relu1, block.relu2, block.plus = nn.ReLU(), nn.ReLU(), _Plus()
        block.forward = lambda x, b=block: b.relu2(b.plus(b.bn2(b.conv2(b.relu1(b.bn1(b.conv1(x))))), x))
    reference.relu, reference.mean = nn.ReLU(), nn.AdaptiveAvgPool2d(1)
    reference.forward = lambda x, r=reference: r.fc(r.mean(r.block2(r.block1(r.relu(r.norm(r.stem(x)))))).flatten(1))
    return reference


class _AffineConv(nn.Conv2d):
    """A per-channel affine map as a depthwise 1x1 convolution, for the hand-canonized reference."""


class _CatSkipByHand(nn.Module):
    def __init__(self, model: CatSkip):
        super().__init__()
        self.conv1, self.conv2, self.conv3, self.pool = (copy.deepcopy(m) for m in (model.conv1, model.conv2,
                                                                                     model.conv3, model.pool))
        norm = model.norm
        scale = norm.weight.detach() / torch.sqrt(norm.running_var + norm.eps)
        self.norm = _AffineConv(12, 12, 1, groups=12).double()
        with torch.no_grad():
            self.norm.weight.copy_(scale.reshape(12, 1, 1, 1))
            self.norm.bias.copy_(norm.bias - norm.running_mean * scale)
        self.r1, self.r2, self.r3 = nn.ReLU(), nn.ReLU(), nn.ReLU()

    def forward(self, x):
        a = self.r1(self.conv1(x))
        b = self.r2(self.conv2(a))
        return torch.flatten(self.pool(self.conv3(self.r3(self.norm(torch.cat([a, b], 1))))), 1)


def fold_sequentials(model: nn.Module) -> nn.Module:
    """Fold every batch norm that follows a convolution inside an nn.Sequential (by hand), for MobileNetV2."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        if isinstance(parent, nn.Sequential):
            names = list(parent._modules)
            for first, second in zip(names, names[1:]):
                if isinstance(parent._modules[first], nn.Conv2d) and isinstance(parent._modules[second],
                                                                                  nn.BatchNorm2d):
                    fold(parent._modules[first], parent._modules[second])
                    parent._modules[second] = nn.Identity()
    return model


def by_hand_mobilenet_v2(model: nn.Module) -> nn.Module:
    reference = fold_sequentials(model)
    for block in reference.modules():
        if type(block).__name__ == "InvertedResidual" and block.use_res_connect:
            block.plus = _Plus()
            block.forward = lambda x, b=block: b.plus(x, b.conv(x))
    reference.pool = nn.AdaptiveAvgPool2d(1)
    reference.forward = lambda x, r=reference: r.classifier(torch.flatten(r.pool(r.features(x)), 1))
    return reference


def check_against(model: nn.Module, reference: nn.Module, x: torch.Tensor, layer_map=()) -> None:
    """The fast heatmap of ``model`` (graph-canonized in the pipeline) = Zennit's own rules on ``reference``, a copy
    canonized by hand; the audit is silent and the model unchanged."""
    before = state(model)
    with torch.no_grad():
        output = model(x)
        assert max_rel_error(reference(x), output) < 1e-12
    attr = one_hot(output)
    composite = EpsilonGammaBox(low=LOW, high=HIGH, layer_map=list(layer_map))
    expected = Gradient(reference, composite)(x, attr)[1]
    relevance, audit = fast_relevance(model, x, attr)
    assert audit.ok, audit
    assert relevance.abs().sum() > 0
    assert max_rel_error(relevance, expected) < 1e-9
    assert_same_state(model, before)


def test_hand_resnet_equals_hand_canonized_reference():
    torch.manual_seed(0)
    model = calibrated(HandResNet(), size=16)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    check_against(model, by_hand_hand_resnet(model), x)


def test_cat_skip_equals_hand_canonized_reference():
    """The batch norm after the concatenation: the z-rule of its affine map (Zennit's Epsilon with Norm's stabiliser
    on the same map as a depthwise convolution)."""
    torch.manual_seed(0)
    model = calibrated(CatSkip(), size=16)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    check_against(model, _CatSkipByHand(model), x, layer_map=[(_AffineConv, Epsilon(epsilon=1e-6))])


def test_mobilenet_v2_equals_hand_canonized_reference():
    torch.manual_seed(0)
    model = calibrated(torchvision.models.mobilenet_v2(weights=None, num_classes=10), size=32)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    check_against(model, by_hand_mobilenet_v2(model), x)


class Pyramid(nn.Module):
    """FPN / U-Net style: reflect and replicate padding, nearest and bilinear upsampling, additions of the maps."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3)
        self.down = nn.Conv2d(6, 6, 3, stride=2, padding=1)
        self.pad = nn.ReplicationPad2d(1)
        self.mid = nn.Conv2d(6, 6, 3)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.head = nn.Conv2d(6, 4, 1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        a = F.relu(self.stem(F.pad(x, (1, 1, 1, 1), mode="reflect")))
        b = F.relu(self.down(a))
        c = F.relu(self.mid(self.pad(b)))
        u = self.up(c) + F.interpolate(b, scale_factor=2, mode="bilinear", align_corners=False)
        return self.fc(torch.flatten(F.relu(self.head(u + a)), 1))


class _Matrix(nn.AdaptiveAvgPool1d):
    """A linear map given by its matrix, with the average-pooling rule (the hand-canonized bilinear upsampling)."""

    def __init__(self, matrix: torch.Tensor, shape: tuple[int, ...]):
        super().__init__(1)
        self.matrix, self.shape = matrix, shape

    def forward(self, x):
        return (x.flatten(2) @ self.matrix.T).reshape(*x.shape[:2], *self.shape)


def by_hand_pyramid(model: Pyramid) -> nn.Module:
    reference = copy.deepcopy(model)
    reference.resample = _Matrix(interpolation_matrix((4, 4), scale_factor=2, mode="bilinear", align_corners=False),
                                 (8, 8))
    reference.plus = _Plus()  # (up + resampled) + a: one sum over three terms, as the canonizer makes it
    reference.relus = nn.ModuleList(nn.ReLU() for _ in range(4))

    def forward(x, r=reference):
        a = r.relus[0](r.stem(F.pad(x, (1, 1, 1, 1), mode="reflect")))  # copies: the gradient, in both
        b = r.relus[1](r.down(a))
        c = r.relus[2](r.mid(r.pad(b)))
        u = r.plus(r.up(c), r.resample(b), a)  # nearest upsampling: copies, the gradient
        return r.fc(torch.flatten(r.relus[3](r.head(u)), 1))

    reference.forward = forward
    return reference


def test_padding_and_upsampling_equal_hand_canonized_reference():
    """Reflect / replicate padding and nearest upsampling are copies (the gradient is exact LRP); bilinear upsampling
    becomes a ``Resample`` with the z-rule: Zennit's rules on a copy with the explicit interpolation matrix."""
    torch.manual_seed(0)
    model = Pyramid().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    check_against(model, by_hand_pyramid(model), x)
    images = torch.rand(6, 3, 8, 8, dtype=torch.float64)
    deep = DeepNeon(_PyramidFeatures(model), KDEOutlier(gamma=0.5), low=0.0, high=1.0).fit(images, progress=False)
    relevance, audit = explain(deep, images[:2], return_audit=True)
    assert audit.ok and torch.isfinite(relevance).all()


class _PyramidFeatures(nn.Module):
    def __init__(self, model: Pyramid):
        super().__init__()
        self.model = model

    def forward(self, x):
        m = self.model
        a = F.relu(m.stem(F.pad(x, (1, 1, 1, 1), mode="reflect")))
        b = F.relu(m.down(a))
        return F.relu(m.head(m.up(F.relu(m.mid(m.pad(b)))) + F.interpolate(b, scale_factor=2, mode="bilinear") + a))


class _Interpolating(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs

    def forward(self, x):
        return F.interpolate(x, **self.kwargs)


class _ToSizeOf(nn.Module):
    def forward(self, x):
        return F.interpolate(x[:, :, ::2, ::2], size=x.shape[-2:], mode="bilinear")


@pytest.mark.parametrize("module, why", [
    (_Interpolating(scale_factor=2, mode="bicubic"), "interpolates with mode='bicubic'"),
    (_Interpolating(scale_factor=0.5, mode="bilinear", antialias=True), "interpolates with antialiasing"),
    (_ToSizeOf(), "interpolates linearly with a computed size"),
])
def test_interpolations_without_a_rule_are_refused_with_their_place(module, why):
    model = nn.Sequential(nn.Identity(), module)
    GraphCanonizer().apply(model)
    with pytest.raises(ValueError, match=rf"interpolate in the forward of 1 \({type(module).__name__}\), graph node "
                                         rf"'interpolate' \(File .*test_graph_canonize\.py.*\), {why}"):
        model(torch.rand(1, 2, 8, 8))


def test_squeezenet_needs_no_canonization():
    torch.manual_seed(0)
    model = calibrated(torchvision.models.squeezenet1_1(weights=None, num_classes=10), size=64)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    check_against(model, copy.deepcopy(model), x)  # Zennit 1.0 reloads the parameters of what it explains


# ---------------------------------------------------------------------------------------------------------------------
# torchvision CNNs: canonized, conserved, fast = Zennit's rules, as classifiers and under a DeepNeon head
# ---------------------------------------------------------------------------------------------------------------------

#: name -> (constructor keywords, input size, tapped layer for DeepNeon)
NETWORKS = {
    "googlenet": ({"aux_logits": False, "init_weights": False}, 32, "inception3b"),
    "densenet121": ({}, 32, "features.transition1"),
    "inception_v3": ({"aux_logits": False, "init_weights": False}, 75, "Mixed_5b"),
    "mobilenet_v2": ({}, 32, "features.4"),
    "mobilenet_v3_small": ({}, 32, "features.2"),
    "efficientnet_b0": ({}, 32, "features.3"),
    "regnet_y_400mf": ({}, 32, "trunk_output.block1"),
    "mnasnet0_5": ({}, 32, "layers.9"),
    "shufflenet_v2_x0_5": ({}, 32, "stage2"),
    "convnext_tiny": ({}, 32, "features.1"),
    "resnext50_32x4d": ({}, 32, "layer1"),
    "squeezenet1_0": ({}, 32, "features.4"),
}
#: networks whose DeepNeon heatmap is also compared with Zennit's rules (affine batch norms, gates, layer norms, sums)
DEEP_REFERENCE = ("densenet121", "efficientnet_b0", "convnext_tiny", "mobilenet_v2")
_BUILT: dict[str, nn.Module] = {}


def network(name: str) -> nn.Module:
    """Random weights, calibrated batch-norm statistics, float64 (built once per session; tests take copies)."""
    if name not in _BUILT:
        kwargs, size, _ = NETWORKS[name]
        torch.manual_seed(0)
        _BUILT[name] = calibrated(getattr(torchvision.models, name)(weights=None, num_classes=10, **kwargs), size)
    return copy.deepcopy(_BUILT[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(NETWORKS))
def test_torchvision_cnn(name):
    model = network(name)
    _, size, tap = NETWORKS[name]
    before = state(model)
    x = torch.randn(1, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        output = model(x)
    # the canonized copy computes the model's output and keeps no batch norm
    work = isolated(model)
    instances = GraphCanonizer().apply(work) if name != "resnext50_32x4d" else []
    with torch.no_grad():
        assert max_rel_error(work(x), output) < 1e-10
    if instances:
        assert not any(isinstance(m, BATCH_NORM_TYPES) for m in work.modules())
        assert all(hasattr(m, "weight") or not list(m.parameters()) for m in work.__dict__[RULES_NEEDED].values())
    # classifier: fast rules = Zennit's rules (on the same canonical graph), relevance conserved, nothing left behind
    attr = one_hot(output)
    canonizers = default_canonizers(model)
    expected = Gradient(isolated(model), zennit_composite(canonizers))(x, attr)[1]
    relevance, audit = fast_relevance(model, x, attr)
    assert audit.ok, audit
    assert torch.isfinite(relevance).all() and relevance.abs().sum() > 0
    assert max_rel_error(relevance, expected) < 1e-9
    # DeepNeon with a KDE head on a tapped layer: the fast path = the Zennit-rule path
    images = torch.cat([x, x.flip(-1)])  # two images: the audit is per image
    deep = DeepNeon(FeatureTaps(model, [tap]), KDEOutlier(gamma=1e-2)).fit(images, progress=False)
    heads, head_audit = explain(deep, images, return_audit=True, strict=True)
    assert head_audit.ok, head_audit
    if name in DEEP_REFERENCE:  # the Zennit-rule path is slow: on the networks with each kind of canonical layer
        deep.fast = False
        assert max_rel_error(heads, explain(deep, images, strict=True)) < 1e-9
    assert_same_state(model, before)


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "convnext_tiny"])
def test_float32_equals_zennit(name):
    model = network(name).float()
    _, size, _ = NETWORKS[name]
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        attr = one_hot(model(x))
    expected = Gradient(isolated(model), zennit_composite(default_canonizers(model)))(x, attr)[1]
    relevance, audit = fast_relevance(model, x, attr)
    assert audit.ok, audit
    assert max_rel_error(relevance, expected) < 1e-5


# ---------------------------------------------------------------------------------------------------------------------
# refusals: before explaining, naming what and where
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, match", [
    ("vit_b_16", r"encoder\.layers\.encoder_layer_0\.self_attention \(MultiheadAttention\) cannot be traced"),
    ("swin_t", r"_get_relative_position_bias in the forward of features\.1\.0\.attn \(ShiftedWindowAttention\)"),
])
def test_transformers_are_refused(name, match):
    model = getattr(torchvision.models, name)(weights=None, num_classes=10).eval()
    before = state(model)
    with pytest.raises(ValueError, match=match):  # at registration, or when the untraceable module runs
        with LRPExplainer(model, FastEpsilonGammaBox(low=LOW, high=HIGH,
                                                     canonizers=default_canonizers(model))) as explainer:
            explainer(torch.randn(1, 3, 224, 224))
    assert_same_state(model, before)


class Squared(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return (y * y).flatten(1)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y.flatten(1) if y.sum() > 0 else -y.flatten(1)


def test_operation_without_rule_is_refused_with_its_place():
    """Refused when the canonized forward reaches the operation (before it runs): an operation that an explanation
    never reaches does not stand in the way (see the next test)."""
    model = nn.Sequential(nn.Identity(), Squared()).double().eval()
    (canonization,) = GraphCanonizer().apply(model)
    with pytest.raises(ValueError, match=r"operator\.mul in the forward of 1 \(Squared\), graph node 'mul' "
                                         r"\(File .*test_graph_canonize\.py.*return \(y \* y\)\.flatten\(1\)\), "
                                         r"multiplies two signals.*register_rule"):
        model(torch.rand(1, 3, 8, 8, dtype=torch.float64))
    canonization.remove()
    assert "forward" not in model[1].__dict__ and RULES_NEEDED not in model.__dict__  # remove() left nothing
    with pytest.raises(ValueError, match=r"multiplies two signals"):  # through the pipeline: at the explanation
        with LRPExplainer(model, FastEpsilonGammaBox(low=LOW, high=HIGH,
                                                     canonizers=default_canonizers(model))) as explainer:
            explainer(torch.rand(1, 3, 8, 8, dtype=torch.float64))
    model = nn.Sequential(nn.Identity(), Branchy()).eval()
    (canonization,) = GraphCanonizer().apply(model)  # a module that cannot be traced is refused when it runs
    with pytest.raises(ValueError, match=r"1 \(Branchy\) cannot be traced with torch\.fx"):
        model(torch.rand(1, 3, 8, 8))
    canonization.remove()
    assert "forward" not in model[1].__dict__ and model(torch.rand(1, 3, 8, 8)).shape == (1, 144)


class _LogSoftmaxClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.norm = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.fc = nn.Conv2d(6, 6, 3, padding=1), nn.Linear(6, 4)

    def forward(self, x):
        a = F.relu(self.norm(self.conv1(x)))
        b = F.relu(self.conv2(a))
        return F.log_softmax(self.fc(b.mean((2, 3))) - 1.0, 1)  # no rule: log-softmax, a constant subtracted


def test_operations_after_the_last_tap_need_no_rule():
    """A classifier ending in operations without an LRP rule, tapped inside: the taps' heatmap equals that of the
    same layers without the head; explaining the classifier itself is refused at the first such operation."""
    torch.manual_seed(0)
    model = calibrated(_LogSoftmaxClassifier(), size=8)
    images = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    folded = copy.deepcopy(model.conv1)
    fold(folded, model.norm)
    cut = nn.Sequential(folded, nn.ReLU(), model.conv2, nn.ReLU())  # the same layers, the batch norm folded by hand
    heatmaps = []
    for features, layer in ((model, "conv2"), (cut, "2")):
        deep = DeepNeon(FeatureTaps(features, [layer]), KDEOutlier(gamma=0.5), low=0.0, high=1.0)
        relevance, audit = explain(deep.fit(images, progress=False), images, return_audit=True)
        assert audit.ok
        heatmaps.append(relevance)
    torch.testing.assert_close(heatmaps[0], heatmaps[1], rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match=r"operator\.sub in the forward of the model .*has no LRP rule"):
        with LRPExplainer(model, FastEpsilonGammaBox(low=LOW, high=HIGH,
                                                     canonizers=default_canonizers(model))) as explainer:
            explainer(images)


def test_a_module_that_never_runs_need_not_be_traceable():
    """The layers after the last tapped one never run (torchvision's FPN after a ResNet body's taps): one that cannot
    be traced does not stand in the way; tapped, it is refused."""
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv2d(3, 3, 3), nn.ReLU(), Branchy()).double().eval()
    images = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    heatmaps = []
    for features in (network, network[:2]):
        deep = DeepNeon(FeatureTaps(features, ["1"]), KDEOutlier(gamma=0.5), low=0.0, high=1.0)
        heatmaps.append(explain(deep.fit(images, progress=False), images))
    torch.testing.assert_close(heatmaps[0], heatmaps[1], rtol=0, atol=0)
    branchy = nn.Sequential(nn.Conv2d(3, 3, 3), nn.ReLU(), Branchy(), nn.Unflatten(1, (4, 4, 4))).double().eval()
    deep = DeepNeon(branchy, KDEOutlier(gamma=0.5), low=0.0, high=1.0).fit(images, progress=False)
    with pytest.raises(ValueError, match=r"features\.2 \(Branchy\) cannot be traced with torch\.fx"):
        explain(deep, images)


def test_batch_norm_in_training_mode_is_refused():
    model = HandResNet().double()
    with pytest.raises(ValueError, match=r"batch norm norm \(BatchNorm2d\) is in training mode.*model\.eval\(\)"):
        GraphCanonizer().apply(model)


def test_composite_without_rules_for_canonical_layers_is_refused():
    """Zennit's own composite knows no rule for a gate or an affine layer: refused before explaining, not a plain
    gradient; with canonical_layer_map() it runs."""
    model = calibrated(CatSkip(), size=16)
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"norm \(ChannelAffine\) is a layer of the canonized graph that received "
                                         r"no rule"):
        LRPExplainer(model, EpsilonGammaBox(low=LOW, high=HIGH, canonizers=[GraphCanonizer()]))
    with LRPExplainer(model, zennit_composite([GraphCanonizer()])) as explainer:
        explainer(x)
        assert explainer.last_audit.ok


def test_unmerged_batch_norm_is_refused():
    """A batch norm given Pass without being merged (no canonizer) scales nothing: refused (was silently wrong)."""
    model = calibrated(HandResNet(), size=16)
    with pytest.raises(ValueError, match=r"norm \(BatchNorm2d\) passes the relevance through but was not merged"):
        LRPExplainer(model, FastEpsilonGammaBox(low=LOW, high=HIGH))


def test_user_composite_runs_after_the_graph_canonizer():
    """docs' advice EpsilonGammaBox(..., canonizers=[SequentialMergeBatchNorm()]) on a DenseNet under DeepNeon: the
    graph canonizer runs first (nothing left for the user's merge), the heatmap equals the default one; a user
    canonizer that fails is named."""
    torch.manual_seed(0)
    features = FeatureTaps(calibrated(torchvision.models.densenet121(weights=None, num_classes=10), 32),
                           ["features.transition1"])
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    deep = DeepNeon(features, KDEOutlier(gamma=1e-2)).fit(x, progress=False)
    low, high = deep.input_bounds()
    user = EpsilonGammaBox(low=low, high=high, layer_map=canonical_layer_map(),
                           canonizers=[SequentialMergeBatchNorm()])
    relevance, audit = explain(deep, x, composite=user, return_audit=True, strict=True)
    deep.fast = False
    assert audit.ok and max_rel_error(relevance, explain(deep, x)) < 1e-9

    class Broken(SequentialMergeBatchNorm):
        def apply(self, root_module):
            raise RuntimeError("shape mismatch")

    with pytest.raises(ValueError, match=r"The canonizer Broken of the composite failed.*remove Broken"):
        explain(deep, x, composite=EpsilonGammaBox(low=low, high=high, canonizers=[Broken()]))


def test_user_composite_on_a_classifier_runs_after_the_graph_canonizer():
    """explain(cnn, x, composite=EpsilonGammaBox(...)) on a CNN outside the documented backbones: the graph canonizer
    runs before the user's canonizers (was: the unmerged batch norms refused, or with the user's batch-norm merge the
    residual additions passed as plain gradients, relevance off with only a warning); equal to Zennit's own rules on
    a copy canonized by hand."""
    torch.manual_seed(0)
    model = calibrated(torchvision.models.mobilenet_v2(weights=None, num_classes=10), size=32)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        attr = one_hot(model(x))
    expected = Gradient(by_hand_mobilenet_v2(model), EpsilonGammaBox(low=LOW, high=HIGH))(x, attr)[1]
    before = state(model)
    for canonizers in ([], [SequentialMergeBatchNorm()]):
        composite = EpsilonGammaBox(low=LOW, high=HIGH, canonizers=canonizers)
        relevance, audit = explain(model, x, attr.argmax(1), composite=composite, return_audit=True, strict=True)
        assert audit.ok and relevance.abs().sum() > 0
        assert max_rel_error(relevance, expected) < 1e-9
    assert_same_state(model, before)


def test_taps_refuse_channels_last_maps():
    """A channels-last (n, h, w, C) map, as Swin's stages return, was read as (n, C, h, w) without complaint."""
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), torchvision.ops.Permute([0, 2, 3, 1]))
    with pytest.raises(ValueError, match=r"layer '1' returned \(1, 16, 16, 8\).*channels-last"):
        FeatureTaps(backbone, ["1"])(torch.rand(1, 3, 32, 32))
    assert FeatureTaps(backbone, ["0"])(torch.rand(1, 3, 32, 48)).shape == (1, 8, 16, 24)


class InPlace(nn.Module):
    """In-place operations whose input is read again afterwards: the canonized graph must see the written values."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        z = y.relu_()
        w = y + z  # y was overwritten by relu_: 2 relu(conv(x))
        F.relu(w, inplace=True)
        return torch.flatten(w, 1)  # w was overwritten too


def test_in_place_operations_keep_their_meaning():
    model = InPlace().double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    work = isolated(model)
    GraphCanonizer().apply(work)
    with torch.no_grad():
        assert torch.equal(work(x), expected)
    relevance, audit = fast_relevance(model, x, one_hot(expected))
    assert audit.ok and relevance.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------------
# traces are reused, never stale
class Options(nn.Module):
    def __init__(self, residual: bool):
        super().__init__()
        self.residual = residual


class Switched(nn.Module):
    """A batch norm, a scale and a residual addition behind attributes that the trace reads, one of a submodule."""

    def __init__(self, residual: bool = True, scale: float = 1.0):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.options, self.scale = Options(residual), scale

    def forward(self, x):
        out = self.norm(self.conv(x)) * self.scale
        return F.relu(out + x if self.options.residual else out)


def switched_deep(residual: bool = True, scale: float = 1.0, seed: int = 0) -> DeepNeon:
    torch.manual_seed(seed)
    features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), Switched(residual, scale), nn.MaxPool2d(2),
                             Switched(residual, scale))
    features = calibrated(features, size=16)
    images = torch.rand(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    return DeepNeon(features, KDEOutlier(gamma=0.1), low=0.0, high=1.0).fit(images, progress=False)


def count_traces(monkeypatch) -> list[int]:
    from neon_attrib.pipeline import graph

    calls = [0]
    trace = graph._LocalTracer.trace

    def counting(self, *args, **kwargs):
        calls[0] += 1
        return trace(self, *args, **kwargs)

    monkeypatch.setattr(graph._LocalTracer, "trace", counting)
    return calls


def test_repeated_explanations_trace_once_and_give_the_same_numbers(monkeypatch):
    calls = count_traces(monkeypatch)
    model = switched_deep(scale=1.25)
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    first = explain(model, x)
    traced = calls[0]
    assert traced >= 1
    again = explain(model, x)
    staged = model.relevance(x)
    assert calls[0] == traced  # the second explanation, and relevance(), trace nothing
    assert torch.equal(first, again) and torch.equal(first, staged.pixels)
    # another model with blocks of the same configuration traces nothing either, and explains itself, not the first
    other = switched_deep(scale=1.25, seed=7)
    assert torch.equal(explain(other, x), explain(copy.deepcopy(other), x))
    assert calls[0] == traced


def traced_afresh(model: nn.Module, x: torch.Tensor, monkeypatch) -> torch.Tensor:
    """``explain`` of a copy of ``model`` with no graph traced before."""
    from collections import OrderedDict

    from neon_attrib.pipeline import graph

    with monkeypatch.context() as patch:
        patch.setattr(graph, "_TRACES", OrderedDict())
        return explain(copy.deepcopy(model), x)


def test_a_changed_model_is_canonized_again(monkeypatch):
    calls = count_traces(monkeypatch)
    model = switched_deep()
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    before = explain(model, x)
    # weights changed in place (the batch norm folded into the convolution before it): folded again
    with torch.no_grad():
        model.features[2].norm.running_var.mul_(4.0)
        model.features[4].conv.weight.mul_(0.5)
    changed = explain(model, x)
    assert not torch.equal(changed, before) and torch.equal(changed, traced_afresh(model, x, monkeypatch))
    # attributes the trace reads, of the module or of a submodule: traced again, explained as a model built that way
    for change in (lambda block: setattr(block, "scale", 0.5), lambda block: setattr(block.options, "residual", False)):
        traced = calls[0]
        for block in (model.features[2], model.features[4]):
            change(block)
        before, changed = changed, explain(model, x)
        assert calls[0] > traced
        assert not torch.equal(changed, before) and torch.equal(changed, traced_afresh(model, x, monkeypatch))
    # an attribute that cannot be compared by value: traced on every call
    model.features[2].config = object()
    traced = calls[0]
    explain(model, x)
    explain(model, x)
    assert calls[0] >= traced + 2
