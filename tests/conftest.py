"""Shared fixtures: small float64 data sets, one fixed seed, and a hook-leak checker."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

# at most 2 threads, or NEON_ATTRIB_TEST_THREADS (e.g. 16, a GPU machine's count: sums then split differently)
torch.set_num_threads(int(os.environ.get("NEON_ATTRIB_TEST_THREADS", 0)) or max(1, min(2, os.cpu_count() or 1)))


def shared_data_dir() -> Path | None:
    """``../shared/data`` beside the checkout (or $NEON_ATTRIB_DATA), or None when absent."""
    env = os.environ.get("NEON_ATTRIB_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    return path if path.is_dir() else None


def require_data(*files: str) -> Path:
    """The data folder (see :func:`shared_data_dir`), or skip the test unless every one of ``files`` (paths inside it)
    is there: a folder copied in part, or files kept out of a copy, skip cleanly instead of failing."""
    root = shared_data_dir()
    missing = [name for name in files if root is None or not (root / name).exists()]
    if missing:
        pytest.skip(f"shared data not available: {', '.join(missing)}")
    return root


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def blobs(rng) -> np.ndarray:
    """60 points in 4-D around three centres."""
    centres = np.array([[0.0, 0, 0, 0], [4, 4, 0, 0], [0, 4, 4, -2]])
    return np.concatenate([c + rng.normal(size=(20, 4)) for c in centres])


def pytest_report_header(config) -> str:
    """The Zennit the suite runs against (0.5 and 1.0 are supported; 1.0's hooks also receive keyword arguments)."""
    import zennit

    try:
        version = importlib.metadata.version("zennit")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a source checkout on the path
        version = "unknown version"
    return f"zennit {version} from {Path(zennit.__file__).parent}"


def assert_repeatable(result: torch.Tensor, again: torch.Tensor) -> None:
    """The same computation run twice: equal to rounding (1e-5 of the largest value in float32, 1e-12 in float64).

    Bit-for-bit equality is not promised on every machine: CPU convolution and matrix kernels may split their sums
    differently from one call to the next with many threads, and GPU kernels may too (see docs/gpu.md).
    """
    rtol = 1e-12 if again.dtype == torch.float64 else 1e-5
    scale = float(again.abs().max()) if again.numel() else 0.0
    torch.testing.assert_close(result, again, rtol=rtol, atol=rtol * scale)


def assert_no_hooks(model: torch.nn.Module) -> None:
    """No forward, pre-forward or backward hooks left on any submodule (nor their keyword-argument flags, which
    Zennit 1.0's hooks use)."""
    for name, module in model.named_modules():
        assert not module._forward_hooks, f"forward hook left on {name or 'root'}"
        assert not module._forward_pre_hooks, f"forward pre-hook left on {name or 'root'}"
        assert not module._backward_hooks, f"backward hook left on {name or 'root'}"
        for table in ("_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
            assert not getattr(module, table, None), f"{table} left on {name or 'root'}"


def _torch_refuses_zero_eps() -> bool:
    """Whether the installed PyTorch refuses a batch norm with ``eps = 0`` in eval mode (2.10 and 2.11 do)."""
    x, ones, zeros = torch.ones(1, 1, 1, 1), torch.ones(1), torch.zeros(1)
    try:
        torch.nn.functional.batch_norm(x, zeros, ones, ones, zeros, training=False, eps=0.0)
    except (ValueError, RuntimeError):
        return True
    return False


TORCH_REFUSES_ZERO_EPS = _torch_refuses_zero_eps()


def _naive_batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                      eps=1e-5):
    """Eval-mode batch norm written out, ``eps = 0`` allowed: ``(x - mean) / sqrt(var + eps) * weight + bias``."""
    assert not training, "the naive batch norm replica is for eval mode only"
    shape = (1, -1) + (1,) * (input.dim() - 2)
    out = (input - running_mean.reshape(shape)) / torch.sqrt(running_var.reshape(shape) + eps)
    if weight is not None:
        out = out * weight.reshape(shape)
    return out + bias.reshape(shape) if bias is not None else out


@contextlib.contextmanager
def accept_zero_eps():
    """Run a *reference* computation as PyTorch 2.13+ would where the installed PyTorch refuses ``eps = 0``.

    Zennit 1.0 merges a batch norm into its linear layer and leaves it as the identity with ``eps = 0``; PyTorch 2.10
    and 2.11 refuse to run that, so Zennit's own attributor with Zennit's canonizers fails there. The references the
    tests compare against (Zennit's rules on Zennit's canonizers) run here with a naive eval-mode batch norm written
    out in the test suite, independent of the package's own guard. Where PyTorch accepts ``eps = 0`` nothing changes.
    """
    if not TORCH_REFUSES_ZERO_EPS:
        yield
        return
    with mock.patch.object(torch.nn.functional, "batch_norm", _naive_batch_norm):
        yield


def randomize_batch_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random running statistics and affine parameters, so that merging them into the convolutions changes weights."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                shape = module.running_mean.shape
                module.running_mean.copy_(torch.rand(shape, generator=generator) * 0.4 - 0.2)
                module.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(shape, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(shape, generator=generator) * 0.4 - 0.2)
    return model
