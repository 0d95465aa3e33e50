"""Evaluation subcommands of ``sims``: ``eval``, ``compare``, ``baseline``, ``sweep``,
``judge-check``, ``lc`` and ``arena``. :func:`add_commands` registers them on the main
parser and :func:`run_command` dispatches them (see ``cli.py``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import SimsError

COMMANDS = ("eval", "compare", "baseline", "sweep", "judge-check", "lc", "arena")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_commands(sub: Any) -> None:
    """Register the evaluation subcommands on ``sims``' subparsers."""
    ev = sub.add_parser("eval", help="evaluate a run: eval.json, report.md and plots in the run directory")
    ev.add_argument("run", help="run directory or baseline folder")
    ev.add_argument(
        "--judge", action="append", default=[], help="extra judge oracle for win rates (repeatable)"
    )
    ev.add_argument("--scorers", type=_names, default=None, help="attribute scorers (default: all built-in)")
    ev.add_argument(
        "--mc", type=_names, default=(), help="multiple-choice tasks, e.g. truthfulqa_mc1,arc_easy"
    )
    ev.add_argument("--mc-limit", type=_int, default=200, help="items per task (seeded subset; 0 = all)")
    ev.add_argument("--alpaca", type=_int, default=0, help="AlpacaEval instructions judged vs the reference")
    ev.add_argument(
        "--prompts", default=None, help="held-out prompts (default: the run's eval_prompts.jsonl)"
    )
    ev.add_argument("--max-new-tokens", type=_int, default=None)
    ev.add_argument("--data", default=None, help="evaluation data folder (default ../shared/data)")
    ev.add_argument("--bootstrap", type=_int, default=1000, help="bootstrap resamples")
    ev.add_argument("--out", default=None, help="report folder (default: the run directory)")

    cmp_ = sub.add_parser("compare", help="several evaluated runs in one table and plot")
    cmp_.add_argument("runs", nargs="+")
    cmp_.add_argument("--judge", default=None, help="which judge's win rate to show")
    cmp_.add_argument("--out", "-o", default="runs/compare")

    base = sub.add_parser(
        "baseline", help="build a baseline that mirrors a run: vanilla, ms, random, best-of-n"
    )
    base.add_argument("kind", help="vanilla, ms, random or best-of-n")
    base.add_argument(
        "--like", required=True, help="the SIMS run whose model, oracle, learner and prompts to use"
    )
    base.add_argument("--out", "-o", required=True)
    base.add_argument("--n", type=_int, default=4, help="best-of-n: samples per prompt")
    base.add_argument("--pairs", default=None, help="ms: labelled pairs (default: UltraFeedback train)")
    base.add_argument("--pairs-limit", type=_int, default=1000, help="ms: pairs used")
    base.add_argument("--max-response-tokens", type=_int, default=128, help="ms: answer tokens used per pair")
    base.add_argument(
        "--data", default=None, help="ms: data folder holding ultrafeedback/ (default ../shared/data)"
    )
    base.add_argument("--seed", type=_int, default=0)
    base.add_argument("--quiet", action="store_true")

    sw = sub.add_parser("sweep", help="ablation grid of `sims run`, resumable; each point is a run directory")
    sw.add_argument("--out", "-o", required=True, help="sweep folder")
    sw.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="axis: T, K, N, tokens (or any sims run option name); repeatable",
    )
    sw.add_argument("run_args", nargs=argparse.REMAINDER, help="after --: options passed to every sims run")

    jc = sub.add_parser("judge-check", help="an oracle's agreement with human preference pairs")
    jc.add_argument(
        "--oracle", required=True, help="oracle spec, as in sims run (sentiment, self-judge, judge:URL, ...)"
    )
    jc.add_argument("--pairs", default=None, help="JSONL(.gz) pairs (default: HH-RLHF harmless-base test)")
    jc.add_argument("--limit", type=_int, default=None, help="first N pairs only (default: all)")
    jc.add_argument(
        "--model", default=None, help="backbone of self-rank / self-judge* (default: the embedded model)"
    )
    jc.add_argument("--dtype", default="auto", help="dtype of --model (auto, float32, bfloat16, float16)")
    jc.add_argument("--data", default=None, help="data folder holding hh_rlhf/ (default ../shared/data)")

    lc = sub.add_parser("lc", help="win rate and length-controlled win rate of AlpacaEval annotation files")
    lc.add_argument("annotations", nargs="+")
    lc.add_argument("--leaderboard", default=None, help="AlpacaEval leaderboard CSV to compare with")
    lc.add_argument("--free-slope", action="store_true", help="no prior on the length slope")

    ar = sub.add_parser(
        "arena", help="Arena-Hard-style scores: judge answers vs a baseline, BT fit, bootstrap"
    )
    ar.add_argument("--questions", help="Arena-Hard question.jsonl")
    ar.add_argument("--answers", nargs="*", default=[], help="model answer JSONL files")
    ar.add_argument("--baseline", help="the baseline model's answer JSONL")
    ar.add_argument("--judge", default=None, help="oracle that judges (writes judgments)")
    ar.add_argument("--judgments", nargs="*", default=[], help="existing judgment JSONL files instead")
    ar.add_argument("--baseline-name", default=None)
    ar.add_argument("--out", default=None, help="write judgments JSONL here")


