"""Shared pieces of the speed benchmarks: device sync, interleaved timing, peak memory, environment record."""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import statistics
import threading
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device, run: Callable[[], object]) -> float:
    """Peak memory of one call above the memory before it: the CUDA allocator's peak, or on Linux CPUs the resident
    set size sampled every millisecond (a close lower bound)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    statm = Path("/proc/self/statm")
    if not statm.exists():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        run()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        return int(statm.read_text().split()[1]) * page

    base, peak, done = rss(), [0], threading.Event()

    def sample() -> None:  # large tensors are mmapped and returned on free, so RSS follows the live tensors
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


def write_result(result: dict, output: str | None, default_name: str) -> Path:
    """Write the JSON record to ``output`` (default ``benchmarks/results/<default_name>``) and say where."""
    path = Path(output) if output else RESULTS / default_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return path
