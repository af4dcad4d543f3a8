"""neuralize: a fitted scikit-learn estimator in, an exactly equivalent NEON network out.

Ground truth is scikit-learn's own output (score_samples, decision_function, mahalanobis, kneighbors, predict, the
PCA reconstruction error) on random data of several shapes, on points far from the data and on the Wholesale
customers; float64 to 1e-10 relative, float32 to 1e-6 where the conditioning allows (bounds below).
"""

from __future__ import annotations

import copy
import io
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_no_hooks
from sklearn.base import clone
from sklearn.cluster import (
    DBSCAN,
    AgglomerativeClustering,
    BisectingKMeans,
    KMeans,
    MiniBatchKMeans,
    SpectralClustering,
)
from sklearn.covariance import EllipticEnvelope, EmpiricalCovariance, LedoitWolf, MinCovDet
from sklearn.decomposition import PCA, IncrementalPCA
from sklearn.ensemble import IsolationForest
from sklearn.exceptions import NotFittedError
from sklearn.mixture import BayesianGaussianMixture, GaussianMixture
from sklearn.neighbors import KernelDensity, LocalOutlierFactor, NearestNeighbors
from sklearn.svm import OneClassSVM
from torch import nn

from neon_attrib import (
    BisectingKMeansMembership,
    DeepNeon,
    GaussianMixtureMembership,
    GaussianMixtureOutlier,
    KDEOutlier,
    KMeansMembership,
    KNNOutlier,
    MahalanobisOutlier,
    NeonComposite,
    OneClassSVMOutlier,
    PCAResidual,
    PositionalMahalanobis,
    WeightedKDEOutlier,
    explain,
    neuralize,
)
from neon_attrib.datasets import load_wholesale, preprocess_wholesale
from neon_attrib.pipeline.engine import ConservationWarning
from neon_attrib.scale import fit_dataset

F64 = torch.float64
SHAPES = [(60, 2), (150, 5), (80, 12)]


def _data(rng, n, d):
    """Correlated Gaussian data, and queries: near the data and far from it."""
    mixing = rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d)
    X = rng.normal(size=(n, d)) @ mixing + rng.normal(size=d)
    queries = np.r_[rng.normal(size=(6, d)) @ mixing, rng.normal(size=(3, d)) * 30 + 50]
    return X, queries


def close(ours, reference, rtol, scale=None):
    """``|ours − ref| <= rtol · scale`` elementwise (scale: |ref| by default)."""
    ours = ours.detach().double().numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours)
    scale = np.abs(reference) if scale is None else scale
    np.testing.assert_array_less(np.abs(ours - reference), rtol * scale + 1e-300)


@pytest.fixture(scope="module")
def wholesale():
    return preprocess_wholesale(load_wholesale()[0])


# ---------------------------------------------------------------------------------------------------------------------
# equality with scikit-learn
def kde_reference(x, X, bandwidth, weights=None):
    """Brute-force float64 log-density of a (weighted) Gaussian KDE."""
    from scipy.special import logsumexp

    weights = np.ones(len(X)) if weights is None else weights
    h = ((x[:, None] - X[None]) ** 2).sum(-1)
    log_norm = 0.5 * X.shape[1] * np.log(2 * np.pi * bandwidth**2)
    return logsumexp(-h / (2 * bandwidth**2), b=weights / weights.sum(), axis=1) - log_norm


@pytest.mark.parametrize("n,d", SHAPES)
def test_kernel_density_plain_and_weighted(rng, n, d):
    X, x = _data(rng, n, d)
    near, far = x[:6], x[6:]
    weights = rng.uniform(0.2, 3.0, size=n)
    for sample_weight, expected in ((None, KDEOutlier), (weights, WeightedKDEOutlier)):
        kde = KernelDensity(bandwidth=1.3).fit(X, sample_weight=sample_weight)
        model = neuralize(kde, dtype=F64)
        assert type(model) is expected
        close(model.score_samples(near), kde.score_samples(near), 1e-10)
        # far from the data scikit-learn's tree-based sums are themselves off (by 0.1 to 100 in log-density here):
        # the reference there is the exact log-sum-exp
        close(model.score_samples(far), kde_reference(far, X, 1.3, sample_weight), 1e-10)
        close(neuralize(kde).score_samples(near), kde.score_samples(near), 1e-6)  # float32


@pytest.mark.parametrize("cls", [KMeans, MiniBatchKMeans])
def test_kmeans_and_minibatch_kmeans(rng, blobs, cls):
    km = cls(n_clusters=3, n_init=3, random_state=0).fit(blobs)
    model = neuralize(km, X=blobs, dtype=F64)
    assert type(model) is KMeansMembership
    x = np.r_[blobs, rng.normal(size=(20, 4)) * 5, rng.normal(size=(3, 4)) * 100]
    assert (model.predict(x).numpy() == km.predict(x)).all()
    sq = ((x[:, None] - km.cluster_centers_[None]) ** 2).sum(-1)
    c = sq.argmin(1)
    evidence = np.array([min(sq[i, k] - sq[i, c[i]] for k in range(3) if k != c[i]) for i in range(len(x))])
    close(model(x).amax(1), evidence, 1e-10, scale=sq.max(1))
    assert (neuralize(km).predict(x.astype(np.float32)).numpy() == km.predict(x)).all()


