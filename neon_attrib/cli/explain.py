"""``neon-attrib explain``: pixel heatmaps of NEON heads on VGG-16 block 5, one PNG per image and head / cluster.

Registered by :func:`neon_attrib.cli.build_parser` through :func:`register_explain`. Errors a user can fix (missing
weights, unreadable or too small images, an unusable ``--out``, bad settings) are raised as ``ValueError`` /
``FileNotFoundError`` before any work is done where they can be, and ``neon_attrib.cli.main`` turns them into one line
on stderr and exit code 2. Warnings (random weights, skipped constant fit images, non-finite scores) go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

HEADS = ("kde-outlier", "kde-inlier", "kmeans")

_RANDOM_WEIGHTS_WARNING = """\
################################################################################################################
WARNING: no --weights given: VGG-16 has RANDOM weights. The scores and heatmaps below show the pipeline working,
         NOT what a trained network sees. Pass --weights PATH (a VGG-16 conv-base state_dict, e.g. a conversion
         of the Keras ImageNet weights with --preprocessing caffe).
################################################################################################################"""

_PROG = "neon-attrib explain"


def register_explain(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``explain`` command to the ``neon-attrib`` sub-parsers. Returns its parser."""
    from ..vision.deep import PREPROCESSINGS

    parser = subparsers.add_parser(
        "explain",
        help="pixel heatmaps of a KDE / k-means head on VGG-16 block 5 (the book's Figures 7 and 8)",
        description="Explain KDE outlierness / inlierness or k-means cluster membership of VGG-16 block-5 locations "
                    "in pixels (NEON + LRP). Writes one heatmap PNG per image and head (per explained cluster for "
                    "k-means), a grid PNG per image, optionally the raw relevance (--save-raw), and scores.json "
                    "(strict JSON: non-finite scores are written as null).",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="image files to explain (PNG, JPEG, TIFF, ...; 8-bit, 16-bit grey or float in [0, 1])")
    parser.add_argument("--head", action="append", choices=HEADS, default=None,
                        help="head to explain; repeat for several (default: kde-outlier)")
    fit = parser.add_mutually_exclusive_group()
    fit.add_argument("--fit", metavar="DIR", type=Path, default=None,
                     help="fit the heads on the block-5 locations of the images in DIR (e.g. defect-free samples); "
                          "constant images (e.g. all-black masks) are skipped with a warning")
    fit.add_argument("--fit-self", action="store_true",
                     help="fit on the locations of each explained image itself, each location left out of its own "
                          "KDE (the book's wood example; the default when --fit is not given)")
    parser.add_argument("--fit-pattern", metavar="GLOB", default=None,
                        help="with --fit: only the files of DIR matching GLOB (relative to DIR, e.g. '*.jpg' to leave "
                             "out PNG masks next to JPEG photos, '**/*.png' to recurse; default: every image file in "
                             "DIR, not recursing)")
    parser.add_argument("--weights", metavar="PATH", default=None,
                        help="VGG-16 conv-base state_dict (torch.save); without it: random weights and a warning")
    parser.add_argument("--preprocessing", choices=sorted(PREPROCESSINGS), default="torchvision",
                        help="input normalisation the weights expect (default: %(default)s; 'caffe' for the Keras "
                             "ImageNet weights)")
    parser.add_argument("--clusters", type=int, default=5, metavar="K", help="k-means clusters (default: %(default)s)")
    parser.add_argument("--explain-clusters", choices=("assigned", "all"), default="assigned",
                        help="k-means: explain only the assigned cluster (highest pooled score; one LRP pass per "
                             "image) or all K clusters (K passes) (default: %(default)s)")
    parser.add_argument("--gamma", type=_gamma_arg, default="auto", metavar="G",
                        help="KDE kernel sharpness γ of exp(-γ‖a-u‖²), or 'auto' = 1 / median squared distance "
                             "between the fit locations (default: %(default)s; the book used 0.05 on its features)")
    parser.add_argument("--size", type=int, default=224, metavar="S",
                        help="resize each image so that its shorter side is S pixels (default: %(default)s)")
    parser.add_argument("--value-range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help="raw pixel values meaning black and white, for 16-bit or float images whose range is not "
                             "the default (16-bit: 0 65535, float: 0 1), e.g. '0 4095' for 12-bit data")
    parser.add_argument("--pool", choices=("auto", "sum", "mean", "positive", "max"), default="auto",
                        help="location pooling; auto = sum for KDE, positive for k-means (default: %(default)s)")
    parser.add_argument("--composite", choices=("epsilon_gamma_box", "epsilon_plus_flat"),
                        default="epsilon_gamma_box", help="LRP rules for VGG-16 (default: %(default)s)")
    parser.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                        help="LRP through VGG-16 with the exact fast rules of neon_attrib.vision.fast (default); "
                             "--no-fast uses "
                             "Zennit's reference implementation (same numbers, slower)")
    parser.add_argument("--max-locations", type=int, default=None, metavar="N",
                        help="with --fit: fit on a seeded random sample of N locations")
    parser.add_argument("--seed", type=int, default=0, help="seed of random weights, k-means and random features")
    parser.add_argument("--out", type=Path, default=Path("neon_explain"), metavar="DIR",
                        help="output folder, created if missing; checked before any work (default: %(default)s)")
    parser.add_argument("--save-raw", choices=("npy", "npz"), default=None,
                        help="also write the raw pixel relevance (float32, shape (3, H, W) like the resized image; "
                             "sum over axis 0 for the map the PNG shows): npy = one <name>_<head>.npy per heatmap, "
                             "npz = one <name>_relevance.npz per image with one array per heatmap")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default: %(default)s")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (they go to stderr)")
    parser.set_defaults(func=run_explain)
    return parser


def _gamma_arg(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a float or 'auto', got {text!r}") from None


def _warn(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(f"{_PROG}: warning: {message}", file=sys.stderr)  # above any progress bar


def _make_head(kind: str, args: argparse.Namespace, gamma: float):
    from ..models import KDEInlier, KDEOutlier, KMeansMembership

    if kind == "kde-outlier":
        return KDEOutlier(gamma=gamma)
    if kind == "kde-inlier":
        return KDEInlier(gamma=gamma, n_features=2500, random_state=args.seed)
    return KMeansMembership(n_clusters=args.clusters, n_init=10, random_state=args.seed, centroid_norm=1.0)


def _fast_available() -> bool:
    try:
        from ..vision import fast  # noqa: F401
    except ImportError:  # pragma: no cover - the fast rules ship with the package
        return False
    return True


def _check_out(out: Path) -> None:
    """Raise a ValueError unless ``out`` is, or can be created as, a writable folder. Creates nothing."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder. Choose a folder (it is created if missing).")
    ancestor = out
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"--out {out} lies under {ancestor}, which is a file, not a folder. Choose another --out.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        where = "it" if ancestor == out else f"its nearest existing parent {ancestor}"
        raise ValueError(f"--out {out}: {where} is not writable. Choose another --out, or fix the permissions.")


