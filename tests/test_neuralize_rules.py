"""The rules of the neuralized models of SPEC §7, each against a naive float64 re-implementation of its formula.

The references use scikit-learn's own quantities (precision matrices, ``predict_proba``, dual coefficients), not our
factorizations, and explicit sums; conservation is checked where SPEC promises it (hypothesis, few examples).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.covariance import EmpiricalCovariance
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture
from sklearn.neighbors import NearestNeighbors
from sklearn.svm import OneClassSVM

from neon_attrib import NeonComposite, PositionalMahalanobis, explain, neuralize
from neon_attrib.core.layers import KMinPool, SquaredDistance
from neon_attrib.core.rules import (
    GaussianActivationRule,
    KMinPoolRule,
    KNNOutlierActivationRule,
    MahalanobisRule,
    PassThroughRule,
    PositionalMahalanobisActivationRule,
    PositionalMahalanobisRule,
    WeightedKDEOutlierActivationRule,
    WeightedSoftArgminRule,
)
from neon_attrib.integrations.captum import LRP, NeonLRP

F64 = torch.float64
ACTIVATION = NeonComposite(mode="activation")


def softmax(z):
    z = z - z.max(-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def full_precisions(gmm):
    """Per-component precision matrices (K, d, d) from scikit-learn's ``precisions_``, any covariance type."""
    k, d = gmm.means_.shape
    p = gmm.precisions_
    if gmm.covariance_type == "full":
        return p
    if gmm.covariance_type == "tied":
        return np.broadcast_to(p, (k, d, d))
    if gmm.covariance_type == "diag":
        return np.stack([np.diag(row) for row in p])
    return p[:, None, None] * np.eye(d)


# -- naive references, from SPEC §7 ------------------------------------------------------------------------------------
def naive_knn(x, support, k, beta=None, eps=0.0, sqrt=False):
    out = []
    for xn in x:
        h = np.array([((xn - u) ** 2).sum() for u in support])
        nearest = np.argsort(h)[:k]
        o = h[nearest].mean()
        top = np.sqrt(o) if sqrt else o  # the root passes its relevance down unchanged
        if beta is None:
            r = np.zeros(len(support))
            r[nearest] = h[nearest] / k * top / o  # h_j / k when the relevance is o
        else:
            r = softmax(-beta * h) * top
        out.append([sum((xn[i] - u[i]) ** 2 / (eps + hj) * rj for u, hj, rj in zip(support, h, r) if rj != 0)
                    for i in range(len(xn))])
    return np.array(out)


def naive_quadratic(x, mean, precision):
    return np.array([[(xn - mean)[i] * (precision @ (xn - mean))[i] for i in range(len(xn))] for xn in x])


def naive_gmm(x, gmm):
    precisions = full_precisions(gmm)
    responsibilities = gmm.predict_proba(x)
    o = -gmm.score_samples(x)
    out = []
    for xn, r, on in zip(x, responsibilities, o):
        total = np.zeros(len(xn))
        for mu, p, rk in zip(gmm.means_, precisions, r):
            diff = xn - mu
            m = diff @ p @ diff
            total += diff * (p @ diff) / m * rk * on
        out.append(total)
    return np.array(out)


def naive_svm(x, svm, eps, beta=None):
    alpha, support, gamma = svm.dual_coef_.ravel(), svm.support_vectors_, svm._gamma
    beta = gamma if beta is None else beta
    out = []
    for xn in x:
        h = np.array([((xn - u) ** 2).sum() for u in support])
        o = -np.log((alpha * np.exp(-gamma * h)).sum()) / gamma
        r = alpha * np.exp(-beta * h) / (alpha * np.exp(-beta * h)).sum() * o
        out.append([sum((xn[i] - u[i]) ** 2 / (eps + hk) * rk for u, hk, rk in zip(support, h, r))
                    for i in range(len(xn))])
    return np.array(out)


def naive_tied_membership(x, gmm, beta):
    precision = gmm.precisions_
    log_prob = gmm._estimate_weighted_log_prob(x)
    k = gmm.n_components
    out = []
    for xn, lp in zip(x, log_prob):
        c = int(np.argmax(lp))
        others = [j for j in range(k) if j != c]
        w = [precision @ (gmm.means_[c] - gmm.means_[j]) for j in others]
        h = np.array([lp[c] - lp[j] for j in others])
        r = softmax(-beta * h) * h.min()
        out.append([sum(wk[i] ** 2 / (wk**2).sum() * rk for wk, rk in zip(w, r)) for i in range(len(xn))])
    return np.array(out)


