"""Backbones by name (VGG, ResNet, Wide-ResNet, CIFAR ResNets), their weights, their canonizers, and the fast rules on
residual networks against Zennit with its ResNet canonizer.

Random-weight networks at 32 px (Wide-ResNet-50-2 with batch 1), batch norms given random statistics so that the merge
into the convolutions matters. Errors are ``max |fast - zennit| / max |zennit|``: 1e-5 in float32, 1e-9 in float64.
"""

from __future__ import annotations

import copy
import doctest
import importlib
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from conftest import accept_zero_eps, assert_no_hooks, assert_repeatable, randomize_batch_norms, require_data
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d
from zennit.attribution import Gradient
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat, LayerMapComposite
from zennit.core import stabilize as zennit_stabilize
from zennit.rules import Epsilon, Pass
from zennit.torchvision import ResNetCanonizer, VGGCanonizer
from zennit.types import Activation, Convolution

from neon_attrib import KDEOutlier, explain
from neon_attrib.pipeline.engine import isolated
from neon_attrib.pipeline.graph import GraphCanonizer
from neon_attrib.vision import (
    BACKBONES,
    PREPROCESSINGS,
    CifarResNet,
    FeatureTaps,
    ShortcutA,
    backbone,
    default_canonizers,
    get_preprocessing,
    weights_preprocessing,
)
from neon_attrib.vision.deep import DeepNeon, median_gamma
from neon_attrib.vision.fast import (
    FastEpsilonGammaBox,
    FastEpsilonPlusFlat,
    FastResNetCanonizer,
    LRPExplainer,
    MergeBatchNorms,
)
from neon_attrib.vision.fast._core import _stabilize

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-9}
LOW, HIGH = -3.0, 3.0


def max_rel_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    return ((result - reference).abs().max() / reference.abs().max()).item()


_NETWORKS: dict[str, nn.Module] = {}


def network(name: str, dtype: torch.dtype) -> nn.Module:
    """A random-weight backbone (built once per session), with random batch-norm statistics, as a copy in ``dtype``."""
    if name not in _NETWORKS:
        torch.manual_seed(0)
        model = randomize_batch_norms(backbone(name))
        if name == "wide_resnet50_2":  # tapped at layer2 and layer3 only: keep 2/3 of the weights out of memory
            del model.layer4
        _NETWORKS[name] = model
    return copy.deepcopy(_NETWORKS[name]).to(dtype)


def zennit_canonizers(name: str) -> list:
    """The canonizers a Zennit user would pick by hand (the reference does not use ours)."""
    if name.startswith("vgg") or name.startswith("cifar"):  # CifarResNet's additions are modules already
        return [VGGCanonizer()]
    return [ResNetCanonizer()]


def hook_tables(model: nn.Module) -> list[tuple[str, int, int, int]]:
    return [(name, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for name, m in model.named_modules()]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict's tensors (values copied) and the parameter objects."""
    state = {key: value.detach().clone() for key, value in model.state_dict().items() if torch.is_tensor(value)}
    return {"state": state, "parameters": [(name, id(p)) for name, p in model.named_parameters()]}


def assert_unchanged(model: nn.Module, before: dict, hooks: list, structure: list[str]) -> None:
    after = {key: value for key, value in model.state_dict().items() if torch.is_tensor(value)}
    assert list(after) == list(before["state"])
    assert all(torch.equal(after[key], value) for key, value in before["state"].items())
    assert [(name, id(p)) for name, p in model.named_parameters()] == before["parameters"]
    assert hook_tables(model) == hooks
    assert [name for name, _ in model.named_modules()] == structure
    assert not any("forward" in vars(module) for module in model.modules())  # no canonizer's forward left


# ---------------------------------------------------------------------------------------------------------------------
# architectures and weights
# ---------------------------------------------------------------------------------------------------------------------


def test_backbone_names():
    assert set(BACKBONES) == {"vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn",
                              "resnet18", "resnet34", "resnet50", "resnet101", "wide_resnet50_2", "cifar_resnet20",
                              "cifar_resnet32", "cifar_resnet44", "cifar_resnet56"}
    with pytest.raises(ValueError, match="Unknown backbone 'resnet5'"):
        backbone("resnet5")
    with pytest.raises(TypeError, match="must be a str"):
        backbone(3)


@pytest.mark.parametrize("name", ["vgg11", "vgg13_bn", "vgg16", "vgg19_bn"])
def test_vgg_layouts_match_torchvision(name):
    from torchvision.models.vgg import cfgs, make_layers

    config = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}[name.removesuffix("_bn")]
    reference = make_layers(cfgs[config], batch_norm=name.endswith("_bn"))
    features = backbone(name)
    assert [type(m) for m in features] == [type(m) for m in reference]
    ours, theirs = features.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs) and all(ours[k].shape == theirs[k].shape for k in ours)
    assert features(torch.zeros(1, 3, 32, 32)).shape == (1, 512, 1, 1)
    assert not features.training


