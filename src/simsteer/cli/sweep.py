"""``sims sweep``: an ablation grid of ``sims run``, one run directory per point."""

from __future__ import annotations

import argparse

from ..evaluation.sweep import GRID_KEYS, Runner


def add_parser(sub: argparse._SubParsersAction, runner: Runner) -> None:
    """Register ``sims sweep``.

    Args:
        runner: the ``sims`` entry point each grid point is run with (``main``; passed in
            so that the sweep, a study, never imports the command line).
    """
    p = sub.add_parser("sweep", help="ablation grid of `sims run`, resumable; each point is a run directory")
    p.add_argument("--out", "-o", required=True, help="sweep folder")
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help=f"axis: {', '.join(sorted(set(GRID_KEYS), key=str.lower))} (or any sims run option name); "
        "repeatable",
    )
    p.add_argument("run_args", nargs=argparse.REMAINDER, help="after --: options passed to every sims run")
    p.set_defaults(func=cmd_sweep, runner=runner)


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run (or resume) every grid point and print the results table."""
    from ..evaluation.sweep import format_sweep, parse_grid, run_sweep

    grid = parse_grid(args.grid)
    run_args = list(args.run_args)
    if run_args[:1] == ["--"]:
        run_args = run_args[1:]
    rows = run_sweep(args.out, grid, run_args, args.runner)
    print(format_sweep(rows, list(grid)))
    return 0