@pytest.mark.parametrize("strategy", ["biggest_inertia", "largest_cluster"])
def test_bisecting_kmeans_predicts_as_its_tree_on_every_point(rng, strategy):
    Y = rng.normal(size=(300, 2)) + [50.0, -20.0]  # uncentred: scikit-learn's tree centres are relative to the mean
    tree = BisectingKMeans(n_clusters=8, random_state=0, bisecting_strategy=strategy).fit(Y)
    grid = np.stack(np.meshgrid(np.linspace(-3, 3, 60) + 50, np.linspace(-3, 3, 60) - 20), -1).reshape(-1, 2)
    nearest = ((grid[:, None] - tree.cluster_centers_[None]) ** 2).sum(-1).argmin(1)
    assert (nearest != tree.predict(grid)).sum() > 10  # the tree is not the nearest centroid near borders
    for model in (neuralize(tree, dtype=F64), neuralize(tree, X=Y, dtype=F64),
                  BisectingKMeansMembership(8, random_state=0, bisecting_strategy=strategy).double().fit(Y)):
        assert type(model) is BisectingKMeansMembership
        assert (model.predict(grid).numpy() == tree.predict(grid)).all()
        assert (model.predict(Y).numpy() == tree.labels_).all()
        output = model(grid)
        assert ((output > 0).sum(1) <= 1).all() and (output.amax(1) > 0).float().mean() > 0.99
    np.testing.assert_allclose(model.cluster_centers_.numpy(), tree.cluster_centers_)
    # three blobs: the tree agrees with the nearest centroid on every training point, not between the blobs
    X = np.r_[rng.normal(size=(40, 2)), rng.normal(size=(40, 2)) + 20, rng.normal(size=(40, 2)) + [0, 40]]
    blobs = BisectingKMeans(n_clusters=3, random_state=0, bisecting_strategy=strategy).fit(X)
    wide = np.stack(np.meshgrid(np.linspace(-10, 30, 60), np.linspace(-10, 50, 60)), -1).reshape(-1, 2)
    assert (neuralize(blobs, X=X, dtype=F64).predict(wide).numpy() == blobs.predict(wide)).all()
    single = neuralize(tree)  # float32 keeps the tree's decisions away from the borders
    assert (single.predict(grid).numpy() == tree.predict(grid)).mean() > 0.99
    # the state round trip, and the explanation: the k-means rule conserves the evidence exactly
    fresh = BisectingKMeansMembership().double()
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(grid), model(grid), rtol=0, atol=0)
    assert fresh.get_params() == model.get_params()
    relevance, audit = explain(model, grid[:50], return_audit=True)
    assert audit.ok and relevance.shape == (50, 2)


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("k", [1, 4])
def test_nearest_neighbors(rng, n, d, k):
    X, x = _data(rng, n, d)
    nn_ = NearestNeighbors(n_neighbors=k).fit(X)
    dist, index = nn_.kneighbors(x)
    model = neuralize(nn_, dtype=F64)
    assert type(model) is KNNOutlier
    ours, our_index = model.kneighbors(x)
    close(ours, dist, 1e-10)
    assert (our_index.numpy() == index).all()
    for forward in (model, model.score):
        close(forward(x), (dist**2).mean(1), 1e-10)
    model.fused = True
    close(model(x), (dist**2).mean(1), 1e-10)
    if k == 1:
        close(neuralize(nn_, sqrt=True, dtype=F64)(x), dist[:, 0], 1e-10)  # PatchCore: Euclidean distance
    # float32: the neighbours' distances are recomputed from differences, so they keep float32 precision
    single = neuralize(nn_, fused=True)
    close(single(x), (dist**2).mean(1), 1e-6)
    close(single.kneighbors(x)[0], dist, 1e-6)


def test_nearest_neighbors_chunked_search_and_options(rng):
    X, x = rng.normal(size=(5000, 8)), rng.normal(size=(20, 8))
    nn_ = NearestNeighbors(n_neighbors=3, algorithm="brute").fit(X)
    dist, index = nn_.kneighbors(x)
    model = neuralize(nn_, chunk_size=333, dtype=F64)  # chunks of uneven size, k across chunk borders
    ours, our_index = model.kneighbors(x)
    close(ours, dist, 1e-10)
    assert (our_index.numpy() == index).all()
    assert neuralize(nn_, k=7, dtype=F64).n_neighbors == 7
    close(neuralize(nn_, k=7, dtype=F64)(x), (nn_.kneighbors(x, 7)[0] ** 2).mean(1), 1e-10)
    assert neuralize(NearestNeighbors(metric="minkowski", p=2).fit(X)).n_neighbors == 5


def test_nearest_neighbour_search_is_chunked(rng, monkeypatch):
    """Large memory banks: score, kneighbors and the fused forward never form an (n, N) block of distances."""
    import neon_attrib.core.functional as functional

    support, x = rng.normal(size=(50_000, 4)), rng.normal(size=(16, 4))
    model = KNNOutlier(n_neighbors=2, chunk_size=4096, fused=True).double().fit(support)
    widths = []
    original = functional.squared_distance
    monkeypatch.setattr(functional, "squared_distance",
                        lambda a, b, *args, **kw: widths.append(b.shape[0]) or original(a, b, *args, **kw))
    scores = [model.score(x), model(x), model.kneighbors(x)[0].pow(2).mean(1)]
    assert widths and max(widths) <= 4096
    reference = np.sort(((x[:, None] - support[None]) ** 2).sum(-1), 1)[:, :2].mean(1)
    for score in scores:
        close(score, reference, 1e-10)
    with pytest.raises(ValueError, match="Input-space rules need the layered forward"):
        explain(model, x)  # the fused forward has no layers for the input rules; the CNN rule works
    assert explain(model, np.abs(x), composite=NeonComposite(mode="activation")).shape == (16, 4)


@pytest.mark.parametrize("cls", [EmpiricalCovariance, MinCovDet, EllipticEnvelope, LedoitWolf])
def test_covariance_estimators(rng, cls):
    X, x = _data(rng, 120, 4)
    estimator = cls(random_state=0).fit(X) if cls in (MinCovDet, EllipticEnvelope) else cls().fit(X)
    model = neuralize(estimator, dtype=F64)
    assert type(model) is MahalanobisOutlier
    close(model.mahalanobis(x), estimator.mahalanobis(x), 1e-10)
    close(neuralize(estimator)(x), estimator.mahalanobis(x), 1e-6)
    if cls is EllipticEnvelope:
        close(model.decision_function(x), estimator.decision_function(x), 1e-10,
              scale=np.abs(estimator.decision_function(x)) + abs(estimator.offset_))
    else:
        with pytest.raises(ValueError, match="no decision threshold"):
            model.decision_function(x)


@pytest.mark.parametrize("n,d,r", [(60, 3, 1), (150, 8, 3), (80, 12, 11)])
def test_pca_reconstruction_error(rng, n, d, r):
    X, x = _data(rng, n, d)
    for pca in (PCA(n_components=r).fit(X), IncrementalPCA(n_components=r).fit(X)):
        reference = ((x - pca.inverse_transform(pca.transform(x))) ** 2).sum(1)
        model = neuralize(pca, dtype=F64)
        assert type(model) is PCAResidual
        close(model.reconstruction_error(x), reference, 1e-10)
        # float32: a difference of x and its projection, accurate relative to ‖x − μ‖² (not to a small residual)
        close(neuralize(pca)(x), reference, 1e-6, scale=((x - pca.mean_) ** 2).sum(1))


