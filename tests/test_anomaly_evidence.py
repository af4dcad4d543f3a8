"""Evidence for anomaly heatmaps: AUPIMO and PRO on hand-computed cases and against a replica of anomalib's recipe,
deletion/insertion with normal content on a model whose score is the sum of a known region, and relevance stopped at
a backbone layer (conservation there, shapes, equality with pixel relevance summed over each position's own pixels)."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from neon_attrib.anomaly import (
    PaDiM,
    PatchCore,
    aupimo,
    deletion_insertion,
    layer_relevance,
    nearest_normal,
    pixel_auroc,
    pro_auc,
)
from neon_attrib.evaluation.curves import blur_reference

# ---------------------------------------------------------------------------------------------------------------------
# AUPIMO and PRO
# ---------------------------------------------------------------------------------------------------------------------


def graded_case() -> tuple[np.ndarray, np.ndarray]:
    """One normal image of 1e5 pixels: 10 pixels at 0.1, 0.2, ..., 1.0, the rest 0, so the shared FPR at t = k/10 is
    (11 − k)·1e-5. One anomalous image whose 10 defect pixels are 0.05, 0.15, ..., 0.95: TPR(k/10) = (10 − k)/10."""
    maps = np.zeros((2, 250, 400))
    masks = np.zeros((2, 250, 400), bool)
    maps[0].flat[:10] = np.arange(1, 11) / 10
    masks[1, 0, :10] = True
    maps[1, 0, :10] = np.arange(10) / 10 + 0.05
    return maps, masks


def test_aupimo_hand_computed_graded_curve():
    maps, masks = graded_case()
    # in [1e-5, 1e-4] the FPR falls from (11 − k)e-5 to (10 − k)e-5 as t passes k/10 (k = 1..9), while the TPR stays
    # (10 − k)/10: the area on the log axis, over log(10)
    expected = sum((10 - k) / 10 * math.log((11 - k) / (10 - k)) for k in range(1, 10)) / math.log(10)
    result = aupimo(maps, masks)
    assert math.isnan(result[0])
    assert result[1] == pytest.approx(expected, abs=1e-12)


def test_aupimo_perfect_useless_and_half():
    maps, masks = graded_case()
    maps[1, 0, :10] = 2.0  # above every normal pixel: TPR 1 at every FPR
    assert aupimo(maps, masks)[1] == pytest.approx(1.0, abs=1e-12)
    maps[1, 0, :10] = 0.05  # flagged only where FPR > 1e-4
    assert aupimo(maps, masks)[1] == pytest.approx(0.0, abs=1e-9)
    maps[1, 0, :5] = 2.0  # half the defect: 0.5 everywhere
    assert aupimo(maps, masks)[1] == pytest.approx(0.5, abs=1e-9)


def test_aupimo_is_per_image_and_the_shared_fpr_is_a_mean_over_normal_images():
    maps, masks = graded_case()
    # a second normal image with no pixel above 0: the shared FPR halves, so (11 − k)·0.5e-5; a second anomalous image
    maps = np.concatenate([maps, np.zeros((2, 250, 400))])
    masks = np.concatenate([masks, masks[1:2], np.zeros((1, 250, 400), bool)])
    maps[2, 0, :10] = 2.0
    result = aupimo(maps, masks)
    assert np.isnan(result[[0, 3]]).all() and result[2] == pytest.approx(1.0)
    # now t = k/10 gives FPR (11 − k)·5e-6; passing t = 0 the FPR falls from 1 to 5e-5 with TPR 1 (all defect pixels
    # are > 0): [5e-5, 1e-4] at TPR 1, then the graded steps down to 1e-5 (k <= 8)
    log = math.log
    area = log(1e-4 / 5e-5)
    area += sum((10 - k) / 10 * log((11 - k) / (10 - k)) for k in range(1, 10) if (10 - k) * 5e-6 >= 1e-5)
    assert result[1] == pytest.approx(area / log(10), abs=1e-9)


def anomalib_recipe(maps: np.ndarray, masks: np.ndarray, thresholds: int = 300_000) -> np.ndarray:
    """anomalib's ``aupimo_scores`` written from its definition: linearly spaced thresholds from the maps' minimum to
    maximum, ``map >= t``, shared FPR = mean per-image FPR of the normal images, bounds at the thresholds whose FPR
    is closest to 1e-5 and 1e-4, zero FPRs dropped, trapezoid of TPR over log FPR, divided by log(10)."""
    t = np.linspace(maps.min(), maps.max(), thresholds)
    anomalous = masks.reshape(len(masks), -1).any(1)

    def rates(values):
        values = np.sort(values)
        return 1 - np.searchsorted(values, t, side="left") / values.size

    fpr = np.mean([rates(m.ravel()) for m in maps[~anomalous]], axis=0)
    upper, lower = np.argmin(np.abs(fpr - 1e-5)), np.argmin(np.abs(fpr - 1e-4))
    keep = slice(lower, upper + 1)
    out = np.full(len(maps), np.nan)
    for i in np.flatnonzero(anomalous):
        tpr = rates(maps[i][masks[i]])[keep][::-1]
        x = np.log(fpr[keep][::-1])
        finite = np.isfinite(x)
        out[i] = np.trapezoid(tpr[finite], x[finite]) / math.log(10)
    return out


def test_aupimo_agrees_with_anomalib_recipe_on_random_maps():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(6, 400, 400))  # 480 000 normal pixels: the recipe's bounds land close to 1e-5, 1e-4
    masks = np.zeros(maps.shape, bool)
    for i in range(3):
        masks[i, 50 + 10 * i:90, 40:100 + 20 * i] = True
        maps[i][masks[i]] += 3.5 + 0.5 * i  # defects partly above the normal tail
    ours, reference = aupimo(maps, masks), anomalib_recipe(maps, masks)
    assert np.isnan(ours[3:]).all()
    assert 0.05 < ours[0] < 0.95
    np.testing.assert_allclose(ours[:3], reference[:3], atol=0.015)


def test_aupimo_refuses_what_it_cannot_measure():
    maps, masks = graded_case()
    with pytest.raises(ValueError, match="normal images"):
        aupimo(maps[1:], masks[1:])
    with pytest.raises(ValueError, match="fpr_bounds"):
        aupimo(maps, masks, fpr_bounds=(1e-4, 1e-5))
    small, small_masks = np.zeros((2, 10, 10)), np.zeros((2, 10, 10), bool)
    small_masks[1, :2] = True
    small[0, 0, 0] = 1.0
    with pytest.raises(ValueError, match="lower bound"):  # 100 normal pixels reach FPR 1e-2 at best
        aupimo(small, small_masks)
    with pytest.raises(ValueError, match="NaN"):
        aupimo(np.where(masks, np.nan, maps), masks)


def test_pro_weighs_regions_alike_where_pixel_auroc_weighs_pixels():
    masks = np.zeros((1, 16, 16), bool)
    masks[0, 1:3, 1:3] = True    # region A: 4 pixels, found (above every normal pixel)
    masks[0, 8:14, 8:14] = True  # region B: 36 pixels, missed (below every normal pixel)
    maps = np.full((1, 16, 16), 0.5)
    maps[0, 1:3, 1:3] = 1.0
    maps[0, 8:14, 8:14] = 0.0
    # PRO is 1/2 at every FPR (A covered, B not) until every pixel is flagged
    assert pro_auc(maps, masks) == pytest.approx(0.5, abs=1e-9)
    assert pixel_auroc(maps, masks) == pytest.approx(4 / 40, abs=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# deletion / insertion with normal content
# ---------------------------------------------------------------------------------------------------------------------


class RegionSum(nn.Module):
    """Score = the sum of the pixels of a known region (rows 0–3, columns 0–3 of an 8x8 image)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :4, :4].sum((1, 2, 3))


