"""``neon-attrib explain-dataset``: a folder of images explained into a zarr store, on one process or under torchrun.

Registered by :func:`neon_attrib.cli.build_parser` through :func:`register_explain_dataset`. The head (on VGG-16
block 5) is fitted on a seeded sample of block-5 locations (:func:`~neon_attrib.scale.fit_dataset`), of the explained
images themselves or of ``--fit DIR``, then every image is explained (:func:`~neon_attrib.scale.explain_dataset`).
Run the same command again to resume; the fit is repeated (it is deterministic), finished blocks are skipped.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from ..models import KDEInlier, KDEOutlier, KMeansMembership
from ..scale import ImageFiles, explain_dataset, fit_dataset, local_device, process_group_from_env, sample_locations
from ..vision import PREPROCESSINGS, VGG16_MIN_SIZE, get_preprocessing, vgg16_features
from ..vision.deep import DeepNeon, median_gamma
from .explain import _fit_files

__all__ = ["register_explain_dataset", "run_explain_dataset"]

HEADS = ("kde-outlier", "kde-inlier", "kmeans")
_PROG = "neon-attrib explain-dataset"


def register_explain_dataset(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``explain-dataset`` command to the ``neon-attrib`` sub-parsers. Returns its parser."""
    parser = subparsers.add_parser(
        "explain-dataset",
        help="explain every image of a folder into a resumable zarr store (one process or torchrun)",
        description="Fit a NEON head on VGG-16 block-5 locations and write the pixel relevance of every image in "
                    "IMAGES_DIR (recursively) to a chunked zarr store, with a scores table (STORE/scores.csv). "
                    "Resumes an interrupted run with the same settings; under 'torchrun --nproc-per-node N' the "
                    "images are split over the N processes (NCCL on GPUs, gloo on CPUs). Read the results with "
                    "neon_attrib.open_results(STORE).",
    )
    parser.add_argument("images", type=Path, metavar="IMAGES_DIR", help="folder of images (searched recursively)")
    parser.add_argument("--out", type=Path, required=True, metavar="STORE", help="the zarr store (a folder)")
    parser.add_argument("--head", choices=HEADS, default="kde-outlier", help="default: %(default)s")
    parser.add_argument("--fit", type=Path, default=None, metavar="DIR",
                        help="fit the head on the images in DIR (searched recursively; default: on IMAGES_DIR "
                             "itself); constant images (e.g. all-black masks) are left out of the fit with a warning, "
                             "a folder of only constant images is refused")
    parser.add_argument("--fit-pattern", metavar="GLOB", default=None,
                        help="fit only on the files of the fit folder matching GLOB, relative to it (e.g. '**/*.jpg' "
                             "to leave out PNG masks next to JPEG photos; default: every image file, recursively)")
    parser.add_argument("--max-locations", type=int, default=10000, metavar="N",
                        help="fit on a seeded uniform sample of N block-5 locations (default: %(default)s)")
    parser.add_argument("--lloyd-steps", type=int, default=0, metavar="S",
                        help="k-means: S Lloyd iterations over all locations after k-means on the sample")
    parser.add_argument("--weights", default=None, metavar="PATH",
                        help="VGG-16 conv-base state_dict; without it: random weights (seeded) and a warning")
    parser.add_argument("--preprocessing", choices=sorted(PREPROCESSINGS), default="torchvision",
                        help="input normalisation the weights expect (default: %(default)s)")
    parser.add_argument("--size", type=int, default=224, metavar="S",
                        help="resize the shorter side to S and crop the centre S x S square (default: %(default)s)")
    parser.add_argument("--value-range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help="raw pixel values meaning black and white (16-bit or float images)")
    parser.add_argument("--gamma", default="auto", metavar="G",
                        help="KDE sharpness, or 'auto' = 1 / median squared distance of the sample (default)")
    parser.add_argument("--clusters", type=int, default=5, metavar="K", help="k-means clusters (default: %(default)s)")
    parser.add_argument("--pool", choices=("auto", "sum", "mean", "positive", "max"), default="auto",
                        help="location pooling; auto = sum for KDE, positive for k-means")
    parser.add_argument("--composite", choices=("epsilon_gamma_box", "epsilon_plus_flat"),
                        default="epsilon_gamma_box", help="LRP rules for VGG-16 (default: %(default)s)")
    parser.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                        help="neon_attrib.vision.fast's exact fast rules (default) or Zennit's (--no-fast)")
    parser.add_argument("--batch-size", type=int, default=16, metavar="B",
                        help="images per batch and per store block (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, metavar="W",
                        help="image-loading processes per rank (default: %(default)s)")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                        help="storage dtype of the relevance (default: %(default)s)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda:LOCAL_RANK when CUDA is available, else cpu (default)")
    parser.add_argument("--no-resume", action="store_true", help="refuse an existing store instead of resuming it")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing store and start over")
    parser.add_argument("--seed", type=int, default=0, help="seed of random weights, the sample, k-means, features")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run_explain_dataset)
    return parser


