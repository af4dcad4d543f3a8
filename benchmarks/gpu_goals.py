"""The speed goals, read from the benchmarks' JSON: which exact variant of the fast path meets them, where.

The goals (exact precision policy, the plain gradient under the same policy): a fast heatmap at **>= 0.6 times the
plain gradient's throughput at batch >= 32 and >= 0.4 times at batch 1, and >= 4 times Zennit's**, for

* ``DeepNeon`` on VGG-16 with a KDE outlier head (``bench_speed.py``, head ``kde_outlier``; Zennit: ``reference``),
* the fast classifier composite on the VGG-16 classifier (``bench_speed.py``, rows ``classifier_*``),
* ``DeepNeon`` on ResNet-50 taps with a KDE outlier head (``bench_backbones.py``; ResNet-18 too where measured),
* VGG-16 ``features`` alone (``bench_fast_lrp.py``).

Each is read for every variant the JSON holds: ``eager`` (the default), ``fused`` (``fused=True``) and ``graphs``
(``cuda_graphs=True``). A variant counts only where its check says it gave the eager heatmap (``fused_equals_fast``;
replays within 1e-6 of the eager heatmap, graphs not switched off): a fast wrong answer meets no goal.

    python benchmarks/gpu_goals.py                    # benchmarks/results/*_cuda.json -> goals_cuda.json
    python benchmarks/gpu_goals.py --device cpu       # the same from the CPU files (ratios of another machine)
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

#: throughput / the plain gradient's, at batch 1 and at batch >= 32; and / Zennit's
GOAL_BATCH_1, GOAL_LARGE_BATCH, GOAL_VS_ZENNIT = 0.4, 0.6, 4.0
#: largest relative difference of a replayed heatmap from the eager one that counts as the same
GRAPHS_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Subject:
    label: str
    stem: str  # the JSON file: <stem>_<device>.json
    where: dict = field(default_factory=dict)  # row fields that select it
    gradient: str = "gradient"
    zennit: str = "zennit"
    prefix: str = ""  # of the fast methods' names


SUBJECTS = (
    Subject("VGG-16 + KDE head (DeepNeon)", "speed", {"head": "kde_outlier"}, zennit="reference"),
    Subject("VGG-16 classifier, fast composite", "speed", {"head": "vgg16 classifier"}, "classifier_gradient",
            "classifier_zennit", "classifier_"),
    Subject("ResNet-50 taps + KDE head (DeepNeon)", "backbones", {"backbone": "resnet50"}),
    Subject("ResNet-18 taps + KDE head (DeepNeon)", "backbones", {"backbone": "resnet18"}),
    Subject("VGG-16 features (LRP alone)", "fast_lrp"),
)
VARIANTS = {"eager": "fast", "fused": "fast_fused", "graphs": "fast_graphs"}


def batch_goal(batch: int) -> float | None:
    """The throughput goal relative to the gradient at ``batch`` (None between 1 and 32: no goal there)."""
    return GOAL_BATCH_1 if batch == 1 else GOAL_LARGE_BATCH if batch >= 32 else None


def _selected(row: dict, where: dict) -> bool:
    return all(row.get(key) == value for key, value in where.items())


def exact_variant(variant: str, check: dict) -> bool | None:
    """Whether ``variant`` gave the eager heatmap according to ``check`` (None: nothing recorded)."""
    if variant == "eager":
        return True
    if variant == "fused":
        return check.get("fused_equals_fast")
    if "graphs_vs_fast_max_rel_error" not in check:
        return None
    error = check["graphs_vs_fast_max_rel_error"]
    return (check.get("graphs_off") is None and bool(check.get("graph_replays")) and error is not None
            and error <= GRAPHS_TOLERANCE)


def subject_rows(subject: Subject, result: dict) -> list[dict]:
    """One row per batch and variant present in ``result`` (exact-policy rows only)."""
    rows = [row for row in result.get("rows", []) if row.get("precision", result.get("precision")) == "exact"
            and _selected(row, subject.where)]
    checks = [check for check in result.get("checks", []) if _selected(check, subject.where)]
    out = []
    for batch in sorted({row["batch"] for row in rows}):
        at = {row["method"]: row for row in rows if row["batch"] == batch}
        check = next((c for c in checks if c.get("batch") == batch), {})
        if subject.gradient not in at:
            continue
        gradient = at[subject.gradient]["median_s"]
        zennit = at.get(subject.zennit, {}).get("median_s")
        for variant, method in VARIANTS.items():
            row = at.get(subject.prefix + method)
            if row is None:
                continue
            ratio = gradient / row["median_s"]
            vs_zennit = zennit / row["median_s"] if zennit else None
            exact = exact_variant(variant, {**check, **row})  # bench_fast_lrp keeps its checks in the rows
            goal = batch_goal(batch)
            out.append({
                "subject": subject.label, "batch": batch, "variant": variant, "method": subject.prefix + method,
                "images_per_s": batch / row["median_s"], "ratio_to_gradient": ratio, "goal": goal,
                "vs_zennit": vs_zennit, "exact": exact,
                "meets_gradient_goal": None if goal is None else bool(exact) and ratio >= goal,
                "meets_zennit_goal": None if vs_zennit is None else bool(exact) and vs_zennit >= GOAL_VS_ZENNIT,
            })
    return out


def read(results: Path, device: str, since: float = 0.0) -> tuple[list[dict], list[str]]:
    """Goal rows of every subject whose JSON is in ``results`` (written at or after ``since``, seconds since the
    epoch: a file of an earlier run is not mixed in); the files read."""
    rows, files = [], []
    for stem in dict.fromkeys(subject.stem for subject in SUBJECTS):
        path = results / f"{stem}_{device}.json"
        if not path.exists() or path.stat().st_mtime < since:
            continue
        result = json.loads(path.read_text())
        files.append(path.name + (" (interrupted: the rows measured before its time cap)"
                                  if result.get("interrupted") else ""))
        for subject in SUBJECTS:
            if subject.stem == stem:
                rows += subject_rows(subject, result)
    return rows, files


def best(rows: list[dict]) -> list[dict]:
    """Per subject and batch: the fastest exact variant, and whether it meets the goals."""
    out = []
    for key in dict.fromkeys((row["subject"], row["batch"]) for row in rows):
        exact = [row for row in rows if (row["subject"], row["batch"]) == key and row["exact"]]
        if exact:
            top = max(exact, key=lambda row: row["ratio_to_gradient"])
            out.append({key_: top[key_] for key_ in ("subject", "batch", "variant", "ratio_to_gradient", "goal",
                                                     "vs_zennit", "meets_gradient_goal", "meets_zennit_goal")})
    return out


def table(rows: list[dict]) -> str:
    def fmt(value, spec: str) -> str:
        if value is None:
            return ""
        if isinstance(value, bool):
            return "yes" if value else "**no**"
        return format(value, spec)

    lines = ["| subject | batch | variant | img/s | / gradient | goal | / Zennit | exact | goals met |",
             "|---|---:|---|---:|---:|---:|---:|---|---|"]
    for row in rows:
        met = [flag for flag in (row["meets_gradient_goal"], row["meets_zennit_goal"]) if flag is not None]
        lines.append(f"| {row['subject']} | {row['batch']} | {row['variant']} | {fmt(row['images_per_s'], '.1f')} | "
                     f"{fmt(row['ratio_to_gradient'], '.2f')} | {fmt(row['goal'], '.1f')} | "
                     f"{fmt(row['vs_zennit'], '.1f')} | {fmt(row['exact'], '')} | "
                     f"{fmt(all(met), '') if met else ''} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="which files: <benchmark>_<device>.json (default cuda)")
    parser.add_argument("--results", default=str(RESULTS), help="folder of the JSON files")
    parser.add_argument("--since", type=float, default=0.0,
                        help="read only files written at or after this time (seconds since the epoch)")
    parser.add_argument("--output", default=None, help="JSON path (default <results>/goals_<device>.json)")
    args = parser.parse_args(argv)
    results = Path(args.results)
    rows, files = read(results, args.device, args.since)
    if not rows:
        print(f"no exact-policy rows in {results}/*_{args.device}.json", file=sys.stderr)
        return {"files": files, "rows": [], "best": []}
    result = {"benchmark": "goals", "device": args.device, "files": files,
              "goals": {"batch_1": GOAL_BATCH_1, "batch_32_and_more": GOAL_LARGE_BATCH, "vs_zennit": GOAL_VS_ZENNIT},
              "rows": rows, "best": best(rows)}
    print(table(rows))
    print("\nfastest exact variant per subject and batch:")
    print(table([{**row, "method": None, "images_per_s": None, "exact": True} for row in result["best"]]))
    path = Path(args.output) if args.output else results / f"goals_{args.device}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
