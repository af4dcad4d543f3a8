"""Model-randomisation sanity check (Adebayo et al., 2018) for fit-self NEON heatmaps on natural photos.

The Keras ImageNet VGG-16 conv base (caffe preprocessing) is randomised layer by layer from the top (cascading); after
every step the head is fitted again on the photo itself (``fit_self``, γ = 1 / median squared distance of its
locations, re-derived for the new features) and the photo explained. Each heatmap is compared with the trained
model's by Spearman rank correlation (signed and absolute) and SSIM. Compared: the two default composites for the
CNN (``epsilon_gamma_box``, ``epsilon_plus_flat``) and gradient × input of the same score as a baseline.

Usage: ``python benchmarks/sanity_randomization.py [--data DIR] [--size 160]``; writes
``benchmarks/results/sanity_randomization.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import data_dir, environment, write_result  # noqa: E402

from neon_attrib import KDEOutlier, explain  # noqa: E402
from neon_attrib.evaluation.sanity import model_randomization  # noqa: E402
from neon_attrib.vision import get_preprocessing, load_image, vgg16_features  # noqa: E402
from neon_attrib.vision.deep import DeepNeon, median_gamma  # noqa: E402

IMAGES = ("coffee.png", "astronaut.png", "chelsea.png", "rocket.jpg")


def refit_then(method: str):
    """``explain_fn`` for the test: re-derive γ for the current features, fit on the images, then explain."""

    def run(model: DeepNeon, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            rows = model._rows(model._feature_map(images))
        model.head = KDEOutlier(gamma=median_gamma(rows))
        model.fit_self(images)
        if method == "gradient_x_input":
            x = images.detach().clone().requires_grad_(True)
            (gradient,) = torch.autograd.grad(model(x).sum(), x)
            return gradient * x.detach()
        return explain(model, images)

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=data_dir(), help="folder with the weights and photos")
    parser.add_argument("--size", type=int, default=160, help="shorter image side (pixels)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    weights = args.data / "vgg16_imagenet_features" / "vgg16_features_keras_imagenet.pth"
    photos = args.data / "natural_images_skimage"
    if not weights.is_file() or not photos.is_dir():
        print(f"sanity_randomization: needs {weights} and {photos} (set --data or NEON_ATTRIB_DATA)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    preprocessing = get_preprocessing("caffe")
    images = [preprocessing(load_image(photos / name, size=args.size)) for name in IMAGES]
    side = min(min(image.shape[-2:]) for image in images)
    batch = torch.stack([image[:, :side, :side] for image in images])
    features = vgg16_features(str(weights))
    rows = {}
    start = time.perf_counter()
    for method, composite in (("neon_epsilon_gamma_box", "epsilon_gamma_box"),
                              ("neon_epsilon_plus_flat", "epsilon_plus_flat"),
                              ("gradient_x_input", "epsilon_gamma_box")):
        model = DeepNeon(features, KDEOutlier(gamma=1.0), preprocessing="caffe", composite=composite)
        per_image = []
        for i in range(batch.shape[0]):  # fit-self: one image at a time
            result = model_randomization(model, batch[i:i + 1], refit=None, explain_fn=refit_then(method), seed=0)
            per_image.append(result)
        steps = per_image[0].layers
        rows[method] = [{"layer": layer,
                         "spearman": sum(float(r.spearman[k].mean()) for r in per_image) / len(per_image),
                         "spearman_abs": sum(float(r.spearman_abs[k].mean()) for r in per_image) / len(per_image),
                         "ssim": sum(float(r.ssim[k].mean()) for r in per_image) / len(per_image)}
                        for k, layer in enumerate(steps)]
        print(f"{method}: " + ", ".join(f"{row['layer']}: ρ={row['spearman']:.2f}/|ρ|={row['spearman_abs']:.2f}/"
                                        f"SSIM={row['ssim']:.2f}" for row in rows[method]))
    result = {"benchmark": "sanity_randomization", "environment": environment(torch.device("cpu")),
              "images": list(IMAGES), "size": side, "weights": "Keras ImageNet VGG-16 conv base (caffe)",
              "head": "KDEOutlier, fit_self (leave-one-out), gamma = 1/median squared distance per step",
              "randomisation": "cascading from the top conv layer down, Kaiming normal (fan-out), zero bias, seed 0",
              "seconds": time.perf_counter() - start, "methods": rows}
    write_result(result, args.output, "sanity_randomization.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
