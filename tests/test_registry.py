"""The model registry: each model's declaration matches the model, the lists in the docs and the public names follow
it, and a new model joins every entry point (explain, Captum's LRP, neuralize) by one register_model call."""

from __future__ import annotations

import importlib
import pkgutil
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestCentroid
from zennit.core import Hook

import neon_attrib
from neon_attrib import explain, neuralize
from neon_attrib.core import composites, registry
from neon_attrib.core.composites import NeonComposite, needs_own_rule
from neon_attrib.core.layers import SquaredDistance
from neon_attrib.core.registry import register_model, registered_models
from neon_attrib.integrations.captum import LRP

ROOT = Path(__file__).resolve().parents[1]
#: registered models that are not package-level names: built by DeepNeon.fit_self, documented in docs/deep.md
INTERNAL = {"LeaveOneOutKDEOutlier", "LeaveOneOutKDEInlier"}


def _ours():
    """The models the package registers (not ones a test or a docstring example registered), every module imported."""
    for module in pkgutil.walk_packages(neon_attrib.__path__, "neon_attrib."):
        importlib.import_module(module.name)
    return [entry for entry in registered_models()
            if getattr(sys.modules.get(entry.model.__module__), entry.model.__name__, None) is entry.model
            and entry.model.__module__.startswith("neon_attrib.")]


def test_every_model_module_registers():
    names = {entry.model.__name__ for entry in _ours()}
    assert {"KDEOutlier", "KDEInlier", "KMeansMembership", "BisectingKMeansMembership", "KNNOutlier",
            "MahalanobisOutlier", "PCAResidual", "GaussianMixtureOutlier", "GaussianMixtureMembership",
            "WeightedKDEOutlier", "OneClassSVMOutlier", "PositionalMahalanobis"} <= names


@pytest.mark.parametrize("entry", _ours(), ids=lambda entry: entry.model.__name__)
def test_declared_layers_are_the_models_layers(entry):
    """The NEON layers of an (unfitted) model are exactly the declared ones, each with its own input rule."""
    model = entry.model()
    leaves = [module for module in model.modules() if module is not model and next(module.children(), None) is None]
    assert {type(leaf) for leaf in leaves if needs_own_rule(leaf)} == set(entry.layers)
    assert isinstance(NeonComposite(mode="activation")._map({}, "", model), Hook)  # the model's own rule


def _fitted_split_models():
    X = np.random.default_rng(0).normal(size=(40, 3))
    return [neon_attrib.KDEOutlier(gamma=0.5).double().fit(X),
            neon_attrib.KDEInlier(gamma=0.5, n_features=32, random_state=0).double().fit(X),
            neon_attrib.KMeansMembership(n_clusters=3, random_state=0).double().fit(X),
            neon_attrib.BisectingKMeansMembership(n_clusters=3, random_state=0).double().fit(X),
            neon_attrib.GaussianMixtureMembership(n_components=2, random_state=0).double().fit(X)]


def test_captum_split_models_run_through_their_two_layers():
    """captum_split=True promises forward = layers[-1](layers[0](x)): what Captum's leaf hooks see."""
    models = _fitted_split_models()
    assert {type(model) for model in models} == {entry.model for entry in _ours() if entry.captum_split}
    x = torch.as_tensor(np.random.default_rng(1).normal(size=(5, 3)))
    for model in models:
        first, last = [m for m in model.modules() if m is not model and next(m.children(), None) is None]
        torch.testing.assert_close(last(first(x)), model(x), rtol=0, atol=0)


def test_public_names_follow_the_registry():
    for entry in _ours():
        name = entry.model.__name__
        if name in INTERNAL:
            continue
        assert name in neon_attrib.__all__, name
        assert getattr(neon_attrib, name) is entry.model


def _rst_table_column(text: str, column: int) -> list[str]:
    """The names in one column of the first simple reST table of ``text`` (``Name`` cells)."""
    lines = text.splitlines()
    borders = [i for i, line in enumerate(lines) if re.fullmatch(r"=+( +=+)+", line)]
    start, end = [match.span() for match in re.finditer("=+", lines[borders[0]])][column]
    return [lines[i][start:end].strip().strip("`") for i in range(borders[1] + 1, borders[2])]