@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
def test_gaussian_mixture_outlier(rng, covariance_type):
    X, x = _data(rng, 200, 3)
    gmm = GaussianMixture(n_components=3, covariance_type=covariance_type, random_state=0).fit(X)
    model = neuralize(gmm, dtype=F64)
    assert type(model) is GaussianMixtureOutlier
    reference = gmm.score_samples(x)
    close(model.score_samples(x), reference, 1e-10)
    close(model(x), -reference, 1e-10)
    assert (model.predict(x).numpy() == gmm.predict(x)).all()
    np.testing.assert_allclose(model.predict_proba(x[:6]).numpy(), gmm.predict_proba(x[:6]), atol=1e-10)
    # float32: −log p is a log-sum-exp of energies of size ~m/2; its error is relative to those, not to o ≈ 0
    energies = model.distance(torch.as_tensor(x)).amin(1).numpy()
    close(neuralize(gmm)(x), -reference, 1e-6, scale=np.abs(reference) + energies + 1)


def test_gaussian_mixture_membership_tied(rng):
    X = np.r_[rng.normal(size=(60, 3)), rng.normal(size=(60, 3)) + 3, rng.normal(size=(60, 3)) - [3, 0, 3]]
    gmm = GaussianMixture(n_components=3, covariance_type="tied", random_state=0).fit(X)
    model = neuralize(gmm, membership=True, X=X, dtype=F64)
    assert type(model) is GaussianMixtureMembership
    x = np.r_[X, rng.normal(size=(20, 3)) * 4, rng.normal(size=(3, 3)) * 100]
    evidence = model(x)
    predicted = gmm.predict(x)
    assert (evidence.argmax(1).numpy() == predicted).all()
    assert ((evidence > 0).numpy() == (np.arange(3) == predicted[:, None])).all()  # > 0 iff predict says so
    log_prob = gmm._estimate_weighted_log_prob(x)  # ℓ_k (scikit-learn's own)
    reference = np.array([min(log_prob[i, c] - log_prob[i, k] for k in range(3) if k != c)
                          for i, c in enumerate(predicted)])
    close(evidence.amax(1), reference, 1e-10, scale=np.abs(log_prob).max(1))
    assert model.default_beta_ > 0
    for covariance_type in ("full", "diag", "spherical"):
        other = GaussianMixture(n_components=2, covariance_type=covariance_type, random_state=0).fit(X)
        with pytest.raises(ValueError, match="needs covariance_type='tied'"):
            neuralize(other, membership=True)


@pytest.mark.parametrize("gamma", [0.3, "scale"])
def test_one_class_svm(rng, gamma):
    X, x = _data(rng, 150, 4)
    svm = OneClassSVM(gamma=gamma, nu=0.2).fit(X)
    model = neuralize(svm, dtype=F64)
    assert type(model) is OneClassSVMOutlier
    decision = svm.decision_function(x)
    # exp(−γ o) − ρ: the subtraction is relative to ρ (decisions near the boundary are differences of ~ρ)
    close(model.decision_function(x), decision, 1e-10, scale=np.abs(decision) + svm.offset_[0])
    close(torch.exp(-model.gamma_ * model(x)) - model.offset_, decision, 1e-10,
          scale=np.abs(decision) + svm.offset_[0])
    close(model.score_samples(x), svm.score_samples(x), 1e-10, scale=np.abs(svm.score_samples(x)) + 1e-12)
    assert (model.predict(x).numpy() == svm.predict(x)).all()
    single = neuralize(svm)
    close(single.decision_function(x), decision, 1e-6, scale=np.abs(decision) + svm.offset_[0])


def test_wholesale_every_model(wholesale):
    X = wholesale
    far = np.r_[X[:20], X[:3] * 10]
    kde = KernelDensity(bandwidth=1 / np.sqrt(2)).fit(X)  # γ = 1, the book's setting
    close(neuralize(kde, dtype=F64).score_samples(X[:20]), kde.score_samples(X[:20]), 1e-10)
    close(neuralize(kde, dtype=F64).score_samples(far), kde_reference(far, X, 1 / np.sqrt(2)), 1e-10)
    km = KMeans(n_clusters=6, n_init=10, random_state=8).fit(X)
    assert (neuralize(km, dtype=F64).predict(far).numpy() == km.predict(far)).all()
    nn_ = NearestNeighbors(n_neighbors=5).fit(X)
    close(neuralize(nn_, dtype=F64)(far), (nn_.kneighbors(far)[0] ** 2).mean(1), 1e-10)
    cov = MinCovDet(random_state=0).fit(X)
    close(neuralize(cov, dtype=F64)(far), cov.mahalanobis(far), 1e-10)
    pca = PCA(n_components=2).fit(X)
    close(neuralize(pca, dtype=F64)(far), ((far - pca.inverse_transform(pca.transform(far))) ** 2).sum(1), 1e-10)
    gmm = GaussianMixture(n_components=4, random_state=0).fit(X)
    close(neuralize(gmm, dtype=F64).score_samples(far), gmm.score_samples(far), 1e-10)
    svm = OneClassSVM(gamma=0.5, nu=0.1).fit(X)
    decision = svm.decision_function(far)
    close(neuralize(svm, dtype=F64).decision_function(far), decision, 1e-10, scale=np.abs(decision) + svm.offset_[0])


# ---------------------------------------------------------------------------------------------------------------------
# errors
@pytest.mark.parametrize("estimator", [IsolationForest(), LocalOutlierFactor(), DBSCAN(), SpectralClustering(),
                                       AgglomerativeClustering(), BayesianGaussianMixture()])
def test_unsupported_estimators_list_what_is_supported(estimator):
    with pytest.raises(TypeError, match=rf"does not support {type(estimator).__name__}.*Supported: KernelDensity"):
        neuralize(estimator)


