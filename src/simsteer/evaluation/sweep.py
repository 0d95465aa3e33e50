"""``sims sweep``: ablations over the loop's settings from one command.

Every grid point is an ordinary run directory made by a ``sims run`` command line
(``OUT/<key=value_...>/``), so ``sims info`` / ``sims eval`` work on each. The sweep is
resumable: a finished point is skipped, a started one continues with ``sims run
--resume``, and the grid and run options are stored in ``OUT/sweep.json`` so a second
call with other settings is refused instead of mixing results.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import SimsError
from ..io import read_json, write_json
from ..loop.rundir import RunDir

#: grid key -> ``sims run`` flag (any other key is taken as a flag name itself).
GRID_KEYS = {
    "T": "--iterations",
    "iterations": "--iterations",
    "K": "--samples-per-prompt",
    "samples_per_prompt": "--samples-per-prompt",
    "N": "--prompts-per-iteration",
    "prompts_per_iteration": "--prompts-per-iteration",
    "tokens": "--max-new-tokens",
    "max_new_tokens": "--max-new-tokens",
}

Runner = Callable[[list[str]], int]


def parse_grid(specs: Sequence[str]) -> dict[str, list[str]]:
    """``["K=2,4", "T=1,3"]`` -> ``{"K": ["2", "4"], "T": ["1", "3"]}``."""
    grid: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        items = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not items:
            raise SimsError(f"a grid axis looks like K=2,4,8, got {spec!r}")
        if key in grid:
            raise SimsError(f"grid axis {key!r} is given twice")
        grid[key] = items
    if not grid:
        raise SimsError("give at least one grid axis, e.g. --grid K=2,4,8")
    return grid


def grid_points(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(grid[k] for k in keys))]


def point_name(point: dict[str, str]) -> str:
    return "_".join(f"{k}={v}" for k, v in point.items())


def _flag(key: str) -> str:
    return GRID_KEYS.get(key, "--" + key.replace("_", "-"))


#: ``sims run`` flags that allow code, an endpoint or a key, each naming its target:
#: ``sims run --resume`` runs or sends those only when typed again, with the same values.
CONSENT_FLAGS = ("--oracle", "--model", "--judge-base-url", "--judge-url-env", "--judge-api-key-env")


def _consent(argv: Sequence[str]) -> list[str]:
    """The flags of ``argv`` that allow code, an endpoint or a key (``--oracle``,
    ``--trust-remote-code`` with ``--model``, ``--judge-base-url`` / ``--judge-url-env``,
    ``--judge-api-key-env``), as typed: the resume compares each with what the point's
    ``config.json`` saved, so an edited point (another URL, another model) is refused."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        name, eq, _ = arg.partition("=")
        if name == "--trust-remote-code":
            out.append(arg)
        elif name in CONSENT_FLAGS:
            out += [arg] if eq else list(argv[i : i + 2])
    return out


def run_sweep(
    out: str | Path,
    grid: dict[str, list[str]],
    run_args: Sequence[str],
    runner: Runner,
    worker_args: Sequence[str] = (),
    check: Callable[[list[str]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) every grid point and return one row per point.

    Args:
        out: the sweep folder.
        grid: axis -> values (see :data:`GRID_KEYS`).
        run_args: further ``sims run`` options shared by every point.
        runner: runs one ``sims`` command line and returns its exit status
            (``simsteer.cli.main``; passed in, so studies never import the CLI).
        worker_args: ``--workers N`` / ``--ray-address A`` given to every point's run,
            new or resumed; not a setting of the sweep (any pool gives the same results).
        check: called with each resume command line before any point runs; raises to
            refuse the sweep (``sims sweep``: the resume's own checks, so an edited point
            is refused in one line before anything runs or is sent).

    Example:
        >>> from simsteer.cli import main
        >>> run_sweep("runs/sweep", {"K": ["2", "4"]}, ["-T", "1", "--quiet"], main)
    """
    out = Path(out)
    for bad in ("--out", "-o", "--resume", "--workers", "--ray-address"):
        if any(a == bad or a.startswith(bad + "=") for a in run_args):
            if bad in ("--workers", "--ray-address"):
                raise SimsError(
                    f"give {bad} to sims sweep itself, before --: it starts Ray once for every point"
                )
            raise SimsError(f"{bad} is set by the sweep for each point; leave it out")
    spec = {"grid": grid, "run_args": list(run_args)}
    meta = out / "sweep.json"
    if meta.is_file():
        if read_json(meta) != spec:
            raise SimsError(f"{out} holds a sweep with other settings: pick another folder")
    else:
        write_json(meta, spec)
    plans = []  # (point, run, command line or None when done, status)
    for point in grid_points(grid):
        run = RunDir(out / point_name(point))
        flags = [x for k, v in point.items() for x in (_flag(k), v)]
        if run.is_complete():
            plans.append((point, run, None, "done"))
        elif run.is_run():
            # Code, an endpoint or a key the point names needs its flag typed again on resume.
            consent = _consent([*run_args, *flags])
            argv = ["run", "--resume", str(run.root), *consent, *worker_args, "--quiet"]
            if check is not None:
                check(argv)  # every resumed point checked before any point runs
            plans.append((point, run, argv, "resumed"))
        else:
            argv = ["run", *run_args, *flags, *worker_args, "--out", str(run.root)]
            plans.append((point, run, argv, "ran"))
    rows = []
    for point, run, argv, status in plans:
        if argv is not None:
            code = runner(argv)
            if code != 0 or not run.is_complete():
                raise SimsError(f"sweep point {point_name(point)} failed (exit status {code})")
        rows.append({**point, "run": str(run.root), "status": status, **point_figures(run)})
    write_json(out / "results.json", rows)
    return rows


def point_figures(run: RunDir) -> dict[str, Any]:
    """A finished point's figures, each from the record that defines it: the policy the
    run kept and its held-out scores from ``outcome.json`` (not the last policy's), that
    policy's perplexity from its row, the costs summed over every row."""
    history = run.history()
    outcome = run.read_outcome()
    if outcome is None:
        raise SimsError(f"sweep point {run.root} has no outcome.json: continue it with sims run --resume")
    kept = history[outcome.final_policy] if outcome.final_policy < len(history) else None
    held = outcome.held_out
    return {
        "iterations_done": len(history) - 1,
        "final_policy": outcome.final_policy,
        "eval_score_base": None if held is None else held.base_score,
        "eval_score": None if held is None else held.final_score,
        "eval_perplexity": kept.eval_fluency.perplexity if kept and kept.eval_fluency else None,
        "tokens_generated": sum(r.tokens_generated for r in history),
        "seconds": round(sum(r.seconds_total for r in history), 1),
    }


def format_sweep(rows: list[dict[str, Any]], keys: Sequence[str]) -> str:
    def num(x: Any, spec: str) -> str:
        return "-" if x is None else f"{x:{spec}}"

    head = [*keys, "base score", "kept policy", "final score", "final ppl", "tokens", "seconds", "status"]
    lines = ["  ".join(f"{h:>11}" for h in head)]
    for r in rows:
        cells = [
            *(str(r[k]) for k in keys),
            num(r["eval_score_base"], "+.3f"),
            str(r["final_policy"]),
            num(r["eval_score"], "+.3f"),
            num(r["eval_perplexity"], ".2f"),
            str(r["tokens_generated"]),
            num(r["seconds"], ".1f"),
            r["status"],
        ]
        lines.append("  ".join(f"{c:>11}" for c in cells))
    return "\n".join(lines)
