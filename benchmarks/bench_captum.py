"""Benchmark: NEON next to Captum's methods on the same score: time per explanation and deletion/insertion areas.

Settings (SPEC §6 and §4):

* **Wholesale, KDE outlier** (γ = 1, log + standardise): the 20 most outlying customers, each explained with its
  leave-one-out model (``model.leave_one_out(i)``), batch 1.
* **Wholesale, KDE outlier, nearest reference**: the same, with each customer's nearest other customer as the
  removal reference (jointly in-distribution) instead of the per-feature median.
* **Wholesale, KDE inlier** (γ = 1, H = 2500 random features, seed 0): the 20 most typical customers, leave-one-out.
* **Wholesale, k-means** (K = 6, 10 restarts, seed 8): all 440 customers in one batch, each for its own cluster.
* **Magnetic tiles** (if ``neon_attrib.vision.deep`` and ``shared/data/magnetic_tile_defects`` exist): a
  :class:`~neon_attrib.vision.deep.DeepNeon` KDE outlier head on VGG-16 block 5 (the Keras ImageNet weights of
  ``shared/data/vgg16_imagenet_features`` when present, else random weights), fitted on defect-free tiles, explaining
  per defect class the tile it scores highest among the class's first 8 (what the model flags), resized and
  centre-cropped to ``--tile-size`` pixels. A removed patch is replaced by the same patch of the most typical of 10
  held-out defect-free tiles (in-distribution removal: "normal texture here").

Methods: NEON (:class:`~neon_attrib.integrations.captum.NeonLRP`, i.e. ``explain``), Integrated Gradients (50 steps),
KernelShap
(Captum's default 25 samples), Occlusion and Saliency (Captum's default ``abs=True``). Every baseline is the removal
reference of the curves (tabular: the training median; images: a held-out normal tile), feature groups are single
features (tabular) or square patches of ``tile-size / 8`` pixels (images; also Occlusion's window and KernelShap's
feature mask). Times are medians of ``--repeats`` runs after one warm-up run, in one process, so ratios to NEON
survive a noisy machine.

Columns: ``s/expl`` median seconds per explained example; ``×NEON`` that time over NEON's; ``del↓`` normalised area of
the mean deletion curve (most relevant first: 0 = the score falls to the reference's at once, 1 = it never moves);
``ins↑`` the same for insertion (1 = the input's score is restored at once); ``LeRF−MoRF↑`` normalised deletion area
of the least-relevant-first order minus the most-relevant-first one (> 0: the ranking carries information; this one
does not depend on whether the reference raises or lowers the score).

    python benchmarks/bench_captum.py               # everything (several minutes on 2 cores)
    python benchmarks/bench_captum.py --quick       # fewer instances and tiles, smaller images
"""

from __future__ import annotations

import argparse
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

from _common import data_dir  # noqa: E402

DATA = data_dir()
METHODS = ("NEON", "IntegratedGradients", "KernelShap", "Occlusion", "Saliency")
DEFECTS = ("MT_Break", "MT_Blowhole", "MT_Crack", "MT_Uneven", "MT_Fray")


def _attribution(name: str, model, x, target, reference, feature_mask, window):
    """One explanation of ``x`` by method ``name``, with the settings described in the module docstring."""
    import captum.attr as ca

    from neon_attrib.integrations.captum import NeonLRP

    if name == "NEON":
        return NeonLRP(model).attribute(x, target=target)
    if name == "IntegratedGradients":
        return ca.IntegratedGradients(model).attribute(x, target=target, baselines=reference, n_steps=50)
    if name == "KernelShap":
        return ca.KernelShap(model).attribute(x, target=target, baselines=reference, feature_mask=feature_mask)
    if name == "Occlusion":
        return ca.Occlusion(model).attribute(x, target=target, baselines=reference, sliding_window_shapes=window,
                                             strides=window)
    if name == "Saliency":
        return ca.Saliency(model).attribute(x, target=target)
    raise ValueError(name)


