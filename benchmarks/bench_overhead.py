"""Benchmark: the host-side work of one explanation (operations launched, host synchronisations, host time).

At batch 1 a GPU explanation is launch-bound: every operation is a kernel launch, and every host synchronisation
(``bool(tensor)``, ``.item()``) stalls the CPU until the GPU queue is empty, so host and device work stop
overlapping. This script measures that work on a network whose arithmetic is negligible: VGG-16's layer structure
(13 convolutions, 13 ReLUs, 5 max-pools) with every width divided by ``--shrink`` (default 32), at 32x32, batch 1.
The counts do not depend on the device; the host milliseconds approximate the launch-bound time of a GPU call.

Methods (each a whole call, as a user makes it):

* ``gradient``: the plain input gradient (the limit);
* ``fast``: :class:`~neon_attrib.vision.fast.FastEpsilonGammaBox` through an explainer with the audit (the default);
* ``fast_no_audit``: the same without the conservation audit;
* ``zennit``: Zennit's ``EpsilonGammaBox`` through its ``Gradient`` attributor;
* ``deepneon_kde``: :class:`~neon_attrib.vision.deep.DeepNeon` (the same network + a KDE outlier head), its
  explainer;
* ``fast_graphs`` (CUDA only): ``fast`` with ``cuda_graphs=True``, replaying its captured step;
* ``resnet18_gradient``, ``resnet18_fast``: ResNet-18's layer structure (batch norms, residual additions; widths
  divided alike, 64x64 inputs): its plain gradient, and the fast rules with
  :class:`~neon_attrib.vision.fast.FastResNetCanonizer` through an explainer with the audit.

Operations are the outermost ``aten`` operators of one call (views and detaches not counted), syncs the reads of a
tensor's value by the host (``bool()``, ``float()``, ``.item()``, ``.tolist()``, ...; on a GPU each waits for the
device).

    python benchmarks/bench_overhead.py                  # CPU, ~1 min; JSON in benchmarks/results/overhead_cpu.json
    python benchmarks/bench_overhead.py --device cuda    # on a GPU: the same counts, and launch-bound milliseconds
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torchvision
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile
from zennit.attribution import Gradient
from zennit.composites import EpsilonGammaBox

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    add_device_arguments,
    environment,
    median,
    output_gradient,
    time_interleaved,
    with_precision,
    write_result,
)

from neon_attrib import KDEOutlier  # noqa: E402
from neon_attrib.vision.deep import DeepNeon  # noqa: E402
from neon_attrib.vision.fast import FastEpsilonGammaBox, FastResNetCanonizer, LRPExplainer  # noqa: E402

#: operators that launch no kernel (views, aliases, allocation)
VIEWS = frozenset({
    "aten::detach", "aten::detach_", "aten::view", "aten::expand", "aten::split", "aten::unbind", "aten::select",
    "aten::slice", "aten::alias", "aten::as_strided", "aten::empty", "aten::empty_like", "aten::new_empty",
    "aten::empty_strided", "aten::t", "aten::transpose", "aten::lift_fresh", "aten::reshape",
    "aten::_reshape_alias", "aten::unsqueeze", "aten::squeeze", "aten::flatten", "aten::broadcast_to",
    "aten::resolve_conj", "aten::resolve_neg", "aten::_unsafe_view", "aten::permute", "aten::contiguous",
    "aten::unflatten",
})
#: a scalar read back to the host (``bool()``, ``float()``, ``.item()``; anywhere, the backward pass included)
SCALAR_READ = "aten::_local_scalar_dense"
#: tensor methods that read values back without a scalar read (seen in the calling thread)
READS = frozenset({"tolist", "numpy", "cpu"})


class _HostReads(TorchFunctionMode):
    """Counts the calls of :data:`READS` through ``__torch_function__``."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def slim_vgg16(shrink: int, device: torch.device) -> torch.nn.Sequential:
    """VGG-16's ``features`` layer structure with every width divided by ``shrink`` (random weights, seed 0)."""
    torch.manual_seed(0)
    config = [item if item == "M" else max(1, item // shrink) for item in torchvision.models.vgg.cfgs["D"]]
    features = torchvision.models.vgg.make_layers(config).eval().to(device)
    for param in features.parameters():
        param.requires_grad_(False)
    return features


def slim_resnet18(shrink: int, device: torch.device) -> torch.nn.Module:
    """ResNet-18's layer structure (up to the global pooling) with every width divided by ``shrink`` (random weights
    and batch-norm statistics, seed 0)."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    for parent in list(net.modules()):
        for name, child in parent.named_children():
            if isinstance(child, torch.nn.Conv2d):
                inputs = child.in_channels if child.in_channels == 3 else max(1, child.in_channels // shrink)
                setattr(parent, name, torch.nn.Conv2d(inputs, max(1, child.out_channels // shrink), child.kernel_size,
                                                      child.stride, child.padding, bias=False))
            elif isinstance(child, torch.nn.BatchNorm2d):
                norm = torch.nn.BatchNorm2d(max(1, child.num_features // shrink))
                norm.running_mean.uniform_(-0.5, 0.5)
                norm.running_var.uniform_(0.5, 1.5)
                setattr(parent, name, norm)
    net.fc = torch.nn.Identity()
    net = net.eval().to(device)
    for param in net.parameters():
        param.requires_grad_(False)
    return net


def _outermost(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return False
        parent = parent.cpu_parent
    return True


def count_operations(run: Callable[[], object]) -> dict:
    """Operations launched (outermost ``aten`` operators but views) and host synchronisations of one call."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    events = prof.events()
    operations = Counter(e.name for e in events if e.name.startswith("aten::") and e.name not in VIEWS
                         and _outermost(e))
    with _HostReads() as reads:
        run()
    syncs = sum(1 for e in events if e.name == SCALAR_READ) + reads.count
    return {"operations": sum(operations.values()), "syncs": syncs, "top": dict(operations.most_common(12))}


def _baseline(method: str) -> str:
    """The plain gradient a method is compared with (of the same network)."""
    return "resnet18_gradient" if method.startswith("resnet18") else "gradient"


def identity(output: torch.Tensor) -> torch.Tensor:
    return output


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_device_arguments(parser, "cpu")
    parser.add_argument("--shrink", type=int, default=32, help="divide every VGG-16 width by this")
    parser.add_argument("--size", type=int, default=32, help="image height and width")
    parser.add_argument("--repeats", type=int, default=30, help="timed repeats (median reported)")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/overhead_<device>.json)")
    args = parser.parse_args(argv)
    result = with_precision(args.precision, args.device, partial(_benchmark, args))
    for row in result["rows"]:
        print(f"{row['method']:>17}: {row['operations']:4d} operations, {row['syncs']:3d} syncs, "
              f"{row['host_ms']:7.2f} ms ({row['vs_gradient_ms']:.2f}x the gradient)")
    write_result(result, args.output, f"overhead_{result['device']}.json")
    return result


def _benchmark(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    features = slim_vgg16(args.shrink, device)
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)).to(device)
    fast = LRPExplainer(copy.deepcopy(features), FastEpsilonGammaBox(low=-3.0, high=3.0), precision=args.precision)
    fast_no_audit = LRPExplainer(copy.deepcopy(features), FastEpsilonGammaBox(low=-3.0, high=3.0), audit=False,
                                 precision=args.precision)
    zennit = Gradient(copy.deepcopy(features), EpsilonGammaBox(low=-3.0, high=3.0))
    support = torch.rand(3, 3, args.size, args.size, generator=torch.Generator().manual_seed(1)).to(device)
    deep = DeepNeon(copy.deepcopy(features), KDEOutlier(gamma=1e-2)).to(device).fit(support, progress=False)
    deep_explainer = deep.explainer(precision=args.precision)
    resnet = slim_resnet18(args.shrink, device)
    x_resnet = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)).to(device)
    resnet_fast = LRPExplainer(copy.deepcopy(resnet), FastEpsilonGammaBox(
        low=-3.0, high=3.0, canonizers=[FastResNetCanonizer()]), precision=args.precision)
    graphs = LRPExplainer(copy.deepcopy(features), FastEpsilonGammaBox(low=-3.0, high=3.0), cuda_graphs=True,
                          precision=args.precision)

    methods: dict[str, Callable[[], object]] = {
        "gradient": partial(output_gradient, features, x),
        "fast": partial(fast, x, identity),
        "fast_no_audit": partial(fast_no_audit, x, identity),
        "zennit": partial(zennit, x, identity),
        "deepneon_kde": partial(deep_explainer, x),
        "resnet18_gradient": partial(output_gradient, resnet, x_resnet),
        "resnet18_fast": partial(resnet_fast, x_resnet, identity),
    }
    if device.type == "cuda":  # the fast explainer captured in a CUDA graph (replayed after the warm-up calls)
        methods["fast_graphs"] = partial(graphs, x, identity)
    for run in methods.values():  # warm-up: caches, cuDNN plans, first-call checks
        for _ in range(3):
            run()
    counts = {name: count_operations(run) for name, run in methods.items()}
    times, _ = time_interleaved(methods, device, args.repeats)
    rows = [{"method": name, **counts[name], "host_ms": median(times[name]) * 1e3,
             "vs_gradient_ms": median(times[name]) / median(times[_baseline(name)])} for name in methods]
    extra = {}
    if "fast_graphs" in methods:
        extra = {"graph_replays": graphs.graphs.replays, "graphs_off": graphs.graphs.disabled}
    return {"benchmark": "overhead", **environment(device), **extra,
            "network": f"VGG-16 layers, widths / {args.shrink}", "size": args.size, "batch": 1,
            "repeats": args.repeats, "rows": rows}


if __name__ == "__main__":
    main()
