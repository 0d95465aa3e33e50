"""``sims eval RUN --task refusal``: the options and handler of the refusal use case.

``sims eval`` (:mod:`.evaluate`) owns the command; this module adds the refusal task's
own options to it and runs the task when ``--task refusal`` is given, reusing
``--prompts`` (held-out harmful prompts), ``--max-new-tokens``, ``--bootstrap`` and
``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..evaluation.refusal import TASKS, RefusalEvalConfig
from .options import number


def add_refusal_options(p: argparse.ArgumentParser) -> None:
    """Add ``--task``, ``--benign``, ``--limit`` and ``--max-over-refusal`` to ``sims eval``."""
    base = RefusalEvalConfig()
    group = p.add_argument_group("refusal task (--task refusal)")
    group.add_argument(
        "--task",
        choices=TASKS,
        default=TASKS[0],
        help="default: scores, fluency and win rates on the held-out prompts; refusal: refusal rate "
        "on held-out harmful prompts (--prompts, default: the packaged harmful-test split) and "
        "over-refusal on benign instructions (--benign)",
    )
    group.add_argument(
        "--benign", default=None, help="benign prompt file (default: the packaged AlpacaEval instructions)"
    )
    group.add_argument(
        "--max-over-refusal",
        type=number,
        default=base.max_over_refusal_rise,
        help="largest allowed rise of the benign refusal rate, a share (default %(default)s)",
    )


def cmd_refusal(args: argparse.Namespace, trusted: frozenset[str]) -> int:
    """Evaluate refusals of a run, write ``refusal.json`` / ``refusal.md`` and print the table.

    Args:
        args: the parsed ``sims eval`` arguments.
        trusted: the consents :func:`~simsteer.cli.trust.check_consent` granted.
    """
    from ..evaluation.refusal import evaluate_refusal, refusal_table, write_refusal_report

    config = RefusalEvalConfig(
        harmful=args.prompts,
        benign=args.benign,
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
        max_over_refusal_rise=args.max_over_refusal,
        bootstrap_rounds=args.bootstrap,
    )
    workers = {"workers": args.workers, "ray_address": args.ray_address}
    result = evaluate_refusal(args.run, config, trusted=trusted, progress=True, **workers)
    path = write_refusal_report(result, Path(args.out or args.run))
    print(refusal_table(result), end="")
    print(f"report written to {path}")
    return 0
