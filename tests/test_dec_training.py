"""DEC and the surrogate as scikit-learn estimators, the training diagnostics, failure atomicity, and side effects.

Small blobs (3 x 40 points in 6-D), a tiny random CNN on 8x8 images, one fixed seed per model.
"""

from __future__ import annotations

import copy
import doctest
import math
import pickle
import re
import subprocess
import sys
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
from conftest import assert_no_hooks
from sklearn.base import clone
from sklearn.utils.validation import check_is_fitted
from torch import nn

from neon_attrib.dec import DEC, ActivationClusteringSurrogate
from neon_attrib.dec.model import DEFAULT_PRETRAIN_STEPS, DECTrainingWarning


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread avoids barrier waits on a busy machine (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SMALL = {"n_clusters": 3, "embedding_dim": 3, "random_state": 0, "update_interval": 10, "batch_size": 32,
         "hidden_dims": (16,), "progress": False}
SUR = {"n_clusters": 3, "embedding_dim": 3, "random_state": 0, "pretrain_steps": 20, "max_iter": 10,
       "update_interval": 5,
       "dec_batch_size": 32, "hidden_dims": (8,), "conv_channels": (4,), "dense_dim": 8, "n_init": 2,
       "progress": False}


def blobs(n_per: int = 40, d: int = 6, k: int = 3, seed: int = 0, spread: float = 6.0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * spread
    x = torch.cat([c + torch.randn(n_per, d, generator=g) for c in centres])
    return x, torch.arange(k).repeat_interleave(n_per)


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, 4, 3, padding=1)), ("relu1", nn.ReLU()), ("drop", nn.Dropout(0.0)),
        ("conv2", nn.Conv2d(4, 6, 3, stride=2, padding=1)), ("relu2", nn.ReLU()),
        ("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), ("fc", nn.Linear(6, 3)),
    ]))


@pytest.fixture(scope="module")
def cnn_data():
    g = torch.Generator().manual_seed(1)
    model = tiny_cnn()
    images = torch.randn(60, 3, 8, 8, generator=g)
    images[:20, 0] += 2.0
    images[20:40, 1] -= 2.0
    labels = torch.arange(3).repeat_interleave(20)
    return model, images, labels


@pytest.fixture(scope="module")
def surrogate(cnn_data):
    model, images, labels = cnn_data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DECTrainingWarning)  # 20 pretraining steps: under-trained on purpose
        return ActivationClusteringSurrogate(model, ["relu1", "relu2"], **SUR).fit(images, labels)


@pytest.fixture(scope="module")
def well_trained():
    """Enough pretraining for separated blobs: no warning at all (any DECTrainingWarning is an error here)."""
    x, y = blobs()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DECTrainingWarning)
        dec = DEC(pretrain_steps=600, max_iter=30, **SMALL).fit(x)
    return dec, x, y


def _state(est) -> dict:
    return {k: v for k, v in vars(est).items() if k.endswith("_") and not k.startswith("_")}


def _assert_same_state(before: dict, est) -> None:
    after = _state(est)
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key] is value, f"{key} was replaced by a failed fit"


# ---------------------------------------------------------------------------------------------------- scikit-learn
def test_dec_params_stored_as_given_and_clone_round_trips(well_trained):
    hidden = [16]
    dec = DEC(hidden_dims=hidden, alpha=-1.0, device="nope", pretrain_steps=5, pretrain_epochs=2)  # no checks here
    assert dec.hidden_dims is hidden and dec.alpha == -1.0 and dec.device == "nope"
    fitted, x, _ = well_trained
    copy_ = clone(fitted)
    assert copy_.get_params() == fitted.get_params() and type(copy_) is DEC
    with pytest.raises(ValueError, match="not fitted"):
        copy_.predict(x)
    check_is_fitted(fitted)
    assert copy_.set_params(max_iter=7, lr=0.01) is copy_ and copy_.get_params()["max_iter"] == 7
    with pytest.raises(ValueError, match=r"Invalid parameter 'nope' for estimator DEC"):
        copy_.set_params(nope=1)


