"""FeatureTaps: features read at several layers, aggregated, resized, concatenated; LRP back through all of it.

The relevance of a tiny tapped network is checked against a naive float64 replica written from the formulas (explicit
matrices of every linear map, the z-rule for the aggregation, resizing and channel pooling, generalized Gamma and ZBox
for the convolutions, the gradient of max pooling), not from the code.
"""

from __future__ import annotations

import copy
import doctest
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import assert_no_hooks, assert_repeatable, require_data
from torch import nn
from zennit.attribution import Gradient
from zennit.composites import EpsilonGammaBox

from neon_attrib import KDEOutlier, explain
from neon_attrib.pipeline.engine import isolated
from neon_attrib.vision import BilinearResize, FeatureTaps, backbone, get_preprocessing
from neon_attrib.vision import taps as taps_module
from neon_attrib.vision.deep import DeepNeon, median_gamma
from neon_attrib.vision.fast import FastEpsilonGammaBox, LRPExplainer

LOW, HIGH = -2.0, 2.5
EPS = 1e-6
GAMMA = 0.25


class _MustNotRun(nn.Module):
    def forward(self, x):
        raise AssertionError("the backbone ran past the last tapped layer")


def tiny_backbone() -> nn.Sequential:
    """Three tapped ReLUs at 14x14, 7x7 and 3x3 (non-integer resize ratios), an in-place one, biases everywhere, and
    a module after the last tap that fails if it runs."""
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, 4, 3, padding=1), relu1=nn.ReLU(),
        conv2=nn.Conv2d(4, 6, 3, padding=1), relu2=nn.ReLU(inplace=True), pool1=nn.MaxPool2d(2),
        conv3=nn.Conv2d(6, 5, 3, padding=1), relu3=nn.ReLU(), pool2=nn.MaxPool2d(2),
        conv4=nn.Conv2d(5, 3, 3, padding=1), relu4=nn.ReLU(),
        after=_MustNotRun(),
    ))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.bias.uniform_(-0.1, 0.1)
    return model.eval().double()


LAYERS = ["relu2", "relu3", "relu4"]