def test_errors_name_class_parameter_expected_and_received(rng):
    X = rng.normal(size=(30, 3))
    for unfitted in (KernelDensity(), KMeans(), NearestNeighbors(), EmpiricalCovariance(), PCA(), GaussianMixture(),
                     OneClassSVM()):
        with pytest.raises(NotFittedError, match=f"This {type(unfitted).__name__} instance is not fitted yet"):
            neuralize(unfitted)
    cases = [
        (KernelDensity(kernel="tophat").fit(X), {}, ValueError, "kernel='gaussian'. Got kernel='tophat'"),
        (NearestNeighbors(metric="manhattan").fit(X), {}, ValueError, "Euclidean metric.*metric='manhattan'"),
        (NearestNeighbors(metric="precomputed").fit(np.abs(X @ X.T)), {}, ValueError, "metric='precomputed'"),
        (PCA(n_components=2, whiten=True).fit(X), {}, ValueError, "'whiten' parameter of the PCA must be False"),
        (OneClassSVM(kernel="linear").fit(X), {}, ValueError, "needs kernel='rbf'.*is 'linear'"),
        (GaussianMixture(2, random_state=0).fit(X), {"membership": True}, ValueError, "is 'full'"),
        (KMeans(2, n_init=1).fit(X), {"k": 3}, TypeError, r"unexpected option\(s\) \['k'\] for KMeans"),
        (NearestNeighbors(n_neighbors=50).fit(X), {}, ValueError, "'n_neighbors' parameter of KNNOutlier must be an "
                                                                  "int >= 1|n_neighbors=50 needs at least"),
        (KMeans(2, n_init=1).fit(X), {"X": X[:, :2]}, ValueError, "X has 2 features, but KMeansMembership was fitted "
                                                                  "with 3 features"),
        (KernelDensity().fit(X), {"dtype": torch.int64}, TypeError, "'dtype' parameter of neuralize"),
    ]
    for estimator, options, error, message in cases:
        with pytest.raises(error, match=message):
            neuralize(estimator, **options)


@pytest.mark.parametrize("make", [
    lambda X: neuralize(NearestNeighbors(n_neighbors=2).fit(X)),
    lambda X: neuralize(EmpiricalCovariance().fit(X)),
    lambda X: neuralize(PCA(2).fit(X)),
    lambda X: neuralize(GaussianMixture(2, random_state=0).fit(X)),
    lambda X: neuralize(GaussianMixture(2, covariance_type="tied", random_state=0).fit(X), membership=True),
    lambda X: neuralize(OneClassSVM(gamma=0.5).fit(X)),
    lambda X: neuralize(KernelDensity().fit(X, sample_weight=np.arange(1, len(X) + 1))),
])
def test_bad_inputs_raise_clearly_and_change_nothing(rng, make):
    X = rng.normal(size=(40, 3))
    model = make(X)
    name = type(model).__name__
    before = {key: value.clone() for key, value in model.state_dict().items() if isinstance(value, torch.Tensor)}
    x = torch.as_tensor(X[:4], dtype=torch.float32)
    with pytest.raises(ValueError, match=f"x has 2 features, but {name} was fitted with 3 features|"
                                         f"X has 2 features, but {name} was fitted with 3 features"):
        model(x[:, :2])
    with pytest.raises(ValueError, match=f"passed to {name} contains NaN"):
        model(torch.full((2, 3), float("nan")))
    with pytest.raises(TypeError, match="has dtype torch.float64"):
        model(x.double())
    with pytest.raises(ValueError, match=f"passed to {name} contains NaN"):
        model.fit(np.full((10, 3), np.nan))
    # a bad rule hyperparameter, or a fitted-state one set without refitting
    param = "beta" if "beta" in model.get_params() else model._refit_parameters[0]
    with pytest.raises(ValueError, match=f"'{param}' parameter of (this fitted )?{name}"):
        model.set_params(**{param: -1.0})
    after = model.state_dict()
    assert all(torch.equal(value, after[key]) for key, value in before.items())
    assert model.get_params() == clone(model).get_params()


def test_explain_every_model_with_no_hooks_left(rng):
    X = rng.normal(size=(40, 3))
    x = rng.normal(size=(5, 3))
    for model in (neuralize(NearestNeighbors(n_neighbors=2).fit(X), dtype=F64),
                  neuralize(MinCovDet(random_state=0).fit(X), dtype=F64),
                  neuralize(PCA(1).fit(X), dtype=F64),
                  neuralize(GaussianMixture(2, covariance_type="diag", random_state=0).fit(X), dtype=F64),
                  neuralize(OneClassSVM(gamma=0.5).fit(X), eps=0.0, dtype=F64)):
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConservationWarning)
            relevance, output = explain(model, x, return_output=True)
        np.testing.assert_allclose(relevance.sum(1).numpy(), output.numpy(), rtol=1e-9, atol=1e-12)
        assert torch.equal(explain(model, x), relevance)
        assert_no_hooks(model)


# ---------------------------------------------------------------------------------------------------------------------
# the estimators' own fit, state dicts, clone
def test_own_fit_equals_sklearn(rng):
    X, x = _data(rng, 100, 4)
    knn = KNNOutlier(n_neighbors=3).double().fit(X)
    close(knn(x), (NearestNeighbors(n_neighbors=3).fit(X).kneighbors(x)[0] ** 2).mean(1), 1e-10)
    close(MahalanobisOutlier().double().fit(X)(x), EmpiricalCovariance().fit(X).mahalanobis(x), 1e-10)
    robust = MahalanobisOutlier(robust=True, random_state=0).double().fit(X)
    close(robust(x), MinCovDet(random_state=0).fit(X).mahalanobis(x), 1e-10)
    padim_like = MahalanobisOutlier(reg=0.01).double().fit(X)
    cov = np.cov(X.T, bias=True) + 0.01 * np.eye(4)
    diff = x - X.mean(0)
    close(padim_like(x), np.einsum("ni,ij,nj->n", diff, np.linalg.inv(cov), diff), 1e-10)
    pca = PCA(2).fit(X)
    close(PCAResidual(2).double().fit(X)(x), ((x - pca.inverse_transform(pca.transform(x))) ** 2).sum(1), 1e-10)
    gmm = GaussianMixture(2, covariance_type="diag", random_state=0).fit(X)
    close(GaussianMixtureOutlier(2, "diag", random_state=0).double().fit(X).score_samples(x), gmm.score_samples(x),
          1e-10)
    tied = GaussianMixture(2, covariance_type="tied", random_state=0).fit(X)
    assert (GaussianMixtureMembership(2, random_state=0).double().fit(X).predict(x).numpy() == tied.predict(x)).all()
    svm = OneClassSVM(gamma=0.3, nu=0.3).fit(X)
    ours = OneClassSVMOutlier(gamma=0.3, nu=0.3).double().fit(X)
    close(ours.decision_function(x), svm.decision_function(x), 1e-10, scale=abs(svm.decision_function(x)) + 1)
    uniform = WeightedKDEOutlier(gamma=0.4).double().fit(X)
    close(uniform(x), KDEOutlier(gamma=0.4).double().fit(X)(x).numpy(), 1e-12)


