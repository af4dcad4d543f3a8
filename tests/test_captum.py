"""The Captum bridge: NeonLRP and Captum's LRP with our rules give explain()'s relevance, every Captum method runs,
compare()."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from captum import attr as captum_attr
from captum.attr import NoiseTunnel
from captum.metrics import infidelity, sensitivity_max
from conftest import assert_no_hooks
from torch import nn

from neon_attrib import KDEInlier, KDEOutlier, KMeansMembership, SoftArgminRule, explain
from neon_attrib.core import layers as neon_layers
from neon_attrib.evaluation.curves import median_reference
from neon_attrib.integrations.captum import LRP, Comparison, LayerLRP, NeonLRP, NeonRule, compare

matplotlib.use("Agg")
pytestmark = [
    pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients"),  # Captum's LRP
    pytest.mark.filterwarnings("ignore:You are providing multiple inputs for Lime"),
    pytest.mark.filterwarnings("ignore:Setting forward, backward hooks and attributes on non-linear"),  # DeepLift
]

MODELS = ("kde_outlier", "kde_inlier", "kmeans")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0, 0, 0], [4, 4, 0, 0], [0, 4, 4, -2]])
    train = np.concatenate([c + rng.normal(size=(15, 4)) for c in centres])
    test = torch.as_tensor(np.concatenate([centres + rng.normal(size=(3, 4)), [[8.0, -3, 1, 0]]]))
    return train, test


@pytest.fixture(scope="module")
def models(data):
    train, _ = data
    return {
        "kde_outlier": KDEOutlier(gamma=0.5).double().fit(train),
        "kde_inlier": KDEInlier(gamma=0.5, n_features=300, random_state=0).double().fit(train),
        "kmeans": KMeansMembership(n_clusters=3, random_state=0).double().fit(train),
    }


def _target(name):
    return [0, 1, 2, 0] if name == "kmeans" else None


def _snapshot(model):
    return {name: sorted(vars(module)) for name, module in model.named_modules()}


# ---------------------------------------------------------------------------------------------------------------------
# NeonLRP
@pytest.mark.parametrize("name", MODELS)
def test_neon_lrp_equals_explain(models, data, name):
    model, x = models[name], data[1]
    before = _snapshot(model)
    explainer = NeonLRP(model)
    relevance = explainer.attribute(x, target=_target(name))
    torch.testing.assert_close(relevance, explain(model, x, target=_target(name)), rtol=1e-6, atol=1e-9)
    assert torch.equal(relevance, explainer.attribute(x, target=_target(name)))  # repeated calls: identical
    assert _snapshot(model) == before
    assert_no_hooks(model)


def test_neon_lrp_contract(models, data):
    model, x = models["kmeans"], data[1]
    explainer = NeonLRP(model)
    assert explainer.has_convergence_delta() and explainer.multiplies_by_inputs
    (relevance,), delta = explainer.attribute((x,), return_convergence_delta=True)  # tuple in, tuple out
    torch.testing.assert_close(relevance, explain(model, x))  # target None: the assigned cluster, as explain
    torch.testing.assert_close(delta, torch.zeros_like(delta), rtol=0, atol=1e-10)  # k-means conserves exactly
    torch.testing.assert_close(explainer.attribute(x, target=(1,)), explain(model, x, target=1))
    kde = models["kde_outlier"]
    relevance, delta = NeonLRP(kde).attribute(x, return_convergence_delta=True)
    torch.testing.assert_close(delta, kde(x) - relevance.sum(1))
    assert bool((delta >= -1e-12).all())  # KDE: eps only dissipates
    with pytest.raises(TypeError, match="Module"):
        NeonLRP(lambda z: z)
    with pytest.raises(ValueError, match="must lie in"):
        explainer.attribute(x, target=5)


def test_neon_lrp_with_noise_tunnel_and_metrics(models, data):
    model, x = models["kde_outlier"], data[1]
    explainer = NeonLRP(model)
    torch.manual_seed(0)
    smooth = NoiseTunnel(explainer).attribute(x, nt_type="smoothgrad", nt_samples=3, stdevs=0.0)
    torch.testing.assert_close(smooth, explain(model, x))  # no noise: exactly NEON
    noisy = NoiseTunnel(explainer).attribute(x, nt_type="smoothgrad", nt_samples=4, stdevs=0.2)
    assert noisy.shape == x.shape and bool(torch.isfinite(noisy).all())
    kmeans = models["kmeans"]
    smooth_km = NoiseTunnel(NeonLRP(kmeans)).attribute(x, target=[0, 1, 2, 0], nt_samples=3, stdevs=0.1)
    assert smooth_km.shape == x.shape

    def perturb(inputs):
        noise = torch.randn_like(inputs) * 0.1
        return noise, inputs - noise

    scores = infidelity(model, perturb, x, explainer.attribute(x), n_perturb_samples=4)
    assert scores.shape == (x.shape[0],) and bool(torch.isfinite(scores).all())
    sens = sensitivity_max(NeonLRP(kmeans).attribute, x, target=1, n_perturb_samples=3)
    assert sens.shape == (x.shape[0],) and bool(torch.isfinite(sens).all())
    assert_no_hooks(model)
    assert_no_hooks(kmeans)


def test_neon_lrp_images_and_visualization(rng):
    """A head on flattened 3×8×8 images (Flatten has no rule: the gradient passes) and Captum's image display."""
    images = torch.as_tensor(rng.random((12, 3, 8, 8)))
    model = nn.Sequential(nn.Flatten(), KDEOutlier(gamma=0.05).double().fit(images.reshape(12, -1))).double()
    relevance = NeonLRP(model).attribute(images[:2])
    torch.testing.assert_close(relevance, explain(model, images[:2]))
    fig, _ = captum_attr.visualization.visualize_image_attr(
        relevance[0].permute(1, 2, 0).numpy(), images[0].permute(1, 2, 0).numpy(), method="blended_heat_map",
        sign="all", use_pyplot=False)
    assert fig is not None