@pytest.mark.parametrize("name, channels", [("resnet18", 512), ("resnet50", 2048)])
def test_resnet_layouts_match_torchvision(name, channels):
    reference = getattr(torchvision.models, name)(weights=None)
    features = backbone(name)
    expected = {k: v.shape for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in features.state_dict().items()} == expected
    assert list(features._modules) == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    reference.load_state_dict(reference.state_dict())
    features = backbone(name, reference.state_dict())  # whole-model keys; fc ignored
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        trunk = nn.Sequential(*list(reference.eval().children())[:-2])
        assert torch.equal(features(x), trunk(x))
    assert features(x).shape == (1, channels, 2, 2)


def test_backbone_of_a_module_drops_the_classifier():
    classifier = torchvision.models.resnet18(weights=None)
    features = backbone(classifier)
    assert features.layer4 is classifier.layer4 and not hasattr(features, "fc")
    cifar = CifarResNet(20)
    assert list(backbone(cifar)._modules) == ["conv1", "bn1", "relu", "layer1", "layer2", "layer3"]
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    assert backbone(other) is other


def test_local_weights_are_validated(tmp_path):
    torch.manual_seed(1)
    features = backbone("resnet18")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = features(x)
    state = features.state_dict()
    # DataParallel prefixes, a classifier, no num_batches_tracked (old checkpoints)
    wrapped = {f"module.{k}": v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    wrapped["module.fc.weight"] = torch.zeros(10, 512)
    path = tmp_path / "checkpoint.th"
    torch.save({"state_dict": wrapped, "best_prec1": 90.0}, path)
    for weights in (path, str(path), state):
        with torch.no_grad():
            assert torch.equal(backbone("resnet18", weights)(x), expected)

    with pytest.raises(FileNotFoundError, match="not found.*IMAGENET1K_V1"):
        backbone("resnet18", tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="not found.*no torchvision weights"):
        backbone("cifar_resnet20", "DEFAULT")
    torch.save({k: v for k, v in state.items() if not k.startswith("layer4")}, tmp_path / "short.pth")
    with pytest.raises(ValueError, match="missing keys \\['layer4.0.conv1.weight'"):
        backbone("resnet18", tmp_path / "short.pth")
    torch.save({**state, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="unexpected keys \\['extra.weight'\\]"):
        backbone("resnet18", tmp_path / "extra.pth")
    torch.save(backbone("resnet34").state_dict(), tmp_path / "resnet34.pth")
    with pytest.raises(ValueError, match="does not fit the resnet18 feature extractor"):
        backbone("resnet18", tmp_path / "resnet34.pth")
    torch.save({k: v[:1] if k == "conv1.weight" else v for k, v in state.items()}, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match="wrong shape.*conv1.weight"):
        backbone("resnet18", tmp_path / "shape.pth")
    (tmp_path / "garbage.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="Could not read"):
        backbone("resnet18", tmp_path / "garbage.pth")


def test_torchvision_weights_offline_fail_clearly(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)  # the name torchvision calls
    monkeypatch.setattr(torch.hub, "get_dir", lambda: "/nonexistent/hub")
    with pytest.raises(RuntimeError, match="Without internet, pass the path of a local state_dict"):
        backbone("resnet18", "IMAGENET1K_V1")
    with pytest.raises(RuntimeError, match="downloaded on first use"):
        backbone("vgg11_bn", torchvision.models.VGG11_BN_Weights.DEFAULT)
    with pytest.raises(ValueError, match="not weights of resnet50"):
        backbone("resnet50", torchvision.models.ResNet18_Weights.IMAGENET1K_V1)


def test_weights_preprocessing():
    assert weights_preprocessing(None) is None
    assert weights_preprocessing("IMAGENET1K_V1") == "torchvision"  # VGG-16 by default, as before
    assert weights_preprocessing("IMAGENET1K_FEATURES") == "caffe_rgb"
    assert weights_preprocessing("IMAGENET1K_V2", "resnet50") == "torchvision"
    assert weights_preprocessing(torchvision.models.Wide_ResNet50_2_Weights.DEFAULT) == "torchvision"
    assert weights_preprocessing("resnet56-4bfd9763.th", "cifar_resnet56") == "torchvision"
    assert weights_preprocessing("my_weights.pth", "resnet18") is None
    cifar = PREPROCESSINGS["cifar10"]
    assert cifar.mean == (0.4914, 0.4822, 0.4465) and not cifar.bgr
    assert get_preprocessing("cifar10") is cifar


def test_cifar_resnet_architecture():
    model = CifarResNet(20)
    assert sum(p.numel() for p in model.parameters()) == 269_722  # as the akamaster ResNet-20 (SOURCE.md)
    assert sum(p.numel() for p in CifarResNet(56).parameters()) == 853_018
    assert isinstance(model.layer2[0].shortcut, ShortcutA) and isinstance(model.layer2[1].shortcut, nn.Identity)
    x = torch.randn(2, 16, 8, 8)
    expected = torch.nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8))
    assert torch.equal(ShortcutA(8)(x), expected)
    features = backbone("cifar_resnet32")
    assert features(torch.zeros(1, 3, 32, 32)).shape == (1, 64, 8, 8)
    with pytest.raises(ValueError, match="6n \\+ 2"):
        CifarResNet(21)


# ---------------------------------------------------------------------------------------------------------------------
# canonizers
# ---------------------------------------------------------------------------------------------------------------------


def test_default_canonizers():
    def kinds(model):
        return [type(c) for c in default_canonizers(model)]

    resnet = backbone("resnet18")
    assert kinds(resnet) == [FastResNetCanonizer]
    assert kinds(torchvision.models.resnet18(weights=None)) == [FastResNetCanonizer]
    assert kinds(backbone("vgg11_bn")) == [MergeBatchNorms]
    assert kinds(backbone("vgg11")) == []
    assert kinds(backbone("cifar_resnet20")) == [MergeBatchNorms]
    assert kinds(FeatureTaps(resnet, ["layer2", "layer3"])) == [FastResNetCanonizer]
    deep = DeepNeon(FeatureTaps(backbone("cifar_resnet20"), ["layer2", "layer3"]), KDEOutlier(gamma=1.0))
    assert kinds(deep) == [MergeBatchNorms]
    assert issubclass(MergeBatchNorms, SequentialMergeBatchNorm)  # Zennit's merge, with more batch-norm types

    class Unknown(nn.Module):  # registration order says nothing about the data flow
        def __init__(self):
            super().__init__()
            self.conv, self.norm = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            return self.conv(self.norm(x))

    assert kinds(Unknown()) == [GraphCanonizer]  # canonized from its graph: the batch norm feeds the convolution
    assert kinds(torchvision.models.googlenet(weights=None, init_weights=False)) == [GraphCanonizer]


def test_residual_blocks_need_the_canonizer():
    model = network("resnet18", torch.float64)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match="ResNetCanonizer"):
        with LRPExplainer(model, FastEpsilonGammaBox(low=LOW, high=HIGH)) as explainer:
            explainer(x, lambda out: out)