def test_positional_mahalanobis_per_position_gaussians(rng):
    maps = torch.as_tensor(rng.normal(size=(12, 3, 2, 4)))
    head = PositionalMahalanobis(reg=0.01).double().fit(maps)
    queries = torch.as_tensor(rng.normal(size=(2, 3, 2, 4)) * 2)
    scores = head(queries)
    assert scores.shape == (2, 2, 4)
    for y in range(2):
        for x in range(4):
            rows = maps[:, :, y, x].numpy()
            precision = np.linalg.inv(np.cov(rows.T) + 0.01 * np.eye(3))
            diff = queries[:, :, y, x].numpy() - rows.mean(0)
            close(scores[:, y, x], np.einsum("ni,ij,nj->n", diff, precision, diff), 1e-10)
    rows = queries.permute(0, 2, 3, 1).reshape(-1, 3)  # DeepNeon's location-major rows
    close(head(rows), scores.reshape(-1).numpy(), 1e-12)
    close(PositionalMahalanobis(sqrt=True).double().fit(maps)(queries), scores.sqrt().numpy(), 1e-12)
    row_fit = PositionalMahalanobis(n_positions=8).double().fit(maps.permute(0, 2, 3, 1).reshape(-1, 3))
    close(row_fit(rows), scores.reshape(-1).numpy(), 1e-10)
    with pytest.raises(ValueError, match=r"expects feature maps \(n, 3, 2, 4\)"):
        head(torch.zeros(1, 3, 4, 2, dtype=F64))
    with pytest.raises(ValueError, match="only with the 'n_positions' parameter"):
        PositionalMahalanobis().double().fit(rows)
    with pytest.raises(ValueError, match="x has 5 channels, but PositionalMahalanobis was fitted with 3"):
        head(torch.zeros(1, 5, 2, 4, dtype=F64))
    with pytest.raises(ValueError, match="at position 0 is singular .*'reg' parameter must be > 0"):
        PositionalMahalanobis(reg=0.0).double().fit(maps[:2])
    float32 = PositionalMahalanobis().fit(maps.float())  # float64 estimates, stored in the module's dtype
    close(float32(queries.float()), scores.numpy(), 1e-5)


def test_positional_reg_takes_effect_from_the_statistics(rng):
    """Setting 'reg' on a fitted head recomputes the Gaussians from its running statistics (= a new fit with that
    reg); a reg that fails (negative, singular covariances) changes nothing; without statistics it needs a new fit."""
    maps = torch.as_tensor(rng.normal(size=(10, 3, 2, 2)) + 5.0)
    head = PositionalMahalanobis(reg=0.01).double().fit(maps)
    head.set_params(reg=0.5)
    _gaussians_close(head, PositionalMahalanobis(reg=0.5).double().fit(maps), 1e-12)
    assert head.get_params()["reg"] == 0.5
    before = _snapshot(head)
    with pytest.raises(ValueError, match="must be a finite float >= 0"):
        head.reg = -1.0
    _assert_same_state(head, before)
    two = PositionalMahalanobis(reg=0.01).double().fit(maps[:2])  # 2 images, 3 channels: singular without reg
    kept = _snapshot(two)
    with pytest.raises(ValueError, match="singular"):
        two.reg = 0.0
    assert two.reg == 0.01
    _assert_same_state(two, kept)
    freed = PositionalMahalanobis().double().partial_fit(maps, finalize=False).finalize(keep_statistics=False)
    with pytest.raises(ValueError, match="needs a new fit"):
        freed.reg = 0.2


def test_positional_merge_statistics(rng):
    """Merging two shards' statistics = one fit on both (in either order); statistics of another shape are refused,
    changing nothing; a model without statistics takes the other's; empty statistics add nothing."""
    maps = torch.as_tensor(rng.normal(size=(9, 3, 2, 2)) + 100.0)
    reference = PositionalMahalanobis().double().fit(maps)
    for first, second in ((maps[:4], maps[4:]), (maps[4:], maps[:4])):
        a = PositionalMahalanobis().double().partial_fit(first, finalize=False)
        b = PositionalMahalanobis().double().partial_fit(second, finalize=False)
        _gaussians_close(a.merge_statistics(b).finalize(), reference, 1e-10)
    empty = PositionalMahalanobis().double()
    _gaussians_close(empty.merge_statistics(reference).finalize(), reference, 1e-12)
    assert reference.merge_statistics(PositionalMahalanobis().double()).n_images_seen_ == 9
    before = _snapshot(reference)
    other = PositionalMahalanobis().double().partial_fit(maps[:, :2], finalize=False)  # 2 channels
    with pytest.raises(ValueError, match="do not match this model's"):
        reference.merge_statistics(other)
    _assert_same_state(reference, before)
    freed = PositionalMahalanobis().double().fit(maps)
    freed.finalize(keep_statistics=False)
    with pytest.raises(ValueError, match="no running statistics to continue from"):
        freed.merge_statistics(other)


