"""The package's architecture: the import layering, one pipeline with one meaning of "composite", the public extension
API, scikit-learn compatibility and no process-wide side effects."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_no_hooks
from torch import nn
from zennit.attribution import Gradient
from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat

import neon_attrib
from neon_attrib import KDEInlier, KDEOutlier, KMeansMembership, NeonComposite, explain
from neon_attrib.vision.deep import DeepNeon

PACKAGE = Path(neon_attrib.__file__).parent
#: The top layer (command line) may defer imports to keep start-up fast; nothing else imports inside functions.
LAZY_FOLDERS = {"cli"}  # the command line imports what a sub-command needs when it runs


# ---------------------------------------------------------------------------------------------------------------------
# layering
def test_import_layers_contract():
    lint = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    if not Path(lint).exists():
        pytest.skip("import-linter is not installed")
    result = subprocess.run([lint], cwd=PACKAGE.parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


def _contract_modules() -> list[str]:
    """The modules named in the import-layer contract of pyproject.toml (tomllib is Python >= 3.11 only)."""
    (block,) = re.findall(r"^layers = \[\n(.*?)^\]", (PACKAGE.parent / "pyproject.toml").read_text(), re.M | re.S)
    layers = re.findall(r'"([^"]+)"', block)
    return [name.strip() for layer in layers for name in re.split(r"[|:]", layer)]


def test_every_module_has_its_layer_and_its_row():
    """A module outside the contract would escape the layering; a public one missing from docs/architecture.md's table
    or from the package's lazy attributes would be hard to find."""
    modules = sorted(info.name for info in pkgutil.iter_modules([str(PACKAGE)]))
    assert sorted(_contract_modules()) == modules
    page = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    table = "\n".join(line for line in page.split("## One pipeline")[0].splitlines() if line.startswith("|"))
    public = [name for name in modules if not name.startswith("_")]
    assert [name for name in public if f"`{name}`" not in table] == []
    # every public module is an attribute of the package, except neuralize, which the function of that name shadows
    assert sorted(set(public) - {"neuralize"}) == sorted(neon_attrib._SUBMODULES)


def test_package_ships_its_type_information():
    """PEP 561: py.typed is in the package and in its package data, and CI runs the type checker as the README says."""
    assert (PACKAGE / "py.typed").is_file()
    pyproject = (PACKAGE.parent / "pyproject.toml").read_text()
    assert '"neon_attrib" = ["py.typed"]' in pyproject and '"mypy>=' in pyproject
    readme = (PACKAGE.parent / "README.md").read_text()
    ci = (PACKAGE.parent / ".ci" / "run").read_text()
    assert ".venv/bin/mypy &&" in readme and ".venv/bin/mypy &&" in ci


def test_no_function_level_imports_of_our_modules():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).parts[0] in LAZY_FOLDERS:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and (inner.level > 0 or (inner.module or "").startswith(
                            "neon_attrib")):
                        offenders.append(f"{path.relative_to(PACKAGE)}:{inner.lineno}")
    assert not offenders, offenders


def test_no_file_above_1000_lines():
    # Modules are split by concern (checked in review); a file past 1,000 lines is only a warning sign that one holds
    # several, so this bound is deliberately loose.
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 1000}
    assert not long, long


def test_every_submodule_is_an_attribute_of_the_package():
    script = ("import neon_attrib as na, sys\n"
              "assert 'neon_attrib.vision.deep' not in sys.modules\n"
              "assert 'neon_attrib.integrations.captum' not in sys.modules\n"
              "names = ['anomaly', 'cli', 'core', 'datasets', 'dec', 'evaluation', 'integrations', "
              "'models', 'pipeline', 'scale', 'vision', 'viz']\n"
              "for name in names:\n"
              "    assert getattr(na, name).__name__ == 'neon_attrib.' + name, name\n"
              "import matplotlib\n"
              "print(matplotlib.get_backend())\n")
    before = subprocess.run([sys.executable, "-c", "import matplotlib; print(matplotlib.get_backend())"],
                            capture_output=True, text=True)
    after = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert after.returncode == 0, after.stderr[-2000:]
    assert after.stdout.strip().splitlines()[-1] == before.stdout.strip().splitlines()[-1]  # no backend switching
    for module in pkgutil.walk_packages(neon_attrib.__path__, "neon_attrib."):
        importlib.import_module(module.name)


