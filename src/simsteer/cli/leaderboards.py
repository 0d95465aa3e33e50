"""``sims lc`` and ``sims arena``: AlpacaEval LC win rates and Arena-Hard-style scores."""

from __future__ import annotations

import argparse
import sys

from ..errors import SimsError
from ..oracles import ORACLE_NAMES
from .checks import reading
from .options import add_judge_options, judge_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``sims lc`` and ``sims arena``."""
    lc = sub.add_parser("lc", help="win rate and length-controlled win rate of AlpacaEval annotation files")
    lc.add_argument("annotations", nargs="+")
    lc.add_argument("--leaderboard", default=None, help="AlpacaEval leaderboard CSV to compare with")
    lc.add_argument("--free-slope", action="store_true", help="no prior on the length slope")
    lc.set_defaults(func=cmd_lc)

    ar = sub.add_parser(
        "arena", help="Arena-Hard-style scores: judge answers vs a baseline, BT fit, bootstrap"
    )
    ar.add_argument("--questions", help="Arena-Hard question.jsonl")
    ar.add_argument("--answers", nargs="*", default=[], help="model answer JSONL files")
    ar.add_argument("--baseline", help="the baseline model's answer JSONL")
    ar.add_argument(
        "--judge",
        default=None,
        help=f"oracle that judges (writes judgments), one of: {', '.join(ORACLE_NAMES)}",
    )
    ar.add_argument("--judgments", nargs="*", default=[], help="existing judgment JSONL files instead")
    ar.add_argument(
        "--baseline-name", default=None, help="with --judgments: the model the others were judged against"
    )
    ar.add_argument("--out", default=None, help="write judgments JSONL here")
    add_judge_options(ar, "--judge judge:MODEL@BASE_URL")
    ar.set_defaults(func=cmd_arena)


def cmd_lc(args: argparse.Namespace) -> int:
    """Print WR and LC WR of each annotation file beside the published leaderboard."""
    from ..evaluation.lc import annotation_win_rates, read_leaderboard

    published: dict[str, dict[str, str]] = {}
    if args.leaderboard:
        with reading(args.leaderboard, "AlpacaEval leaderboard CSV"):
            published = read_leaderboard(args.leaderboard)
    results = []
    for path in args.annotations:  # every file is read before anything is printed
        with reading(path, "AlpacaEval annotation file"):
            results.append(annotation_win_rates(path, free_slope=args.free_slope))
    print(f"{'model':<28} {'WR':>6} {'pub WR':>7} {'LC':>6} {'95% CI':>13} {'pub LC':>7} {'slope':>6}")
    for model, lc in results:
        pub = published.get(model, {})
        with reading(args.leaderboard, "AlpacaEval leaderboard CSV"):
            pwr = f"{float(pub['win_rate']):.2f}" if pub else "-"
            plc = f"{float(pub['length_controlled_winrate']):.2f}" if pub else "-"
        ci = f"[{100 * lc.ci_low:.1f}, {100 * lc.ci_high:.1f}]"
        print(
            f"{model:<28} {100 * lc.raw:6.2f} {pwr:>7} {100 * lc.value:6.2f} {ci:>13} {plc:>7} "
            f"{lc.length_coefficient:6.2f}"
        )
    return 0


def cmd_arena(args: argparse.Namespace) -> int:
    """Judge answers against a baseline (or read judgments) and print the scores."""
    from ..evaluation.arena import arena_scores, battles_from_judgments, judge_answer_files
    from ..io import read_jsonl, write_jsonl

    judgments: list[dict] = []
    for path in args.judgments:
        rows = read_jsonl(path)
        with reading(path, "judgment file"):
            battles_from_judgments(rows, "baseline")  # each row checked where it was read
        judgments += rows
    baseline = args.baseline_name
    if args.judge:
        from ..evaluation.arena import load_answers, load_questions
        from ..oracles import get_oracle

        if not (args.questions and args.baseline and args.answers):
            raise SimsError("--judge needs --questions, --baseline and --answers")
        with reading(args.questions, "question file"):
            load_questions(args.questions)
        for path in [args.baseline, *args.answers]:
            with reading(path, "answer file"):
                load_answers(path)
        baseline, judged = judge_answer_files(
            get_oracle(args.judge, judge_options=judge_options(args)),
            args.questions,
            args.baseline,
            args.answers,
        )
        judgments += judged
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