def test_surrogate_clone_shares_the_model_and_equal_params(surrogate, cnn_data):
    model, _, _ = cnn_data
    weights = {"relu1": 1.0, "relu2": 2.0}
    sur = ActivationClusteringSurrogate(model, ("relu1", "relu2"), weights=weights, **SUR)
    assert sur.weights is weights and sur.layers == ("relu1", "relu2")  # stored as given
    other = clone(sur)
    assert other.model is model  # shared, not deep-copied
    params, other_params = sur.get_params(), other.get_params()
    assert params.keys() == other_params.keys() and all(params[k] == other_params[k] for k in params)
    assert other.weights is not weights  # non-estimator values are copied, as sklearn does
    refit = clone(surrogate)
    assert refit.model is surrogate.model and "decs_" not in vars(refit)
    with pytest.raises(ValueError, match="not fitted"):
        refit.predict(cnn_data[1])
    assert "ActivationClusteringSurrogate(layers=['relu1', 'relu2']" in repr(surrogate)


def test_fit_time_parameters_cannot_change_after_fit(well_trained, surrogate, cnn_data):
    dec, x, _ = well_trained
    with pytest.raises(AttributeError, match=r"Cannot set the 'max_iter' parameter of a fitted DEC .*Refit"):
        dec.max_iter = 5
    with pytest.raises(AttributeError, match="'alpha' parameter of a fitted DEC"):
        dec.set_params(alpha=1.0)
    dec.progress = False  # cosmetic: allowed
    dec.max_iter = dec.max_iter  # the same value is not a change
    assert dec.get_params()["alpha"] == 100.0
    model, images, _ = cnn_data
    with pytest.raises(AttributeError, match="'n_clusters' parameter of a fitted ActivationClusteringSurrogate"):
        surrogate.n_clusters = 5
    with pytest.raises(AttributeError, match="'model' parameter of a fitted ActivationClusteringSurrogate"):
        surrogate.model = tiny_cnn(1)
    layer = surrogate.layer_proba(images)
    try:  # weights take effect at once, everywhere
        surrogate.set_params(weights=[0.0, 1.0], batch_size=7)
        torch.testing.assert_close(surrogate.predict_proba(images), layer["relu2"])
        with torch.no_grad():
            torch.testing.assert_close(surrogate.class_head()(images), layer["relu2"])
    finally:
        surrogate.set_params(weights=None, batch_size=128)


def test_pickle_and_deepcopy_of_a_fitted_dec(well_trained):
    dec, x, _ = well_trained
    for other in (copy.deepcopy(dec), pickle.loads(pickle.dumps(dec))):
        assert torch.equal(other.predict(x), dec.predict(x))
        with pytest.raises(AttributeError, match="fitted DEC"):
            other.n_init = 3


# ---------------------------------------------------------------------------------------------------- steps
def test_pretraining_is_counted_in_steps():
    x, _ = blobs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DECTrainingWarning)
        by_steps = DEC(pretrain_steps=7, max_iter=0, **SMALL).fit(x)
        by_epochs = DEC(pretrain_epochs=2, max_iter=0, **SMALL).fit(x)
    assert len(by_steps.history_["pretrain_loss"]) == by_steps.diagnostics_["pretrain_steps"] == 7
    assert len(by_epochs.history_["pretrain_loss"]) == 2 * math.ceil(120 / 32)
    assert DEC(**SMALL)._n_pretrain_steps(120) == DEC(**SMALL)._n_pretrain_steps(10**6) == DEFAULT_PRETRAIN_STEPS
    with pytest.raises(ValueError, match="'pretrain_steps' and 'pretrain_epochs' parameters of DEC"):
        DEC(pretrain_steps=5, pretrain_epochs=1, **SMALL).fit(x)
    with pytest.raises(ValueError, match=r"'pretrain_steps' parameter of DEC must be an int >= 0 or None. Got -1"):
        DEC(pretrain_steps=-1, **SMALL).fit(x)