# -- input-space rules -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,beta,sqrt", [(1, None, False), (3, None, False), (1, None, True), (3, 0.7, False),
                                         (2, 2.0, True)])
def test_knn_rules_match_naive(rng, k, beta, sqrt):
    support = rng.normal(size=(40, 4))
    x = rng.normal(size=(5, 4)) * 2
    model = neuralize(NearestNeighbors(n_neighbors=k).fit(support), beta=beta, sqrt=sqrt, dtype=F64)
    relevance, output = explain(model, x, return_output=True)
    np.testing.assert_allclose(relevance.numpy(), naive_knn(x, support, k, beta, sqrt=sqrt), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(relevance.sum(1).numpy(), output.numpy(), rtol=1e-10)
    # the composite's β turns the exact share into the soft-argmin over all support points
    soft = explain(model, x, beta=1.5)
    np.testing.assert_allclose(soft.numpy(), naive_knn(x, support, k, 1.5, sqrt=sqrt), rtol=1e-10, atol=1e-12)


def test_knn_layers_compose_in_a_model_of_your_own(rng):
    support = torch.as_tensor(rng.normal(size=(30, 3)))
    model = torch.nn.Sequential(SquaredDistance(support), KMinPool(k=4))
    x = rng.normal(size=(3, 3))
    np.testing.assert_allclose(explain(model, x).numpy(), naive_knn(x, support.numpy(), 4), rtol=1e-10)


def test_mahalanobis_and_pca_rules_match_naive(rng):
    X = rng.normal(size=(100, 4)) @ rng.normal(size=(4, 4))
    x = rng.normal(size=(6, 4)) * 3
    covariance = EmpiricalCovariance().fit(X)
    relevance = explain(neuralize(covariance, dtype=F64), x)
    np.testing.assert_allclose(relevance.numpy(), naive_quadratic(x, covariance.location_, covariance.precision_),
                               rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(relevance.sum(1).numpy(), covariance.mahalanobis(x), rtol=1e-10)
    assert (relevance < 0).any()  # correlations: some features make x more typical
    pca = PCA(n_components=2).fit(X)
    projector = np.eye(4) - pca.components_.T @ pca.components_
    relevance = explain(neuralize(pca, dtype=F64), x)
    np.testing.assert_allclose(relevance.numpy(), naive_quadratic(x, pca.mean_, projector), rtol=1e-9, atol=1e-10)
    residual = x - pca.inverse_transform(pca.transform(x))
    np.testing.assert_allclose(relevance.numpy(), residual * (x - pca.mean_), rtol=1e-9, atol=1e-10)  # r_i (x − μ)_i


@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
def test_gaussian_mixture_rule_matches_naive(rng, covariance_type):
    X = np.r_[rng.normal(size=(60, 3)), rng.normal(size=(60, 3)) * 0.5 + 2]
    x = np.r_[rng.normal(size=(5, 3)) * 2, X[:2] * 0.1]  # some with o(x) < 0: densities above 1 near the core
    gmm = GaussianMixture(n_components=2, covariance_type=covariance_type, random_state=0).fit(X)
    relevance, output = explain(neuralize(gmm, dtype=F64), x, return_output=True)
    np.testing.assert_allclose(relevance.numpy(), naive_gmm(x, gmm), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(relevance.sum(1).numpy(), output.numpy(), rtol=1e-9, atol=1e-12)


def test_one_class_svm_rule_matches_naive(rng):
    X = rng.normal(size=(80, 3))
    x = rng.normal(size=(5, 3)) * 2
    svm = OneClassSVM(gamma=0.4, nu=0.3).fit(X)
    model = neuralize(svm, dtype=F64)
    np.testing.assert_allclose(explain(model, x).numpy(), naive_svm(x, svm, 0.01 / 0.4), rtol=1e-9, atol=1e-12)
    relevance, output = explain(model, x, eps=0.0, beta=1.0, return_output=True)
    np.testing.assert_allclose(relevance.numpy(), naive_svm(x, svm, 0.0, beta=1.0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(relevance.sum(1).numpy(), output.numpy(), rtol=1e-9)


def test_tied_membership_rule_matches_naive(rng):
    X = np.r_[rng.normal(size=(50, 3)), rng.normal(size=(50, 3)) + 3, rng.normal(size=(50, 3)) - 3]
    x = rng.normal(size=(6, 3)) * 3
    gmm = GaussianMixture(n_components=3, covariance_type="tied", random_state=0).fit(X)
    model = neuralize(gmm, membership=True, beta=0.5, dtype=F64)
    relevance, output = explain(model, x, return_output=True)
    np.testing.assert_allclose(relevance.numpy(), naive_tied_membership(x, gmm, 0.5), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(relevance.sum(1).numpy(), output.amax(1).numpy(), rtol=1e-10)


def test_positional_rule_matches_naive(rng):
    maps = rng.normal(size=(10, 3, 2, 2))
    head = PositionalMahalanobis().double().fit(maps)
    queries = rng.normal(size=(2, 3, 2, 2)) * 2
    relevance, output = explain(torch.nn.Sequential(head, torch.nn.Flatten()), queries, return_output=True)
    target = output.argmax(1)  # the most anomalous patch of each image
    for n in range(2):
        y, x_ = divmod(int(target[n]), 2)
        rows = maps[:, :, y, x_]
        precision = np.linalg.inv(np.cov(rows.T) + 0.01 * np.eye(3))
        expected = np.zeros((3, 2, 2))
        expected[:, y, x_] = naive_quadratic(queries[n:n + 1, :, y, x_], rows.mean(0), precision)[0]
        np.testing.assert_allclose(relevance[n].numpy(), expected, rtol=1e-9, atol=1e-12)


# -- activation rules (heads on CNN activations a >= 0) ----------------------------------------------------------------
@pytest.fixture
def activations(rng):
    support = np.maximum(rng.normal(size=(60, 5)) + 0.5, 0)
    a = np.maximum(rng.normal(size=(5, 5)) + 0.5, 0)
    a[:, 0] = 0.0
    a[1, 3] = 0.0
    return support, a


def naive_kde_like_activation(a, support, weights):
    """``Σ_k a_i (a_i − u_ik) / aᵀ(a − u_k) · p_k aᵀ(a − u_k)`` per row (SPEC §1's split with weights p)."""
    out = []
    for an, p in zip(a, weights):
        out.append([sum(an[i] * (an[i] - u[i]) / (an @ (an - u)) * pk * (an @ (an - u))
                        for u, pk in zip(support, p)) for i in range(len(an))])
    return np.array(out)


@pytest.mark.parametrize("beta", [None, 0.8])
def test_knn_activation_rule_matches_naive(activations, beta):
    support, a = activations
    model = neuralize(NearestNeighbors(n_neighbors=3).fit(support), beta=beta, dtype=F64, chunk_size=7)
    h = ((a[:, None] - support[None]) ** 2).sum(-1)
    if beta is None:
        weights = np.zeros_like(h)
        np.put_along_axis(weights, np.argsort(h, 1)[:, :3], 1 / 3, 1)
    else:
        weights = softmax(-beta * h)
    o = np.sort(h, 1)[:, :3].mean(1)
    for sqrt in (False, True):
        model.sqrt = sqrt
        relevance = explain(model, a, composite=ACTIVATION)
        scale = (np.sqrt(o) / o if sqrt else np.ones_like(o))[:, None]
        np.testing.assert_allclose(relevance.numpy(), naive_kde_like_activation(a, support, weights) * scale,
                                   rtol=1e-9, atol=1e-12)
        assert bool((relevance[torch.as_tensor(a) == 0] == 0).all())
    model.fused = True  # the fused forward gives the same relevance
    np.testing.assert_allclose(explain(model, a, composite=ACTIVATION).numpy(), relevance.numpy(), rtol=1e-12)
    # the hard rule reads ū off the score's gradient; its own search of the support set gives the same numbers
    with torch.no_grad():
        x = torch.as_tensor(a)
        direct = KNNOutlierActivationRule().relevance(model, x, model(x), model(x))
    np.testing.assert_allclose(direct.numpy(), relevance.numpy(), rtol=1e-10, atol=1e-13)


def test_svm_activation_rule_matches_naive(activations):
    support, a = activations
    svm = OneClassSVM(gamma=0.3, nu=0.4).fit(support)
    model = neuralize(svm, dtype=F64)
    u, alpha = svm.support_vectors_, svm.dual_coef_.ravel()
    h = ((a[:, None] - u[None]) ** 2).sum(-1)
    weights = softmax(np.log(alpha) - 0.3 * h)
    relevance = explain(model, a, composite=ACTIVATION)
    np.testing.assert_allclose(relevance.numpy(), naive_kde_like_activation(a, u, weights), rtol=1e-9, atol=1e-12)
    assert bool((relevance[torch.as_tensor(a) == 0] == 0).all())


def test_gaussian_activation_rules_match_naive(activations):
    support, a = activations
    covariance = EmpiricalCovariance().fit(support)
    relevance = explain(neuralize(covariance, dtype=F64), a, composite=ACTIVATION)
    expected = np.array([an * (covariance.precision_ @ (an - covariance.location_)) for an in a])  # a_i [P(a − μ)]_i
    np.testing.assert_allclose(relevance.numpy(), expected, rtol=1e-9, atol=1e-12)
    assert bool((relevance[torch.as_tensor(a) == 0] == 0).all())
    gmm = GaussianMixture(n_components=2, covariance_type="diag", random_state=0).fit(support)
    relevance = explain(neuralize(gmm, dtype=F64), a, composite=ACTIVATION)
    r, precisions = gmm.predict_proba(a), full_precisions(gmm)
    expected = np.array([an * sum(rk * p @ (an - mu) / 2 for rk, p, mu in zip(rn, precisions, gmm.means_))
                         for an, rn in zip(a, r)])  # R_k^dot = r_k aᵀP_k(a − μ_k)/2 of h_k = m_k/2
    np.testing.assert_allclose(relevance.numpy(), expected, rtol=1e-9, atol=1e-12)
    assert bool((relevance[torch.as_tensor(a) == 0] == 0).all())


def test_membership_and_positional_activation_rules(activations, rng):
    support, a = activations
    gmm = GaussianMixture(n_components=3, covariance_type="tied", random_state=0).fit(support)
    model = neuralize(gmm, membership=True, beta=0.6, dtype=F64)
    relevance = explain(model, a, composite=ACTIVATION)
    log_prob = gmm._estimate_weighted_log_prob(a)
    expected = []
    for an, lp in zip(a, log_prob):
        c = int(lp.argmax())
        others = [j for j in range(3) if j != c]
        w = [gmm.precisions_ @ (gmm.means_[c] - gmm.means_[j]) for j in others]
        p = softmax(-0.6 * np.array([lp[c] - lp[j] for j in others]))
        expected.append(an * sum(pk * wk for pk, wk in zip(p, w)))  # R_i = a_i Σ_k p_k w_ki
    np.testing.assert_allclose(relevance.numpy(), np.array(expected), rtol=1e-9, atol=1e-12)
    maps = np.maximum(rng.normal(size=(12, 4, 2, 2)), 0)
    head = PositionalMahalanobis(n_positions=4).double().fit(maps.transpose(0, 2, 3, 1).reshape(-1, 4))
    rows = np.maximum(rng.normal(size=(8, 4)), 0)  # two images' location rows
    rows[0, 1] = 0.0
    relevance = explain(head, rows, composite=ACTIVATION)
    expected = []
    for r, row in enumerate(rows):
        location = maps[:, :, (r % 4) // 2, r % 2]
        precision = np.linalg.inv(np.cov(location.T) + 0.01 * np.eye(4))
        expected.append(row * (precision @ (row - location.mean(0))))
    np.testing.assert_allclose(relevance.numpy(), np.array(expected), rtol=1e-9, atol=1e-12)
    assert relevance[0, 1] == 0


# -- conservation ------------------------------------------------------------------------------------------------------
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), d=st.integers(1, 5), n=st.integers(3, 30), k=st.integers(1, 3),
       beta=st.one_of(st.none(), st.floats(0.05, 5.0)), sqrt=st.booleans())
def test_knn_conserves_exactly(seed, d, n, k, beta, sqrt):
    rng = np.random.default_rng(seed)
    model = neuralize(NearestNeighbors(n_neighbors=k).fit(rng.normal(size=(n, d))), beta=beta, sqrt=sqrt, dtype=F64)
    x = rng.normal(size=(4, d)) * 2
    relevance, output = explain(model, x, return_output=True)
    np.testing.assert_allclose(relevance.sum(1).numpy(), output.numpy(), rtol=1e-9, atol=1e-12)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), d=st.integers(1, 5), r=st.integers(1, 4))
def test_quadratic_forms_conserve_exactly(seed, d, r):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(30, d)) @ rng.normal(size=(d, d))
    x = rng.normal(size=(4, d)) * 3
    for model in (neuralize(EmpiricalCovariance().fit(X), dtype=F64),
                  neuralize(PCA(n_components=min(r, d)).fit(X), dtype=F64)):
        relevance, output = explain(model, x, return_output=True)
        np.testing.assert_allclose(relevance.sum(1).numpy(), output.numpy(), rtol=1e-9, atol=1e-10)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), d=st.integers(1, 4), k=st.integers(1, 3),
       covariance_type=st.sampled_from(["full", "tied", "diag", "spherical"]))