def _check_args(args: argparse.Namespace) -> None:
    if not args.images.is_dir():
        raise FileNotFoundError(f"IMAGES_DIR: no such folder: {args.images}")
    if args.fit is not None and not args.fit.is_dir():
        raise FileNotFoundError(f"--fit: no such folder: {args.fit}")
    checks = [(args.size >= VGG16_MIN_SIZE, f"--size must be at least {VGG16_MIN_SIZE}. Got {args.size}."),
              (args.batch_size >= 1, f"--batch-size must be at least 1. Got {args.batch_size}."),
              (args.workers >= 0, f"--workers must be >= 0. Got {args.workers}."),
              (args.max_locations >= 1, f"--max-locations must be at least 1. Got {args.max_locations}."),
              (args.lloyd_steps >= 0, f"--lloyd-steps must be >= 0. Got {args.lloyd_steps}."),
              (args.clusters >= 2, f"--clusters must be at least 2. Got {args.clusters}."),
              (args.seed >= 0, f"--seed must be >= 0. Got {args.seed}."),
              (not (args.lloyd_steps and args.head != "kmeans"), "--lloyd-steps applies to --head kmeans only."),
              (not (args.device == "cuda" and not torch.cuda.is_available()),
               "--device cuda: no CUDA device is available here.")]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    if args.gamma != "auto":
        try:
            gamma = float(args.gamma)
        except ValueError:
            raise ValueError(f"--gamma must be a number or 'auto'. Got {args.gamma!r}.") from None
        if not (math.isfinite(gamma) and gamma > 0):
            raise ValueError(f"--gamma must be a finite number > 0, or 'auto'. Got {args.gamma}.")
    if args.value_range is not None:
        low, high = args.value_range
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"--value-range LOW HIGH must be finite with LOW < HIGH. Got {low:g} {high:g}.")


def _head(kind: str, gamma: float, args: argparse.Namespace) -> torch.nn.Module:
    if kind == "kde-outlier":
        return KDEOutlier(gamma=gamma)
    if kind == "kde-inlier":
        return KDEInlier(gamma=gamma, n_features=2500, random_state=args.seed)
    return KMeansMembership(n_clusters=args.clusters, n_init=10, random_state=args.seed, centroid_norm=1.0)


def run_explain_dataset(args: argparse.Namespace) -> int:
    """Run ``neon-attrib explain-dataset`` (see ``--help``). Returns the exit code (0)."""
    _check_args(args)
    with process_group_from_env() as ranks:
        device = local_device() if args.device == "auto" else torch.device(
            "cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
        main = ranks.is_main
        if args.weights is None:
            if main:
                print(f"{_PROG}: warning: no --weights given: VGG-16 has RANDOM weights (seed {args.seed}); the "
                      f"heatmaps show the pipeline working, not what a trained network sees.", file=sys.stderr)
            torch.manual_seed(args.seed)
        features = vgg16_features(args.weights).to(device)
        preprocessing = get_preprocessing(args.preprocessing)
        options = {"size": args.size, "preprocessing": preprocessing, "value_range": args.value_range}
        data = ImageFiles(args.images, **options)
        # the fit images as every command reads them: --fit-pattern, constant images (masks) left out
        fit_folder = args.images if args.fit is None else args.fit
        _fit_files(fit_folder, args.fit_pattern, "--fit" if args.fit is not None else "IMAGES_DIR",
                   recursive=True)  # the CLI's error (naming the option) if nothing matches, before any work
        fit_data = ImageFiles(fit_folder, pattern=args.fit_pattern, skip_constant=True, **options)
        pool = args.pool if args.pool != "auto" else ("positive" if args.head == "kmeans" else "sum")
        model = DeepNeon(features, _head(args.head, 1.0, args), pool=pool, preprocessing=preprocessing,
                         composite=args.composite, fast=args.fast).to(device)
        common = {"batch_size": args.batch_size, "num_workers": args.workers, "progress": not args.quiet}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            rows = sample_locations(model, fit_data, max_locations=args.max_locations, seed=args.seed, **common)
        for warning in caught:
            if main:
                print(f"{_PROG}: warning: fitting: {warning.message}", file=sys.stderr)
        if args.head != "kmeans":
            gamma = median_gamma(rows, seed=args.seed) if args.gamma == "auto" else float(args.gamma)
            model.head = _head(args.head, gamma, args)
        fit_dataset(model, fit_data, rows=rows, lloyd_steps=args.lloyd_steps, **common)
        settings = {"fit": "images" if args.fit is None else str(args.fit.resolve()), "fit_pattern": args.fit_pattern,
                    "gamma": args.gamma, "max_locations": args.max_locations, "seed": args.seed,
                    "weights": args.weights}
        results = explain_dataset(model, data, args.out, dtype=args.dtype, resume=not args.no_resume,
                                  overwrite=args.overwrite, settings=settings, **common)
        if main:
            summary = results.summary
            print(f"Explained {summary.get('explained', 0)} of {summary.get('n', len(results))} images into "
                  f"{args.out} ({summary.get('failed', 0)} failed; table: {args.out / 'scores.csv'}).")
            for row in results.top(5, largest=args.head != "kde-inlier"):
                print(f"  {row['id']}: score {float(row['score']):.4g}")
            for failure in results.failures()[:5]:
                print(f"  failed: {failure['id']}: {failure['error']}", file=sys.stderr)
    return 0