# ---------------------------------------------------------------------------------------------------- diagnostics
def test_well_trained_dec_does_not_warn_and_reports_diagnostics(well_trained):
    dec, _, _ = well_trained
    d = dec.diagnostics_
    assert d["pretrain_converged"] and d["warnings"] == [] and d["finetuning_kept"]
    assert d["pretrain_steps"] == 600 and d["pretrain_final_loss"] < 0.1 * d["pretrain_initial_loss"]
    assert d["pretrain_last_decrease"] <= 0.05
    assert d["cluster_sizes"] == d["cluster_sizes_init"] == [40, 40, 40]
    assert d["quality_measure"] == "silhouette" and 0.5 < d["quality_init"] <= d["quality_finetuned"] <= 1.0


def test_under_trained_dec_warns():
    x, _ = blobs()
    with pytest.warns(DECTrainingWarning, match="autoencoder has not converged after 5 pretraining steps"):
        dec = DEC(pretrain_steps=5, max_iter=10, **SMALL).fit(x)
    assert dec.diagnostics_["pretrain_converged"] is False
    assert any("not converged" in m for m in dec.diagnostics_["warnings"])
    with pytest.warns(DECTrainingWarning, match="fewer than 100 steps"):  # a plateau at 30 steps is not trusted
        DEC(pretrain_steps=30, max_iter=0, **SMALL).fit(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DECTrainingWarning)
        skipped = DEC(pretrain_steps=0, max_iter=0, **SMALL).fit(x)  # no pretraining asked for: nothing to judge
    assert skipped.diagnostics_["pretrain_converged"] is None


def test_collapsed_clusters_warn():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g) * 0.01
    x[0] += 50.0
    x[1] -= 50.0  # two outliers: k-means gives clusters of 198, 1 and 1 points
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dec = DEC(pretrain_steps=100, max_iter=20, **SMALL).fit(x)
    messages = [str(w.message) for w in caught if w.category is DECTrainingWarning]
    assert messages == [f"DEC: {m}" for m in dec.diagnostics_["warnings"]]
    for stage in ("after the k-means initialisation", "after fine-tuning"):
        assert any(re.match(rf"DEC: {stage}, 2 of 3 clusters hold fewer than 1% .*cluster \d holds 99% of the points",
                            m) for m in messages)
    assert sorted(dec.diagnostics_["cluster_sizes_init"]) == [1, 1, 198]


@pytest.mark.filterwarnings("ignore:DEC. the autoencoder has not converged:neon_attrib.dec.model.DECTrainingWarning")
def test_harmful_fine_tuning_is_reverted_or_kept_with_a_warning():
    x, y = blobs()
    params = {**SMALL, "pretrain_steps": 100, "max_iter": 60, "finetune_lr": 0.3}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DECTrainingWarning)
        init_only = DEC(**{**params, "max_iter": 0}).fit(x)
    with pytest.warns(DECTrainingWarning, match=r"fine-tuning lowered the cluster quality \(silhouette .*kept the "
                                                r"k-means initialisation"):
        best = DEC(**params).fit(x)
    d = best.diagnostics_
    assert not d["finetuning_kept"] and d["quality_finetuned"] < d["quality_init"] - 0.01 and best.n_iter_ > 0
    torch.testing.assert_close(best.cluster_centers_, init_only.cluster_centers_, rtol=0, atol=0)
    torch.testing.assert_close(best.transform(x), init_only.transform(x), rtol=0, atol=0)
    assert torch.equal(best.labels_, best.predict(x)) and d["cluster_sizes"] == d["cluster_sizes_init"]
    with warnings.catch_warnings():  # IDEC also trains the decoder: it is restored too
        warnings.simplefilter("ignore", DECTrainingWarning)
        idec = DEC(**params, reconstruction_weight=1.0).fit(x)
    assert not idec.diagnostics_["finetuning_kept"]
    with torch.no_grad():
        torch.testing.assert_close(idec.decoder_(idec.encoder_(x)), init_only.decoder_(init_only.encoder_(x)),
                                   rtol=0, atol=0)
    with pytest.warns(DECTrainingWarning, match="kept the fine-tuned model"):
        kept = DEC(**params, keep_best=False).fit(x)
    assert kept.diagnostics_["finetuning_kept"] and not torch.equal(kept.cluster_centers_, init_only.cluster_centers_)
    # with labels the check is class purity: here fine-tuning raised it (0.97 -> 1.0), so the fine-tuned model stays
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DECTrainingWarning)
        supervised = DEC(**params).fit(x, y)
    d = supervised.diagnostics_
    assert d["quality_measure"] == "purity" and d["finetuning_kept"] and d["quality_finetuned"] >= d["quality_init"]
    with pytest.raises(ValueError, match=r"labels y of DEC.fit must have shape \(120,\)"):
        DEC(**params).fit(x, y[:5])


