"""No silent wrong answers: concurrency, explainer lifetime, grad modes, empty batches, float32 numerics, argument
checks, atomic updates, uncovered architectures and the conservation audit."""

from __future__ import annotations

import copy
import math
import threading
import warnings

import numpy as np
import pytest
import torch
from conftest import assert_no_hooks
from sklearn.neighbors import NearestNeighbors
from torch import nn
from zennit.composites import EpsilonGammaBox

from neon_attrib import (
    Audit,
    ConservationError,
    ConservationWarning,
    KDEInlier,
    KDEOutlier,
    KMeansMembership,
    explain,
    neuralize,
)
from neon_attrib.core.composites import NeonComposite
from neon_attrib.evaluation.curves import deletion_curve
from neon_attrib.integrations.captum import NeonLRP
from neon_attrib.pipeline.engine import _report
from neon_attrib.pipeline.graph import register_gradient_leaf
from neon_attrib.vision.deep import DeepNeon


def tiny_cnn(seed: int = 0, dtype=torch.float64) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1),
                         nn.ReLU()).to(dtype).eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def deep_kde(images, fused=False):
    return DeepNeon(tiny_cnn(), KDEOutlier(gamma=0.5, fused=fused), low=-0.0, high=1.0).fit(images, progress=False)


def deep_kmeans(images):
    head = KMeansMembership(n_clusters=2, n_init=1, random_state=0)
    return DeepNeon(tiny_cnn(), head, pool="positive", low=0.0, high=1.0).fit(images, progress=False)


# ---------------------------------------------------------------------------------------------------------------------
# threads and explainer lifetime
def _in_threads(function, inputs, n_threads=4, repeats=3):
    results, errors = {}, []

    def work(i):
        try:
            for _ in range(repeats):
                results[i] = function(inputs[i % len(inputs)])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return results


