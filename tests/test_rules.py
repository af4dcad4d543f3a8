"""Each rule equals a naive float64 re-implementation of SPEC's formula; conservation where the maths promises it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_no_hooks
from hypothesis import given, settings
from hypothesis import strategies as st
from zennit.attribution import Gradient
from zennit.composites import EpsilonPlusFlat

from neon_attrib import (
    CosineShareRule,
    KDEInlier,
    KDEInlierActivationRule,
    KDEOutlier,
    KDEOutlierActivationRule,
    KMeansActivationRule,
    KMeansMembership,
    NeonComposite,
    ProportionalRule,
    SoftArgminRule,
    SquaredDifferenceRule,
    WeightShareRule,
    attribution_output,
    explain,
)


def softmin(h: np.ndarray, beta: float) -> np.ndarray:
    z = -beta * h
    z = z - z.max(-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


# -- naive references, written from SPEC with explicit sums ---------------------------------------------------------
def naive_kde_outlier(x, support, gamma, beta, eps):
    out = []
    for xn in x:
        h = np.array([((xn - u) ** 2).sum() for u in support])
        o = -np.log(np.mean(np.exp(-gamma * h))) / gamma
        r_k = softmin(h, beta) * o
        out.append([sum((xn[i] - u[i]) ** 2 / (eps + hk) * rk for u, hk, rk in zip(support, h, r_k))
                    for i in range(len(xn))])
    return np.array(out)


def naive_kde_inlier(x, model):
    omega, bias, mean = (t.numpy() for t in (model.features.omega, model.features.bias, model.features.mean))
    n_feat = len(bias)
    out = []
    for xn in x:
        h = np.sqrt(2) * np.cos(omega @ xn + bias) * mean
        r_j = h / n_feat
        out.append([sum(omega[j, i] ** 2 / (omega[j] ** 2).sum() * r_j[j] for j in range(n_feat))
                    for i in range(len(xn))])
    return np.array(out)


def naive_kmeans(x, centres, target, beta):
    k = len(centres)
    out = []
    for xn, c in zip(x, target):
        others = [j for j in range(k) if j != c]
        w = [2 * (centres[c] - centres[j]) for j in others]
        b = [(centres[j] ** 2).sum() - (centres[c] ** 2).sum() for j in others]
        h = np.array([wk @ xn + bk for wk, bk in zip(w, b)])
        r_k = softmin(h, beta) * h.min()
        out.append([sum(wk[i] ** 2 / (wk**2).sum() * rk for wk, rk in zip(w, r_k)) for i in range(len(xn))])
    return np.array(out)


def test_kde_outlier_input_rules_match_naive(rng):
    support = rng.normal(size=(30, 3))
    x = rng.normal(size=(6, 3)) * 2
    model = KDEOutlier(gamma=0.7, beta=1.3, eps=0.05).double().fit(support)
    np.testing.assert_allclose(explain(model, x).numpy(), naive_kde_outlier(x, support, 0.7, 1.3, 0.05),
                               rtol=1e-10)
    # defaults: beta = gamma, eps = 0.01 / gamma
    default = KDEOutlier(gamma=0.7).double().fit(support)
    np.testing.assert_allclose(explain(default, x).numpy(), naive_kde_outlier(x, support, 0.7, 0.7, 0.01 / 0.7),
                               rtol=1e-10)


def test_kde_outlier_expansion_path_matches_direct(rng):
    """Large batches switch the squared-difference rule to matrix products; same numbers."""
    support = rng.normal(size=(3000, 40))
    x = rng.normal(size=(40, 40))
    model = KDEOutlier(gamma=0.02).double().fit(support)
    big = explain(model, x)  # 40 · 3000 · 40 > 2^22: expansion
    direct = torch.cat([explain(model, x[i:i + 1]) for i in range(3)])  # 1 · 3000 · 40 < 2^22: direct
    np.testing.assert_allclose(big[:3].numpy(), direct.numpy(), rtol=1e-8, atol=1e-10)


def test_kde_inlier_input_rules_match_naive_and_conserve(rng):
    support = rng.normal(size=(25, 3))
    x = rng.normal(size=(5, 3))
    model = KDEInlier(gamma=0.5, n_features=200, random_state=0).double().fit(support)
    relevance, output = explain(model, x, return_output=True)
    np.testing.assert_allclose(relevance.numpy(), naive_kde_inlier(x, model), rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(relevance.sum(1).numpy(), output.numpy(), rtol=1e-12, atol=1e-15)


def test_kmeans_input_rules_match_naive_and_conserve(rng, blobs):
    model = KMeansMembership(n_clusters=3, random_state=0, beta=0.8).double().fit(blobs)
    x = rng.normal(size=(10, 4)) * 3
    target = model.predict(x).numpy()
    relevance, output = explain(model, x, return_output=True)
    np.testing.assert_allclose(relevance.numpy(), naive_kmeans(x, model.cluster_centers_.numpy(), target, 0.8),
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(relevance.sum(1).numpy(), output.amax(1).numpy(), rtol=1e-12)
    # explicit targets, any integer or integral float dtype
    for target in (np.array([2] * 10), torch.full((10,), 2.0), 2, np.int32(2)):
        rel = explain(model, x, target=target)
        np.testing.assert_allclose(rel.sum(1).numpy(), output[:, 2].numpy(), rtol=1e-12)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), gamma=st.floats(0.05, 5.0), d=st.integers(1, 6), n=st.integers(1, 40))
def test_kde_relevance_sums_to_score_as_eps_vanishes(seed, gamma, d, n):
    rng = np.random.default_rng(seed)
    support = rng.normal(size=(n, d))
    x = rng.normal(size=(3, d)) * 2
    model = KDEOutlier(gamma=gamma).double().fit(support)
    score = model(x)
    previous = None
    for eps in (1.0, 1e-2, 1e-4, 0.0):
        total = explain(model, x, eps=eps).sum(1)
        assert bool((total <= score * (1 + 1e-9) + 1e-12).all())  # dissipation only removes relevance
        if previous is not None:
            assert bool((total >= previous - 1e-9).all())  # smaller eps, less dissipated
        previous = total
    np.testing.assert_allclose(previous.numpy(), score.numpy(), rtol=1e-9, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(2, 6), d=st.integers(1, 5), beta=st.floats(0.01, 10.0))
def test_kmeans_and_random_features_conserve_exactly(seed, k, d, beta):
    rng = np.random.default_rng(seed)
    data = rng.normal(size=(max(k, 12), d))
    x = rng.normal(size=(4, d)) * 2
    kmeans = KMeansMembership(n_clusters=k, n_init=1, random_state=0).double().fit(data)
    for target in range(k):
        rel = explain(kmeans, x, target=target, beta=beta)
        np.testing.assert_allclose(rel.sum(1).numpy(), kmeans(x)[:, target].numpy(), rtol=1e-10, atol=1e-10)
    inlier = KDEInlier(gamma=beta, n_features=64, random_state=seed).double().fit(data)
    rel, out = explain(inlier, x, return_output=True)
    np.testing.assert_allclose(rel.sum(1).numpy(), out.numpy(), rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("make", [
    lambda X: KDEOutlier(gamma=0.5).double().fit(X),
    lambda X: KDEInlier(gamma=0.5, n_features=128, random_state=0).double().fit(X),
    lambda X: KMeansMembership(n_clusters=3, random_state=0).double().fit(X),
])
def test_explain_equals_zennit_gradient_with_composite(make, blobs):
    model = make(blobs)
    x = torch.as_tensor(blobs[:7]).clone().requires_grad_()
    relevance = explain(model, x.detach())
    with torch.no_grad():
        out = model(x)
    target = out.argmax(-1) if out.ndim > 1 else None
    with Gradient(model, NeonComposite()) as attributor:
        _, expected = attributor(x, attribution_output(out, target))
    assert torch.equal(relevance, expected)
    again = explain(model, x.detach())
    assert torch.equal(again, relevance)  # the same input twice gives the identical result
    assert_no_hooks(model)
    assert model(x).requires_grad  # a plain forward afterwards is a plain forward


def test_copy_keeps_hyperparameters():
    assert SoftArgminRule(beta=3.0).copy().beta == 3.0
    assert SquaredDifferenceRule(eps=0.25).copy().eps == 0.25
    assert KDEOutlierActivationRule(beta=2.0).copy().beta == 2.0
    assert KDEInlierActivationRule(eps=0.3).copy().eps == 0.3
    assert KMeansActivationRule(beta=4.0).copy().beta == 4.0
    for rule in (ProportionalRule(), CosineShareRule(), WeightShareRule()):
        assert type(rule.copy()) is type(rule)
    with pytest.raises(ValueError, match="'beta' parameter of SoftArgminRule"):
        SoftArgminRule(beta=-1.0)
    with pytest.raises(ValueError, match="'mode' parameter of NeonComposite"):
        NeonComposite(mode="pixels")


def test_explain_bad_targets_and_inputs(blobs):
    model = KMeansMembership(n_clusters=3, random_state=0).double().fit(blobs)
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        explain(model, blobs[:2], target=3)
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        explain(model, blobs[:2], target=-1)
    with pytest.raises(TypeError, match="integer class indices"):
        explain(model, blobs[:2], target=1.5)
    with pytest.raises(ValueError, match="one index or one per sample"):
        explain(model, blobs[:2], target=[0, 1, 2])
    with pytest.raises(ValueError, match="not fitted"):
        explain(KDEOutlier(), blobs[:2])
    with pytest.raises(ValueError, match="X has 2 features|x has 2 features"):
        explain(model, blobs[:2, :2])
    assert_no_hooks(model)


def test_composite_sits_beside_zennit_composite(rng):
    """A linear encoder (Zennit's rules) under a KDE head (ours): one composite, one backward pass."""
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU()).double()
    data = rng.normal(size=(40, 5))
    with torch.no_grad():
        codes = encoder(torch.as_tensor(data))
    head = KDEOutlier(gamma=0.5).double().fit(codes)
    model = torch.nn.Sequential(encoder, head)
    composite = NeonComposite(base=EpsilonPlusFlat())
    relevance = explain(model, data[:3], composite=composite)
    assert relevance.shape == (3, 5)
    # the head's relevance at the code equals explaining the head alone; the encoder's first layer is Flat
    head_rel = explain(head, codes[:3])
    assert float(head_rel.sum()) == pytest.approx(float(relevance.sum()), rel=1e-6)
    assert_no_hooks(model)


