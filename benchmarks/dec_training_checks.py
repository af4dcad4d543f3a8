"""The two situations behind DEC's training checks (docs/dec.md, "Training checks"), with the current library.

(a) **Too short pretraining on CIFAR-10.** The activation-clustering surrogate of the CIFAR-10 ResNet-56 of
    ``bench_dec_cifar.py`` (its four Table 1 layers, 15 clusters, dim 20, fine-tuning as there) fitted on the first
    1,500 training images of ``cifar10_subset`` with only 5 pretraining epochs (6 minibatches of 256 each: 30 steps).
    Records the surrogate's and the classifier's accuracy (training images and the 1017 test images), the
    ``DECTrainingWarning`` messages and every layer's training checks (pretraining convergence, cluster purity after
    k-means and after fine-tuning, whether fine-tuning was kept).
(b) **The silhouette is only a proxy.** Three Gaussian blobs (3 x 40 points in 6-D, the blobs of
    ``tests/test_dec_training.py``), 100 pretraining steps, 60 fine-tuning steps with a far too high
    ``finetune_lr=0.3`` and with ``finetune_lr=0.05``; each fitted without labels (quality = centroid silhouette) and
    with labels (quality = class purity).

    python benchmarks/dec_training_checks.py            # ~3.5 min on one CPU thread
    python benchmarks/dec_training_checks.py --data DIR --out /tmp/checks.json

(a) needs the shared data folder (``--data``, ``$NEON_ATTRIB_DATA`` or ``../shared/data``: ``cifar10_resnet`` and
``cifar10_subset``); without it the script says so and exits with status 2, writing nothing. Writes
``benchmarks/results/dec_training_checks.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import environment, write_result  # noqa: E402
from cifar_resnet import TABLE1_LAYERS, data_root, load_cifar_subset, load_resnet  # noqa: E402

from neon_attrib.dec import DEC, ActivationClusteringSurrogate, DECTrainingWarning  # noqa: E402

CHECK_KEYS = ("pretrain_steps", "pretrain_initial_loss", "pretrain_final_loss", "pretrain_last_decrease",
              "pretrain_converged", "cluster_sizes_init", "cluster_sizes_finetuned", "cluster_sizes",
              "quality_measure", "quality_init", "quality_finetuned", "finetuning_kept", "warnings")


def _fit_recording(estimator, *args):
    """Fit and return the DECTrainingWarning messages that were actually issued."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DECTrainingWarning)
        estimator.fit(*args)
    return [str(w.message) for w in caught if issubclass(w.category, DECTrainingWarning)]


def short_pretraining_cifar(root: Path, n_train: int, pretrain_epochs: int, max_iter: int, seed: int) -> dict:
    """(a): the ResNet-56 surrogate on ``n_train`` images with ``pretrain_epochs`` epochs of pretraining."""
    model = load_resnet(56, root)
    data = load_cifar_subset(root)
    x_train, y_train = data["x_train"][:n_train], data["y_train"][:n_train]
    x_test, y_test = data["x_test"], data["y_test"]
    params = {"n_clusters": 15, "embedding_dim": 20, "pretrain_epochs": pretrain_epochs, "max_iter": max_iter,
              "update_interval": 100, "dec_batch_size": 256, "batch_size": 256, "random_state": seed}
    sur = ActivationClusteringSurrogate(model, list(TABLE1_LAYERS), device="cpu", progress=False, **params)
    t0 = time.perf_counter()
    issued = _fit_recording(sur, x_train, y_train)
    fit_s = time.perf_counter() - t0
    test = sur.evaluate(x_test, y_test)
    d = sur.diagnostics_
    return {
        "data": {"source": "cifar10_subset", "train": int(x_train.shape[0]), "test": int(x_test.shape[0]),
                 "train_images": f"the first {n_train} training images"},
        "model": "ResNet-56 (option A), akamaster/pytorch_resnet_cifar10",
        "layers": list(TABLE1_LAYERS),
        "params": params,
        "test": test,
        "train": {"surrogate_accuracy": d["train_accuracy"], "classifier_accuracy": d["classifier_train_accuracy"],
                  "layer_accuracy": d["layer_train_accuracy"]},
        "checks": {layer: {"finetune_steps": sur.decs_[layer].n_iter_,
                           "finetune_converged": sur.decs_[layer].converged_, **{k: diag[k] for k in CHECK_KEYS}}
                   for layer, diag in d["layers"].items()},
        "warnings_issued": issued,
        "fit_s": fit_s,
        "fit_time_s": sur.fit_time_,
    }