class _SkipNet(nn.Module):
    """Functional ReLUs and an addition: explained through the graph canonizer (torch.fx tracing)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        a = torch.relu(self.conv1(x))
        return torch.relu(a + self.conv2(a))


@pytest.mark.parametrize("kind", ["kde", "kmeans", "deep", "neonlrp", "graph"])
def test_concurrent_explanations_on_one_model_are_correct(kind, blobs, images):
    if kind == "kde":
        model = KDEOutlier(gamma=0.5).double().fit(blobs)
        inputs = [torch.as_tensor(blobs[i:i + 3]) for i in range(4)]
    elif kind == "kmeans":
        model = KMeansMembership(3, random_state=0).double().fit(blobs)
        inputs = [torch.as_tensor(blobs[i::7]) for i in range(4)]
    elif kind == "graph":  # torch.fx patches nn.Module.__call__ process-wide while it traces: threads take turns
        torch.manual_seed(0)
        model = DeepNeon(_SkipNet().double(), KDEOutlier(gamma=0.5), low=0.0, high=1.0).fit(images, progress=False)
        inputs = [images[i:i + 2] for i in range(3)]
    else:
        model, inputs = deep_kde(images), [images[i:i + 2] for i in range(3)]
    run = (lambda x: NeonLRP(model).attribute(x)) if kind == "neonlrp" else (lambda x: explain(model, x))
    expected = [run(x) for x in inputs]
    results = _in_threads(run, inputs, n_threads=8 if kind == "graph" else 4, repeats=6 if kind == "graph" else 3)
    for i, relevance in results.items():
        torch.testing.assert_close(relevance, expected[i % len(inputs)], rtol=1e-12, atol=1e-12)
    assert_no_hooks(model)


def test_explainer_without_with_leaks_nothing_and_explain_inside_is_unaffected(images):
    model = deep_kde(images)
    expected = explain(model, images[:2])
    _, relevance = model.explainer()(images[:2])  # never closed
    torch.testing.assert_close(relevance, expected)
    assert_no_hooks(model)
    with model.explainer() as explainer:
        torch.testing.assert_close(explain(model, images[:2]), expected)  # no stacked hooks
        torch.testing.assert_close(explainer(images[:2])[1], expected)
    shared = model.explainer()
    results = _in_threads(lambda x: shared(x)[1], [images[:2]])
    torch.testing.assert_close(results[0], expected)


def test_explainer_does_not_modify_its_input():
    model = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(3, 2, 1)).double().eval()
    from neon_attrib.vision.fast import FastEpsilonGammaBox, LRPExplainer

    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    before = x.clone()
    with LRPExplainer(model, FastEpsilonGammaBox(low=-5.0, high=5.0), audit=False) as explainer:
        explainer(x)
    assert torch.equal(x, before)


# ---------------------------------------------------------------------------------------------------------------------
# grad modes and empty batches
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_explain_inside_no_grad_and_inference_mode(mode, blobs, images):
    kde = KDEOutlier(gamma=0.5).double().fit(blobs)
    deep = deep_kde(images)
    expected = explain(kde, blobs[:3]), explain(deep, images[:2])
    with mode():
        torch.testing.assert_close(explain(kde, blobs[:3]), expected[0])
        torch.testing.assert_close(explain(deep, images[:2]), expected[1])
    with mode():  # a model built inside inference mode holds inference tensors
        inner = KMeansMembership(3, random_state=0).double().fit(blobs)
    assert explain(inner, blobs[:2]).shape == (2, 4)


def test_empty_batches_give_empty_results(blobs, images):
    kde = KDEOutlier(gamma=0.5).double().fit(blobs)
    kmeans = KMeansMembership(3, random_state=0).double().fit(blobs)
    for model in (kde, kmeans):
        relevance, output = explain(model, blobs[:0], return_output=True)
        assert relevance.shape == (0, 4) and output.shape[0] == 0
        assert NeonLRP(model).attribute(torch.as_tensor(blobs[:0])).shape == (0, 4)
    for deep in (deep_kde(images), deep_kmeans(images)):
        assert explain(deep, images[:0]).shape == (0, 3, 8, 8)
        with deep.explainer() as explainer:
            assert explainer(images[:0])[1].shape == (0, 3, 8, 8)
    curve = deletion_curve(kde, torch.as_tensor(blobs[:0]), torch.zeros(0, 4, dtype=torch.float64))
    assert curve.scores.shape[0] == 0


# ---------------------------------------------------------------------------------------------------------------------
# float32 numerics
def test_float32_far_from_the_origin_matches_float64(rng):
    X = rng.normal(size=(300, 5))
    x = X[:6] + 0.3
    for offset in (1e3, 1e4):
        r32 = explain(KDEOutlier(gamma=0.5).fit(X + offset), x + offset).double()
        r64 = explain(KDEOutlier(gamma=0.5).double().fit(X + offset), x + offset)
        # float32 cannot even hold the inputs better than eps·offset: compare at that resolution
        assert float((r32 - r64).abs().max() / r64.abs().max()) < 200 * offset * 1.2e-7
        m32 = KMeansMembership(4, random_state=0).fit(X + offset)
        assert (m32.predict(X + offset).numpy() == m32.labels_).all()


def test_tiny_gamma_keeps_float32_precision(rng):
    X = rng.normal(size=(50, 3))
    for fused in (False, True):
        o32 = KDEOutlier(gamma=1e-12, fused=fused).fit(X)(X[:4]).double()
        o64 = KDEOutlier(gamma=1e-12).double().fit(X)(X[:4])
        torch.testing.assert_close(o32, o64, rtol=1e-5, atol=0)
        assert bool((o64 > 1).all())  # ≈ mean squared distance, not 0


def test_overflowing_distances_give_inf_scores_and_failed_audits_not_nan(rng):
    X = rng.normal(size=(30, 3))
    far32 = torch.full((2, 3), 1e20)  # squared distances overflow float32 (1e40 > 3.4e38); the inputs do not
    far64 = torch.full((2, 3), 1e200, dtype=torch.float64)
    for model, far in ((KDEOutlier(gamma=0.5).fit(X), far32), (KDEOutlier(gamma=0.5).double().fit(X), far64)):
        for score in (model(far), model.score(far), model.set_params(fused=True)(far)):
            assert bool(torch.isinf(score).all()) and bool((score > 0).all()), score  # the limit, not NaN
        model.fused = False
        with pytest.warns(ConservationWarning, match="not finite"):
            _, audit = explain(model, far, return_audit=True)
        assert not audit.ok
    assert bool((KDEInlier(gamma=0.5, random_state=0).fit(X).exact(far32) == 0).all())  # the density underflows to 0
    assert bool((KDEInlier(gamma=0.5, random_state=0).double().fit(X).exact(far64) == 0).all())
    knn = neuralize(NearestNeighbors(n_neighbors=2).fit(X), dtype=torch.float64)
    kmeans = KMeansMembership(3, random_state=0).fit(X)
    for model, far in ((knn, far64), (kmeans, torch.full((2, 3), 1e38))):
        assert not bool(torch.isnan(model(far)).any())
        with pytest.raises(ConservationError, match="not finite"):
            explain(model, far, strict=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_beta_gives_the_hard_argmin_not_nan(blobs, dtype):
    x = torch.as_tensor(blobs[:6], dtype=dtype)
    hard = KMeansMembership(3, random_state=0, beta=1e300).to(dtype).fit(blobs)  # β·h overflows (float32: β itself)
    sharp = KMeansMembership(3, random_state=0, beta=1e6).to(dtype).fit(blobs)  # exp(−β · gap) = 0: the argmin already
    relevance, audit = explain(hard, x, return_audit=True)
    assert audit.ok and bool(torch.isfinite(relevance).all())
    torch.testing.assert_close(relevance, explain(sharp, x))


def test_kernel_widths_the_dtype_cannot_hold_are_refused(rng):
    X = rng.normal(size=(20, 3))
    for make in (lambda: KDEOutlier(gamma=1e-300), lambda: KDEInlier(gamma=1e-300, random_state=0)):
        with pytest.raises(ValueError, match=r"'gamma' parameter of KDE\w+ is 1e-300, which torch.float32 cannot"):
            make().fit(X)
        model = make().double().fit(X)  # float64 holds it ...
        assert bool(torch.isfinite(model(X[:2])).all())
        with pytest.raises(ValueError, match="float64"):
            model.float()(X[:2])  # ... float32 would compute with 0
    wide = KDEOutlier(gamma=0.5, eps=1e300).fit(X)
    with pytest.raises(ValueError, match=r"'eps' parameter of KDEOutlier is 1e\+300"):
        wide(X[:2])


def test_batch_size_does_not_change_the_explanation():
    torch.manual_seed(0)
    features = tiny_cnn(dtype=torch.float32)
    images = torch.rand(6, 3, 16, 16)
    with torch.no_grad():
        fmap = features(images)
    from neon_attrib.vision.deep import median_gamma

    rows = fmap.permute(0, 2, 3, 1).reshape(-1, fmap.shape[1])
    model = DeepNeon(features, KDEOutlier(gamma=median_gamma(rows)), low=0.0, high=1.0).fit(images, progress=False)
    batched = explain(model, images)
    alone = torch.cat([explain(model, images[i:i + 1]) for i in range(6)])
    scale = float(batched.abs().max())
    assert float((batched - alone).abs().max()) < 1e-5 * scale


# ---------------------------------------------------------------------------------------------------------------------
# arguments
def test_bad_hyperparameters_are_refused_early(blobs):
    with pytest.raises(ValueError, match="'eps'"):
        KDEOutlier(gamma=1.0, eps=float("inf")).fit(blobs)
    with pytest.raises(ValueError, match="'lrp_gamma'"):
        DeepNeon(tiny_cnn(), KDEOutlier(gamma=1.0), lrp_gamma=float("nan"))
    with pytest.raises(ValueError, match="'low' must be below 'high'"):
        DeepNeon(tiny_cnn(), KDEOutlier(gamma=1.0), low=1.0, high=0.0)
    with pytest.raises(ValueError, match="finite"):
        DeepNeon(tiny_cnn(), KDEOutlier(gamma=1.0), low=float("-inf"), high=0.0)
    model = KDEOutlier(gamma=1.0).double().fit(blobs)
    with pytest.raises(ValueError, match="'n_candidates'"):
        model.reduced(10, n_candidates=5)
    with pytest.raises(ValueError, match="'batch_size'"):
        deletion_curve(model, torch.as_tensor(blobs[:2]), torch.ones(2, 4, dtype=torch.float64), batch_size=-1)


def test_numpy_scalar_hyperparameters_give_a_weights_only_state_dict(blobs, tmp_path):
    model = KDEOutlier(gamma=np.float64(0.5), beta=np.float32(1.0)).double().fit(blobs)
    path = tmp_path / "kde.pt"
    torch.save(model.state_dict(), path)
    fresh = KDEOutlier().double()
    fresh.load_state_dict(torch.load(path, weights_only=True))
    torch.testing.assert_close(fresh(blobs[:3]), model(blobs[:3]))


def test_setting_a_hyperparameter_after_fit_takes_effect_everywhere(blobs):
    model = KDEOutlier(gamma=1.0).double().fit(blobs)
    model.gamma = 2.0
    reference = KDEOutlier(gamma=2.0).double().fit(blobs)
    torch.testing.assert_close(model(blobs[:3]), reference(blobs[:3]))
    torch.testing.assert_close(model.score(blobs[:3]), reference(blobs[:3]))
    torch.testing.assert_close(explain(model, blobs[:3]), explain(reference, blobs[:3]))
    inlier = KDEInlier(gamma=1.0, n_features=50, random_state=0).double().fit(blobs)
    with pytest.raises(ValueError, match="needs a new fit"):
        inlier.gamma = 2.0
    kmeans = KMeansMembership(3, random_state=0).double().fit(blobs)
    kmeans.beta = 5.0
    assert kmeans.pool.beta == 5.0
    kmeans.beta = None
    assert kmeans.pool.beta == kmeans.default_beta_


def test_failed_fit_self_keeps_a_working_model(images):
    model = deep_kde(images)
    expected = model(images)
    with pytest.raises((ValueError, RuntimeError)):
        model.fit_self(images[:, :, :1, :1])  # no location survives the max pool
    torch.testing.assert_close(model(images), expected)
    assert type(model.head) is KDEOutlier


# ---------------------------------------------------------------------------------------------------------------------
# architectures the rules do not cover, and the audit
def test_resnet_features_without_canonizer_raise():
    import torchvision

    resnet = torchvision.models.resnet18(weights=None).eval()
    features = nn.Sequential(*list(resnet.children())[:-2])
    images = torch.rand(2, 3, 32, 32)
    model = DeepNeon(features, KDEOutlier(gamma=1e-3), composite=EpsilonGammaBox(low=-3.0, high=3.0))
    model.fit(images, progress=False)
    with pytest.raises(ValueError, match="ResNetCanonizer"):
        explain(model, images)
    assert_no_hooks(model)


def _bn_classifier() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
                          nn.Linear(6 * 8 * 8, 3)).double()
    model.train()
    with torch.no_grad():  # running statistics far from the batch's: merged into the convolution, they are not the
        model(3 * torch.rand(16, 3, 8, 8, dtype=torch.float64) + 1)  # statistics a training-mode forward uses
    return model


@pytest.mark.parametrize("entry", ["explain", "explainer", "torchvision"])
def test_models_in_training_mode_are_refused_before_any_canonizer(entry, images):
    """A batch norm in training mode normalises with the batch's statistics, while the canonizers merge its running
    statistics: the heatmap explained neither the model's output nor the eval-mode model, conserved relevance and
    passed the audit. Refused on every entry point; after ``eval()`` the same call works."""
    import torchvision

    from neon_attrib.vision import default_canonizers
    from neon_attrib.vision.fast import FastEpsilonGammaBox, LRPExplainer, MergeBatchNorms

    if entry == "explain":
        model = DeepNeon(_bn_classifier()[:3], KDEOutlier(gamma=0.5), low=0.0, high=1.0).fit(images, progress=False)
        model.train()
        call = lambda: explain(model, images)  # noqa: E731
    else:
        model = _bn_classifier() if entry == "explainer" else torchvision.models.resnet18(num_classes=3).train()
        canonizers = [MergeBatchNorms()] if entry == "explainer" else default_canonizers(model)
        composite = FastEpsilonGammaBox(low=0.0, high=1.0, canonizers=canonizers)
        x = images if entry == "explainer" else images.float()

        def call():
            with LRPExplainer(model, composite) as explainer:
                return explainer(x, lambda out: out)[1]
    state = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match=r"\(BatchNorm2d\) normalises with the statistics of each batch \(training "
                                         r"mode\).*Call model\.eval\(\)"):
        call()
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert_no_hooks(model)
    model.eval()
    assert torch.isfinite(call()).all()


def test_batch_statistics_and_active_dropout_are_refused_plain_training_mode_is_not(images):
    from neon_attrib.pipeline.engine import check_explainable
    from neon_attrib.vision.fast import FastEpsilonGammaBox, LRPExplainer

    no_stats = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    with pytest.raises(ValueError, match=r"1 \(BatchNorm2d\) .*\(it keeps no running statistics\)"):
        check_explainable(no_stats)
    for module in (nn.Dropout(0.5), nn.Dropout2d(0.1), nn.AlphaDropout(0.2), nn.RReLU()):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), module).train()
        with pytest.raises(ValueError, match=rf"1 \({type(module).__name__}\) is in training mode and is random"):
            check_explainable(model)
        check_explainable(model.eval())
    # modules whose output does not depend on the flag explain in training mode, as in eval mode
    plain = nn.Sequential(tiny_cnn(), nn.Dropout(0.0), nn.Flatten(), nn.Linear(8 * 4 * 4, 2)).double()
    results = []
    for training in (True, False):
        with LRPExplainer(plain.train(training), FastEpsilonGammaBox(low=0.0, high=1.0)) as explainer:
            results.append(explainer(images, lambda out: out)[1])
    assert torch.equal(*results)


def test_compiled_modules_are_refused(images):
    """``torch.compile``'s graph bypasses the rules' hooks: the heatmap was wrong (the audit warned of relevance
    created without a rule, which sent users looking for a missing canonizer)."""
    from neon_attrib.vision.fast import FastEpsilonGammaBox, LRPExplainer

    net = tiny_cnn()
    for model, name in ((torch.compile(net), "model"), (nn.Sequential(torch.compile(net), nn.Flatten()), "0")):
        with pytest.raises(ValueError, match=rf"compiled with torch\.compile.*Explain the original module "
                                             rf"\({name}\._orig_mod"):
            LRPExplainer(model, FastEpsilonGammaBox(low=0.0, high=1.0))
    with LRPExplainer(net, FastEpsilonGammaBox(low=0.0, high=1.0)) as explainer:  # the original module explains
        assert torch.isfinite(explainer(images, lambda out: out)[1]).all()


class _SharedConv(nn.Module):
    """One convolution applied twice (shared weights), one ReLU module used three times."""

    def __init__(self, separate: bool = False) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.first, self.conv, self.relu = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU()
        self.second = copy.deepcopy(self.conv) if separate else self.conv
        self.double().eval()

    def forward(self, x):
        return self.relu(self.second(self.relu(self.conv(self.relu(self.first(x))))))


@pytest.mark.parametrize("base", ["fast", "EpsilonGammaBox", "EpsilonPlusFlat"])
def test_a_module_called_twice_is_explained_per_call_or_refused(base, images):
    """Zennit's rules keep one input per module, so a shared convolution explained both calls with the last call's
    input: 100 % off, conserving relevance (the audit passed). The fast rules keep every call's input (the heatmap
    equals that of the network with a copy per call); Zennit's composites are refused, except for pass-through rules
    (the shared ReLU)."""
    from zennit.composites import EpsilonPlusFlat

    from neon_attrib.vision.fast import FastEpsilonGammaBox, LRPExplainer

    def composite():
        return {"fast": None, "EpsilonGammaBox": EpsilonGammaBox(low=0.0, high=1.0),
                "EpsilonPlusFlat": EpsilonPlusFlat()}[base]

    def deep(separate):
        kwargs = {} if base == "fast" else {"composite": composite()}
        return DeepNeon(_SharedConv(separate), KDEOutlier(gamma=0.5), low=0.0, high=1.0, **kwargs).fit(
            images, progress=False)

    separate = explain(deep(True), images)  # Pass on the ReLU used three times is right with every composite
    if base == "fast":
        torch.testing.assert_close(explain(deep(False), images), separate, rtol=1e-12, atol=0)
        with LRPExplainer(_SharedConv(), FastEpsilonGammaBox(low=0.0, high=1.0)) as explainer:
            shared = explainer(images, lambda out: out)[1]
        with LRPExplainer(_SharedConv(True), FastEpsilonGammaBox(low=0.0, high=1.0)) as explainer:
            torch.testing.assert_close(shared, explainer(images, lambda out: out)[1], rtol=1e-12, atol=0)
        return
    message = r"features\.conv \(Conv2d\) is called more than once in one forward pass .* keeps one input per module"
    with pytest.raises(ValueError, match=message):
        explain(deep(False), images)
    with pytest.raises(ValueError, match=message.replace("features\\.", "")):
        with LRPExplainer(_SharedConv(), composite()) as explainer:
            explainer(images, lambda out: out)


def test_relevance_put_on_the_output_must_broadcast_to_it(images):
    from neon_attrib.vision.fast import FastEpsilonGammaBox, LRPExplainer

    model = nn.Sequential(tiny_cnn(), nn.Flatten(), nn.Linear(8 * 4 * 4, 3)).double().eval()
    with LRPExplainer(model, FastEpsilonGammaBox(low=0.0, high=1.0)) as explainer:
        with pytest.raises(ValueError, match=r"has shape \(4,\), which does not broadcast to the output's \(4, 3\)"
                                             r".*not class indices"):
            explainer(images, lambda out: out.argmax(1))  # class indices instead of the relevance of each output
        with pytest.raises(TypeError, match=r"must be a tensor\. Got list"):
            explainer(images, lambda out: [1.0, 0.0, 0.0])
        one_row = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)  # broadcast over the batch, as documented
        torch.testing.assert_close(explainer(images, one_row)[1], explainer(images, one_row.expand(4, 3))[1],
                                   rtol=0, atol=0)


class _Doubler(nn.Module):
    def forward(self, x):
        return x + x  # a "residual" addition: the plain gradient hands each branch the whole relevance


def test_audit_catches_relevance_created_without_a_rule(images):
    features = nn.Sequential(tiny_cnn(), _Doubler(), nn.Conv2d(8, 8, 1), nn.ReLU()).double().eval()
    model = DeepNeon(features, KDEOutlier(gamma=0.5), low=0.0, high=1.0).fit(images, progress=False)
    good, audit = explain(deep_kde(images), images, return_audit=True)
    assert audit.ok
    # DeepNeon canonizes the addition from the graph (a Sum with its rule): conserved
    assert explain(model, images, return_audit=True)[1].ok
    # a NeonComposite is used as given, without the graph canonizer: the addition stays a plain gradient
    composite = NeonComposite(base=EpsilonGammaBox(low=0.0, high=1.0))
    with pytest.warns(ConservationWarning):
        explain(model, images, composite=composite)
    with pytest.raises(ConservationError):
        explain(model, images, composite=composite, strict=True)


class _Root(nn.Module):
    def forward(self, x):
        return x.sqrt()  # finite forward; the gradient at the ReLU's zeros is inf, the relevance NaN


# declared (wrongly) as a layer whose gradient is exact LRP, so the graph canonizer lets it through: the NaN it makes
# must still fail the audit everywhere
register_gradient_leaf(_Root)


def test_audit_fails_on_nan_relevance_everywhere_it_is_consumed(images, tmp_path):
    from neon_attrib.scale import explain_dataset

    model = DeepNeon(nn.Sequential(tiny_cnn(), _Root()), KDEOutlier(gamma=0.5), low=0.0, high=1.0)
    model.fit(images, progress=False)
    with pytest.warns(ConservationWarning, match="NaN or inf"):
        relevance, audit = explain(model, images, return_audit=True)
    assert not bool(torch.isfinite(relevance).all()) and bool(torch.isfinite(audit.score).all())
    assert not audit.ok and not bool(audit.passed.any()) and bool(torch.isinf(audit.relative_error).all())
    with pytest.raises(ConservationError, match="NaN or inf"):
        explain(model, images, strict=True)
    with pytest.warns(ConservationWarning), model.explainer() as explainer:
        explainer(images)
    assert not explainer.last_audit.ok
    with pytest.warns(ConservationWarning, match="4 of 4"):
        results = explain_dataset(model, images, tmp_path / "run.zarr", batch_size=2, num_workers=0, progress=False)
    assert results.summary["audit_failed"] == 4 and not results.table()["audit_ok"].any()


def test_audit_tolerance_is_a_share_of_the_score_and_the_heatmap():
    one = torch.ones(1, dtype=torch.float64)

    def audit(score=1.0, input_sum=0.2, unaccounted=0.5, records=(1e3, -1e3 + 0.3)):
        modules = {f"layer{i}": one * value for i, value in enumerate(records)}
        return Audit(score=one * score, input_sum=one * input_sum, dissipated=one * sum(records),
                     unaccounted=one * unaccounted, per_module=modules, input_mass=one * abs(input_sum))

    # half the score leaks (more than the whole heatmap): modules that move much relevance do not hide it
    assert not audit().ok
    assert audit(unaccounted=1e-3).ok  # rounding-sized mismatch: within 1e-2 of |score| + heatmap mass
    assert audit(unaccounted=0.0, records=(0.8,)).ok
    for bad in ({"score": math.nan}, {"input_sum": math.inf}, {"records": (math.nan, 0.8)},
                {"unaccounted": math.nan}):
        assert not audit(**bad).ok, bad
    assert not audit(score=0.0, input_sum=0.0, unaccounted=1e-3).ok  # something out of nothing
    assert audit(score=0.0, input_sum=0.0, unaccounted=0.0, records=(0.0,)).ok


def test_the_report_agrees_with_ok_and_assigned_fields_count():
    """The report reads the worst relative error alone: it warns exactly when ``ok`` is False (infinite and NaN
    tolerances, NaN values, a scale of 0); derived values follow an assigned field."""
    def audit(unaccounted, tolerance=1e-2, score=(1.0, 1.0)):
        score = torch.tensor(score, dtype=torch.float64)
        zero = torch.zeros_like(score)
        return Audit(score=score, input_sum=zero, dissipated=zero, unaccounted=torch.tensor(unaccounted).to(score),
                     per_module={"layer": zero}, tolerance=tolerance, input_mass=zero)

    cases = [audit((0.0, 0.0)), audit((0.0, 0.5)), audit((0.0, 0.5), tolerance=1.0), audit((0.0, math.nan)),
             audit((0.0, math.nan), tolerance=math.inf), audit((0.0, 0.0), score=(1.0, math.nan), tolerance=math.inf),
             audit((0.0, 1e-3), score=(1.0, 0.0), tolerance=math.inf),  # something out of nothing: an error of inf
             audit((0.0, 1e-3), score=(1.0, 0.0)), audit((0.0, 0.0), tolerance=math.nan), audit((), score=())]
    for case in cases:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _report(case, "Model", strict=False)
        assert len(caught) == (not case.ok), case
        nonfinite = int((~case.finite).sum())
        assert all((f"{nonfinite} with NaN or inf" in str(w.message)) == bool(nonfinite) for w in caught), case
    assert [case.ok for case in cases] == [True, False, True, False, False, False, True, False, False, True]
    changed = audit((0.0, 0.0))
    assert changed.ok and bool(changed.passed.all())
    changed.unaccounted = torch.tensor([0.0, 0.5], dtype=torch.float64)
    assert not changed.ok and changed.passed.tolist() == [True, False]
    changed.tolerance = 1.0
    assert changed.ok and changed.relative_error.tolist() == [0.0, 0.5]

def test_audit_reports_the_rules_dissipation(blobs):
    model = KDEOutlier(gamma=0.5).double().fit(blobs)
    relevance, audit = explain(model, blobs[:5] + 0.1, return_audit=True)
    torch.testing.assert_close(audit.input_sum, relevance.sum(1))
    torch.testing.assert_close(audit.score, model(blobs[:5] + 0.1))
    torch.testing.assert_close(audit.dissipated, audit.score - audit.input_sum, rtol=1e-10, atol=1e-12)
    assert bool((audit.dissipated >= 0).all())  # eps > 0 absorbs a share of near points, never creates
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        explain(KMeansMembership(3, random_state=0).double().fit(blobs), blobs[:4])


def test_captum_paths_refuse_what_they_cannot_do(blobs):
    import matplotlib.pyplot as plt

    from neon_attrib.integrations.captum import LRP, compare

    fused = KDEOutlier(gamma=1.0, fused=True).double().fit(blobs)
    with pytest.raises(ValueError, match="layered forward"):  # Captum hooks leaf layers that a fused KDE skips
        LRP(fused).attribute(torch.as_tensor(blobs[:2]))
    layered = KDEOutlier(gamma=1.0).double().fit(blobs)
    with pytest.raises(ValueError, match="empty batch"):
        LRP(layered).attribute(torch.as_tensor(blobs[:0]))
    with pytest.raises(ValueError, match="at least one example"):
        compare(layered, torch.as_tensor(blobs[:0]), methods=["Saliency"], figure=False)
    before = plt.get_fignums()
    compare(layered, torch.as_tensor(blobs[:3]), methods=["Saliency"], figure=True)
    assert plt.get_fignums() == before  # no pyplot figure left open
