"""The neuralized models reproduce the original models exactly (scikit-learn and brute force as ground truth)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_no_hooks
from sklearn.cluster import KMeans
from sklearn.neighbors import KernelDensity

from neon_attrib import ClusterDifference, KDEInlier, KDEOutlier, KMeansMembership, LogMeanExpPool, SquaredDistance
from neon_attrib.core.layers import log_mean_exp


def brute_outlier(x: np.ndarray, support: np.ndarray, gamma: float) -> np.ndarray:
    """o(x) by a float64 log-sum-exp over explicitly computed (x − u)² sums."""
    h = ((x[:, None, :] - support[None, :, :]) ** 2).sum(-1)
    a = -gamma * h
    m = a.max(1, keepdims=True)
    return -(np.log(np.exp(a - m).mean(1)) + m[:, 0]) / gamma


@pytest.mark.parametrize("d, n_support, gamma", [(1, 5, 0.3), (3, 200, 1.0), (8, 50, 5.0), (16, 1000, 0.05)])
def test_outlier_equals_brute_force_float64(rng, d, n_support, gamma):
    support = rng.normal(size=(n_support, d))
    near = rng.normal(size=(20, d))
    far = rng.normal(size=(5, d)) * 100  # far from the data: exp underflows without the max trick
    x = np.concatenate([near, far, support[:3]])
    model = KDEOutlier(gamma=gamma).double().fit(support)
    expected = brute_outlier(x, support, gamma)
    np.testing.assert_allclose(model(x).numpy(), expected, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(model.score(x).numpy(), expected, rtol=1e-6, atol=1e-9)
    assert bool((model(x) >= 0).all())


def test_outlier_far_points_float32_finite(rng):
    support = rng.normal(size=(300, 5))
    x = np.concatenate([rng.normal(size=(4, 5)) * 1e3, rng.normal(size=(4, 5))])
    model = KDEOutlier(gamma=10.0).fit(support)  # float32
    scores = model(x)
    assert scores.dtype == torch.float32 and bool(torch.isfinite(scores).all())
    np.testing.assert_allclose(scores.numpy(), brute_outlier(x, support, 10.0), rtol=1e-4)
    # o(x) >= min_k ‖x − u_k‖² (SPEC): the soft min never exceeds... it lies above the hard min
    dmin = ((x[:, None] - support[None]) ** 2).sum(-1).min(1)
    assert bool((scores.double().numpy() >= dmin * (1 - 1e-5)).all())


@pytest.mark.parametrize("d, bandwidth", [(2, 0.7), (5, 1.5), (3, 0.3)])
def test_outlier_matches_sklearn_kernel_density(rng, d, bandwidth):
    support = rng.normal(size=(150, d))
    x = rng.normal(size=(30, d)) * 1.5
    kde = KernelDensity(kernel="gaussian", bandwidth=bandwidth, rtol=0, atol=0).fit(support)
    model = KDEOutlier.from_sklearn(kde)
    assert model.gamma == pytest.approx(1 / (2 * bandwidth**2))
    log_density = kde.score_samples(x)
    # score_samples = log(1/N Σ exp(−‖x−u‖²/2h²)) − d/2 log(2πh²): exact only where sklearn's tree sum is (near data)
    converted = -(log_density + d / 2 * np.log(2 * np.pi * bandwidth**2)) / model.gamma
    np.testing.assert_allclose(model(x).numpy(), converted, rtol=1e-6)


def test_from_sklearn_rejects_bad_estimators(rng):
    with pytest.raises(ValueError, match="kernel='gaussian'"):
        KDEOutlier.from_sklearn(KernelDensity(kernel="tophat").fit(rng.normal(size=(10, 2))))
    with pytest.raises(ValueError, match="not fitted"):
        KDEOutlier.from_sklearn(KernelDensity())
    with pytest.raises(TypeError, match="KernelDensity"):
        KDEOutlier.from_sklearn(KMeans())
    with pytest.raises(ValueError, match="sample_weight"):
        KDEOutlier.from_sklearn(KernelDensity().fit(rng.normal(size=(10, 2)), sample_weight=np.ones(10)))


def test_leave_one_out_scores_equal_refits(rng):
    support = rng.normal(size=(40, 3))
    model = KDEOutlier(gamma=0.8).double().fit(support)
    loo = model.score_training(leave_one_out=True)
    for i in (0, 17, 39):
        refit = KDEOutlier(gamma=0.8).double().fit(np.delete(support, i, axis=0))
        assert float(refit(support[i:i + 1])[0]) == pytest.approx(float(loo[i]), rel=1e-12)
        assert float(model.leave_one_out(i)(support[i:i + 1])[0]) == pytest.approx(float(loo[i]), rel=1e-12)
    inlier = KDEInlier(gamma=0.8, n_features=300, random_state=3).double().fit(support)
    loo_i = inlier.score_training(leave_one_out=True)
    assert float(inlier.leave_one_out(5)(support[5:6])[0]) == pytest.approx(float(loo_i[5]), rel=1e-10)


def test_kmeans_argmax_equals_sklearn_predict(rng, blobs):
    kmeans = KMeans(n_clusters=3, n_init=4, random_state=0).fit(blobs)
    model = KMeansMembership.from_sklearn(kmeans)
    x = np.concatenate([blobs, rng.normal(size=(200, 4)) * 4])
    np.testing.assert_array_equal(model.predict(x).numpy(), kmeans.predict(x))
    fitted = KMeansMembership(n_clusters=3, n_init=4, random_state=0).double().fit(blobs)
    np.testing.assert_array_equal(fitted.predict(blobs).numpy(), fitted.kmeans_labels_)


def test_kmeans_evidence_is_min_difference_of_squared_distances(rng, blobs):
    model = KMeansMembership(n_clusters=3, random_state=1).double().fit(blobs)
    x = rng.normal(size=(50, 4)) * 3
    centres = model.cluster_centers_.numpy()
    d = ((x[:, None] - centres[None]) ** 2).sum(-1)
    expected = np.stack([np.delete(d, c, axis=1).min(1) - d[:, c] for c in range(3)], 1)
    evidence = model(x).numpy()
    np.testing.assert_allclose(evidence, expected, rtol=1e-10, atol=1e-10)
    assert bool(((evidence > 0).sum(1) == 1).all())  # exactly one positive entry off the borders


def test_kmeans_border_point_has_no_positive_evidence():
    data = np.array([[0.0, 0], [0, 0.1], [2, 0], [2, 0.1]])
    model = KMeansMembership(n_clusters=2, random_state=0).double().fit(data)
    evidence = model(np.array([[1.0, 0.05]]))
    assert bool((evidence <= 1e-12).all())


def test_random_features_converge_and_are_seeded(rng):
    support = rng.normal(size=(80, 3))
    x = rng.normal(size=(40, 3))
    exact = KDEInlier(gamma=0.5, random_state=0).double().fit(support).exact(x)
    brute = np.exp(-0.5 * ((x[:, None] - support[None]) ** 2).sum(-1)).mean(1)
    np.testing.assert_allclose(exact.numpy(), brute, rtol=1e-10)
    errors = []
    for h in (100, 1000, 10000):
        runs = [KDEInlier(gamma=0.5, n_features=h, random_state=s).double().fit(support)(x) - exact for s in range(4)]
        errors.append(float(torch.stack(runs).pow(2).mean().sqrt()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.5 * errors[0] / np.sqrt(10)  # ~1/√H decay (10x H → ~3.2x smaller)
    a = KDEInlier(gamma=0.5, n_features=50, random_state=7).fit(support)
    b = KDEInlier(gamma=0.5, n_features=50, random_state=7).fit(support)
    c = KDEInlier(gamma=0.5, n_features=50, random_state=8).fit(support)
    assert torch.equal(a.features.omega, b.features.omega) and torch.equal(a(x), b(x))
    assert not torch.equal(a.features.omega, c.features.omega)
    # the draw is made in float64 on the CPU: the float32 model is the cast of the float64 one
    d64 = KDEInlier(gamma=0.5, n_features=50, random_state=7).double().fit(support)
    assert torch.equal(d64.features.omega.float(), a.features.omega)


@pytest.mark.parametrize("make", [
    lambda: KDEOutlier(gamma=0.7, beta=2.0, eps=0.1),
    lambda: KDEInlier(gamma=0.7, n_features=64, random_state=1, eps=0.5),
    lambda: KMeansMembership(n_clusters=3, random_state=0, centroid_norm=2.0),
])
def test_state_dict_round_trip_into_fresh_model(make, blobs):
    model = make().double().fit(blobs)
    fresh = type(model)().double()
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(blobs), model(blobs))
    for key in model._state_attributes:
        assert getattr(fresh, key) == getattr(model, key)


def test_dtype_and_input_conversion(blobs):
    model = KDEOutlier(gamma=0.5).fit(blobs)  # float32 by default: fit casts
    assert model.support_.dtype == torch.float32
    ints = np.round(blobs).astype(np.int64)
    assert model(ints).dtype == torch.float32
    assert torch.equal(model(torch.as_tensor(ints)), model(ints))
    with pytest.raises(TypeError, match="dtype torch.float64"):
        model(torch.as_tensor(blobs))  # a float64 tensor into a float32 model: as torch layers, refuse
    double = KDEOutlier(gamma=0.5).double().fit(blobs)
    assert double(blobs).dtype == torch.float64
    np.testing.assert_allclose(model(blobs).numpy(), double(blobs).numpy(), rtol=1e-4)


def test_buffers_not_parameters(blobs):
    for model in (KDEOutlier().fit(blobs), KDEInlier(n_features=8, random_state=0).fit(blobs),
                  KMeansMembership(3, random_state=0).fit(blobs)):
        assert list(model.parameters()) == []
        assert len(list(model.buffers())) >= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(blobs):
    for model in (KDEOutlier(gamma=0.5), KDEInlier(gamma=0.5, n_features=64, random_state=0),
                  KMeansMembership(3, random_state=0)):
        cpu = model.double().fit(blobs)
        gpu = type(model)().double().cuda()
        gpu.load_state_dict(cpu.state_dict())
        np.testing.assert_allclose(gpu(blobs).cpu().numpy(), cpu(blobs).numpy(), rtol=1e-10)


def test_layers_work_standalone_and_chunked(rng):
    support = torch.as_tensor(rng.normal(size=(100, 3)))
    x = torch.as_tensor(rng.normal(size=(7, 3)))
    h = SquaredDistance(support)(x)
    np.testing.assert_allclose(h.numpy(), ((x[:, None] - support[None]) ** 2).sum(-1).numpy(), rtol=1e-10)
    whole = LogMeanExpPool(alpha=-0.5)(h)
    chunked = log_mean_exp(h, -0.5, chunk_size=7)  # 15 chunks of 7 support points
    np.testing.assert_allclose(chunked.numpy(), whole.numpy(), rtol=1e-12)
    layer = ClusterDifference(support[:4])
    assert layer(x).shape == (7, 4, 3)
    assert_no_hooks(layer)


# -- bad input: clear errors, nothing changed --------------------------------------------------------------------------
def test_errors_name_class_and_problem(blobs):
    with pytest.raises(ValueError, match="'gamma' parameter of KDEOutlier must be a float > 0. Got -1.0"):
        KDEOutlier(gamma=-1.0).fit(blobs)
    with pytest.raises(ValueError, match="'gamma' parameter of KDEInlier"):
        KDEInlier(gamma=0).fit(blobs)
    with pytest.raises(ValueError, match="This KMeansMembership instance is not fitted yet. Call 'fit' first."):
        KMeansMembership(3)(blobs)
    with pytest.raises(ValueError, match="X has 3 features, but KDEOutlier was fitted with 4 features."):
        KDEOutlier().fit(blobs)(blobs[:, :3])
    with pytest.raises(ValueError, match="KDEInlier contains NaN"):
        KDEInlier(n_features=4, random_state=0).fit(np.where(np.eye(60, 4) > 0, np.nan, blobs))
    with pytest.raises(ValueError, match="n_clusters=5 needs at least that many samples. Got 4"):
        KMeansMembership(n_clusters=5).fit(blobs[:4])
    with pytest.raises(ValueError, match="must be 2-D"):
        KDEOutlier().fit(blobs[0])
    with pytest.raises(TypeError, match="array-like of numbers"):
        KDEOutlier().fit([["a", "b"]])


def test_failed_fit_changes_nothing(blobs):
    model = KDEOutlier(gamma=0.5).double().fit(blobs)
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    bad = blobs.copy()
    bad[3, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or infinity"):
        model.fit(bad)
    with pytest.raises(ValueError, match="'gamma'"):  # a fitted model validates a new hyperparameter at once
        model.gamma = -2.0
    assert model.gamma == 0.5
    unfitted = KDEOutlier(gamma=-2.0)
    with pytest.raises(ValueError, match="'gamma'"):
        unfitted.fit(blobs[:10])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    kmeans = KMeansMembership(3, random_state=0).double().fit(blobs)
    centres = kmeans.cluster_centers_.clone()
    with pytest.raises(ValueError, match="needs a new fit"):
        kmeans.n_clusters = 100
    unfitted = KMeansMembership(100, random_state=0).double()
    with pytest.raises(ValueError):
        unfitted.fit(blobs[:50])
    assert torch.equal(kmeans.cluster_centers_, centres)


def test_fused_outlier_equals_layered_values_and_gradients(rng):
    support = np.abs(rng.normal(size=(500, 6)))
    x = torch.as_tensor(np.abs(rng.normal(size=(5, 6))) * 3, dtype=torch.float64).requires_grad_()
    layered = KDEOutlier(gamma=0.5, chunk_size=37).double().fit(support)
    fused = KDEOutlier(gamma=0.5, chunk_size=37, fused=True).double().fit(support)
    np.testing.assert_allclose(fused(x).detach().numpy(), layered(x).detach().numpy(), rtol=1e-12)
    (g_layered,) = torch.autograd.grad(layered(x).sum(), x)
    (g_fused,) = torch.autograd.grad(fused(x).sum(), x)
    np.testing.assert_allclose(g_fused.numpy(), g_layered.numpy(), rtol=1e-9, atol=1e-12)
    assert fused.leave_one_out(0).fused


def test_reduced_support_herding_beats_random(rng):
    support = np.concatenate([rng.normal(size=(1500, 4)), rng.normal(size=(500, 4)) + 4])
    x = np.concatenate([rng.normal(size=(100, 4)), rng.normal(size=(50, 4)) + 4, rng.normal(size=(50, 4)) * 3])
    full = KDEOutlier(gamma=0.3, eps=0.2).double().fit(support)
    scores = full.score(x)

    def error(method):
        runs = [full.reduced(60, method=method, seed=s) for s in range(3)]
        assert all(r.support_.shape == (60, 4) and r.gamma == 0.3 and r.eps == 0.2 for r in runs)
        return np.mean([float(((r.score(x) - scores).abs() / scores).mean()) for r in runs])

    assert error("herding") < error("random")
    chosen = full.reduced(60, seed=0).support_
    assert bool((chosen[:, None] == full.support_[None]).all(-1).any(1).all())  # a subset of the support points
    with pytest.raises(ValueError, match="exceeds the 2000 support points"):
        full.reduced(5000)
    with pytest.raises(ValueError, match="'method' parameter"):
        full.reduced(10, method="magic")
