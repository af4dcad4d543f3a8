"""The measuring tools of ``benchmarks/``: the FLOP counter whose bounds docs/speed.md quotes, and the peak memory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn
from zennit.attribution import Gradient
from zennit.composites import LayerMapComposite

from neon_attrib.vision.fast import FastGamma, FastPass

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import count_flops, peak_memory_mb  # noqa: E402


def conv_flops(conv: nn.Conv2d, out: torch.Tensor) -> int:
    """2 * multiply-adds of one convolution producing ``out``."""
    return 2 * out.numel() * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] // conv.groups


def input_gradient(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    leaf = x.detach().requires_grad_(True)
    output = model(leaf)
    (grad,) = torch.autograd.grad(output, leaf, output.detach())
    return grad


def test_count_flops_of_a_convolution_and_its_input_gradient():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    x = torch.rand(2, 3, 8, 8)
    out = conv(x)
    forward = count_flops(lambda: conv(x))
    assert sum(forward.values()) == conv_flops(conv, out)
    both = count_flops(lambda: input_gradient(conv, x))
    assert sum(both.values()) == 2 * conv_flops(conv, out)  # forward + one transposed convolution (no weight grad)


def test_fast_gamma_costs_three_convolutions_where_the_gradient_costs_two():
    """The arithmetic behind the FLOP bounds in the docs: the Gamma shortcut is forward + modified forward +
    transposed convolution, the plain input gradient forward + transposed convolution."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()).eval()
    x = torch.rand(2, 3, 16, 16)  # non-negative input; each ReLU zeroes the relevance where z <= 0
    composite = LayerMapComposite([(nn.ReLU, FastPass()), (nn.Conv2d, FastGamma(gamma=0.25))])
    with Gradient(model, composite) as attributor:
        fast = sum(count_flops(lambda: attributor(x, lambda output: output)).values())
        rules = [hook for hook in composite.hook_refs if isinstance(hook, FastGamma)]
        assert [hook.last_path for hook in rules] == ["shortcut", "shortcut"]
    gradient = sum(count_flops(lambda: input_gradient(model, x)).values())
    assert 3 * gradient == 2 * fast


def test_peak_memory_sees_a_tensor_held_during_the_call():
    def hold() -> float:
        block = torch.ones(10_000_000)  # 40 MB, alive until the sum is taken
        return float(block.sum())

    peak = peak_memory_mb(torch.device("cpu"), hold)
    assert 38 <= peak < 400
    assert peak_memory_mb(torch.device("cpu"), lambda: None) < 5


def test_benchmark_rows_say_their_precision(tmp_path):
    """A tiny run of bench_fast_lrp on the CPU: every row carries the precision policy it ran under."""
    import bench_fast_lrp

    out = tmp_path / "fast_lrp.json"
    result = bench_fast_lrp.main(["--device", "cpu", "--precision", "fast", "--size", "32", "--batches", "1",
                                  "--repeats", "1", "--warmup", "0", "--no-zennit", "--output", str(out)])
    saved = json.loads(out.read_text())
    assert saved["precision"] == result["precision"] == "fast"
    assert saved["rows"] and all(row["precision"] == "fast" for row in saved["rows"])