def evaluate(items: list[dict], repeats: int, n_steps: int | None) -> list[dict]:
    """Time and evaluate every method on ``items`` (dicts: model, x, target, reference, feature_mask, window)."""
    from neon_attrib.evaluation.curves import FlipCurve, flip_curve

    seconds = {name: [] for name in METHODS}
    curves = {name: {"del": [], "ins": [], "lerf": []} for name in (*METHODS, "Random")}
    for item in items:
        model, x = item["model"], item["x"]
        common = dict(target=item["target"], reference=item["reference"], feature_mask=item["curve_mask"],
                      n_steps=n_steps)
        for name in METHODS:
            def run(name=name, model=model, x=x, item=item):
                return _attribution(name, model, x.clone(), item["target"], item["reference"], item["feature_mask"],
                                    item["window"])

            torch.manual_seed(0)
            run()  # warm-up
            times = []
            for _ in range(repeats):
                torch.manual_seed(0)
                start = time.perf_counter()
                relevance = run()
                times.append(time.perf_counter() - start)
            seconds[name].append(statistics.median(times) / x.shape[0])
            relevance = relevance.detach().double()
            curves[name]["del"].append(flip_curve(model, x, relevance, mode="deletion", **common))
            curves[name]["ins"].append(flip_curve(model, x, relevance, mode="insertion", **common))
            curves[name]["lerf"].append(flip_curve(model, x, relevance, mode="deletion",
                                                   order="least_relevant_first", **common))
        zeros = torch.zeros_like(x, dtype=torch.float64)
        for key, mode in (("del", "deletion"), ("ins", "insertion"), ("lerf", "deletion")):
            curves["Random"][key].append(flip_curve(model, x, zeros, mode=mode, order="random", **common))

    def merged(parts: list[FlipCurve]) -> FlipCurve:
        return FlipCurve(parts[0].fractions, torch.cat([p.scores for p in parts]), parts[0].mode, parts[0].order)

    neon_seconds = statistics.median(seconds["NEON"])
    rows = []
    for name in (*METHODS, "Random"):
        deletion = merged(curves[name]["del"]).mean_normalized_area
        row = {
            "method": name,
            "seconds": statistics.median(seconds[name]) if name in seconds else None,
            "deletion": deletion,
            "insertion": merged(curves[name]["ins"]).mean_normalized_area,
            "lerf_minus_morf": merged(curves[name]["lerf"]).mean_normalized_area - deletion,
            "mean_deletion_curve": merged(curves[name]["del"]).mean_curve().tolist(),
        }
        row["relative_time"] = None if row["seconds"] is None else row["seconds"] / neon_seconds
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------------------
def wholesale_items(kind: str, n_instances: int) -> tuple[list[dict], dict]:
    from neon_attrib import KDEInlier, KDEOutlier, KMeansMembership
    from neon_attrib.datasets import load_wholesale, preprocess_wholesale
    from neon_attrib.evaluation.curves import default_reference, median_reference, nearest_reference

    data = preprocess_wholesale(load_wholesale()[0])
    window = (1,)
    if kind == "kmeans":
        model = KMeansMembership(n_clusters=6, n_init=10, random_state=8).double().fit(data)
        x = torch.as_tensor(data)
        targets = model.predict(x)
        reference = median_reference(data).expand_as(x).contiguous()
        item = dict(model=model, x=x, target=targets, reference=reference, feature_mask=None, curve_mask=None,
                    window=window)
        return [item], {"model": "KMeansMembership(n_clusters=6, n_init=10, random_state=8)", "examples": 440,
                        "batch": 440}
    if kind in ("outlier", "outlier_nn"):
        full = KDEOutlier(gamma=1.0).double().fit(data)
        chosen = torch.argsort(full.score_training(), descending=True)[:n_instances].tolist()
        spec = "KDEOutlier(gamma=1), leave-one-out, most outlying"
    else:
        full = KDEInlier(gamma=1.0, n_features=2500, random_state=0).double().fit(data)
        chosen = torch.argsort(full.score_training(), descending=True)[:n_instances].tolist()
        spec = "KDEInlier(gamma=1, n_features=2500, random_state=0), leave-one-out, most typical"
    if kind == "outlier_nn":
        spec += "; reference: the nearest other customer"
    items = []
    for i in chosen:
        model = full.leave_one_out(i)
        x = torch.as_tensor(data[i:i + 1])
        others = np.delete(data, i, axis=0)
        if kind == "outlier_nn":
            reference = nearest_reference(others)(x)
        else:
            reference = median_reference(others).reshape(1, -1)
            assert kind != "outlier" or torch.allclose(reference, default_reference(model, x))
        items.append(dict(model=model, x=x, target=None, reference=reference, feature_mask=None, curve_mask=None,
                          window=window))
    return items, {"model": spec, "examples": len(chosen), "batch": 1, "rows": chosen}


