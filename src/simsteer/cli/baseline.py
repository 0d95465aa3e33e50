"""``sims baseline``: build a baseline that mirrors a run (vanilla, ms, random, best-of-n)."""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

from ..errors import SimsError
from ..evaluation.baselines import BASELINES, build_baseline
from ..loop.rundir import RunDir
from .options import positive, seed
from .trust import add_consent_options, check_consent


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``sims baseline``."""
    defaults = {
        name: p.default
        for name, p in inspect.signature(build_baseline).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    p = sub.add_parser("baseline", help=f"build a baseline that mirrors a run: {', '.join(BASELINES)}")
    p.add_argument("kind", choices=BASELINES, help="the baseline to build")
    p.add_argument(
        "--like", required=True, help="the SIMS run whose model, oracle, learner and prompts to use"
    )
    p.add_argument("--out", "-o", required=True)
    p.add_argument("--n", type=positive, default=defaults["n"], help="best-of-n: samples per prompt")
    p.add_argument("--pairs", default=None, help="ms: labelled pairs (default: UltraFeedback train)")
    p.add_argument("--pairs-limit", type=positive, default=defaults["pairs_limit"], help="ms: pairs used")
    p.add_argument(
        "--max-response-tokens",
        type=positive,
        default=defaults["max_response_tokens"],
        help="ms: answer tokens used per pair",
    )
    p.add_argument(
        "--data", default=None, help="ms: data folder holding ultrafeedback/ (default ../shared/data)"
    )
    p.add_argument("--seed", type=seed, default=defaults["seed"])
    p.add_argument("--quiet", action="store_true")
    add_consent_options(p, "the --like run")
    p.set_defaults(func=cmd_baseline)


def cmd_baseline(args: argparse.Namespace) -> int:
    """Build the baseline and say where it is."""
    like = RunDir(Path(args.like))
    if not like.is_run():
        raise SimsError(f"{args.like} is not a run directory (no config.json)")
    # What the run names runs code or sends a key only when the same flags are typed here.
    spec = like.spec()
    trusted = check_consent(args, spec.oracle, spec.model, args.like, "baseline")
    out = build_baseline(
        args.kind,
        Path(args.like),
        Path(args.out),
        n=args.n,
        pairs=args.pairs,
        pairs_limit=args.pairs_limit,
        max_response_tokens=args.max_response_tokens,
        data=args.data,
        seed=args.seed,
        progress=not args.quiet,
        trusted=trusted,
    )
    print(f"baseline {args.kind} written to {out}")
    return 0