def test_deletion_insertion_on_a_region_sum():
    x = torch.ones(2, 1, 8, 8, dtype=torch.float64)
    normal = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    good = torch.zeros(8, 8, dtype=torch.float64)
    good[:4, :4] = 1.0 + torch.arange(16, dtype=torch.float64).reshape(4, 4) / 100  # the region first
    bad = -good  # the region last
    quarters = [0, 0.25, 0.5, 0.75, 1]
    result = deletion_insertion(RegionSum(), x, torch.stack([good, bad]), nearest_normal(x, normal),
                                fractions=quarters, batch_size=3)
    # 64 pixels, 16 per step: the good ranking removes the whole region in the first step
    assert result.deletion[0].tolist() == [16.0, 0.0, 0.0, 0.0, 0.0]
    assert result.insertion[0].tolist() == [0.0, 16.0, 16.0, 16.0, 16.0]
    # the bad ranking keeps it to the end (ties in pixel order: the region's rows start at pixel 0 but rank last)
    assert result.deletion[1].tolist() == [16.0, 16.0, 16.0, 16.0, 0.0]
    assert result.insertion[1].tolist() == [0.0, 0.0, 0.0, 0.0, 16.0]
    assert result.input_score.tolist() == [16.0, 16.0] and result.reference_score.tolist() == [0.0, 0.0]
    # by hand, trapezoid over the quarters: insertion − deletion = −16, 16, 16, 16, 16 → (0 + 3·16)/4 = 12
    assert result.abpc.tolist() == pytest.approx([12.0, -12.0])
    assert result.normalized_abpc.tolist() == pytest.approx([0.75, -0.75])
    assert result.mean_normalized_abpc == pytest.approx(0.0)


