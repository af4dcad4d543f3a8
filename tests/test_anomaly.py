"""PatchCore and PaDiM: the neuralized detectors equal plain implementations written from the papers (plain torch ops,
no NEON layers), the coreset is reproducible and never duplicates points, every explanation target conserves
relevance within the rules' dissipation, nothing is left behind, the state survives a round trip, and bad input gives
clear errors."""

from __future__ import annotations

import json
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_no_hooks, assert_repeatable
from torch import nn

from neon_attrib import PaDiM, PatchCore, PositionalMahalanobis, explain
from neon_attrib.anomaly import (
    ChannelSelect,
    PatchPool,
    PatchPoolRule,
    gaussian_blur,
    greedy_coreset,
    pixel_auroc,
    pro_auc,
)
from neon_attrib.vision import backbone

SIZE = 32


def tiny_backbone(seed: int = 0) -> nn.Sequential:
    """Three blocks: ReLUs at 16x16 (after a max pool), 8x8 and 4x4; biases everywhere."""
    torch.manual_seed(seed)
    model = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, 6, 3, padding=1), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(6, 8, 3, padding=1), relu2=nn.ReLU(), pool2=nn.MaxPool2d(2),
        conv3=nn.Conv2d(8, 10, 3, padding=1), relu3=nn.ReLU(), pool3=nn.MaxPool2d(2),
        conv4=nn.Conv2d(10, 12, 3, padding=1), relu4=nn.ReLU(), pool4=nn.MaxPool2d(2),
    ))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.bias.uniform_(-0.05, 0.1)
    return model.eval()


def images(n: int, seed: int, size: int = SIZE, dtype=torch.float32) -> torch.Tensor:
    """Inputs within the torchvision preprocessing's bounds (the ZBox rule's)."""
    rgb = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
    return ((rgb - mean) / std).to(dtype)


# ---------------------------------------------------------------------------------------------------------------------
# plain implementations from the papers: hooks, avg_pool2d, interpolate, cat, cdist, covariances, conv2d blur
# ---------------------------------------------------------------------------------------------------------------------


def plain_features(network: nn.Module, layers: list[str], x: torch.Tensor, aggregate: bool = True) -> torch.Tensor:
    outputs = {}
    handles = [network.get_submodule(name).register_forward_hook(
        lambda module, args, out, name=name: outputs.__setitem__(name, out.clone())) for name in layers]
    try:
        with torch.no_grad():
            network(x)
    finally:
        for handle in handles:
            handle.remove()
    maps = [F.avg_pool2d(outputs[name], 3, stride=1, padding=1) if aggregate else outputs[name] for name in layers]
    size = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
    maps = [m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False)
            for m in maps]
    return torch.cat(maps, 1)


def plain_greedy(z: np.ndarray, count: int, start: int) -> list[int]:
    """k-center greedy with the exact (N, N) distances, in float64."""
    distances = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)
    chosen = [start]
    nearest = distances[start].copy()
    for _ in range(count - 1):
        nearest[chosen] = -np.inf
        chosen.append(int(np.argmax(nearest)))
        nearest = np.minimum(nearest, distances[chosen[-1]])
    return chosen


def plain_coreset(rows: torch.Tensor, count: int, projection_dim: int | None, seed: int) -> torch.Tensor:
    """The documented recipe of greedy_coreset (rows assumed distinct)."""
    generator = torch.Generator().manual_seed(seed)
    z = rows.double()
    if projection_dim is not None and rows.shape[1] > projection_dim:
        projection = torch.randn(rows.shape[1], projection_dim, generator=generator, dtype=torch.float64)
        z = z @ (projection / math.sqrt(projection_dim))
    start = int(torch.randint(rows.shape[0], (1,), generator=generator))
    return torch.tensor(plain_greedy(z.numpy(), count, start))


def plain_blur(maps: torch.Tensor, sigma: float = 4.0) -> torch.Tensor:
    """One 2-D Gaussian kernel (truncated at 4σ), reflected borders."""
    radius = int(4 * sigma + 0.5)
    coords = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-(coords[:, None] ** 2 + coords[None, :] ** 2) / (2 * sigma ** 2))
    kernel = (g / g.sum()).to(maps.dtype)[None, None]
    padded = F.pad(maps[:, None], (radius,) * 4, mode="reflect")
    return F.conv2d(padded, kernel)[:, 0]


