"""DEC, the activation-clustering surrogate and the attributable DEC heads (SPEC §5).

Tiny synthetic data and a tiny random CNN; float64 brute-force re-implementations as ground truth. The DEC models
here are deliberately under-trained (speed), so their DECTrainingWarnings are silenced; the training diagnostics,
scikit-learn compatibility and failure atomicity are tested in test_dec_training.py.
"""

from __future__ import annotations

import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch
from conftest import assert_no_hooks, require_data
from sklearn.metrics import adjusted_rand_score
from torch import nn

import neon_attrib
from neon_attrib.dec import (
    DEC,
    ActivationClusteringSurrogate,
    ClassEvidence,
    ClassEvidenceRule,
    DECHead,
    DECHeadComposite,
    SphereMembershipRule,
    TruncatedModel,
    assignment_change,
    capture_activations,
    student_t_assignment,
    target_distribution,
)

pytestmark = pytest.mark.filterwarnings("ignore::neon_attrib.dec.model.DECTrainingWarning")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread avoids barrier waits on a busy machine (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = {"pretrain_epochs": 3, "max_iter": 30, "update_interval": 10, "batch_size": 32, "hidden_dims": (16,),
        "conv_channels": (4,), "dense_dim": 8, "progress": False}
# the same for the surrogate, whose DEC minibatch size is 'dec_batch_size' ('batch_size' is the classifier's)
SUR_TINY = {("dec_batch_size" if k == "batch_size" else k): v for k, v in TINY.items()}


def blobs(n_per: int = 40, d: int = 6, k: int = 3, seed: int = 0, spread: float = 6.0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * spread
    x = torch.cat([c + torch.randn(n_per, d, generator=g) for c in centres])
    return x, torch.arange(k).repeat_interleave(n_per)


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, 4, 3, padding=1)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(4, 6, 3, stride=2, padding=1)), ("relu2", nn.ReLU()),
        ("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), ("fc", nn.Linear(6, 3)),
    ])).eval()


@pytest.fixture(scope="module")
def cnn_data():
    g = torch.Generator().manual_seed(1)
    model = tiny_cnn()
    images = torch.randn(96, 3, 8, 8, generator=g)
    images[:32, 0] += 2.0  # some structure: three groups of images
    images[32:64, 1] -= 2.0
    with torch.no_grad():
        labels = model(images).argmax(1)
    labels[::7] = (labels[::7] + 1) % 3  # the classifier is not perfect on these labels
    return model, images, labels


@pytest.fixture(scope="module")
def surrogate(cnn_data):
    model, images, labels = cnn_data
    sur = ActivationClusteringSurrogate(model, ["relu1", "relu2"], n_clusters=4, embedding_dim=3, random_state=0,
                                        **SUR_TINY)
    return sur.fit(images, labels)


# ---------------------------------------------------------------------------------------------------- DEC maths
@pytest.mark.parametrize("alpha", [100.0, 1.0])
def test_student_t_matches_formula_and_sums_to_one(alpha):
    g = torch.Generator().manual_seed(0)
    z, mu = torch.randn(20, 5, generator=g, dtype=torch.float64) * 4, torch.randn(6, 5, generator=g,
                                                                                   dtype=torch.float64) * 4
    q = student_t_assignment(z, mu, alpha)
    d2 = ((z[:, None, :] - mu[None, :, :]) ** 2).sum(-1).numpy()
    kernel = (1 + d2 / alpha) ** (-(alpha + 1) / 2)
    np.testing.assert_allclose(q.numpy(), kernel / kernel.sum(1, keepdims=True), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(q.sum(1).numpy(), 1.0, rtol=1e-12)


def test_student_t_far_points_do_not_underflow():
    q = student_t_assignment(torch.tensor([[1e4, 0.0]]), torch.tensor([[0.0, 0.0], [1.0, 0.0]]), 100.0)
    assert bool(torch.isfinite(q).all()) and q.argmax().item() == 1


def test_target_distribution_formula():
    q = torch.softmax(torch.randn(15, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64), 1)
    p = target_distribution(q).numpy()
    qn = q.numpy()
    f = qn.sum(0)
    expected = np.array([[qn[i, j] ** 2 / f[j] for j in range(4)] for i in range(15)])
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(p, expected, rtol=1e-12)
    # sharper than q: the entropy of every row drops
    entropy = lambda a: -(a * np.log(a)).sum(1)  # noqa: E731
    assert bool((entropy(p) <= entropy(qn) + 1e-12).all())


def test_assignment_change():
    assert assignment_change(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2])) == 0.25
    with pytest.raises(ValueError, match="same shape"):
        assignment_change(torch.tensor([0, 1]), torch.tensor([0]))