def frozen_copy(model: nn.Module, norm: type = FrozenBatchNorm2d) -> nn.Module:
    """``model`` with every BatchNorm2d replaced by ``norm`` holding the same statistics: torchvision's
    FrozenBatchNorm2d (the batch norm of its detection backbones; Zennit 0.5 does not know it, Zennit 1.0 does) or
    SyncBatchNorm (distributed training; neither version knows it)."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                frozen = norm(child.num_features, eps=child.eps).to(child.weight.dtype).eval()
                with torch.no_grad():
                    for key in ("weight", "bias", "running_mean", "running_var"):
                        getattr(frozen, key).copy_(getattr(child, key).detach())
                setattr(parent, name, frozen)
    return model


@pytest.mark.parametrize("fast, norm", [(True, FrozenBatchNorm2d), (False, FrozenBatchNorm2d),
                                        (True, nn.SyncBatchNorm), (False, nn.SyncBatchNorm)])
def test_frozen_batch_norms_are_merged_like_batch_norms(fast, norm):
    """A ResNet with FrozenBatchNorm2d explains like the same ResNet with BatchNorm2d, with the fast rules and with
    Zennit's, whatever the Zennit version (0.5 alone would leave the frozen batch norms as a plain gradient: relevance
    scaled by their factors); the model is left as it was."""
    dtype = torch.float64
    plain = FeatureTaps(network("resnet18", dtype), ["layer2"])
    frozen = FeatureTaps(frozen_copy(plain.backbone, norm), ["layer2"])
    x = get_preprocessing("torchvision")(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)))
    x = x.to(dtype)
    with torch.no_grad():
        rows = DeepNeon._rows(plain(x))
        assert torch.allclose(frozen(x), plain(x), rtol=1e-12, atol=1e-12)
    head = KDEOutlier(gamma=median_gamma(rows)).double().fit(rows)
    reference = explain(DeepNeon(plain, copy.deepcopy(head), fast=fast), x)
    model = DeepNeon(frozen, head, fast=fast)
    before, hooks, structure = snapshot(model), hook_tables(model), [n for n, _ in model.named_modules()]
    relevance, audit = explain(model, x, return_audit=True)
    assert audit.ok, audit
    assert max_rel_error(relevance, reference) < 1e-9
    assert_unchanged(model, before, hooks, structure)


def test_merge_batch_norms_restores_frozen_batch_norms():
    model = frozen_copy(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    randomize = model[1]
    with torch.no_grad():
        randomize.running_var.uniform_(0.5, 2.0)
        randomize.weight.uniform_(0.5, 2.0)
    x = torch.rand(2, 3, 8, 8)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    expected = model(x)
    instances = MergeBatchNorms().apply(model)
    assert len(instances) == 1
    assert torch.allclose(model(x), expected, rtol=1e-5, atol=1e-6)  # merged: the same function
    assert torch.equal(model[1].weight, torch.ones(4))  # the batch norm is now (almost) the identity
    for instance in instances:
        instance.remove()
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


def test_batch_norm_without_a_rule_is_refused():
    """A composite that gives a batch norm no rule would leave it as a plain gradient (relevance scaled by its
    factor): a clear error, on either Zennit version."""
    features = backbone("vgg11_bn")[:3]
    model = DeepNeon(features, KDEOutlier(gamma=1.0).fit(torch.rand(5, 64)))
    composite = LayerMapComposite([(Activation, Pass()), (Convolution, Epsilon())])
    with pytest.raises(ValueError, match=r"1 \(BatchNorm2d\) received no rule.*MergeBatchNorms"):
        explain(model, torch.rand(1, 3, 16, 16), composite=composite)


# ---------------------------------------------------------------------------------------------------------------------
# fast rules = Zennit with its canonizer, on residual networks and VGG-BN
# ---------------------------------------------------------------------------------------------------------------------


def composites(name: str, model: nn.Module, kind: str):
    if kind == "epsilon_gamma_box":
        return (EpsilonGammaBox(low=LOW, high=HIGH, canonizers=zennit_canonizers(name)),
                FastEpsilonGammaBox(low=LOW, high=HIGH, canonizers=default_canonizers(model)))
    return (EpsilonPlusFlat(canonizers=zennit_canonizers(name)),
            FastEpsilonPlusFlat(canonizers=default_canonizers(model)))


def subject(name: str, dtype: torch.dtype) -> nn.Module:
    """The network a test explains: Wide-ResNet-50-2 as PatchCore reads it (layer2 and layer3, no layer4, whose 15M
    parameters per block make Zennit's reference slow on a CPU), the others whole."""
    model = network(name, dtype)
    return FeatureTaps(model, ["layer2", "layer3"]) if name == "wide_resnet50_2" else model


EGB, EPF = "epsilon_gamma_box", "epsilon_plus_flat"
F32, F64 = torch.float32, torch.float64
CASES = [("resnet18", F32, EGB), ("resnet18", F64, EGB), ("resnet50", F32, EGB), ("resnet50", F64, EGB),
         ("wide_resnet50_2", F64, EGB), ("vgg16_bn", F32, EGB), ("vgg16_bn", F64, EGB),
         ("resnet18", F64, EPF), ("resnet50", F32, EPF), ("vgg16_bn", F32, EPF),
         ("cifar_resnet20", F64, EGB), ("cifar_resnet20", F32, EPF)]


@pytest.mark.parametrize("name, dtype, kind", CASES)
def test_fast_equals_zennit_with_canonizer(name, dtype, kind):
    """Fast rules and our default canonizers = Zennit's rules with the canonizer a Zennit user picks; the audit is
    silent, the same input gives the same heatmap twice (to rounding), and the model keeps its weights, hooks and
    modules."""
    model = subject(name, dtype)
    before, hooks, structure = snapshot(model), hook_tables(model), [n for n, _ in model.named_modules()]
    x = torch.randn(1, 3, 32, 32, dtype=dtype, generator=torch.Generator().manual_seed(2))
    reference_composite, fast_composite = composites(name, model, kind)
    with torch.no_grad():
        output = model(x)
    # signed relevance (on active outputs): layers below a residual addition get relevance where their output < 0
    attr = output * torch.randn(output.shape, dtype=dtype, generator=torch.Generator().manual_seed(3))
    with accept_zero_eps():  # Zennit 1.0's merged batch norms (eps = 0) where PyTorch refuses them
        _, reference = Gradient(isolated(model), reference_composite)(x, attr)
    with LRPExplainer(model, fast_composite) as explainer:
        _, relevance = explainer(x, attr)
        _, again = explainer(x, attr)
        audit = explainer.last_audit
        paths = [hook.last_path for hook in fast_composite.hook_refs if hasattr(hook, "last_path")]
    assert max_rel_error(relevance, reference) < TOLERANCE[dtype]
    assert_repeatable(relevance, again)
    assert audit.ok, audit
    assert "shortcut" in paths
    assert_no_hooks(model)
    assert_unchanged(model, before, hooks, structure)


def test_fast_composite_with_zennits_own_canonizer():
    """FastNorm on Zennit's Sum over a trailing stacked axis, FastResNetCanonizer under Zennit's rules: every
    combination gives the same relevance."""
    model = network("resnet18", F64)
    x = torch.randn(1, 3, 32, 32, dtype=F64, generator=torch.Generator().manual_seed(4))
    results = []
    for composite in (EpsilonGammaBox(low=LOW, high=HIGH, canonizers=[ResNetCanonizer()]),
                      EpsilonGammaBox(low=LOW, high=HIGH, canonizers=[FastResNetCanonizer()]),
                      FastEpsilonGammaBox(low=LOW, high=HIGH, canonizers=[ResNetCanonizer()])):
        with accept_zero_eps():
            results.append(Gradient(isolated(model), composite)(x, lambda out: out)[1])
    assert max_rel_error(results[1], results[0]) < 1e-12
    assert max_rel_error(results[2], results[0]) < 1e-9


# ---------------------------------------------------------------------------------------------------------------------
# DeepNeon on every backbone: canonizers applied automatically, audit, isolation, determinism
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, dtype", [("resnet18", F32), ("resnet18", F64), ("resnet50", F32),
                                         ("wide_resnet50_2", F32), ("vgg16_bn", F64), ("cifar_resnet20", F64)])
