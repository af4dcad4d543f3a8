"""Benchmark: KDEOutlier forward + ``explain`` for N = 10^4, 10^5, 10^6 support points (d = 512, batch 64).

Each configuration runs in a fresh subprocess so that its peak memory (RSS on the CPU, ``max_memory_allocated`` on
CUDA) is its own. In the same run, Captum's IntegratedGradients (50 steps) explains the same score where it finishes
within ``--ig-limit`` seconds (estimated from one step). Prints a table and writes JSON.

    python benchmarks/bench_kde.py                      # CPU, all N
    python benchmarks/bench_kde.py --device cuda        # GPU
    python benchmarks/bench_kde.py --sizes 10000 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        result = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def run_one(n_support: int, dim: int, batch: int, device: str, dtype: str, repeats: int, ig_limit: float,
            reduced: int = 0) -> dict:
    """Measure one configuration in this process (called in a subprocess by ``main``)."""
    from captum.attr import IntegratedGradients

    from neon_attrib import KDEOutlier, explain

    torch.manual_seed(0)
    torch_dtype = getattr(torch, dtype)
    support = torch.rand(n_support, dim, dtype=torch_dtype, device=device)  # ReLU-like features in [0, 1)
    x = torch.rand(batch, dim, dtype=torch_dtype, device=device) + 0.1
    gamma = 1.0 / dim
    model = KDEOutlier(gamma=gamma).to(device=device, dtype=torch_dtype).fit(support)
    del support
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    forward_s, _ = _timed(lambda: model(x).detach(), device, repeats)
    chunked_s, scores = _timed(lambda: model.score(x), device, repeats)
    explain_s, relevance = _timed(lambda: explain(model, x), device, repeats)
    row = {
        "n_support": n_support, "dim": dim, "batch": batch, "device": device, "dtype": dtype,
        "forward_s": forward_s, "chunked_score_s": chunked_s, "explain_s": explain_s,
        "relevance_over_score": float((relevance.sum(1) / scores).mean()),
    }
    if reduced:
        start = time.perf_counter()
        small = model.reduced(reduced, method="herding", seed=0)
        row["reduced"] = {"n_support": reduced, "method": "herding", "build_s": time.perf_counter() - start}
        row["reduced"]["explain_s"], small_relevance = _timed(lambda: explain(small, x), device, repeats)
        row["reduced"]["score_rel_error"] = float(((small.score(x) - scores).abs() / scores).mean())
        cosine = torch.nn.functional.cosine_similarity(small_relevance, relevance, dim=1)
        row["reduced"]["relevance_cosine"] = float(cosine.mean())
    ig = IntegratedGradients(lambda inp: model(inp))
    baseline = torch.zeros_like(x)
    one_step_s, _ = _timed(lambda: ig.attribute(x, baselines=baseline, n_steps=1, internal_batch_size=batch), device, 1)
    row["ig_estimated_s"] = one_step_s * 50
    if one_step_s * 50 <= ig_limit:
        row["ig_s"], attributions = _timed(
            lambda: ig.attribute(x, baselines=baseline, n_steps=50, internal_batch_size=batch), device, 1)
        row["ig_over_neon"] = row["ig_s"] / explain_s
    else:
        row["ig_s"] = None
    if device.startswith("cuda"):
        row["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        row["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row["support_mb"] = n_support * dim * torch.finfo(torch_dtype).bits / 8 / 2**20
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ig-limit", type=float, default=240.0, help="skip IG when its estimate exceeds this (s)")
    parser.add_argument("--reduced", type=int, default=0, help="also test a herding-reduced support set of this size")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        row = run_one(args.sizes[0], args.dim, args.batch, args.device, args.dtype, args.repeats, args.ig_limit,
                      args.reduced)
        print(json.dumps(row))
        return

    rows = []
    for n_support in args.sizes:
        cmd = [sys.executable, __file__, "--child", "--sizes", str(n_support), "--dim", str(args.dim),
               "--batch", str(args.batch), "--device", args.device, "--dtype", args.dtype,
               "--repeats", str(args.repeats), "--ig-limit", str(args.ig_limit), "--reduced", str(args.reduced)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        ig = f"{r['ig_s']:.2f}" if r["ig_s"] is not None else f"(~{r['ig_estimated_s']:.0f}, skipped)"
        print(f"N={n_support:>8}  forward {r['forward_s']:.3f}s  chunked score {r['chunked_score_s']:.3f}s  "
              f"explain {r['explain_s']:.3f}s  IG-50 {ig}s  peak {r['peak_memory_mb']:.0f} MB "
              f"(support {r['support_mb']:.0f} MB)  ΣR/o {r['relevance_over_score']:.4f}", flush=True)
        if "reduced" in r:
            red = r["reduced"]
            print(f"    herding-reduced to {red['n_support']}: explain {red['explain_s']:.3f}s, score error "
                  f"{red['score_rel_error']:.2%}, relevance cosine {red['relevance_cosine']:.3f}", flush=True)

    from importlib.metadata import version

    result = {
        "benchmark": "kde_outlier_explain",
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None},
        "versions": {"torch": torch.__version__, "zennit": version("zennit"), "captum": version("captum"),
                     "python": platform.python_version()},
        "settings": {"dim": args.dim, "batch": args.batch, "dtype": args.dtype, "repeats": args.repeats,
                     "statistic": "median", "gamma": "1/dim", "ig_steps": 50},
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"kde_{args.device.split(':')[0]}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
