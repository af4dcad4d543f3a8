"""Devices: an estimator never picks a GPU on its own where its result would then fail on the caller's inputs, a fitted
model follows ``.to(device)``, and inputs on another device come back where they were."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from neon_attrib import explain
from neon_attrib.dec import DEC, ActivationClusteringSurrogate, DECHead
from neon_attrib.dec.estimator import resolve_device

TINY = {"pretrain_epochs": 2, "max_iter": 10, "update_interval": 5, "batch_size": 32, "hidden_dims": (8,),
        "progress": False}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
pytestmark = pytest.mark.filterwarnings("ignore::neon_attrib.dec.DECTrainingWarning")  # tiny training on purpose


def blobs(n_per: int = 30, d: int = 6, k: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(k, d, generator=g) * 6
    return torch.cat([c + torch.randn(n_per, d, generator=g) for c in centres])


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, 4, 3, padding=1)), ("relu1", nn.ReLU()),
        ("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), ("fc", nn.Linear(4, 3)),
    ])).eval()


@pytest.fixture
def gpu_seems_available(monkeypatch):
    """What a GPU machine reports (only the device choice runs under it: a CPU-only PyTorch cannot train there)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_device_choice_follows_the_data(gpu_seems_available):
    assert resolve_device(None, torch.zeros(2, 3)) == torch.device("cpu")
    assert resolve_device("cuda:1", torch.zeros(2, 3)) == torch.device("cuda:1")
    sur = ActivationClusteringSurrogate(tiny_cnn(), ["relu1"], n_clusters=3)
    assert sur._dec_kwargs("relu1")["device"] == torch.device("cpu")  # the classifier's device


def test_dec_trains_where_the_data_is():
    x = blobs()
    dec = DEC(n_clusters=3, embedding_dim=3, random_state=0, **TINY).fit(x)
    assert {p.device.type for p in dec.encoder_.parameters()} == {"cpu"}
    head = DECHead.from_dec(dec)
    with torch.no_grad():
        assert torch.equal(head(x).argmax(1), dec.predict(x))
    assert dec.predict(x).device == x.device
    assert torch.isfinite(explain(head, x[:4])).all()


@cuda
def test_fitted_dec_follows_to_and_returns_results_where_the_input_is():
    x = blobs()
    dec = DEC(n_clusters=3, embedding_dim=3, random_state=0, **TINY).fit(x)
    expected = dec.predict_proba(x)
    dec.to("cuda")
    on_cpu, on_gpu = dec.predict_proba(x), dec.predict_proba(x.cuda())
    assert on_cpu.device.type == "cpu" and on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_cpu, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(on_gpu.cpu(), expected, rtol=1e-5, atol=1e-6)
    gpu_dec = DEC(n_clusters=3, embedding_dim=3, random_state=0, **TINY).fit(x.cuda())  # trains where the data is
    assert {p.device.type for p in gpu_dec.encoder_.parameters()} == {"cuda"}
    assert DECHead.from_dec(gpu_dec)(x.cuda()).device.type == "cuda"