# ---------------------------------------------------------------------------------------------------- DEC fit
@pytest.fixture(scope="module")
def fitted_dec():
    x, y = blobs()
    params = {**TINY, "pretrain_epochs": 30, "max_iter": 60}
    return DEC(n_clusters=3, embedding_dim=3, random_state=0, **params).fit(x), x, y


def test_embeddings_on_sphere_and_predict_is_nearest_centroid(fitted_dec):
    dec, x, y = fitted_dec
    z = dec.transform(x)
    np.testing.assert_allclose(z.norm(dim=1).numpy(), 8.0, rtol=1e-5)
    q = dec.predict_proba(x)
    np.testing.assert_allclose(q.sum(1).numpy(), 1.0, rtol=1e-5)
    torch.testing.assert_close(q, student_t_assignment(z, dec.cluster_centers_, 100.0))
    assert torch.equal(dec.predict(x), torch.cdist(z, dec.cluster_centers_).argmin(1))
    assert torch.equal(dec.labels_, dec.predict(x))
    assert adjusted_rand_score(y.numpy(), dec.labels_.numpy()) > 0.9  # well separated blobs are recovered
    assert not isinstance(dec.cluster_centers_, nn.Parameter) and not dec.cluster_centers_.requires_grad


def test_custom_radius_and_conv_input_of_odd_size():
    x = torch.rand(40, 3, 9, 7)
    dec = DEC(n_clusters=2, embedding_dim=2, radius=3.0, random_state=0, **TINY).fit(x)
    assert dec.architecture_ == "conv"
    np.testing.assert_allclose(dec.transform(x).norm(dim=1).numpy(), 3.0, rtol=1e-5)
    assert dec.decoder_(dec.encoder_(x)).shape == x.shape  # the decoder restores the exact size
    pooled = DEC(n_clusters=2, embedding_dim=2, random_state=0, pool_to=4, **TINY).fit(torch.rand(30, 2, 10, 10))
    assert any(isinstance(m, nn.AvgPool2d) for m in pooled.encoder_)


def test_seeded_reproducibility_and_global_rng_untouched():
    x, _ = blobs(n_per=20)
    state = torch.get_rng_state()
    a = DEC(n_clusters=3, embedding_dim=3, random_state=7, **TINY).fit(x)
    assert torch.equal(torch.get_rng_state(), state)
    b = DEC(n_clusters=3, embedding_dim=3, random_state=7, **TINY).fit(x)
    assert torch.equal(a.cluster_centers_, b.cluster_centers_)
    assert torch.equal(a.transform(x), b.transform(x))
    c = DEC(n_clusters=3, embedding_dim=3, random_state=8, **TINY).fit(x)
    assert not torch.equal(a.cluster_centers_, c.cluster_centers_)


def test_stopping_rule():
    x, _ = blobs(n_per=20, spread=1.0)  # overlapping blobs: assignments keep changing for a while
    # keep_best=False: the fine-tuned model is kept even where it is worse (here it is; test_dec_training covers that)
    params = {**TINY, "max_iter": 50, "update_interval": 10, "finetune_lr": 0.02, "keep_best": False}
    # tol = 0 can never be met: runs to max_iter and records one change per refresh after the first
    full = DEC(n_clusters=3, embedding_dim=3, random_state=0, tol=0.0, **params).fit(x)
    assert not full.converged_ and full.n_iter_ == 50 and len(full.history_["delta_label"]) == 4
    assert len(full.history_["kl"]) == 5 and all(0.0 <= d <= 1.0 for d in full.history_["delta_label"])
    init_only = DEC(n_clusters=3, embedding_dim=3, random_state=0, **{**params, "max_iter": 0}).fit(x)
    assert init_only.n_iter_ == 0 and not torch.equal(init_only.cluster_centers_, full.cluster_centers_)  # trained
    # the stop is "fraction changed < tol", checked at every refresh of the target (every update_interval steps)
    first = full.history_["delta_label"][0]
    assert first > 0
    early = DEC(n_clusters=3, embedding_dim=3, random_state=0, tol=first + 1e-9, **params).fit(x)
    assert early.converged_ and early.n_iter_ == 10 and early.history_["delta_label"] == [first]
    strict = DEC(n_clusters=3, embedding_dim=3, random_state=0, tol=first, **params).fit(x)
    assert strict.n_iter_ > 10  # equal to tol is not below it
    expected = next((10 * (i + 1) for i, d in enumerate(full.history_["delta_label"]) if d < first), 50)
    assert strict.n_iter_ == expected


