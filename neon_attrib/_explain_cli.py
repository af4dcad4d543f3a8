"""``neon-attrib explain``: pixel heatmaps of NEON heads on VGG-16 block 5, one PNG per image and head / cluster.

Registered by :func:`neon_attrib.cli.build_parser` through :func:`register_explain`. Errors a user can fix (missing
weights, unreadable or too small images, bad settings) are raised as ``ValueError`` / ``FileNotFoundError``, which
``neon_attrib.cli.main`` turns into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

HEADS = ("kde-outlier", "kde-inlier", "kmeans")

_RANDOM_WEIGHTS_WARNING = """\
################################################################################################################
WARNING: no --weights given: VGG-16 has RANDOM weights. The scores and heatmaps below show the pipeline working,
         NOT what a trained network sees. Pass --weights PATH (a VGG-16 conv-base state_dict, e.g.
         shared/data/vgg16_imagenet_features/vgg16_features_keras_imagenet.pth with --preprocessing caffe).
################################################################################################################"""


def register_explain(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``explain`` command to the ``neon-attrib`` sub-parsers. Returns its parser."""
    from .deep import PREPROCESSINGS

    parser = subparsers.add_parser(
        "explain",
        help="pixel heatmaps of a KDE / k-means head on VGG-16 block 5 (the book's Figures 7 and 8)",
        description="Explain KDE outlierness / inlierness or k-means cluster membership of VGG-16 block-5 locations "
                    "in pixels (NEON + LRP). Writes one heatmap PNG per image and head (per cluster for k-means), "
                    "a grid PNG per image, and scores.json.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files to explain (PNG, JPEG, ...)")
    parser.add_argument("--head", action="append", choices=HEADS, default=None,
                        help="head to explain; repeat for several (default: kde-outlier)")
    fit = parser.add_mutually_exclusive_group()
    fit.add_argument("--fit", metavar="DIR", type=Path, default=None,
                     help="fit the heads on the block-5 locations of the images in DIR (e.g. defect-free samples)")
    fit.add_argument("--fit-self", action="store_true",
                     help="fit on the locations of each explained image itself, each location left out of its own "
                          "KDE (the book's wood example; the default when --fit is not given)")
    parser.add_argument("--weights", metavar="PATH", default=None,
                        help="VGG-16 conv-base state_dict (torch.save); without it: random weights and a warning")
    parser.add_argument("--preprocessing", choices=sorted(PREPROCESSINGS), default="torchvision",
                        help="input normalisation the weights expect (default: %(default)s; 'caffe' for the Keras "
                             "ImageNet weights in shared/data)")
    parser.add_argument("--clusters", type=int, default=5, metavar="K", help="k-means clusters (default: %(default)s)")
    parser.add_argument("--gamma", type=_gamma_arg, default="auto", metavar="G",
                        help="KDE kernel sharpness γ of exp(-γ‖a-u‖²), or 'auto' = 1 / median squared distance "
                             "between the fit locations (default: %(default)s; the book used 0.05 on its features)")
    parser.add_argument("--size", type=int, default=224, metavar="S",
                        help="resize each image so that its shorter side is S pixels (default: %(default)s)")
    parser.add_argument("--pool", choices=("auto", "sum", "mean", "positive", "max"), default="auto",
                        help="location pooling; auto = sum for KDE, positive for k-means (default: %(default)s)")
    parser.add_argument("--composite", choices=("epsilon_gamma_box", "epsilon_plus_flat"),
                        default="epsilon_gamma_box", help="LRP rules for VGG-16 (default: %(default)s)")
    parser.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                        help="LRP through VGG-16 with neon_attrib.fast's exact fast rules (default); --no-fast uses "
                             "Zennit's reference implementation (same numbers, slower)")
    parser.add_argument("--max-locations", type=int, default=None, metavar="N",
                        help="with --fit: fit on a seeded random sample of N locations")
    parser.add_argument("--seed", type=int, default=0, help="seed of random weights, k-means and random features")
    parser.add_argument("--out", type=Path, default=Path("neon_explain"), metavar="DIR",
                        help="output folder (default: %(default)s)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default: %(default)s")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run_explain)
    return parser


def _gamma_arg(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a float or 'auto', got {text!r}") from None


def _make_head(kind: str, args: argparse.Namespace, gamma: float):
    from .models import KDEInlier, KDEOutlier, KMeansMembership

    if kind == "kde-outlier":
        return KDEOutlier(gamma=gamma)
    if kind == "kde-inlier":
        return KDEInlier(gamma=gamma, n_features=2500, seed=args.seed)
    return KMeansMembership(n_clusters=args.clusters, n_init=10, seed=args.seed, centroid_norm=1.0)


def _fast_available() -> bool:
    try:
        from . import fast  # noqa: F401
    except ImportError:  # pragma: no cover - the fast rules ship with the package
        return False
    return True


def _check_args(args: argparse.Namespace) -> None:
    from .deep import VGG16_MIN_SIZE

    if args.size < VGG16_MIN_SIZE:
        raise ValueError(f"--size must be at least {VGG16_MIN_SIZE} (VGG-16's minimum). Got {args.size}.")
    if args.clusters < 2:
        raise ValueError(f"--clusters must be at least 2. Got {args.clusters}.")
    if args.gamma != "auto" and not args.gamma > 0:
        raise ValueError(f"--gamma must be > 0 or 'auto'. Got {args.gamma}.")
    if args.max_locations is not None and args.max_locations < 1:
        raise ValueError(f"--max-locations must be at least 1. Got {args.max_locations}.")
    if args.max_locations is not None and args.fit is None:
        raise ValueError("--max-locations only applies with --fit DIR.")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here. Use --device cpu.")
    if args.fit is not None and not args.fit.is_dir():
        raise FileNotFoundError(f"--fit: no such folder: {args.fit}")


class _FitImages:
    """The images of a folder as batches of one, loaded lazily (a sized iterable for the progress bar)."""

    def __init__(self, folder: Path, size: int, preprocess, device: str):
        from .deep import _IMAGE_SUFFIXES

        self.files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        if not self.files:
            raise ValueError(f"--fit: no image files ({', '.join(_IMAGE_SUFFIXES)}) in {folder}.")
        self.size, self.preprocess, self.device = size, preprocess, device

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self):
        from .deep import load_image

        for path in self.files:
            yield self.preprocess(load_image(path, self.size)).unsqueeze(0).to(self.device)


def _unique_stems(paths: list[Path]) -> list[str]:
    stems, seen = [], set()
    for index, path in enumerate(paths):
        stem = path.stem if path.stem not in seen else f"{path.stem}_{index}"
        seen.add(stem)
        stems.append(stem)
    return stems


def run_explain(args: argparse.Namespace) -> int:
    """Run ``neon-attrib explain`` (see ``neon-attrib explain --help``). Returns the exit code (0)."""
    from .attribution import explain
    from .deep import DeepNeon, get_preprocessing, load_image, median_gamma, vgg16_features
    from .viz import heatmap_grid, save_heatmap

    _check_args(args)
    heads = list(dict.fromkeys(args.head or ["kde-outlier"]))
    preprocessing = get_preprocessing(args.preprocessing)
    paths = [Path(p) for p in args.images]
    images = [load_image(p, args.size) for p in paths]  # every image is checked before any work is done
    fit_batches = _FitImages(args.fit, args.size, preprocessing, args.device) if args.fit is not None else None

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
    if fit_batches is not None:
        rows = build(heads[0], 1.0).feature_rows(fit_batches, max_locations=args.max_locations, seed=args.seed,
                                                 progress=not args.quiet)
        fit_gamma = gamma_for(rows)
        for kind in heads:
            models[kind] = build(kind, fit_gamma).fit_head(rows)

    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "settings": {
            "heads": heads, "fit": str(args.fit) if args.fit is not None else "self",
            "weights": args.weights, "random_weights": args.weights is None,
            "preprocessing": preprocessing.name, "gamma": args.gamma, "clusters": args.clusters,
            "size": args.size, "pool": args.pool, "composite": args.composite, "fast": args.fast, "seed": args.seed,
        },
        "images": {},
    }
    written: list[Path] = []
    for path, stem, image in zip(paths, _unique_stems(paths), images):
        x = preprocessing(image).unsqueeze(0).to(args.device)
        entry: dict[str, Any] = {"file": str(path), "size": list(image.shape[-2:])}
        panels: dict[str, torch.Tensor] = {}
        n_locations = (x.shape[-2] // 32) * (x.shape[-1] // 32)
        if fit_batches is None and "kmeans" in heads and n_locations < args.clusters:
            raise ValueError(f"{path} has {n_locations} block-5 locations at {x.shape[-2]}x{x.shape[-1]} pixels, "
                             f"fewer than --clusters {args.clusters}: use a larger --size or fewer clusters.")
        if fit_batches is None:
            with torch.no_grad():
                own_rows = DeepNeon._rows(features(x))
            if own_rows.shape[0] < 2:
                raise ValueError(f"{path} has a single block-5 location at {x.shape[-2]}x{x.shape[-1]} pixels: "
                                 f"--fit-self needs at least 2. Use a larger --size (>= 64).")
            entry["gamma"] = gamma_for(own_rows)
        else:
            entry["gamma"] = fit_gamma
        for kind in heads:
            model = models.get(kind) or build(kind, entry["gamma"]).fit_self(x)
            with torch.no_grad():
                score = model(x)[0]
                locations = model.location_scores(x)[0]
            if kind == "kmeans":
                assigned = locations.argmax(0)
                entry[kind] = {"scores": score.tolist(), "explained_cluster": int(score.argmax()),
                               "location_clusters": assigned.tolist(), "pool": model.pool.mode}
                for cluster in range(score.shape[0]):
                    relevance = explain(model, x, target=cluster)[0]
                    name = f"{kind} c{cluster}"
                    panels[f"{name}: {score[cluster].item():.3g}"] = relevance
                    written.append(save_heatmap(relevance, args.out / f"{stem}_{kind}_c{cluster}.png"))
            else:
                relevance = explain(model, x)[0]
                entry[kind] = {"score": float(score), "location_scores": locations.tolist(),
                               "relevance_sum": float(relevance.sum()), "pool": model.pool.mode}
                panels[f"{kind}: {float(score):.3g}"] = relevance
                written.append(save_heatmap(relevance, args.out / f"{stem}_{kind}.png"))
        grid = args.out / f"{stem}_grid.png"
        heatmap_grid(image, panels, path=grid, use_overlay=True, ncols=min(len(panels) + 1, 6),
                     suptitle=f"{path.name}" + (" (RANDOM WEIGHTS)" if args.weights is None else ""))
        written.append(grid)
        report["images"][stem] = entry
    scores = args.out / "scores.json"
    scores.write_text(json.dumps(report, indent=2))
    written.append(scores)
    print(f"Wrote {len(written)} files to {args.out}")
    for stem, entry in report["images"].items():
        parts = []
        for kind in heads:
            value = entry[kind]
            parts.append(f"{kind}={value['score']:.4g}" if "score" in value else
                         f"{kind}: cluster {value['explained_cluster']}")
        print(f"  {stem}: " + ", ".join(parts))
    return 0