def _check_args(args: argparse.Namespace) -> None:
    from PIL import Image

    from ..vision.deep import VGG16_MIN_SIZE

    if args.size < VGG16_MIN_SIZE:
        raise ValueError(f"--size must be at least {VGG16_MIN_SIZE} (VGG-16's minimum). Got {args.size}.")
    limit = Image.MAX_IMAGE_PIXELS
    if limit and args.size * args.size > limit:
        raise ValueError(f"--size {args.size} gives images of at least {args.size}x{args.size} pixels, more than "
                         f"PIL.Image.MAX_IMAGE_PIXELS ({limit}). Use a smaller --size (224 is VGG-16's native size).")
    if args.clusters < 2:
        raise ValueError(f"--clusters must be at least 2. Got {args.clusters}.")
    if args.gamma != "auto" and not (math.isfinite(args.gamma) and args.gamma > 0):
        raise ValueError(f"--gamma must be a finite number > 0, or 'auto'. Got {args.gamma}.")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0. Got {args.seed}.")
    if args.value_range is not None:
        low, high = args.value_range
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"--value-range LOW HIGH must be finite with LOW < HIGH. Got {low:g} {high:g}.")
    if args.max_locations is not None and args.max_locations < 1:
        raise ValueError(f"--max-locations must be at least 1. Got {args.max_locations}.")
    if args.max_locations is not None and args.fit is None:
        raise ValueError("--max-locations only applies with --fit DIR.")
    if args.fit_pattern is not None and args.fit is None:
        raise ValueError("--fit-pattern only applies with --fit DIR.")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here. Use --device cpu.")
    if args.fit is not None and not args.fit.is_dir():
        raise FileNotFoundError(f"--fit: no such folder: {args.fit}")
    _check_out(args.out)