# ---------------------------------------------------------------------------------------------------------------------
# Captum's LRP with the NEON rules (neon_attrib.integrations.captum.LRP)
@pytest.mark.parametrize("name", MODELS)
def test_captum_lrp_equals_explain_on_every_call(models, data, name):
    model, x = models[name], data[1]
    before = _snapshot(model)
    lrp = LRP(model)
    targets = [0, 1, 2] if name == "kmeans" else [None]
    for target in targets:
        reference = explain(model, x, target=target)
        first = lrp.attribute(x.clone(), target=target)
        torch.testing.assert_close(first, reference, rtol=1e-6, atol=1e-9)
        for _ in range(2):  # Captum deletes module.rule after each call (its issue #1059): ours are set per call
            assert torch.equal(lrp.attribute(x.clone(), target=target), first)
        torch.testing.assert_close(LRP(model).attribute(x.clone(), target=target), reference, rtol=1e-6, atol=1e-9)
    if name == "kmeans":  # per-example targets, as Captum passes them
        torch.testing.assert_close(lrp.attribute(x.clone(), target=[0, 1, 2, 0]),
                                   explain(model, x, target=[0, 1, 2, 0]), rtol=1e-6, atol=1e-9)
    relevance, delta = lrp.attribute(x.clone(), target=targets[0], return_convergence_delta=True)
    neon_delta = NeonLRP(model).attribute(x, target=targets[0], return_convergence_delta=True)[1]
    torch.testing.assert_close(delta, neon_delta, rtol=1e-6, atol=1e-9)
    assert _snapshot(model) == before  # no rule, activations or other attribute left behind
    assert_no_hooks(model)


def test_nothing_is_attached_to_our_layer_classes():
    """No class-level 'rule' on any NEON layer: the rules exist only on the layers of a model LRP is explaining."""
    for name in neon_layers.__all__:
        assert "rule" not in vars(getattr(neon_layers, name)), name


