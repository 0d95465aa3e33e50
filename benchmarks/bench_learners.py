"""Learner comparison on finished runs (issue: steering-function learners).

For each run directory (one ``sims run --learner NAME`` each, same prompts, oracle and
seed) prints one row: the oracle's mean score of the policy's samples at iterations 0-3
(``sample``) and of its greedy held-out answers (``eval``), the perplexity of the final
policy's held-out answers under the unsteered model (base in brackets), the learner's
mean fit seconds per iteration, and the final steering's sampling throughput as a ratio
to the unsteered model, measured here in one process on identical work (batch 32,
64 new tokens forced, top-k sampling, median of 4 pairs in ABBA order; see _throughput.py).

Usage:
    for L in caa hpr sea iti actadd; do
        .venv/bin/sims run --learner $L --fluency-budget off -o runs/learner-$L
    done
    .venv/bin/python benchmarks/bench_learners.py runs/learner-*
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from _throughput import measure


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=4, help="ABBA pairs per learner")
    args = parser.parse_args()

    from simsteer import load_model, load_prompts
    from simsteer.loop.rundir import RunDir
    from simsteer.policy import load_policy

    lm = load_model(device="cpu")
    prompts = [p.text for p in load_prompts()]
    header = (
        f"{'learner':<8} {'sample score, iter 0-3':<31} {'eval score, iter 0-3':<31} "
        f"{'eval ppl (base)':<16} {'fit s':>6} {'steered/unsteered':>18}"
    )
    print(header)
    for run in args.runs:
        history = RunDir(run).history()
        config = json.loads((run / "config.json").read_text())
        name = config.get("learner", {}).get("name", run.name)

        def series(key: str, rows=history) -> str:
            values = [getattr(r, key) for r in rows]
            return " ".join("   -  " if v is None else f"{v:+.3f}" for v in values)

        base_ppl = history[0].eval_fluency.perplexity if history[0].eval_fluency else None
        last_ppl = history[-1].eval_fluency.perplexity if history[-1].eval_fluency else None
        fits = [r.seconds["fit"] for r in history[:-1] if "fit" in r.seconds]
        fit = sum(fits) / len(fits) if fits else float("nan")
        policy = load_policy(run / "final") if (run / "final").exists() else []
        speed = measure(lm, policy, prompts, args.batch, args.new_tokens, args.repeats) if policy else None
        ppl = "-" if last_ppl is None else f"{last_ppl:.2f} ({base_ppl:.2f})"
        print(
            f"{name:<8} {series('sample_score'):<31} {series('eval_score'):<31} {ppl:<16} "
            f"{fit:6.2f}  {speed.describe() if speed else '-'}",
            flush=True,
        )
    print(f"({torch.get_num_threads()} threads, batch {args.batch}, {args.new_tokens} new tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
