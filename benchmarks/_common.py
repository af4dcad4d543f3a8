"""Shared pieces of the speed benchmarks: device sync, interleaved timing, peak memory, environment record."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import flop_registry

try:  # private: the allocation events of PyTorch's profiler (peak_memory_mb falls back to the resident set without it)
    from torch.profiler._memory_profiler import _EventType
except ImportError:
    _EventType = None

from neon_attrib.pipeline.engine import PRECISIONS, precision_mode  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def data_dir() -> Path:
    """The real data and weights the benchmarks read: ``$NEON_ATTRIB_DATA``, else ``<repo>/../shared/data``."""
    env = os.environ.get("NEON_ATTRIB_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def evenly_spaced(items: list, count: int) -> list:
    """``count`` items at evenly spaced positions (all of them if fewer): deterministic, spread over the groups."""
    if count >= len(items):
        return list(items)
    return [items[round(i * (len(items) - 1) / max(count - 1, 1))] for i in range(count)]


def split_evenly(items: list, *counts: int) -> list[list]:
    """Disjoint groups of ``counts[i]`` items each, every one :func:`evenly_spaced` over what the groups before it
    left, and last the items left over: ``fit, calibration, rest = split_evenly(files, 40, 16)``."""
    groups, rest = [], list(items)
    for count in counts:
        group = evenly_spaced(rest, count)
        taken = set(group)
        groups.append(group)
        rest = [item for item in rest if item not in taken]
    return [*groups, rest]


def magnetic_tiles(data: Path, script: str) -> tuple[Path, Path] | None:
    """The magnetic-tile folder and the Keras VGG-16 weights under ``data``, or None after saying what is missing."""
    tiles = data / "magnetic_tile_defects"
    weights = data / "vgg16_imagenet_features" / "vgg16_features_keras_imagenet.pth"
    if tiles.is_dir() and weights.is_file():
        return tiles, weights
    print(f"{script}: needs {tiles} and {weights} (set --data or NEON_ATTRIB_DATA)", file=sys.stderr)
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: glibc ``mallopt`` parameters
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def steady_allocator() -> bool:
    """Keep freed memory in the process (glibc: no mmapped blocks, no trimming), as a long-running process reaches
    after warm-up: no method pays page faults for memory another method has just returned to the system, which on a
    CPU otherwise adds tens of per cent, depending on what ran before. Returns whether it could (glibc only)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc
        return False


def peak_memory_mb(device: torch.device, run: Callable[[], object]) -> float:
    """Peak memory of one call above the memory before it: the CUDA allocator's peak; on CPUs the peak of the sum of
    the allocations and frees PyTorch's profiler records (the resident set size follows neither, as the C library
    keeps freed blocks), or, where that private API is missing, the resident set size sampled every millisecond."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    peak = _profiled_peak_mb(run)
    return peak if peak is not None else _sampled_rss_peak_mb(run)


def _profiled_peak_mb(run: Callable[[], object]) -> float | None:
    """Peak of the CPU memory allocated during ``run`` above its start: the profiler's allocation and free events,
    summed in time order."""
    if _EventType is None:
        return None
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True, record_shapes=True,
                                with_stack=True) as prof:
        run()
    try:
        tree = prof._memory_profile()._op_tree
        events = sorted((event.start_time_ns, event.typed[1].alloc_size) for event in tree.dfs()
                        if event.typed[0] == _EventType.Allocation and event.typed[1].device.type == "cpu")
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return None
    live = peak = 0
    for _, size in events:  # negative sizes are frees
        live += size
        peak = max(peak, live)
    return peak / 2**20


def _sampled_rss_peak_mb(run: Callable[[], object]) -> float:
    """Resident set size growth during ``run``, sampled every millisecond (a lower bound: freed heap blocks stay)."""
    statm = Path("/proc/self/statm")
    if not statm.exists():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        run()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        return int(statm.read_text().split()[1]) * page

    base, peak, done = rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        run()
    finally:
        done.set()
        sampler.join()
    return max(0, max(peak[0], rss()) - base) / 2**20


class _FlopCounter(TorchDispatchMode):
    """Floating-point operations of the matrix products and convolutions (forward and backward) run inside it,
    counted by PyTorch's own formulas (:data:`torch.utils.flop_counter.flop_registry`); also inside autograd's
    backward, which :class:`torch.utils.flop_counter.FlopCounterMode` cannot follow through ``autograd.grad`` of a
    leaf."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet in flop_registry:
            def shape(value):
                return value.shape if isinstance(value, torch.Tensor) else value

            self.counts[str(packet)] += flop_registry[packet](*tree_map(shape, args), **tree_map(shape, kwargs),
                                                              out_val=tree_map(shape, out))
        return out


