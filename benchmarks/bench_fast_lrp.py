"""Benchmark: fast LRP (:class:`neon_attrib.vision.fast.FastEpsilonGammaBox`) against Zennit and the input gradient.

Measures images/s and peak memory on VGG-16 ``features`` for

* ``forward``: plain forward pass (no gradient),
* ``gradient``: forward + input gradient (the reference, ratio 1),
* ``zennit``: Zennit's ``EpsilonGammaBox`` through ``zennit.attribution.Gradient``,
* ``fast``: :class:`~neon_attrib.vision.fast.FastEpsilonGammaBox` through :class:`~neon_attrib.vision.fast.LRPExplainer`
  (``fast_cl``: the same with ``channels_last`` inputs, ``--channels-last``; ``fast_fused``: the same with fused
  element-wise kernels, ``--fused``, checked against ``fast`` bit for bit; ``fast_graphs``: the same captured in CUDA
  graphs, ``--cuda-graphs``, on CUDA),

at each batch size, with the methods interleaved in every repeat (fair on a noisy, shared machine) and the median
reported, as wall-clock time and as the process's CPU time (``time.process_time``; on a shared CPU it is the fairer
measure, as it does not count the time other processes hold the cores). The fast heatmaps are checked against
Zennit's in the same run (max relative error). Prints a table and writes JSON to
``benchmarks/results/fast_lrp_<device>.json``.

Examples
--------
Small CPU run (a few minutes on 2 cores)::

    python benchmarks/bench_fast_lrp.py --device cpu --size 224 --batches 1 8 --repeats 3

GPU run with pretrained weights::

    python benchmarks/bench_fast_lrp.py --device cuda --full \\
        --weights ../shared/data/vgg16_imagenet_features/vgg16_features_keras_imagenet.pth
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torchvision
import zennit
from zennit.attribution import Gradient
from zennit.composites import EpsilonGammaBox

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    add_device_arguments,
    max_relative_error,
    measuring,
    output_gradient,
    peak_memory_mb,
    run_benchmark,
    time_interleaved,
    write_result,
)

from neon_attrib.pipeline.engine import precision_mode  # noqa: E402
from neon_attrib.vision.fast import FastEpsilonGammaBox, LRPExplainer  # noqa: E402


def build_features(weights: str | None, device: torch.device, dtype: torch.dtype) -> torch.nn.Sequential:
    """VGG-16 ``features`` with random weights (seed 0) or a torchvision-keyed state_dict."""
    torch.manual_seed(0)
    features = torchvision.models.vgg16(weights=None).features
    if weights:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = {key.removeprefix("features."): value for key, value in state.items()}
        features.load_state_dict(state)
    features = features.eval().to(device=device, dtype=dtype)
    for param in features.parameters():
        param.requires_grad_(False)
    return features


def identity(output: torch.Tensor) -> torch.Tensor:
    """The output as its own relevance (Zennit's default ``attr_output``)."""
    return output


def _run(methods: dict[str, Callable[[], object]], name: str) -> torch.Tensor:
    result = methods[name]()
    return result[1] if isinstance(result, tuple) else result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_device_arguments(parser, "cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=224, help="image height and width")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="batch sizes")
    parser.add_argument("--full", action="store_true", help="add batch size 128")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up calls per method")
    parser.add_argument("--weights", default=None, help="state_dict of vgg16().features (torchvision keys)")
    parser.add_argument("--no-zennit", action="store_true", help="skip Zennit (slow on CPU)")
    parser.add_argument("--zennit-max-batch", type=int, default=None, help="run Zennit only up to this batch size")
    parser.add_argument("--channels-last", action="store_true", help="also time the fast path with channels_last")
    parser.add_argument("--fused", action="store_true", help="also time the fast path with fused kernels")
    parser.add_argument("--cuda-graphs", action="store_true", help="also time the fast path in CUDA graphs (CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/fast_lrp_<device>.json)")
    args = parser.parse_args(argv)
    result = run_benchmark(args, _benchmark, "fast_lrp")
    print_table(result)
    write_result(result, args.output, f"fast_lrp_{result['device']}.json")
    return result


def _benchmark(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = list(args.batches) + ([128] if args.full and 128 not in args.batches else [])
    features = build_features(args.weights, device, torch.float32)
    low, high = -3.0, 3.0  # bounds of standardised inputs; ZBox only needs them to bracket the data
    zennit_attributor = Gradient(features, EpsilonGammaBox(low=low, high=high))
    # the explainers keep their hooks for the whole run, on copies, so the plain gradient and Zennit see a clean model
    explainer = LRPExplainer(copy.deepcopy(features), FastEpsilonGammaBox(low=low, high=high), precision=args.precision)
    explainer_cl = LRPExplainer(copy.deepcopy(features), FastEpsilonGammaBox(low=low, high=high), channels_last=True,
                                precision=args.precision)
    explainer_fused = LRPExplainer(copy.deepcopy(features), FastEpsilonGammaBox(low=low, high=high), fused=True,
                                   precision=args.precision)
    explainer_graphs = LRPExplainer(copy.deepcopy(features), FastEpsilonGammaBox(low=low, high=high),
                                    cuda_graphs=True, precision=args.precision)

    def plain_forward(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return features(x)

    rows = []
    measuring(rows=rows)  # written if the run is interrupted
    for batch in batches:
        generator = torch.Generator().manual_seed(batch)
        x = torch.randn(batch, 3, args.size, args.size, generator=generator).to(device)
        methods: dict[str, Callable[[], object]] = {
            "forward": partial(plain_forward, x),
            "gradient": partial(output_gradient, features, x),
            "fast": partial(explainer, x, identity),
        }
        if args.channels_last:
            methods["fast_cl"] = partial(explainer_cl, x, identity)
        if args.fused:
            methods["fast_fused"] = partial(explainer_fused, x, identity)
        if args.cuda_graphs and device.type == "cuda":
            methods["fast_graphs"] = partial(explainer_graphs, x, identity)
        if not args.no_zennit and (args.zennit_max_batch is None or batch <= args.zennit_max_batch):
            methods["zennit"] = partial(zennit_attributor, x, identity)
        run = partial(_run, methods)

        memory = {name: peak_memory_mb(device, partial(run, name)) for name in methods}
        for name in methods:  # CUDA graphs: two eager calls of a shape, then the capture
            for _ in range(max(0, args.warmup - 1) + (2 if name == "fast_graphs" else 0)):
                run(name)
        times, cpu_times = time_interleaved({name: partial(run, name) for name in methods}, device, args.repeats)

        error = None
        if "zennit" in methods:
            error = max_relative_error(run("fast"), run("zennit"))
        fused = {}
        if args.fused:  # the fused kernels must give the eager heatmap (bit for bit where division is IEEE)
            eager, fused_map = run("fast"), run("fast_fused")
            fused = {"fused_equals_fast": bool(torch.equal(eager, fused_map)),
                     "fused_vs_fast_max_rel_error": max_relative_error(fused_map, eager)}
        graphs = {}
        if "fast_graphs" in methods:  # replays (after two eager calls of a shape) must give the eager heatmap
            graphs = {"graph_replays": explainer_graphs.graphs.replays, "graphs_off": explainer_graphs.graphs.disabled,
                      "graphs_vs_fast_max_rel_error": max_relative_error(run("fast_graphs"), run("fast"))}
        vs_exact = {}
        if args.precision == "fast":  # the policy's own error: the same explainer with the exact switches
            with precision_mode("exact", device):
                exact = run("fast")
            vs_exact = {name: max_relative_error(run(name), exact) for name in methods if name.startswith("fast")}
        grad_median = statistics.median(times["gradient"])
        grad_cpu = statistics.median(cpu_times["gradient"])
        for name in methods:
            median = statistics.median(times[name])
            cpu = statistics.median(cpu_times[name])
            rows.append({
                "batch": batch, "method": name, "median_s": median, "min_s": min(times[name]), "times_s": times[name],
                "images_per_s": batch / median, "ratio_to_gradient": grad_median / median,
                "median_cpu_s": cpu, "cpu_ratio_to_gradient": grad_cpu / cpu,
                "peak_memory_mb": memory[name],
                "max_rel_error_vs_zennit": error if name.startswith("fast") else None,
                "max_rel_error_vs_exact": vs_exact.get(name),
                **(fused if name == "fast_fused" else {}),
                **(graphs if name == "fast_graphs" else {}),
            })

    result = {
        "benchmark": "fast_lrp",
        "model": "torchvision vgg16().features",
        "weights": args.weights or "random (seed 0)",
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "zennit": zennit.__version__ if hasattr(zennit, "__version__") else _dist_version("zennit"),
        "python": platform.python_version(),
        "dtype": "float32",
        "size": args.size,
        "batches": batches,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "attr_output": "output (identity)",
        "memory": "CUDA max_memory_allocated" if device.type == "cuda" else "peak RSS growth, sampled every 1 ms",
        "composite": "EpsilonGammaBox(low=-3, high=3, epsilon=1e-6, gamma=0.25)",
        "rows": rows,
    }
    explainer.close()
    explainer_cl.close()
    explainer_fused.close()
    explainer_graphs.close()
    return result


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def print_table(result: dict) -> None:
    """Print the rows as a Markdown table."""
    print(f"\nVGG-16 features, {result['size']}x{result['size']}, {result['device']} ({result['device_name']}), "
          f"torch {result['torch']}, {result['torch_threads']} threads, median of {result['repeats']}")
    print("| batch | method | median s | images/s | x gradient | CPU s | x gradient (CPU time) | peak MB "
          "| max rel. err vs Zennit |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in result["rows"]:
        error = row["max_rel_error_vs_zennit"]
        print(f"| {row['batch']} | {row['method']} | {row['median_s']:.3f} | {row['images_per_s']:.2f} | "
              f"{row['ratio_to_gradient']:.2f} | {row['median_cpu_s']:.3f} | {row['cpu_ratio_to_gradient']:.2f} | "
              f"{row['peak_memory_mb']:.0f} | {'' if error is None else f'{error:.1e}'} |")


if __name__ == "__main__":
    main()
