"""Benchmark: do pixel explanations of a KDE outlier head on VGG-16 find the defects of magnetic tiles?

Data: ``shared/data/magnetic_tile_defects`` (Huang et al., *Surface defect saliency of magnetic tile*, 2020; research
use with citation, see its SOURCE.md). A KDE outlier head (:class:`~neon_attrib.models.KDEOutlier`) is fitted on the
VGG-16 block-5 locations of defect-free ("Free") tiles; defect tiles are explained, and their pixel masks are the
ground truth. VGG-16: the Keras ImageNet conv base in ``shared/data/vgg16_imagenet_features`` (caffe preprocessing).

Every tile is resized to ``--size``² (squares: the tiles' aspect ratios vary from 1:4 to 2:1, so this distorts them
a little; masks are resized the same way and thresholded at 0.5). The image score is the sum of location outlier
scores. Explained, in the same run, on the same score and images:

* ``neon``: NEON (the head's CNN rule at block 5, the proportional pool rule, EpsilonGammaBox down to the pixels);
* ``neon_max``: NEON for the *max*-pooled score (the most anomalous location only; a different score, shown because the
  sum spreads relevance over every location's baseline outlierness);
* ``gradient_x_input`` and ``integrated_gradients`` (Captum, zero baseline in network-input space = the mean colour);
* ``location_map``: the per-location outlier scores, bilinearly upsampled (no backpropagation at all).

Metrics per image (relevance summed over colour channels), averaged per defect class:

* ``positive_share``: share of the positive relevance that lies inside the mask (``mask_fraction`` is chance);
* ``pointing_game``: 1 if the most relevant pixel lies within ``--tolerance`` pixels of the mask;
* ``pixel_auroc``: ROC AUC of the relevance as a per-pixel defect detector.

The image-level AUROC of the score (held-out Free tiles against the defect tiles) is reported too.

    python benchmarks/bench_tiles.py                                  # defaults: ~10 min on 2 CPU cores
    python benchmarks/bench_tiles.py --size 224 --per-class 10 --ig-steps 32
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import data_dir, evenly_spaced  # noqa: E402

CLASSES = ("Blowhole", "Break", "Crack", "Fray", "Uneven")
METHODS = ("neon", "neon_max", "gradient_x_input", "integrated_gradients", "location_map")
METRICS = ("positive_share", "pointing_game", "pixel_auroc")


def load_tile(path: Path, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB image (3, size, size) in [0, 1] and boolean mask (size, size) of a tile."""
    from torchvision.transforms.functional import resize

    from neon_attrib.vision.deep import load_image

    image = resize(load_image(path), [size, size], antialias=True).clamp(0, 1)
    mask_path = path.with_suffix(".png")
    mask = load_image(mask_path)[:1] if mask_path.is_file() else torch.zeros(1, *image.shape[-2:])
    mask = resize(mask, [size, size], antialias=True)[0] >= 0.5
    return image, mask


def metrics(relevance: np.ndarray, mask: np.ndarray, tolerance: int) -> dict[str, float]:
    """The three localisation metrics of one (H, W) relevance map against a boolean mask."""
    from scipy.ndimage import distance_transform_edt
    from sklearn.metrics import roc_auc_score

    positive = np.clip(relevance, 0, None)
    total = positive.sum()
    share = float(positive[mask].sum() / total) if total > 0 else float("nan")
    y, x = np.unravel_index(np.argmax(relevance), relevance.shape)
    distance = distance_transform_edt(~mask)  # distance of every pixel to the nearest defect pixel
    hit = float(distance[y, x] <= tolerance)
    auroc = float(roc_auc_score(mask.ravel(), relevance.ravel())) if 0 < mask.sum() < mask.size else float("nan")
    return {"positive_share": share, "pointing_game": hit, "pixel_auroc": auroc}