def plain_patchcore(network, layers, train, test, ratio, projection_dim, seed, reweight=False):
    fmap = plain_features(network, layers, train)
    rows = fmap.permute(0, 2, 3, 1).reshape(-1, fmap.shape[1])
    bank = rows[plain_coreset(rows, math.ceil(ratio * rows.shape[0]), projection_dim, seed)]
    test_map = plain_features(network, layers, test)
    n, c, h, w = test_map.shape
    patches = test_map.permute(0, 2, 3, 1).reshape(n, h * w, c)
    distances = torch.cdist(patches.double(), bank.double())  # (n, L, M)
    patch_scores, nearest = distances.min(-1)
    image_scores = patch_scores.amax(1)
    if reweight:
        best = patch_scores.argmax(1)
        star = patches[torch.arange(n), best].double()  # m_test*
        m_star = bank[nearest[torch.arange(n), best]].double()  # m*
        neighbours = torch.cdist(m_star, bank.double()).topk(min(9, bank.shape[0]), largest=False).indices
        d = torch.stack([torch.linalg.norm(star[i] - bank[neighbours[i]].double(), dim=1) for i in range(n)])
        image_scores = image_scores * (1 - torch.softmax(d, 1)[:, 0])
    maps = F.interpolate(patch_scores.reshape(n, 1, h, w), size=test.shape[-2:], mode="bilinear",
                         align_corners=False)[:, 0]
    return patch_scores.reshape(n, h, w), image_scores, plain_blur(maps)


