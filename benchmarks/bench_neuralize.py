"""Benchmark: neuralized models (``neuralize``) against the scikit-learn call they replace and Captum's IG.

For each model, support/training size N and dimension d: one batch of ``--batch`` queries, timed interleaved
(``_common.time_interleaved``, median of the repeats):

* ``sklearn``: the scikit-learn call the network replaces (``kneighbors``, ``score_samples``, ``mahalanobis``,
  ``transform`` + ``inverse_transform``, ``decision_function``), float64 as scikit-learn computes;
* ``forward``: the neuralized model's score, float32 (``torch.no_grad``);
* ``explain``: NEON relevance of the score (:func:`neon_attrib.explain`, float32, one forward and one backward);
* ``ig``: Captum's ``IntegratedGradients`` with 50 steps on the same score (float32), where its estimate (from one
  step) is below ``--ig-limit`` seconds; otherwise the estimate is reported.

Every method is called once untimed-for-the-median (warm-up); a method slower than ``--slow`` seconds is measured by
that call alone, the others by the median of up to ``--repeats`` interleaved rounds within ``--budget`` seconds.

The k-NN and KDE scores grow with the support set (N = 10^3 … 10^5); the Gaussian models' inference does not (N is
their training size). Every row also records how far the neuralized score is from scikit-learn's (max relative
difference, float32). Prints a table and writes ``benchmarks/results/neuralize_cpu.json``.

    python benchmarks/bench_neuralize.py                       # the default grid, ~3 min on 2 CPU cores
    python benchmarks/bench_neuralize.py --models knn --sizes 1000000 --dims 64
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from functools import partial

import numpy as np
import torch
from _common import environment, max_relative_error, median, time_interleaved, write_result

from neon_attrib import explain, neuralize

MODELS = ("knn", "kde", "mahalanobis", "pca", "gmm", "ocsvm")
#: Models whose inference cost grows with N (the others: N is only their training size, capped for fitting).
SUPPORT_MODELS = ("knn", "kde")
FIT_CAP = {"mahalanobis": 20_000, "pca": 20_000, "gmm": 5_000, "ocsvm": 2_000}


def build(name: str, X: np.ndarray):
    """The fitted scikit-learn estimator and the call to time (returns the score ``forward`` should equal)."""
    from sklearn.covariance import EmpiricalCovariance
    from sklearn.decomposition import PCA
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture
    from sklearn.neighbors import KernelDensity, NearestNeighbors
    from sklearn.svm import OneClassSVM

    d = X.shape[1]
    if name == "knn":
        est = NearestNeighbors(n_neighbors=5).fit(X)
        return est, lambda x: (est.kneighbors(x)[0] ** 2).mean(1), {}
    if name == "kde":
        bandwidth = float(np.sqrt(d))  # γ = 1/(2d): the kernel spans the data's scale
        est = KernelDensity(bandwidth=bandwidth).fit(X)
        gamma = 1 / (2 * bandwidth**2)
        return est, lambda x: -(est.score_samples(x) + d / 2 * np.log(np.pi / gamma)) / gamma, {}
    if name == "mahalanobis":
        est = EmpiricalCovariance().fit(X)
        return est, est.mahalanobis, {}
    if name == "pca":
        est = PCA(n_components=d // 4).fit(X)
        return est, lambda x: ((x - est.inverse_transform(est.transform(x))) ** 2).sum(1), {}
    if name == "gmm":  # a few EM steps: the fit is not timed, any fitted mixture has the same inference cost
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            est = GaussianMixture(n_components=4, covariance_type="full", max_iter=5, random_state=0).fit(X)
        return est, lambda x: -est.score_samples(x), {}
    est = OneClassSVM(gamma=1 / (2 * d), nu=0.2).fit(X)
    return est, lambda x: -np.log(est.score_samples(x)) / est._gamma, {}


def run(name: str, n: int, d: int, batch: int, repeats: int, ig_limit: float, budget: float, slow: float) -> dict:
    from captum.attr import IntegratedGradients

    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, d))
    x = rng.normal(size=(batch, d)) * 1.2
    start = time.perf_counter()
    est, sklearn_score, options = build(name, X)
    fit_s = time.perf_counter() - start
    model = neuralize(est, **options)  # float32
    xt = torch.as_tensor(x, dtype=torch.float32)
    with torch.no_grad():
        ours = model(xt)
    reference = torch.as_tensor(sklearn_score(x))
    row = {"model": name, "estimator": type(est).__name__, "neon": type(model).__name__, "n": n, "d": d,
           "batch": batch, "dtype": "float32", "fit_s": fit_s,
           "max_rel_diff_vs_sklearn": max_relative_error(ours, reference)}

    def forward():
        with torch.no_grad():
            return model(xt)

    baseline = torch.as_tensor(X.mean(0, keepdims=True), dtype=torch.float32)
    ig = IntegratedGradients(model)
    ig.attribute(xt, baselines=baseline, n_steps=1, internal_batch_size=batch)  # warm-up
    one_step = time.perf_counter()
    ig.attribute(xt, baselines=baseline, n_steps=1, internal_batch_size=batch)
    row["ig_estimated_s"] = (time.perf_counter() - one_step) * 50
    methods = {"sklearn": partial(sklearn_score, x), "forward": forward, "explain": partial(explain, model, xt)}
    if row["ig_estimated_s"] <= ig_limit:
        methods["ig"] = partial(ig.attribute, xt, baselines=baseline, n_steps=50, internal_batch_size=batch)
    first = {}
    for method, call in methods.items():  # warm-up, timed: a call slower than `slow` is measured by it alone
        start = time.perf_counter()
        call()
        first[method] = time.perf_counter() - start
    fast = {method: call for method, call in methods.items() if first[method] <= slow}
    times, _ = time_interleaved(fast, torch.device("cpu"), repeats, budget) if fast else ({}, {})
    for method in methods:
        values = times.get(method) or [first[method]]
        row[f"{method}_s"] = median(values)
        row[f"{method}_repeats"] = len(values)
    row["ig_s"] = row.get("ig_s")
    row["explain_over_sklearn"] = row["explain_s"] / row["sklearn_s"]
    row["ig_over_explain"] = row["ig_s"] / row["explain_s"] if row["ig_s"] else None
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000],
                        help="N: support points (k-NN, KDE) or training points (the others, capped for fitting)")
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ig-limit", type=float, default=5.0, help="skip IG when its estimate exceeds this (s)")
    parser.add_argument("--budget", type=float, default=4.0, help="stop repeating a configuration after this (s)")
    parser.add_argument("--slow", type=float, default=2.0,
                        help="a method whose warm-up call takes longer is timed by that call alone (s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (default 1: on a shared 2-core machine two OpenMP threads make "
                             "every small operation wait ~30 ms for a descheduled peer)")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/neuralize_cpu.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    rows = []
    load_before = os.getloadavg()
    header = (f"{'model':<12} {'N':>7} {'d':>4} {'sklearn':>9} {'forward':>9} {'explain':>9} {'IG-50':>10} "
              f"{'expl/skl':>8} {'IG/expl':>8} {'rel.diff':>9}")
    print(header)
    start = time.perf_counter()
    for name in args.models:
        sizes = args.sizes if name in SUPPORT_MODELS else sorted({min(n, FIT_CAP[name]) for n in args.sizes})[-1:]
        for d in args.dims:
            for n in sizes:
                row = run(name, n, d, args.batch, args.repeats, args.ig_limit, args.budget, args.slow)
                rows.append(row)
                ig = f"{row['ig_s']:.3f}" if row["ig_s"] else f"~{row['ig_estimated_s']:.0f} skip"
                ratio = f"{row['ig_over_explain']:.0f}x" if row["ig_over_explain"] else "-"
                print(f"{name:<12} {n:>7} {d:>4} {row['sklearn_s']:>9.4f} {row['forward_s']:>9.4f} "
                      f"{row['explain_s']:>9.4f} {ig:>10} {row['explain_over_sklearn']:>8.2f} {ratio:>8} "
                      f"{row['max_rel_diff_vs_sklearn']:>9.1e}", flush=True)
    result = {"benchmark": "neuralize", "environment": environment(torch.device("cpu")),
              "settings": {"batch": args.batch, "repeats": args.repeats, "ig_steps": 50, "ig_limit_s": args.ig_limit,
                           "budget_s": args.budget, "slow_s": args.slow, "threads": args.threads,
                           "dtype": "float32 (scikit-learn: float64)"},
              "total_s": time.perf_counter() - start,
              "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]}, "rows": rows}
    write_result(result, args.output, "neuralize_cpu.json")
    return result


if __name__ == "__main__":
    main()