def test_a_rule_you_set_is_used_and_kept(models, data):
    model, x = models["kde_outlier"], data[1]
    pool = model.pool
    assert not hasattr(pool, "rule")
    pool.rule = NeonRule(SoftArgminRule(beta=3.0))
    try:
        expected = explain(model, x, beta=3.0)
        lrp = LRP(model)
        torch.testing.assert_close(lrp.attribute(x.clone()), expected, rtol=1e-6, atol=1e-9)
        assert repr(pool.rule) == "NeonRule(SoftArgminRule(beta=3.0))"  # Captum deleted it; LRP put it back
        torch.testing.assert_close(lrp.attribute(x.clone()), expected, rtol=1e-6, atol=1e-9)
    finally:
        del pool.rule  # back to the default
    torch.testing.assert_close(LRP(model).attribute(x.clone()), explain(model, x), rtol=1e-6, atol=1e-9)
    assert not hasattr(pool, "rule") and repr(NeonRule(SoftArgminRule(beta=2.0))).startswith("NeonRule(")


def test_captum_lrp_without_the_bridge_refuses_neon_layers(models, data):
    """Captum's own LRP has no rule for our layers: its TypeError names the layer, never a silently wrong heatmap."""
    model, x = models["kde_outlier"], data[1]
    with pytest.raises(TypeError, match="SquaredDistance'> has no rule defined"):
        captum_attr.LRP(model).attribute(x.clone())
    assert_no_hooks(model)


def test_lrp_keeps_a_rule_set_on_another_layer_and_cleans_up_after_an_error(models, data):
    model = nn.Sequential(nn.ReLU(), models["kde_outlier"])
    x = data[1]
    marker = NeonRule(SoftArgminRule(beta=2.0))
    model[1].pool.rule = marker
    try:
        with pytest.raises(ValueError, match="empty batch"):
            LRP(model).attribute(x[:0].clone())
        assert model[1].pool.rule is marker and not hasattr(model[1].distance, "rule")
        assert "activations" not in vars(model[1].distance)
    finally:
        del model[1].pool.rule


# ---------------------------------------------------------------------------------------------------------------------
# every Captum method on NEON models
def _captum_methods(x):
    reference = torch.zeros_like(x)
    return {
        "Saliency": (captum_attr.Saliency, {}),
        "InputXGradient": (captum_attr.InputXGradient, {}),
        "IntegratedGradients": (captum_attr.IntegratedGradients, {"n_steps": 20, "baselines": reference}),
        "DeepLift": (captum_attr.DeepLift, {"baselines": reference}),
        "GradientShap": (captum_attr.GradientShap, {"baselines": torch.zeros(3, x.shape[1], dtype=x.dtype)}),
        "Occlusion": (captum_attr.Occlusion, {"sliding_window_shapes": (1,), "baselines": reference}),
        "FeatureAblation": (captum_attr.FeatureAblation, {"baselines": reference}),
        "ShapleyValueSampling": (captum_attr.ShapleyValueSampling, {"n_samples": 3}),
        "KernelShap": (captum_attr.KernelShap, {"baselines": reference}),
        "Lime": (captum_attr.Lime, {"n_samples": 20}),
    }


@pytest.mark.parametrize("method", list(_captum_methods(torch.zeros(1, 4))))
@pytest.mark.parametrize("name", MODELS)
def test_every_captum_method_runs(models, data, name, method):
    model, x = models[name], data[1]
    cls, kwargs = _captum_methods(x)[method]
    before = _snapshot(model)
    torch.manual_seed(0)
    attribution = cls(model).attribute(x.clone(), target=_target(name), **kwargs)
    assert attribution.shape == x.shape and bool(torch.isfinite(attribution).all())
    assert _snapshot(model) == before
    assert_no_hooks(model)


