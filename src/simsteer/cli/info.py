"""``sims info``: summarise a run directory or a steering folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SimsError

if TYPE_CHECKING:
    from ..loop.rundir import RunDir


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``sims info``."""
    p = sub.add_parser("info", help="summarise a run directory or a steering folder")
    p.add_argument("path")
    p.set_defaults(func=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    """Print a run's settings, table and status, or a steering folder's contents."""
    from ..loop.rundir import RunDir
    from ..policy import load_policy
    from ..steering import CONFIG_NAME

    path = Path(args.path)
    run = RunDir(path)
    if run.is_run():
        _print_run(run, path)
        return 0
    if (path / CONFIG_NAME).is_file() or path.is_dir():
        policy = load_policy(path)
        if policy.is_unsteered:
            print(f"steering {path}: none (the unsteered model)")
        for steering in policy:
            print(
                f"steering {path}: learner {steering.learner}, layers {steering.layers}, "
                f"positions {steering.positions}, strength {steering.strength}"
            )
            print(f"  model {json.dumps(steering.fingerprint)}")
        return 0
    raise SimsError(f"{path} is neither a run directory nor a steering folder")


def _print_run(run: RunDir, path: Path) -> None:
    from ..loop.outcome import format_outcome
    from ..loop.table import format_table
    from ..policy import load_policy

    spec = run.spec()
    baseline = spec.extra.get("baseline")
    print(
        f"run {path}"
        if baseline is None
        else f"baseline {path}: {baseline}, mirrors the run {spec.extra.get('like')}"
    )
    print(f"  model   {spec.model.source} ({spec.model.fingerprint.get('architecture')}, {spec.model.dtype})")
    print(f"  oracle  {spec.oracle['name']}")
    learner = dict(spec.learner)
    print(f"  learner {learner.pop('name')} {json.dumps(learner)}")
    sims = spec.sims
    print(
        f"  T={sims.iterations} N={sims.prompts_per_iteration} "
        f"K={sims.samples_per_prompt} eval prompts={sims.eval_prompts}"
    )
    if baseline is not None and baseline != "random":
        # Built once from the mirrored run: no iterations, nothing to resume.
        print(f"status: built (a {baseline} baseline has no iterations); evaluate it with: sims eval {path}")
        return
    contrast = run.read_prompts(run.contrast_prompts)
    if contrast:
        print(f"  guard   {len(contrast)} contrast prompts, budget +{sims.guard.contrast_budget:g}")
    rows = run.history()
    own_scores = ""
    if baseline == "random":
        # Its loop scored everything with a random oracle: those figures measure nothing
        # the mirrored run aims at.
        mirrored = spec.extra.get("eval_oracle")
        name = mirrored.get("name") if isinstance(mirrored, dict) else mirrored
        own_scores = (
            f"the scores below are the random oracle's (random preferences, not the mirrored run's "
            f"{name or 'oracle'}); score it with the mirrored run's oracle: sims eval {path}"
        )
        print(own_scores)
    if rows:
        print(format_table(rows))
    if run.is_complete():
        outcome = run.read_outcome()
        if outcome:
            text = format_outcome(outcome)
            if own_scores:
                text = text.replace("held-out score ", "held-out score under the random oracle ")
            print(text)
        if load_policy(run.final).is_unsteered:
            print(f"no steering kept: {run.final} holds the unsteered model")
        print("status: complete")
    else:
        learned = sum(1 for row in rows if row.fit is not None)
        print(
            f"status: incomplete ({learned} of {sims.iterations} iterations learned, {len(rows)} of "
            f"{sims.iterations + 1} policies evaluated); continue with: sims run --resume {path}"
        )
