"""``sims sweep``: an ablation grid of ``sims run``, one run directory per point."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial
from pathlib import Path

from ..errors import SimsError
from ..evaluation.sweep import GRID_KEYS, Runner
from .options import add_worker_options, check_workers


def add_parser(
    sub: argparse._SubParsersAction, runner: Runner, parse: Callable[[list[str]], argparse.Namespace]
) -> None:
    """Register ``sims sweep``.

    Args:
        runner: the ``sims`` entry point each grid point is run with (``main``; passed in
            so that the sweep, a study, never imports the command line).
        parse: parses a ``sims`` command line with the options typed on it (``given``),
            for the checks of a point's resume line.
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
    add_worker_options(p)
    p.add_argument("run_args", nargs=argparse.REMAINDER, help="after --: options passed to every sims run")
    p.set_defaults(func=cmd_sweep, runner=runner, parse=parse)


def check_point(argv: list[str], parse: Callable[[list[str]], argparse.Namespace]) -> None:
    """The checks ``sims run --resume`` makes before it imports, loads or sends anything
    (:func:`~simsteer.cli.resume.check_resume`), for one point's resume command line: an
    edited point (another judge URL, another model) is refused in one line naming it."""
    from ..errors import SimsError
    from .resume import check_resume

    args = parse(argv)
    try:
        check_resume(args)
    except SimsError as exc:
        raise SimsError(f"sweep point {Path(args.resume).name}: {exc}") from None


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run (or resume) every grid point and print the results table."""
    from ..evaluation.sweep import format_sweep, parse_grid, run_sweep

    grid = parse_grid(args.grid)
    run_args = list(args.run_args)
    if run_args[:1] == ["--"]:
        run_args = run_args[1:]
    check_workers(args)
    check_sweep_folder(Path(args.out), grid)  # before any point runs, not after them
    from ..workers import ray_session

    worker_args = [] if args.workers is None else ["--workers", str(args.workers)]
    worker_args += ["--ray-address", args.ray_address] if args.ray_address else []
    # One Ray for the whole sweep: each point's run starts its workers on it.
    with ray_session(args.workers, args.ray_address):
        rows = run_sweep(
            args.out, grid, run_args, args.runner, worker_args, check=partial(check_point, parse=args.parse)
        )
    print(format_sweep(rows, list(grid)))
    return 0


def check_sweep_folder(out: Path, grid: dict[str, list[str]]) -> None:
    """Refuse a sweep folder the sweep could not finish in: ``out`` or its files in the
    way (a file where a folder goes, a folder where ``sweep.json`` / ``results.json``
    go), or a point's folder that holds something other than a run.

    Args:
        out: the sweep folder.
        grid: axis -> values.
    """
    from ..evaluation.sweep import grid_points, point_name
    from ..loop.rundir import RunDir, check_new_run_dir

    if out.exists() and not out.is_dir():
        raise SimsError(f"--out {out} exists and is not a folder")
    for name in ("sweep.json", "results.json"):
        if (out / name).is_dir():
            raise SimsError(f"{out / name} is a folder; the sweep writes a file there")
    for point in grid_points(grid):
        folder = out / point_name(point)
        if not RunDir(folder).is_run():
            check_new_run_dir(folder)