def test_gradient_methods_agree_with_autograd(models, data):
    """Sanity: our forward is differentiable as written (Saliency is |∂f/∂x|; IG is complete)."""
    model, x = models["kde_outlier"], data[1]
    inputs = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(inputs).sum(), inputs)
    torch.testing.assert_close(captum_attr.Saliency(model).attribute(x.clone()), grad.abs())
    ig, delta = captum_attr.IntegratedGradients(model).attribute(x.clone(), n_steps=200,
                                                                 return_convergence_delta=True)
    assert float(delta.abs().max()) < 1e-3 * float(model(x).abs().max())
    # DeepLift's rescale rule only acts on the non-linearities it knows (ReLU, Sigmoid, ...); NEON layers are not
    # among them, so on a NEON model DeepLift is (input − baseline) × the gradient at the input.
    baseline = torch.full_like(x, 0.5)
    deeplift = captum_attr.DeepLift(model).attribute(x.clone(), baselines=baseline)
    torch.testing.assert_close(deeplift.detach(), (x - baseline) * grad)


# ---------------------------------------------------------------------------------------------------------------------
# compare
def test_compare_lives_in_evaluation_and_is_reexported():
    import neon_attrib.evaluation.curves
    import neon_attrib.integrations.captum

    assert neon_attrib.integrations.captum.compare is neon_attrib.evaluation.curves.compare
    assert neon_attrib.integrations.captum.Comparison is neon_attrib.evaluation.curves.Comparison
    assert neon_attrib.evaluation.curves.compare.__module__ == "neon_attrib.evaluation.curves"


def test_compare(models, data):
    model, (train, x) = models["kmeans"], data
    methods = ["Saliency", "IntegratedGradients", "LRP", ("Occlusion (2)", lambda m: captum_attr.Occlusion(m))]
    result = compare(model, x, methods=methods, reference=median_reference(train),
                     method_kwargs={"Occlusion (2)": {"sliding_window_shapes": (2,)}}, feature_names=list("abcd"))
    assert isinstance(result, Comparison)
    names = [row["method"] for row in result.rows]
    assert names == ["NEON", "Saliency", "IntegratedGradients", "LRP", "Occlusion (2)", "Random"]
    torch.testing.assert_close(result.relevances["NEON"], explain(model, x))
    torch.testing.assert_close(result.relevances["LRP"], result.relevances["NEON"], rtol=1e-6, atol=1e-9)
    rows = {row["method"]: row for row in result.rows}
    assert rows["LRP"]["deletion"] == pytest.approx(rows["NEON"]["deletion"])
    assert rows["NEON"]["relative_time"] == 1.0 and rows["Random"]["seconds"] is None
    assert all(np.isfinite(row["deletion"]) and np.isfinite(row["insertion"]) for row in result.rows)
    text = str(result)
    assert all(name in text for name in names) and "deletion" in text
    assert result.figure is not None and len(result.figure.axes) == 2
    assert set(result.to_dict()["curves"]) == set(names)
    matplotlib.pyplot.close(result.figure)
    with pytest.raises(ValueError, match="Unknown Captum method"):
        compare(model, x, methods=["NoSuchMethod"], reference=0.0, figure=False)


def test_compare_refuses_what_it_would_ignore_or_overwrite(models, data):
    model, x = models["kde_outlier"], data[1]
    with pytest.raises(ValueError, match=r"method_kwargs for 'IntegratedGradient'.*Saliency"):
        compare(model, x, methods=["Saliency"], method_kwargs={"IntegratedGradient": {"n_steps": 5}}, figure=False)
    with pytest.raises(ValueError, match="method_kwargs for 'NEON'"):
        compare(model, x, methods=["Saliency"], method_kwargs={"NEON": {}}, figure=False)
    twice = ["Saliency", ("Saliency", lambda m: captum_attr.InputXGradient(m))]
    with pytest.raises(ValueError, match="label 'Saliency' is used twice"):
        compare(model, x, methods=twice, figure=False)
    with pytest.raises(ValueError, match="label 'Random' is used twice"):
        compare(model, x, methods=[("Random", lambda m: captum_attr.Saliency(m))], figure=False)


