"""Benchmark: PatchCore and PaDiM on magnetic tiles, neuralized; do their NEON explanations find the defects?

Data: ``shared/data/magnetic_tile_defects`` (Huang et al., *Surface defect saliency of magnetic tile*, 2020; research
use with citation, see its SOURCE.md). Both detectors are fitted on defect-free ("Free") tiles, calibrated (threshold,
normal level τ) on other Free tiles, and tested on every defect class plus held-out Free tiles; the three Free sets are
disjoint. Backbone: the Keras ImageNet VGG-16 conv base in ``shared/data/vgg16_imagenet_features`` (caffe
preprocessing; the only real ImageNet weights available here), tapped at the ReLUs closing blocks 3 and 4 (``15``,
``22``: 256 + 512 channels at stride 4). Every tile is resized to ``--size``² (the tiles' aspect ratios vary from 1:4
to 2:1); masks likewise, thresholded at 0.5; only tiles whose defect survives the resizing are used.

PatchCore: 3x3 aggregation, coreset of ``--coreset-ratio`` of the fit patches. PaDiM: no aggregation (the paper),
100 random channels, ``reg`` relative to the features' mean variance (``relative_reg``; VGG features of caffe inputs
have variances of 10³–10⁴, where the paper's absolute 0.01 regularises nothing: ``--absolute-reg`` to compare).

Reported per defect class and overall:

* image AUROC of the image score (the class's tiles against the held-out Free tiles, ``--per-class`` and
  ``--test-free`` of them), and the verdicts at the calibrated threshold (true / false positive rates);
* pixel AUROC and PRO (per-region overlap up to 30 % FPR, :func:`~neon_attrib.anomaly.pro_auc`), on the explained
  subset (``--explain-per-class`` tiles per class and twice as many Free tiles), of

  - ``map``: the detector's own anomaly map (patch scores upsampled bilinearly, Gaussian blur σ = 4; also on the whole
    test set, ``pixel_detection_set``);
  - ``neon_<target>``: the NEON pixel relevance (summed over colour channels) of each explanation target (``max`` =
    the image score, ``sum`` = all patch scores, ``excess`` = ``Σ max(0, s − τ)``), raw and with the map's blur
    (``..._blur``);
  - ``gxi_<target>``: gradient × input of the same score (``max`` and ``excess``), raw and blurred;
  - ``ig_excess``: Integrated Gradients (zero baseline in caffe space = the mean colour) of the excess score, on
    ``--ig-per-class`` tiles per class, PatchCore only, with the other methods on the same tiles;

* seconds per image: fit (features and coreset / Gaussians, divided by the fit images), detection (score and map),
  each explanation;
* the cascading model-randomisation sanity check (:func:`neon_attrib.evaluation.sanity.model_randomization`) of
PatchCore's NEON
  heatmaps (image score) on a few defect tiles, refitting the memory bank on a few Free tiles after each step.

Pixel metrics pool the pixels of the class's tiles (``all``: of every tile, the Free tiles included).

    python benchmarks/bench_anomaly.py               # defaults: about 10 min on 2 CPU cores
    python benchmarks/bench_anomaly.py --size 160 --per-class 20 --explain-per-class 8 --fit-images 120
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import data_dir, environment, evenly_spaced, magnetic_tiles, split_evenly  # noqa: E402

CLASSES = ("Blowhole", "Break", "Crack", "Fray", "Uneven")
TARGETS = ("max", "sum", "excess")
GXI_TARGETS = ("max", "excess")
LAYERS = ["15", "22"]


def load_tile(path: Path, size: int) -> tuple[torch.Tensor, np.ndarray]:
    """RGB image (3, size, size) in [0, 1] and boolean mask (size, size)."""
    from torchvision.transforms.functional import resize

    from neon_attrib.vision import load_image

    image = resize(load_image(path, min_size=1), [size, size], antialias=True).clamp(0, 1)
    mask_path = path.with_suffix(".png")
    mask = load_image(mask_path, min_size=1)[:1] if mask_path.is_file() else torch.zeros(1, *image.shape[-2:])
    return image, (resize(mask, [size, size], antialias=True)[0] >= 0.5).numpy()


def image_auroc(defect: list[float], normal: list[float]) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score([1] * len(defect) + [0] * len(normal), defect + normal))


def per_second(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def pixel_report(maps: np.ndarray, masks: np.ndarray, classes: list[str]) -> dict:
    from neon_attrib.anomaly import pixel_auroc, pro_auc

    report = {}
    for name in (*CLASSES, "all"):
        keep = np.array([c == name or name == "all" for c in classes])
        report[name] = {"pixel_auroc": pixel_auroc(maps[keep], masks[keep]), "pro": pro_auc(maps[keep], masks[keep])}
    return report


def run_detector(kind: str, args, features, data, caffe) -> tuple[dict, dict]:
    from captum.attr import IntegratedGradients

    from neon_attrib.anomaly import PaDiM, PatchCore, PatchPool, gaussian_blur
    from neon_attrib.evaluation.sanity import model_randomization

    fit_x = torch.stack([caffe(image) for image in data["fit"]])
    calibration_x = torch.stack([caffe(image) for image in data["calibration"]])
    test_x = torch.stack([caffe(image) for image in data["test"]])
    if kind == "patchcore":
        model = PatchCore(features, LAYERS, coreset_ratio=args.coreset_ratio, seed=0, preprocessing="caffe")
    else:
        model = PaDiM(features, LAYERS, n_channels=args.n_channels, reg=args.reg,
                      relative_reg=not args.absolute_reg, seed=0, preprocessing="caffe")
    start = time.perf_counter()
    model.fit(fit_x, batch_size=8, progress=False)
    fit_s = time.perf_counter() - start
    model.calibrate(calibration_x, tau_percentile=args.tau_percentile)
    print(f"[{kind}] fitted on {len(fit_x)} Free tiles in {fit_s:.0f} s; threshold {float(model.threshold_):.4g}, "
          f"tau {float(model.tau_):.4g}", flush=True)

    batch = args.batch_size
    timings: dict[str, list[float]] = {"detect": []}
    parts = []
    for chunk in test_x.split(batch):
        start = time.perf_counter()
        parts.append(model.detect(chunk))
        timings["detect"].append((time.perf_counter() - start) / len(chunk))
    scores = torch.cat([p.scores for p in parts]).numpy()
    verdicts = torch.cat([p.verdicts for p in parts]).numpy()
    maps = {"map": torch.cat([p.maps for p in parts]).numpy()}

    subset = data["explained"]
    explained_x = test_x[subset]
    relevance: dict[str, list[torch.Tensor]] = {}
    for target in TARGETS:
        timings[f"neon_{target}"] = []
        with model.with_target(target).explainer() as explainer:
            for chunk in explained_x.split(batch):
                start = time.perf_counter()
                _, r = explainer(chunk)
                timings[f"neon_{target}"].append((time.perf_counter() - start) / len(chunk))
                relevance.setdefault(f"neon_{target}", []).append(r.sum(1))
    # gradient x input of the same scores: one forward pass, one backward pass per target
    pools = {target: PatchPool(target) for target in GXI_TARGETS}
    for pool in pools.values():
        pool.tau.copy_(model.tau_)
    for target in GXI_TARGETS:
        timings[f"gxi_{target}"] = []
    for chunk in explained_x.split(batch):
        x = chunk.clone().requires_grad_(True)
        start = time.perf_counter()
        fmap, patch_scores = model._patch_grid(x)
        forward_s = time.perf_counter() - start
        for target, pool in pools.items():
            start = time.perf_counter()
            (gradient,) = torch.autograd.grad(pool(patch_scores).sum(), x, retain_graph=True)
            timings[f"gxi_{target}"].append((forward_s + time.perf_counter() - start) / len(chunk))
            relevance.setdefault(f"gxi_{target}", []).append((gradient * chunk).sum(1).detach())
    explained_maps = {"map": maps["map"][subset]}
    for name, values in relevance.items():
        raw = torch.cat(values)
        explained_maps[name] = raw.numpy()
        explained_maps[f"{name}_blur"] = gaussian_blur(raw, model.sigma).numpy()

    classes = data["test_classes"]
    masks = np.stack(data["test_masks"])
    sub_classes, sub_masks = [classes[i] for i in subset], masks[subset]
    ig_report = None
    if kind == "patchcore" and args.ig_per_class > 0 and args.ig_steps > 0:
        chosen = [i for name in CLASSES for i in  # positions in the explained subset
                  evenly_spaced([j for j, c in enumerate(sub_classes) if c == name], args.ig_per_class)]
        ig = IntegratedGradients(model.with_target("excess"))
        values, deltas, seconds = [], [], []
        for i in chosen:
            start = time.perf_counter()
            attribution, delta = ig.attribute(explained_x[i:i + 1], baselines=torch.zeros_like(explained_x[i:i + 1]),
                                              n_steps=args.ig_steps, internal_batch_size=args.ig_steps,
                                              return_convergence_delta=True)
            seconds.append(time.perf_counter() - start)
            values.append(attribution[0].sum(0).detach())
            deltas.append(float(delta.abs().sum()))
        timings["ig_excess"] = seconds
        raw = torch.stack(values)
        ig_masks, ig_classes = sub_masks[chosen], [sub_classes[i] for i in chosen]
        ig_report = {"images": len(chosen), "steps": args.ig_steps,
                     "completeness_error_abs_median": float(np.median(deltas)),
                     "ig_excess": pixel_report(raw.numpy(), ig_masks, ig_classes),
                     "ig_excess_blur": pixel_report(gaussian_blur(raw, model.sigma).numpy(), ig_masks, ig_classes),
                     **{f"{name}_same_images": pixel_report(explained_maps[name][chosen], ig_masks, ig_classes)
                        for name in ("map", "neon_excess", "neon_excess_blur", "gxi_excess_blur")}}

    free = [float(s) for s, c in zip(scores, classes) if c == "Free"]
    image_report = {}
    for name in (*CLASSES, "all"):
        defect = [float(s) for s, c in zip(scores, classes) if (c == name or name == "all") and c != "Free"]
        flagged = [bool(v) for v, c in zip(verdicts, classes) if (c == name or name == "all") and c != "Free"]
        image_report[name] = {"auroc": image_auroc(defect, free), "tpr_at_threshold": float(np.mean(flagged))}
    image_report["fpr_at_threshold_free"] = float(np.mean([bool(v) for v, c in zip(verdicts, classes) if c == "Free"]))

    sanity = None
    if kind == "patchcore" and args.sanity_images > 0:
        picks = evenly_spaced([i for i in subset if classes[i] != "Free"], args.sanity_images)
        start = time.perf_counter()
        result = model_randomization(model.with_target("max"), test_x[picks],
                                     refit=fit_x[evenly_spaced(list(range(len(fit_x))), args.sanity_refit)],
                                     layers=["backbone.21", "backbone.12", "backbone.0"], seed=0)
        sanity = {"images": [data["test_files"][i] for i in picks], "refit_images": args.sanity_refit,
                  "steps": result.summary(), "seconds": time.perf_counter() - start}

    report = {
        "settings": {"layers": LAYERS, "coreset_ratio": args.coreset_ratio if kind == "patchcore" else None,
                     "n_channels": args.n_channels if kind == "padim" else None,
                     "memory_bank": int(model.memory_bank_.shape[0]) if kind == "patchcore" else None,
                     "patch_grid": list(parts[0].patch_scores.shape[-2:]), "sigma": model.sigma,
                     "threshold": float(model.threshold_), "tau": float(model.tau_),
                     "tau_percentile": args.tau_percentile},
        "image": image_report,
        "pixel_detection_set": {"map": pixel_report(maps["map"], masks, classes)},
        "pixel": {name: pixel_report(values, sub_masks, sub_classes) for name, values in explained_maps.items()},
        "integrated_gradients": ig_report,
        "seconds_per_image": {"fit": fit_s / len(fit_x), **{k: per_second(v) for k, v in timings.items()}},
        "sanity_model_randomization": sanity,
    }
    examples = {"maps": explained_maps, "scores": scores}
    return report, examples


def figure(path: Path, data: dict, examples: dict, results: dict) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from neon_attrib.viz import heatmap

    classes = [data["test_classes"][i] for i in data["explained"]]
    rows = [classes.index(name) for name in (*CLASSES, "Free") if name in classes]
    detectors = list(examples)
    shown = (("map", "map"), ("neon_max_blur", "NEON max"), ("neon_excess_blur", "NEON excess"))
    columns = ["image", "mask"] + [f"{d}: {title}" for d in detectors for _, title in shown]
    fig = Figure(figsize=(1.9 * len(columns), 1.9 * len(rows) + 0.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), len(columns), squeeze=False)
    for r, index in enumerate(rows):
        original = data["explained"][index]
        panels = [data["test"][original].permute(1, 2, 0).numpy(), data["test_masks"][original]]
        for d in detectors:
            panels += [examples[d]["maps"][key][index] for key, _ in shown]
        for c, panel in enumerate(panels):
            ax = axes[r, c]
            ax.axis("off")
            if c == 0:
                ax.imshow(panel)
            elif c == 1:
                ax.imshow(panel, cmap="gray")
            elif (c - 2) % len(shown) == 0:
                ax.imshow(panel, cmap="inferno")
            else:
                ax.imshow(heatmap(panel))
            if r == 0:
                ax.set_title(columns[c], fontsize=8)
        axes[r, 0].text(-4, panels[0].shape[0] / 2, classes[index], rotation=90, va="center", ha="right", fontsize=8)
    fig.suptitle("Magnetic tiles, VGG-16 (Keras ImageNet) blocks 3+4: anomaly maps (inferno) and NEON relevance "
                 "(red +, blue −; blurred σ = 4)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=data_dir(), help="shared/data folder")
    parser.add_argument("--size", type=int, default=128, help="tiles are resized to SIZE x SIZE (default 128)")
    parser.add_argument("--fit-images", type=int, default=80, help="Free tiles to fit on (default 80)")
    parser.add_argument("--calibration-images", type=int, default=16, help="other Free tiles to calibrate on")
    parser.add_argument("--test-free", type=int, default=24, help="other Free tiles in the test set (default 24)")
    parser.add_argument("--per-class", type=int, default=12, help="defect tiles per class tested (default 12)")
    parser.add_argument("--explain-per-class", type=int, default=4,
                        help="of those, tiles explained per class (and twice as many Free tiles) (default 4)")
    parser.add_argument("--detectors", nargs="+", choices=("patchcore", "padim"), default=["patchcore", "padim"])
    parser.add_argument("--coreset-ratio", type=float, default=0.02, help="PatchCore (default 0.02)")
    parser.add_argument("--n-channels", type=int, default=100, help="PaDiM channel subset (default 100)")
    parser.add_argument("--reg", type=float, default=0.01, help="PaDiM diagonal regularisation (default 0.01)")
    parser.add_argument("--absolute-reg", action="store_true",
                        help="PaDiM: add reg itself, not reg x the mean feature variance (relative_reg)")
    parser.add_argument("--tau-percentile", type=float, default=99.0, help="normal level τ (default 99)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--ig-steps", type=int, default=8, help="Integrated Gradients steps (default 8; 0: none)")
    parser.add_argument("--ig-per-class", type=int, default=1, help="IG on this many tiles per class (default 1)")
    parser.add_argument("--sanity-images", type=int, default=3, help="tiles of the randomisation check (default 3)")
    parser.add_argument("--sanity-refit", type=int, default=8, help="Free tiles refitted on (default 8)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "anomaly.json")
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "figures" / "anomaly_grid.png")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from neon_attrib.vision import get_preprocessing, vgg16_features

    if (found := magnetic_tiles(args.data, "bench_anomaly")) is None:
        return 2
    tiles, weights = found
    started = time.perf_counter()
    caffe = get_preprocessing("caffe")
    features = vgg16_features(weights)

    free = sorted((tiles / "MT_Free" / "Imgs").glob("*.jpg"))
    fit_files, calibration_files, test_free, _ = split_evenly(free, args.fit_images, args.calibration_images,
                                                              args.test_free)
    test_files = [(p, "Free") for p in test_free]
    for name in CLASSES:
        candidates = sorted((tiles / f"MT_{name}" / "Imgs").glob("*.jpg"))
        visible = [p for p in candidates if load_tile(p, args.size)[1].any()]  # defects visible at this size
        test_files += [(p, name) for p in evenly_spaced(visible, args.per_class)]
    data = {"fit": [load_tile(p, args.size)[0] for p in fit_files],
            "calibration": [load_tile(p, args.size)[0] for p in calibration_files],
            "test": [], "test_masks": [], "test_classes": [], "test_files": []}
    for path, name in test_files:
        image, mask = load_tile(path, args.size)
        data["test"].append(image)
        data["test_masks"].append(mask)
        data["test_classes"].append(name)
        data["test_files"].append(f"MT_{name}/{path.name}")

    data["explained"] = [i for name in ("Free", *CLASSES) for i in evenly_spaced(
        [j for j, c in enumerate(data["test_classes"]) if c == name],
        args.explain_per_class * (2 if name == "Free" else 1))]
    results = {"benchmark": "bench_anomaly", "environment": environment(torch.device("cpu")),
               "settings": {"size": args.size, "fit_images": len(fit_files),
                            "calibration_images": len(calibration_files), "test_free": args.test_free,
                            "per_class": args.per_class, "explain_per_class": args.explain_per_class,
                            "explain_free": 2 * args.explain_per_class, "batch_size": args.batch_size,
                            "dtype": "float32",
                            "backbone": "VGG-16 conv base, Keras ImageNet weights (caffe preprocessing)",
                            "explain_composite": "epsilon_gamma_box (fast exact rules)", "ig_steps": args.ig_steps,
                            "ig_per_class": args.ig_per_class},
               "test_files": data["test_files"], "detectors": {}}
    examples = {}
    for kind in args.detectors:
        results["detectors"][kind], examples[kind] = run_detector(kind, args, features, data, caffe)
        report = results["detectors"][kind]
        print(f"[{kind}] image AUROC " + ", ".join(f"{c} {report['image'][c]['auroc']:.3f}" for c in
                                                (*CLASSES, "all")), flush=True)
        entry = report["pixel_detection_set"]["map"]["all"]
        print(f"[{kind}]   map (whole test set)  pixel AUROC {entry['pixel_auroc']:.3f}  PRO {entry['pro']:.3f}")
        for method in ("map", "neon_max_blur", "neon_sum_blur", "neon_excess", "neon_excess_blur", "gxi_excess_blur"):
            entry = report["pixel"][method]["all"]
            print(f"[{kind}]   {method:18s} pixel AUROC {entry['pixel_auroc']:.3f}  PRO {entry['pro']:.3f}")
    results["total_seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, allow_nan=True) + "\n")
    figure(args.figure, data, examples, results)
    print(f"wrote {args.out} and {args.figure} ({results['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
