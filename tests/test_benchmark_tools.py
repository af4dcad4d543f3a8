"""The measuring tools of ``benchmarks/``: the FLOP counter whose bounds docs/speed.md quotes, and the peak memory."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
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


def _speed_rows(batch: int, seconds: dict[str, float], precision: str = "exact") -> list[dict]:
    return [{"head": "kde_outlier", "batch": batch, "method": method, "median_s": value, "precision": precision}
            for method, value in seconds.items()]


def test_gpu_goals_count_only_exact_variants_that_are_fast_enough(tmp_path):
    """gpu_goals.py reads the benchmarks' JSON: ratios to the gradient and to Zennit, the goal of each batch size
    (0.4 at batch 1, 0.6 from 32, none between), and a variant whose check says it did not give the eager heatmap
    (fused not bit-equal, graphs switched off or replays off by more than 1e-6) meets no goal, however fast."""
    import gpu_goals

    rows = (_speed_rows(1, {"gradient": 1.0, "fast": 2.0, "fast_fused": 1.5, "fast_graphs": 1.25, "reference": 10.0})
            + _speed_rows(8, {"gradient": 1.0, "fast": 2.0})
            + _speed_rows(32, {"gradient": 1.0, "fast": 2.0, "fast_fused": 1.6, "fast_graphs": 1.0,
                               "reference": 6.0})
            + _speed_rows(32, {"gradient": 0.1, "fast": 0.1}, precision="fast"))  # another policy: not read
    checks = [{"head": "kde_outlier", "batch": 1, "fused_equals_fast": False, "graphs_vs_fast_max_rel_error": 0.0,
               "graph_replays": 5, "graphs_off": None},
              {"head": "kde_outlier", "batch": 32, "fused_equals_fast": True, "graphs_vs_fast_max_rel_error": 2e-6,
               "graph_replays": 5, "graphs_off": None}]
    (tmp_path / "speed_cuda.json").write_text(json.dumps({"rows": rows, "checks": checks}))
    result = gpu_goals.main(["--results", str(tmp_path)])
    got = {(row["batch"], row["variant"]): row for row in result["rows"]}
    assert set(got) == {(1, "eager"), (1, "fused"), (1, "graphs"), (8, "eager"), (32, "eager"), (32, "fused"),
                        (32, "graphs")}
    assert got[1, "eager"]["ratio_to_gradient"] == 0.5 and got[1, "eager"]["vs_zennit"] == 5.0
    assert got[1, "eager"]["meets_gradient_goal"] and got[1, "eager"]["meets_zennit_goal"]
    assert got[1, "fused"]["exact"] is False and got[1, "fused"]["meets_gradient_goal"] is False
    assert got[1, "graphs"]["exact"] and got[1, "graphs"]["ratio_to_gradient"] == 0.8
    assert got[8, "eager"]["goal"] is None and got[8, "eager"]["meets_gradient_goal"] is None
    assert got[32, "eager"]["meets_gradient_goal"] is False and got[32, "eager"]["meets_zennit_goal"] is False
    assert got[32, "fused"]["exact"] and got[32, "fused"]["ratio_to_gradient"] == 0.625
    assert got[32, "fused"]["meets_gradient_goal"] and got[32, "fused"]["meets_zennit_goal"] is False  # 3.75x
    assert got[32, "graphs"]["exact"] is False and not got[32, "graphs"]["meets_gradient_goal"]  # 2e-6 > 1e-6
    best = {(row["batch"]): row["variant"] for row in result["best"]}
    assert best == {1: "graphs", 8: "eager", 32: "fused"}
    assert json.loads((tmp_path / "goals_cuda.json").read_text())["best"] == result["best"]
    # a file older than the run is not read
    assert gpu_goals.main(["--results", str(tmp_path), "--since", str(time.time() + 60),
                           "--output", str(tmp_path / "none.json")])["rows"] == []


def test_interrupted_benchmark_writes_the_rows_it_measured(tmp_path, monkeypatch):
    """A benchmark stopped by its time cap (SIGINT: KeyboardInterrupt) keeps the batch sizes it finished: they are
    written, marked interrupted, and it exits with status 130; stopped before any row, it writes nothing."""
    import bench_fast_lrp

    timed = bench_fast_lrp.time_interleaved
    calls = []

    def stopping(methods, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the cap is reached while the second batch size is timed
            raise KeyboardInterrupt
        return timed(methods, *args, **kwargs)

    monkeypatch.setattr(bench_fast_lrp, "time_interleaved", stopping)
    out = tmp_path / "fast_lrp.json"
    argv = ["--device", "cpu", "--size", "32", "--batches", "1", "2", "--repeats", "1", "--warmup", "0", "--no-zennit",
            "--output", str(out)]
    with pytest.raises(SystemExit) as stopped:
        bench_fast_lrp.main(argv)
    assert stopped.value.code == 130
    saved = json.loads(out.read_text())
    assert saved["interrupted"] is True and saved["precision"] == "exact" and saved["device"] == "cpu"
    assert {row["batch"] for row in saved["rows"]} == {1}
    assert {"gradient", "fast"} <= {row["method"] for row in saved["rows"]}
    assert all(row["precision"] == "exact" for row in saved["rows"])
    calls.clear()
    calls.append(1)  # the next call is the second: nothing measured yet
    out.unlink()
    with pytest.raises(KeyboardInterrupt):
        bench_fast_lrp.main(argv)
    assert not out.exists()
