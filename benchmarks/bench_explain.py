"""Benchmark: the one-call ``explain`` against the reusable explainer and a plain gradient of the same score.

VGG-16 ``features`` + KDE outlier head (fused, N support locations) + sum pooling
(:class:`neon_attrib.vision.deep.DeepNeon`),
batch 4 at 224x224 by default, CPU. Interleaved in every repeat:

* ``gradient``: forward + plain input gradient of the score (ratio 1);
* ``explainer``: ``model.explainer()`` registered once, one call per batch (audit on, as by default);
* ``explain``: ``neon_attrib.explain(model, images)``: composite resolved, model copied, hooks registered and removed,
  one forward and one backward, conservation audit, per call;
* ``explain_no_audit``: the same with ``audit=False`` inside (to show what the audit costs).

Goal: ``explain`` at >= 0.6x the plain gradient's throughput (heatmaps per second), as the explainer.

    python benchmarks/bench_explain.py                # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import environment, median, time_interleaved, write_result  # noqa: E402
from bench_speed import build_head, plain_gradient, support_rows  # noqa: E402

from neon_attrib import explain  # noqa: E402
from neon_attrib.pipeline.engine import run  # noqa: E402
from neon_attrib.vision.deep import DeepNeon, vgg16_features  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--support", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    features = vgg16_features().to(device)
    support = support_rows(features, args.support, args.size, device)
    model = DeepNeon(features, build_head("kde_outlier", support)).to(device)
    images = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(2)).to(device)
    explainer = model.explainer()
    reference = explain(model, images)
    torch.testing.assert_close(explainer(images)[1], reference)
    methods = {
        "gradient": lambda: plain_gradient(model, images),
        "explainer": lambda: explainer(images),
        "explain": lambda: explain(model, images),
        "explain_no_audit": lambda: run(model, (images,), audit=False),
    }
    for method in methods.values():  # warm-up
        method()
    times, cpu_times = time_interleaved(methods, device, args.repeats)
    base = median(times["gradient"])
    rows = [{"method": name, "seconds": median(values), "heatmaps_per_s": args.batch / median(values),
             "throughput_vs_gradient": base / median(values), "cpu_seconds": median(cpu_times[name])}
            for name, values in times.items()]
    for row in rows:
        print(f"{row['method']:<18}{row['seconds']:>9.3f} s  {row['heatmaps_per_s']:>7.2f}/s  "
              f"{row['throughput_vs_gradient']:>5.2f}x gradient")
    result = {"benchmark": "bench_explain", "environment": environment(device), "batch": args.batch,
              "size": args.size, "n_support": args.support, "head": "KDEOutlier (fused), sum pooling",
              "backbone": "VGG-16 features, random weights", "repeats": args.repeats, "rows": rows}
    write_result(result, args.output, f"explain_{device.type}.json")
    return result


if __name__ == "__main__":
    main()