def count_flops(run: Callable[[], object]) -> dict[str, int]:
    """FLOPs of one call of ``run`` by operation (``aten.convolution``, ``aten.convolution_backward``, ``aten.mm``,
    ...): the arithmetic a method needs whatever the device, the bound its speed ratios cannot beat where these
    products dominate the time. Inference-mode calls may run kernels the counter does not see; count with autograd."""
    with _FlopCounter() as counter:
        run()
    return dict(counter.counts)


def time_interleaved(methods: dict[str, Callable[[], object]], device: torch.device, repeats: int,
                     budget_s: float = float("inf")) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and process CPU times of every method, interleaved in each repeat (every repeat sees the same machine
    load for every method); stops repeating once a round has pushed the total past ``budget_s``."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    cpu_times: dict[str, list[float]] = {name: [] for name in methods}
    used = 0.0
    for _ in range(repeats):
        for name, run in methods.items():
            synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            run()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
            used += times[name][-1]
        if used > budget_s:
            break
    return times, cpu_times


def output_gradient(network: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The plain input gradient of ``network``'s whole output, seeded with the output itself (the peer of an LRP
    pass that starts from the output as its relevance)."""
    leaf = x.detach().requires_grad_()
    with torch.enable_grad():
        out = network(leaf)
        (grad,) = torch.autograd.grad(out, leaf, out)
    return grad


def median(values: list[float]) -> float:
    return statistics.median(values)


def max_relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    """``max |result - reference| / max |reference|``."""
    result, reference = result.double(), reference.double()
    return ((result - reference).abs().max() / reference.abs().max().clamp(min=1e-30)).item()


def environment(device: torch.device) -> dict:
    """Device, machine and library versions, for the JSON record."""

    def dist(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {
        "device": device.type,
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: dist(name) for name in ("torch", "torchvision", "zennit", "captum", "neon_attrib")},
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
    }


def add_device_arguments(parser, default_device: str) -> None:
    """``--device`` and ``--precision``: every row of the JSON says under which precision policy it was measured."""
    parser.add_argument("--device", default=default_device)
    parser.add_argument("--precision", choices=PRECISIONS, default="exact",
                        help="precision policy of every method, the plain gradient included (default exact: no "
                             "TF32, deterministic cuDNN); 'fast': TF32, cuDNN autotuning, channels_last explainers")


def with_precision(precision: str, device: str | torch.device, body: Callable[[], dict]) -> dict:
    """Run ``body()`` under the precision policy's switches (every method alike) and tag each row with it."""
    with precision_mode(precision, device):
        result = body()
    result["precision"] = precision
    for key in ("rows", "checks"):
        for row in result.get(key, []):
            row["precision"] = precision
    return result


#: what the running benchmark has measured so far (its growing ``rows`` and ``checks`` lists, see :func:`measuring`)
SO_FAR: dict = {}


def measuring(**parts: list[dict]) -> None:
    """Name the lists a benchmark appends its rows and checks to as it goes: :func:`run_benchmark` writes them if the
    run is interrupted."""
    SO_FAR.update(parts)


def run_benchmark(args, body: Callable, name: str) -> dict:
    """``body(args)`` under the precision policy (:func:`with_precision`). Interrupted (Ctrl-C, or the SIGINT of
    ``timeout --signal=INT`` when a time cap is reached) after some rows were measured, it writes those, marked
    ``"interrupted": true``, to ``args.output`` or ``benchmarks/results/<name>_<device>.json`` and exits with status
    130: a capped run keeps what it measured."""
    SO_FAR.clear()
    try:
        return with_precision(args.precision, args.device, lambda: body(args))
    except KeyboardInterrupt:
        if not SO_FAR.get("rows"):
            raise
        device = torch.device(args.device)
        result = {"benchmark": name, **environment(device), **SO_FAR, "interrupted": True,
                  "precision": args.precision}
        for key in ("rows", "checks"):
            for row in result.get(key, []):
                row["precision"] = args.precision
        write_result(result, args.output, f"{name}_{device.type}.json")
        print(f"{name}: interrupted; wrote the {len(result['rows'])} rows measured so far", file=sys.stderr)
        raise SystemExit(130) from None


def write_result(result: dict, output: str | None, default_name: str) -> Path:
    """Write the JSON record to ``output`` (default ``benchmarks/results/<default_name>``) and say where."""
    path = Path(output) if output else RESULTS / default_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return path