def test_deep_neon_on_backbones(name, dtype):
    """A KDE head on each backbone, explained with DeepNeon's defaults: the canonizers come from
    default_canonizers, the pixel relevance sums to the score minus what the rules dissipate (the audit), and the
    model is left as it was."""
    features = subject(name, dtype)
    x = get_preprocessing("torchvision")(torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(6)))
    x = x.to(dtype)
    with torch.no_grad():
        rows = DeepNeon._rows(features(x))
    model = DeepNeon(features, KDEOutlier(gamma=median_gamma(rows))).fit(x, progress=False)
    before, hooks, structure = snapshot(model), hook_tables(model), [n for n, _ in model.named_modules()]
    n = 1 if name == "wide_resnet50_2" else 2  # two images: the audit is per image
    relevance, output, audit = explain(model, x[:n], return_output=True, return_audit=True)
    again = explain(model, x[:n])
    assert relevance.shape == (n, 3, 32, 32) and relevance.dtype == dtype
    assert_repeatable(relevance, again)
    assert audit.ok, audit
    assert audit.score.shape == (n,) and torch.allclose(audit.score, output.to(torch.float64))
    assert_no_hooks(model)
    assert_unchanged(model, before, hooks, structure)
    if dtype == torch.float64 and name in ("resnet18", "cifar_resnet20"):  # the reference path: Zennit's rules
        model.fast = False
        assert max_rel_error(relevance, explain(model, x[:n])) < 1e-9