def blobs(n_per: int = 40, d: int = 6, k: int = 3, seed: int = 0, spread: float = 6.0):
    """The blobs of tests/test_dec_training.py: k Gaussian clusters of n_per points around N(0, spread^2) centres."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * spread
    x = torch.cat([c + torch.randn(n_per, d, generator=g) for c in centres])
    return x, torch.arange(k).repeat_interleave(n_per)


def silhouette_proxy_blobs(finetune_lrs: tuple[float, ...], seed: int) -> dict:
    """(b): the fine-tuning check on three blobs, without labels (silhouette) and with labels (purity)."""
    x, y = blobs(seed=seed)
    params = {"n_clusters": 3, "embedding_dim": 3, "hidden_dims": [16], "batch_size": 32, "update_interval": 10,
              "pretrain_steps": 100, "max_iter": 60, "random_state": seed, "keep_best": True}
    runs = {}
    for lr in finetune_lrs:
        for measure, args in (("silhouette", (x,)), ("purity", (x, y))):
            dec = DEC(**{**params, "hidden_dims": tuple(params["hidden_dims"])}, finetune_lr=lr, progress=False)
            issued = _fit_recording(dec, *args)
            runs[f"finetune_lr={lr}, {measure}"] = {
                "finetune_lr": lr, "labels_passed": measure == "purity", "n_iter": dec.n_iter_,
                "converged": dec.converged_, **{k: dec.diagnostics_[k] for k in CHECK_KEYS},
                "warnings_issued": issued}
    return {"data": {"clusters": 3, "points_per_cluster": 40, "dim": 6, "centre_spread": 6.0, "seed": seed},
            "params": params, "runs": runs}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="shared data folder (default: ../shared/data)")
    parser.add_argument("--n-train", type=int, default=1500)
    parser.add_argument("--pretrain-epochs", type=int, default=5)
    parser.add_argument("--max-iter", type=int, default=1000, help="DEC fine-tuning steps per layer in (a)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/dec_training_checks.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    root = args.data or data_root()
    needed = [root / "cifar10_resnet" / "resnet56-4bfd9763.th", root / "cifar10_subset" / "cifar10_subset.npz"]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        print(f"dec_training_checks: needs {', '.join(missing)} (set --data or NEON_ATTRIB_DATA); nothing written",
              file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    blobs_result = silhouette_proxy_blobs((0.3, 0.05), args.seed)
    cifar = short_pretraining_cifar(root, args.n_train, args.pretrain_epochs, args.max_iter, args.seed)
    result = {
        "benchmark": "dec_training_checks",
        "environment": environment(torch.device("cpu")),
        "short_pretraining_cifar": cifar,
        "silhouette_proxy_blobs": blobs_result,
        "total_s": time.perf_counter() - t0,
    }
    write_result(result, args.out, "dec_training_checks.json")
    t = cifar["test"]
    print(f"(a) {cifar['params']['pretrain_epochs']} epochs on {cifar['data']['train']} images: surrogate test "
          f"accuracy {t['accuracy']:.4f}, classifier {t['baseline_accuracy']:.4f}; train "
          f"{cifar['train']['surrogate_accuracy']:.4f} vs {cifar['train']['classifier_accuracy']:.4f}; "
          f"{len(cifar['warnings_issued'])} warnings")
    for layer, c in cifar["checks"].items():
        print(f"    {layer}: {c['pretrain_steps']} steps, purity {c['quality_init']:.4f} -> "
              f"{c['quality_finetuned']:.4f}, kept {c['finetuning_kept']}")
    for name, r in blobs_result["runs"].items():
        print(f"(b) {name}: {r['quality_init']:.4f} -> {r['quality_finetuned']:.4f}, kept {r['finetuning_kept']}, "
              f"{len(r['warnings_issued'])} warnings")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