def images(n: int = 2, size: int = 14) -> torch.Tensor:
    return torch.rand(n, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 4.5 - 2.0


# ---------------------------------------------------------------------------------------------------------------------
# the forward pass
# ---------------------------------------------------------------------------------------------------------------------


def test_forward_equals_the_patchcore_recipe():
    backbone_ = tiny_backbone()
    taps = FeatureTaps(backbone_, LAYERS, reduce_to=7)
    x = images()
    with torch.no_grad():
        a2 = backbone_.relu2(backbone_.conv2(backbone_.relu1(backbone_.conv1(x))))
        a3 = backbone_.relu3(backbone_.conv3(backbone_.pool1(a2)))
        a4 = backbone_.relu4(backbone_.conv4(backbone_.pool2(a3)))
        maps = [F.avg_pool2d(a, 3, stride=1, padding=1) for a in (a2, a3, a4)]
        maps = [maps[0]] + [F.interpolate(m, size=(14, 14), mode="bilinear", align_corners=False) for m in maps[1:]]
        joined = torch.cat(maps, 1)
        rows = F.adaptive_avg_pool1d(joined.permute(0, 2, 3, 1).reshape(-1, 1, 14), 7)
        expected = rows.reshape(2, 14, 14, 7).permute(0, 3, 1, 2)
        assert torch.allclose(taps(x), expected, atol=1e-12)
        assert torch.allclose(FeatureTaps(backbone_, LAYERS)(x), joined, atol=1e-12)
        plain = FeatureTaps(backbone_, ["relu3", "relu2"], aggregate=None)(x)
        assert torch.allclose(plain, torch.cat([F.interpolate(a3, size=(14, 14), mode="bilinear"), a2], 1))
        assert [o.shape[1:] for o in taps.layer_outputs(x)] == [(6, 14, 14), (5, 7, 7), (3, 3, 3)]
    assert_no_hooks(backbone_)


def test_stops_after_the_last_tap_of_a_torchvision_classifier():
    classifier = torchvision.models.resnet18(weights=None).eval()
    calls = []
    for name in ("layer3", "layer4", "fc"):
        getattr(classifier, name).register_forward_hook(lambda module, args, out, name=name: calls.append(name))
    taps = FeatureTaps(classifier, ["layer2", "layer1"])
    with torch.no_grad():
        out = taps(torch.zeros(1, 3, 64, 64))
    assert out.shape == (1, 64 + 128, 16, 16)
    assert calls == []


def test_vgg16_taps_at_blocks_3_and_4():
    features = backbone("vgg16")
    taps = FeatureTaps(features, ["15", "22"])  # the ReLUs closing blocks 3 and 4
    assert taps(torch.zeros(1, 3, 64, 64)).shape == (1, 256 + 512, 16, 16)
    nested = nn.Sequential(OrderedDict(features=backbone("vgg11")))  # names as in a whole torchvision VGG
    assert FeatureTaps(nested, ["features.9", "features.14"])(torch.zeros(1, 3, 32, 32)).shape == (1, 768, 8, 8)


def test_errors():
    model = tiny_backbone()
    with pytest.raises(ValueError, match="no layer 'relu5'.*Did you mean"):
        FeatureTaps(model, ["relu2", "relu5"])
    with pytest.raises(ValueError, match="names a layer twice"):
        FeatureTaps(model, ["relu2", "relu2"])
    with pytest.raises(ValueError, match="one or more module names"):
        FeatureTaps(model, [])
    with pytest.raises(ValueError, match="odd int"):
        FeatureTaps(model, ["relu2"], aggregate=2)
    with pytest.raises(ValueError, match="reduce_to"):
        FeatureTaps(model, ["relu2"], reduce_to=0)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        FeatureTaps("resnet18", ["layer2"])
    with pytest.raises(ValueError, match="followed by a batch norm"):
        FeatureTaps(backbone("vgg11_bn"), ["0"])

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.spare, self.flat = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1), nn.Flatten()

        def forward(self, x):
            return self.flat(self.conv(x))

    with pytest.raises(ValueError, match=r"\['spare'\] .* did not run"):
        FeatureTaps(Unused(), ["conv", "spare"])(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="not a feature map"):
        FeatureTaps(Unused(), ["flat"])(torch.zeros(1, 3, 4, 4))
    shared_relu = torchvision.models.resnet18(weights=None).eval()  # one ReLU module called twice per block
    with pytest.raises(ValueError, match="ran twice"):
        FeatureTaps(shared_relu, ["layer1.0.relu", "layer2"])(torch.zeros(1, 3, 32, 32))
    # the same layer as the last (or only) tap: the same error, not the first call's output
    for layers in (["layer1.0.relu"], ["relu", "layer1.0.relu"]):
        with pytest.raises(ValueError, match="ran twice"):
            FeatureTaps(shared_relu, layers)(torch.zeros(1, 3, 32, 32))
    overwritten = backbone("vgg11")  # "0" is a convolution whose output the in-place ReLU "1" overwrites
    with pytest.raises(ValueError, match="overwritten in place"):
        FeatureTaps(overwritten, ["0", "4"])(torch.zeros(1, 3, 32, 32))
    assert_no_hooks(shared_relu)
    assert_no_hooks(overwritten)
    with pytest.raises(RuntimeError, match="no output_size"):
        BilinearResize()(torch.zeros(1, 1, 2, 2))


# ---------------------------------------------------------------------------------------------------------------------
# LRP through the taps: a naive float64 replica
# ---------------------------------------------------------------------------------------------------------------------


def stab(t: torch.Tensor) -> torch.Tensor:
    return t + EPS * torch.where(t >= 0, 1.0, -1.0).to(t)


def matrix(fn, shape) -> torch.Tensor:
    """The (out, in) matrix of a linear map ``fn`` of batches of samples of ``shape``: its values on the unit basis."""
    size = int(np.prod(shape))
    basis = torch.eye(size, dtype=torch.float64).reshape(size, *shape)
    return fn(basis).reshape(size, -1).T