def test_neuralize_lists_follow_the_registry():
    """SUPPORTED, the tables in neuralize's docstring and docs/models.md, and the documented options: one row per
    model registered with a neuralization."""
    module = sys.modules["neon_attrib.models.neuralize"]
    neuralizable = [entry for entry in _ours() if entry.neuralization is not None]
    assert module.SUPPORTED == {entry.neuralization.label: entry.model.__name__ for entry in neuralizable}
    docstring_models = _rst_table_column(module.__doc__, 1)
    page = (ROOT / "docs" / "models.md").read_text(encoding="utf-8")
    page_models = re.findall(r"^\| `[^|]*\| `(\w+)` \|", page, re.M)
    names = [entry.model.__name__ for entry in neuralizable]
    assert sorted(docstring_models) == sorted(names)
    assert sorted(page_models) == sorted(names)
    for entry in neuralizable:
        for option in entry.neuralization.options:
            assert f"``{option}``" in neuralize.__doc__, (entry.model.__name__, option)


# ---------------------------------------------------------------------------------------------------------------------
# a new model, added by one registration (the example of docs/new_model.md)
@pytest.fixture
def fresh_registry(monkeypatch):
    """The registries as they are now, restored after the test."""
    monkeypatch.setattr(registry, "_MODELS", list(registry._MODELS))
    monkeypatch.setattr(composites, "_REGISTRY", list(composites._REGISTRY))


def _documented_model() -> dict:
    """Run the python block of docs/new_model.md's section "A model: one registration"; its namespace."""
    page = (ROOT / "docs" / "new_model.md").read_text(encoding="utf-8")
    section = page.split("## A model: one registration", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    namespace: dict = {}
    exec(compile(block, "docs/new_model.md", "exec"), namespace)
    return namespace


@pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")  # Captum's LRP
def test_a_new_model_joins_every_entry_point_by_one_registration(fresh_registry):
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(size=(20, 3)), rng.normal(size=(20, 3)) + 4])
    sklearn_model = NearestCentroid().fit(X, np.repeat([0, 1], 20))
    with pytest.raises(TypeError, match="does not support NearestCentroid"):
        neuralize(sklearn_model)

    model_class = _documented_model()["SoftNearestCentroid"]

    model = neuralize(sklearn_model, beta=0.5, dtype=torch.float64)
    assert type(model) is model_class
    with pytest.raises(TypeError, match=r"unexpected option\(s\) \['k'\] for NearestCentroid"):
        neuralize(sklearn_model, k=1)
    x = torch.as_tensor(rng.normal(size=(4, 3)) + 2)
    relevance = explain(model, x)
    torch.testing.assert_close(LRP(model).attribute(x.clone()), relevance, rtol=1e-6, atol=1e-9)
    # on activations, the model's own rule: a KDE outlier on the centroids has the same score and relevance
    kde = neon_attrib.KDEOutlier(gamma=0.5).double().fit(sklearn_model.centroids_)
    a = x.abs()
    torch.testing.assert_close(model(a), kde(a))
    torch.testing.assert_close(explain(model, a, composite=NeonComposite(mode="activation")),
                               explain(kde, a, composite=NeonComposite(mode="activation")))
    assert "NearestCentroid" not in sys.modules["neon_attrib.models.neuralize"].SUPPORTED  # a snapshot at import


class _Plain(torch.nn.Module):
    def forward(self, x):
        return x


def test_register_model_refuses_what_it_cannot_use():
    with pytest.raises(TypeError, match="torch.nn.Module subclass"):
        register_model(int, lambda beta, eps: None, layers=())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="captum_split=True needs the model's two layers"):
        register_model(_Plain, lambda beta, eps: None, layers=(SquaredDistance,), captum_split=True)
    with pytest.raises(TypeError, match="must be a Neuralization"):
        register_model(_Plain, lambda beta, eps: None, layers=(), neuralization=("x",))  # type: ignore[arg-type]
    assert _Plain not in [entry.model for entry in registered_models()]