def tile_items(n_tiles: int, size: int, n_free: int) -> tuple[list[dict], dict] | None:
    """DeepNeon KDE outlier head on defect-free tiles; defect tiles to explain; a held-out normal tile as reference."""
    try:
        from neon_attrib.vision import deep
    except ImportError:
        print("neon_attrib.vision.deep is missing: tiles skipped", file=sys.stderr)
        return None
    root = DATA / "magnetic_tile_defects"
    if not root.is_dir():
        print(f"{root} is missing: tiles skipped", file=sys.stderr)
        return None
    from torchvision.transforms.functional import center_crop

    from neon_attrib import KDEOutlier
    from neon_attrib.evaluation.curves import model_score, patch_mask

    weights_file = DATA / "vgg16_imagenet_features" / "vgg16_features_keras_imagenet.pth"
    weights = str(weights_file) if weights_file.is_file() else None
    preprocessing = deep.get_preprocessing("caffe" if weights else "torchvision")

    def load(path: Path) -> torch.Tensor:
        return preprocessing(center_crop(deep.load_image(path, size=size), [size, size]))

    free = sorted((root / "MT_Free" / "Imgs").glob("*.jpg"))
    train = torch.stack([load(free[int(i)]) for i in np.linspace(0, len(free) - 2, n_free)])
    held_out = torch.stack([load(free[int(i) + 1]) for i in np.linspace(0, len(free) - 2, 10)])  # never fitted
    torch.manual_seed(0)
    features = deep.vgg16_features(weights)
    with torch.no_grad():
        rows = deep.DeepNeon._rows(features(train))
    gamma = 1.0 / float(torch.cdist(rows, rows).pow(2).median())  # median heuristic: the data's own scale
    model = deep.DeepNeon(features, KDEOutlier(gamma=gamma), preprocessing=preprocessing).fit(train, progress=False)
    # removal = normal texture: patches of the most typical held-out defect-free tile (a blurred or grey patch is
    # itself unusual for a texture model and can raise the outlier score)
    held_scores = model_score(model, held_out)
    reference = held_out[int(held_scores.argmin())].unsqueeze(0)
    # explain what the model flags: per defect class, the highest-scoring of its first 8 tiles
    defects = []
    for name in DEFECTS[:n_tiles]:
        paths = sorted((root / name / "Imgs").glob("*.jpg"))[:8]
        candidates = torch.stack([load(p) for p in paths])
        defects.append(paths[int(model_score(model, candidates).argmax())])
    patch = max(1, size // 8)
    mask = patch_mask((3, size, size), patch).unsqueeze(0)
    items, scores = [], []
    for path in defects:
        x = load(path).unsqueeze(0)
        scores.append(float(model_score(model, x)))
        items.append(dict(model=model, x=x, target=None, reference=reference, feature_mask=mask, curve_mask=mask[0],
                          window=(3, patch, patch)))
    info = {"model": f"DeepNeon(vgg16 block 5 [{'keras imagenet' if weights else 'random'}], "
                     f"KDEOutlier(gamma={gamma:.3g}, median heuristic)), fitted on {n_free} defect-free tiles",
            "examples": len(items), "batch": 1, "image_size": size, "patch": patch,
            "reference": "the most typical of 10 held-out defect-free tiles",
            "tiles": [str(p.relative_to(root)) for p in defects], "tile_scores": scores,
            "reference_score": float(held_scores.min()),
            "held_out_scores": {"median": float(held_scores.median()), "max": float(held_scores.max())}}
    return items, info


def wholesale_figure(path: Path) -> None:
    """``compare`` on the book's outlier, customer 339 (row 338), with its leave-one-out KDE: the docs' figure."""
    import matplotlib

    matplotlib.use("Agg")
    from neon_attrib import KDEOutlier
    from neon_attrib.datasets import load_wholesale, preprocess_wholesale
    from neon_attrib.integrations.captum import compare

    raw, names = load_wholesale()
    data = preprocess_wholesale(raw)
    model = KDEOutlier(gamma=1.0).double().fit(data).leave_one_out(338)
    result = compare(model, torch.as_tensor(data[338:339]), methods=["IntegratedGradients", "KernelShap", "Occlusion",
                                                                     "Saliency"], feature_names=names)
    result.figure.suptitle("Wholesale customer 339, KDE outlier (leave-one-out): NEON and Captum methods", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    result.figure.savefig(path, dpi=110)
    print(f"\ncustomer 339:\n{result}\nwrote {path}")


# ---------------------------------------------------------------------------------------------------------------------
def _table(title: str, rows: list[dict]) -> str:
    header = f"{'method':<21}{'s/expl':>10}{'×NEON':>8}{'del↓':>8}{'ins↑':>8}{'LeRF−MoRF↑':>12}"
    lines = [title, header, "-" * len(header)]
    for row in rows:
        seconds = "" if row["seconds"] is None else f"{row['seconds']:.2e}"
        relative = "" if row["relative_time"] is None else f"{row['relative_time']:.1f}"
        lines.append(f"{row['method']:<21}{seconds:>10}{relative:>8}{row['deletion']:>8.3f}{row['insertion']:>8.3f}"
                     f"{row['lerf_minus_morf']:>12.3f}")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    """The result tables in Markdown (for docs/captum.md)."""
    out = []
    for key, result in report["results"].items():
        out.append(f"**{key}**: {result['model']}; {result['examples']} examples, batch {result['batch']}.\n")
        out.append("| method | s / explanation | × NEON | deletion ↓ | insertion ↑ | LeRF − MoRF ↑ |")
        out.append("|---|---:|---:|---:|---:|---:|")
        for row in result["rows"]:
            seconds = "" if row["seconds"] is None else f"{row['seconds']:.2g}"
            relative = "" if row["relative_time"] is None else f"{row['relative_time']:.2g}"
            out.append(f"| {row['method']} | {seconds} | {relative} | {row['deletion']:.3f} | {row['insertion']:.3f} "
                       f"| {row['lerf_minus_morf']:.3f} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 customers per KDE setting, 2 tiles")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--instances", type=int, default=20)
    parser.add_argument("--tiles", type=int, default=5)
    parser.add_argument("--tile-size", type=int, default=64)
    parser.add_argument("--free-tiles", type=int, default=60)
    parser.add_argument("--no-tiles", action="store_true")
    parser.add_argument("--markdown", action="store_true", help="also print the tables in Markdown")
    parser.add_argument("--only", nargs="*", help="run only these settings (keys of the JSON 'results')")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "captum.json"))
    parser.add_argument("--figure", default=str(ROOT / "docs" / "figures" / "captum_compare_wholesale.png"),
                        help="where to write the compare() figure of customer 339 ('' to skip)")
    args = parser.parse_args(argv)
    if args.quick:
        args.instances, args.tiles, args.free_tiles = 5, 2, 20
    torch.set_num_threads(args.threads)

    from importlib.metadata import version

    settings = [("wholesale_kde_outlier", "outlier"), ("wholesale_kde_outlier_nearest", "outlier_nn"),
                ("wholesale_kde_inlier", "inlier"), ("wholesale_kmeans", "kmeans")]
    results = {}
    for key, kind in settings:
        if args.only and key not in args.only:
            continue
        start = time.perf_counter()
        items, info = wholesale_items(kind, args.instances)
        rows = evaluate(items, args.repeats, n_steps=None)
        results[key] = {**info, "dtype": "float64", "rows": rows, "wall_s": time.perf_counter() - start}
        print(_table(f"\n{key}: {info['model']} ({info['examples']} examples, batch {info['batch']})", rows))
    if not args.no_tiles and (not args.only or "magnetic_tiles" in args.only):
        start = time.perf_counter()
        tiles = tile_items(args.tiles, args.tile_size, args.free_tiles)
        if tiles is not None:
            items, info = tiles
            rows = evaluate(items, max(1, args.repeats - 2), n_steps=16)
            results["magnetic_tiles"] = {**info, "dtype": "float32", "rows": rows,
                                         "wall_s": time.perf_counter() - start}
            print(_table(f"\nmagnetic_tiles: {info['model']} ({info['examples']} tiles of {args.tile_size} px)",
                         rows))
    report = {
        "benchmark": "bench_captum",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "python": platform.python_version()},
        "versions": {name: version(name) for name in ("torch", "captum", "zennit", "neon_attrib")},
        "settings": {"repeats": args.repeats, "quick": args.quick, "methods": list(METHODS),
                     "ig_steps": 50, "kernelshap_samples": 25, "timing": "median seconds per explained example"},
        "results": results,
    }
    if args.figure:
        wholesale_figure(Path(args.figure))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {out}")
    if args.markdown:
        print("\n" + markdown(report))
    return report


if __name__ == "__main__":
    main()