def test_dec_errors(fitted_dec):
    dec, x, _ = fitted_dec
    with pytest.raises(ValueError, match="DEC instance is not fitted"):
        DEC().predict(x)
    with pytest.raises(ValueError, match="fitted with shape"):
        dec.predict(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="NaN"):
        dec.transform(torch.full((2, 6), float("nan")))
    with pytest.raises(ValueError, match="'alpha' parameter of DEC"):
        DEC(alpha=-1.0).fit(x)
    with pytest.raises(ValueError, match="'n_clusters' parameter of DEC"):
        DEC(n_clusters=1).fit(x)
    with pytest.raises(ValueError, match="at least n_clusters"):
        DEC(n_clusters=5, **TINY).fit(x[:3])
    with pytest.raises(TypeError, match="DEC expects X"):
        DEC().fit([[1.0, 2.0]])
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        DEC().fit(torch.zeros(10))
    with pytest.raises(ValueError, match="embeddings of shape"):
        dec.proba_from_embedding(torch.zeros(2, 7))


# ---------------------------------------------------------------------------------------------------- surrogate
def test_surrogate_is_weighted_mixture_of_layer_surrogates(surrogate, cnn_data):
    model, images, _ = cnn_data
    acts, _, _ = capture_activations(model, ["relu1", "relu2"], images)
    layer = surrogate.layer_proba(images)
    for name in ["relu1", "relu2"]:
        q = surrogate.decs_[name].predict_proba(acts[name])
        torch.testing.assert_close(layer[name], q @ surrogate.class_posteriors_[name])
    proba = surrogate.predict_proba(images, weights=[3.0, 1.0])
    torch.testing.assert_close(proba, (3 * layer["relu1"] + layer["relu2"]) / 4)
    np.testing.assert_allclose(proba.sum(1).numpy(), 1.0, rtol=1e-5)
    assert_no_hooks(model)


def test_class_posteriors_are_empirical_frequencies(surrogate, cnn_data):
    _, _, labels = cnn_data
    for name in ["relu1", "relu2"]:
        assign = surrogate.train_assignments_[name]
        post = surrogate.class_posteriors_[name]
        for k in range(4):
            members = labels[assign == k]
            if len(members):
                expected = torch.bincount(members, minlength=3).float() / len(members)
            else:  # empty cluster: the training class frequencies
                expected = torch.bincount(labels, minlength=3).float() / len(labels)
            torch.testing.assert_close(post[k], expected)


def test_weights_change_without_refitting(surrogate, cnn_data):
    _, images, labels = cnn_data
    decs = dict(surrogate.decs_)
    layer = surrogate.layer_proba(images)
    try:
        surrogate.weights = {"relu2": 1.0}
        torch.testing.assert_close(surrogate.predict_proba(images), layer["relu2"])
        result = surrogate.evaluate(images, labels)
        assert result["accuracy"] == result["layer_accuracy"]["relu2"]
        assert all(surrogate.decs_[k] is v for k, v in decs.items())
    finally:
        surrogate.weights = None
    assert surrogate.weights is None  # stored as given; layer_weights() is the checked tensor
    torch.testing.assert_close(surrogate.layer_weights(), torch.ones(2, dtype=torch.float64))


def test_accuracy_and_fidelity(surrogate, cnn_data):
    model, images, labels = cnn_data
    pred = surrogate.predict(images)
    with torch.no_grad():
        model_pred = model(images).argmax(1)
    assert surrogate.accuracy(images, labels) == pytest.approx(float((pred == labels).double().mean()))
    assert surrogate.fidelity(images) == pytest.approx(float((pred == model_pred).double().mean()))
    per_layer = surrogate.layer_fidelity(images)
    layer = surrogate.layer_proba(images)
    for name, value in per_layer.items():
        assert value == pytest.approx(float((layer[name].argmax(1) == model_pred).double().mean()))
    assert set(surrogate.layer_accuracy(images, labels)) == {"relu1", "relu2"}


