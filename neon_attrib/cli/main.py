"""The ``neon-attrib`` command line: ``demo`` (the Wholesale analysis), ``explain`` (pixel heatmaps on VGG-16) and
``detect`` (PatchCore / PaDiM with NEON heatmaps)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_wholesale_demo

    summary = run_wholesale_demo(out_dir=args.out, n_draws=args.draws, seed=args.seed, progress=not args.quiet)
    print(f"Wrote {len(summary['files'])} files to {args.out}")
    for line in summary["findings"]:
        print(f"  {line}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neon-attrib", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="reproduce the book's Wholesale customers analysis (Figures 4 and 5)")
    demo.add_argument("--out", default="neon_demo", help="output folder for PNGs and JSON (default: %(default)s)")
    demo.add_argument("--draws", type=int, default=100, help="random-feature draws for the inlier error bars")
    demo.add_argument("--seed", type=int, default=0, help="seed of k-means, random features and t-SNE")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)

    try:
        from .explain import register_explain
    except ImportError:  # pragma: no cover - the explain command ships with the deep module
        pass
    else:
        register_explain(commands)
    try:
        from .dataset import register_explain_dataset
    except ImportError:  # pragma: no cover - zarr is missing
        pass
    else:
        register_explain_dataset(commands)
    from .detect import register_detect

    register_detect(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``neon-attrib`` console script.

    Exit codes: 0 success; 2 a usage error (bad arguments, unreadable inputs, an unusable output folder: one line on
    stderr, as argparse does); 1 an operating-system error while writing (disk full, ...: one line on stderr);
    130 interrupted (Ctrl-C).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"neon-attrib {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"neon-attrib {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"neon-attrib {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
