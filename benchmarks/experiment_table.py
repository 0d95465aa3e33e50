"""The table of benchmarks/eval_experiment.sh: every method over every seed, pooled.

Reads ``OUT/seed_<S>/<method>/eval.json`` (written by ``sims eval``) and prints one row
per method pooled over the seeds (:mod:`simsteer.evaluation.pooled` says what each column is).

Usage: python benchmarks/experiment_table.py runs/experiment [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from simsteer.errors import SimsError
from simsteer.evaluation.pooled import pooled_row, pooled_table

METHODS = ("vanilla", "ms", "random", "best-of-4", "dpo", "sims-caa", "sims-bipo", "sims-pca", "sims-cs")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the experiment folder (seed_<S>/<method>/eval.json)")
    parser.add_argument("--attribute", default="readability", help="the attribute the loop never trained on")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    seeds = sorted(args.out.glob("seed_*"))
    if not seeds:
        print(f"no seed_* folders under {args.out}", file=sys.stderr)
        return 2
    rows: dict[str, dict] = {}
    for method in METHODS:
        files = [s / method / "eval.json" for s in seeds if (s / method / "eval.json").is_file()]
        if files:
            try:
                rows[method] = pooled_row([json.loads(f.read_text()) for f in files], args.attribute)
            except SimsError as exc:
                print(f"{method}: {exc}", file=sys.stderr)
                return 2
    if not rows:
        print(f"no evaluated methods under {args.out}", file=sys.stderr)
        return 2
    print(pooled_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