class ImageSum(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum((1, 2, 3))


def test_abpc_of_an_additive_score_depends_on_the_shares_only():
    # every pixel counts alike: deletion (1 − s)·f, insertion s·f, so the normalised ABPC is the mean of 2s − 1 over
    # the shares, whatever the ranking: 0 up to 1, s_max − 1 up to s_max
    x = torch.ones(3, 2, 8, 8, dtype=torch.float64)
    heat = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    full = deletion_insertion(ImageSum(), x, heat, 0.0, fractions=np.linspace(0, 1, 9))
    early = deletion_insertion(ImageSum(), x, heat, 0.0, fractions=np.linspace(0, 0.25, 9))
    np.testing.assert_allclose(full.normalized_abpc.numpy(), 0.0, atol=1e-12)
    np.testing.assert_allclose(early.normalized_abpc.numpy(), 0.25 - 1, atol=1e-12)
    assert early.mean_normalized_abpc == pytest.approx(-0.75)


def test_deletion_insertion_patches_channels_and_references():
    x = torch.ones(1, 3, 8, 8, dtype=torch.float64)
    heat = torch.zeros(1, 3, 8, 8, dtype=torch.float64)
    heat[0, 1, 0, 0] = 1.0  # one pixel of one channel: with patch=4 the whole top-left patch goes first
    result = deletion_insertion(RegionSum(), x, heat, 0.0, fractions=[0, 0.25, 0.5], patch=4)
    assert result.deletion[0].tolist() == [48.0, 0.0, 0.0]
    # shares up to a quarter, pixels row by row: row 0 by 1/8 (4 region pixels of 16), rows 0–1 by 1/4 (8 of 16)
    early = deletion_insertion(RegionSum(), x, -torch.arange(64.0).reshape(1, 8, 8), 0.0, fractions=[0, 0.125, 0.25])
    assert early.deletion[0].tolist() == [48.0, 36.0, 24.0]
    blurred = deletion_insertion(RegionSum(), x, heat, blur_reference(1.0))  # a blur of ones is ones
    assert torch.allclose(blurred.deletion, torch.full((1, 17), 48.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="fractions"):
        deletion_insertion(RegionSum(), x, heat, 0.0, fractions=[0.1, 0.2])
    with pytest.raises(ValueError, match="heatmaps"):
        deletion_insertion(RegionSum(), x, torch.zeros(1, 4, 4), 0.0)
    with pytest.raises(ValueError, match="NaN"):
        deletion_insertion(RegionSum(), x, torch.full((1, 8, 8), math.nan), 0.0)


def test_nearest_normal_is_aligned_and_checks_shapes():
    normal = torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4), torch.full((1, 4, 4), 5.0)])
    images = torch.stack([torch.full((1, 4, 4), 0.4), torch.full((1, 4, 4), 3.5)])
    assert nearest_normal(images, normal)[:, 0, 0, 0].tolist() == [0.0, 5.0]
    with pytest.raises(ValueError, match="normal images"):
        nearest_normal(images, torch.zeros(2, 1, 4, 5))


# ---------------------------------------------------------------------------------------------------------------------
# relevance stopped at a backbone layer
# ---------------------------------------------------------------------------------------------------------------------


def bias_free_backbone() -> nn.Sequential:
    """A 1x1 convolution (each pixel's own), a 2x2 average pool (each position's own 2x2 pixels), then 3x3
    convolutions; no biases, so every rule conserves."""
    torch.manual_seed(0)
    network = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, 4, 1, bias=False), relu1=nn.ReLU(), pool1=nn.AvgPool2d(2),
        conv2=nn.Conv2d(4, 6, 3, padding=1, bias=False), relu2=nn.ReLU(),
        conv3=nn.Conv2d(6, 8, 3, padding=1, bias=False), relu3=nn.ReLU(), pool3=nn.MaxPool2d(2),
    ))
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.abs_()  # positive weights: every ReLU active, no relevance lost at dead units
    return network.double().eval()