def test_seeded_fits_are_reproducible_with_their_diagnostics():
    x, y = blobs(n_per=20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DECTrainingWarning)
        a, b = (DEC(pretrain_steps=50, max_iter=20, **SMALL).fit(x, y) for _ in range(2))
    assert a.diagnostics_ == b.diagnostics_ and a.history_ == b.history_
    assert torch.equal(a.cluster_centers_, b.cluster_centers_)


# ---------------------------------------------------------------------------------------------------- surrogate
def test_surrogate_reports_layer_diagnostics_and_prefixed_warnings(surrogate, cnn_data):
    model, images, labels = cnn_data
    d = surrogate.diagnostics_
    assert set(d["layers"]) == {"relu1", "relu2"}
    assert all(layer["quality_measure"] == "purity" for layer in d["layers"].values())  # the labels are passed on
    assert d["classifier_train_accuracy"] == pytest.approx(float((model(images).argmax(1) == labels).double().mean()))
    assert d["train_accuracy"] == pytest.approx(surrogate.accuracy(images, labels))
    assert d["layer_train_accuracy"] == pytest.approx(surrogate.layer_accuracy(images, labels))
    assert any(m.startswith("layer 'relu1': the autoencoder has not converged") for m in d["warnings"])
    with pytest.warns(DECTrainingWarning, match="ActivationClusteringSurrogate, layer 'relu1': the autoencoder"):
        clone(surrogate).set_params(layers=["relu1"]).fit(images, labels)


def test_surrogate_validates_everything_before_running_the_classifier(cnn_data):
    model, images, labels = cnn_data
    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    try:
        cases = [({"max_iter": -1}, ValueError, "'max_iter' parameter of ActivationClusteringSurrogate"),
                 ({"dec_batch_size": 0}, ValueError, "'dec_batch_size' parameter of ActivationClusteringSurrogate"),
                 ({"weights": [1.0, -1.0]}, ValueError, "'weights' parameter of ActivationClusteringSurrogate"),
                 ({"layers": ["relu1", "nope"]}, ValueError, "Unknown layer name 'nope'"),
                 ({"model": "resnet"}, TypeError, "'model' parameter of ActivationClusteringSurrogate must be a torch"),
                 ({"dec_params": {"nope": 1}}, ValueError, r"unknown DEC parameter\(s\) \['nope'\]")]
        for change, error, message in cases:
            sur = ActivationClusteringSurrogate(model, ["relu1", "relu2"], **SUR).set_params(**change)
            with pytest.raises(error, match=message):
                sur.fit(images, labels)
        assert not calls
    finally:
        handle.remove()


def test_deprecated_dec_params_still_work(cnn_data):
    model, images, labels = cnn_data
    flat = {**SUR, "max_iter": 0}
    old = {k: v for k, v in flat.items() if k not in ("pretrain_steps", "dec_batch_size", "max_iter")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DECTrainingWarning)
        new_style = ActivationClusteringSurrogate(model, ["relu2"], **flat).fit(images, labels)
        with pytest.warns(DeprecationWarning, match="'dec_params' parameter of ActivationClusteringSurrogate is "
                                                    "deprecated"):
            old_style = ActivationClusteringSurrogate(
                model, ["relu2"], dec_params={"relu2": {"pretrain_steps": 20, "batch_size": 32, "max_iter": 0}},
                **old).fit(images, labels)
    assert torch.equal(old_style.decs_["relu2"].cluster_centers_, new_style.decs_["relu2"].cluster_centers_)