def _mean(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(statistics.fmean(finite)) if finite else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=data_dir(), help="shared/data folder")
    parser.add_argument("--size", type=int, default=160, help="tiles are resized to SIZE x SIZE (default 160)")
    parser.add_argument("--fit-images", type=int, default=80, help="Free tiles to fit the KDE on (default 80)")
    parser.add_argument("--holdout", type=int, default=40, help="other Free tiles for the image AUROC (default 40)")
    parser.add_argument("--per-class", type=int, default=6, help="defect tiles explained per class (default 6)")
    parser.add_argument("--gamma", default="auto",
                        help="KDE γ; 'auto' = 1 / median squared distance between fit locations (default)")
    parser.add_argument("--ig-steps", type=int, default=16, help="Integrated Gradients steps (default 16)")
    parser.add_argument("--tolerance", type=int, default=8, help="pointing-game tolerance in pixels (default 8)")
    parser.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                        help="NEON through neon_attrib.vision.fast's exact rules (default) or Zennit's")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tiles.json")
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "figures" / "tiles_grid.png")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from captum.attr import InputXGradient, IntegratedGradients
    from sklearn.metrics import roc_auc_score

    from neon_attrib import KDEOutlier, explain
    from neon_attrib.vision.deep import DeepNeon, LocationPool, get_preprocessing, median_gamma, vgg16_features

    tiles = args.data / "magnetic_tile_defects"
    weights = args.data / "vgg16_imagenet_features" / "vgg16_features_keras_imagenet.pth"
    if not tiles.is_dir() or not weights.is_file():
        print(f"bench_tiles: needs {tiles} and {weights} (set --data or NEON_ATTRIB_DATA)", file=sys.stderr)
        return 2
    started = time.perf_counter()
    caffe = get_preprocessing("caffe")
    features = vgg16_features(weights).to(args.device)

    free = sorted((tiles / "MT_Free" / "Imgs").glob("*.jpg"))
    fit_files = evenly_spaced(free, args.fit_images)
    holdout_files = evenly_spaced([p for p in free if p not in set(fit_files)], args.holdout)

    def batches(files):
        for path in files:
            yield caffe(load_tile(path, args.size)[0]).unsqueeze(0).to(args.device)

    head = KDEOutlier(gamma=1.0)
    model = DeepNeon(features, head, preprocessing="caffe", fast=args.fast)
    rows = model.feature_rows(batches(fit_files), progress=False)
    gamma = median_gamma(rows) if args.gamma == "auto" else float(args.gamma)
    head.gamma = gamma
    model.fit_head(rows)
    fit_s = time.perf_counter() - started
    print(f"fitted on {rows.shape[0]} locations of {len(fit_files)} Free tiles, gamma={gamma:.3g} ({fit_s:.0f} s)")
    max_model = DeepNeon(features, head, pool=LocationPool("max"), preprocessing="caffe", fast=args.fast)

    def forward(x):
        return model(x)

    ig, gxi = IntegratedGradients(forward), InputXGradient(forward)
    holdout_maps = [model.location_scores(x)[0] for x in batches(holdout_files)]
    holdout_scores = {"sum": [float(m.sum()) for m in holdout_maps], "max": [float(m.max()) for m in holdout_maps]}

    per_image: list[dict] = []
    timings: dict[str, list[float]] = {m: [] for m in METHODS}
    examples: dict[str, dict] = {}
    for name in CLASSES:
        folder = tiles / f"MT_{name}" / "Imgs"
        candidates = evenly_spaced(sorted(folder.glob("*.jpg")), 4 * args.per_class)
        selected = []
        for path in candidates:  # skip tiles whose defect vanishes at this resolution
            image, mask = load_tile(path, args.size)
            if mask.any():
                selected.append((path, image, mask))
        selected = evenly_spaced(selected, args.per_class)
        for path, image, mask in selected:
            x = caffe(image).unsqueeze(0).to(args.device)
            maps: dict[str, np.ndarray] = {}
            start = time.perf_counter()
            relevance, score = explain(model, x, return_output=True)
            timings["neon"].append(time.perf_counter() - start)
            maps["neon"] = relevance[0].sum(0).cpu().numpy()
            start = time.perf_counter()
            maps["neon_max"] = explain(max_model, x)[0].sum(0).cpu().numpy()
            timings["neon_max"].append(time.perf_counter() - start)
            start = time.perf_counter()
            maps["gradient_x_input"] = gxi.attribute(x.clone().requires_grad_())[0].sum(0).detach().cpu().numpy()
            timings["gradient_x_input"].append(time.perf_counter() - start)
            start = time.perf_counter()
            attribution, delta = ig.attribute(x, baselines=torch.zeros_like(x), n_steps=args.ig_steps,
                                              internal_batch_size=args.ig_steps, return_convergence_delta=True)
            maps["integrated_gradients"] = attribution[0].sum(0).detach().cpu().numpy()
            timings["integrated_gradients"].append(time.perf_counter() - start)
            start = time.perf_counter()
            locations = model.location_scores(x)  # (1, h, w)
            upsampled = torch.nn.functional.interpolate(locations[:, None], size=x.shape[-2:], mode="bilinear",
                                                        align_corners=False)
            maps["location_map"] = upsampled[0, 0].cpu().numpy()
            timings["location_map"].append(time.perf_counter() - start)
            mask_np = mask.numpy()
            record = {"class": name, "file": path.name, "score": float(score), "max_score": float(locations.max()),
                      "mask_fraction": float(mask_np.mean()),
                      "ig_relative_completeness_error": float(delta.abs().sum() / abs(float(score))),
                      **{m: metrics(maps[m], mask_np, args.tolerance) for m in METHODS}}
            per_image.append(record)
            if name not in examples:
                examples[name] = {"image": image, "mask": mask_np, "maps": maps, "file": path.name}
            print(f"{name:9s} {path.name:22s} score={float(score):9.4g} " + " ".join(
                f"{m}={record[m]['pixel_auroc']:.2f}" for m in METHODS))

    labels = [0] * len(holdout_files) + [1] * len(per_image)
    image_auroc = {
        "sum": float(roc_auc_score(labels, holdout_scores["sum"] + [r["score"] for r in per_image])),
        "max": float(roc_auc_score(labels, holdout_scores["max"] + [r["max_score"] for r in per_image])),
    }

    summary: dict[str, dict] = {}
    for name in (*CLASSES, "all"):
        records = [r for r in per_image if name in ("all", r["class"])]
        summary[name] = {"images": len(records), "mask_fraction": _mean([r["mask_fraction"] for r in records]),
                         **{m: {k: _mean([r[m][k] for r in records]) for k in METRICS} for m in METHODS}}

    header = f"{'class':9s} {'n':>2s} {'mask':>5s}  " + "  ".join(f"{m[:16]:>16s}" for m in METHODS)
    print(f"\nimage AUROC, Free vs defect tiles: sum score {image_auroc['sum']:.3f}, "
          f"max location {image_auroc['max']:.3f}")
    print("share of positive relevance in the mask / pointing game / pixel AUROC")
    print(header)
    for name, row in summary.items():
        cells = "  ".join(
            f"{row[m]['positive_share']:.2f}/{row[m]['pointing_game']:.2f}/{row[m]['pixel_auroc']:.2f}".rjust(16)
            for m in METHODS)
        print(f"{name:9s} {row['images']:2d} {row['mask_fraction']:5.3f}  {cells}")

    total_s = time.perf_counter() - started
    result = {
        "benchmark": "bench_tiles",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "device": args.device},
        "versions": _versions(),
        "settings": {"size": args.size, "fit_images": len(fit_files), "fit_locations": int(rows.shape[0]),
                     "holdout": len(holdout_files), "per_class": args.per_class, "gamma": gamma,
                     "gamma_rule": args.gamma, "ig_steps": args.ig_steps, "ig_baseline": "zeros (mean colour)",
                     "tolerance_px": args.tolerance, "fast": args.fast, "composite": "epsilon_gamma_box",
                     "pool": "sum", "dtype": "float32", "weights": str(weights.relative_to(args.data.parent.parent)),
                     "preprocessing": "caffe"},
        "image_auroc": image_auroc,
        "holdout_scores": holdout_scores,
        "summary": summary,
        "seconds_per_image_median": {m: statistics.median(t) for m, t in timings.items() if t},
        "ig_relative_completeness_error_median": statistics.median(
            r["ig_relative_completeness_error"] for r in per_image),
        "total_seconds": total_s,
        "per_image": per_image,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out} ({total_s:.0f} s)")
    if args.figure:
        _figure(examples, args.figure, caffe)
        print(f"wrote {args.figure} ({args.figure.stat().st_size / 1024:.0f} KB)")
    return 0