def test_similar_examples_brute_force(surrogate, cnn_data):
    _, images, _ = cnn_data
    queries = images[:5] + 0.1
    zq, zt = surrogate.transform(queries), surrogate.transform(images)
    w = [2.0, 0.5]
    dist = np.zeros((5, len(images)))
    for i in range(5):
        for t in range(len(images)):
            dist[i, t] = sum(wj * np.linalg.norm(zq[name][i].double().numpy() - zt[name][t].double().numpy())
                             for wj, name in zip(w, ["relu1", "relu2"]))
    idx, d = surrogate.similar_examples(queries, k=7, weights=w, chunk_size=16)  # chunks exercise the merge
    np.testing.assert_allclose(d.numpy(), np.sort(dist, axis=1)[:, :7], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dist[np.arange(5)[:, None], idx.numpy()], d.numpy(), rtol=1e-5, atol=1e-5)
    single, _ = surrogate.similar_examples(images[3], k=1)  # one image without batch dimension: itself
    assert single.shape == (1, 1) and single.item() == 3


def test_concepts_brute_force(surrogate):
    idx, d = surrogate.concepts("relu2", per_cluster=3)
    z = surrogate.train_embeddings_["relu2"].double()
    for k, mu in enumerate(surrogate.decs_["relu2"].cluster_centers_.double()):
        dist = (z - mu).norm(dim=1)
        np.testing.assert_allclose(d[k].numpy(), torch.sort(dist).values[:3].numpy(), rtol=1e-6)


def test_fit_from_loader_equals_fit_from_tensors(surrogate, cnn_data):
    model, images, labels = cnn_data
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=40)
    other = ActivationClusteringSurrogate(model, ["relu1", "relu2"], n_clusters=4, embedding_dim=3, random_state=0,
                                          **SUR_TINY).fit(loader)
    for name in ["relu1", "relu2"]:
        torch.testing.assert_close(other.decs_[name].cluster_centers_, surrogate.decs_[name].cluster_centers_)
    assert other.accuracy(loader) == pytest.approx(surrogate.accuracy(images, labels))
    assert_no_hooks(model)


def test_surrogate_errors(surrogate, cnn_data):
    model, images, labels = cnn_data
    with pytest.raises(ValueError, match="Unknown layer name 'nope'"):  # checked by fit, before anything runs
        ActivationClusteringSurrogate(model, ["relu1", "nope"]).fit(images, labels)
    with pytest.raises(ValueError, match="Unknown layer name 'nope'"):
        surrogate.concepts("nope")
    with pytest.raises(ValueError, match="Unknown layer name 'nope'"):
        surrogate.head("nope")
    fresh = ActivationClusteringSurrogate(model, ["relu1"], **SUR_TINY)
    with pytest.raises(ValueError, match="not fitted yet"):
        fresh.predict_proba(images)
    with pytest.raises(ValueError, match="labels of shape"):
        fresh.fit(images, labels[:10])
    with pytest.raises(ValueError, match="needs labels"):
        fresh.fit(images)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        fresh.fit(images, labels + 5)
    with pytest.raises(ValueError, match="fitted with images of shape"):
        surrogate.predict_proba(torch.zeros(2, 3, 9, 9))
    try:  # weights are stored as given and checked when used
        surrogate.weights = [1.0, 2.0, 3.0]
        with pytest.raises(ValueError, match="'weights' parameter of ActivationClusteringSurrogate must have one"):
            surrogate.predict_proba(images)
    finally:
        surrogate.weights = None
    with pytest.raises(ValueError, match="not all zero"):
        surrogate.predict_proba(images, weights=[0.0, 0.0])
    with pytest.raises(ValueError, match="'k' parameter"):
        surrogate.similar_examples(images[:2], k=0)
    shared = nn.ReLU()
    twice = nn.Sequential(nn.Conv2d(3, 3, 1), shared, nn.Conv2d(3, 3, 1), shared, nn.Flatten(), nn.LazyLinear(3))
    with pytest.raises(ValueError, match="ran 2 times"):
        ActivationClusteringSurrogate(twice, ["1"], **SUR_TINY).fit(images, labels)
    assert_no_hooks(twice)
    assert_no_hooks(model)