# -- activation rules (heads on non-negative CNN activations), naive SPEC formulas -----------------------------------
def naive_outlier_activation(a, support, gamma, beta):
    out = []
    for an in a:
        h = np.array([((an - u) ** 2).sum() for u in support])
        o = -np.log(np.mean(np.exp(-gamma * h))) / gamma
        p = softmin(h, beta)
        r_dot = [pk * an @ (an - u) for pk, u in zip(p, support)]
        r_res = [pk * (u @ (u - an) - np.log(np.mean(np.exp(-gamma * (h - hk)))) / gamma)
                 for pk, u, hk in zip(p, support, h)]
        assert np.isclose(sum(r_dot) + sum(r_res), o)  # the split is exact
        out.append([sum(an[i] * (an[i] - u[i]) / (an @ (an - u)) * rd for u, rd in zip(support, r_dot))
                    for i in range(len(an))])
    return np.array(out)


def naive_inlier_activation(a, model, eps):
    omega, bias, mean = (t.numpy() for t in (model.features.omega, model.features.bias, model.features.mean))
    n_feat = len(bias)
    c = np.sqrt(2) * mean / n_feat
    out = []
    for an in a:
        z = omega @ an
        r_sin = -np.sin(z) * np.sin(bias) * c
        r_cos = np.cos(z) * np.cos(bias) * c
        eps_j = np.where(z >= 0, eps, -eps)
        out.append([sum(an[i] * omega[j, i] / z[j] * r_sin[j] + an[i] * omega[j, i] / (eps_j[j] + z[j]) * r_cos[j]
                        for j in range(n_feat)) for i in range(len(an))])
    return np.array(out)


