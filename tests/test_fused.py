"""Fused element-wise kernels (neon_attrib.core.fused, ``Explainer(fused=True)``): the same numbers as the eager
operations and as Zennit, bit for bit, on every path of the fast rules; a clean fallback where compiling fails."""

from __future__ import annotations

import copy
import functools
import math
import warnings

import pytest
import torch
import torchvision
from conftest import randomize_batch_norms
from torch import nn
from zennit.attribution import Gradient
from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat
from zennit.core import stabilize

from neon_attrib.core import fused
from neon_attrib.pipeline.engine import ConservationWarning, isolated
from neon_attrib.vision.fast import (
    FastEpsilonGammaBox,
    FastEpsilonPlusFlat,
    FastGamma,
    FastResNetCanonizer,
    LRPExplainer,
)

LOW, HIGH = -3.0, 3.0


def same(result: torch.Tensor, reference: torch.Tensor) -> None:
    torch.testing.assert_close(result, reference, rtol=0, atol=0, equal_nan=True)


@functools.cache
def compiles(device: str) -> bool:
    """Whether torch.compile builds kernels on this machine and device (it needs a C compiler)."""
    try:
        return bool(torch.compile(lambda t: t + 1, fullgraph=True)(torch.ones(2, device=device)).eq(2).all())
    except Exception:
        return False


@pytest.fixture
def compiler():
    if not compiles("cpu"):
        pytest.skip("torch.compile cannot build kernels on this machine (the rules then run eagerly)")


@pytest.fixture
def kernels(monkeypatch):
    """Every tensor takes the fused kernels (not only large ones); yields the list of kernels that ran."""
    ran: list[str] = []
    run = fused._run

    def spy(name, *args):
        out = run(name, *args)
        if out is not None:
            ran.append(name)
        return out

    monkeypatch.setattr(fused, "MIN_ELEMENTS", 2)
    monkeypatch.setattr(fused, "_run", spy)
    return ran


def special_values(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    values = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(0))
    flat = values.view(-1)
    flat[:8] = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-7, -1e-7, 1e-30], dtype=dtype)
    return values


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_stabilized_ratio_equals_zennit(compiler, kernels, dtype, layout):
    """``R / stab(z)`` in one kernel: Zennit's stabilizer bit for bit (both zeros get +eps, NaN and inf included), in
    the tensors' own layout."""
    z = special_values(dtype, (2, 3, 5, 4))
    relevance = torch.randn(2, 3, 5, 4, dtype=dtype, generator=torch.Generator().manual_seed(1))
    if layout == "channels_last":
        z, relevance = (t.contiguous(memory_format=torch.channels_last) for t in (z, relevance))
    for eps in (1e-6, 0.25):
        ratio = fused.stabilized_ratio(relevance, z, torch.tensor(eps, dtype=dtype))
        assert ratio is not None and ratio.stride() == relevance.stride()
        same(ratio, relevance / stabilize(z, eps))
    assert kernels == ["ratio", "ratio"]


def test_small_or_mismatched_tensors_stay_eager(compiler):
    """Below MIN_ELEMENTS, with different layouts, broadcast (stride 0) relevance or different dtypes: None (the
    caller runs the eager operations)."""
    eps = torch.tensor(1e-6)
    small = torch.randn(4, 5)
    assert fused.stabilized_ratio(small, small, eps) is None
    big = torch.randn(2, 4, 64, 128)
    assert big.numel() >= fused.MIN_ELEMENTS
    assert fused.stabilized_ratio(big, big.contiguous(memory_format=torch.channels_last), eps) is None
    assert fused.stabilized_ratio(torch.ones(1, 1, 1, 1).expand(big.shape), big, eps) is None
    assert fused.stabilized_ratio(big.double(), big.double(), eps) is None
    assert fused.masked_bounds(big[:, :, :, ::2], big[:, :, :, ::2]) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_bounds_equal_the_eager_reduction(compiler, kernels, dtype):
    """min and max of R where z <= 0 (0 elsewhere): NaN relevance anywhere gives NaN, as in the eager reduction (and
    fails the shortcut's condition)."""
    z = special_values(dtype, (3, 7, 6))
    relevance = torch.randn(3, 7, 6, dtype=dtype, generator=torch.Generator().manual_seed(2))
    relevance.view(-1)[:2] = torch.tensor([100.0, -100.0])  # where z is +0 and -0: both count (z <= 0)
    for poison in (False, True):
        if poison:
            relevance[0, 0, 0] = float("nan")
        low, high = fused.masked_bounds(z, relevance)
        reference = torch.aminmax((z <= 0).to(dtype) * relevance)
        same(low, reference[0])
        same(high, reference[1])
        assert low.isnan().item() is poison
        assert poison or (low.item(), high.item()) == (-100.0, 100.0)
    assert kernels == ["bounds", "bounds"]