def test_deep_neon_fits_a_positional_head_on_whole_maps(rng):
    """DeepNeon.fit streams whole feature maps into a PositionalMahalanobis head (batch by batch), equal to fitting
    it on all maps at once; a location sample (max_locations), maps with other positions than n_positions, and
    fit_dataset (which samples locations) are refused instead of mixing positions; a failure keeps the old head."""
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4)).double()
    images = torch.as_tensor(rng.random((8, 3, 16, 16)))
    with torch.no_grad():
        maps = cnn(images)
    reference = PositionalMahalanobis().double().fit(maps)
    model = DeepNeon(cnn, PositionalMahalanobis()).fit(images, batch_size=3, progress=False)
    _gaussians_close(model.head, reference, 1e-12)
    assert model.n_locations_fit_ == 8 * 16 and model.n_channels_ == 4
    with torch.no_grad():
        close(model.location_scores(images[:2]).reshape(-1), reference(maps[:2]).reshape(-1).numpy(), 1e-10)
    fitted = model.head
    with pytest.raises(ValueError, match="fits on whole maps, not on a sample of locations"):
        model.fit(images, max_locations=32, progress=False)
    with pytest.raises(ValueError, match=r"has 64 positions \(8x8\), but the 'n_positions' parameter .* is 16"):
        DeepNeon(cnn, PositionalMahalanobis(n_positions=16)).fit(torch.rand(4, 3, 32, 32, dtype=F64), progress=False)
    with pytest.raises(ValueError, match="X has 2x2 maps, but .* 4x4 maps"):  # a second batch of another size
        model.fit([images[:2], images[:2, :, :8, :8]], progress=False)
    assert model.head is fitted
    with pytest.raises(ValueError, match="fitted on the whole maps of the dataset: pass the dataset, without"):
        fit_dataset(model, images, max_locations=32, progress=False)
    _gaussians_close(fit_dataset(DeepNeon(cnn, PositionalMahalanobis()), images, batch_size=3, progress=False).head,
                     reference, 1e-12)
    # 2 maps of 8x8 give as many rows as 8 maps of 4x4: the map shape is checked, not the row count
    for run in (model, model.location_scores, lambda x: explain(model, x)):
        with pytest.raises(ValueError, match="fitted on feature maps of 4x4, one Gaussian per position; got maps of"):
            run(torch.rand(2, 3, 32, 32, dtype=F64))


# ---------------------------------------------------------------------------------------------------------------------
# PositionalMahalanobis streaming: partial_fit over chunks equals fit on their concatenation
def _gaussians_close(ours, reference, rtol):
    """Means and precision factors agree to ``rtol`` relative to their largest entry."""
    for name in ("means", "factors"):
        a, b = getattr(ours.distance, name).double(), getattr(reference.distance, name).double()
        assert a.shape == b.shape
        assert float((a - b).abs().max()) <= rtol * float(b.abs().max()), name


def _snapshot(model):
    return {key: value.clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)
            for key, value in model.state_dict().items()}


def _assert_same_state(model, snapshot):
    state = model.state_dict()
    assert list(state) == list(snapshot)
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == snapshot[key].dtype and torch.equal(value, snapshot[key]), key
        else:
            assert value == snapshot[key], key


def _statistics(maps):
    """Reference statistics in float64: per position the mean and the centred scatter (two passes, numpy)."""
    rows = maps.double().permute(0, 2, 3, 1).reshape(maps.shape[0], -1, maps.shape[1]).numpy()
    centred = rows - rows.mean(0)
    return rows.mean(0), np.einsum("nlc,nld->lcd", centred, centred)


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_positional_partial_fit_equals_fit_on_the_concatenation(rng, dtype, rtol):
    maps = torch.as_tensor(rng.normal(size=(13, 3, 2, 3)) + rng.normal(size=(1, 3, 2, 3)) * 3).to(dtype)
    sizes = [2, 5, 1, 4, 1]  # single images too; the model is usable (and right) after every chunk
    head, seen = PositionalMahalanobis(reg=0.01).to(dtype), 0
    for chunk in maps.split(sizes):
        assert head.partial_fit(chunk) is head
        seen += chunk.shape[0]
        assert head.n_images_seen_ == seen
        _gaussians_close(head, PositionalMahalanobis(reg=0.01).to(dtype).fit(maps[:seen]), rtol)
    assert head.map_shape_ == (2, 3) and head.n_features_in_ == 3
    reference = PositionalMahalanobis(reg=0.01).double().fit(maps.double())  # float64 on the same values
    _gaussians_close(head, reference, rtol)
    queries = torch.as_tensor(rng.normal(size=(4, 3, 2, 3)) * 2).to(dtype)
    close(head(queries), reference(queries.double()).numpy(), 10 * rtol)
    mean, scatter = _statistics(maps)  # float64 statistics, whatever the model's dtype
    assert head.moments.mean.dtype == head.moments.scatter.dtype == F64
    close(head.moments.mean, mean, 1e-12, scale=np.abs(mean).max())
    close(head.moments.scatter, scatter, 1e-12, scale=np.abs(scatter).max())
    close(head.variances_, np.diagonal(scatter, axis1=1, axis2=2) / 12, 1e-12)
    # the order of the images and of the chunks does not matter; neither does deferring the Gaussians to the end
    order = torch.as_tensor(rng.permutation(13))
    permuted = PositionalMahalanobis(reg=0.01).to(dtype)
    for chunk in maps[order].split([3, 1, 7, 2]):
        assert not hasattr(permuted.partial_fit(chunk, finalize=False), "n_features_in_")  # not fitted before finalize
    _gaussians_close(permuted.finalize(), head, rtol)
    # location rows (DeepNeon's layout) with n_positions, chunk by chunk
    rows = maps.permute(0, 2, 3, 1).reshape(-1, 3)
    by_rows = PositionalMahalanobis(reg=0.01, n_positions=6).to(dtype)
    for chunk in rows.split([12, 30, 36]):
        by_rows.partial_fit(chunk)
    assert by_rows.map_shape_ is None and by_rows.n_images_seen_ == 13
    _gaussians_close(by_rows, head, rtol)
    # fit starts over (exactly as on a new model), and partial_fit continues from it
    head.fit(maps[:4])
    assert head.n_images_seen_ == 4
    _gaussians_close(head, PositionalMahalanobis(reg=0.01).to(dtype).fit(maps[:4]), 0.0)
    _gaussians_close(head.partial_fit(maps[4:]), reference, rtol)
    means, factors = head.distance.means.clone(), head.distance.factors.clone()
    head.partial_fit(maps[:2] + 1, finalize=False)  # only accumulates: the Gaussians stay as they were
    assert torch.equal(head.distance.means, means) and torch.equal(head.distance.factors, factors)
    _gaussians_close(head.finalize(), PositionalMahalanobis(reg=0.01).to(dtype).fit(torch.cat([maps, maps[:2] + 1])),
                     rtol)


