"""The book's two Wholesale customers (instances 338 and 339) explained by every neuralized model.

Setting as in ``neon_attrib/cli/demo.py``: spending log-transformed and standardised; each outlier model is fitted
*without* the customer it explains (leave-one-out), the KDE with γ = 1; k-means (K = 6, 10 restarts, seed 8) and the
tied Gaussian mixture (K = 6) are fitted on all customers, as the book's k-means is. For every model and customer:
the score, its percentile among all customers (each scored leave-one-out for KDE and k-NN, in-sample otherwise), the
NEON relevance of the six features, and its share ``R_i / |score|``. Writes ``docs/figures/wholesale_models.png``
and ``benchmarks/results/wholesale_models.json``.

    python benchmarks/wholesale_models.py
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch

from neon_attrib import (
    GaussianMixtureMembership,
    GaussianMixtureOutlier,
    KDEOutlier,
    KMeansMembership,
    KNNOutlier,
    MahalanobisOutlier,
    OneClassSVMOutlier,
    PCAResidual,
    explain,
)
from neon_attrib.cli.demo import BOOK_INSTANCES
from neon_attrib.datasets import load_wholesale, preprocess_wholesale

ROOT = Path(__file__).resolve().parents[1]

#: Outlier models (fitted leave-one-out): label -> factory.
OUTLIER_MODELS = {
    "KDE (γ=1)": lambda: KDEOutlier(gamma=1.0),
    "k-NN (k=5)": lambda: KNNOutlier(n_neighbors=5),
    "1-NN distance": lambda: KNNOutlier(n_neighbors=1, sqrt=True),
    "Mahalanobis": lambda: MahalanobisOutlier(),
    "Mahalanobis (MCD)": lambda: MahalanobisOutlier(robust=True, random_state=0),
    "PCA residual (r=2)": lambda: PCAResidual(n_components=2),
    "GMM (K=4, full)": lambda: GaussianMixtureOutlier(n_components=4, random_state=0, n_init=5),
    "one-class SVM (γ=1, ν=0.1)": lambda: OneClassSVMOutlier(gamma=1.0, nu=0.1),
}
#: Membership models (fitted on all customers; the explained output is the assigned cluster's evidence).
MEMBERSHIP_MODELS = {
    "k-means (K=6)": lambda: KMeansMembership(n_clusters=6, n_init=10, random_state=8),
    "tied GMM (K=6)": lambda: GaussianMixtureMembership(n_components=6, random_state=0, n_init=5),
}


def _all_scores(label: str, model, X: np.ndarray) -> np.ndarray:
    """Every customer's score for the percentile: leave-one-out where a point's own presence dominates its score."""
    if isinstance(model, KDEOutlier):
        return model.score_training(leave_one_out=True).numpy()
    if isinstance(model, KNNOutlier):  # the k nearest *other* customers: search k + 1, drop the point itself
        distances, _ = model.kneighbors(X, n_neighbors=model.n_neighbors + 1)
        squared = (distances[:, 1:] ** 2).mean(1)
        return (squared.sqrt() if model.sqrt else squared).numpy()
    with torch.no_grad():
        out = model(X)
    return (out.amax(1) if out.ndim == 2 else out).numpy()


def analyse() -> dict:
    raw, names = load_wholesale()
    X = preprocess_wholesale(raw)
    result: dict = {"features": names, "instances": {key: {"row": row, "spending": raw[row].tolist()}
                                                     for key, row in BOOK_INSTANCES.items()},
                    "models": {}}
    for label, make in {**OUTLIER_MODELS, **MEMBERSHIP_MODELS}.items():
        membership = label in MEMBERSHIP_MODELS
        full = make().double().fit(X)
        everyone = _all_scores(label, full, X)
        entry = {"kind": "membership" if membership else "outlier", "instances": {}}
        for key, row in BOOK_INSTANCES.items():
            x = X[row:row + 1]
            if membership:
                model = full
            else:
                model = make().double().fit(np.delete(X, row, axis=0))
            relevance, output = explain(model, x, return_output=True)
            score = float(output.amax(1)[0] if output.ndim == 2 else output[0])
            relevance = relevance[0].numpy()
            entry["instances"][key] = {
                "score": score,
                "percentile": float((everyone < score).mean()),
                "cluster": int(output.argmax(1)[0]) if membership else None,
                "relevance": relevance.tolist(),
                "share": (relevance / abs(score)).tolist() if score else [0.0] * len(names),
                "top_features": [names[i] for i in np.argsort(-relevance)[:2]],
                "conserved": float(abs(relevance.sum() - score) / max(abs(score), 1e-12)),
            }
        result["models"][label] = entry
    result["agreement"] = _agreement(result)
    return result


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def _agreement(result: dict) -> dict:
    """Per customer: pairwise Spearman correlation of the outlier models' relevance vectors, and each feature's
    rank of agreement (how many outlier models put it in their top two)."""
    names = result["features"]
    outliers = [label for label, entry in result["models"].items() if entry["kind"] == "outlier"]
    summary = {}
    for key in result["instances"]:
        vectors = {label: np.array(result["models"][label]["instances"][key]["relevance"]) for label in outliers}
        pairs = {f"{a} | {b}": _spearman(vectors[a], vectors[b]) for a, b in itertools.combinations(outliers, 2)}
        votes = {name: sum(name in result["models"][label]["instances"][key]["top_features"] for label in outliers)
                 for name in names}
        summary[key] = {"mean_spearman": float(np.mean(list(pairs.values()))),
                        "min_spearman": min(pairs.items(), key=lambda item: item[1]),
                        "top_two_votes": votes}
    return summary


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    names = [name.replace("_", "/\n") for name in result["features"]]
    labels = list(result["models"])
    fig = Figure(figsize=(13, 6.2), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, key in zip(axes, result["instances"]):
        shares = np.array([result["models"][label]["instances"][key]["share"] for label in labels])
        image = ax.imshow(shares, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
        for (r, c), value in np.ndenumerate(shares):
            ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if abs(value) > 0.6 else "black")
        ax.set_xticks(range(len(names)), names, fontsize=8)
        rows = []
        for label in labels:
            inst = result["models"][label]["instances"][key]
            rows.append(f"{label}\n{inst['score']:.3g} (p{100 * inst['percentile']:.0f})")
        ax.set_yticks(range(len(labels)), rows, fontsize=7.5)
        ax.axhline(len(OUTLIER_MODELS) - 0.5, color="black", linewidth=1.2)
        ax.set_title(f"customer {key}: relevance / |score| (score, percentile)", fontsize=10)
    fig.colorbar(image, ax=axes, fraction=0.025, label="share of the score")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--figure", default=str(ROOT / "docs" / "figures" / "wholesale_models.png"))
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "wholesale_models.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    result = analyse()
    plot(result, Path(args.figure))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    width = max(map(len, result["models"]))
    print(f"{'model':<{width}}  {'338 score (pct) top':<40}  339 score (pct) top")
    for label, entry in result["models"].items():
        cells = []
        for key in result["instances"]:
            inst = entry["instances"][key]
            cells.append(f"{inst['score']:8.3g} (p{100 * inst['percentile']:3.0f}) {'+'.join(inst['top_features'])}")
        print(f"{label:<{width}}  {cells[0]:<40}  {cells[1]}")
    for key, summary in result["agreement"].items():
        print(f"{key}: mean pairwise Spearman of the outlier explanations {summary['mean_spearman']:.2f}; "
              f"least alike {summary['min_spearman'][0]} ({summary['min_spearman'][1]:.2f})")
    print(f"wrote {args.figure} and {args.output}")
    return result


if __name__ == "__main__":
    main()