def _fit_files(folder: Path, pattern: str | None, option: str = "--fit", *, recursive: bool = False) -> list[Path]:
    """The image files of ``folder`` matching ``pattern`` (default: all, recursing only with ``recursive``), sorted.
    The one listing of fit folders of every command (``explain``, ``detect``, ``explain-dataset``)."""
    from ..vision import image_files

    try:
        return image_files(folder, pattern, recursive=recursive)
    except NotADirectoryError:
        raise FileNotFoundError(f"{option}: no such folder: {folder}") from None
    except ValueError as exc:
        message = str(exc).removeprefix("image_files: ")
        if pattern is not None:
            message = message.replace(f"matching {pattern!r}", f"matching --fit-pattern {pattern!r}")
            message = message.replace(f"{pattern!r} is not a usable pattern", f"--fit-pattern {pattern!r} is not a "
                                                                              f"usable pattern")
        raise ValueError(f"{option}: {message}") from None


class _FitImages:
    """The images of a fit folder, read one at a time (a sized iterable, for a progress bar): the one reader of the
    fit images of every command.

    Each file is read with ``load`` (a file that cannot be read is an error naming it); constant images (every pixel
    the same value, e.g. the all-black masks of defect-free samples) carry no information and are skipped with a
    warning (listed in :attr:`skipped`); a folder of nothing but constant images is refused. Yields
    ``transform(image)``; :attr:`used` lists the files yielded.
    """

    def __init__(self, files: list[Path], load, transform, *, option: str, folder: Path, warn):
        self.files, self.load, self.transform = files, load, transform
        self.option, self.folder, self.warn = option, folder, warn
        self.skipped: list[str] = []
        self.used: list[Path] = []

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self):
        from ..vision import ConstantImageError, check_not_constant

        self.skipped, self.used = [], []
        for path in self.files:
            image = self.load(path)
            try:
                check_not_constant(image, str(path))
            except ConstantImageError as exc:
                self.skipped.append(str(path))
                self.warn(f"{self.option}: skipping {exc} Use --fit-pattern to select the photos.")
                continue
            self.used.append(path)
            yield self.transform(image)
        if not self.used:
            raise ValueError(f"{self.option}: all {len(self.files)} images in {self.folder} are constant (e.g. "
                             f"masks); nothing to fit on. Use --fit-pattern to select the photos.")


def _unique_stems(paths: list[Path]) -> list[str]:
    stems: list[str] = []
    seen: set[str] = set()
    for index, path in enumerate(paths):
        stem, suffix = path.stem, index
        while stem in seen:
            stem = f"{path.stem}_{suffix}"
            suffix += 1
        seen.add(stem)
        stems.append(stem)
    return stems