def test_positional_partial_fit_far_from_the_origin(rng):
    """Data far from the origin: no cancellation (raw sums of a aᵀ would lose every digit of the covariances)."""
    mixing = torch.as_tensor(rng.normal(size=(3, 3)) / 2 + np.eye(3))
    centred = torch.einsum("nchw,dc->ndhw", torch.as_tensor(rng.normal(size=(40, 3, 2, 2))), mixing)
    queries = torch.as_tensor(rng.normal(size=(5, 3, 2, 2)) * 2)
    # float32 maps at 1e3: the float64 statistics of the float32 values are exact to float64 rounding
    maps32 = (1e3 + centred).float()
    head = PositionalMahalanobis(reg=0.01)
    for chunk in maps32.split(7):
        head.partial_fit(chunk)
    mean, scatter = _statistics(maps32)
    close(head.moments.scatter, scatter, 1e-10, scale=np.abs(scatter).max())
    reference = PositionalMahalanobis(reg=0.01).double().fit(maps32.double())
    close(head(1e3 + queries.float()), reference(1e3 + queries).numpy(), 2e-3)  # float32 rounding of 1e3 + q
    # float64 maps at 1e8 (ulp 1.5e-8): the scores equal those of the same data moved to the origin
    far = PositionalMahalanobis(reg=0.01).double()
    for chunk in (1e8 + centred).split(7):
        far.partial_fit(chunk)
    near = PositionalMahalanobis(reg=0.01).double().fit(centred)
    close(far(1e8 + queries), near(queries).numpy(), 1e-5)


def test_positional_partial_fit_errors_leave_the_model_as_it_was(rng):
    maps = torch.as_tensor(rng.normal(size=(9, 3, 2, 3)))
    head = PositionalMahalanobis().double().partial_fit(maps[:5])
    snapshot = _snapshot(head)
    bad = {
        "X has 4 channels, but PositionalMahalanobis has statistics of 3 channels": maps[:2, :1].repeat(1, 4, 1, 1),
        "X has 3x2 maps, but PositionalMahalanobis has statistics of 2x3 maps": maps[:2].reshape(2, 3, 3, 2),
        "X has 2x2 maps, but PositionalMahalanobis has statistics of 2x3 maps": maps[:2, :, :, :2],
        "contains NaN or infinity": torch.where(maps[:3] > 1.5, float("nan"), maps[:3]),
        "X has 10 rows, not a multiple of n_positions=6": maps[:2].permute(0, 2, 3, 1).reshape(-1, 3)[:10],
        r"feature maps \(n, C, h, w\) or location rows": maps[:2, :, 0],
    }
    for message, chunk in bad.items():
        for finalize in (True, False):
            with pytest.raises(ValueError, match=message):
                head.partial_fit(chunk, finalize=finalize)
            _assert_same_state(head, snapshot)
    with pytest.raises(TypeError, match="has dtype torch.float32"):
        head.partial_fit(maps[5:].float())
    _assert_same_state(head, snapshot)
    by_rows = PositionalMahalanobis(n_positions=6).double().partial_fit(maps[:3].permute(0, 2, 3, 1).reshape(-1, 3))
    rows_state = _snapshot(by_rows)
    with pytest.raises(ValueError, match=r"X has 4 positions \(2x2\), but PositionalMahalanobis has statistics of 6"):
        by_rows.partial_fit(maps[:2, :, :, :2])
    _assert_same_state(by_rows, rows_state)
    by_rows.partial_fit(maps[3:].reshape(6, 3, 3, 2))  # fitted on rows: any map of 6 positions, as in forward
    close(head.partial_fit(maps[5:])(maps), PositionalMahalanobis().double().fit(maps)(maps).numpy(), 1e-10)

    # fewer than 2 images in all when finalizing: nothing is accumulated, or (finalize) nothing changes
    fresh = PositionalMahalanobis().double()
    empty = _snapshot(fresh)
    with pytest.raises(ValueError, match="needs at least 2 images to fit. Got 1 in all"):
        fresh.partial_fit(maps[:1])
    _assert_same_state(fresh, empty)
    fresh.partial_fit(maps[:1], finalize=False)
    one = _snapshot(fresh)
    with pytest.raises(ValueError, match="needs at least 2 images to fit. Got 1 in all"):
        fresh.finalize()
    _assert_same_state(fresh, one)
    with pytest.raises(ValueError, match="not fitted yet"):
        fresh(maps[:1])
    close(fresh.partial_fit(maps[1:])(maps), PositionalMahalanobis().double().fit(maps)(maps).numpy(), 1e-10)

    # a singular covariance (reg=0, 2 images, 3 channels) at finalisation: the statistics before it stay
    singular = PositionalMahalanobis(reg=0.0).double()
    blank = _snapshot(singular)
    with pytest.raises(ValueError, match="at position 0 is singular"):
        singular.partial_fit(maps[:2])
    _assert_same_state(singular, blank)
    singular.partial_fit(maps[:2], finalize=False)
    pending = _snapshot(singular)
    with pytest.raises(ValueError, match="at position 0 is singular"):
        singular.finalize()
    _assert_same_state(singular, pending)
    one_pending = PositionalMahalanobis(reg=0.0).double().partial_fit(maps[:1], finalize=False)
    before = _snapshot(one_pending)
    with pytest.raises(ValueError, match="at position 0 is singular"):  # the merged statistics were a copy
        one_pending.partial_fit(maps[1:2])
    _assert_same_state(one_pending, before)
    singular.reg = 0.01  # not fitted yet: reg may still change, and applies at finalisation
    close(singular.finalize()(maps), PositionalMahalanobis().double().fit(maps[:2])(maps).numpy(), 1e-10)

    # a failing fit keeps the old model and its statistics
    fitted = _snapshot(head)
    with pytest.raises(ValueError, match="needs at least 2 images"):
        head.fit(maps[:1])
    with pytest.raises(ValueError, match="contains NaN"):
        head.fit(maps * float("nan"))
    _assert_same_state(head, fitted)
    with pytest.raises(ValueError, match="no running statistics to continue from"):
        PositionalMahalanobis().finalize()
    with pytest.raises(ValueError, match="was fitted, but has no running statistics to continue from"):
        head.finalize(keep_statistics=False).partial_fit(maps[:2])
    assert head.n_images_seen_ == 0 and head.moments.scatter.numel() == 0
    _gaussians_close(head, PositionalMahalanobis().double().fit(maps), 1e-10)  # the Gaussians are kept