def small_vgg(dtype: torch.dtype) -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True),
        nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(64, 10), nn.ReLU(), nn.Linear(10, 4),
    ).eval().to(dtype)


def small_resnet(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(4)
    return randomize_batch_norms(torchvision.models.resnet18(num_classes=5), seed=4).eval().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("network", ["vgg", "resnet"])
@pytest.mark.parametrize("name", ["epsilon_gamma_box", "epsilon_plus_flat"])
def test_fused_explainer_equals_eager_and_zennit(compiler, kernels, dtype, network, name):
    """The fast composites with fused kernels give the eager heatmap bit for bit, and Zennit's to rounding; the
    kernels ran (the Gamma shortcut's check and ratio, Epsilon's, the residual sums' Norm rule)."""
    model = small_vgg(dtype) if network == "vgg" else small_resnet(dtype)
    canonizers = [FastResNetCanonizer()] if network == "resnet" else []
    x = torch.randn(2, 3, 32, 32, dtype=dtype, generator=torch.Generator().manual_seed(5))

    def composite():
        if name == "epsilon_gamma_box":
            return FastEpsilonGammaBox(low=LOW, high=HIGH, canonizers=list(canonizers))
        return FastEpsilonPlusFlat(canonizers=list(canonizers))

    with LRPExplainer(model, composite()) as eager, LRPExplainer(model, composite(), fused=True) as fast:
        for _ in range(2):  # the first call checks on the host, the second follows predictions
            kernels.clear()
            _, reference = eager(x, lambda out: out)
            _, relevance = fast(x, lambda out: out)
            same(relevance, reference)
            assert "ratio" in kernels and (name != "epsilon_gamma_box" or "bounds" in kernels)
    zennit = (EpsilonGammaBox(low=LOW, high=HIGH, canonizers=[]) if name == "epsilon_gamma_box"
              else EpsilonPlusFlat())
    if network == "vgg":
        _, expected = Gradient(isolated(model), zennit)(x, lambda out: out)
        tolerance = 1e-5 if dtype == torch.float32 else 1e-9
        assert ((relevance - expected).abs().max() / expected.abs().max()).item() < tolerance


def test_fused_failed_prediction_and_nan_relevance(compiler, kernels):
    """A prediction that fails under fused kernels (negative inputs after non-negative ones; NaN relevance where an
    output is not positive) is taken again exactly: the eager heatmaps, NaN where Zennit has NaN."""
    dtype = torch.float64
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(6, 4, 3, padding=1), nn.ReLU()).eval().to(dtype)
    with torch.no_grad():
        model[0].weight.abs_()
        model[0].bias.abs_()
    generator = torch.Generator().manual_seed(7)
    positive = torch.rand(2, 3, 8, 8, dtype=dtype, generator=generator)
    negative = -4 * torch.rand(2, 3, 8, 8, dtype=dtype, generator=generator)

    def poisoned(out: torch.Tensor) -> torch.Tensor:
        return torch.where(out <= 0, torch.full_like(out, float("nan")), out)

    composite = FastEpsilonGammaBox(low=LOW, high=HIGH)
    with LRPExplainer(model, FastEpsilonGammaBox(low=LOW, high=HIGH)) as eager, \
            LRPExplainer(model, composite, fused=True) as fast:
        for x, seed in [(positive, None), (positive, None), (negative, None), (positive, None), (positive, poisoned)]:
            attr = (lambda out: out.clamp(min=0)) if seed is None else seed
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConservationWarning)  # the NaN heatmap fails the audit
                _, reference = eager(x, attr)
                _, relevance = fast(x, attr)
            same(relevance, reference)
        gamma = [hook for hook in composite.hook_refs if isinstance(hook, FastGamma)]
        assert gamma[-1].last_path == "exact" and reference.isnan().any()
    assert "bounds" in kernels