def test_surrogate_refuses_labels_it_would_misread(surrogate, cnn_data):
    model, images, labels = cnn_data
    fresh = ActivationClusteringSurrogate(model, ["relu1"], **SUR_TINY)
    with pytest.raises(ValueError, match="integer class labels.*float"):
        fresh.fit(images, labels.double() + 0.7)  # would be truncated to the same classes
    for bad in (labels.double(), labels + 3, labels - 3):
        for call in (surrogate.accuracy, surrogate.evaluate, surrogate.layer_accuracy):
            with pytest.raises(ValueError, match="labels"):
                call(images, bad)  # not an accuracy of 0.0 or of truncated labels
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels + 3), batch_size=40)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        surrogate.accuracy(loader)


@pytest.mark.parametrize("chunk_size", [0, -1, 2.5, True])
def test_similar_examples_refuses_a_bad_chunk_size(surrogate, cnn_data, chunk_size):
    with pytest.raises(ValueError, match="'chunk_size' parameter"):
        surrogate.similar_examples(cnn_data[1][:2], k=3, chunk_size=chunk_size)


# ---------------------------------------------------------------------------------------------------- heads
def test_heads_refuse_non_finite_inputs(surrogate, cnn_data, fitted_dec):
    _, images, _ = cnn_data
    broken = images[:3].clone()
    broken[1, 0, 2, 2] = float("nan")
    for head in (surrogate.head("relu2"), surrogate.class_head()):
        with pytest.raises(ValueError, match=f"{type(head).__name__}: x contains NaN or infinity"):
            neon_attrib.explain(head, broken)
    dec, X = fitted_dec[:2]
    head = DECHead.from_dec(dec)
    with pytest.raises(ValueError, match="DECHead: x contains NaN or infinity"):
        head(torch.full_like(X[:2], float("inf")))


def test_head_argmax_equals_dec_predict(surrogate, cnn_data):
    model, images, _ = cnn_data
    acts, _, _ = capture_activations(model, ["relu1", "relu2"], images)
    for name in ["relu1", "relu2"]:
        head = surrogate.head(name)
        with torch.no_grad():
            out = head(images)
        assert torch.equal(out.argmax(1), surrogate.decs_[name].predict(acts[name]))
        assert bool((out.amax(1) > 0).all())  # the evidence is positive exactly for the assigned cluster
        relevance = neon_attrib.explain(head, images[:6])
        assert relevance.shape == images[:6].shape and bool(torch.isfinite(relevance).all())
        torch.testing.assert_close(relevance, neon_attrib.explain(head, images[:6]))  # deterministic
        assert_no_hooks(head)


def test_head_on_vectors(fitted_dec):
    dec, x, _ = fitted_dec
    head = DECHead.from_dec(dec)
    assert torch.equal(head(x).argmax(1), dec.predict(x))
    assert neon_attrib.explain(head, x[:4]).shape == (4, 6)


def _naive_sphere_rule(z: np.ndarray, mu: np.ndarray, c: int, beta: float) -> np.ndarray:
    others = [k for k in range(len(mu)) if k != c]
    h = np.array([((z - mu[k]) ** 2).sum() - ((z - mu[c]) ** 2).sum() for k in others])
    p = np.exp(-beta * (h - h.min()))
    p /= p.sum()
    f = h.min()
    out = np.zeros_like(z)
    for pk, hk, k in zip(p, h, others):
        w = 2 * (mu[c] - mu[k])
        b = (mu[k] ** 2).sum() - (mu[c] ** 2).sum()
        out += pk * f * (z * w + b * z ** 2 / (z ** 2).sum()) / hk
    return out


