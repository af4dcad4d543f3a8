"""Benchmark: a data set explained end to end (read PNGs, explain, write the zarr store) against the in-memory loop.

Random-weight VGG-16 ``features`` (seeded) + a KDE outlier head fitted on the block-5 locations of the images
(:class:`neon_attrib.vision.deep.DeepNeon`, fast rules, audit on), ``--images`` PNG files of ``--size`` pixels, CPU.
Each
measurement runs in a fresh process (its own peak memory), interleaved over ``--repeats`` rounds:

* ``memory``: the images decoded and preprocessed beforehand (not timed); timed: ``model.explainer()`` and one call per
  batch of ``--batch`` images, relevance kept in memory: the in-memory explainer loop;
* ``dataset_1``: ``explain_dataset(model, folder, store, batch_size, num_workers)``: store creation, model
  fingerprint, reading and decoding the PNGs in DataLoader workers, explaining, writing relevance (float32, one chunk
  per image) and the table, ``scores.csv``;
* ``dataset_2``: the same under ``torchrun --nproc-per-node 2`` (gloo).

Every process runs ``--threads`` torch threads (default 1), so 1 vs 2 processes compares one and two cores.

Goal: ``dataset_1`` at >= 0.9x the in-memory loop's images/s. The stores are compared with the in-memory relevance
(same batches: bit for bit on one process) and with each other.

    python benchmarks/bench_dataset.py                 # ~5 min on 2 loaded cores
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import environment, median, write_result  # noqa: E402

from neon_attrib import DeepNeon, KDEOutlier  # noqa: E402
from neon_attrib.scale import ImageFiles, current_ranks, explain_dataset, open_results  # noqa: E402
from neon_attrib.vision.deep import median_gamma, vgg16_features  # noqa: E402

SCRIPT = Path(__file__).resolve()


def make_model() -> DeepNeon:
    torch.manual_seed(0)
    return DeepNeon(vgg16_features(), KDEOutlier(gamma=1.0))


def load_model(work: Path) -> DeepNeon:
    model = make_model()
    model.load_state_dict(torch.load(work / "model.pt"))
    return model


def peak_rss_mb() -> dict[str, float]:
    """Peak resident set size of this process and of its largest finished child (DataLoader workers), in MiB."""
    return {"self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def child_memory(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    model = load_model(args.work)
    data = ImageFiles(args.work / "images", preprocessing="torchvision")
    images = torch.stack([data[i] for i in range(len(data))])
    start = time.perf_counter()
    relevance = []
    with model.explainer() as explainer:
        for batch in images.split(args.batch):
            relevance.append(explainer(batch)[1])
    seconds = time.perf_counter() - start
    np.save(args.out, torch.cat(relevance).numpy())
    return {"seconds": seconds, "images": len(data), "peak_rss_mb": peak_rss_mb()}


def child_dataset(args: argparse.Namespace) -> dict | None:
    ranks_env = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(args.threads)
    model = load_model(args.work)
    if ranks_env > 1:
        torch.distributed.init_process_group("gloo")
        torch.distributed.barrier()
    start = time.perf_counter()
    explain_dataset(model, args.work / "images", args.out, batch_size=args.batch, num_workers=args.workers,
                    overwrite=True, progress=False)
    seconds = time.perf_counter() - start
    ranks = current_ranks()
    memory = ranks.gather(peak_rss_mb())
    if ranks.distributed:
        torch.distributed.destroy_process_group()
    if not ranks.is_main:
        return None
    return {"seconds": seconds, "images": len(open_results(args.out)), "peak_rss_mb": memory}


def launch(mode: str, args: argparse.Namespace, out: Path) -> dict:
    options = ["--child", "memory" if mode == "memory" else "dataset", "--work", str(args.work), "--out", str(out),
               "--batch", str(args.batch), "--workers", str(args.workers), "--threads", str(args.threads)]
    if mode == "dataset_2":
        torchrun = Path(sys.executable).parent / "torchrun"
        command = [str(torchrun), "--standalone", "--nproc-per-node", "2", str(SCRIPT), *options]
    else:
        command = [sys.executable, str(SCRIPT), *options]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"{mode} failed ({completed.returncode}):\n{completed.stdout[-2000:]}\n"
                           f"{completed.stderr[-4000:]}")
    return json.loads(lines[-1])


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (every mode)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", default=None)
    parser.add_argument("--child", choices=("memory", "dataset"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        result = child_memory(args) if args.child == "memory" else child_dataset(args)
        if result is not None:
            print(json.dumps(result))
        return result

    from PIL import Image

    load_before = load_average()
    work = Path(tempfile.mkdtemp(prefix="bench_dataset_"))
    args.work = work
    try:
        rng = np.random.default_rng(0)
        (work / "images").mkdir()
        for i in range(args.images):
            pixels = rng.integers(0, 256, size=(args.size, args.size, 3), dtype=np.uint8)
            pixels[: args.size // 4 * (i % 4)] //= 2  # some variety between images
            Image.fromarray(pixels).save(work / "images" / f"img_{i:04d}.png")
        model = make_model()
        data = ImageFiles(work / "images", preprocessing="torchvision")
        images = torch.stack([data[i] for i in range(len(data))])
        rows = model.feature_rows(images, batch_size=args.batch, progress=False)
        model.head = KDEOutlier(gamma=median_gamma(rows))
        model.fit_head(rows)
        torch.save(model.state_dict(), work / "model.pt")

        modes = ("memory", "dataset_1", "dataset_2")
        runs: dict[str, list[dict]] = {mode: [] for mode in modes}
        for round_ in range(args.repeats):
            for mode in modes:
                out = work / (f"{mode}_{round_}.npy" if mode == "memory" else f"{mode}_{round_}.zarr")
                runs[mode].append(launch(mode, args, out))
                print(f"round {round_}: {mode}: {runs[mode][-1]['seconds']:.2f} s", flush=True)
        reference = np.load(work / "memory_0.npy")
        one = open_results(work / "dataset_1_0.zarr").relevance[:]
        two = open_results(work / "dataset_2_0.zarr").relevance[:]
        scale = float(np.abs(reference).max())
        load_after = load_average()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    speed = {mode: args.images / median([run["seconds"] for run in runs[mode]]) for mode in modes}
    locations = args.images * (args.size // 32) ** 2
    notes = [f"random-weight VGG-16 features (seed 0) + KDEOutlier fitted on all {locations} block-5 locations "
             f"of the images; {args.images} PNG images of {args.size}x{args.size} px; batch "
             f"{args.batch}; float32 store; DataLoader workers per rank: {args.workers}.",
             "memory: explainer loop over preprocessed tensors already in memory (decoding not timed); dataset_*: "
             "explain_dataset end to end (store creation, fingerprint, PNG decoding, explanation, writes, csv).",
             f"{args.threads} torch thread(s) per process in every mode; dataset_2: torchrun --nproc-per-node 2 "
             f"(gloo), so 1 vs 2 processes compares one and two cores. On this loaded 2-core machine one process with "
             f"2 OpenMP threads ran 3-4x slower than with 1 (threads wait for each other while the other core is "
             f"busy), so 1 thread per process is the fair setting here.",
             "peak_rss_mb: 'self' is the process's peak resident set (VGG-16 weights and activations dominate); "
             "'children' is its largest child's (DataLoader workers, helpers), which counts the pages a forked child "
             "shares with its parent, so it is not memory on top of 'self'."]
    cpus = os.cpu_count() or 1
    if max(load_before + load_after) > 0.75 * cpus:
        notes.append(f"The machine was heavily loaded by other work (load average {load_before} before, "
                     f"{load_after} after, on {cpus} CPUs): absolute numbers are low and noisy; the ratios, "
                     f"measured interleaved, are what to read.")
    result = {
        "benchmark": "bench_dataset",
        "environment": environment(torch.device("cpu")),
        "settings": {"images": args.images, "size": args.size, "batch": args.batch, "workers": args.workers,
                     "threads": args.threads, "repeats": args.repeats, "store_dtype": "float32",
                     "backbone": "vgg16_features (random weights)", "head": "KDEOutlier"},
        "seconds": {mode: [round(run["seconds"], 3) for run in runs[mode]] for mode in modes},
        "images_per_second": {mode: round(value, 3) for mode, value in speed.items()},
        "ratio_dataset_1_to_memory": round(speed["dataset_1"] / speed["memory"], 3),
        "ratio_dataset_2_to_dataset_1": round(speed["dataset_2"] / speed["dataset_1"], 3),
        "goal": "dataset_1 >= 0.9x memory",
        "peak_rss_mb": {mode: runs[mode][0]["peak_rss_mb"] for mode in modes},
        "max_relative_difference": {
            "dataset_1_vs_memory": float(np.abs(one - reference).max()) / scale,
            "dataset_2_vs_dataset_1": float(np.abs(two - one).max()) / scale,
        },
        "load_average": {"before": load_before, "after": load_after},
        "notes": notes,
    }
    print(json.dumps({key: result[key] for key in ("images_per_second", "ratio_dataset_1_to_memory",
                                                    "ratio_dataset_2_to_dataset_1", "max_relative_difference")},
                     indent=2))
    write_result(result, args.output, "dataset_cpu.json")
    return result


if __name__ == "__main__":
    main()