def _json_safe(value: Any) -> tuple[Any, int]:
    """``value`` with every NaN / ±inf float replaced by None (JSON ``null``), and how many were replaced."""
    if isinstance(value, float):
        return (value, 0) if math.isfinite(value) else (None, 1)
    if isinstance(value, dict):
        items = [(k, *_json_safe(v)) for k, v in value.items()]
        return {k: v for k, v, _ in items}, sum(n for _, _, n in items)
    if isinstance(value, (list, tuple)):
        items = [_json_safe(v) for v in value]
        return [v for v, _ in items], sum(n for _, n in items)
    return value, 0


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def run_explain(args: argparse.Namespace) -> int:
    """Run ``neon-attrib explain`` (see ``neon-attrib explain --help``). Returns the exit code (0).

    Every argument, the output folder and every explained image are checked before any work is done; nothing is
    written before the heads are fitted.
    """
    from tqdm.auto import tqdm

    from ..vision import load_image
    from ..vision.deep import DeepNeon, get_preprocessing, median_gamma, vgg16_features
    from ..viz import heatmap_grid, save_heatmap

    _check_args(args)
    heads = list(dict.fromkeys(args.head or ["kde-outlier"]))
    preprocessing = get_preprocessing(args.preprocessing)
    paths = [Path(p) for p in args.images]
    # every image is read and checked before any work is done
    images = [load_image(p, args.size, value_range=args.value_range) for p in paths]
    fit_images = None
    if args.fit is not None:
        fit_images = _FitImages(_fit_files(args.fit, args.fit_pattern),
                                lambda path: load_image(path, args.size, value_range=args.value_range),
                                lambda image: preprocessing(image).unsqueeze(0).to(args.device),
                                option="--fit", folder=args.fit, warn=_warn)

    if args.weights is None:
        print(_RANDOM_WEIGHTS_WARNING, file=sys.stderr)
        torch.manual_seed(args.seed)
    features = vgg16_features(args.weights).to(args.device)

    def gamma_for(rows: torch.Tensor) -> float:
        return median_gamma(rows, seed=args.seed) if args.gamma == "auto" else float(args.gamma)

    def build(kind: str, gamma: float) -> DeepNeon:
        pool = args.pool if args.pool != "auto" else ("positive" if kind == "kmeans" else "sum")
        return DeepNeon(features, _make_head(kind, args, gamma), pool=pool, preprocessing=preprocessing,
                        composite=args.composite, fast=args.fast and _fast_available()).to(args.device)

    models: dict[str, DeepNeon] = {}
    fit_gamma = None
    if fit_images is not None:
        rows = build(heads[0], 1.0).feature_rows(fit_images, max_locations=args.max_locations, seed=args.seed,
                                                 progress=not args.quiet)
        if args.gamma == "auto" and rows.shape[0] >= 2 and bool((rows == rows[0]).all()):
            raise ValueError(f"--fit: all {rows.shape[0]} block-5 locations of the images in {args.fit} are "
                             f"identical, so --gamma auto has no scale. Fit on varied images or give --gamma G.")
        fit_gamma = gamma_for(rows)
        for kind in heads:
            models[kind] = build(kind, fit_gamma).fit_head(rows)

    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "settings": {
            "heads": heads, "fit": str(args.fit) if args.fit is not None else "self",
            "fit_pattern": args.fit_pattern,
            "fit_skipped": fit_images.skipped if fit_images is not None else [],
            "weights": args.weights, "random_weights": args.weights is None,
            "preprocessing": preprocessing.name, "gamma": args.gamma, "clusters": args.clusters,
            "explain_clusters": args.explain_clusters, "size": args.size,
            "value_range": list(args.value_range) if args.value_range is not None else None,
            "pool": args.pool, "composite": args.composite, "fast": args.fast, "seed": args.seed,
            "save_raw": args.save_raw,
        },
        "images": {},
    }
    written: list[Path] = []
    with contextlib.ExitStack() as stack:
        shared = {kind: stack.enter_context(model.explainer()) for kind, model in models.items()}
        bar = stack.enter_context(tqdm(list(zip(paths, _unique_stems(paths), images)), desc=_PROG, unit="image",
                                       file=sys.stderr, disable=args.quiet))
        for path, stem, image in bar:
            bar.set_postfix_str(path.name, refresh=False)
            entry, panels, raw = _explain_image(args, heads, path, image, preprocessing, features, models, shared,
                                                fit_gamma, build, gamma_for)
            for name, relevance in raw.items():
                if not bool(torch.isfinite(relevance).all()):
                    bad = int((~torch.isfinite(relevance)).sum())
                    _warn(f"{path}: the {name} relevance has {bad} non-finite value(s); no heatmap written for it.")
                    panels.pop(name, None)
                    continue
                written.append(save_heatmap(relevance, args.out / f"{stem}_{name}.png"))
            if args.save_raw == "npy":
                for name, relevance in raw.items():
                    target = args.out / f"{stem}_{name}.npy"
                    np.save(target, relevance.detach().cpu().float().numpy())
                    written.append(target)
            elif args.save_raw == "npz":
                target = args.out / f"{stem}_relevance.npz"
                np.savez_compressed(target, **{name: r.detach().cpu().float().numpy() for name, r in raw.items()})
                written.append(target)
            grid = args.out / f"{stem}_grid.png"
            titled = {title: relevance for title, relevance in panels.values()}
            heatmap_grid(image, titled, path=grid, use_overlay=True, ncols=min(len(titled) + 1, 6),
                         suptitle=f"{path.name}" + (" (RANDOM WEIGHTS)" if args.weights is None else ""))
            written.append(grid)
            report["images"][stem] = entry
    safe, n_null = _json_safe(report)
    scores = args.out / "scores.json"
    scores.write_text(json.dumps(safe, indent=2, allow_nan=False))
    written.append(scores)
    if n_null:
        _warn(f"{n_null} non-finite value(s) (NaN or inf scores) were written as null in {scores}.")
    print(f"Wrote {len(written)} files to {args.out}")
    for stem, entry in report["images"].items():
        parts = []
        for kind in heads:
            value = entry[kind]
            parts.append(f"{kind}={_fmt(value['score'])}" if "score" in value else
                         f"{kind}: cluster {value['explained_cluster']}")
        print(f"  {stem}: " + ", ".join(parts))
    return 0