def test_sphere_membership_rule_is_exact_and_matches_naive():
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(4, 3, generator=g, dtype=torch.float64) * 3
    z = torch.randn(6, 3, generator=g, dtype=torch.float64)
    z = 8 * z / z.norm(dim=1, keepdim=True)
    head = DECHead(nn.Identity(), mu, beta=0.5).double()
    relevance, out = neon_attrib.explain(head, z, return_output=True)
    np.testing.assert_allclose(relevance.sum(1).numpy(), out.amax(1).numpy(), rtol=1e-9)  # exact conservation
    for i in range(6):
        c = int(out[i].argmax())
        np.testing.assert_allclose(relevance[i].numpy(), _naive_sphere_rule(z[i].numpy(), mu.numpy(), c, 0.5),
                                   rtol=1e-8, atol=1e-10)
    dot = neon_attrib.explain(head, z, composite=DECHeadComposite(membership_rule="dot"))
    assert not torch.allclose(dot, relevance)  # the SPEC §3 dot rule dissipates the bias share instead


def test_rules_keep_hyperparameters_on_copy():
    assert SphereMembershipRule(beta=3.0).copy().beta == 3.0
    assert ClassEvidenceRule(beta=2.0).copy().beta == 2.0
    with pytest.raises(ValueError, match="membership_rule"):
        DECHeadComposite(membership_rule="nope")


def test_class_head_equals_surrogate_and_conserves_assigned_share(surrogate, cnn_data):
    _, images, _ = cnn_data
    head = surrogate.class_head(weights=[1.0, 2.0])
    with torch.no_grad():
        out = head(images)
    torch.testing.assert_close(out, surrogate.predict_proba(images, weights=[1.0, 2.0]))
    relevance = neon_attrib.explain(head, images[:5])
    assert relevance.shape == images[:5].shape
    assert_no_hooks(head)
    # on the embeddings alone the rule is exact: the assigned clusters' share of the predicted class
    with torch.no_grad():
        z = head.embed(images[:5]).double()
    evidence = head.evidence.double()
    wrapper = nn.Sequential(evidence)
    rel_z, s = neon_attrib.explain(wrapper, z, composite=DECHeadComposite(), return_output=True)
    q = evidence.assignments(z)
    y = s.argmax(1)
    expected = torch.zeros(5, dtype=torch.float64)
    for j in range(2):
        c = q[:, j].argmax(1)
        expected += evidence.weights[j] * evidence.posteriors[j][c, y] * q[:, j].gather(1, c[:, None])[:, 0]
    np.testing.assert_allclose(rel_z.sum((1, 2)).numpy(), expected.numpy(), rtol=1e-6)
    assert bool((expected <= s.amax(1) + 1e-12).all())


def test_truncated_model_stops_and_matches_hook(cnn_data):
    model, images, _ = cnn_data
    acts, _, _ = capture_activations(model, ["relu2"], images)
    trunc = TruncatedModel(model, "relu2")
    with torch.no_grad():
        torch.testing.assert_close(trunc(images), acts["relu2"])
    assert_no_hooks(model)
    with pytest.raises(ValueError, match="Unknown layer name"):
        TruncatedModel(model, "nope")


def test_class_evidence_is_plain_module():
    ev = ClassEvidence(torch.randn(2, 3, 4), torch.softmax(torch.randn(2, 3, 5), -1), torch.tensor([1.0, 3.0]),
                       100.0, torch.ones(2))
    out = ev(torch.randn(7, 2, 4))
    np.testing.assert_allclose(out.sum(1).numpy(), 1.0, rtol=1e-5)
    assert "centroids" in ev.state_dict() and not list(ev.parameters())


# ---------------------------------------------------------------------------------------------------- real data
@pytest.mark.data
def test_cifar_resnet_head_on_real_data():
    root = require_data("cifar10_resnet/resnet20-12fca82f.th", "cifar10_subset/cifar10_subset.npz")
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from cifar_resnet import fuse_batchnorm, load_cifar_subset, load_resnet

    model = load_resnet(20, root)
    data = load_cifar_subset(root)
    x, y = data["x_test"][:96], data["y_test"][:96]
    acts, logits, _ = capture_activations(model, ["layer3"], x)
    assert float((logits.argmax(1) == y).double().mean()) > 0.8  # the pretrained model works on the real images
    dec = DEC(n_clusters=4, embedding_dim=4, random_state=0, **TINY).fit(acts["layer3"])
    head = DECHead.from_dec(dec, features=TruncatedModel(fuse_batchnorm(model), "layer3"))
    with torch.no_grad():
        assert torch.equal(head(x).argmax(1), dec.predict(acts["layer3"]))