# ---------------------------------------------------------------------------------------------------------------------
# one meaning of "composite"
def _deep(composite="epsilon_gamma_box", head=None):
    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1),
                             nn.ReLU()).double().eval()
    head = head if head is not None else KDEOutlier(gamma=0.5)
    images = torch.rand(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    return DeepNeon(features, head, composite=composite, low=0.0, high=1.0, fast=False).fit(images, progress=False), \
        images


@pytest.mark.parametrize("head", ["kde", "kmeans", "inlier"])
def test_a_passed_composite_is_the_base_for_the_cnn(head):
    heads = {"kde": KDEOutlier(gamma=0.5), "kmeans": KMeansMembership(n_clusters=2, n_init=1, random_state=0),
             "inlier": KDEInlier(gamma=0.5, n_features=64, random_state=0)}
    base = EpsilonGammaBox(low=0.0, high=1.0, gamma=0.5)
    built, images = _deep(composite=base, head=heads[head])
    default, _ = _deep(head=type(heads[head])(**heads[head].get_params()))
    expected, audit = explain(built, images, return_audit=True)
    assert audit.ok
    torch.testing.assert_close(explain(default, images, composite=EpsilonGammaBox(low=0.0, high=1.0, gamma=0.5)),
                               expected)
    # Zennit's own attributor with NeonComposite(base=...) gives the same numbers
    output = built(images)
    targets = built.default_target(output) if output.ndim > 1 else None
    from neon_attrib.pipeline.engine import attribution_output

    with Gradient(built, NeonComposite(base=EpsilonGammaBox(low=0.0, high=1.0, gamma=0.5))) as attributor:
        _, zennit_relevance = attributor(images, lambda out: attribution_output(out, targets))
    torch.testing.assert_close(zennit_relevance, expected)
    assert_no_hooks(built)


def test_dec_head_with_zennit_and_neon_composite_equals_explain():
    from neon_attrib.dec import DEC, DECHead

    X = torch.randn(120, 6, generator=torch.Generator().manual_seed(0)).double()
    dec = DEC(n_clusters=3, embedding_dim=4, hidden_dims=(16,), pretrain_steps=120, max_iter=10, random_state=0,
              progress=False)
    with warnings.catch_warnings():  # a deliberately short training: its quality is not the point here
        warnings.simplefilter("ignore")
        dec.fit(X.float())
    head = DECHead.from_dec(dec)
    x = X[:5].float()
    expected = explain(head, x)
    output = head(x)
    from neon_attrib.pipeline.engine import attribution_output

    with Gradient(head, NeonComposite(base=EpsilonPlusFlat())) as attributor:
        _, relevance = attributor(x, lambda out: attribution_output(out, output.argmax(1)))
    torch.testing.assert_close(relevance, expected)


def test_a_composite_that_leaves_a_neon_layer_uncovered_raises():
    from neon_attrib.core.layers import LocationPool

    class Forgetful(NeonComposite):
        def _map(self, ctx, name, module):
            return None if isinstance(module, LocationPool) else super()._map(ctx, name, module)

    model, images = _deep()
    with pytest.raises(ValueError, match="received no NEON rule"):
        explain(model, images, composite=Forgetful(base=EpsilonGammaBox(low=0.0, high=1.0)))
    assert_no_hooks(model)


def test_explain_runs_one_forward_pass():
    model, images = _deep()
    calls = []
    handle = model.features.register_forward_hook(lambda *args: calls.append(1))
    try:
        explain(model, images)
    finally:
        handle.remove()
    assert len(calls) == 1


# ---------------------------------------------------------------------------------------------------------------------
# public extension API
def test_public_rule_base_and_registry():
    from neon_attrib import NeonHook, ResizableBuffers, register_rule

    class Halve(ResizableBuffers):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.empty(0))

        def forward(self, x):
            return x * self.scale

    class HalveRule(NeonHook):
        def relevance(self, module, x, out, relevance_out):
            return relevance_out  # x·s has the relevance of its output, input by input

    register_rule(Halve, lambda beta, eps: HalveRule())
    layer = Halve()
    layer.load_state_dict({"scale": torch.full((3,), 0.5, dtype=torch.float64)})
    model = nn.Sequential(layer, KDEOutlier(gamma=1.0).double().fit(np.random.default_rng(0).normal(size=(9, 3))))
    model.double()
    x = torch.randn(2, 3, dtype=torch.float64)
    relevance, audit = explain(model, x, return_audit=True)
    assert audit.ok and relevance.shape == (2, 3)


# ---------------------------------------------------------------------------------------------------------------------
# scikit-learn
@pytest.mark.parametrize("estimator", [KDEOutlier(gamma=0.5, eps=0.1),
                                       KDEInlier(gamma=0.5, n_features=20, random_state=1),
                                       KMeansMembership(n_clusters=3, random_state=0, centroid_norm=2.0)])
def test_clone_round_trips(estimator, blobs):
    from sklearn.base import clone

    copy = clone(estimator)
    assert type(copy) is type(estimator) and copy.get_params() == estimator.get_params()
    fitted = clone(estimator).double().fit(blobs)
    again = clone(fitted)
    assert again.get_params() == fitted.get_params() and not hasattr(again, "n_features_in_")


def test_pipeline_and_grid_search(blobs):
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    pipe = Pipeline([("scale", StandardScaler()), ("kde", KDEOutlier())]).fit(blobs)
    assert pipe.score_samples(blobs[:4]).shape == (4,)

    def mean_log_density(estimator, X, y=None):
        return float(estimator.score_samples(X).mean())

    search = GridSearchCV(KDEOutlier(), {"gamma": [0.1, 1.0]}, scoring=mean_log_density, cv=3).fit(blobs)
    assert search.best_params_["gamma"] in (0.1, 1.0)


def test_score_samples_equals_scikit_learn(blobs):
    from sklearn.neighbors import KernelDensity

    kde = KernelDensity(bandwidth=0.7).fit(blobs)
    model = KDEOutlier.from_sklearn(kde)
    np.testing.assert_allclose(model.score_samples(blobs[:6]).numpy(), kde.score_samples(blobs[:6]), rtol=1e-10)
    kmeans = KMeansMembership(3, random_state=0).double().fit(blobs)
    assert kmeans.labels_.shape == (60,)


def test_docs_and_docstrings_speak_to_users():
    """No references to internal planning documents, the project's issues or work sessions, or to data folders outside
    the package (other projects' issues, e.g. "Captum issue #1059", are fine)."""
    internal = re.compile(r"SPEC §|shared/data|shared/seeds|\.\./shared|\b[Tt]he issue\b|\bissue's\b|"
                          r"\b[Tt]his (session|task)\b")
    offenders = []
    for path in list(PACKAGE.rglob("*.py")) + list((PACKAGE.parent / "docs").glob("*.md")) + [PACKAGE.parent /
                                                                                              "README.md"]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if internal.search(line):
                offenders.append(f"{path.name}:{number}: {line.strip()[:80]}")
    assert not offenders, offenders
