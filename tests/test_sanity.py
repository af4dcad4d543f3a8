"""The model-randomisation sanity check (Adebayo et al., 2018) and its similarity measures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neon_attrib import KDEOutlier
from neon_attrib.evaluation.sanity import model_randomization, spearman, ssim
from neon_attrib.vision.deep import DeepNeon


def test_similarities_of_known_pairs():
    a = torch.rand(3, 12, 12, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(spearman(a, 2 * a + 1), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(spearman(a, -a), -torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(ssim(a, 3 * a), torch.ones(3, dtype=torch.float64))  # SSIM of unit-scaled maps
    noise = torch.rand(3, 12, 12, generator=torch.Generator().manual_seed(1))
    assert bool((ssim(a, noise) < 0.5).all()) and bool((spearman(a, noise).abs() < 0.5).all())
    assert torch.equal(spearman(torch.zeros(1, 4), torch.rand(1, 4)), torch.zeros(1, dtype=torch.float64))


def test_randomization_cascade_leaves_the_model_alone():
    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1),
                             nn.ReLU()).double().eval()
    images = torch.rand(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    model = DeepNeon(features, KDEOutlier(gamma=0.5), low=0.0, high=1.0).fit(images, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    result = model_randomization(model, images, refit="self", keep_heatmaps=True)
    assert result.layers == ["none", "2", "0"]
    assert result.spearman.shape == (3, 2) and len(result.heatmaps) == 3
    torch.testing.assert_close(result.spearman[0], torch.ones(2, dtype=torch.float64))
    assert bool((result.spearman[-1] < 0.99).all())  # randomising every layer changes the heatmaps
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)
    assert [row["layer"] for row in result.summary()] == result.layers
    with pytest.raises(ValueError, match="not layers with weights"):
        model_randomization(model, images, layers=["1"])
    with pytest.raises(ValueError, match="'features'"):
        model_randomization(KDEOutlier(), images)