def plain_padim(network, layers, train, test, n_channels, seed, reg=0.01):
    fmap = plain_features(network, layers, train, aggregate=False).double()
    keep = torch.randperm(fmap.shape[1], generator=torch.Generator().manual_seed(seed))[:n_channels].sort().values
    fmap = fmap[:, keep]
    n, c, h, w = fmap.shape
    x = fmap.reshape(n, c, h * w).permute(2, 0, 1)  # (L, n, c)
    mean = x.mean(1, keepdim=True)
    cov = (x - mean).transpose(1, 2) @ (x - mean) / (n - 1) + reg * torch.eye(c, dtype=torch.float64)
    precision = torch.linalg.inv(cov)
    t = plain_features(network, layers, test, aggregate=False).double()[:, keep]
    diff = t.reshape(t.shape[0], c, h * w).permute(2, 0, 1) - mean  # (L, m, c)
    scores = torch.sqrt(torch.einsum("lmc,lcd,lmd->lm", diff, precision, diff)).T.reshape(-1, h, w)
    maps = F.interpolate(scores[:, None], size=test.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return scores, scores.flatten(1).amax(1), plain_blur(maps)


def assert_relative(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    actual, expected = actual.double(), expected.double()
    error = float((actual - expected).abs().max() / expected.abs().max())
    assert error <= rtol, f"relative error {error:.2e} > {rtol:.0e}"


# ---------------------------------------------------------------------------------------------------------------------
# equality with the plain detectors
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("projection_dim, reweight", [(None, False), (16, True)])
def test_patchcore_equals_the_plain_detector(projection_dim, reweight):
    network = backbone("resnet18")
    train, test = images(4, 1), images(3, 2)
    model = PatchCore(network, coreset_ratio=0.3, projection_dim=projection_dim, reweight=reweight,
                      seed=3).fit(train, progress=False)
    patches, scores, maps = plain_patchcore(network, ["layer2", "layer3"], train, test, 0.3, projection_dim, 3,
                                            reweight)
    detection = model.detect(test)
    assert model.memory_bank_.shape == (math.ceil(0.3 * 4 * 16), 128 + 256)
    assert_relative(detection.patch_scores, patches, 1e-5)
    assert_relative(detection.scores, scores, 1e-5)
    assert_relative(model(test).detach(), scores, 1e-5)
    assert_relative(detection.maps, maps, 1e-5)
    assert_relative(model.anomaly_map(test), maps, 1e-5)


def test_padim_equals_the_plain_detector():
    network = backbone("resnet18")
    train, test = images(12, 1), images(3, 2)
    model = PaDiM(network, n_channels=40, seed=5).fit(train, progress=False)
    patches, scores, maps = plain_padim(network, ["layer1", "layer2", "layer3"], train, test, 40, 5)
    detection = model.detect(test)
    assert detection.patch_scores.shape == (3, 8, 8) and model.channels_.shape == (40,)
    assert_relative(detection.patch_scores, patches, 1e-5)
    assert_relative(detection.scores, scores, 1e-5)
    assert_relative(model(test).detach(), scores, 1e-5)
    assert_relative(detection.maps, maps, 1e-5)


def test_padim_relative_regularisation_is_scale_free():
    network = tiny_backbone()
    scaled = tiny_backbone()  # every activation times 10: conv1 scaled, the later biases too
    with torch.no_grad():
        scaled.conv1.weight.mul_(10)
        for conv in (scaled.conv1, scaled.conv2, scaled.conv3):
            conv.bias.mul_(10)
    train, test = images(12, 1, dtype=torch.float64), images(3, 2, dtype=torch.float64)
    scores = {}
    for relative in (True, False):
        for name, net in (("plain", network), ("scaled", scaled)):
            model = PaDiM(net, ["relu2", "relu3"], n_channels=6, reg=0.05, relative_reg=relative).double()
            scores[relative, name] = model.fit(train, progress=False).score(test)
        if relative:
            fmap = plain_features(network.double(), ["relu2", "relu3"], train, aggregate=False)[:, model.channels_]
            assert math.isclose(model.reg_, 0.05 * 100 * float(fmap.var(0).mean()), rel_tol=1e-7)
    assert torch.allclose(scores[True, "plain"], scores[True, "scaled"], rtol=1e-6)
    assert not torch.allclose(scores[False, "plain"], scores[False, "scaled"], rtol=1e-3)


@pytest.mark.parametrize("relative", [False, True])
def test_padim_streaming_fit_equals_the_fit_on_all_feature_maps(relative):
    """PaDiM.fit streams batches into the head's running statistics; the Gaussians, and relative_reg's mean variance,
    equal the former in-memory fit: the head fitted on all feature maps at once, reg × their mean variance."""
    network = tiny_backbone()
    train, test = images(10, 1, dtype=torch.float64), images(3, 2, dtype=torch.float64)
    model = PaDiM(network, ["relu2", "relu3"], n_channels=6, reg=0.05, relative_reg=relative).double()
    model.fit(train, batch_size=3, progress=False)  # batches of 3, 3, 3 and 1 image
    maps = plain_features(network.double(), ["relu2", "relu3"], train, aggregate=False)[:, model.channels_]
    reg = 0.05 * float(maps.var(0).mean()) if relative else 0.05  # the in-memory formula
    assert math.isclose(model.reg_, reg, rel_tol=1e-12)
    assert not relative or not math.isclose(reg, 0.05, rel_tol=1e-3)
    reference = PositionalMahalanobis(reg=reg, sqrt=True).double().fit(maps)
    for name in ("means", "factors"):
        ours, theirs = getattr(model.head.distance, name), getattr(reference.distance, name)
        assert float((ours - theirs).abs().max()) <= 1e-10 * float(theirs.abs().max()), name
    test_maps = plain_features(network.double(), ["relu2", "relu3"], test, aggregate=False)[:, model.channels_]
    assert_relative(model.patch_scores(test), reference(test_maps), 1e-10)
    assert model.n_locations_fit_ == 10 * maps.shape[2] * maps.shape[3] and model.n_channels_ == 6
    assert model.head.n_images_seen_ == 0 and model.head.moments.scatter.numel() == 0  # statistics freed
    fresh = PaDiM(network, ["relu2", "relu3"], n_channels=6, reg=0.05, relative_reg=relative).double()
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.patch_scores(test), model.patch_scores(test))

def test_vgg_default_taps_and_float64_equality():
    network = backbone("vgg11")  # the ReLUs before its 3rd and 4th max pool: blocks 3 and 4
    model = PatchCore(network, coreset_ratio=1.0).double()
    assert list(model.taps.layers) == ["9", "14"]
    train, test = images(2, 1, dtype=torch.float64), images(2, 2, dtype=torch.float64)
    model.fit(train, progress=False)
    patches, scores, maps = plain_patchcore(network.double(), ["9", "14"], train, test, 1.0, None, 0)
    assert_relative(model.detect(test).scores, scores, 1e-12)
    assert_relative(model.anomaly_map(test), maps, 1e-12)


def test_blur_equals_a_plain_two_dimensional_convolution():
    maps = torch.rand(2, 40, 36, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(gaussian_blur(maps, 4.0), plain_blur(maps), atol=1e-12)
    assert torch.equal(gaussian_blur(maps, None), maps)
    assert gaussian_blur(torch.rand(1, 8, 8), 4.0).shape == (1, 8, 8)  # smaller than the kernel: border repeated


# ---------------------------------------------------------------------------------------------------------------------
# the coreset
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("projection_dim", [None, 8])
def test_coreset_is_the_plain_greedy_and_reproducible(projection_dim):
    rows = torch.randn(200, 24, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    chosen = greedy_coreset(rows, 30, projection_dim=projection_dim, seed=7)
    assert torch.equal(chosen, plain_coreset(rows, 30, projection_dim, 7))
    assert torch.equal(chosen, greedy_coreset(rows, 30, projection_dim=projection_dim, seed=7))
    assert not torch.equal(chosen, greedy_coreset(rows, 30, projection_dim=projection_dim, seed=8))


def test_coreset_never_duplicates_points():
    base = torch.randn(20, 5, generator=torch.Generator().manual_seed(1))
    rows = torch.cat([base, base, base[:7]])  # every point two or three times
    for count in (5, 20, 50):
        chosen = greedy_coreset(rows, count, projection_dim=3, seed=0)
        assert chosen.numel() == min(count, 20) == len(set(chosen.tolist()))
        assert torch.unique(rows[chosen], dim=0).shape[0] == chosen.numel()
    model = PatchCore(tiny_backbone(), ["relu2", "relu3"], coreset_ratio=1.0)
    twice = torch.cat([images(2, 1), images(2, 1)])
    model.fit(twice, progress=False)  # ratio 1: every distinct patch once
    assert model.memory_bank_.shape[0] == torch.unique(model.feature_rows(twice, progress=False), dim=0).shape[0]


# ---------------------------------------------------------------------------------------------------------------------
# explanations: every target conserves, nothing is left behind
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted():
    network = tiny_backbone()
    patchcore = PatchCore(network, ["relu2", "relu3"], coreset_ratio=0.5, seed=1).double()
    padim = PaDiM(network, ["relu2", "relu3"], n_channels=10, seed=1).double()
    train, held = images(8, 1, dtype=torch.float64), images(4, 3, dtype=torch.float64)
    for model in (patchcore, padim):
        model.fit(train, progress=False).calibrate(held, tau_percentile=90.0)
    return patchcore, padim


@pytest.mark.parametrize("kind", ["patchcore", "padim"])
@pytest.mark.parametrize("target", ["max", "sum", "excess", (1, 2), (-1, 0)])
def test_every_target_conserves_within_the_dissipation(fitted, kind, target):
    model = fitted[0] if kind == "patchcore" else fitted[1]
    x = images(3, 9, dtype=torch.float64)
    relevance, output, audit = model.explain(x, target, return_output=True, return_audit=True)
    assert audit.ok, audit
    assert relevance.shape == x.shape and bool(torch.isfinite(relevance).all())
    patches = model.patch_scores(x).flatten(1)
    expected = {"max": patches.amax(1), "sum": patches.sum(1),
                "excess": (patches - model.tau_).clamp_min(0).sum(1)}.get(target)
    if expected is None:
        expected = model.patch_scores(x)[:, target[0], target[1]]
    assert torch.allclose(output, expected, rtol=1e-12)
    assert model.explain_target == "max"  # the model keeps its own target
    assert_no_hooks(model)
    again = model.explain(x, target)
    assert_repeatable(relevance, again)


def test_max_target_is_the_explanation_of_the_maximal_patch(fitted):
    model = fitted[0]
    x = images(1, 11, dtype=torch.float64)
    patches = model.patch_scores(x)[0]
    row, col = divmod(int(patches.argmax()), patches.shape[1])
    assert torch.allclose(explain(model, x), model.explain(x, (row, col)), rtol=1e-12, atol=1e-15)
    parts = model.relevance(x, "sum")
    assert torch.allclose(parts.locations, patches.unsqueeze(0), rtol=1e-12)  # the sum rule's shares: the scores
    assert parts.pixels.shape == x.shape


def test_excess_gives_normal_texture_no_relevance(fitted):
    for model in fitted:
        x = images(2, 12, dtype=torch.float64)
        copy = model.with_target("excess")
        copy.pool.tau = model.patch_scores(x).max() + 1.0  # (a new buffer on the copy only) every patch is normal
        relevance, output = explain(copy, x, return_output=True)
        assert bool((output == 0).all()) and bool((relevance == 0).all())
        assert bool(torch.isfinite(model.tau_)) and float(model.tau_) < float(copy.pool.tau)


def test_reweighted_score_is_explained_on_the_maximal_patch():
    model = PatchCore(tiny_backbone(), ["relu2", "relu3"], coreset_ratio=0.5, reweight=True).double()
    model.fit(images(6, 1, dtype=torch.float64), progress=False)
    x = images(2, 4, dtype=torch.float64)
    relevance, output, audit = explain(model, x, return_output=True, return_audit=True)
    assert audit.ok, audit
    plain = model.patch_scores(x).flatten(1).amax(1)
    assert bool((output < plain).all()) and bool((output > 0).all())
    model.reweight = False
    assert torch.allclose(explain(model, x) * (output / plain).view(-1, 1, 1, 1), relevance, rtol=1e-10, atol=1e-14)


def test_fast_and_zennit_rules_agree(fitted):
    model = fitted[1]
    x = images(2, 5, dtype=torch.float64)
    fast = explain(model, x)
    model.fast = False
    try:
        reference = explain(model, x)
    finally:
        model.fast = True
    assert_relative(fast, reference, 1e-9)


def test_pool_rule_copies_and_conserves():
    assert PatchPoolRule().copy().__class__ is PatchPoolRule
    scores = torch.rand(2, 3, 4, dtype=torch.float64, requires_grad=True)
    pool = PatchPool("sum")
    relevance = PatchPoolRule().relevance(pool, scores.detach(), pool(scores).detach(), pool(scores).detach())
    assert torch.allclose(relevance, scores.detach())


# ---------------------------------------------------------------------------------------------------------------------
# calibration
# ---------------------------------------------------------------------------------------------------------------------


def test_calibration_percentile_f1_and_verdicts(fitted):
    model = fitted[0]
    held = images(6, 21, dtype=torch.float64)
    scores = model.score(held)
    model.calibrate(held, percentile=50.0, tau_percentile=75.0)
    assert math.isclose(float(model.threshold_), float(np.percentile(scores.numpy(), 50)), rel_tol=1e-12)
    patches = model.patch_scores(held).flatten().numpy()
    assert math.isclose(float(model.tau_), float(np.percentile(patches, 75)), rel_tol=1e-12)
    verdicts, normalized = model.predict(held), model.normalized_score(held)
    assert torch.equal(verdicts, scores > model.threshold_)
    assert bool(((normalized >= 0) & (normalized <= 1)).all())
    assert torch.equal(normalized > 0.5, verdicts)
    labels = (scores > scores.median()).long()  # a labelled set that a threshold separates perfectly
    model.calibrate(held, labels)
    assert model.calibration_["method"] == "f1" and model.calibration_["f1"] == 1.0
    assert torch.equal(model.predict(held), labels.bool())
    with pytest.raises(ValueError, match="every image as defective"):
        model.calibrate(held, torch.ones(6))
    with pytest.raises(ValueError, match="6 values of 0"):
        model.calibrate(held, [0, 1])
    model.calibrate(images(4, 3, dtype=torch.float64), tau_percentile=90.0)  # as the fixture left it


def test_uncalibrated_model_says_what_to_do():
    model = PatchCore(tiny_backbone(), ["relu2", "relu3"], coreset_ratio=0.5).fit(images(3, 1), progress=False)
    assert model.detect(images(1, 2)).verdicts is None
    with pytest.raises(ValueError, match="calibrate"):
        model.predict(images(1, 2))
    with pytest.raises(ValueError, match="calibrate"):
        model.explain(images(1, 2), "excess")


# ---------------------------------------------------------------------------------------------------------------------
# state
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["patchcore", "padim"])
def test_state_dict_round_trip_into_a_fresh_instance(fitted, kind, tmp_path):
    model = fitted[0] if kind == "patchcore" else fitted[1]
    cls, options = (PatchCore, dict(coreset_ratio=0.5)) if kind == "patchcore" else (PaDiM, dict(n_channels=10))
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    fresh = cls(tiny_backbone(seed=9), ["relu2", "relu3"], **options).double()
    fresh.load_state_dict(torch.load(path, weights_only=True))
    x = images(2, 6, dtype=torch.float64)
    assert torch.equal(fresh(x), model(x))
    assert torch.equal(fresh.anomaly_map(x), model.anomaly_map(x))
    for name in ("threshold_", "score_min_", "score_max_", "tau_", "image_size_"):
        assert torch.equal(getattr(fresh, name), getattr(model, name)), name
    assert torch.equal(fresh.predict(x), model.predict(x))
    assert torch.equal(explain(fresh, x), explain(model, x))


# ---------------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------------


def test_bad_input_gives_clear_errors():
    network = tiny_backbone()
    model = PatchCore(network, ["relu2", "relu3"])
    with pytest.raises(ValueError, match="not fitted yet"):
        model(images(1, 1))
    with pytest.raises(ValueError, match="no images"):
        model.fit(torch.empty(0, 3, SIZE, SIZE), progress=False)
    with pytest.raises(ValueError, match="no images"):
        model.fit([], progress=False)
    with pytest.raises(ValueError, match="different sizes .32x32 and 24x24.*Resize"):
        model.fit([images(1, 1)[0], images(1, 2, size=24)[0]], progress=False)
    with pytest.raises(ValueError, match="different sizes"):
        PaDiM(network, ["relu2", "relu3"]).fit(iter([images(2, 1), images(2, 2, size=40)]), progress=False)
    with pytest.raises(TypeError, match="tensor"):
        model.fit("folder/", progress=False)
    with pytest.raises(ValueError, match="has no layer 'relu9'.*Did you mean"):
        PatchCore(network, ["relu2", "relu9"])
    with pytest.raises(ValueError, match="has no layer 'fc'"):
        PatchCore("resnet18", ["layer3", "fc"])  # backbone() stops at layer4: nothing after it to tap
    flat = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 3), relu=nn.ReLU(), flatten=nn.Flatten(),
                                     fc=nn.Linear(4 * 30 * 30, 5)))
    with pytest.raises(ValueError, match="'fc' returned \\(2, 5\\), not a feature map"):
        PatchCore(flat, ["relu", "fc"]).fit(images(2, 1), progress=False)  # after the last map: a vector
    with pytest.raises(ValueError, match="too small for the tapped layers"):
        PatchCore(network, ["relu4"]).fit(images(2, 1, size=4), progress=False)
    with pytest.raises(ValueError, match="No default layers"):
        PatchCore(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    with pytest.raises(ValueError, match="coreset_ratio"):
        PatchCore(network, ["relu2"], coreset_ratio=0)
    with pytest.raises(ValueError, match="explain_target"):
        PatchCore(network, ["relu2"], explain_target="mean")
    with pytest.raises(ValueError, match="n_channels"):
        PaDiM(network, ["relu2"], n_channels=0)
    with pytest.raises(TypeError, match="features"):
        PatchCore(3)


def test_padim_needs_the_fitted_size_and_patch_targets_the_grid(fitted):
    padim = fitted[1]
    with pytest.raises(ValueError, match="fitted on 32x32 images.*got 40x40"):
        padim.score(images(1, 1, size=40, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(16, 0\) lies outside the 16x16 patch grid"):
        padim.explain(images(1, 1, dtype=torch.float64), (16, 0))
    with pytest.raises(TypeError, match="fit_self"):
        padim.fit_self(images(1, 1))
    with pytest.raises(TypeError, match="fit\\(images\\)"):
        padim.fit_head(torch.zeros(4, 3))


def test_channel_select_is_exact_lrp():
    select = ChannelSelect(torch.tensor([2, 0]))
    x = torch.rand(1, 3, 2, 2, requires_grad=True)
    out = select(x)
    (grad,) = torch.autograd.grad(out, x, out.detach())
    assert torch.allclose(grad.sum(), out.sum()) and bool((grad[:, 1] == 0).all())


# ---------------------------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------------------------


def test_pixel_metrics():
    mask = np.zeros((2, 16, 16), bool)
    mask[0, 2:5, 2:5] = mask[0, 10:14, 9:12] = mask[1, 0:3, 12:16] = True
    assert pro_auc(mask * 1.0, mask) == 1.0 and pixel_auroc(mask * 1.0, mask) == 1.0
    assert pro_auc(-(mask * 1.0), mask) == pytest.approx(0.0, abs=1e-12)
    noise = np.random.default_rng(0).random((40, 48, 48))
    big = np.zeros_like(noise, dtype=bool)
    big[:, 10:30, 5:25] = True
    assert pro_auc(noise, big) == pytest.approx(0.15, abs=0.01)  # chance: max_fpr / 2
    # one small region detected, one large missed: PRO weighs regions equally, pixel AUROC by pixels
    scores = np.zeros((1, 16, 16))
    small = np.zeros((1, 16, 16), bool)
    small[0, 0, 0] = True
    small[0, 8:16, 0:8] = True
    scores[0, 0, 0] = 1.0
    # curve (0, 0.5) -> (1, 1): area over [0, 0.3] is 0.3 · (0.5 + 0.65) / 2
    assert pro_auc(scores, small) == pytest.approx(0.575, abs=1e-9)
    assert pixel_auroc(scores, small) == pytest.approx((1 + 64 * 0.5) / 65, abs=1e-9)
    with pytest.raises(ValueError, match="one shape"):
        pro_auc(np.zeros((1, 4, 4)), np.zeros((1, 4, 5), bool))


# ---------------------------------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------------------------------


def _write_images(folder, count, seed, size=(40, 40)):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return sorted(folder.iterdir())


def test_detect_command(tmp_path, capsys):
    from neon_attrib.cli.main import main as cli_main

    _write_images(tmp_path / "good", 8, 0)
    tests = _write_images(tmp_path / "test", 2, 1)
    out = tmp_path / "out"
    code = cli_main(["detect", *map(str, tests), "--detector", "patchcore", "--fit", str(tmp_path / "good"),
                     "--backbone", "resnet18", "--size", "32", "--coreset-ratio", "0.5", "--holdout", "0.25",
                     "--target", "excess", "--save-raw", "npz", "--out", str(out), "--quiet"])
    assert code == 0
    report = json.loads((out / "scores.json").read_text())
    assert report["settings"]["n_fit"] == 6 and report["settings"]["n_calibration"] == 2
    entry = report["images"]["img0"]
    assert isinstance(entry["verdict"], bool) and 0 <= entry["normalized_score"] <= 1
    assert (out / "img0_detect.png").is_file()
    arrays = np.load(out / "img1_detect.npz")
    assert arrays["anomaly_map"].shape == (32, 32) and arrays["relevance"].shape == (3, 32, 32)
    assert "score=" in capsys.readouterr().out

    _write_images(tmp_path / "held", 3, 3)
    code = cli_main(["detect", str(tests[0]), "--detector", "padim", "--fit", str(tmp_path / "good"), "--calibrate",
                     str(tmp_path / "held"), "--backbone", "resnet18", "--size", "32", "--n-channels", "16",
                     "--no-relative-reg", "--save-raw", "npy", "--out", str(tmp_path / "padim"), "--quiet"])
    assert code == 0
    report = json.loads((tmp_path / "padim" / "scores.json").read_text())
    assert report["settings"]["reg"] == 0.01 and report["settings"]["n_calibration"] == 3
    assert np.load(tmp_path / "padim" / "img0_relevance.npy").shape == (3, 32, 32)

    _write_images(tmp_path / "mixed", 1, 2, size=(40, 48))
    code = cli_main(["detect", str(tests[0]), str(tmp_path / "mixed" / "img0.png"), "--detector", "padim",
                     "--fit", str(tmp_path / "good"), "--backbone", "resnet18", "--no-resize", "--out", str(out),
                     "--quiet"])
    assert code == 2
    assert "different sizes with --no-resize" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["neon_attrib.anomaly._layers", "neon_attrib.anomaly._detector",
                                  "neon_attrib.anomaly.patchcore", "neon_attrib.anomaly.padim",
                                  "neon_attrib.anomaly.metrics"])
def test_docstring_examples(name):
    import doctest
    import importlib

    module = importlib.import_module(name)
    result = doctest.testmod(module, extraglobs={"np": np, "torch": torch},
                             optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.failed == 0


def test_resnet_batches_of_two_pass_the_audit_per_image():
    """Residual sums stacked after the batch axis keep the per-image audit per image (a batch of 2 once mixed them)."""
    model = PatchCore("resnet18", coreset_ratio=0.5).fit(images(3, 1), progress=False)
    x = images(2, 2)
    relevance, audit = explain(model, x, return_audit=True)
    assert audit.ok and audit.score.shape == (2,), audit
    single = torch.cat([explain(model, x[i:i + 1]) for i in range(2)])
    assert_relative(relevance, single, 1e-4)  # kernels for batches of 1 and 2 round differently (a mix-up is O(1))