def z_rule(m: torch.Tensor, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return x * (m.T @ (r / stab(m @ x)))


def conv_matrices(conv: nn.Conv2d, shape) -> tuple[torch.Tensor, torch.Tensor]:
    w = matrix(lambda v: F.conv2d(v, conv.weight.detach(), None, padding=conv.padding), shape)
    out_hw = int(w.shape[0] // conv.out_channels)
    b = conv.bias.detach().repeat_interleave(out_hw)
    return w, b


def gamma_rule(w, b, x, r):
    p, n = w + GAMMA * w.clamp(min=0), w + GAMMA * w.clamp(max=0)
    bp, bn = b + GAMMA * b.clamp(min=0), b + GAMMA * b.clamp(max=0)
    z = w @ x + b
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    gp = (z > 0) * r / stab(p @ xp + n @ xn + bp)
    gn = (z < 0) * r / stab(n @ xp + p @ xn + bn)
    return xp * (p.T @ gp + n.T @ gn) + xn * (n.T @ gp + p.T @ gn)


def zbox_rule(w, b, x, r, low, high):
    wp, wn, bp, bn = w.clamp(min=0), w.clamp(max=0), b.clamp(min=0), b.clamp(max=0)
    g = r / stab(w @ x + b - (wp @ low + bp) - (wn @ high + bn))
    return x * (w.T @ g) - low * (wp.T @ g) - high * (wn.T @ g)


def naive_relevance(model: nn.Sequential, x: torch.Tensor, relevance_out: torch.Tensor, reduce_to: int) -> torch.Tensor:
    """Relevance of one sample (3, 14, 14) by the formulas, with explicit matrices."""
    relu = torch.relu
    pool = lambda v: F.max_pool2d(v, 2)  # noqa: E731
    a0 = x
    a1 = relu(model.conv1(a0[None]))[0]
    a2 = relu(model.conv2(a1[None]))[0]
    p1 = pool(a2)
    a3 = relu(model.conv3(p1[None]))[0]
    p2 = pool(a3)
    a4 = relu(model.conv4(p2[None]))[0]
    taps = [a2, a3, a4]
    aggregations = [matrix(lambda v: F.avg_pool2d(v, 3, stride=1, padding=1), t.shape) for t in taps]
    aggregated = [m @ t.reshape(-1) for m, t in zip(aggregations, taps)]
    resizes = [matrix(lambda v: F.interpolate(v, size=(14, 14), mode="bilinear"), t.shape) for t in taps]
    resized = [aggregated[0]] + [m @ s for m, s in zip(resizes[1:], aggregated[1:])]
    joined = torch.cat(resized)  # channel-major: the flattening of a (14 channels, 14, 14) map
    reduce = matrix(lambda v: F.adaptive_avg_pool1d(v.permute(0, 2, 3, 1).reshape(-1, 1, 14), reduce_to)
                    .reshape(-1, 14, 14, reduce_to).permute(0, 3, 1, 2), (14, 14, 14))

    r_joined = z_rule(reduce, joined, relevance_out.reshape(-1))
    r_resized = list(r_joined.split([s.numel() for s in resized]))
    r_aggregated = [r_resized[0]] + [z_rule(m, s, r) for m, s, r in zip(resizes[1:], aggregated[1:], r_resized[1:])]
    r_taps = [z_rule(m, t.reshape(-1), r) for m, t, r in zip(aggregations, taps, r_aggregated)]

    w, b = conv_matrices(model.conv4, p2.shape)
    r = gamma_rule(w, b, p2.reshape(-1), r_taps[2])         # at p2 (the ReLU after conv4 passes relevance on)
    r = _pool_grad(a3, r.reshape(p2.shape)) + r_taps[1]     # at a3: max pool's gradient, plus the tap's share
    w, b = conv_matrices(model.conv3, p1.shape)
    r = gamma_rule(w, b, p1.reshape(-1), r)                 # at p1
    r = _pool_grad(a2, r.reshape(p1.shape)) + r_taps[0]     # at a2
    w, b = conv_matrices(model.conv2, a1.shape)
    r = gamma_rule(w, b, a1.reshape(-1), r)                 # at a1
    w, b = conv_matrices(model.conv1, a0.shape)
    low = torch.full((a0.numel(),), LOW, dtype=torch.float64)
    high = torch.full((a0.numel(),), HIGH, dtype=torch.float64)
    return zbox_rule(w, b, a0.reshape(-1), r, low, high).reshape(a0.shape)


def _pool_grad(a: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        leaf = a.detach().requires_grad_()
        (grad,) = torch.autograd.grad(F.max_pool2d(leaf, 2), leaf, r)
    return grad.reshape(-1)


def test_relevance_equals_a_naive_replica():
    model = tiny_backbone()
    taps = FeatureTaps(model, LAYERS, reduce_to=7)
    x = images()
    with torch.no_grad():
        output = taps(x)
    attr = output * torch.rand(output.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with LRPExplainer(taps, FastEpsilonGammaBox(low=LOW, high=HIGH)) as explainer:
        _, fast = explainer(x, attr)
        audit = explainer.last_audit
    _, zennit = Gradient(isolated(taps), EpsilonGammaBox(low=LOW, high=HIGH))(x, attr)
    with torch.no_grad():
        expected = torch.stack([naive_relevance(model, x[i], attr[i], 7) for i in range(len(x))])
    scale = expected.abs().max()
    assert ((fast - expected).abs().max() / scale) < 1e-9
    assert ((zennit - expected).abs().max() / scale) < 1e-9
    assert audit.ok, audit
    # aggregation, resizing and channel pooling hand on all they receive, but for the stabiliser's share: at most
    # EPS per output (R * EPS / (out + EPS), with R <= out here)
    for name, dissipated in audit.per_module.items():
        if name.startswith(("aggregations", "resizes", "reduce")):
            assert bool((dissipated.abs() <= EPS * attr[0].numel()).all()), name
    assert_no_hooks(taps)


# ---------------------------------------------------------------------------------------------------------------------
# as DeepNeon features
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_deep_neon_on_resnet_taps(dtype):
    torch.manual_seed(3)
    taps = FeatureTaps(backbone("resnet18"), ["layer2", "layer3"], reduce_to=96).to(dtype)
    x = get_preprocessing("torchvision")(torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(4)))
    x = x.to(dtype)
    with torch.no_grad():
        rows = DeepNeon._rows(taps(x))
    assert rows.shape == (3 * 8 * 8, 96)
    model = DeepNeon(taps, KDEOutlier(gamma=median_gamma(rows))).fit(x, progress=False)
    before = copy.deepcopy({k: v for k, v in model.state_dict().items() if torch.is_tensor(v)})
    relevance, audit = explain(model, x[:2], return_audit=True)
    assert audit.ok, audit
    assert_repeatable(relevance, explain(model, x[:2]))
    assert_no_hooks(model)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not any("forward" in vars(module) for module in model.modules())
    if dtype == torch.float64:  # Zennit's own rules (fast=False) give BilinearResize / ChannelPool the same rule
        model.fast = False
        reference = explain(model, x[:2])
        assert ((relevance - reference).abs().max() / reference.abs().max()) < 1e-9


# ---------------------------------------------------------------------------------------------------------------------
# real weights (optional)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.data
@pytest.mark.parametrize("depth, layers", [(20, None), (56, ["layer2", "layer3"])])
def test_real_cifar_resnet_kde_on_cifar_images(depth, layers):
    """The real CIFAR ResNet under a KDE head on CIFAR images: the audit holds (relevance reaching the pixels = the
    score minus what the rules dissipate)."""
    weights = f"cifar10_resnet/resnet{depth}-{'12fca82f' if depth == 20 else '4bfd9763'}.th"
    data = require_data(weights, "cifar10_subset/cifar10_subset.npz")
    path = data / weights
    arrays = np.load(data / "cifar10_subset" / "cifar10_subset.npz")
    pre = get_preprocessing("torchvision")  # what the akamaster checkpoints were trained with
    train, test = pre(torch.from_numpy(arrays["x_train"][:64])), pre(torch.from_numpy(arrays["x_test"][:4]))
    features = backbone(f"cifar_resnet{depth}", path)
    if layers:
        features = FeatureTaps(features, layers)
    with torch.no_grad():
        rows = DeepNeon._rows(features(train[:16]))
    model = DeepNeon(features, KDEOutlier(gamma=median_gamma(rows), fused=True)).fit(train, progress=False)
    relevance, output, audit = explain(model, test, return_output=True, return_audit=True)
    assert audit.ok, audit
    assert bool(torch.isfinite(relevance).all()) and bool((output > 0).all())
    assert float(audit.relative_error.max()) < 1e-4
    assert_no_hooks(model)


@pytest.mark.data
def test_real_vgg16_weights_with_taps():
    data = require_data("vgg16_imagenet_features/vgg16_features_keras_imagenet.pth",
                        "cifar10_subset/cifar10_subset.npz")
    weights = data / "vgg16_imagenet_features" / "vgg16_features_keras_imagenet.pth"
    arrays = np.load(data / "cifar10_subset" / "cifar10_subset.npz")
    rgb = F.interpolate(torch.from_numpy(arrays["x_test"][:6]).float() / 255, size=64, mode="bilinear")
    x = get_preprocessing("caffe")(rgb.clamp(0, 1))
    features = FeatureTaps(backbone("vgg16", weights), ["15", "22"], reduce_to=256)
    with torch.no_grad():
        rows = DeepNeon._rows(features(x[:4]))
    model = DeepNeon(features, KDEOutlier(gamma=median_gamma(rows)), preprocessing="caffe").fit(x[:4], progress=False)
    relevance, audit = explain(model, x[4:], return_audit=True)
    assert audit.ok, audit
    assert relevance.shape == (2, 3, 64, 64)


def test_docstring_examples():
    result = doctest.testmod(taps_module, extraglobs={"torch": torch},
                             optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
