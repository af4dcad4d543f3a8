"""float32 against float64: the numbers quoted in docs/trust.md ("dtype and precision").

1. A KDE outlier on unit-scale features offset by 10³ and 10⁴: max relevance error of float32 against float64,
   relative to the largest relevance.
2. VGG-16 (random weights) at 64×64 with a KDE head (γ = 1/median squared distance): pixel and feature-map relevance
   of four images explained in one batch and one at a time, against float64, with PyTorch's oneDNN convolutions on and
   off.

    python benchmarks/precision.py        # ~1 min; writes benchmarks/results/precision_cpu.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import environment, write_result  # noqa: E402

from neon_attrib import KDEOutlier, explain  # noqa: E402
from neon_attrib.vision import vgg16_features  # noqa: E402
from neon_attrib.vision.deep import DeepNeon, median_gamma  # noqa: E402


def relative(a: torch.Tensor, reference: torch.Tensor) -> float:
    return float((a.double() - reference).abs().max() / reference.abs().max())


def offsets() -> dict:
    X = np.random.default_rng(0).normal(size=(300, 5))
    x = X[:6] + 0.3
    out = {}
    for offset in (1e3, 1e4):
        r32 = explain(KDEOutlier(gamma=0.5).fit(X + offset), x + offset)
        r64 = explain(KDEOutlier(gamma=0.5).double().fit(X + offset), x + offset)
        out[f"{offset:g}"] = relative(r32, r64)
    return out


def batch_dependence(onednn: bool) -> dict:
    torch.manual_seed(0)
    features = vgg16_features()
    images = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        gamma = median_gamma(DeepNeon._rows(features(images)))
    features64 = vgg16_features().double()
    features64.load_state_dict(features.state_dict())
    with torch.backends.mkldnn.flags(enabled=onednn):
        model = DeepNeon(features, KDEOutlier(gamma=gamma)).fit(images, progress=False)
        model64 = DeepNeon(features64, KDEOutlier(gamma=gamma)).double().fit(images.double(), progress=False)
        batched, reference = model.relevance(images), model64.relevance(images.double())
        alone = [model.relevance(images[i:i + 1]) for i in range(4)]
    return {name: {"batched": relative(getattr(batched, name), getattr(reference, name)),
                   "alone": relative(torch.cat([getattr(a, name) for a in alone]), getattr(reference, name))}
            for name in ("pixels", "features")}


def main() -> None:
    result = {"benchmark": "precision", "environment": environment(torch.device("cpu")),
              "kde_offset_relevance_error": offsets(),
              "vgg16_64px_kde": {"onednn_on": batch_dependence(True), "onednn_off": batch_dependence(False)}}
    print(result["kde_offset_relevance_error"], result["vgg16_64px_kde"])
    write_result(result, None, "precision_cpu.json")


if __name__ == "__main__":
    main()