def _figure(examples: dict, path: Path, preprocessing) -> None:
    """One row per class: the tile with its mask outline, then each method's map (own symmetric scale)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    from neon_attrib.viz import heatmap

    titles = {"neon": "NEON (sum)", "neon_max": "NEON (max loc.)", "gradient_x_input": "grad × input",
              "integrated_gradients": "Integrated Grad.", "location_map": "location map"}
    rows = list(examples.items())
    figure = Figure(figsize=(1.6 * (1 + len(METHODS)), 1.6 * len(rows) + 0.3), dpi=90)
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(rows), 1 + len(METHODS), squeeze=False)
    for r, (name, example) in enumerate(rows):
        axes[r, 0].imshow(example["image"].permute(1, 2, 0).numpy())
        axes[r, 0].contour(example["mask"], levels=[0.5], colors="yellow", linewidths=1.0)
        axes[r, 0].set_ylabel(name, fontsize=8)
        for c, method in enumerate(METHODS, start=1):
            axes[r, c].imshow(heatmap(example["maps"][method]))
            axes[r, c].contour(example["mask"], levels=[0.5], colors="black", linewidths=0.5)
            if r == 0:
                axes[r, c].set_title(titles[method], fontsize=8)
        if r == 0:
            axes[r, 0].set_title("tile + defect mask", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    figure.tight_layout(pad=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=90, format="png")
    buffer.seek(0)
    with Image.open(buffer) as rendered:  # a 256-colour palette keeps the PNG small (heatmaps are noisy)
        rendered.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)


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
