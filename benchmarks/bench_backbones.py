"""Benchmark: NEON heatmaps on ResNet backbones (PatchCore-style taps) against the plain gradient and Zennit.

For each backbone (ResNet-18, ResNet-50, Wide-ResNet-50-2, and EfficientNet-B0, MobileNetV2, DenseNet-121,
ConvNeXt-T canonized from their graph, tapped at two stages of strides 8 and 16; random weights, torchvision's
architectures), a KDE outlier head (fused, N support locations) sits on :class:`~neon_attrib.vision.FeatureTaps` at
``layer2`` and ``layer3`` (3x3 aggregation, ``layer3`` resized to ``layer2``'s resolution, concatenated), 224x224
inputs. At each
batch size, interleaved in every repeat:

* ``forward``: the score, no gradient (``torch.inference_mode``);
* ``gradient``: forward + plain input gradient of the same score: the limit we measure against (ratio 1);
* ``fast``: the NEON heatmap with :mod:`neon_attrib.vision.fast`'s exact rules and the default canonizers
  (``DeepNeon``'s default, :meth:`DeepNeon.explainer`);
* ``zennit``: the same heatmap with Zennit's own rules, ``EpsilonGammaBox`` with ``ResNetCanonizer``
  (``DeepNeon(fast=False)``), up to ``--zennit-max-batch``;
* ``fast_fused`` (``--fused``) and ``fast_graphs`` (``--cuda-graphs``, CUDA only): ``fast`` with fused element-wise
  kernels, or replayed from CUDA graphs, each checked against ``fast`` (``fused_equals_fast``,
  ``graphs_vs_fast_max_rel_error``, ``graph_replays``, ``graphs_off`` in the checks);

and, because the head's cost is the same in all three and dilutes the comparison, the backbone alone (the LRP the fast
rules change): ``taps_gradient``, ``taps_fast`` and ``taps_zennit``, the same three for the tapped feature map itself
(relevance = the activations, ``attr_output = output``; fast: :class:`~neon_attrib.vision.fast.LRPExplainer` with the
default
canonizers, Zennit: ``zennit.attribution.Gradient`` with ``EpsilonGammaBox`` and Zennit's own ``ResNetCanonizer``).
``--forward`` adds the plain forward pass.

Medians of wall-clock and process CPU time; peak memory from one more call (the CUDA allocator's peak on GPU, the peak
of the allocations the profiler records on CPU); the FLOPs of one more call (matrix products and
convolutions, forward and backward: the arithmetic bound of every speed ratio); and the fast heatmap's max relative
error against Zennit's in the same run. On CPUs the C library's allocator keeps freed memory (``--system-allocator``
to leave it alone), so that no method pays page faults for what the method before it returned. With ``../shared/data``
present, the same is measured with **real weights on real images**: the CIFAR-10 ResNet-56 (akamaster, option-A
shortcuts) on CIFAR-10 test images at 32x32, its head fitted on training images, and the Keras VGG-16 conv base tapped
at the ReLUs closing blocks 3 and 4 (224x224, CIFAR images upsampled); these rows also report the conservation audit.

    python benchmarks/bench_backbones.py                    # the default CPU run (~9 min on 2 cores)
    python benchmarks/bench_backbones.py --float64-check 32 --repeats 5 --budget 150   # the committed run
    python benchmarks/bench_backbones.py --device cuda --batches 1 32 --zennit-max-batch 32

JSON: ``benchmarks/results/backbones_<device>.json``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    add_device_arguments,
    count_flops,
    data_dir,
    environment,
    max_relative_error,
    measuring,
    median,
    peak_memory_mb,
    run_benchmark,
    steady_allocator,
    time_interleaved,
    write_result,
)
from zennit.attribution import Gradient  # noqa: E402
from zennit.composites import EpsilonGammaBox  # noqa: E402
from zennit.torchvision import ResNetCanonizer  # noqa: E402

from neon_attrib import KDEOutlier  # noqa: E402
from neon_attrib.pipeline.attribution import attribution_output  # noqa: E402
from neon_attrib.pipeline.engine import isolated  # noqa: E402
from neon_attrib.pipeline.graph import canonical_layer_map  # noqa: E402
from neon_attrib.vision import FeatureTaps, backbone, default_canonizers, get_preprocessing  # noqa: E402
from neon_attrib.vision.deep import DeepNeon, median_gamma  # noqa: E402
from neon_attrib.vision.fast import FastEpsilonGammaBox, FastResNetCanonizer, GuardBatchNorms, LRPExplainer  # noqa: E402

DATA = data_dir()
BACKBONES = ("resnet18", "resnet50", "wide_resnet50_2")
#: CNNs outside the documented backbones, canonized from their graph (GraphCanonizer): torchvision classifiers tapped
#: at two stages (strides 8 and 16, as PatchCore taps layer2 and layer3 of a ResNet)
GRAPH_BACKBONES = {
    "efficientnet_b0": ["features.3", "features.5"],
    "mobilenet_v2": ["features.6", "features.13"],
    "densenet121": ["features.denseblock2", "features.denseblock3"],
    "convnext_tiny": ["features.3", "features.5"],
}


def plain_gradient(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    leaf = x.detach().requires_grad_(True)
    with torch.enable_grad():
        output = model(leaf)
        (grad,) = torch.autograd.grad(output, leaf, attribution_output(output, None))
    return grad


def plain_forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


def heatmap(explainer: Callable, x: torch.Tensor) -> torch.Tensor:
    return explainer(x)[1]


def frozen(module: torch.nn.Module) -> torch.nn.Module:
    for param in module.parameters():
        param.requires_grad_(False)
    return module.eval()


def support_rows(features: torch.nn.Module, images: torch.Tensor, n_support: int) -> torch.Tensor:
    """``n_support`` location vectors: the locations of ``images``, each copied with a random multiplicative jitter
    (zeros stay zeros, as in real ReLU features)."""
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        rows = torch.cat([DeepNeon._rows(features(batch)) for batch in images.split(4)]).cpu()
    picks = torch.randint(rows.shape[0], (n_support,), generator=generator)
    jitter = torch.exp(0.2 * torch.randn(n_support, rows.shape[1], generator=generator))
    return (rows[picks] * jitter).to(images.device)


def build_model(features: torch.nn.Module, support: torch.Tensor, preprocessing: str) -> DeepNeon:
    sample = support[torch.randperm(support.shape[0], generator=torch.Generator().manual_seed(1))[:2000]]
    head = KDEOutlier(gamma=median_gamma(sample), fused=True).to(support.device).fit(support)
    return DeepNeon(features, head, preprocessing=preprocessing)


def taps_gradient(features: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    leaf = x.detach().requires_grad_(True)
    with torch.enable_grad():
        output = features(leaf)
        (grad,) = torch.autograd.grad(output, leaf, output.detach())
    return grad


def taps_heatmap(attributor: Callable, x: torch.Tensor) -> torch.Tensor:
    return attributor(x, lambda output: output)[1]


def measure(label: str, model: DeepNeon, inputs: dict[int, torch.Tensor], device: torch.device,
            args: argparse.Namespace, extra: dict, backbone_rows: bool = True, rows: list[dict] | None = None,
            checks: list[dict] | None = None) -> tuple[list[dict], list[dict]]:
    """Time every method at every batch size; check fast against Zennit; one JSON row per method, appended to
    ``rows`` (and the checks to ``checks``) as each batch size is done."""
    fast = model.explainer(audit=False, precision=args.precision)
    fused = model.explainer(audit=False, precision=args.precision, fused=True) if args.fused else None
    graphed = (model.explainer(audit=False, precision=args.precision, cuda_graphs=True)
               if args.cuda_graphs and device.type == "cuda" else None)
    zennit_model = copy.deepcopy(model)
    zennit_model.fast = False
    zennit = zennit_model.explainer(audit=False, precision=args.precision)
    features = model.features
    low, high = model.input_bounds()
    taps_fast = LRPExplainer(features, FastEpsilonGammaBox(low=low, high=high,
                                                           canonizers=default_canonizers(features)), audit=False,
                             precision=args.precision)
    # registered once, on a copy (Zennit's canonizers change the modules they are applied to)
    taps_zennit = Gradient(isolated(features), zennit_composite(low, high, features))
    taps_zennit.__enter__()
    rows = [] if rows is None else rows
    checks = [] if checks is None else checks
    for batch, x in inputs.items():
        methods = {"forward": partial(plain_forward, model, x)} if args.forward else {}
        methods.update({"gradient": partial(plain_gradient, model, x), "fast": partial(heatmap, fast, x)})
        if fused is not None:
            methods["fast_fused"] = partial(heatmap, fused, x)
        if graphed is not None:
            methods["fast_graphs"] = partial(heatmap, graphed, x)
        if batch <= args.zennit_max_batch:
            methods["zennit"] = partial(heatmap, zennit, x)
        if backbone_rows:
            methods.update({"taps_gradient": partial(taps_gradient, features, x),
                            "taps_fast": partial(taps_heatmap, taps_fast, x)})
            if batch <= args.zennit_max_batch:
                methods["taps_zennit"] = partial(taps_heatmap, taps_zennit, x)
        for _ in range(args.warmup):
            for run in methods.values():
                run()
        for name, run in methods.items():  # CUDA graphs: two eager calls of a shape, then the capture
            for _ in range(2 if name == "fast_graphs" else 0):
                run()
        times, cpu_times = time_interleaved(methods, device, args.repeats, args.budget)
        memory = {name: None if args.no_memory else peak_memory_mb(device, run) for name, run in methods.items()}
        # the arithmetic of each method (inference-mode kernels escape the counter: no count for the forward)
        # (a replayed CUDA graph launches no operator the counter sees: no count either)
        flops = {name: 0 if name in ("forward", "fast_graphs") else sum(count_flops(run).values())
                 for name, run in methods.items()}
        for name in methods:
            # ratios to the gradient of the same thing: the head's score, or the tapped map alone
            reference = "taps_gradient" if name.startswith("taps_") else "gradient"
            grad_s, grad_cpu = median(times[reference]), median(cpu_times[reference])
            wall, cpu = median(times[name]), median(cpu_times[name])
            gflop = flops[name] / 1e9 if flops[name] else None
            rows.append({"backbone": label, **extra, "batch": batch, "method": name, "median_s": wall,
                         "times_s": times[name], "images_per_s": batch / wall, "ratio_to_gradient": grad_s / wall,
                         "median_cpu_s": cpu, "cpu_ratio_to_gradient": grad_cpu / cpu,
                         "peak_memory_mb": memory[name], "gflop": gflop,
                         "flop_ratio_to_gradient": flops[reference] / flops[name] if flops[name] else None})
        check = {"backbone": label, "batch": batch}
        if fused is not None:  # the same numbers as the eager operations (bit for bit where division is IEEE)
            fused_map, fast_map = heatmap(fused, x), heatmap(fast, x)
            check["fused_equals_fast"] = bool(torch.equal(fused_map, fast_map))
            check["fused_vs_fast_max_rel_error"] = max_relative_error(fused_map, fast_map)
        if graphed is not None:  # replayed steps must give the eager heatmap
            check["graphs_vs_fast_max_rel_error"] = max_relative_error(heatmap(graphed, x), heatmap(fast, x))
            check["graph_replays"] = graphed.graphs.replays
            check["graphs_off"] = graphed.graphs.disabled
        if "zennit" in methods:
            check["fast_vs_zennit_max_rel_error"] = max_relative_error(heatmap(fast, x), heatmap(zennit, x))
        if "taps_zennit" in methods:
            check["taps_fast_vs_zennit_max_rel_error"] = max_relative_error(taps_heatmap(taps_fast, x),
                                                                            taps_heatmap(taps_zennit, x))
        if extra.get("weights") != "random":
            with model.explainer(audit=True, precision=args.precision) as audited:
                audited(x)
                check["audit_ok"] = audited.last_audit.ok
                check["audit_worst_relative_mismatch"] = float(audited.last_audit.relative_error.max())
        checks.append(check)
        print(f"{label}, batch {batch}: " + ", ".join(
            f"{name} {batch / median(times[name]):.3g} img/s" for name in methods) + f"; {check}", flush=True)
    for explainer in (fast, zennit, taps_fast, *(e for e in (fused, graphed) if e is not None)):
        explainer.close()
    taps_zennit.__exit__(None, None, None)
    return rows, checks


def zennit_canonizers(features: torch.nn.Module) -> list:
    """The canonizers a Zennit user picks: Zennit's own ``ResNetCanonizer`` for torchvision ResNets. Zennit has none
    for the other CNNs: there its rules run on the graph-canonized network (``GraphCanonizer``)."""
    canonizers = default_canonizers(features)
    # GuardBatchNorms: Zennit 1.0's merged batch norms (eps = 0) run on PyTorch 2.10/2.11 too
    return [ResNetCanonizer() if isinstance(c, FastResNetCanonizer) else c for c in canonizers] + [GuardBatchNorms()]


def zennit_composite(low, high, features: torch.nn.Module) -> EpsilonGammaBox:
    """Zennit's EpsilonGammaBox with the canonizers a Zennit user picks (and Zennit's rules for the layers the graph
    canonizer makes: Norm for affine and normalisation layers, the gate rule for gates)."""
    return EpsilonGammaBox(low=low, high=high, layer_map=canonical_layer_map(),
                           canonizers=zennit_canonizers(features))


def features_of(name: str, layers: list[str]) -> tuple[FeatureTaps, list[str]]:
    """A documented backbone by name tapped at ``layers``, or a torchvision CNN tapped at its own two stages."""
    if name in GRAPH_BACKBONES:
        layers = GRAPH_BACKBONES[name]
        return FeatureTaps(getattr(torchvision.models, name)(weights=None), layers), layers
    return FeatureTaps(backbone(name), layers), list(layers)


def float64_check(label: str, model: DeepNeon, x: torch.Tensor) -> dict:
    """Fast against Zennit in float64 (smaller inputs: Zennit is slow)."""
    model64 = copy.deepcopy(model).double()
    x = x.double()
    with model64.explainer(audit=False) as explainer:
        fast_map = explainer(x)[1]
    model64.fast = False
    with model64.explainer(audit=False) as explainer:
        reference = explainer(x)[1]
    check = {"backbone": label, "batch": x.shape[0], "size": x.shape[-1], "dtype": "float64",
             "fast_vs_zennit_max_rel_error": max_relative_error(fast_map, reference)}
    print(f"{label}, float64: {check}", flush=True)
    return check


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_arguments(parser, "cpu")
    parser.add_argument("--size", type=int, default=224, help="image side (default 224)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--backbones", nargs="*", default=[*BACKBONES, *GRAPH_BACKBONES],
                        choices=[*BACKBONES, *GRAPH_BACKBONES])
    parser.add_argument("--layers", nargs="+", default=["layer2", "layer3"], help="tapped layers (FeatureTaps)")
    parser.add_argument("--support", type=int, default=2_000,
                        help="support locations of the KDE head (default 2000: PatchCore's 1 %% coreset of about 250 "
                             "training images at 28x28 locations)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per method first")
    parser.add_argument("--budget", type=float, default=40.0, help="stop repeating a configuration after this many s")
    parser.add_argument("--forward", action="store_true", help="also time the plain forward pass")
    parser.add_argument("--fused", action="store_true", help="also time the fast path with fused kernels")
    parser.add_argument("--cuda-graphs", action="store_true", help="also time the fast path in CUDA graphs (CUDA)")
    parser.add_argument("--zennit-max-batch", type=int, default=1, help="time Zennit only up to this batch size")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory call")
    parser.add_argument("--no-real-weights", dest="real_weights", action="store_false",
                        help="skip the CIFAR ResNet-56 and Keras VGG-16 rows (they need ../shared/data)")
    parser.add_argument("--float64-check", type=int, default=0, metavar="SIZE",
                        help="also compare fast and Zennit in float64 at this image size (batch 1)")
    parser.add_argument("--system-allocator", action="store_true",
                        help="CPU: leave the C library's allocator as it is (default: freed memory stays in the "
                             "process, no page faults that depend on which method ran before)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/backbones_<device>.json)")
    args = parser.parse_args(argv)
    result = run_benchmark(args, _benchmark, "backbones")
    print(summary(result))
    write_result(result, args.output, f"backbones_{result['device']}.json")
    return result


def _benchmark(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator = "system default"
    if device.type == "cpu" and not args.system_allocator and steady_allocator():
        allocator = "steady: glibc keeps freed memory (M_MMAP_MAX 0, no trimming), as after warm-up"
    preprocessing = get_preprocessing("torchvision")
    generator = torch.Generator().manual_seed(0)
    fit_images = preprocessing(torch.rand(4, 3, args.size, args.size, generator=generator)).to(device)
    inputs = {batch: preprocessing(torch.rand(batch, 3, args.size, args.size,
                                              generator=torch.Generator().manual_seed(batch))).to(device)
              for batch in args.batches}
    rows, checks = [], []
    measuring(rows=rows, checks=checks)  # written if the run is interrupted
    for name in args.backbones:
        torch.manual_seed(0)
        features, layers = features_of(name, args.layers)
        features = frozen(features).to(device)
        model = build_model(features, support_rows(features, fit_images, args.support), "torchvision")
        canonizers = [type(c).__name__ for c in default_canonizers(model)]
        extra = {"weights": "random", "size": args.size, "layers": layers, "canonizers": canonizers}
        measure(name, model, inputs, device, args, extra, rows=rows, checks=checks)
        if args.float64_check:
            x = preprocessing(torch.rand(1, 3, args.float64_check, args.float64_check, generator=generator))
            checks.append(float64_check(name, model, x.to(device)))
        del model, features

    if args.real_weights and DATA.is_dir():
        arrays = np.load(DATA / "cifar10_subset" / "cifar10_subset.npz")
        # CIFAR-10 ResNet-56, real weights, real images at 32x32, the head fitted on 256 training images
        features = frozen(backbone("cifar_resnet56", DATA / "cifar10_resnet" / "resnet56-4bfd9763.th")).to(device)
        train = preprocessing(torch.from_numpy(arrays["x_train"][:256])).to(device)
        test = {batch: preprocessing(torch.from_numpy(arrays["x_test"][:batch])).to(device) for batch in (1, 8)}
        with torch.inference_mode():
            support = torch.cat([DeepNeon._rows(features(batch)) for batch in train.split(64)])
        model = build_model(features, support, "torchvision")
        extra = {"weights": "akamaster resnet56-4bfd9763.th", "size": 32, "layers": None,
                 "canonizers": [type(c).__name__ for c in default_canonizers(model)]}
        settings = copy.copy(args)
        settings.zennit_max_batch = 8
        measure("cifar_resnet56", model, test, device, settings, extra, backbone_rows=False, rows=rows,
                checks=checks)
        # Keras VGG-16 conv base, tapped at the ReLUs closing blocks 3 and 4, on CIFAR images upsampled to 224x224
        weights = DATA / "vgg16_imagenet_features" / "vgg16_features_keras_imagenet.pth"
        features = frozen(FeatureTaps(backbone("vgg16", weights), ["15", "22"])).to(device)
        caffe = get_preprocessing("caffe")
        rgb = F.interpolate(torch.from_numpy(arrays["x_test"][:5]).float() / 255, size=args.size, mode="bilinear")
        x = caffe(rgb.clamp(0, 1)).to(device)
        model = build_model(features, support_rows(features, x[1:], args.support), "caffe")
        extra = {"weights": "Keras VGG-16 (vgg16_features_keras_imagenet.pth)", "size": args.size,
                 "layers": ["15", "22"], "canonizers": []}
        measure("vgg16_keras", model, {1: x[:1]}, device, args, extra, backbone_rows=False, rows=rows,
                checks=checks)

    result = {
        "benchmark": "bench_backbones",
        **environment(device),
        "settings": {"size": args.size, "batches": args.batches, "backbones": args.backbones, "layers": args.layers,
                     "support": args.support, "repeats": args.repeats, "warmup": args.warmup, "budget_s": args.budget,
                     "zennit_max_batch": args.zennit_max_batch, "dtype": "float32",
                     "head": "KDEOutlier(fused=True), gamma = 1 / median squared distance of support locations",
                     "taps": "FeatureTaps(aggregate=3), coarser maps resized bilinearly to the finest",
                     "composite": "EpsilonGammaBox (gamma 0.25, ZBox bounds of the preprocessing); fast and zennit: "
                                  "DeepNeon's default canonizers (FastResNetCanonizer for ResNets, GraphCanonizer "
                                  "for the other CNNs); taps_zennit: Zennit's own ResNetCanonizer for ResNets; "
                                  "Zennit has no canonizer for the other CNNs, so its rules run on the "
                                  "graph-canonized network",
                     "graph_backbones": GRAPH_BACKBONES,
                     "weights": "random for the named backbones (timings do not depend on them)",
                     "allocator": allocator,
                     "memory": ("CUDA max_memory_allocated above the start" if device.type == "cuda" else
                                "peak of the CPU allocations above the start (PyTorch profiler's allocation events)"),
                     "gflop": "FLOPs of the matrix products and convolutions (forward and backward) of one call, "
                              "PyTorch's flop_counter formulas; flop_ratio_to_gradient: the gradient's FLOPs / the "
                              "method's, the bound of ratio_to_gradient where these products dominate"},
        "rows": rows,
        "checks": checks,
    }
    return result


def summary(result: dict) -> str:
    """Two tables, one line per backbone and batch: the NEON heatmap (head included), and the backbone's LRP alone;
    fast against the plain gradient of the same output and against Zennit."""
    checks = {(c["backbone"], c["batch"]): c for c in result["checks"] if c.get("dtype") != "float64"}
    by_config: dict[tuple, dict[str, dict]] = {}
    for row in result["rows"]:
        by_config.setdefault((row["backbone"], row["size"], row["batch"]), {})[row["method"]] = row

    def fmt(value, spec):
        return "—" if value is None else format(value, spec)

    tables = []
    for prefix, error_key, title in (("", "fast_vs_zennit_max_rel_error", "NEON heatmap (KDE head on the taps)"),
                                     ("taps_", "taps_fast_vs_zennit_max_rel_error", "backbone LRP alone")):
        lines = [f"{title}:", "",
                 "| backbone | size | batch | gradient (img/s) | fast (img/s) | fast / gradient | zennit (img/s) "
                 "| fast / zennit | FLOPs: fast / gradient, zennit / fast | fast vs zennit (max rel. err.) "
                 "| peak MB gradient / fast / zennit |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for (name, size, batch), methods in by_config.items():
            fast, grad = methods.get(prefix + "fast"), methods.get(prefix + "gradient")
            if fast is None or grad is None:
                continue
            zen, check = methods.get(prefix + "zennit"), checks.get((name, batch), {})
            memory = " / ".join(fmt(m and m["peak_memory_mb"], ".0f") for m in (grad, fast, zen))
            flop_bound = fmt(fast.get("flop_ratio_to_gradient"), ".2f") + ", " + (
                fmt(zen["gflop"] / fast["gflop"], ".1f") + "x" if zen and zen.get("gflop") and fast.get("gflop")
                else "—")
            lines.append(
                f"| {name} | {size} | {batch} | {grad['images_per_s']:.3g} | {fast['images_per_s']:.3g} | "
                f"**{fast['ratio_to_gradient']:.2f}** | {fmt(zen and zen['images_per_s'], '.3g')} | "
                f"{fmt(zen and zen['median_s'] / fast['median_s'], '.1f')}x | {flop_bound} | "
                f"{fmt(check.get(error_key), '.1e')} | {memory} |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


if __name__ == "__main__":
    main()