def inputs(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1


@pytest.fixture(scope="module")
def detectors():
    fit = inputs(6, 1)
    patchcore = PatchCore(bias_free_backbone(), ["relu2", "relu3"], coreset_ratio=1.0, seed=0).double().fit(
        fit, progress=False)
    padim = PaDiM(bias_free_backbone(), ["relu2", "relu3"], n_channels=8, seed=0).double().fit(fit, progress=False)
    return {"patchcore": patchcore, "padim": padim}


@pytest.mark.parametrize("kind", ["patchcore", "padim"])
@pytest.mark.parametrize("target", ["max", "sum"])
def test_layer_relevance_is_the_pixel_relevance_summed_over_each_positions_pixels(detectors, kind, target):
    model, x = detectors[kind], inputs(3, 2)
    full = model.relevance(x, target)
    result = layer_relevance(model, x, "pool1", target)
    assert result.relevance.shape == (3, 4, 8, 8) and result.map.shape == (3, 16, 16)
    torch.testing.assert_close(result.output, full.output)
    # conservation at the layer: everything the feature map received (the taps' z-rule and the convolutions conserve,
    # up to the rules' stabilisers, 1e-6 of a denominator each)
    torch.testing.assert_close(result.relevance.sum((1, 2, 3)), full.features.sum((1, 2, 3)), rtol=1e-4, atol=1e-9)
    # below it, 1x1 convolution and 2x2 pool: a position's relevance is its 2x2 pixels' (over colour channels)
    blocks = full.pixels.sum(1).reshape(3, 8, 2, 8, 2).sum((2, 4))
    torch.testing.assert_close(result.relevance.sum(1), blocks, rtol=1e-4, atol=1e-5 * float(blocks.abs().max()))
    nearest = layer_relevance(model, x, "pool1", target, mode="nearest")
    torch.testing.assert_close(nearest.map.sum((1, 2)), result.relevance.sum((1, 2, 3)))
    torch.testing.assert_close(nearest.map[:, ::2, ::2] * 4, result.relevance.sum(1))


def test_layer_relevance_refuses_layers_it_cannot_stop_at(detectors):
    model, x = detectors["padim"], inputs(1, 3)
    with pytest.raises(ValueError, match="not a module"):
        layer_relevance(model, x, "conv9")
    with pytest.raises(ValueError, match="did not run"):
        layer_relevance(model, x, "pool3")  # after the last tap: the backbone stops before it
    with pytest.raises(ValueError, match="mode"):
        layer_relevance(model, x, "pool1", mode="cubic")


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.inner(x)) + x


def test_layer_relevance_refuses_a_layer_the_score_bypasses():
    from neon_attrib.vision import backbone as _unused  # noqa: F401  (keeps the vision registry loaded)

    torch.manual_seed(0)
    network = nn.Sequential(OrderedDict(stem=nn.Conv2d(3, 4, 3, padding=1, bias=False), relu=nn.ReLU(),
                                        block=Residual(), out=nn.ReLU())).double().eval()
    model = PatchCore(network, ["out"], coreset_ratio=1.0, seed=0).double().fit(inputs(3, 4), progress=False)
    with pytest.raises(ValueError, match="skip connection"):
        layer_relevance(model, inputs(1, 5), "block.inner")
    assert layer_relevance(model, inputs(1, 5), "relu").relevance.shape == (1, 4, 16, 16)


@pytest.mark.parametrize("name", ["neon_attrib.anomaly.faithfulness", "neon_attrib.anomaly.resolution"])
def test_docstring_examples(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), extraglobs={"np": np, "torch": torch},
                             optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_the_command_line_default_target_is_the_benchmarks_recommendation():
    import json
    from pathlib import Path

    from neon_attrib.cli.main import build_parser

    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "anomaly_evidence.json"
    recommended = {report["recommendation"]["where_is_the_defect"].split("_")[1]
                   for report in json.loads(results.read_text())["detectors"].values()}
    recommended |= {report["recommendation"]["why_this_score"].split("_")[1]
                    for report in json.loads(results.read_text())["detectors"].values()}
    default = build_parser().parse_args(["detect", "image.png", "--fit", "normal"]).target
    assert recommended == {default}