def naive_kmeans_activation(a, centres, target, beta):
    k = len(centres)
    out = []
    for an, c in zip(a, target):
        others = [j for j in range(k) if j != c]
        w = [2 * (centres[c] - centres[j]) for j in others]
        b = [(centres[j] ** 2).sum() - (centres[c] ** 2).sum() for j in others]
        h = np.array([wk @ an + bk for wk, bk in zip(w, b)])
        p = softmin(h, beta)
        out.append([an[i] * sum(pk * wk[i] for pk, wk in zip(p, w)) for i in range(len(an))])
    return np.array(out)


@pytest.fixture
def activations(rng):
    """ReLU-like activations: non-negative with many exact zeros."""
    support = np.maximum(rng.normal(size=(50, 6)), 0)
    a = np.maximum(rng.normal(size=(5, 6)) + 0.3, 0)
    a[:, 0] = 0.0
    return support, a


def test_outlier_activation_rule_matches_naive(activations):
    support, a = activations
    model = KDEOutlier(gamma=0.5, chunk_size=7).double().fit(support)  # chunked online softmax
    rel = explain(model, a, composite=NeonComposite(mode="activation"))
    np.testing.assert_allclose(rel.numpy(), naive_outlier_activation(a, support, 0.5, 0.5), rtol=1e-9, atol=1e-12)
    assert bool((rel[torch.as_tensor(a) == 0] == 0).all())
    assert_no_hooks(model)
    model.fused = True  # one chunked pass for score and gradient, no (n, N) matrix: same relevance
    fused = explain(model, a, composite=NeonComposite(mode="activation"))
    torch.testing.assert_close(fused, rel, rtol=1e-12, atol=1e-14)
    assert bool((fused[torch.as_tensor(a) == 0] == 0).all())
    # β ≠ γ: the soft-argmin weights are not the gradient's; the rule makes its own pass over the support set
    sharp = explain(model, a, composite=NeonComposite(mode="activation", beta=2.0))
    np.testing.assert_allclose(sharp.numpy(), naive_outlier_activation(a, support, 0.5, 2.0), rtol=1e-9, atol=1e-12)
    assert not torch.allclose(sharp, rel)
    with pytest.raises(ValueError, match="need the layered forward"):
        explain(model, a)
    stacked = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(6, 6).double(), torch.nn.ReLU(), model)
    with pytest.raises(ValueError, match="need the layered forward"):  # fails after Zennit hooked the first layers
        explain(stacked, a, composite=NeonComposite(base=EpsilonPlusFlat()))
    assert_no_hooks(stacked)


def test_inlier_activation_rule_matches_naive(activations):
    support, a = activations
    model = KDEInlier(gamma=0.5, n_features=100, random_state=2).double().fit(support)
    rel = explain(model, a, composite=NeonComposite(mode="activation", eps=0.5))
    np.testing.assert_allclose(rel.numpy(), naive_inlier_activation(a, model, 0.5), rtol=1e-8, atol=1e-12)
    assert bool((rel[torch.as_tensor(a) == 0] == 0).all())


def test_kmeans_activation_rule_matches_naive(activations):
    support, a = activations
    model = KMeansMembership(n_clusters=4, random_state=0, beta=0.7).double().fit(support)
    rel = explain(model, a, composite=NeonComposite(mode="activation"))
    target = model.predict(a).numpy()
    np.testing.assert_allclose(rel.numpy(), naive_kmeans_activation(a, model.cluster_centers_.numpy(), target, 0.7),
                               rtol=1e-9, atol=1e-12)
    assert bool((rel[torch.as_tensor(a) == 0] == 0).all())