def _explain_image(args, heads, path, image, preprocessing, features, models, shared, fit_gamma, build, gamma_for):
    """Scores and relevance of one image: (scores.json entry, panels name -> (title, relevance), raw name ->
    relevance (3, H, W))."""
    from ..vision.deep import DeepNeon

    x = preprocessing(image).unsqueeze(0).to(args.device)
    entry: dict[str, Any] = {"file": str(path), "size": list(image.shape[-2:])}
    panels: dict[str, tuple[str, torch.Tensor]] = {}
    raw: dict[str, torch.Tensor] = {}
    n_locations = (x.shape[-2] // 32) * (x.shape[-1] // 32)
    if not models and "kmeans" in heads and n_locations < args.clusters:
        raise ValueError(f"{path} has {n_locations} block-5 locations at {x.shape[-2]}x{x.shape[-1]} pixels, "
                         f"fewer than --clusters {args.clusters}: use a larger --size or fewer clusters.")
    if not models:
        with torch.no_grad():
            own_rows = DeepNeon._rows(features(x))
        if own_rows.shape[0] < 2:
            raise ValueError(f"{path} has a single block-5 location at {x.shape[-2]}x{x.shape[-1]} pixels: "
                             f"--fit-self needs at least 2. Use a larger --size (>= 64).")
        if args.gamma == "auto" and bool((own_rows == own_rows[0]).all()):
            raise ValueError(f"{path}: all {own_rows.shape[0]} block-5 locations are identical (a constant image?), "
                             f"so --fit-self --gamma auto has no scale. Give --gamma G or --fit DIR.")
        entry["gamma"] = gamma_for(own_rows)
    else:
        entry["gamma"] = fit_gamma
    for kind in heads:
        with contextlib.ExitStack() as stack:
            if kind in shared:
                model, explainer = models[kind], shared[kind]
            else:
                model = build(kind, entry["gamma"]).fit_self(x)
                explainer = stack.enter_context(model.explainer())
            output, relevance = explainer(x)
            score = output[0]
            with torch.no_grad():
                locations = model.location_scores(x)[0]
            if kind == "kmeans":
                assigned = int(score.argmax())
                entry[kind] = {"scores": score.tolist(), "explained_cluster": assigned,
                               "location_clusters": locations.argmax(0).tolist(), "pool": model.pool.mode}
                clusters = range(score.shape[0]) if args.explain_clusters == "all" else [assigned]
                for cluster in clusters:  # the first pass explained the assigned cluster (the default target)
                    cluster_relevance = relevance if cluster == assigned else explainer(x, _one_cluster(cluster))[1]
                    name = f"{kind}_c{cluster}"
                    raw[name] = cluster_relevance[0]
                    panels[name] = (f"{kind} c{cluster}: {score[cluster].item():.3g}", cluster_relevance[0])
                entry[kind]["explained_clusters"] = list(clusters)
            else:
                entry[kind] = {"score": float(score), "location_scores": locations.tolist(),
                               "relevance_sum": float(relevance.sum()), "pool": model.pool.mode}
                raw[kind] = relevance[0]
                panels[kind] = (f"{kind}: {float(score):.3g}", relevance[0])
    return entry, panels, raw


def _one_cluster(cluster: int):
    """The relevance put on a k-means output to explain ``cluster``: its score, zero elsewhere."""
    def attr_output(output: torch.Tensor) -> torch.Tensor:
        seed = torch.zeros_like(output)
        seed[:, cluster] = output[:, cluster]
        return seed

    return attr_output
