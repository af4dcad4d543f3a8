"""Reproduce Table 2 of the activation-clustering paper: DEC surrogate of a CIFAR-10 ResNet-56.

One DEC per layer of the paper's Table 1 (``relu``, ``layer1``, ``layer2``, ``layer3``; dim V = 20, 15 clusters),
fitted on the 5085 training images of ``cifar10_subset``, evaluated on its 1017 test images: baseline accuracy,
surrogate accuracy and fidelity (equal weights, plus other weightings at no refitting cost), per-layer figures,
fitting time. Also writes the figures (similar images with three weightings next to plain k-NN on the penultimate
features, concept grids of the first and last layer, pixel heatmaps of concept membership and of class evidence)
and checks that the attributable heads reproduce DEC's assignments.

    python benchmarks/bench_dec_cifar.py                 # CPU, one thread (~8 min), or CUDA when present
    python benchmarks/bench_dec_cifar.py --device cuda
    python benchmarks/bench_dec_cifar.py --quick         # smoke test on a few hundred images
    python benchmarks/bench_dec_cifar.py --quick --out /tmp/dec   # ... writing nothing into the repository

Writes ``benchmarks/results/dec_cifar.json`` (``dec_cifar_quick.json`` with ``--quick``; with the surrogate's training
diagnostics, per layer), figures shown in the docs to ``docs/figures/dec_*.png`` and the rest to
``benchmarks/results/dec_*.png`` (everything to ``--out`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cifar_resnet import (  # noqa: E402
    CLASSES,
    MEAN,
    STD,
    TABLE1_LAYERS,
    data_root,
    denormalize,
    fuse_batchnorm,
    load_cifar_subset,
    load_resnet,
)

import neon_attrib  # noqa: E402
from neon_attrib.dec import (  # noqa: E402
    ActivationClusteringSurrogate,
    DECHead,
    DECHeadComposite,
    TruncatedModel,
    plots,  # noqa: E402
)
from neon_attrib.dec.mixture import layer_proba, mix_layers  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PAPER = {"baseline_accuracy": 0.869, "surrogate_accuracy": 0.8448, "fidelity": 0.923}
WEIGHTINGS = {"equal": (1, 1, 1, 1), "2,1,0,0": (2, 1, 0, 0), "0,0,1,2": (0, 0, 1, 2), "0,0,0,1": (0, 0, 0, 1),
              "1,1,2,4": (1, 1, 2, 4)}


def _rates(pred: torch.Tensor, labels: torch.Tensor, model_pred: torch.Tensor) -> dict:
    return {"accuracy": float((pred == labels).double().mean()),
            "fidelity": float((pred == model_pred).double().mean())}


def _evaluate(sur: ActivationClusteringSurrogate, z: dict, labels, model_pred) -> dict:
    proba = layer_proba(sur.decs_, sur.class_posteriors_, z)
    out = {"layers": {layer: _rates(p.argmax(1), labels, model_pred) for layer, p in proba.items()},
           "weightings": {}}
    for name, w in WEIGHTINGS.items():
        mix = mix_layers(proba, sur.layers, sur.layer_weights(w))
        out["weightings"][name] = _rates(mix.argmax(1), labels, model_pred)
    return out


def _pixel_bounds():
    low = torch.tensor([(0 - m) / s for m, s in zip(MEAN, STD)]).view(1, 3, 1, 1)
    high = torch.tensor([(1 - m) / s for m, s in zip(MEAN, STD)]).view(1, 3, 1, 1)
    return low, high


def _composite(n: int):
    from zennit.composites import EpsilonGammaBox

    low, high = _pixel_bounds()
    return DECHeadComposite(base=EpsilonGammaBox(low=low.expand(n, 3, 32, 32), high=high.expand(n, 3, 32, 32)))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--data", type=Path, default=None, help="shared data folder (default: ../shared/data)")
    parser.add_argument("--n-clusters", type=int, default=15)
    parser.add_argument("--embedding-dim", type=int, default=20)
    pretraining = parser.add_mutually_exclusive_group()
    pretraining.add_argument("--pretrain-epochs", type=int, default=None,
                             help="autoencoder pretraining in epochs over the training images (default 20)")
    pretraining.add_argument("--pretrain-steps", type=int, default=None,
                             help="autoencoder pretraining in optimizer steps instead of epochs")
    parser.add_argument("--max-iter", type=int, default=1000, help="DEC fine-tuning steps per layer")
    parser.add_argument("--update-interval", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=256, help="DEC minibatch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine two threads wait on each other and "
                             "run up to 8x slower; use 2 on two idle cores; 0 keeps torch's default)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 600 train / 200 test images, 2 pretraining epochs, 40 fine-tuning steps "
                             "(expect DECTrainingWarnings: the training is deliberately too short)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--figures", type=Path, default=REPO / "docs" / "figures")
    args = parser.parse_args(argv)
    if args.pretrain_epochs is None and args.pretrain_steps is None:
        args.pretrain_epochs = 20
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    root = args.data or data_root()
    t_total = time.perf_counter()

    model = load_resnet(56, root).to(device)
    data = load_cifar_subset(root)
    x_train, y_train, x_test, y_test = data["x_train"], data["y_train"], data["x_test"], data["y_test"]
    suffix = ""
    if args.quick:
        x_train, y_train, x_test, y_test = x_train[:600], y_train[:600], x_test[:200], y_test[:200]
        args.max_iter = 40
        if args.pretrain_steps is None:
            args.pretrain_epochs = 2
        suffix = "_quick"
    fig_docs = args.figures if not args.quick else args.out
    fig_prefix = "dec_" if not args.quick else "dec_quick_"

    # penultimate features (the input of the final linear layer), captured during the surrogate's own passes
    penultimate: list[torch.Tensor] = []
    grab = model.flatten.register_forward_hook(lambda m, i, o: penultimate.append(o.detach().cpu()))

    sur = ActivationClusteringSurrogate(model, list(TABLE1_LAYERS), n_clusters=args.n_clusters,
                                        embedding_dim=args.embedding_dim, pretrain_steps=args.pretrain_steps,
                                        pretrain_epochs=args.pretrain_epochs, max_iter=args.max_iter,
                                        update_interval=args.update_interval, dec_batch_size=args.batch_size,
                                        batch_size=256, device=device, random_state=args.seed, progress=False)
    t0 = time.perf_counter()
    sur.fit(x_train, y_train)
    fit_s = time.perf_counter() - t0
    feat_train = torch.cat(penultimate)
    penultimate.clear()

    t0 = time.perf_counter()
    res = sur._infer(x_test, y_test)  # one pass: embeddings of every layer, logits, labels
    infer_s = time.perf_counter() - t0
    grab.remove()
    feat_test = torch.cat(penultimate)
    model_pred = res["logits"].argmax(1)
    baseline = float((model_pred == y_test).double().mean())
    test_eval = _evaluate(sur, res["z"], y_test, model_pred)
    train_eval = _evaluate(sur, sur.train_embeddings_, sur.train_labels_, sur.train_predictions_)
    # the public API gives the same numbers (checked on the equal weighting)
    headline = test_eval["weightings"]["equal"]

    # k-NN on penultimate features: label agreement of the 10 neighbours, as a reference for the similarity figures
    knn_idx = torch.cdist(feat_test, feat_train).topk(10, largest=False).indices
    agree = {}
    for name, w in [("equal", None), ("2,1,0,0", (2, 1, 0, 0)), ("0,0,1,2", (0, 0, 1, 2))]:
        idx = sur._nearest(res["z"], sur.layer_weights(w), 10)[0]
        agree[name] = float((y_train[idx] == y_test.unsqueeze(1)).double().mean())
    agree["knn_penultimate"] = float((y_train[knn_idx] == y_test.unsqueeze(1)).double().mean())

    # attributable heads on the BN-fused copy: argmax must reproduce DEC.predict
    fused = fuse_batchnorm(model).to(device)
    n_check = min(256, x_test.shape[0])
    heads = {}
    head_agreement = {}
    for layer in (TABLE1_LAYERS[0], TABLE1_LAYERS[-1]):
        head = DECHead.from_dec(sur.decs_[layer], features=TruncatedModel(fused, layer))
        heads[layer] = head
        with torch.no_grad():
            head_pred = head(x_test[:n_check].to(device)).argmax(1).cpu()
        dec_pred = sur.decs_[layer].proba_from_embedding(res["z"][layer][:n_check]).argmax(1)
        head_agreement[layer] = float((head_pred == dec_pred).double().mean())

    # ------------------------------------------------------------------ figures
    show = [int((y_test == c).nonzero()[0]) for c in (0, 1, 3, 5, 7, 8)]
    show = [i for i in show if i < x_test.shape[0]][:6]
    test_img, train_img = denormalize(x_test), denormalize(x_train)
    test_titles = [f"{CLASSES[int(y)]}" for y in y_test]
    train_titles = [f"{CLASSES[int(y)]}" for y in y_train]
    queries = test_img[show]
    z_show = {layer: v[show] for layer, v in res["z"].items()}
    figures = []
    for name, w in [("equal", (1, 1, 1, 1)), ("2100", (2, 1, 0, 0)), ("0012", (0, 0, 1, 2))]:
        idx, _ = sur._nearest(z_show, sur.layer_weights(w), 10)
        path = fig_docs / f"{fig_prefix}similar_{name}.png"
        plots.similar_examples_figure(queries, train_img, idx, [test_titles[i] for i in show], train_titles,
                                      title=f"DEC surrogate, layer weights {w}", path=path)
        figures.append(path)
    path = fig_docs / f"{fig_prefix}similar_knn.png"
    plots.similar_examples_figure(queries, train_img, knn_idx[show], [test_titles[i] for i in show], train_titles,
                                  title="k-NN on penultimate features", path=path)
    figures.append(path)
    for layer in (TABLE1_LAYERS[0], TABLE1_LAYERS[-1]):
        idx, _ = sur.concepts(layer, per_cluster=10)
        path = fig_docs / f"{fig_prefix}concepts_{layer}.png"
        plots.concepts_figure(train_img, idx, train_titles, title=f"concepts of {layer!r}", path=path)
        figures.append(path)

    # pixel heatmaps: why is this image in its concept of the layer (and the full surrogate's class evidence)
    hm_idx = [int((y_test == c).nonzero()[0]) for c in range(10) if bool((y_test == c).any())][:8]
    x_hm = x_test[hm_idx].to(device)
    relevances, rows, conservation = [], [], {}
    for layer, head in heads.items():
        rel, out = neon_attrib.explain(head, x_hm, composite=_composite(len(hm_idx)), return_output=True)
        relevances.append(rel.cpu())
        rows.append(f"concept of\n{layer}")
        score = out.amax(1).cpu()
        conservation[layer] = {"score": score.tolist(), "pixel_sum": rel.sum((1, 2, 3)).cpu().tolist()}
    class_head = sur.class_head()
    class_head.features = TruncatedModel(fused, list(TABLE1_LAYERS))
    with torch.no_grad():
        class_gap = float((class_head(x_test[:n_check].to(device)).cpu()
                           - sur.predict_proba(x_test[:n_check])).abs().max())
    rel, out = neon_attrib.explain(class_head, x_hm, composite=_composite(len(hm_idx)), return_output=True)
    relevances.append(rel.cpu())
    rows.append("surrogate\nclass")
    conservation["class_evidence"] = {"score": out.amax(1).cpu().tolist(), "pixel_sum": rel.sum((1, 2, 3)).tolist()}
    path = fig_docs / f"{fig_prefix}heatmaps.png"
    assigned = {layer: heads[layer](x_hm).argmax(1).tolist() for layer in heads}
    titles = [f"{CLASSES[int(y_test[i])]}\n" + "/".join(str(assigned[la][j]) for la in heads)
              for j, i in enumerate(hm_idx)]
    plots.heatmap_figure(denormalize(x_hm.cpu()), relevances, rows, titles,
                         title="LRP: concept membership (first/last layer) and surrogate class evidence", path=path)
    figures.append(path)

    # every hyperparameter of the surrogate and its DECs (not the classifier, the device or the progress flag)
    params = {k: v for k, v in sur.get_params(deep=False).items()
              if k not in ("model", "device", "progress", "dec_params")}
    result = {
        "benchmark": "dec_cifar",
        "quick": args.quick,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "device": str(device),
                    "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None},
        "data": {"train": int(x_train.shape[0]), "test": int(x_test.shape[0]), "source": "cifar10_subset"},
        "model": "ResNet-56 (option A), akamaster/pytorch_resnet_cifar10",
        "params": {**{k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}, "dtype": "float32"},
        "paper": PAPER,
        "test": {"baseline_accuracy": baseline, "surrogate_accuracy": headline["accuracy"],
                 "fidelity": headline["fidelity"], **test_eval},
        "train": {"baseline_accuracy": float((sur.train_predictions_ == sur.train_labels_).double().mean()),
                  **train_eval},
        "similar_examples_label_agreement_at_10": agree,
        "dec": {layer: {"n_iter": dec.n_iter_, "converged": dec.converged_,
                        "pretrain_steps": dec.diagnostics_["pretrain_steps"],
                        "final_pretrain_loss": dec.diagnostics_["pretrain_final_loss"],
                        "cluster_sizes": torch.bincount(sur.train_assignments_[layer],
                                                        minlength=args.n_clusters).tolist()}
                for layer, dec in sur.decs_.items()},
        # the training checks of every layer's DEC, their warnings and the training accuracies
        "diagnostics": sur.diagnostics_,
        "heads": {"argmax_equals_dec_predict": head_agreement, "n_checked": n_check,
                  "class_head_max_abs_diff_to_predict_proba": class_gap, "conservation": conservation},
        "timing_s": {"fit_total": fit_s, **{f"fit_{k}": v for k, v in sur.fit_time_.items()},
                     "test_pass": infer_s, "total": time.perf_counter() - t_total},
        "figures": [str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p) for p in figures],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"dec_cifar{suffix}.json").write_text(json.dumps(result, indent=2))
    _print_table(result)
    return result


def _print_table(r: dict) -> None:
    t = r["test"]
    print(f"\nDEC surrogate of ResNet-56 on CIFAR-10 ({r['data']['train']} train / {r['data']['test']} test images, "
          f"{r['machine']['device']}, {r['machine']['threads']} threads)")
    print(f"{'':24s}{'accuracy':>10s}{'fidelity':>10s}")
    print(f"{'baseline (paper)':24s}{r['paper']['baseline_accuracy']:10.4f}{1.0:10.4f}")
    print(f"{'surrogate (paper)':24s}{r['paper']['surrogate_accuracy']:10.4f}{r['paper']['fidelity']:10.4f}")
    print(f"{'baseline (ours)':24s}{t['baseline_accuracy']:10.4f}{1.0:10.4f}")
    for name, v in t["weightings"].items():
        print(f"{'surrogate w=' + name:24s}{v['accuracy']:10.4f}{v['fidelity']:10.4f}")
    for layer, v in t["layers"].items():
        print(f"{'layer ' + layer:24s}{v['accuracy']:10.4f}{v['fidelity']:10.4f}")
    print(f"fit {r['timing_s']['fit_total']:.0f} s, total {r['timing_s']['total']:.0f} s; heads argmax == predict: "
          f"{r['heads']['argmax_equals_dec_predict']}")


if __name__ == "__main__":
    main()