# ---------------------------------------------------------------------------------------------------------------------
# real weights (optional)
# ---------------------------------------------------------------------------------------------------------------------


def _cifar(data, n_test: int):
    arrays = np.load(data / "cifar10_subset" / "cifar10_subset.npz")
    return torch.from_numpy(arrays["x_test"][:n_test]), torch.from_numpy(arrays["y_test"][:n_test].astype(np.int64))


@pytest.mark.data
@pytest.mark.parametrize("depth, n_test, accuracy", [(20, 1017, 0.91), (56, 256, 0.93)])
def test_real_cifar_resnet_weights(depth, n_test, accuracy):
    """The option-A architecture loads akamaster's checkpoints and reproduces their accuracy (SOURCE.md: ResNet-20
    91.6 % on these 1017 test images; ResNet-56 92.7 %, 93.75 % on the first 256)."""
    weights = f"cifar10_resnet/resnet{depth}-{'12fca82f' if depth == 20 else '4bfd9763'}.th"
    data = require_data(weights, "cifar10_subset/cifar10_subset.npz")
    path = data / weights
    images, labels = _cifar(data, n_test)
    features = backbone(f"cifar_resnet{depth}", path)
    classifier = CifarResNet(depth)
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    classifier.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    classifier.eval()
    x = get_preprocessing(weights_preprocessing(path, f"cifar_resnet{depth}"))(images)
    with torch.no_grad():
        predicted = torch.cat([classifier(batch).argmax(1) for batch in x.split(256)])
        assert torch.equal(features(x[:4]), backbone(classifier)(x[:4]))
    assert (predicted == labels).double().mean() >= accuracy


@pytest.mark.parametrize("name", ["neon_attrib.vision.backbones", "neon_attrib.vision.fast.canonizers"])
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), extraglobs={"torch": torch},
                             optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_fast_stabilizer_is_bit_identical_to_zennit(dtype):
    """The fast rules' stabiliser equals zennit.core.stabilize bit for bit: signed zeros, subnormals, inf and nan."""
    special = torch.tensor([0.0, -0.0, 1e-7, -1e-7, 3.0, -3.0, float("inf"), -float("inf"), float("nan"), 1e-45,
                            -1e-45], dtype=dtype)
    values = torch.cat([special, torch.randn(4096, generator=torch.Generator().manual_seed(0)).to(dtype) * 1e-6])
    for eps in (1e-6, 0.25):
        ours, theirs = _stabilize(values, eps), zennit_stabilize(values, eps)
        assert torch.equal(ours.isnan(), theirs.isnan())
        finite = ~theirs.isnan()
        assert torch.equal(ours[finite], theirs[finite])
        assert torch.equal(torch.signbit(ours[finite]), torch.signbit(theirs[finite]))
        assert torch.equal(_stabilize(values.clone(), eps, inplace=True)[finite], theirs[finite])