def test_positional_partial_fit_interrupted(rng, monkeypatch):
    """An interruption in the middle of the update (here in the second block of 64 positions): with finalize, the
    model is as it was; without, the half-updated statistics are marked and continuing from them raises."""
    maps = torch.as_tensor(rng.normal(size=(8, 2, 9, 8)))  # 72 positions: two blocks
    head = PositionalMahalanobis().double().partial_fit(maps[:4])
    einsum, calls = torch.einsum, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return einsum(*args, **kwargs)

    before = _snapshot(head)
    monkeypatch.setattr(torch, "einsum", interrupted)
    with pytest.raises(KeyboardInterrupt):
        head.partial_fit(maps[4:])
    _assert_same_state(head, before)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        head.partial_fit(maps[4:], finalize=False)
    monkeypatch.setattr(torch, "einsum", einsum)
    assert len(calls) == 2 and head.n_images_seen_ == 0
    assert torch.equal(head.distance.factors, before["distance.factors"])  # the Gaussians of before stay usable
    for call in (lambda: head.partial_fit(maps[4:]), head.finalize):
        with pytest.raises(ValueError, match="half-updated by an interrupted partial_fit"):
            call()
    _gaussians_close(head.fit(maps), PositionalMahalanobis().double().fit(maps), 0.0)  # fit starts over
    _gaussians_close(head.partial_fit(maps[:3]), PositionalMahalanobis().double().fit(torch.cat([maps, maps[:3]])),
                     1e-10)

def test_positional_statistics_survive_save_and_load(rng):
    maps = torch.as_tensor(rng.normal(size=(10, 3, 2, 2)))
    everything = PositionalMahalanobis(sqrt=True).double().fit(maps)
    head = PositionalMahalanobis(sqrt=True).double().partial_fit(maps[:4])
    buffer = io.BytesIO()
    torch.save(head.state_dict(), buffer)
    buffer.seek(0)
    loaded = PositionalMahalanobis(sqrt=True).double()
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    assert loaded.n_images_seen_ == 4 and torch.equal(loaded(maps), head(maps))
    _gaussians_close(loaded.partial_fit(maps[4:]), everything, 1e-10)  # continues exactly after loading

    # a state without the statistics (saved by an older version, or after finalize(keep_statistics=False)): the
    # Gaussians load; continuing raises instead of merging into nothing, even over a model that had statistics
    old = {key: value for key, value in head.state_dict().items() if not key.startswith("moments.")}
    for target in (PositionalMahalanobis(sqrt=True).double(), PositionalMahalanobis(sqrt=True).double().fit(maps)):
        target.load_state_dict(old)
        assert target.n_images_seen_ == 0 and torch.equal(target(maps), head(maps))
        with pytest.raises(ValueError, match="was fitted, but has no running statistics"):
            target.partial_fit(maps[4:])
        _gaussians_close(target.fit(maps), everything, 0.0)  # fit starts over
    freed = copy.deepcopy(head).finalize(keep_statistics=False).state_dict()
    assert freed["moments.scatter"].numel() == 0
    target = PositionalMahalanobis(sqrt=True).double().fit(maps)
    target.load_state_dict(freed)
    with pytest.raises(ValueError, match="no running statistics"):
        target.partial_fit(maps[4:])

    # dtype conversions keep the statistics in float64 (and the model's dtype that of its Gaussians)
    single = copy.deepcopy(head).float()
    assert single.distance.means.dtype == torch.float32 and single.moments.scatter.dtype == F64
    assert torch.equal(single.moments.scatter, head.moments.scatter)
    single.partial_fit(maps[4:].float())
    _gaussians_close(single, everything, 2e-6)


@pytest.mark.parametrize("make", [
    lambda X: KNNOutlier(n_neighbors=3, sqrt=True, beta=0.5).fit(X),
    lambda X: MahalanobisOutlier(reg=0.1).fit(X),
    lambda X: PCAResidual(2).fit(X),
    lambda X: GaussianMixtureOutlier(2, "spherical", random_state=0, beta=2.0).fit(X),
    lambda X: GaussianMixtureMembership(3, random_state=0).fit(X),
    lambda X: BisectingKMeansMembership(4, random_state=0, beta=0.5).fit(X),
    lambda X: WeightedKDEOutlier(gamma=0.5).fit(X, sample_weight=np.arange(1, len(X) + 1)),
    lambda X: OneClassSVMOutlier(gamma=0.5, nu=0.2).fit(X),
    lambda X: PositionalMahalanobis(n_positions=4, sqrt=True).fit(X),
    lambda X: neuralize(EllipticEnvelope(random_state=0).fit(X)),
])
def test_state_dict_round_trip_into_fresh_instance(make, blobs):
    model = make(blobs)
    fresh = type(model)(**clone(model).get_params())
    fresh.load_state_dict(model.state_dict())
    x = torch.as_tensor(blobs[:8], dtype=torch.float32)
    assert torch.equal(fresh(x), model(x))
    assert torch.equal(explain(fresh, x), explain(model, x))
    assert fresh.get_params() == model.get_params()
    assert not list(model.parameters())  # buffers, not parameters
    double = make(blobs).double()
    assert double(x.double()).dtype == F64


# ---------------------------------------------------------------------------------------------------------------------
# heads on a CNN
@pytest.mark.parametrize("head", [
    KNNOutlier(3), KNNOutlier(1, sqrt=True, fused=True), KNNOutlier(2, beta=1.0), MahalanobisOutlier(reg=1e-3),
    PCAResidual(2), GaussianMixtureOutlier(2, random_state=0), GaussianMixtureMembership(2, random_state=0),
    BisectingKMeansMembership(3, random_state=0), WeightedKDEOutlier(0.5), OneClassSVMOutlier(gamma=0.5, nu=0.3),
    PositionalMahalanobis(n_positions=64),
], ids=lambda head: type(head).__name__)
def test_every_head_inside_deep_neon(head):
    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    images = torch.randn(6, 3, 8, 8)
    deep = DeepNeon(features, head, preprocessing="torchvision").fit(images[:4], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConservationWarning)
        relevance, audit = explain(deep, images[4:], return_audit=True)
    assert relevance.shape == (2, 3, 8, 8)
    assert bool(torch.isfinite(relevance).all()) and audit.ok
    assert_no_hooks(deep)


# ---------------------------------------------------------------------------------------------------------------------
# documentation
def test_models_page_examples_run():
    """Every python block of docs/models.md, in order, in one namespace."""
    import neon_attrib

    page = (Path(__file__).resolve().parents[1] / "docs" / "models.md").read_text(encoding="utf-8")
    namespace = {key: getattr(neon_attrib, key) for key in neon_attrib.__all__}
    blocks = re.findall(r"```python\n(.*?)```", page, re.S)
    assert len(blocks) >= 5
    for block in blocks:
        exec(compile(block, "docs/models.md", "exec"), namespace)