def test_compile_failure_falls_back_with_one_warning(monkeypatch, kernels):
    """Where torch.compile fails (no C compiler, an unsupported device), one RuntimeWarning names it and the eager
    operations run: the same heatmap."""
    def broken(*args, **kwargs):
        def kernel(*a):
            raise RuntimeError("no C compiler found")
        return kernel

    monkeypatch.setattr(fused, "_COMPILED", {})
    monkeypatch.setattr(fused, "_FAILED", [])
    monkeypatch.setattr(torch, "compile", broken)
    model = small_vgg(torch.float32)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(8))
    with LRPExplainer(model, FastEpsilonGammaBox(low=LOW, high=HIGH)) as eager, \
            LRPExplainer(model, FastEpsilonGammaBox(low=LOW, high=HIGH), fused=True) as fast:
        with pytest.warns(RuntimeWarning, match="no C compiler found") as record:
            _, relevance = fast(x, lambda out: out)
            fast(x, lambda out: out)
        assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
        same(relevance, eager(x, lambda out: out)[1])
    assert kernels == []


def _reciprocal_ratio(relevance, denominator, epsilon):  # 1 ulp off for many quotients, as an approximate division
    return relevance * (1 / (denominator + torch.where(denominator >= 0, epsilon, -epsilon)))


def _flushing_ratio(relevance, denominator, epsilon):  # subnormal numbers flushed to zero, as Triton does by default
    ratio = fused._ratio_body(relevance, denominator, epsilon)
    return torch.where(ratio.abs() < torch.finfo(ratio.dtype).smallest_normal, torch.zeros_like(ratio), ratio)


def _nan_ignoring_bounds(z, relevance):  # a reduction that skips NaN: the shortcut's check would pass on NaN
    masked = (z <= 0).to(relevance.dtype) * relevance
    return masked.nan_to_num(0.0, posinf=float("inf"), neginf=-float("inf")).aminmax()


@pytest.mark.parametrize("inexact", [_reciprocal_ratio, _flushing_ratio, _nan_ignoring_bounds],
                         ids=["approximate_division", "flushed_subnormals", "nan_ignoring_bounds"])
def test_kernel_with_other_numbers_is_not_used(compiler, kernels, monkeypatch, inexact):
    """A compiled kernel that differs from the eager operations in any bit on the probe values (as Triton's default
    division and subnormal flushing do) is not used on that device and dtype: one RuntimeWarning names it, the heatmap
    is the eager one, the other kernel still runs."""
    name = "bounds" if "bounds" in inexact.__name__ else "ratio"
    exact = {"ratio": fused._ratio_body, "bounds": fused._bounds_body}

    def compile_(body, **options):
        assert options["options"] == fused.exact_options()
        return inexact if body is exact[name] else body

    monkeypatch.setattr(fused, "_COMPILED", {})
    monkeypatch.setattr(fused, "_VERIFIED", {})
    monkeypatch.setattr(torch, "compile", compile_)
    model = small_vgg(torch.float32)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(8))
    with LRPExplainer(model, FastEpsilonGammaBox(low=LOW, high=HIGH)) as eager, \
            LRPExplainer(model, FastEpsilonGammaBox(low=LOW, high=HIGH), fused=True) as fast:
        with pytest.warns(RuntimeWarning, match=f"fused '{name}' kernel does not give the eager") as record:
            for _ in range(2):
                same(fast(x, lambda out: out)[1], eager(x, lambda out: out)[1])
        assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    assert name not in kernels and ({"ratio", "bounds"} - {name}) <= set(kernels)
    assert fused._VERIFIED == {(name, "cpu", torch.float32): False, (({"ratio", "bounds"} - {name}).pop(), "cpu",
                                                                   torch.float32): True}


def test_unchecked_kernel_is_not_used_while_a_cuda_graph_is_captured(compiler, kernels, monkeypatch):
    """The first call of a kernel compares it with the eager operations on the host: never inside a CUDA graph's
    capture (the eager operations run there); a kernel checked before runs."""
    monkeypatch.setattr(fused, "_VERIFIED", {})
    monkeypatch.setattr(fused, "_capturing", lambda device: True)
    relevance, z = torch.randn(4, 8), torch.randn(4, 8)
    eps = torch.tensor(1e-6)
    assert fused.stabilized_ratio(relevance, z, eps) is None and not fused._VERIFIED
    monkeypatch.setattr(fused, "_capturing", lambda device: False)
    assert fused.stabilized_ratio(relevance, z, eps) is not None
    monkeypatch.setattr(fused, "_capturing", lambda device: True)
    same(fused.stabilized_ratio(relevance, z, eps), relevance / stabilize(z, 1e-6))
    assert kernels == ["ratio", "ratio"]