def test_compare_seeds_sampling_methods(models, data):
    model, x = models["kde_outlier"], data[1][:2]
    kwargs = {"methods": ["KernelShap"], "method_kwargs": {"KernelShap": {"n_samples": 20}}, "figure": False}
    state = torch.random.get_rng_state()
    first = compare(model, x, seed=3, **kwargs).relevances["KernelShap"]
    torch.manual_seed(123)  # the global generator does not matter
    torch.testing.assert_close(compare(model, x, seed=3, **kwargs).relevances["KernelShap"], first, rtol=0, atol=0)
    assert not torch.equal(compare(model, x, seed=4, **kwargs).relevances["KernelShap"], first)
    torch.manual_seed(123)
    compare(model, x, seed=3, **kwargs)
    after = torch.random.get_rng_state()
    torch.manual_seed(123)
    assert torch.equal(after, torch.random.get_rng_state())  # the caller's generator is left as it was
    torch.random.set_rng_state(state)


def test_compare_kde_defaults(models, data):
    model, x = models["kde_outlier"], data[1]
    result = compare(model, x, methods=["InputXGradient"], figure=False, repeats=2)
    assert result.figure is None and [row["method"] for row in result.rows] == ["NEON", "InputXGradient", "Random"]
    assert result.scores.shape == (x.shape[0],)


# ---------------------------------------------------------------------------------------------------------------------
# deep heads (VGG-16 with random weights, 32×32 inputs, float64)
@pytest.fixture(scope="module")
def deep():
    deep = pytest.importorskip("neon_attrib.vision.deep")
    torch.manual_seed(0)
    features = deep.vgg16_features().double()
    images = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    return deep, features, images


def test_neon_lrp_on_deep_neon(deep):
    module, features, images = deep
    model = module.DeepNeon(features, KDEOutlier(gamma=1e-3)).double().fit(images, progress=False)
    before = _snapshot(model)
    relevance = NeonLRP(model).attribute(images[:1])
    torch.testing.assert_close(relevance, explain(model, images[:1]), rtol=1e-6, atol=1e-12)
    assert _snapshot(model) == before
    assert_no_hooks(model)


def test_captum_lrp_on_deep_neon(deep):
    """Captum's LRP: Captum's epsilon rule on the VGG layers, the head's NEON activation rule and the pool rule.

    It equals explain() with a Zennit composite that puts the same epsilon rule on the convolutions (up to Captum's
    epsilon on max pooling), so our layers get exactly our rules; and it keeps doing so, call after call.
    """
    from zennit.composites import LayerMapComposite
    from zennit.rules import Epsilon
    from zennit.types import Convolution

    module, features, images = deep
    same_rules = LayerMapComposite([(Convolution, Epsilon(epsilon=1e-9))])
    head = KMeansMembership(n_clusters=2, n_init=1, random_state=0)
    model = module.DeepNeon(features, head, pool="positive", composite=same_rules).double().fit(images,
                                                                                                progress=False)
    x = images[:2]
    before = _snapshot(model)
    expected = explain(model, x, target=1)
    lrp = LRP(model)
    first = lrp.attribute(x.clone(), target=1)
    torch.testing.assert_close(first, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))
    assert isinstance(lrp, captum_attr.LRP)
    assert torch.equal(lrp.attribute(x.clone(), target=1), first)
    assert _snapshot(model) == before  # Captum's own 'activations' leftovers are cleaned too
    assert_no_hooks(model)


