"""What a fitted model computes travels with its state, and a model is used only on what it was fitted for.

* every setting that changes a fitted model's outputs is saved in its ``state_dict`` and checked on load: a PatchCore
  state refuses a PatchCore built with another ``aggregate``, ``sigma`` or ``reweight`` (they used to load and score
  differently); estimator parameters such as ``chunk_size`` and ``DeepNeon.n_locations_fit_`` come back exactly;
* a ``fit_self`` model (leave-one-out over the fitted locations) refuses other images;
* a non-integer seed and an input of 0 features are refused instead of truncated / fitted.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from neon_attrib import KDEOutlier, explain
from neon_attrib.anomaly import PaDiM, PatchCore
from neon_attrib.models import KDEInlier
from neon_attrib.vision.deep import DeepNeon


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4))


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _resnet() -> nn.Module:
    from neon_attrib.vision import backbone

    torch.manual_seed(0)
    return backbone("resnet18")


@pytest.mark.parametrize("other", [{"aggregate": 1}, {"sigma": 2.0}, {"reweight": True}, {"layers": ["layer2"]}])
def test_patchcore_state_refuses_other_settings(other):
    network = _resnet()
    fitted = PatchCore(network, coreset_ratio=0.5).fit(_images(), progress=False)
    state = fitted.state_dict()
    with pytest.raises(ValueError, match=f"other settings.*{next(iter(other))}="):
        PatchCore(network, coreset_ratio=0.5, **other).load_state_dict(state)
    same = PatchCore(network, coreset_ratio=0.5)
    same.load_state_dict(state)
    x = _images(2, seed=1)
    assert torch.equal(same.score(x), fitted.score(x)) and torch.equal(same.anomaly_map(x), fitted.anomaly_map(x))
    assert same.n_locations_fit_ == fitted.n_locations_fit_ and same.n_channels_ == fitted.n_channels_


def test_padim_state_refuses_another_sigma_and_round_trips():
    network = _resnet()
    fitted = PaDiM(network, n_channels=16).fit(_images(), progress=False)
    with pytest.raises(ValueError, match="sigma=4.0 in the state, 1.0 here"):
        PaDiM(network, n_channels=16, sigma=1.0).load_state_dict(fitted.state_dict())
    loaded = PaDiM(network, n_channels=16)
    loaded.load_state_dict(fitted.state_dict())
    assert torch.equal(loaded.anomaly_map(_images(2, 1)), fitted.anomaly_map(_images(2, 1)))
    assert loaded.n_locations_fit_ == fitted.n_locations_fit_


def test_deep_neon_state_keeps_pool_and_fitted_counts():
    fitted = DeepNeon(_cnn(), KDEOutlier(gamma=0.1, fused=True, chunk_size=7), pool="mean").fit(
        _images(), progress=False)
    state = fitted.state_dict()
    with pytest.raises(ValueError, match="pool='mean' in the state, 'sum' here"):
        DeepNeon(_cnn(), KDEOutlier(gamma=0.1, fused=True)).load_state_dict(state)
    loaded = DeepNeon(_cnn(), KDEOutlier(gamma=0.1, fused=True), pool="mean")
    loaded.load_state_dict(state)
    assert loaded.n_locations_fit_ == fitted.n_locations_fit_ == 4 * 8 * 8
    assert loaded.head.chunk_size == 7  # summed in the same chunks: the same numbers, bit for bit
    x = _images(2, seed=3)
    assert torch.equal(loaded(x), fitted(x))


def test_estimator_state_carries_every_constructor_parameter():
    X = torch.rand(50, 3, dtype=torch.float64)
    fitted = KDEOutlier(gamma=0.7, chunk_size=3).double().fit(X)
    fresh = KDEOutlier().double()
    fresh.load_state_dict(fitted.state_dict())
    assert fresh.get_params() == fitted.get_params()
    assert torch.equal(fresh(X), fitted(X))


def test_fit_self_refuses_other_images():
    """A leave-one-out model scores the locations it was fitted on; other images used to get the first one's masks."""
    images = _images(2)
    model = DeepNeon(_cnn(), KDEOutlier(gamma=0.1)).fit_self(images[:1])
    explain(model, images[:1])  # the fitted image: fine
    with pytest.raises(ValueError, match="other images"):
        model(images[1:])
    with pytest.raises(ValueError, match="other images"):
        explain(model, images[1:])
    both = DeepNeon(_cnn(), KDEInlier(gamma=0.1, n_features=64, random_state=0)).fit_self(images)
    both(images)
    with pytest.raises(ValueError, match="other images"):
        both(images.flip(0))  # the same images in another order


def test_seed_must_be_an_integer_and_features_at_least_one():
    model = DeepNeon(_cnn(), KDEOutlier(gamma=0.1))
    with pytest.raises(ValueError, match="'seed' parameter of DeepNeon must be an int"):
        model.fit(_images(), seed=1.5, progress=False)
    with pytest.raises(ValueError, match="0 feature"):
        KDEOutlier(gamma=1.0).fit(np.zeros((5, 0)))


def test_captum_lrp_without_the_bridge_is_a_clear_error():
    """Captum's own LRP on a NEON model fails with Captum's TypeError naming the NEON layer, before and after importing
    neon_attrib.integrations.captum (the import changes nothing: no rule is attached to our classes); the bridge's LRP
    works."""
    import subprocess
    import sys

    script = """
import sys, torch
from torch import nn
from captum.attr import LRP
from neon_attrib import KDEOutlier
from neon_attrib.vision.deep import DeepNeon
assert "neon_attrib.integrations.captum" not in sys.modules
torch.manual_seed(0)
for _ in range(2):
    for fused in (True, False):
        cnn = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4))
        model = DeepNeon(cnn, KDEOutlier(gamma=0.1, fused=fused)).fit(torch.rand(3, 3, 16, 16), progress=False)
        try:
            LRP(model).attribute(torch.rand(1, 3, 16, 16))
        except TypeError as exc:
            assert "neon_attrib.core.layers" in str(exc) and "has no rule defined" in str(exc), exc
        else:
            raise AssertionError("no error")
    import neon_attrib.integrations.captum  # changes nothing for Captum's own LRP
assert not hasattr(model.head.distance, "rule") and model.features[1].rule is None  # Captum's failed call leaves None
before = {name: dict(vars(module)) for name, module in model.named_modules()}
# the layered head: the bridge explains it
neon_attrib.integrations.captum.LRP(model).attribute(torch.rand(1, 3, 16, 16))
assert {name: dict(vars(module)) for name, module in model.named_modules()} == before  # the model as it was
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_a_state_without_settings_says_how_to_load_it():
    fitted = DeepNeon(_cnn(), KDEOutlier(gamma=0.1)).fit(_images(), progress=False)
    old = {key: value for key, value in fitted.state_dict().items() if key != "_extra_state"}
    with pytest.raises(RuntimeError, match="no '_extra_state'.*strict=False"):
        DeepNeon(_cnn(), KDEOutlier(gamma=0.1)).load_state_dict(old)
    loaded = DeepNeon(_cnn(), KDEOutlier(gamma=0.1))
    loaded.load_state_dict(old, strict=False)
    assert torch.equal(loaded(_images(2, 1)), fitted(_images(2, 1)))