def run_command(args: argparse.Namespace) -> int:
    handler = {
        "eval": _eval,
        "compare": _compare,
        "baseline": _baseline,
        "sweep": _sweep,
        "judge-check": _judge_check,
        "lc": _lc,
        "arena": _arena,
    }[args.command]
    return handler(args)


def _eval(args: argparse.Namespace) -> int:
    from ..evaluation.report import write_report
    from ..evaluation.run_eval import SCORERS, EvalConfig, evaluate_run

    config = EvalConfig(
        judges=tuple(args.judge),
        scorers=args.scorers or SCORERS,
        mc_tasks=args.mc,
        mc_limit=args.mc_limit or None,
        alpaca=args.alpaca,
        prompts=args.prompts,
        max_new_tokens=args.max_new_tokens,
        data=args.data,
        bootstrap_rounds=args.bootstrap,
    )
    result = evaluate_run(args.run, config)
    path = write_report(result, Path(args.out or args.run))
    for judge, w in result["win_rates_vs_base"].items():
        v = w["win_rate"]
        print(
            f"win rate vs base ({judge}): {100 * v['value']:.1f}% "
            f"[{100 * v['ci_low']:.1f}, {100 * v['ci_high']:.1f}]"
        )
    print(f"report written to {path}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from ..evaluation.report import write_comparison

    print(write_comparison(args.runs, Path(args.out), args.judge))
    print(f"comparison written to {Path(args.out) / 'compare.md'}")
    return 0


def _baseline(args: argparse.Namespace) -> int:
    from ..evaluation.baselines import BASELINES, RandomOracle, fit_labelled_steering, write_baseline
    from ..io import read_json
    from ..loop.rundir import RunDir

    if args.kind not in BASELINES:
        raise SimsError(f"unknown baseline {args.kind!r}; baselines: {', '.join(BASELINES)}")
    like, out = Path(args.like), Path(args.out)
    if not RunDir(like).is_run():
        raise SimsError(f"{like} is not a run directory (no config.json)")
    cfg = read_json(RunDir(like).config)
    if args.kind == "vanilla":
        write_baseline(out, "vanilla", like)
    elif args.kind == "best-of-n":
        write_baseline(out, "best-of-n", like, {"n": args.n, "seed": args.seed})
    else:
        from ..learners import get_learner
        from ..models import load_model

        hp = dict(cfg["learner"])
        learner = get_learner(hp.pop("name"), **hp)
        lm = load_model(cfg["model"]["source"], dtype=cfg["model"].get("dtype"))
        if args.kind == "ms":
            _ms(args, lm, learner, cfg, like, out, fit_labelled_steering, write_baseline)
        else:
            _random(args, lm, learner, cfg, like, out, RandomOracle)
    print(f"baseline {args.kind} written to {out}")
    return 0


def _ms(args, lm, learner, cfg, like, out, fit, write) -> None:
    import time

    from ..evaluation.datasets import data_dir, load_pairs

    if Path(out, "config.json").is_file():
        raise SimsError(f"{out} already holds a run or baseline: pick another --out")
    pairs_path = (
        Path(args.pairs)
        if args.pairs
        else (data_dir(args.data) / "ultrafeedback" / "data" / "processed" / "train_clean.jsonl")
    )
    pairs = load_pairs(pairs_path, args.pairs_limit)
    clock = time.perf_counter()
    steering, tokens = fit(
        lm, learner, pairs, cfg["sims"].get("summary", "mean"), max_response_tokens=args.max_response_tokens
    )
    write(
        out,
        "ms",
        like,
        {
            "pairs": str(pairs_path),
            "num_pairs": len(pairs),
            "tokens_forward": tokens,
            "fit_seconds": round(time.perf_counter() - clock, 1),
        },
        steering,
    )


def _random(args, lm, learner, cfg, like, out, random_oracle) -> None:
    from ..loop.config import SIMSConfig
    from ..loop.sims import SIMS
    from ..prompts import load_prompts

    cli = cfg.get("cli")
    if not cli:
        raise SimsError(f"{like} was not started by `sims run`: its prompt pool is unknown")
    pool = load_prompts(cli.get("prompts"))
    held_out = load_prompts(cli["eval_prompts_file"]) if cli.get("eval_prompts_file") else None
    sims = SIMS(
        lm, random_oracle(args.seed), learner, SIMSConfig.from_dict(cfg["sims"]), progress=not args.quiet
    )
    extra = {"baseline": "random", "eval_oracle": cfg["oracle"]["name"], "like": str(like)}
    sims.fit(pool, out, eval_prompts=held_out, extra_config=extra)


def _sweep(args: argparse.Namespace) -> int:
    from ..evaluation.sweep import format_sweep, parse_grid, run_sweep

    grid = parse_grid(args.grid)
    run_args = list(args.run_args)
    if run_args[:1] == ["--"]:
        run_args = run_args[1:]
    rows = run_sweep(args.out, grid, run_args)
    print(format_sweep(rows, list(grid)))
    return 0


def _judge_check(args: argparse.Namespace) -> int:
    from ..evaluation.datasets import data_dir, load_pairs
    from ..evaluation.judge_check import check_judge
    from ..oracles import get_oracle

    path = (
        Path(args.pairs)
        if args.pairs
        else data_dir(args.data) / "hh_rlhf" / "harmless-base" / "test.jsonl.gz"
    )
    from ..oracles import MODEL_ORACLES

    lm = None
    if args.oracle in MODEL_ORACLES:  # the model judges: load it
        from ..models import load_model

        lm = load_model(args.model, dtype=args.dtype)
    oracle = get_oracle(args.oracle, lm=lm)
    result = check_judge(oracle, load_pairs(path, args.limit), progress=True)
    print(json.dumps({"pairs": str(path), **result.to_dict()}, indent=2))
    return 0


def _lc(args: argparse.Namespace) -> int:
    import csv

    import numpy as np

    from ..evaluation.datasets import load_alpaca_annotations
    from ..evaluation.lc import LENGTH_PRIOR, length_controlled_win_rate

    published: dict[str, dict[str, str]] = {}
    if args.leaderboard:
        with open(args.leaderboard, encoding="utf-8") as fh:
            published = {row[""]: row for row in csv.DictReader(fh)}
    print(f"{'model':<28} {'WR':>6} {'pub WR':>7} {'LC':>6} {'95% CI':>13} {'pub LC':>7} {'slope':>6}")
    for path in args.annotations:
        rows = load_alpaca_annotations(path)
        pref = np.array([r["preference"] for r in rows])
        lc = length_controlled_win_rate(
            pref,
            [r["len_2"] for r in rows],
            [r["len_1"] for r in rows],
            length_prior=None if args.free_slope else LENGTH_PRIOR,
        )
        model = rows[0]["generator_2"] or Path(path).parent.parent.name
        pub = published.get(model, {})
        pwr = f"{float(pub['win_rate']):.2f}" if pub else "-"
        plc = f"{float(pub['length_controlled_winrate']):.2f}" if pub else "-"
        ci = f"[{100 * lc.ci_low:.1f}, {100 * lc.ci_high:.1f}]"
        print(
            f"{model:<28} {100 * lc.raw:6.2f} {pwr:>7} {100 * lc.value:6.2f} {ci:>13} {plc:>7} "
            f"{lc.length_coefficient:6.2f}"
        )
    return 0


def _arena(args: argparse.Namespace) -> int:
    from ..evaluation.arena import (
        arena_scores,
        battles_from_judgments,
        judge_arena,
        load_answers,
        load_questions,
    )
    from ..io import read_jsonl, write_jsonl

    judgments: list[dict] = []
    for path in args.judgments:
        judgments += read_jsonl(path)
    baseline = args.baseline_name
    if args.judge:
        from ..oracles import get_oracle

        if not (args.questions and args.baseline and args.answers):
            raise SimsError("--judge needs --questions, --baseline and --answers")
        questions = load_questions(args.questions)
        baseline, base_answers = load_answers(args.baseline)
        oracle = get_oracle(args.judge)
        for path in args.answers:
            model, answers = load_answers(path)
            qs = [(q, t) for q, t in questions if q in answers and q in base_answers]
            judgments += judge_arena(
                oracle,
                [t for _, t in qs],
                [answers[q] for q, _ in qs],
                [base_answers[q] for q, _ in qs],
                model,
                [q for q, _ in qs],
            )
        if args.out:
            write_jsonl(args.out, judgments)
    if not judgments:
        raise SimsError("nothing to score: pass --judgments FILES or --judge with answers")
    if not baseline:
        raise SimsError("name the baseline model with --baseline-name (or --baseline FILE)")
    print(f"{'model':<32} {'score':>6} {'95% CI':>15} {'rating':>7}")
    for s in arena_scores(battles_from_judgments(judgments, baseline), baseline):
        print(f"{s.model:<32} {s.score:6.1f} {f'[{s.ci_low:.1f}, {s.ci_high:.1f}]':>15} {s.rating:7.0f}")
    sys.stdout.flush()
    return 0