def test_compiled_with_the_eager_numerics_options():
    """The options that keep eager numerics (exact division in Triton, no flushing of subnormals, no fast math or
    contraction) are passed wherever the installed Inductor has them, and Inductor accepts them."""
    from torch._inductor import config

    known = set(config.get_config_copy())
    options = fused.exact_options()
    assert options and all(key in known for key in options)
    if {"eager_numerics.division_rounding", "emulate_divison_rounding"} & known:
        assert options.get("eager_numerics.division_rounding", options.get("emulate_divison_rounding")) is True
    with config.patch(options):
        assert all(getattr(config, key.split(".")[0]) is not None for key in options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_probe_values_span_the_exponent_range(dtype):
    """The probe has both zeros, infinities, subnormals, the extremes and every binade from the smallest subnormal to
    the largest finite number, and values of the usual size."""
    values = fused.probe_values(dtype, "cpu", seed=1).double()
    info = torch.finfo(dtype)
    assert {0.0, float("inf"), -float("inf"), info.max, -info.max} <= set(values.tolist())
    assert torch.signbit(values[values == 0]).unique().numel() == 2
    magnitudes = values[(values != 0) & values.isfinite()].abs()
    assert (magnitudes < info.smallest_normal).any() and magnitudes.min() == info.smallest_normal * info.eps
    binades = magnitudes.log2().floor().unique()
    assert binades.min() <= math.log2(info.smallest_normal * info.eps) and binades.max() == math.floor(
        math.log2(info.max))
    assert binades.numel() > 0.9 * (math.log2(info.max) - math.log2(info.smallest_normal * info.eps))
    assert ((magnitudes > 0.1) & (magnitudes < 4)).float().mean() > 0.3


def test_fused_is_opt_in_and_scoped(compiler, kernels):
    """Off by default, only inside the explainer's calls (not for the rules used through Zennit directly), and the
    option is checked."""
    model = small_vgg(torch.float32)
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    with LRPExplainer(model, FastEpsilonGammaBox(low=LOW, high=HIGH)) as explainer:
        explainer(x, lambda out: out)
    Gradient(isolated(model), FastEpsilonGammaBox(low=LOW, high=HIGH))(x, lambda out: out)
    assert kernels == [] and not fused.fusing()
    with LRPExplainer(model, FastEpsilonGammaBox(low=LOW, high=HIGH), fused=True) as explainer:
        explainer(x, lambda out: out)
    assert kernels and not fused.fusing()
    with pytest.raises(TypeError, match="'fused' parameter"):
        LRPExplainer(copy.deepcopy(model), FastEpsilonGammaBox(low=LOW, high=HIGH), fused="yes")


def test_python_modes_run_eagerly_and_keep_fusion(compiler, kernels):
    """Under a Python dispatch mode (a profiler, a FLOP counter) torch.compile skips the call: the eager operations
    run, the same heatmap, and fusion is not switched off for later calls."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counting(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    model = small_vgg(torch.float32)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(10))
    with LRPExplainer(model, FastEpsilonGammaBox(low=LOW, high=HIGH), fused=True) as fast:
        with Counting(), warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            _, under_mode = fast(x, lambda out: out)
        assert kernels == [] and not fused._FAILED
        _, relevance = fast(x, lambda out: out)
        assert kernels
    same(under_mode, relevance)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("network", ["vgg", "resnet"])
def test_cuda_fused_equals_eager(kernels, network):
    """On CUDA (Triton kernels, compiled with the eager numerics options): the fused heatmap equals the eager one bit
    for bit, and the kernels passed their check against the eager operations (else they would not have run)."""
    if not compiles("cuda"):
        pytest.skip("torch.compile cannot build CUDA kernels on this machine")
    model = (small_vgg if network == "vgg" else small_resnet)(torch.float32).cuda()
    canonizers = [FastResNetCanonizer()] if network == "resnet" else []
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(11)).cuda()
    with LRPExplainer(model, FastEpsilonGammaBox(low=LOW, high=HIGH, canonizers=list(canonizers))) as eager, \
            LRPExplainer(model, FastEpsilonGammaBox(low=LOW, high=HIGH, canonizers=list(canonizers)),
                         fused=True) as fast:
        for _ in range(2):
            _, reference = eager(x, lambda out: out)
            _, relevance = fast(x, lambda out: out)
            same(relevance, reference)
    assert "ratio" in kernels and "bounds" in kernels
