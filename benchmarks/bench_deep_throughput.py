"""Benchmark: pixel heatmaps per second of NEON on VGG-16 (224x224), next to Zennit's LRP of the VGG-16 classifier.

Compared in the same run, per device and batch size (random weights: timing does not depend on them):

* ``neon``: :class:`~neon_attrib.deep.DeepNeon` (VGG-16 ``features`` + KDE outlier head, sum pooling) explained with
  :func:`neon_attrib.explain` and Zennit's ``EpsilonGammaBox`` for the conv layers (the reference path);
* ``neon_fast``: the same with ``fast=True`` (:mod:`neon_attrib.fast`'s exact rules; same numbers, checked here);
* ``zennit_vgg16``: Zennit's own ``EpsilonGammaBox`` LRP of the full ``torchvision.models.vgg16`` classifier (the
  predicted class), the peer: what a classifier explanation costs with the same library;
* ``gradient``: the plain gradient of the DeepNeon image score (one forward + one backward): the cost floor.

``explain`` includes one extra no-grad forward pass (it validates the input and picks the target before hooking).
Times are medians over ``--repeats`` runs after one warm-up at batch 1; a configuration stops repeating once it has
used ``--budget`` seconds. Prints a table and writes JSON.

    python benchmarks/bench_deep_throughput.py                        # CPU (and CUDA if present), batches 1 and 32
    python benchmarks/bench_deep_throughput.py --batches 1 8 --repeats 5 --devices cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("neon", "neon_fast", "zennit_vgg16", "gradient")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str, repeats: int, budget: float) -> tuple[list[float], object]:
    times, result, used = [], None, 0.0
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        result = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
        used += times[-1]
        if used > budget:
            break
    return times, result


def build(device: str, size: int):
    """The models and the explanation functions, one per method."""
    import torchvision
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonGammaBox

    from neon_attrib import KDEOutlier, explain
    from neon_attrib.deep import DeepNeon, get_preprocessing, vgg16_features

    torch.manual_seed(0)
    preprocessing = get_preprocessing("torchvision")
    features = vgg16_features().to(device)
    fit_images = preprocessing(torch.rand(4, 3, size, size)).to(device)
    model = DeepNeon(features, KDEOutlier(gamma=1.0), fast=False).fit(fit_images, progress=False)
    rows = model.feature_rows(fit_images, progress=False)
    model.head.gamma = float(1.0 / torch.cdist(rows, rows).pow(2).median())  # a kernel width matched to the features
    model.fit_head(rows)
    fast_model = DeepNeon(features, model.head, fast=True)

    classifier = torchvision.models.vgg16(weights=None).eval().to(device)
    low, high = preprocessing.bounds(device=device)
    classifier_composite = EpsilonGammaBox(low=low, high=high)

    def zennit_vgg16(x):
        with Gradient(classifier, classifier_composite) as attributor:
            _, relevance = attributor(x, lambda out: out * torch.nn.functional.one_hot(out.argmax(1), out.shape[1]))
        return relevance

    def gradient(x):
        leaf = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(model(leaf).sum(), leaf)
        return grad

    return {
        "neon": lambda x: explain(model, x),
        "neon_fast": lambda x: explain(fast_model, x),
        "zennit_vgg16": zennit_vgg16,
        "gradient": gradient,
    }, preprocessing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="batch sizes (default 1 32)")
    parser.add_argument("--size", type=int, default=224, help="image side (default 224)")
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when available")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (default 3)")
    parser.add_argument("--budget", type=float, default=60.0,
                        help="stop repeating a configuration after this many seconds (default 60)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "deep_throughput.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))

    results, checks = [], {}
    for device in devices:
        explainers, preprocessing = build(device, args.size)
        warm = preprocessing(torch.rand(1, 3, args.size, args.size)).to(device)
        reference = {name: fn(warm) for name, fn in explainers.items()}  # warm-up
        difference = (reference["neon"] - reference["neon_fast"]).abs().max() / reference["neon"].abs().max()
        checks[device] = {"neon_fast_vs_neon_max_rel_difference": float(difference)}
        for batch in args.batches:
            x = preprocessing(torch.rand(batch, 3, args.size, args.size,
                                         generator=torch.Generator().manual_seed(batch))).to(device)
            for name in METHODS:
                times, relevance = _timed(lambda fn=explainers[name], x=x: fn(x), device, args.repeats, args.budget)
                assert relevance.shape == x.shape
                median = statistics.median(times)
                results.append({"device": device, "batch": batch, "method": name, "seconds": median,
                                "heatmaps_per_second": batch / median, "repeats": len(times), "times": times})
                print(f"{device:5s} batch {batch:3d}  {name:13s} {median:8.3f} s  {batch / median:8.2f} heatmaps/s "
                      f"({len(times)} runs)", flush=True)
            del x

    print("\nheatmaps per second (ratio to zennit_vgg16 in brackets)")
    print(f"{'device':6s} {'batch':>5s}  " + "  ".join(f"{m:>18s}" for m in METHODS))
    for device in devices:
        for batch in args.batches:
            rows = {r["method"]: r for r in results if r["device"] == device and r["batch"] == batch}
            peer = rows["zennit_vgg16"]["heatmaps_per_second"]
            cells = "  ".join(f"{rows[m]['heatmaps_per_second']:8.2f} ({rows[m]['heatmaps_per_second'] / peer:4.2f}x)"
                              .rjust(18) for m in METHODS)
            print(f"{device:6s} {batch:5d}  {cells}")

    machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
               "torch_threads": torch.get_num_threads(),
               "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    payload = {"benchmark": "bench_deep_throughput", "machine": machine, "versions": _versions(),
               "settings": {"size": args.size, "batches": args.batches, "dtype": "float32", "repeats": args.repeats,
                            "budget_s": args.budget, "head": "KDEOutlier on 4 images' block-5 locations",
                            "composite": "EpsilonGammaBox (gamma 0.25, ZBox bounds of torchvision preprocessing)",
                            "weights": "random (timing does not depend on them)"},
               "checks": checks, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out}")
    return 0


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for package in ("torch", "torchvision", "zennit", "captum", "neon_attrib"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions


if __name__ == "__main__":
    sys.exit(main())
