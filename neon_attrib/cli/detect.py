"""``neon-attrib detect``: PatchCore or PaDiM fitted on a folder of normal images, then per image the score, the
verdict, the anomaly map and the NEON heatmap of the score.

Registered by :func:`neon_attrib.cli.build_parser` through :func:`register_detect`. Errors a user can fix (missing
weights, unreadable images, images of different sizes with ``--no-resize``, an unusable ``--out``, bad settings) are
raised as ``ValueError`` / ``FileNotFoundError`` before the detector is fitted where they can be, and
``neon_attrib.cli.main`` turns them into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .explain import _check_out, _fit_files, _FitImages, _json_safe, _unique_stems

__all__ = ["register_detect", "run_detect"]

DETECTORS = ("patchcore", "padim")
TARGETS = ("max", "sum", "excess")
_PROG = "neon-attrib detect"

_RANDOM_WEIGHTS_WARNING = """\
################################################################################################################
WARNING: no --weights given: the backbone has RANDOM weights. Scores, maps and heatmaps show the pipeline working,
         NOT what a trained network sees. Pass --weights PATH (e.g. the Keras VGG-16 conv base with
         --preprocessing caffe).
################################################################################################################"""


def register_detect(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``detect`` command to the ``neon-attrib`` sub-parsers. Returns its parser."""
    from ..vision import BACKBONES, PREPROCESSINGS

    parser = subparsers.add_parser(
        "detect",
        help="anomaly detection with PatchCore / PaDiM: score, verdict, anomaly map and NEON heatmap per image",
        description="Fit PatchCore or PaDiM on the normal images in --fit DIR, calibrate a threshold on held-out "
                    "normal images, then write per image a PNG with the image, the anomaly map and the NEON heatmap "
                    "of the explained score side by side, optionally the raw arrays (--save-raw), and scores.json "
                    "(score, normalised score, verdict).",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files to check and explain")
    parser.add_argument("--detector", choices=DETECTORS, default="patchcore", help="default: %(default)s")
    parser.add_argument("--fit", metavar="DIR", type=Path, required=True,
                        help="folder of normal (defect-free) images to fit on; constant images (e.g. all-black masks) "
                             "are skipped with a warning, a folder of only constant images is refused")
    parser.add_argument("--fit-pattern", metavar="GLOB", default=None,
                        help="only the files of DIR (and of --calibrate DIR) matching GLOB (e.g. '*.jpg' to leave out "
                             "PNG masks; '**/*.png' recurses; default: every image file in DIR, not recursing)")
    parser.add_argument("--calibrate", metavar="DIR", type=Path, default=None,
                        help="folder of held-out normal images for the threshold and the normal level τ (default: "
                             "--holdout of the --fit images, not used for fitting)")
    parser.add_argument("--holdout", type=float, default=0.2, metavar="F",
                        help="without --calibrate: share of the --fit images held out for calibration, evenly spaced "
                             "(default: %(default)s; 0: no calibration, no verdicts)")
    parser.add_argument("--percentile", type=float, default=99.0, metavar="P",
                        help="threshold = the P-th percentile of the calibration images' scores (default: %(default)s)")
    parser.add_argument("--backbone", choices=BACKBONES, default="vgg16", help="default: %(default)s")
    parser.add_argument("--weights", metavar="PATH", default=None,
                        help="backbone state_dict (torch.save); without it: random weights and a warning")
    parser.add_argument("--preprocessing", choices=sorted(PREPROCESSINGS), default="torchvision",
                        help="input normalisation the weights expect (default: %(default)s; 'caffe' for the Keras "
                             "VGG-16 weights)")
    parser.add_argument("--layers", nargs="+", default=None, metavar="NAME",
                        help="backbone modules to tap (default: layer2 layer3 for ResNets, layer1-3 for PaDiM on "
                             "ResNets, the ReLUs closing blocks 3 and 4 of VGG)")
    parser.add_argument("--size", type=int, default=224, metavar="S",
                        help="resize every image to S x S pixels (default: %(default)s)")
    parser.add_argument("--no-resize", action="store_true",
                        help="keep the files' sizes (they must all be equal)")
    parser.add_argument("--coreset-ratio", type=float, default=0.1, metavar="R",
                        help="PatchCore: share of the fit patches kept in the memory bank (default: %(default)s)")
    parser.add_argument("--n-channels", type=int, default=100, metavar="D",
                        help="PaDiM: random channel subset (default: %(default)s)")
    parser.add_argument("--reg", type=float, default=0.01, metavar="R",
                        help="PaDiM: added to every covariance's diagonal (default: %(default)s)")
    parser.add_argument("--relative-reg", action=argparse.BooleanOptionalAction, default=True,
                        help="PaDiM: add R times the mean feature variance, whatever the backbone's scale (default); "
                             "--no-relative-reg adds R itself, as the paper does for ResNet features")
    parser.add_argument("--target", choices=TARGETS, default="sum",
                        help="explained score: all patch scores (sum: the heatmap that localises defects best and "
                             "follows the image score best, see docs/anomaly.md), the image score (max), or their "
                             "excess over the normal level τ (excess; needs calibration) (default: %(default)s)")
    parser.add_argument("--save-raw", choices=("npy", "npz"), default=None,
                        help="also write the raw arrays: the anomaly map (H, W) and the relevance (C, H, W), float32")
    parser.add_argument("--batch-size", type=int, default=8, metavar="B", help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=0, help="seed of the coreset / channel subset and random weights")
    parser.add_argument("--out", type=Path, default=Path("neon_detect"), metavar="DIR",
                        help="output folder, created if missing (default: %(default)s)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default: %(default)s")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (they go to stderr)")
    parser.set_defaults(func=run_detect)
    return parser


def _warn(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(f"{_PROG}: warning: {message}", file=sys.stderr)


def _check_args(args: argparse.Namespace) -> None:
    if not args.no_resize and args.size < 32:
        raise ValueError(f"--size must be at least 32. Got {args.size}.")
    if not 0 < args.coreset_ratio <= 1:
        raise ValueError(f"--coreset-ratio must lie in (0, 1]. Got {args.coreset_ratio}.")
    if args.n_channels < 1:
        raise ValueError(f"--n-channels must be at least 1. Got {args.n_channels}.")
    if not (math.isfinite(args.reg) and args.reg > 0):
        raise ValueError(f"--reg must be a finite number > 0. Got {args.reg}.")
    if not 0 <= args.holdout < 1:
        raise ValueError(f"--holdout must lie in [0, 1). Got {args.holdout}.")
    if not (math.isfinite(args.percentile) and 0 <= args.percentile <= 100):
        raise ValueError(f"--percentile must lie in [0, 100]. Got {args.percentile}.")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1. Got {args.batch_size}.")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here. Use --device cpu.")
    if not args.fit.is_dir():
        raise FileNotFoundError(f"--fit: no such folder: {args.fit}")
    if args.calibrate is not None and not args.calibrate.is_dir():
        raise FileNotFoundError(f"--calibrate: no such folder: {args.calibrate}")
    if args.weights is not None and not Path(args.weights).is_file():
        raise FileNotFoundError(f"--weights: no such file: {args.weights}")
    _check_out(args.out)


def _load(path: Path, args: argparse.Namespace) -> torch.Tensor:
    """RGB image (3, H, W) in [0, 1], resized to --size x --size unless --no-resize."""
    from torchvision.transforms.functional import resize

    from ..vision import load_image

    image = load_image(path, min_size=1 if not args.no_resize else 32)
    if not args.no_resize:
        image = resize(image, [args.size, args.size], antialias=True).clamp(0.0, 1.0)
    return image


def _same_size(images: list[torch.Tensor], paths: list[Path], what: str) -> None:
    sizes = {tuple(image.shape[-2:]) for image in images}
    if len(sizes) > 1:
        first = tuple(images[0].shape[-2:])
        other = next(i for i, image in enumerate(images) if tuple(image.shape[-2:]) != first)
        raise ValueError(f"{what}: images of different sizes with --no-resize ({paths[0].name} is "
                         f"{first[0]}x{first[1]}, {paths[other].name} is {images[other].shape[-2]}x"
                         f"{images[other].shape[-1]}). Drop --no-resize to resize them all to --size x --size.")


def _build(args: argparse.Namespace, preprocessing: Any) -> Any:
    from ..anomaly import PaDiM, PatchCore
    from ..vision import backbone

    if args.weights is None:
        print(_RANDOM_WEIGHTS_WARNING, file=sys.stderr)
        torch.manual_seed(args.seed)
    network = backbone(args.backbone, args.weights)
    if args.detector == "patchcore":
        model = PatchCore(network, args.layers, coreset_ratio=args.coreset_ratio, seed=args.seed,
                          preprocessing=preprocessing, explain_target=args.target)
    else:
        model = PaDiM(network, args.layers, n_channels=args.n_channels, reg=args.reg, relative_reg=args.relative_reg,
                      seed=args.seed, preprocessing=preprocessing, explain_target=args.target)
    return model.to(args.device)


def run_detect(args: argparse.Namespace) -> int:
    """Run ``neon-attrib detect`` (see ``neon-attrib detect --help``). Returns the exit code (0)."""
    from tqdm.auto import tqdm

    from ..vision import get_preprocessing
    from ..viz import heatmap_grid

    _check_args(args)
    preprocessing = get_preprocessing(args.preprocessing)
    paths = [Path(p) for p in args.images]
    images = [_load(p, args) for p in paths]  # every explained image is read and checked before any work
    _same_size(images, paths, "IMAGE")
    skipped: list[str] = []

    def read(folder: Path, option: str) -> tuple[list[Path], list[torch.Tensor]]:
        """The non-constant images of a folder and their files (the reader every command's --fit uses)."""
        reader = _FitImages(_fit_files(folder, args.fit_pattern, option), lambda p: _load(p, args), lambda x: x,
                            option=option, folder=folder, warn=_warn)
        loaded = list(tqdm(reader, desc=f"{_PROG}: reading", unit="image", file=sys.stderr, disable=args.quiet))
        skipped.extend(reader.skipped)
        return reader.used, loaded

    fit_paths, fit_images = read(args.fit, "--fit")
    calibration_paths: list[Path] = []
    calibration_images: list[torch.Tensor] = []
    if args.calibrate is not None:
        calibration_paths, calibration_images = read(args.calibrate, "--calibrate")
    elif args.holdout > 0:
        count = int(round(args.holdout * len(fit_paths)))
        if count >= 2 and len(fit_paths) - count >= 2:
            held = {round(i * (len(fit_paths) - 1) / max(count - 1, 1)) for i in range(count)}
            calibration_paths = [p for i, p in enumerate(fit_paths) if i in held]
            calibration_images = [x for i, x in enumerate(fit_images) if i in held]
            fit_paths = [p for i, p in enumerate(fit_paths) if i not in held]
            fit_images = [x for i, x in enumerate(fit_images) if i not in held]
        else:
            _warn(f"--holdout {args.holdout} of {len(fit_paths)} fit images leaves fewer than 2 for calibration or "
                  f"fitting: no threshold, no verdicts. Give --calibrate DIR or more fit images.")
    if args.target == "excess" and not calibration_paths:
        raise ValueError("--target excess needs the normal level τ from calibration images: give --calibrate DIR or "
                         "a --holdout > 0 with enough --fit images.")
    _same_size(fit_images + images, fit_paths + paths, "--fit and IMAGE")
    device = torch.device(args.device)
    model = _build(args, preprocessing)
    fit_inputs = [preprocessing(image).to(device) for image in fit_images]
    model.fit(fit_inputs, batch_size=args.batch_size, progress=not args.quiet)
    if calibration_paths:
        calibration = [preprocessing(image).to(device) for image in calibration_images]
        _same_size(calibration + fit_inputs, calibration_paths + fit_paths, "--calibrate and --fit")
        model.calibrate(calibration, percentile=args.percentile, batch_size=args.batch_size)

    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "settings": {
            "detector": args.detector, "backbone": args.backbone, "layers": list(model.taps.layers),
            "weights": args.weights, "random_weights": args.weights is None, "preprocessing": preprocessing.name,
            "size": None if args.no_resize else args.size, "fit": str(args.fit), "fit_pattern": args.fit_pattern,
            "fit_skipped": skipped, "n_fit": len(fit_paths),
            "n_calibration": len(calibration_paths), "percentile": args.percentile, "target": args.target,
            "coreset_ratio": args.coreset_ratio if args.detector == "patchcore" else None,
            "n_channels": args.n_channels if args.detector == "padim" else None,
            "reg": model.reg_ if args.detector == "padim" else None, "seed": args.seed,
            "threshold": float(model.threshold_) if model.is_calibrated else None,
            "tau": float(model.tau_) if model.is_calibrated else None,
        },
        "images": {},
    }
    written: list[Path] = []
    with contextlib.ExitStack() as stack:
        explainer = stack.enter_context(model.explainer())
        bar = stack.enter_context(tqdm(list(zip(paths, _unique_stems(paths), images)), desc=_PROG, unit="image",
                                       file=sys.stderr, disable=args.quiet))
        for path, stem, image in bar:
            bar.set_postfix_str(path.name, refresh=False)
            x = preprocessing(image).unsqueeze(0).to(device)
            detection = model.detect(x)
            explained, relevance = explainer(x)
            anomaly_map, relevance = detection.maps[0].cpu(), relevance[0].cpu()
            score = float(detection.scores[0])
            verdict = None if detection.verdicts is None else bool(detection.verdicts[0])
            normalized = None if detection.normalized is None else float(detection.normalized[0])
            report["images"][stem] = {
                "file": str(path), "score": score, "normalized_score": normalized, "verdict": verdict,
                "explained_score": float(explained[0]), "relevance_sum": float(relevance.sum()),
                "patch_scores": detection.patch_scores[0].tolist(),
            }
            label = "no verdict" if verdict is None else ("ANOMALOUS" if verdict else "normal")
            panels = {"anomaly map": anomaly_map}
            if bool(torch.isfinite(relevance).all()):
                panels[f"NEON ({args.target})"] = relevance
            else:
                _warn(f"{path}: the relevance has non-finite values; no heatmap drawn for it.")
            grid = args.out / f"{stem}_detect.png"
            heatmap_grid(image, panels, path=grid, use_overlay=True, ncols=len(panels) + 1,
                         suptitle=f"{path.name}: score {score:.4g} ({label})"
                         + (" (RANDOM WEIGHTS)" if args.weights is None else ""))
            written.append(grid)
            arrays = {"anomaly_map": anomaly_map.float().numpy(), "relevance": relevance.float().numpy()}
            if args.save_raw == "npy":
                for name, array in arrays.items():
                    target = args.out / f"{stem}_{name}.npy"
                    np.save(target, array)
                    written.append(target)
            elif args.save_raw == "npz":
                target = args.out / f"{stem}_detect.npz"
                np.savez_compressed(target, **arrays)
                written.append(target)
    safe, n_null = _json_safe(report)
    scores = args.out / "scores.json"
    scores.write_text(json.dumps(safe, indent=2, allow_nan=False))
    written.append(scores)
    if n_null:
        _warn(f"{n_null} non-finite value(s) were written as null in {scores}.")
    print(f"Wrote {len(written)} files to {args.out}")
    for stem, entry in report["images"].items():
        verdict = "" if entry["verdict"] is None else (" ANOMALOUS" if entry["verdict"] else " normal")
        print(f"  {stem}: score={entry['score']:.4g}{verdict}")
    return 0
