"""``sims generate``: answer prompts with or without a saved steering."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import SimsError
from ..hooks import POSITIONS
from .checks import check_context, check_output_file
from .options import (
    add_model_options,
    add_sampling_options,
    model_source,
    positions,
    positive,
    sampling_config,
    strength,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``sims generate``."""
    p = sub.add_parser("generate", help="answer prompts with or without a saved steering")
    add_model_options(p)
    p.add_argument("--steering", default=None, help="steering folder or run directory")
    p.add_argument("--no-steer", action="store_true", help="answer with the unsteered model")
    p.add_argument(
        "--strength", type=strength, default=None, help="multiplier on the saved strength (-10 to 10)"
    )
    p.add_argument(
        "--positions",
        type=positions,
        default=None,
        help=f"override where the steering applies, one of: {', '.join(POSITIONS)}",
    )
    p.add_argument("--prompts", default=None, help="prompt file (JSONL or text)")
    p.add_argument("--prompt", "-p", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--output", default=None, help="write JSONL here instead of printing")
    p.add_argument("--num-samples", type=positive, default=1, help="answers per prompt (default %(default)s)")
    add_sampling_options(p, temperature=0.0)  # greedy: the same answers on every call
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    """Answer the prompts and print (or write) one JSON row per answer."""
    from ..generation.sampling import generate
    from ..io import write_jsonl
    from ..loop.rundir import RunDir
    from ..models import load_model
    from ..policy import Policy, load_policy
    from ..prompts import Prompt, load_prompts

    if args.no_steer and args.steering:
        raise SimsError("--no-steer and --steering exclude each other")
    if not args.no_steer and not args.steering:
        raise SimsError("name a --steering folder or run directory, or pass --no-steer")
    prompts = [Prompt(str(i), p) for i, p in enumerate(args.prompt)]
    if args.prompts:
        prompts += load_prompts(args.prompts)
    if not prompts:
        raise SimsError("no prompts: pass --prompts FILE or --prompt TEXT")
    if args.output:
        check_output_file(args.output)  # before the model load and the answers, not after
    sampling = sampling_config(args)
    policy = Policy()
    if args.steering:
        path = Path(args.steering)
        if RunDir(path).is_run():
            path = RunDir(path).final
        policy = load_policy(path)
    lm = load_model(
        model_source(args.model),
        device=args.device,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
    )
    policy.check_model(lm.model)
    check_context(lm, prompts, sampling.max_new_tokens)
    if args.strength is not None:
        policy = policy.scaled(args.strength)
    if args.positions is not None:
        policy = policy.with_positions(args.positions)
    gens = generate(
        lm,
        [p.text for p in prompts],
        args.num_samples,
        sampling,
        policy,
        seed=args.seed,
        progress=False if args.quiet else "generating",
    )
    # A run that kept the unsteered model has a final/ without layers: its answers are unsteered.
    steered = not policy.is_unsteered
    if args.steering and not steered and not args.quiet:
        print(
            f"{args.steering} holds no steering (the unsteered model): answers are unsteered", file=sys.stderr
        )
    rows = [
        {
            "id": p.id,
            "prompt": p.text,
            "sample": k,
            "response": g.text,
            "num_tokens": g.num_tokens,
            "steered": steered,
        }
        for p, gs in zip(prompts, gens, strict=True)
        for k, g in enumerate(gs)
    ]
    if args.output:
        write_jsonl(args.output, rows)
        print(f"wrote {len(rows)} responses to {args.output}", file=sys.stderr)
    else:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
    return 0
