"""Benchmark: which heatmap of PatchCore / PaDiM shows where the defect is, and which one explains the score?

Same data and backbone as ``bench_anomaly.py``: the magnetic tiles of Huang et al. (2020; research use with citation,
see its SOURCE.md), every tile resized to ``--size``², the Keras ImageNet VGG-16 (caffe preprocessing) tapped at the
ReLUs closing blocks 3 and 4. Both detectors are fitted on Free tiles and calibrated (threshold, normal level τ) on
other Free tiles. The evaluated images, on one set for every method:

* ``--per-class`` tiles of every real defect class (Blowhole, Break, Crack, Fray, Uneven) whose defect survives the
  resizing;
* synthetic defects with exactly known masks, made on other Free tiles (``--synthetic`` per kind): ``CutPaste``
  (a rectangle of the tile cut from elsewhere in it, turned by 90° and darkened, pasted back) and ``Scratch`` (a
  2-pixel line, bright or dark, at a random angle);
* ``--normal`` more Free tiles: the normal images of AUPIMO's shared false-positive rate and of every pooled metric.

Methods (one heatmap per image, summed over colour channels):

* ``map``: the detector's anomaly map, used as a ranking;
* ``neon_<target>``: NEON pixel relevance of ``max`` (the image score), ``sum`` (all patch scores) and ``excess``
  (``Σ max(0, s − τ)``) with the default rules (``EpsilonGammaBox``, γ = 0.25), raw and blurred like the map
  (``_blur``, σ = 4). ``(row, col)`` at the maximal patch equals ``max`` here (no re-weighting): not repeated;
* ``neon_sum_gamma<γ>``, ``neon_sum_flat``: ``sum`` with other rules in the backbone (``EpsilonGammaBox`` with other γ,
  ``EpsilonPlusFlat``), raw and blurred;
* ``layer<L>_<target>``: the relevance stopped at backbone layer ``L`` (``8``: block 2, stride 2, for ``sum`` and
  ``excess``; ``15``: block 3, stride 4, for ``sum``) and upsampled bilinearly
  (:func:`~neon_attrib.anomaly.layer_relevance`);
* ``gxi_<target>``: gradient × input of ``sum`` and ``max``, raw and blurred; ``ig_sum``: Integrated Gradients of
  ``sum`` (zero baseline in caffe space = the mean colour, ``--ig-steps`` steps), raw and blurred;
* ``random``: uniform noise (seeded).

Reported per class (each class's images pooled with the normal images), per method:

* pixel AUROC and PRO (per-region overlap to 30 % FPR) of the pooled pixels;
* AUPIMO (:func:`~neon_attrib.anomaly.aupimo`, FPR 1e-5 to 1e-4 of the normal images) per image: mean, standard
  deviation, quartiles;
* each image's own pixel AUROC (its defect against its other pixels): mean and standard deviation over the images;
* faithfulness to the image score (:func:`~neon_attrib.anomaly.deletion_insertion`) on ``--faithful-per-class``
  images of every class: deletion and insertion of 0, 1, 2, 5, 10 and 20 % of the pixels, removed pixels
  replaced by the blurred image (σ = size / 16); the normalised area between the curves (ABPC) per image (mean,
  standard deviation, median) and of the average curves. Also with the aligned pixels of the nearest fit image as
  the normal content, for a few methods on one image per class: pasting another tile's pixels leaves seams that the
  detectors score as anomalous, so those curves rise under deletion.

``recommendation`` names, from these numbers, the NEON heatmap (target, raw or blurred, pixels or a layer, with the
default rules) with the best mean of AUPIMO and PRO over the real classes ("where is the defect") and the NEON target
with the best ABPC of the mean curves ("why this score"), per detector. Timings are not taken.

    python benchmarks/bench_anomaly_evidence.py                   # both detectors in one process
    python benchmarks/bench_anomaly_evidence.py --detectors padim --threads 1 --out padim.json  # or one each, in
    python benchmarks/bench_anomaly_evidence.py --merge patchcore.json padim.json              # parallel, then merged
    python benchmarks/bench_anomaly_evidence.py --tiny --out tiny.json   # a smoke run: 1 tile per class
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import data_dir, environment, evenly_spaced, magnetic_tiles, split_evenly  # noqa: E402
from bench_anomaly import CLASSES, LAYERS, load_tile  # noqa: E402

SYNTHETIC = ("CutPaste", "Scratch")
TARGETS = ("max", "sum", "excess")
GAMMAS = (0.05, 1.0)
RESOLUTION = (("8", "sum"), ("8", "excess"), ("15", "sum"))
FAITHFUL = ("map", "neon_max", "neon_sum", "neon_excess", "neon_sum_blur", "layer8_sum", "gxi_sum", "ig_sum", "random")
FAITHFUL_NEAREST = ("map", "neon_sum", "random")
SHARES = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2)


# ---------------------------------------------------------------------------------------------------------------------
# synthetic defects
# ---------------------------------------------------------------------------------------------------------------------
def cut_paste(image: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray]:
    """A rectangle of the tile, from elsewhere in it, turned by 90° and darkened to 60 %, pasted; mask = the
    rectangle."""
    _, size, _ = image.shape
    side = int(rng.integers(size // 10, size // 5))
    source = rng.integers(0, size - side, 2)
    target = rng.integers(size // 8, size - side - size // 8, 2)
    piece = image[:, source[0]:source[0] + side, source[1]:source[1] + side].rot90(1, (1, 2)) * 0.6
    out = image.clone()
    out[:, target[0]:target[0] + side, target[1]:target[1] + side] = piece
    mask = np.zeros((size, size), bool)
    mask[target[0]:target[0] + side, target[1]:target[1] + side] = True
    return out, mask


def scratch(image: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray]:
    """A straight line 2 pixels wide, a third to a half of the tile long, bright (0.9) or dark (× 0.3); mask = its
    pixels."""
    _, size, _ = image.shape
    length = rng.uniform(size / 3, size / 2)
    angle = rng.uniform(0, math.pi)
    centre = rng.uniform(size / 3, 2 * size / 3, 2)
    t = np.linspace(-length / 2, length / 2, int(length * 4))
    rows = np.clip(np.round(centre[0] + t * math.sin(angle)).astype(int), 0, size - 1)
    cols = np.clip(np.round(centre[1] + t * math.cos(angle)).astype(int), 0, size - 1)
    mask = np.zeros((size, size), bool)
    mask[rows, cols] = True
    mask[np.clip(rows + 1, 0, size - 1), cols] = True
    out = image.clone()
    m = torch.from_numpy(mask)
    out[:, m] = 0.9 if rng.random() < 0.5 else out[:, m] * 0.3
    return out, mask


# ---------------------------------------------------------------------------------------------------------------------
# heatmaps
# ---------------------------------------------------------------------------------------------------------------------
def batched(function, x: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([function(chunk) for chunk in x.split(batch)])


def heatmaps(model, x: torch.Tensor, args, log) -> dict[str, np.ndarray]:
    from captum.attr import IntegratedGradients

    from neon_attrib.anomaly import PatchPool, gaussian_blur, layer_relevance

    batch = args.batch_size
    maps: dict[str, torch.Tensor] = {"map": model.anomaly_map(x, batch_size=batch)}
    log("map")

    def neon(copy) -> torch.Tensor:
        with copy.explainer(audit=False) as explainer:
            return batched(lambda chunk: explainer(chunk)[1].sum(1), x, batch)

    for target in TARGETS:
        maps[f"neon_{target}"] = neon(model.with_target(target))
        log(f"neon_{target}")
    for gamma in GAMMAS:
        copy = model.with_target("sum")
        copy.lrp_gamma = gamma
        maps[f"neon_sum_gamma{gamma:g}"] = neon(copy)
        log(f"neon_sum_gamma{gamma:g}")
    copy = model.with_target("sum")
    copy.composite = "epsilon_plus_flat"
    maps["neon_sum_flat"] = neon(copy)
    log("neon_sum_flat")
    for layer, target in RESOLUTION:
        maps[f"layer{layer}_{target}"] = torch.cat([layer_relevance(model, chunk, layer, target).map
                                                    for chunk in x.split(batch)])
        log(f"layer{layer}_{target}")
    pools = {target: PatchPool(target) for target in ("sum", "max")}
    parts: dict[str, list[torch.Tensor]] = {f"gxi_{target}": [] for target in pools}
    for chunk in x.split(batch):
        leaf = chunk.clone().requires_grad_(True)
        fmap, scores = model._patch_grid(leaf)
        for target, pool in pools.items():
            (gradient,) = torch.autograd.grad(pool(scores).sum(), leaf, retain_graph=True)
            parts[f"gxi_{target}"].append((gradient * chunk).sum(1).detach())
    maps.update({name: torch.cat(values) for name, values in parts.items()})
    log("gxi")
    if args.ig_steps > 0:
        ig = IntegratedGradients(model.with_target("sum"))
        maps["ig_sum"] = torch.cat([
            ig.attribute(chunk, baselines=torch.zeros_like(chunk), n_steps=args.ig_steps,
                         internal_batch_size=args.ig_steps * len(chunk)).sum(1).detach()
            for chunk in x.split(max(1, batch // 2))])
        log("ig_sum")
    maps["random"] = torch.rand(x.shape[0], *x.shape[-2:], generator=torch.Generator().manual_seed(0))
    for name in [name for name in maps if name.startswith(("neon_", "gxi_", "ig_"))]:
        maps[f"{name}_blur"] = gaussian_blur(maps[name].double(), model.sigma)
    return {name: value.detach().double().numpy() for name, value in maps.items()}


# ---------------------------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------------------------
def spread(values: list[float] | np.ndarray) -> dict:
    values = np.asarray([v for v in values if np.isfinite(v)], dtype=np.float64)
    if values.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "median": float("nan"), "q25": float("nan"),
                "q75": float("nan"), "n": 0}
    return {"mean": float(values.mean()), "std": float(values.std()), "median": float(np.median(values)),
            "q25": float(np.quantile(values, 0.25)), "q75": float(np.quantile(values, 0.75)), "n": int(values.size)}


def localisation(maps: np.ndarray, masks: np.ndarray, classes: list[str]) -> dict:
    from neon_attrib.anomaly import aupimo, pixel_auroc, pro_auc

    normal = np.array([c == "Free" for c in classes])
    report = {}
    for name in (*CLASSES, *SYNTHETIC):
        chosen = np.array([c == name for c in classes])
        if not chosen.any():
            continue
        keep = chosen | normal
        try:
            per_image = aupimo(maps[keep], masks[keep])
            aupimo_error = None
        except ValueError as exc:  # e.g. every normal heatmap zero: no shared FPR below the lower bound
            per_image, aupimo_error = np.full(int(keep.sum()), np.nan), str(exc)
        own = [pixel_auroc(maps[i], masks[i]) for i in np.flatnonzero(chosen)]
        report[name] = {"pixel_auroc": pixel_auroc(maps[keep], masks[keep]), "pro": pro_auc(maps[keep], masks[keep]),
                        "aupimo": spread(per_image), "image_pixel_auroc": spread(own)}
        if aupimo_error:
            report[name]["aupimo_error"] = aupimo_error
    for group, names in (("real", CLASSES), ("synthetic", SYNTHETIC)):
        present = [report[n] for n in names if n in report]
        report[f"mean_{group}"] = {metric: float(np.nanmean([r[metric] if not isinstance(r[metric], dict)
                                                               else r[metric]["mean"] for r in present]))
                                   for metric in ("pixel_auroc", "pro", "aupimo", "image_pixel_auroc")}
    return report


def faithfulness(model, x: torch.Tensor, maps: dict, reference, classes: list[str], methods: tuple[str, ...],
                 args) -> dict:
    from neon_attrib.anomaly import deletion_insertion

    scorer = model.with_target("max")
    shares = np.asarray(SHARES if not args.tiny else SHARES[::3])
    report = {}
    for name in methods:
        if name not in maps:
            continue
        result = deletion_insertion(scorer, x, torch.from_numpy(maps[name]), reference, fractions=shares,
                                    batch_size=args.batch_size)
        abpc = result.normalized_abpc.numpy()
        entry = {c: spread(abpc[[i for i, k in enumerate(classes) if k == c]]) for c in dict.fromkeys(classes)}
        entry["all"] = {**spread(abpc), "of_mean_curves": result.mean_normalized_abpc}
        entry["mean_deletion_curve"] = (result.deletion.mean(0) / result.input_score.mean()).tolist()
        entry["mean_insertion_curve"] = (result.insertion.mean(0) / result.input_score.mean()).tolist()
        report[name] = entry
    report["shares"] = shares.tolist()
    return report


def recommend(local: dict, faithful: dict) -> dict:
    # the library's rules (EpsilonGammaBox, γ = 0.25): target, blur and resolution are chosen; other rules compared
    neon = [name for name in local
            if name.startswith(("neon_", "layer")) and "gamma" not in name and "flat" not in name]

    def where(name: str) -> float:
        mean = local[name]["mean_real"]
        return (mean["aupimo"] + mean["pro"]) / 2

    def finite(value: float) -> float:
        return value if np.isfinite(value) else -np.inf

    best_where = max(neon, key=lambda name: finite(where(name)))
    targets = [f"neon_{t}" for t in TARGETS if f"neon_{t}" in faithful]
    best_why = max(targets, key=lambda name: finite(faithful[name]["all"]["of_mean_curves"]))
    return {"where_is_the_defect": best_where, "where_score_mean_aupimo_pro_real": where(best_where),
            "why_this_score": best_why, "why_abpc_of_mean_curves": faithful[best_why]["all"]["of_mean_curves"],
            "rule": "where: the NEON heatmap (target, raw or blurred, pixels or a layer; default rules) with the best "
                    "mean of AUPIMO and PRO "
                    "over the real classes; why: the NEON target with the best normalised ABPC of the mean curves "
                    "(blur reference; per-image ratios explode where f(x) is close to f(reference))"}


# ---------------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=data_dir(), help="shared/data folder")
    parser.add_argument("--size", type=int, default=128, help="tiles are resized to SIZE x SIZE (default 128)")
    parser.add_argument("--fit-images", type=int, default=40, help="Free tiles to fit on (default 40)")
    parser.add_argument("--calibration-images", type=int, default=16, help="other Free tiles for threshold and τ")
    parser.add_argument("--normal", type=int, default=8, help="other Free tiles evaluated as normal (default 8)")
    parser.add_argument("--per-class", type=int, default=5, help="tiles per real defect class (default 5)")
    parser.add_argument("--synthetic", type=int, default=5, help="synthetic defects per kind (default 5)")
    parser.add_argument("--faithful-per-class", type=int, default=1,
                        help="images per class in the deletion/insertion curves (default 1)")
    parser.add_argument("--ig-steps", type=int, default=6, help="Integrated Gradients steps (default 6; 0: none)")
    parser.add_argument("--coreset-ratio", type=float, default=0.02, help="PatchCore (default 0.02)")
    parser.add_argument("--n-channels", type=int, default=100, help="PaDiM channel subset (default 100)")
    parser.add_argument("--detectors", nargs="+", choices=("patchcore", "padim"), default=["patchcore", "padim"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="smoke run: 1 tile per class, 8 fit images, 12 normal")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "anomaly_evidence.json")
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="write --out from runs of one detector each (run in parallel), then stop")
    args = parser.parse_args(argv)
    if args.merge:
        runs = [json.loads(path.read_text()) for path in args.merge]
        merged = runs[0]
        for run in runs[1:]:
            if run["settings"] != merged["settings"] or run["images"] != merged["images"]:
                raise SystemExit(f"bench_anomaly_evidence --merge: {run['detectors'].keys()} ran with other settings")
            merged["detectors"].update(run["detectors"])
        for report in merged["detectors"].values():  # the rule as it stands, from the recorded numbers
            report["recommendation"] = recommend(report["localisation"], report["faithfulness"])
        args.out.write_text(json.dumps(merged, indent=1, allow_nan=True) + "\n")
        print(f"wrote {args.out}")
        return 0
    if args.tiny:
        args.fit_images, args.calibration_images, args.per_class, args.synthetic = 8, 4, 1, 1
        args.faithful_per_class, args.ig_steps, args.normal = 1, 2, 12
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from neon_attrib.anomaly import PaDiM, PatchCore, nearest_normal
    from neon_attrib.evaluation.curves import blur_reference
    from neon_attrib.vision import get_preprocessing, vgg16_features

    if (found := magnetic_tiles(args.data, "bench_anomaly_evidence")) is None:
        return 2
    tiles, weights = found
    started = time.perf_counter()
    caffe = get_preprocessing("caffe")
    features = vgg16_features(weights)

    free = sorted((tiles / "MT_Free" / "Imgs").glob("*.jpg"))
    fit_files, calibration_files, normal_files, synthetic_files, _ = split_evenly(
        free, args.fit_images, args.calibration_images, args.normal, 2 * args.synthetic)

    images, masks, classes, names = [], [], [], []
    for name in CLASSES:
        candidates = sorted((tiles / f"MT_{name}" / "Imgs").glob("*.jpg"))
        visible = [p for p in candidates if load_tile(p, args.size)[1].any()]
        for path in evenly_spaced(visible, args.per_class):
            image, mask = load_tile(path, args.size)
            images.append(image), masks.append(mask), classes.append(name), names.append(f"MT_{name}/{path.name}")
    rng = np.random.default_rng(0)
    for k, path in enumerate(synthetic_files):
        kind = SYNTHETIC[k % 2]
        image, mask = (cut_paste if kind == "CutPaste" else scratch)(load_tile(path, args.size)[0], rng)
        images.append(image), masks.append(mask), classes.append(kind), names.append(f"{kind} on MT_Free/{path.name}")
    for path in normal_files:
        image, mask = load_tile(path, args.size)
        images.append(image), masks.append(mask), classes.append("Free"), names.append(f"MT_Free/{path.name}")
    x = torch.stack([caffe(image) for image in images])
    masks = np.stack(masks)
    fit_x = torch.stack([caffe(load_tile(p, args.size)[0]) for p in fit_files])
    calibration_x = torch.stack([caffe(load_tile(p, args.size)[0]) for p in calibration_files])
    defects = [i for i, c in enumerate(classes) if c != "Free"]
    faithful_rows = [i for name in (*CLASSES, *SYNTHETIC) for i in
                     evenly_spaced([j for j in defects if classes[j] == name], args.faithful_per_class)]
    nearest_rows = [i for name in (*CLASSES, *SYNTHETIC) for i in
                    evenly_spaced([j for j in defects if classes[j] == name], 1)]

    results = {"benchmark": "bench_anomaly_evidence", "environment": environment(torch.device("cpu")),
               "settings": {"size": args.size, "fit_images": len(fit_files),
                            "calibration_images": len(calibration_files), "normal_images": len(normal_files),
                            "per_class": args.per_class, "synthetic_per_kind": args.synthetic,
                            "faithful_per_class": args.faithful_per_class, "shares": list(SHARES),
                            "ig_steps": args.ig_steps, "layers": LAYERS,
                            "coreset_ratio": args.coreset_ratio, "n_channels": args.n_channels, "dtype": "float32",
                            "backbone": "VGG-16 conv base, Keras ImageNet weights (caffe preprocessing)",
                            "default_rules": "EpsilonGammaBox, gamma 0.25 (fast exact rules)", "tiny": args.tiny},
               "images": names, "classes": classes, "detectors": {}}
    for kind in args.detectors:
        def log(step: str, kind: str = kind) -> None:
            print(f"[{kind}] {step} ({time.perf_counter() - started:.0f} s)", flush=True)

        if kind == "patchcore":
            model = PatchCore(features, LAYERS, coreset_ratio=args.coreset_ratio, seed=0, preprocessing="caffe")
        else:
            model = PaDiM(features, LAYERS, n_channels=args.n_channels, relative_reg=True, seed=0,
                          preprocessing="caffe")
        model.fit(fit_x, batch_size=8, progress=False).calibrate(calibration_x)
        log("fitted")
        maps = heatmaps(model, x, args, log)
        local = {name: localisation(values, masks, classes) for name, values in maps.items()}
        log("localisation metrics")
        faithful = faithfulness(model, x[faithful_rows], {name: values[faithful_rows] for name, values in
                                                          maps.items()}, blur_reference(),
                                [classes[i] for i in faithful_rows], FAITHFUL, args)
        faithful["reference"] = "the image blurred (Gaussian, sigma = size / 16)"
        log("faithfulness (blur)")
        nearest = faithfulness(model, x[nearest_rows], {name: values[nearest_rows] for name, values in maps.items()},
                               nearest_normal(x[nearest_rows], fit_x), [classes[i] for i in nearest_rows],
                               FAITHFUL_NEAREST, args)
        nearest["reference"] = "aligned pixels of the nearest fit image (Euclidean in caffe input space)"
        log("faithfulness (nearest normal)")
        results["detectors"][kind] = {"threshold": float(model.threshold_), "tau": float(model.tau_),
                                      "image_scores": model.score(x).tolist(), "localisation": local,
                                      "faithfulness": faithful, "faithfulness_nearest_normal": nearest,
                                      "recommendation": recommend(local, faithful)}
        for name in ("map", "neon_max_blur", "neon_sum", "neon_sum_blur", "neon_excess_blur", "layer8_sum",
                     "gxi_sum_blur", "ig_sum_blur", "random"):
            if name in local:
                mean = local[name]["mean_real"]
                abpc = faithful.get(name, {}).get("all", {}).get("mean", float("nan"))
                print(f"[{kind}]   {name:22s} AUROC {mean['pixel_auroc']:.3f} PRO {mean['pro']:.3f} "
                      f"AUPIMO {mean['aupimo']:.3f}  ABPC {abpc:.3f}", flush=True)
        print(f"[{kind}] recommendation {results['detectors'][kind]['recommendation']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, allow_nan=True) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
