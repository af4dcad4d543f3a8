"""DeepNeon: NEON heads on VGG-16 block 5, explained down to pixels.

Random-weight VGG-16 (torchvision's initialisation) on 64x64 inputs (2x2 block-5 locations). The relevance arriving
at block 5 is checked against naive float64 re-implementations of SPEC's CNN rules (explicit loops over locations,
einsum over support points / features / clusters), written from the formulas, not from the code.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from conftest import assert_no_hooks, assert_repeatable, require_data

from neon_attrib import KDEInlier, KDEOutlier, KMeansMembership, explain
from neon_attrib.cli.main import main as cli_main
from neon_attrib.vision.deep import (
    PREPROCESSINGS,
    DeepNeon,
    LeaveOneOutKDEInlier,
    LeaveOneOutKDEOutlier,
    LocationPool,
    LocationPoolRule,
    get_preprocessing,
    load_image,
    vgg16_features,
)
from neon_attrib.viz import heatmap, heatmap_grid, overlay, save_heatmap

SIZE = 64


# ---------------------------------------------------------------------------------------------------------------------
# fixtures
@pytest.fixture(scope="module")
def features():
    torch.manual_seed(0)
    return vgg16_features()


@pytest.fixture(scope="module")
def images():
    """Three preprocessed 64x64 images and two more to fit on."""
    generator = torch.Generator().manual_seed(1)
    rgb = torch.rand(5, 3, SIZE, SIZE, generator=generator)
    return get_preprocessing("torchvision")(rgb)


@pytest.fixture(scope="module")
def features64(features):
    return copy.deepcopy(features).double()


def _gamma(features, images) -> float:
    """1 / median squared distance between locations: a kernel width matched to random-weight features."""
    with torch.no_grad():
        rows = DeepNeon._rows(features(images.to(next(features.parameters()).dtype)))
    return float(1.0 / torch.cdist(rows, rows).pow(2).median())


@pytest.fixture(scope="module")
def kde64(features64, images):
    x = images.double()
    return DeepNeon(features64, KDEOutlier(gamma=_gamma(features64, x))).fit(x, progress=False)


def _rows(fmap: torch.Tensor) -> torch.Tensor:
    return fmap.permute(0, 2, 3, 1).reshape(-1, fmap.shape[1])


# ---------------------------------------------------------------------------------------------------------------------
# VGG-16, weights, preprocessing, images
def test_vgg16_features_matches_torchvision_layout(features):
    import torchvision

    reference = torchvision.models.vgg16(weights=None).features
    assert [type(m) for m in features] == [type(m) for m in reference]
    ours, theirs = features.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    assert features(torch.zeros(1, 3, 32, 32)).shape == (1, 512, 1, 1)


def test_vgg16_features_from_local_state_dict(tmp_path, features):
    x = torch.randn(1, 3, 32, 32)
    expected = features(x)
    plain, prefixed = tmp_path / "features.pth", tmp_path / "full.pth"
    torch.save(features.state_dict(), plain)
    torch.save({**{f"features.{k}": v for k, v in features.state_dict().items()},
                "classifier.0.weight": torch.zeros(2, 2)}, prefixed)
    for path in (plain, prefixed, str(plain)):
        loaded = vgg16_features(path)
        assert torch.equal(loaded(x), expected)
    assert torch.equal(vgg16_features(features.state_dict())(x), expected)

    with pytest.raises(FileNotFoundError, match="not found"):
        vgg16_features(tmp_path / "missing.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="missing keys"):
        vgg16_features(wrong)
    shapes = tmp_path / "shapes.pth"
    torch.save({k: v[:1] if k == "0.weight" else v for k, v in features.state_dict().items()}, shapes)
    with pytest.raises(ValueError, match="wrong shape"):
        vgg16_features(shapes)
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="Could not read"):
        vgg16_features(garbage)


def test_preprocessings():
    from torchvision.transforms import Normalize

    rgb = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torchvision_pre = get_preprocessing("torchvision")
    expected = Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(rgb)
    assert torch.allclose(torchvision_pre(rgb), expected, atol=1e-6)

    caffe = get_preprocessing("caffe")
    bgr = rgb.flip(1) * 255.0 - torch.tensor([103.939, 116.779, 123.68]).view(1, 3, 1, 1)
    assert torch.allclose(caffe(rgb), bgr, atol=1e-4)
    for pre in PREPROCESSINGS.values():
        assert torch.allclose(pre.inverse(pre(rgb)), rgb, atol=1e-5)
        low, high = pre.bounds()
        assert torch.allclose(low, pre(torch.zeros(1, 3, 1, 1)), atol=1e-4)
        assert torch.allclose(high, pre(torch.ones(1, 3, 1, 1)), atol=1e-4)
    assert torch.allclose(caffe(torch.full((3, 2, 2), 255, dtype=torch.uint8)), caffe(torch.ones(3, 2, 2)))
    with pytest.raises(ValueError, match="Unknown preprocessing"):
        get_preprocessing("keras")
    with pytest.raises(ValueError, match="RGB images"):
        caffe(torch.zeros(1, 8, 8))


def test_load_image(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, size=(40, 80), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    image = load_image(tmp_path / "grey.png")
    assert image.shape == (3, 40, 80) and image.dtype == torch.float32
    assert torch.equal(image[0], image[2]) and torch.allclose(image[0] * 255, torch.from_numpy(grey).float())
    assert load_image(tmp_path / "grey.png", size=64).shape == (3, 64, 128)

    Image.fromarray(grey[:20]).save(tmp_path / "small.png")
    with pytest.raises(ValueError, match="smaller than VGG-16's minimum"):
        load_image(tmp_path / "small.png")
    (tmp_path / "text.png").write_text("no image")
    with pytest.raises(ValueError, match="Could not read"):
        load_image(tmp_path / "text.png")
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")


# ---------------------------------------------------------------------------------------------------------------------
# the model
def test_shapes_and_pooling(features, images):
    x = images[:3]
    kde = DeepNeon(features, KDEOutlier(gamma=_gamma(features, images))).fit(images, progress=False)
    assert kde.n_locations_fit_ == 5 * 4 and kde.n_channels_ == 512
    scores, maps = kde(x), kde.location_scores(x)
    assert scores.shape == (3,) and maps.shape == (3, 2, 2)
    assert torch.allclose(scores, maps.sum((1, 2)))

    kmeans = DeepNeon(features, KMeansMembership(n_clusters=3, n_init=2, random_state=0), pool="positive")
    kmeans.fit(images, progress=False)
    scores, maps = kmeans(x), kmeans.location_scores(x)
    assert scores.shape == (3, 3) and maps.shape == (3, 3, 2, 2)
    assert torch.allclose(scores, maps.clamp_min(0).sum((2, 3)))
    assert torch.equal(kmeans.default_target(scores), scores.argmax(1))

    for mode, pooled in [("sum", maps.sum((2, 3))), ("mean", maps.mean((2, 3))), ("max", maps.amax((2, 3)))]:
        kmeans.pool = LocationPool(mode)
        assert torch.allclose(kmeans(x), pooled, atol=1e-5)
    with pytest.raises(ValueError, match="mode"):
        LocationPool("median")
    with pytest.raises(TypeError, match="head"):
        DeepNeon(features, torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="batch of images"):
        kde(x[0])


def test_explain_pixels_deterministic_and_no_hooks(features, images):
    model = DeepNeon(features, KDEOutlier(gamma=_gamma(features, images))).fit(images, progress=False)
    x = images[:1]
    first, output = explain(model, x, return_output=True)
    assert first.shape == (1, 3, SIZE, SIZE) and bool(torch.isfinite(first).all())
    assert torch.allclose(output, model(x))
    assert_no_hooks(model)
    second = explain(model, x)
    assert_repeatable(first, second)
    staged = model.relevance(x)
    assert torch.allclose(staged.pixels, first, atol=1e-7)
    assert_no_hooks(model)
    # block-5 relevance does not depend on the rules below it: the full pipeline equals the head-and-pool shortcut
    assert torch.equal(staged.features, model.relevance(x, to_pixels=False).features)
    # the pool rule hands each location its own score (sum pooling, top relevance = the score)
    assert torch.allclose(staged.locations, model.location_scores(x), rtol=1e-5)


def test_pool_rule_shares():
    scores = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    relevance = torch.tensor([4.0])
    for mode, expected in [
        ("sum", scores / scores.sum() * 4.0),
        ("mean", scores / scores.sum() * 4.0),
        ("positive", scores.clamp_min(0) / scores.clamp_min(0).sum() * 4.0),
        ("max", torch.tensor([[0.0, 0.0, 4.0, 0.0]])),
    ]:
        pool = LocationPool(mode)
        out = LocationPoolRule().relevance(pool, scores, pool(scores), relevance)
        assert torch.allclose(out, expected), mode
        assert torch.allclose(out.sum(), relevance.sum())
    assert repr(LocationPoolRule().copy()) == "LocationPoolRule()"


# ---------------------------------------------------------------------------------------------------------------------
# relevance at block 5 equals SPEC's CNN rules (naive float64 references)
def _kde_outlier_reference(a: torch.Tensor, support: torch.Tensor, beta: float, scale: float) -> torch.Tensor:
    """SPEC §1: R_i = Σ_k a_i(a_i − u_ik) / Σ_i' a_i'(a_i' − u_i'k) · R_k^dot, R_k^dot = p_k aᵀ(a − u_k)."""
    h = ((a[None, :] - support) ** 2).sum(1)
    p = torch.softmax(-beta * h, 0)
    numerator = a[None, :] * (a[None, :] - support)  # (N, d)
    denominator = numerator.sum(1)  # (N,)
    r_dot = p * denominator * scale
    share = torch.where(denominator[:, None] != 0, numerator / denominator[:, None], torch.zeros_like(numerator))
    return torch.einsum("kd,k->d", share, r_dot)


def test_block5_relevance_kde_outlier_matches_spec(kde64, images):
    x = images[:3].double()
    staged = kde64.relevance(x, to_pixels=False)
    fmap = kde64.features(x).detach()
    rows, relevance = _rows(fmap), _rows(staged.features)
    support, beta = kde64.head.support_, kde64.head.beta_
    scores = kde64.head(rows)
    for r in range(rows.shape[0]):
        # sum pooling: location r receives R_r = o(a_r), so R_k = p_k · R_r / o(a_r) · o(a_r)
        expected = _kde_outlier_reference(rows[r], support, beta, scale=1.0)
        assert torch.allclose(relevance[r], expected, rtol=1e-9, atol=1e-12 * scores[r].abs().item()), r


def test_block5_relevance_kde_inlier_matches_spec(features64, images):
    x = images.double()
    head = KDEInlier(gamma=_gamma(features64, x), n_features=300, random_state=0, eps=0.5)
    model = DeepNeon(features64, head).fit(x, progress=False)
    x = x[:2]
    staged = model.relevance(x, to_pixels=False)
    rows, relevance = _rows(model.features(x).detach()), _rows(staged.features)
    omega, bias, mu = head.features.omega, head.features.bias, head.features.mean
    n_features = omega.shape[0]
    for r in range(rows.shape[0]):
        a = rows[r]
        c = math.sqrt(2.0) * mu / n_features
        z = omega @ a
        r_sin = -torch.sin(z) * torch.sin(bias) * c
        r_cos = torch.cos(z) * torch.cos(bias) * c
        eps_j = torch.where(z >= 0, 0.5, -0.5)
        contrib = a[None, :] * omega  # (H, d): a_i ω_ij
        expected = torch.zeros_like(a)
        for j in range(n_features):
            expected += contrib[j] / contrib[j].sum() * r_sin[j] + contrib[j] / (eps_j[j] + contrib[j].sum()) * r_cos[j]
        # sum pooling: the location's relevance equals its score, scale 1
        assert torch.allclose(relevance[r], expected, rtol=1e-8, atol=1e-12), r


@pytest.mark.parametrize("pool", ["sum", "positive"])
def test_block5_relevance_kmeans_matches_spec(features64, images, pool):
    x = images.double()
    head = KMeansMembership(n_clusters=3, n_init=2, random_state=0, centroid_norm=1.0)
    model = DeepNeon(features64, head, pool=pool).fit(x, progress=False)
    x = x[:2].repeat(3, 1, 1, 1)  # every image once per target cluster, in one call
    targets = torch.arange(3).repeat_interleave(2)
    rows = _rows(model.features(x).detach())
    centroids, beta = head.cluster_centers_, head.pool.beta
    staged = model.relevance(x, target=targets, to_pixels=False)
    assert torch.equal(staged.target, targets)
    relevance = _rows(staged.features)
    for r in range(rows.shape[0]):
        target = int(targets[r // 4])
        a = rows[r]
        others = [k for k in range(3) if k != target]
        w = torch.stack([2 * (centroids[target] - centroids[k]) for k in others])  # (K-1, d)
        b = torch.stack([centroids[k] @ centroids[k] - centroids[target] @ centroids[target] for k in others])
        h = w @ a + b
        f = h.min()
        p = torch.softmax(-beta * h, 0)
        # the pool rule at the top: R_l = f_c(a_l) (sum) or max(0, f_c(a_l)) (positive)
        location_relevance = float(f) if pool == "sum" else max(float(f), 0.0)
        r_dot = p * (w @ a) * (location_relevance / float(f))
        expected = sum(a * w[k] / (a @ w[k]) * r_dot[k] for k in range(len(others)))
        assert torch.allclose(relevance[r], expected, rtol=1e-8, atol=1e-12), (target, r)


def test_block5_relevance_leave_one_out(features64, images):
    x = images[:2].double()
    model = DeepNeon(features64, KDEOutlier(gamma=_gamma(features64, x))).fit_self(x)
    assert isinstance(model.head, LeaveOneOutKDEOutlier)
    rows = _rows(model.features(x).detach())
    support = model.head.support_
    gamma = model.head.gamma
    # scores: each location against the other locations only
    scores = model.location_scores(x).reshape(-1)
    for r in range(rows.shape[0]):
        h = ((rows[r] - support) ** 2).sum(1)
        h = torch.cat([h[:r], h[r + 1:]])
        expected = -torch.logsumexp(-gamma * h, 0) / gamma + math.log(len(h)) / gamma
        assert torch.isclose(scores[r], expected, rtol=1e-10)
    staged = model.relevance(x, to_pixels=False)
    relevance = _rows(staged.features)
    for r in range(rows.shape[0]):
        keep = [k for k in range(support.shape[0]) if k != r]
        expected = _kde_outlier_reference(rows[r], support[keep], model.head.beta_, scale=1.0)
        assert torch.allclose(relevance[r], expected, rtol=1e-9, atol=1e-12), r
    with pytest.raises(ValueError, match="fit_self"):
        model(x[:1])

    inlier = DeepNeon(features64, KDEInlier(gamma=_gamma(features64, x), n_features=64, random_state=0)).fit_self(x)
    assert isinstance(inlier.head, LeaveOneOutKDEInlier)
    phi = math.sqrt(2.0) * torch.cos(rows @ inlier.head.features.omega.T + inlier.head.features.bias)
    loo_mean = (phi.sum(0, keepdim=True) - phi) / (phi.shape[0] - 1)
    assert torch.allclose(inlier.location_scores(x).reshape(-1), (phi * loo_mean).mean(1))
    assert bool(torch.isfinite(inlier.relevance(x, to_pixels=False).features).all())


def test_inactive_neurons_get_exactly_zero(kde64, features64, images):
    x = images[:3].double()
    fmap = kde64.features(x)
    inactive = fmap == 0
    assert 0 < int(inactive.sum()) < inactive.numel()
    assert bool((kde64.relevance(x, to_pixels=False).features[inactive] == 0).all())
    kmeans = DeepNeon(features64, KMeansMembership(n_clusters=2, n_init=1, random_state=0)).fit(images.double(),
                                                                                       progress=False)
    assert bool((kmeans.relevance(x, to_pixels=False).features[inactive] == 0).all())


def test_float32_close_to_float64(features, kde64, images):
    model32 = DeepNeon(features, copy.deepcopy(kde64.head).float())
    x = images[:1, :, :32, :32]  # one block-5 location: float64 convolutions are slow on CPUs
    relevance32 = explain(model32, x)
    relevance64 = explain(kde64, x.double())
    assert relevance64.dtype == torch.float64
    scale = relevance64.abs().max()
    assert torch.allclose(relevance32.double(), relevance64, atol=1e-3 * scale)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(features, images):
    model = DeepNeon(copy.deepcopy(features), KDEOutlier(gamma=_gamma(features, images))).fit(images,
                                                                                               progress=False)
    cpu = explain(model, images[:2])
    gpu = explain(model.to("cuda"), images[:2].cuda())
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, rtol=0, atol=1e-5 * cpu.abs().max())  # exact by default: no TF32


def test_fast_rules_are_the_default_and_match_zennit(features, features64, images):
    """DeepNeon's default (the fast rules) equals the reference path (Zennit's own rules, fast=False): 1e-5 relative in
    float32, 1e-9 in float64, for both named composites and all three heads."""
    gamma = _gamma(features, images)
    x = images[:2, :, :32, :32]  # the rules below block 5 are what differs; one location each is enough
    heads = [KDEOutlier(gamma=gamma), KDEInlier(gamma=gamma, n_features=64, random_state=0),
             KMeansMembership(n_clusters=2, n_init=1, random_state=0)]
    for feats, dtype, tolerance in ((features, torch.float32, 1e-5), (features64, torch.float64, 1e-9)):
        for head in heads:
            for composite in ("epsilon_gamma_box", "epsilon_plus_flat"):
                fast = DeepNeon(feats, copy.deepcopy(head), composite=composite).to(dtype).fit(images.to(dtype),
                                                                                                   progress=False)
                assert fast.fast
                reference = DeepNeon(feats, fast.head, composite=composite, fast=False)
                expected = explain(reference, x.to(dtype))
                got = explain(fast, x.to(dtype))
                assert expected.abs().max() > 0
                torch.testing.assert_close(got, expected, rtol=0, atol=tolerance * float(expected.abs().max()))
                assert_no_hooks(fast)


def test_explainer_reuses_its_hooks_and_equals_explain(features, images):
    gamma = _gamma(features, images)
    kde = DeepNeon(features, KDEOutlier(gamma=gamma, fused=True)).fit(images, progress=False)
    kmeans = DeepNeon(features, KMeansMembership(n_clusters=2, n_init=1, random_state=0), pool="positive").fit(
        images, progress=False)
    batches = (images[:2, :, :32, :32], images[2:5, :, :32, :32])
    for model in (kde, kmeans):
        expected = [explain(model, batch) for batch in batches]  # default target (k-means: the strongest cluster)
        scores = [model(batch).detach() for batch in batches]
        with model.explainer() as explainer:
            handles = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in explainer._work.modules())
            assert handles > 0  # on the explainer's private copy of the model
            assert_no_hooks(model)
            for batch, score, reference in zip(batches, scores, expected):
                output, relevance = explainer(batch)
                torch.testing.assert_close(output, score)
                torch.testing.assert_close(relevance, reference, rtol=0, atol=1e-5 * float(reference.abs().max()))
            with pytest.raises(ValueError, match="batch of images"):
                explainer(batch[0])
        assert_no_hooks(model)
        with pytest.raises(RuntimeError, match="closed"):
            explainer(batches[0])
    expected = explain(kmeans, batches[0], target=0)
    with kmeans.explainer() as explainer:  # an explicit attr_output picks the cluster
        output, relevance = explainer(batches[0], lambda out: out * torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(relevance, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


def test_state_dict_round_trip(features, images):
    gamma = _gamma(features, images)
    for head, fresh in [(KDEOutlier(gamma=gamma), KDEOutlier()),
                        (KMeansMembership(n_clusters=2, n_init=1, random_state=0), KMeansMembership())]:
        model = DeepNeon(features, head).fit(images, progress=False)
        loaded = DeepNeon(vgg16_features(), fresh)
        loaded.load_state_dict(model.state_dict())
        assert torch.equal(loaded(images[:2]), model(images[:2]))


# ---------------------------------------------------------------------------------------------------------------------
# fitting
def test_fit_from_dataloader_equals_tensor(features, images):
    from torch.utils.data import DataLoader, TensorDataset

    gamma = _gamma(features, images)
    from_tensor = DeepNeon(features, KDEOutlier(gamma=gamma)).fit(images, batch_size=2, progress=False)
    loader = DataLoader(TensorDataset(images, torch.arange(5)), batch_size=2)  # (images, labels) batches
    from_loader = DeepNeon(features, KDEOutlier(gamma=gamma)).fit(loader, progress=False)
    assert torch.equal(from_loader.head.support_, from_tensor.head.support_)
    plain = DeepNeon(features, KDEOutlier(gamma=gamma)).fit([images[:3], images[3:]], progress=False)
    # batching changes the convolutions' rounding only
    assert torch.allclose(plain.head.support_, from_tensor.head.support_, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="iterable"):
        DeepNeon(features, KDEOutlier(gamma=gamma)).fit(3)
    with pytest.raises(ValueError, match="no images"):
        DeepNeon(features, KDEOutlier(gamma=gamma)).fit([])


def test_max_locations_subsampling_is_seeded(features, images):
    gamma = _gamma(features, images)
    everything = DeepNeon(features, KDEOutlier(gamma=gamma)).fit(images, batch_size=2, progress=False).head.support_

    def sample(seed):
        model = DeepNeon(features, KDEOutlier(gamma=gamma))
        return model.fit(images, max_locations=7, seed=seed, batch_size=2, progress=False).head.support_

    first, again, other = sample(0), sample(0), sample(1)
    assert first.shape == (7, 512)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # a subset of the locations, without repetition
    nearest = (first[:, None, :] - everything[None, :, :]).abs().amax(-1)  # (7, 20) max-abs differences
    assert bool((nearest.amin(1) == 0).all())
    assert torch.unique(nearest.argmin(1)).numel() == 7


# ---------------------------------------------------------------------------------------------------------------------
# viz and CLI
def test_viz_saves_pngs(tmp_path, images):
    from PIL import Image

    relevance = torch.randn(3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    rgb = get_preprocessing("torchvision").inverse(images[0]).clamp(0, 1)
    colours = heatmap(relevance)
    assert colours.shape == (SIZE, SIZE, 3) and colours.dtype == np.uint8
    assert overlay(rgb, relevance).shape == (SIZE, SIZE, 3)
    for path in (save_heatmap(relevance, tmp_path / "h.png"), save_heatmap(relevance, tmp_path / "o.png", image=rgb)):
        with Image.open(path) as saved:
            assert saved.size == (SIZE, SIZE)
    heatmap_grid(rgb, {"outlier": relevance, "inlier": -relevance}, path=tmp_path / "grid.png", use_overlay=True)
    assert (tmp_path / "grid.png").stat().st_size > 1000


def _write_pngs(folder, shapes):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for index, shape in enumerate(shapes):
        path = folder / f"img{index}.png"
        Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_cli_explain_end_to_end(tmp_path, capsys):
    targets = _write_pngs(tmp_path / "in", [(64, 64, 3), (64, 72)])  # RGB and grey
    _write_pngs(tmp_path / "fit", [(64, 64, 3), (70, 64, 3)])
    out = tmp_path / "out"
    code = cli_main(["explain", targets[0], "--fit", str(tmp_path / "fit"), "--head", "kde-outlier", "--head", "kmeans",
                     "--clusters", "2", "--explain-clusters", "all", "--size", "64", "--out", str(out), "--quiet"])
    assert code == 0
    assert "RANDOM weights" in capsys.readouterr().err
    report = json.loads((out / "scores.json").read_text())
    assert report["settings"]["random_weights"] is True and report["settings"]["fit"].endswith("fit")
    assert len(report["images"]["img0"]["kmeans"]["scores"]) == 2
    for name in ("img0_kde-outlier.png", "img0_kmeans_c0.png", "img0_kmeans_c1.png", "img0_grid.png"):
        assert (out / name).is_file(), name

    code = cli_main(["explain", targets[1], "--fit-self", "--size", "64", "--out", str(tmp_path / "self"), "--quiet"])
    assert code == 0
    report = json.loads((tmp_path / "self" / "scores.json").read_text())
    assert report["settings"]["fit"] == "self" and report["images"]["img1"]["size"] == [64, 72]
    assert (tmp_path / "self" / "img1_kde-outlier.png").is_file()


def test_cli_explain_errors(tmp_path, capsys):
    good = _write_pngs(tmp_path, [(64, 64, 3)])[0]
    small = _write_pngs(tmp_path / "small", [(20, 64, 3)])[0]
    (tmp_path / "bad.png").write_text("no image")
    cases = [
        ([good, "--weights", str(tmp_path / "missing.pth")], "weights file not found"),
        ([str(tmp_path / "bad.png")], "Could not read"),
        ([small], "smaller than VGG-16's minimum"),
        ([str(tmp_path / "nothere.png")], "Image not found"),
        ([good, "--size", "64", "--head", "kmeans", "--clusters", "5"], "fewer than --clusters"),
        ([good, "--fit", str(tmp_path / "nodir")], "no such folder"),
    ]
    for argv, message in cases:
        assert cli_main(["explain", *argv, "--out", str(tmp_path / "out"), "--quiet"]) == 2, argv
        assert message.lower() in capsys.readouterr().err.lower(), argv


# ---------------------------------------------------------------------------------------------------------------------
# real weights (optional)
@pytest.mark.data
def test_real_vgg16_weights_on_a_tile():
    data = require_data("vgg16_imagenet_features/vgg16_features_keras_imagenet.pth",
                        "magnetic_tile_defects/MT_Blowhole/Imgs")
    weights = data / "vgg16_imagenet_features" / "vgg16_features_keras_imagenet.pth"
    tiles = data / "magnetic_tile_defects" / "MT_Blowhole" / "Imgs"
    if not any(tiles.glob("*.jpg")):
        pytest.skip("shared/data has no magnetic-tile images")
    features = vgg16_features(weights)
    caffe = get_preprocessing("caffe")
    x = caffe(load_image(sorted(tiles.glob("*.jpg"))[0], size=64)).unsqueeze(0)
    model = DeepNeon(features, KDEOutlier(gamma=1e-3), preprocessing="caffe", fast=True).fit_self(x)
    relevance = explain(model, x)
    assert relevance.shape == x.shape and bool(torch.isfinite(relevance).all())
    assert_no_hooks(model)


def test_bfloat16_autocast_keeps_the_head_in_float32(features, images):
    """Under autocast the VGG part runs in bfloat16 but the head's log-sum-exp stays in float32: the score and the
    heatmap stay close to float32 (approximate by design: a cosine similarity, not equality)."""
    model = DeepNeon(features, KDEOutlier(gamma=_gamma(features, images), fused=True)).fit(images, progress=False)
    x = images[:2]
    with model.explainer() as explainer:
        output32, relevance32 = explainer(x)
    with model.explainer(autocast_dtype=torch.bfloat16) as explainer:
        output16, relevance16 = explainer(x)
    assert output16.dtype == torch.float32 and bool(torch.isfinite(relevance16).all())
    torch.testing.assert_close(output16, output32, rtol=0.1, atol=0)
    cosine = torch.nn.functional.cosine_similarity(relevance16.flatten(1).float(), relevance32.flatten(1), dim=1)
    assert bool((cosine > 0.95).all()), cosine
    assert not torch.equal(relevance16.float(), relevance32)  # it did run in reduced precision