@pytest.mark.parametrize("head_name", ["kde_outlier", "kde_inlier", "kmeans"])
def test_captum_layer_lrp_gives_the_heads_relevance_exactly(deep, head_name):
    """At the block-5 feature map (the head's input), Captum's LayerLRP equals explain's relevance there: the head's
    activation rule and the pool rule, applied through Captum's leaf hooks, to rounding."""
    from zennit.composites import LayerMapComposite
    from zennit.rules import Epsilon
    from zennit.types import Convolution

    module, features, images = deep
    head, pool, target = {
        "kde_outlier": (KDEOutlier(gamma=1e-3), "sum", None),
        "kde_inlier": (KDEInlier(gamma=1e-3, n_features=200, random_state=0), "sum", None),
        "kmeans": (KMeansMembership(n_clusters=2, n_init=1, random_state=0), "positive", 1),
    }[head_name]
    cheap = LayerMapComposite([(Convolution, Epsilon(epsilon=1e-9))])  # the VGG rules do not matter here
    model = module.DeepNeon(features, head, pool=pool, composite=cheap).double().fit(images, progress=False)
    x = images[:1]
    expected = model.relevance(x, target=target).features
    got = LayerLRP(model, model.features[30]).attribute(x.clone(), target=target)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9 * float(expected.abs().max()))


def test_captum_lrp_rejects_leave_one_out_heads(deep):
    module, features, images = deep
    model = module.DeepNeon(features, KDEOutlier(gamma=1e-3)).double()
    model.head = module.LeaveOneOutKDEOutlier(gamma=1e-3).double().fit(torch.rand(4, 512, dtype=torch.float64))
    with pytest.raises(TypeError, match="NeonLRP"):
        LRP(model)


def test_captum_lrp_rejects_fused_heads_and_neon_lrp_takes_them(deep):
    """A fused KDEOutlier never runs its two layers, so Captum's leaf hooks could not see it: a clear error, not a
    silently wrong heatmap. NeonLRP gives explain()'s relevance, equal to the layered head's."""
    module, features, images = deep
    head = KDEOutlier(gamma=1e-3).double().fit(torch.rand(6, 512, dtype=torch.float64))
    model = module.DeepNeon(features, head, fast=False).double()
    layered = NeonLRP(model).attribute(images[:1].clone())
    head.fused = True
    with pytest.raises(TypeError, match="fused KDEOutlier"):
        LRP(model)
    with pytest.raises(TypeError, match="fused KDEOutlier"):
        LayerLRP(model, model.features[30])
    assert_no_hooks(model)
    torch.testing.assert_close(NeonLRP(model).attribute(images[:1].clone()), layered, rtol=1e-9, atol=1e-12)


def test_layer_integrated_gradients_on_a_vgg_layer(deep):
    """On the block-5 output (the head's input) and on a ReLU. A convolution followed by VGG's in-place ReLU fails in
    Captum's layer methods (PyTorch: "a leaf Variable that requires grad is being used in an in-place operation")."""
    module, features, images = deep
    model = module.DeepNeon(features, KDEOutlier(gamma=1e-3)).double().fit(images, progress=False)
    for layer, shape in ((model.features[30], (1, 512, 1, 1)), (model.features[29], (1, 512, 2, 2))):
        attribution = captum_attr.LayerIntegratedGradients(model, layer).attribute(images[:1], n_steps=4)
        assert attribution.shape == shape and bool(torch.isfinite(attribution).all())
    assert_no_hooks(model)


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_lrp_calls_on_one_model_from_several_threads(models, data):
    """Captum's LRP puts hooks and rules on the model itself during a call: calls on one model from several threads
    take turns (the explanations' lock), so each returns the sequential answer."""
    import threading

    model, x = models["kmeans"], data[1]
    expected = {target: LRP(model).attribute(x.clone(), target=target) for target in range(3)}
    results, errors = [], []

    def work(target):
        try:
            for _ in range(5):
                results.append((target, LRP(model).attribute(x.clone(), target=target)))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(target % 3,)) for target in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert len(results) == 30 and all(torch.equal(got, expected[target]) for target, got in results)
    assert_no_hooks(model)
