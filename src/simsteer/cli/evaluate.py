"""``sims eval``, ``sims compare`` and ``sims judge-check``: studies of runs and oracles."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from ..errors import SimsError
from ..evaluation.datasets import MC_TASKS
from ..evaluation.run_eval import SCORERS, EvalConfig
from ..loop.rundir import RunDir, report_lock
from ..oracles import ORACLE_NAMES
from .checks import reading
from .options import (
    add_judge_options,
    add_worker_options,
    check_workers,
    count,
    judge_options,
    names,
    positive,
    typed_judge_options,
)
from .refusal import add_refusal_options, cmd_refusal
from .trust import add_consent_options, check_consent, check_model_config, check_paths

_ORACLES = ", ".join(ORACLE_NAMES)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``sims eval``, ``sims compare`` and ``sims judge-check``."""
    base = EvalConfig()
    ev = sub.add_parser("eval", help="evaluate a run: eval.json, report.md and plots in the run directory")
    ev.add_argument("run", help="run directory or baseline folder")
    ev.add_argument(
        "--judge",
        action="append",
        default=[],
        help=f"extra judge oracle for win rates (repeatable), one of: {_ORACLES}",
    )
    ev.add_argument(
        "--scorers",
        type=names,
        default=base.scorers,
        help=f"attribute scorers (default: {','.join(SCORERS)})",
    )
    ev.add_argument(
        "--mc", type=names, default=base.mc_tasks, help=f"multiple-choice tasks from: {', '.join(MC_TASKS)}"
    )
    ev.add_argument(
        "--mc-limit", type=count, default=base.mc_limit, help="items per task (seeded subset; 0 = all)"
    )
    ev.add_argument(
        "--alpaca", type=count, default=base.alpaca, help="AlpacaEval instructions judged vs the reference"
    )
    ev.add_argument(
        "--prompts", default=None, help="held-out prompts (default: the run's eval_prompts.jsonl)"
    )
    ev.add_argument(
        "--limit",
        type=positive,
        default=None,
        help="answer only the first N held-out prompts (--task refusal: of each set; default: all)",
    )
    ev.add_argument("--quiet", action="store_true", help="no stage lines on stderr; the figures only")
    ev.add_argument(
        "--max-new-tokens", type=positive, default=None, help="answer length cap (default: the run's)"
    )
    ev.add_argument(
        "--data-dir",
        "--data",
        dest="data",
        default=None,
        help="evaluation data folder, laid out as tests/data (default $SIMSTEER_DATA, else the HF hub)",
    )
    ev.add_argument("--bootstrap", type=count, default=base.bootstrap_rounds, help="bootstrap resamples")
    ev.add_argument("--out", default=None, help="report folder (default: the run directory)")
    add_consent_options(ev, "the run", judge=False)
    add_judge_options(ev, "--judge judge:MODEL@BASE_URL; a judge the run names is allowed by its URL")
    add_worker_options(ev)
    add_refusal_options(ev)
    ev.set_defaults(func=cmd_eval)

    cmp_ = sub.add_parser("compare", help="several evaluated runs in one table and plot")
    cmp_.add_argument("runs", nargs="+")
    cmp_.add_argument("--judge", default=None, help="which judge's win rate to show")
    cmp_.add_argument(
        "--out", "-o", default="runs/compare", help="folder for compare.md/.json/.png (default %(default)s)"
    )
    cmp_.set_defaults(func=cmd_compare)

    jc = sub.add_parser("judge-check", help="an oracle's agreement with human preference pairs")
    jc.add_argument("--oracle", required=True, help=f"oracle spec, as in sims run, one of: {_ORACLES}")
    jc.add_argument("--pairs", default=None, help="JSONL(.gz) pairs (default: HH-RLHF harmless-base test)")
    jc.add_argument("--limit", type=positive, default=None, help="first N pairs only (default: all)")
    jc.add_argument(
        "--model", default=None, help="backbone of self-rank / self-judge* (default: the embedded model)"
    )
    jc.add_argument("--dtype", default="auto", help="dtype of --model (auto, float32, bfloat16, float16)")
    jc.add_argument(
        "--data-dir",
        "--data",
        dest="data",
        default=None,
        help="data folder holding hh_rlhf/ (default $SIMSTEER_DATA, else the HF hub)",
    )
    add_judge_options(jc)
    jc.set_defaults(func=cmd_judge_check)


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a run and print its win rates against the unsteered model."""
    from ..evaluation.run_eval import eval_oracle, read_run

    # The oracle and model the folder names (a baseline's: the mirrored run's), allowed to
    # run code or send a key only when the same flags are typed here, before any is used.
    info = read_run(args.run)
    oracle = eval_oracle(info.config)
    trusted = check_consent(args, oracle, info.config["model"], args.run, "eval")
    # The same checks as --resume, before anything loads: saved paths absolute (the model,
    # the oracle's files), the model's config the one the folder was made with.
    run = RunDir(Path(args.run))
    spec = run.spec()
    check_paths(replace(spec, oracle=oracle if isinstance(oracle, dict) else {"name": oracle}), run.config)
    check_model_config(run.root, spec)
    check_workers(args)
    # The reports go into the run directory (by default) under its lock, like every write there.
    with report_lock(Path(args.out or args.run)):
        if args.task == "refusal":
            return cmd_refusal(args, trusted)
        return _evaluate(args, trusted)


def _evaluate(args: argparse.Namespace, trusted: frozenset[str]) -> int:
    from ..evaluation.report import write_report
    from ..evaluation.run_eval import evaluate_run

    config = EvalConfig(
        judges=tuple(args.judge),
        scorers=args.scorers,
        mc_tasks=args.mc,
        mc_limit=args.mc_limit or None,
        alpaca=args.alpaca,
        prompts=args.prompts,
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
        data=args.data,
        bootstrap_rounds=args.bootstrap,
        judge_options=typed_judge_options(args),
    )
    workers = {"workers": args.workers, "ray_address": args.ray_address}
    result = evaluate_run(args.run, config, trusted=trusted, progress=not args.quiet, **workers)
    path = write_report(result, Path(args.out or args.run))
    for line in key_figures(result.to_json()):
        print(line)
    print(f"report written to {path}")
    return 0


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def key_figures(result: dict) -> list[str]:
    """The lines ``sims eval`` prints: the oracle's score, fluency, win rates, multiple choice.

    Args:
        result: what :func:`~simsteer.evaluation.run_eval.evaluate_run` returns.
    """
    lines = [f"{result['num_prompts']} held-out prompts, greedy, base = the unsteered model"]
    oracle = result["oracle"]
    score = result["scores"].get(oracle)
    if score:
        d = score["delta"]
        lines.append(
            f"{oracle} score: {score['base']['mean']:+.3f} -> {score['policy']['mean']:+.3f} "
            f"(change {d['mean']:+.3f}, 95% CI [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}])"
        )
    base, ours = result["fluency"]["base"], result["fluency"]["policy"]
    before, after = base["perplexity"], ours["perplexity"]  # null when undefined
    known = bool(before) and after is not None
    ratio = f"x{after / before:.2f}" if known else "x-"
    lines.append(
        f"perplexity {_figure(before)} -> {_figure(after)} ({ratio}), "
        f"repetition {base['repetition']:.3f} -> {ours['repetition']:.3f}"
    )
    for judge, w in result["win_rates_vs_base"].items():
        v = w["win_rate"]
        interval = f"[{100 * v['ci_low']:.1f}, {100 * v['ci_high']:.1f}]"
        lines.append(f"win rate vs base ({judge}): {100 * v['value']:.1f}% {interval}")
    for task, m in result["mc"].items():
        if "policy" in m:
            lines.append(f"{task}: acc {m['base']['acc']:.3f} -> {m['policy']['acc']:.3f}")
        else:
            lines.append(f"{task}: acc {m['base']['acc']:.3f}")
    return lines


def cmd_compare(args: argparse.Namespace) -> int:
    """Write and print the comparison table of evaluated runs."""
    from ..evaluation.report import write_comparison

    print(write_comparison(args.runs, Path(args.out), args.judge))
    print(f"comparison written to {Path(args.out) / 'compare.md'}")
    return 0


def cmd_judge_check(args: argparse.Namespace) -> int:
    """Print an oracle's agreement with human preference pairs as JSON."""
    from ..evaluation.datasets import load_pair_set, load_pairs
    from ..evaluation.judge_check import check_judge
    from ..oracles import MODEL_ORACLES, get_oracle

    # checked before any model or oracle is loaded
    with reading(args.pairs or "the HH-RLHF pairs", "pairs file"):
        if args.pairs:
            pairs, path = load_pairs(args.pairs, args.limit), args.pairs
        else:
            pairs, path = load_pair_set("hh_rlhf", args.data, args.limit)
        bad = next((p for p in pairs if not all(isinstance(x, str) for x in vars(p).values())), None)
        if bad is not None:
            raise SimsError(f"{path}: prompt, chosen and rejected must be text, got {bad}"[:300])
    if not pairs:
        raise SimsError(f"{path} has no preference pairs")
    lm = None
    if args.oracle in MODEL_ORACLES:  # the model judges: load it
        from ..models import load_model

        lm = load_model(args.model, dtype=args.dtype)
    oracle = get_oracle(args.oracle, lm=lm, judge_options=judge_options(args))
    result = check_judge(oracle, pairs, progress=True)
    print(json.dumps({"pairs": str(path), **result.to_dict()}, indent=2))
    return 0
