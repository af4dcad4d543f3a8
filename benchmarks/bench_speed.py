"""Benchmark: NEON pixel heatmaps per second against the plain gradient of the same network (issue "Speed").

For every head (KDE outlier, KDE inlier, k-means) and support-set size N, on VGG-16 ``features`` (224x224 by
default) + head + sum/positive pooling (:class:`neon_attrib.vision.deep.DeepNeon`), at every batch size:

* ``forward``: the model's score, no gradient (``torch.inference_mode``);
* ``gradient``: forward + plain input gradient of the explained score: the limit we measure against (ratio 1);
* ``reference``: the NEON heatmap through Zennit's own ``EpsilonGammaBox`` rules on the VGG part (``fast=False``);
* ``fast``: the NEON heatmap through :mod:`neon_attrib.vision.fast`'s exact rules (``DeepNeon``'s default);
* ``fast_bf16`` (``--autocast``): the fast path under bfloat16 autocast, with its heatmap error against float32;
* ``fast_fused`` (``--fused``), ``fast_graphs`` (``--cuda-graphs``, CUDA only): the fast path with fused element-wise
  kernels, or replayed from CUDA graphs, each checked against ``fast``;

and, once per batch size, for the peer: ``classifier_gradient``, ``classifier_fast`` (``FastEpsilonGammaBox`` through
an explainer, with ``_fused`` and ``_graphs`` variants as above) and ``classifier_zennit`` (Zennit's
``EpsilonGammaBox``) on the full torchvision VGG-16 classifier, predicted class. Heatmaps come from explainers that
register their hooks once (:meth:`DeepNeon.explainer`). Methods are interleaved in every repeat; medians of wall-clock
and process CPU time are reported, with peak memory (CUDA allocator, or sampled RSS on CPU) from one extra call.
The fast heatmaps are compared with the reference ones in the same run (max relative error).

The KDE heads run fused (score and gradient in one chunked pass over the support set). Support sets are jittered
copies of block-5 locations of random images (timings do not depend on the values; weights are random too).

    python benchmarks/bench_speed.py --device cpu --batches 1 8                     # a CPU run (~15 min, 2 cores)
    python benchmarks/bench_speed.py --device cuda --batches 1 32 128 --channels-last --autocast
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    add_device_arguments,
    environment,
    max_relative_error,
    measuring,
    median,
    peak_memory_mb,
    run_benchmark,
    time_interleaved,
    write_result,
)

from neon_attrib import KDEInlier, KDEOutlier, KMeansMembership  # noqa: E402
from neon_attrib.pipeline.attribution import attribution_output  # noqa: E402
from neon_attrib.vision.deep import DeepNeon, get_preprocessing, vgg16_features  # noqa: E402
from neon_attrib.vision.fast import FastEpsilonGammaBox, LRPExplainer  # noqa: E402


def argmax_score(output: torch.Tensor) -> torch.Tensor:
    """The relevance put on a classifier's output: its top class's score (one function object: CUDA graphs key on
    it)."""
    return attribution_output(output, output.argmax(1))

HEADS = ("kde_outlier", "kde_inlier", "kmeans")


def support_rows(features: torch.nn.Module, n_support: int, size: int, device: torch.device,
                 preprocessing: str = "torchvision") -> torch.Tensor:
    """``n_support`` non-negative location vectors: block-5 locations of 8 random images, each copied with a random
    multiplicative jitter (zeros stay zeros, as in real ReLU features)."""
    generator = torch.Generator().manual_seed(0)
    images = get_preprocessing(preprocessing)(torch.rand(8, 3, size, size, generator=generator)).to(device)
    with torch.inference_mode():
        rows = DeepNeon._rows(features(images)).cpu()
    picks = torch.randint(rows.shape[0], (n_support,), generator=generator)
    jitter = torch.exp(0.2 * torch.randn(n_support, rows.shape[1], generator=generator))
    return (rows[picks] * jitter).to(device)


def build_head(name: str, support: torch.Tensor) -> torch.nn.Module:
    sample = support[torch.randperm(support.shape[0], generator=torch.Generator().manual_seed(1))[:2000]]
    gamma = float(1.0 / torch.cdist(sample, sample).pow(2).median())  # kernel width matched to the features
    if name == "kde_outlier":
        head = KDEOutlier(gamma=gamma, fused=True)
    elif name == "kde_inlier":
        head = KDEInlier(gamma=gamma, n_features=2500, random_state=0)
    else:
        head = KMeansMembership(n_clusters=8, n_init=1, random_state=0)
    return head.to(support.device).fit(support)


def plain_gradient(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    leaf = x.detach().requires_grad_(True)
    with torch.enable_grad():
        output = model(leaf)
        seed = attribution_output(output, output.argmax(-1) if output.ndim > 1 else None)
        (grad,) = torch.autograd.grad(output, leaf, seed)
    return grad


def plain_forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


def heatmap(explainer: Callable, x: torch.Tensor) -> torch.Tensor:
    return explainer(x)[1]


def rows_for(methods: dict[str, Callable[[], object]], batch: int, device: torch.device, args: argparse.Namespace,
             gradient_name: str, extra: dict) -> list[dict]:
    """Warm up, time (interleaved), measure memory; one JSON row per method."""
    for _ in range(args.warmup):
        for run in methods.values():
            run()
    for name, run in methods.items():  # CUDA graphs: two eager calls of a shape, then the capture
        for _ in range(2 if name.endswith("_graphs") else 0):
            run()
    times, cpu_times = time_interleaved(methods, device, args.repeats, args.budget)
    memory = {name: None if args.no_memory else peak_memory_mb(device, run) for name, run in methods.items()}
    grad_s, grad_cpu = median(times[gradient_name]), median(cpu_times[gradient_name])
    rows = []
    for name in methods:
        wall, cpu = median(times[name]), median(cpu_times[name])
        rows.append({**extra, "batch": batch, "method": name, "median_s": wall, "times_s": times[name],
                     "images_per_s": batch / wall, "ratio_to_gradient": grad_s / wall, "median_cpu_s": cpu,
                     "cpu_ratio_to_gradient": grad_cpu / cpu, "peak_memory_mb": memory[name]})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_arguments(parser, "cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=224, help="image side (default 224)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="batch sizes (default 1 32)")
    parser.add_argument("--heads", nargs="+", choices=HEADS, default=list(HEADS))
    parser.add_argument("--supports", type=int, nargs="*", default=[10_000, 100_000],
                        help="support-set sizes N (none: the classifier only)")
    parser.add_argument("--no-classifier", dest="classifier", action="store_false",
                        help="skip the VGG-16 classifier rows (plain gradient, Zennit LRP)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per method before timing (default 1)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory call (saves time on CPU)")
    parser.add_argument("--budget", type=float, default=120.0, help="stop repeating a configuration after this many s")
    parser.add_argument("--reference-max-batch", type=int, default=None,
                        help="time the Zennit reference path and the classifier's Zennit LRP only up to this batch")
    parser.add_argument("--channels-last", action="store_true",
                        help="fast path with channels_last inputs (the default with --precision fast)")
    parser.add_argument("--autocast", action="store_true", help="also time the fast path under bfloat16 autocast")
    parser.add_argument("--fused", action="store_true", help="also time the fast path with fused kernels")
    parser.add_argument("--cuda-graphs", action="store_true", help="also time the fast path in CUDA graphs (CUDA)")
    parser.add_argument("--weights", default=None,
                        help="state_dict of VGG-16's conv base (default: random weights), e.g. "
                             "../shared/data/vgg16_imagenet_features/vgg16_features_keras_imagenet.pth")
    parser.add_argument("--preprocessing", default="torchvision", help="'caffe' for the Keras/Caffe weights")
    parser.add_argument("--float64-check", action="store_true",
                        help="also compare fast and reference heatmaps in float64 (smallest batch)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/speed_<device>.json)")
    args = parser.parse_args(argv)
    result = run_benchmark(args, _benchmark, "speed")
    print(markdown(result))
    print()
    print(summary(result))
    write_result(result, args.output, f"speed_{result['device']}.json")
    return result


def _benchmark(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    features = vgg16_features(args.weights).to(device)
    for param in features.parameters():
        param.requires_grad_(False)
    preprocessing = get_preprocessing(args.preprocessing)
    inputs = {batch: preprocessing(torch.rand(batch, 3, args.size, args.size,
                                              generator=torch.Generator().manual_seed(batch))).to(device)
              for batch in args.batches}
    with_reference = {batch: args.reference_max_batch is None or batch <= args.reference_max_batch
                      for batch in args.batches}
    rows, checks = [], []
    measuring(rows=rows, checks=checks)  # written if the run is interrupted

    import torchvision
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonGammaBox

    classifier = torchvision.models.vgg16(weights=None).eval().to(device)
    for param in classifier.parameters():
        param.requires_grad_(False)
    low, high = preprocessing.bounds(device=device)
    classifier_options = {"precision": args.precision, "audit": False}
    classifier_fast = {"classifier_fast": LRPExplainer(copy.deepcopy(classifier), FastEpsilonGammaBox(
        low=low, high=high), **classifier_options)}
    if args.fused:
        classifier_fast["classifier_fast_fused"] = LRPExplainer(copy.deepcopy(classifier), FastEpsilonGammaBox(
            low=low, high=high), fused=True, **classifier_options)
    if args.cuda_graphs and device.type == "cuda":
        classifier_fast["classifier_fast_graphs"] = LRPExplainer(copy.deepcopy(classifier), FastEpsilonGammaBox(
            low=low, high=high), cuda_graphs=True, **classifier_options)
    for batch, x in inputs.items() if args.classifier else ():
        methods = {"classifier_gradient": partial(plain_gradient, classifier, x)}
        methods.update({name: partial(explainer, x, argmax_score) for name, explainer in classifier_fast.items()})
        attributor = None
        if with_reference[batch]:
            # on a copy: the hooks stay registered while the plain gradient runs too
            attributor = Gradient(copy.deepcopy(classifier), EpsilonGammaBox(low=low, high=high)).__enter__()
            methods["classifier_zennit"] = partial(attributor, x, argmax_score)
        rows += rows_for(methods, batch, device, args, "classifier_gradient",
                         {"head": "vgg16 classifier", "n_support": None})
        check = {"head": "vgg16 classifier", "n_support": None, "batch": batch}
        fast_map = classifier_fast["classifier_fast"](x, argmax_score)[1]
        if "classifier_fast_fused" in classifier_fast:  # the eager heatmap, bit for bit
            fused_map = classifier_fast["classifier_fast_fused"](x, argmax_score)[1]
            check["fused_equals_fast"] = bool(torch.equal(fused_map, fast_map))
            check["fused_vs_fast_max_rel_error"] = max_relative_error(fused_map, fast_map)
        if "classifier_fast_graphs" in classifier_fast:  # replayed steps must give the eager heatmap
            graphed = classifier_fast["classifier_fast_graphs"]
            check["graphs_vs_fast_max_rel_error"] = max_relative_error(graphed(x, argmax_score)[1], fast_map)
            check["graph_replays"] = graphed.graphs.replays
            check["graphs_off"] = graphed.graphs.disabled
        if attributor is not None:
            check["fast_vs_zennit_max_rel_error"] = max_relative_error(fast_map, attributor(x, argmax_score)[1])
            attributor.__exit__(None, None, None)
        checks.append(check)
        print(f"classifier, batch {batch}: done", flush=True)
    for explainer in classifier_fast.values():
        explainer.close()

    for n_support in args.supports:
        support = support_rows(features, n_support, args.size, device, args.preprocessing)
        for head_name in args.heads:
            head = build_head(head_name, support)
            pool = "positive" if head_name == "kmeans" else "sum"
            model = DeepNeon(features, head, pool=pool, preprocessing=args.preprocessing)
            # every explainer keeps its hooks on a model of its own
            options = {"channels_last": args.channels_last or None, "precision": args.precision}
            fast = copy.deepcopy(model).explainer(**options)
            reference = DeepNeon(copy.deepcopy(features), copy.deepcopy(head), pool=pool, fast=False,
                                 preprocessing=args.preprocessing).explainer(precision=args.precision)
            bf16 = copy.deepcopy(model).explainer(**options, autocast_dtype=torch.bfloat16)
            fused = copy.deepcopy(model).explainer(**options, fused=True)
            graphed = copy.deepcopy(model).explainer(**options, cuda_graphs=True)
            for batch, x in inputs.items():
                methods = {"forward": partial(plain_forward, model, x), "gradient": partial(plain_gradient, model, x),
                           "fast": partial(heatmap, fast, x)}
                if with_reference[batch]:
                    methods["reference"] = partial(heatmap, reference, x)
                if args.autocast:
                    methods["fast_bf16"] = partial(heatmap, bf16, x)
                if args.fused:
                    methods["fast_fused"] = partial(heatmap, fused, x)
                if args.cuda_graphs and device.type == "cuda":
                    methods["fast_graphs"] = partial(heatmap, graphed, x)
                extra = {"head": head_name, "n_support": n_support}
                rows += rows_for(methods, batch, device, args, "gradient", extra)
                fast_map = heatmap(fast, x)
                check = {**extra, "batch": batch}
                if "reference" in methods:
                    check["fast_vs_reference_max_rel_error"] = max_relative_error(fast_map, heatmap(reference, x))
                if args.fused:  # the same numbers as the eager operations (bit for bit where division is IEEE)
                    fused_map = heatmap(fused, x)
                    check["fused_equals_fast"] = bool(torch.equal(fused_map, fast_map))
                    check["fused_vs_fast_max_rel_error"] = max_relative_error(fused_map, fast_map)
                if "fast_graphs" in methods:  # replayed steps must give the eager heatmap
                    check["graphs_vs_fast_max_rel_error"] = max_relative_error(heatmap(graphed, x), fast_map)
                    check["graph_replays"] = graphed.graphs.replays
                    check["graphs_off"] = graphed.graphs.disabled
                if args.autocast:
                    low_precision = heatmap(bf16, x).float()
                    check["bf16_vs_fp32_max_rel_error"] = max_relative_error(low_precision, fast_map)
                    check["bf16_vs_fp32_cosine"] = float(torch.nn.functional.cosine_similarity(
                        low_precision.flatten(1).double(), fast_map.flatten(1).double()).min())
                checks.append(check)
                print(f"{head_name}, N={n_support}, batch {batch}: {check}", flush=True)
            for explainer in (fast, reference, bf16, fused, graphed):
                explainer.close()
            if args.float64_check:
                x = inputs[min(inputs)].double()
                model64 = copy.deepcopy(model).double()
                with model64.explainer() as explainer:
                    fast_map = explainer(x)[1]
                model64.fast = False
                with model64.explainer() as explainer:
                    reference_map = explainer(x)[1]
                checks.append({"head": head_name, "n_support": n_support, "batch": x.shape[0], "dtype": "float64",
                               "fast_vs_reference_max_rel_error": max_relative_error(fast_map, reference_map)})
                print(f"{head_name}, N={n_support}, float64: {checks[-1]}", flush=True)

    result = {
        "benchmark": "bench_speed",
        **environment(device),
        "settings": {"size": args.size, "batches": args.batches, "heads": args.heads, "supports": args.supports,
                     "repeats": args.repeats, "warmup": args.warmup, "budget_s": args.budget, "dtype": "float32",
                     "channels_last": args.channels_last or args.precision == "fast",
                     "autocast": "bfloat16" if args.autocast else None,
                     "reference_max_batch": args.reference_max_batch,
                     "composite": "EpsilonGammaBox (gamma 0.25, ZBox bounds of torchvision preprocessing)",
                     "weights": args.weights or "random (timings do not depend on them)",
                     "preprocessing": args.preprocessing,
                     "kde_outlier": "fused=True", "kde_inlier": "n_features=2500",
                     "kmeans": "8 clusters, pool positive",
                     "memory": ("CUDA max_memory_allocated above the start" if device.type == "cuda"
                                else "peak RSS growth, sampled every 1 ms")},
        "rows": rows,
        "checks": checks,
    }
    return result


def markdown(result: dict) -> str:
    """The rows as a Markdown table (ratios: to the plain gradient of the same network, same batch)."""
    lines = [f"{result['device_name']} ({result['device']}, {result['torch_threads']} threads), "
             f"{result['settings']['size']}x{result['settings']['size']}, float32",
             "",
             "| head | N | batch | method | images/s | x gradient (wall) | x gradient (CPU time) | peak MB |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]
    for row in result["rows"]:
        lines.append(f"| {row['head']} | {row['n_support'] or ''} | {row['batch']} | {row['method']} | "
                     f"{row['images_per_s']:.3g} | {row['ratio_to_gradient']:.2f} | {row['cpu_ratio_to_gradient']:.2f} "
                     f"| {'' if row['peak_memory_mb'] is None else round(row['peak_memory_mb'])} |")
    return "\n".join(lines)


def summary(result: dict) -> str:
    """One line per head, N and batch: the fast path against the plain gradient and the reference, and bf16's error."""
    checks = {(c["head"], c["n_support"], c["batch"]): c for c in result["checks"]}
    by_config: dict[tuple, dict[str, dict]] = {}
    for row in result["rows"]:
        by_config.setdefault((row["head"], row["n_support"], row["batch"]), {})[row["method"]] = row
    lines = ["| head | N | batch | gradient (img/s) | fast (img/s) | fast / gradient | reference / gradient "
             "| fast / reference | fast vs reference (max rel. err.) | bf16 / gradient | bf16 vs fp32 (max rel. err.) "
             "| peak MB fast / reference |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, methods in by_config.items():
        if "fast" not in methods:
            continue
        fast, grad = methods["fast"], methods["gradient"]
        ref, bf16, check = methods.get("reference"), methods.get("fast_bf16"), checks.get(key, {})

        def fmt(value, spec):
            return "—" if value is None else format(value, spec)

        memory = f"{fmt(fast['peak_memory_mb'], '.0f')} / {fmt(ref and ref['peak_memory_mb'], '.0f')}"
        lines.append(
            f"| {key[0]} | {key[1]:.0e} | {key[2]} | {grad['images_per_s']:.2f} | {fast['images_per_s']:.2f} | "
            f"**{fast['ratio_to_gradient']:.2f}** | {fmt(ref and ref['ratio_to_gradient'], '.2f')} | "
            f"{fmt(ref and ref['median_s'] / fast['median_s'], '.1f')}x | "
            f"{fmt(check.get('fast_vs_reference_max_rel_error'), '.1e')} | "
            f"{fmt(bf16 and bf16['ratio_to_gradient'], '.2f')} | {fmt(check.get('bf16_vs_fp32_max_rel_error'), '.1e')} "
            f"| {memory} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