def test_mixtures_and_svm_conserve_exactly(seed, d, k, covariance_type):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(40, d))
    x = rng.normal(size=(4, d)) * 2
    gmm = GaussianMixture(n_components=k, covariance_type=covariance_type, random_state=0).fit(X)
    relevance, output = explain(neuralize(gmm, dtype=F64), x, return_output=True)
    np.testing.assert_allclose(relevance.sum(1).numpy(), output.numpy(), rtol=1e-8, atol=1e-10)
    svm = neuralize(OneClassSVM(gamma=0.5, nu=0.3).fit(X), eps=0.0, dtype=F64)
    relevance, output = explain(svm, x, return_output=True)
    np.testing.assert_allclose(relevance.sum(1).numpy(), output.numpy(), rtol=1e-9, atol=1e-10)
    if k >= 2:
        tied = GaussianMixture(n_components=k, covariance_type="tied", random_state=0).fit(X)
        membership = neuralize(tied, membership=True, dtype=F64)
        for target in range(k):
            relevance = explain(membership, x, target=target)
            np.testing.assert_allclose(relevance.sum(1).numpy(), membership(x)[:, target].numpy(), rtol=1e-9,
                                       atol=1e-10)


# -- rule objects ------------------------------------------------------------------------------------------------------
def test_rules_keep_hyperparameters_and_work_through_captum(rng):
    assert KMinPoolRule(beta=3.0).copy().beta == 3.0
    assert MahalanobisRule(eps=0.5).copy().eps == 0.5
    assert WeightedSoftArgminRule(beta=2.0).copy().beta == 2.0
    assert KNNOutlierActivationRule(beta=0.3).copy().beta == 0.3
    assert WeightedKDEOutlierActivationRule(beta=0.4).copy().beta == 0.4
    assert GaussianActivationRule(beta=0.2).copy().beta == 0.2
    assert PositionalMahalanobisRule(eps=0.1).copy().eps == 0.1
    for rule in (PassThroughRule(), PositionalMahalanobisActivationRule()):
        assert type(rule.copy()) is type(rule)
    with pytest.raises(ValueError, match="'beta' parameter of KMinPoolRule"):
        KMinPoolRule(beta=0.0)
    X = rng.normal(size=(50, 3))
    x = torch.as_tensor(rng.normal(size=(4, 3)))
    for model in (neuralize(NearestNeighbors(n_neighbors=2).fit(X), sqrt=True, dtype=F64),
                  neuralize(GaussianMixture(2, random_state=0).fit(X), dtype=F64),
                  neuralize(PCA(1).fit(X), dtype=F64),
                  neuralize(OneClassSVM(gamma=0.5).fit(X), dtype=F64),
                  neuralize(GaussianMixture(2, covariance_type="tied", random_state=0).fit(X), membership=True,
                            dtype=F64)):
        expected = explain(model, x)
        assert torch.equal(NeonLRP(model).attribute(x), expected)
        # Captum's LRP with the NEON rules: they reach the new layers too
        output = model(x)
        target = None if output.ndim == 1 else output.argmax(1)
        with pytest.warns(UserWarning, match="did not already require gradients"):
            torch.testing.assert_close(LRP(model).attribute(x.clone(), target=target), expected, rtol=1e-10,
                                       atol=1e-12)