def test_heads_leave_the_classifier_mode_alone(surrogate, cnn_data):
    model, _, _ = cnn_data
    model.train()
    model.drop.eval()  # a mixed state must survive too
    try:
        before = {name: m.training for name, m in model.named_modules()}
        head = surrogate.head("relu2")
        class_head = surrogate.class_head()
        assert {name: m.training for name, m in model.named_modules()} == before
        assert not head.training and not class_head.training
        model.eval()
        assert {name: m.training for name, m in model.named_modules()} == dict.fromkeys(before, False)
        surrogate.head("relu1")
        assert not any(m.training for m in model.modules())
    finally:
        model.train()
    assert_no_hooks(model)


# ---------------------------------------------------------------------------------------------------- atomic fit
def test_failed_dec_fit_leaves_the_fitted_estimator_unchanged(well_trained, monkeypatch):
    dec, x, _ = well_trained
    before = _state(dec)
    centers = dec.cluster_centers_.clone()
    with pytest.raises(ValueError, match="NaN"):
        dec.fit(torch.full_like(x, float("nan")))
    with pytest.raises(ValueError, match="labels y of DEC.fit"):
        dec.fit(x, [0, 1])

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(DEC, "_finetune", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        dec.fit(x)
    _assert_same_state(before, dec)
    assert torch.equal(dec.cluster_centers_, centers) and torch.equal(dec.predict(x), dec.labels_)


def test_failed_surrogate_fit_leaves_the_fitted_surrogate_unchanged(surrogate, cnn_data, monkeypatch):
    model, images, labels = cnn_data
    before = _state(surrogate)
    with pytest.raises(ValueError, match="labels must lie in"):
        surrogate.fit(images, labels + 3)
    original, calls = DEC._fit, []

    def second_layer_fails(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DEC, "_fit", second_layer_fails)
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match="interrupted"):
        warnings.simplefilter("ignore", DECTrainingWarning)
        surrogate.fit(images[:30], labels[:30])
    _assert_same_state(before, surrogate)
    assert surrogate.n_train_ == 60 and surrogate.predict(images).shape == (60,)
    assert_no_hooks(model)


# ---------------------------------------------------------------------------------------------------- plots
def test_importing_plots_leaves_the_backend_alone():
    code = ("import matplotlib; matplotlib.use('svg'); import neon_attrib.dec.plots; "
            "print(matplotlib.get_backend())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "svg"


def test_plots_leave_no_open_figures(tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    from neon_attrib.dec import plots

    backend = matplotlib.get_backend()
    before = plt.get_fignums()
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 8, 8, generator=g)
    indices = torch.tensor([[1, 2], [3, 4]])
    titles = [f"t{i}" for i in range(6)]
    assert plots.similar_examples_figure(images[:2], images, indices, ["q0", "q1"], titles,
                                         path=tmp_path / "similar.png") is None
    assert plots.concepts_figure(images, indices, titles, title="concepts", path=tmp_path / "sub" / "c.png") is None
    assert plots.heatmap_figure(images[:3], [torch.randn(3, 3, 8, 8, generator=g)], ["lrp"], ["a", "b", "c"],
                                title="heat", path=tmp_path / "heat.png") is None
    fig = plots.image_grid([[images[0], images[1]]])
    assert isinstance(fig, Figure)
    assert plt.get_fignums() == before == []
    assert matplotlib.get_backend() == backend
    for name in ("similar.png", "sub/c.png", "heat.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------- docs
@pytest.mark.parametrize("name", ["neon_attrib.dec.model", "neon_attrib.dec.surrogate"])
def test_docstring_examples(name):
    import importlib

    module = importlib.import_module(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DECTrainingWarning)  # the surrogate's example clusters random images
        result = doctest.testmod(module, extraglobs={"torch": torch, "np": np},
                                 optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
