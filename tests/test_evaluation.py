"""Deletion / insertion curves: known answers on hand-made scores, references, feature groups and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from neon_attrib import KDEOutlier, KMeansMembership, explain
from neon_attrib.evaluation.curves import (
    FlipCurve,
    blur_reference,
    channel_mean_reference,
    default_reference,
    deletion_curve,
    flip_curve,
    insertion_curve,
    median_reference,
    model_score,
    nearest_reference,
    patch_mask,
)


class FirstSquared(nn.Module):
    """A score fully determined by feature 0: ``x_0²``."""

    def forward(self, x):
        return x[:, 0] ** 2


class Linear(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.register_buffer("weight", torch.as_tensor(weight, dtype=torch.float64))

    def forward(self, x):
        return x @ self.weight


X1 = torch.tensor([[3.0, 1.0, 1.0]], dtype=torch.float64)


def test_deletion_known_answer_relevant_feature_first():
    curve = deletion_curve(FirstSquared(), X1, torch.tensor([[1.0, 0.0, 0.0]]), reference=0.0)
    np.testing.assert_allclose(curve.fractions, [0, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(curve.scores, [[9, 0, 0, 0]])
    np.testing.assert_allclose(curve.area, [1.5])  # trapezoid: 9 · (1/3) / 2
    np.testing.assert_allclose(curve.normalized_area, [1 / 6])
    assert curve.input_score.item() == 9 and curve.reference_score.item() == 0


def test_deletion_known_answer_relevant_feature_last():
    curve = deletion_curve(FirstSquared(), X1, torch.tensor([[0.0, 2.0, 1.0]]), reference=0.0)
    np.testing.assert_allclose(curve.scores, [[9, 9, 9, 0]])
    np.testing.assert_allclose(curve.normalized_area, [5 / 6])
    lerf = deletion_curve(FirstSquared(), X1, torch.tensor([[1.0, 0.0, 0.0]]), reference=0.0,
                          order="least_relevant_first")
    np.testing.assert_allclose(lerf.scores, [[9, 9, 9, 0]])


def test_insertion_known_answer():
    curve = insertion_curve(FirstSquared(), X1, torch.tensor([[1.0, 0.0, 0.0]]), reference=0.0)
    np.testing.assert_allclose(curve.scores, [[0, 9, 9, 9]])
    np.testing.assert_allclose(curve.normalized_area, [5 / 6])
    assert curve.input_score.item() == 9 and curve.reference_score.item() == 0


def test_reference_is_used_not_zero():
    reference = torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64)
    curve = deletion_curve(FirstSquared(), X1, torch.tensor([[1.0, 0.0, 0.0]]), reference=reference)
    np.testing.assert_allclose(curve.scores, [[9, 4, 4, 4]])


def test_exact_contributions_order_beats_random_and_reverse(rng):
    weight = rng.normal(size=8)
    x = torch.as_tensor(rng.normal(size=(20, 8)))
    model = Linear(weight)
    relevance = x * torch.as_tensor(weight)  # exact contributions w_i x_i for the reference 0
    areas = {order: deletion_curve(model, x, relevance, reference=0.0, order=order).area.mean().item()
             for order in ("most_relevant_first", "random", "least_relevant_first")}
    assert areas["most_relevant_first"] < areas["random"] < areas["least_relevant_first"]
    # with exact contributions, removing the k largest gives the lowest score any k removals can reach
    morf = deletion_curve(model, x, relevance, reference=0.0)
    for seed in range(3):
        other = deletion_curve(model, x, relevance, reference=0.0, order="random", seed=seed)
        assert bool((morf.scores <= other.scores + 1e-12).all())


def test_neon_ranks_the_deciding_feature_first(rng):
    """An outlier that differs from the data in feature 2 only: NEON names it, and deleting it removes the anomaly."""
    data = rng.normal(size=(200, 4))
    model = KDEOutlier(gamma=0.5).double().fit(data)
    x = torch.tensor([[0.0, 0.0, 6.0, 0.0]], dtype=torch.float64)
    relevance = explain(model, x)
    assert int(relevance.argmax()) == 2
    curve = deletion_curve(model, x, relevance)  # default reference: the training median
    span = curve.input_score[0] - curve.reference_score[0]
    assert span > 10  # a clear outlier
    assert curve.scores[0, 1] - curve.reference_score[0] < 0.05 * span  # one deletion removes the anomaly
    assert curve.normalized_area.item() < 0.2


def test_random_order_is_seeded(rng):
    x = torch.as_tensor(rng.normal(size=(5, 6)))
    model = Linear(rng.normal(size=6))
    zeros = torch.zeros_like(x)
    a = flip_curve(model, x, zeros, order="random", reference=0.0, seed=3)
    b = flip_curve(model, x, zeros, order="random", reference=0.0, seed=3)
    c = flip_curve(model, x, zeros, order="random", reference=0.0, seed=4)
    assert torch.equal(a.scores, b.scores) and not torch.equal(a.scores, c.scores)


def test_feature_groups_and_steps():
    x = torch.arange(2 * 2 * 8 * 8, dtype=torch.float64).reshape(2, 2, 8, 8)

    class Total(nn.Module):
        def forward(self, images):
            return images.sum((1, 2, 3))

    mask = patch_mask((2, 8, 8), 4)
    assert mask.shape == (1, 8, 8) and int(mask.max()) == 3
    curve = deletion_curve(Total(), x, x.clone(), reference=0.0, feature_mask=mask)
    assert curve.scores.shape == (2, 5)
    # the patch with the largest sum goes first: the bottom-right one
    first_drop = curve.scores[0, 0] - curve.scores[0, 1]
    assert first_drop.item() == x[0, :, 4:, 4:].sum().item()
    many = deletion_curve(Total(), x, x.clone(), reference=0.0)  # 128 single elements → 50 steps
    assert many.scores.shape == (2, 51)
    assert many.fractions[0] == 0 and many.fractions[-1] == 1
    assert deletion_curve(Total(), x, x.clone(), reference=0.0, n_steps=8).scores.shape == (2, 9)


def test_feature_mask_with_gaps_counts_its_groups_only():
    x = torch.tensor([[1.0, 2.0, 4.0, 8.0]], dtype=torch.float64)
    total = Linear([1.0, 1.0, 1.0, 1.0])
    compact = deletion_curve(total, x, x.clone(), reference=0.0, feature_mask=torch.tensor([0, 0, 1, 1]))
    gaps = deletion_curve(total, x, x.clone(), reference=0.0, feature_mask=torch.tensor([3, 3, 17, 17]))
    assert gaps.fractions.tolist() == compact.fractions.tolist() == [0.0, 0.5, 1.0]
    torch.testing.assert_close(gaps.scores, compact.scores)
    assert gaps.mean_normalized_area == compact.mean_normalized_area
    x2 = torch.cat([x, x])
    with pytest.raises(ValueError, match="example 1 has 1 of the 2 feature groups"):
        deletion_curve(total, x2, x2.clone(), reference=0.0, feature_mask=torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]]))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_curves_refuse_non_finite_relevance(value):
    relevance = torch.tensor([[0.1, value, 0.2]], dtype=torch.float64)
    with pytest.raises(ValueError, match="relevance has 1 non-finite value"):
        deletion_curve(FirstSquared(), X1, relevance, reference=0.0)


def test_curves_refuse_complex_relevance():
    relevance = torch.tensor([[0.1 + 5j, 0.5 + 0j, 0.2 - 1j]])
    for value in (relevance, relevance.numpy()):
        with pytest.raises(ValueError, match="relevance must be real"):
            insertion_curve(FirstSquared(), X1, value, reference=0.0)


def test_mean_normalized_area_weights_examples_by_span():
    scores = torch.tensor([[10.0, 0.0, 0.0], [1.0, 3.0, 0.999]], dtype=torch.float64)
    curve = FlipCurve(fractions=torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64), scores=scores, mode="deletion",
                      order="most_relevant_first")
    per_example = curve.normalized_area
    assert per_example[0].item() == pytest.approx(0.25)
    assert per_example[1].item() > 100  # an example scored like its reference: an unstable ratio
    assert 0.25 < curve.mean_normalized_area < 0.5
    flat = FlipCurve(fractions=curve.fractions, scores=torch.ones(1, 3, dtype=torch.float64), mode="deletion",
                     order="random")
    assert math.isnan(flat.normalized_area.item()) and math.isnan(flat.mean_normalized_area)


def test_references(blobs):
    np.testing.assert_allclose(median_reference(blobs), np.median(blobs, axis=0))
    model = KDEOutlier(gamma=1.0).double().fit(blobs)
    x = torch.as_tensor(blobs[:3])
    np.testing.assert_allclose(default_reference(model, x), np.median(blobs, axis=0))
    with pytest.raises(ValueError, match="median_reference"):
        default_reference(KMeansMembership(n_clusters=3, random_state=0).double().fit(blobs), x)
    images = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    blurred = default_reference(model, images)
    assert blurred.shape == images.shape and blurred.std() < images.std()
    constant = torch.full((1, 3, 16, 16), 0.3, dtype=torch.float64)
    torch.testing.assert_close(blur_reference(sigma=2.0)(constant), constant)
    flat = channel_mean_reference(images)
    torch.testing.assert_close(flat[:, :, 5, 7], images.mean((2, 3)))
    with pytest.raises(ValueError, match="sigma"):
        blur_reference(sigma=0)
    nearest = nearest_reference(blobs)(x + 0.01)
    torch.testing.assert_close(nearest, x)  # each input's nearest training row
    with pytest.raises(ValueError, match="No default reference"):
        default_reference(model, torch.zeros(2, 3, 4))


def test_model_score_follows_explain_targets(blobs):
    model = KMeansMembership(n_clusters=3, random_state=0).double().fit(blobs)
    x = torch.as_tensor(blobs[::10])
    output = model(x)
    torch.testing.assert_close(model_score(model, x), output.amax(1))
    torch.testing.assert_close(model_score(model, x, 1), output[:, 1])
    kde = KDEOutlier(gamma=1.0).double().fit(blobs)
    torch.testing.assert_close(model_score(kde, x), kde(x))


def test_errors():
    model = FirstSquared()
    with pytest.raises(ValueError, match="shape"):
        deletion_curve(model, X1, torch.zeros(1, 2), reference=0.0)
    with pytest.raises(ValueError, match="mode"):
        flip_curve(model, X1, torch.zeros(1, 3), mode="both", reference=0.0)
    with pytest.raises(ValueError, match="order"):
        flip_curve(model, X1, torch.zeros(1, 3), order="best", reference=0.0)
    with pytest.raises(TypeError, match="integer"):
        deletion_curve(model, X1, torch.zeros(1, 3), reference=0.0, feature_mask=torch.zeros(3))
    with pytest.raises(ValueError, match="broadcast"):
        deletion_curve(model, X1, torch.zeros(1, 3), reference=torch.zeros(2))
    with pytest.raises(ValueError, match="n_steps"):
        deletion_curve(model, X1, torch.zeros(1, 3), reference=0.0, n_steps=0)
    with pytest.raises(ValueError, match="patch"):
        patch_mask((3, 4, 4), 0)
