"""``sims baseline``: build a baseline that mirrors a run (vanilla, ms, random, best-of-n, dpo)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from pathlib import Path

from ..errors import SimsError
from ..evaluation.baselines import BASELINES, build_baseline
from ..evaluation.dpo import DPOBaselineConfig
from ..loop.rundir import RunDir
from .options import names, non_negative_number, positive, positive_number, seed
from .trust import add_consent_options, check_consent, check_model_config, check_paths


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
    p.add_argument("--out", "-o", required=True, help="the baseline folder to write")
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
        "--data-dir",
        "--data",
        dest="data",
        default=None,
        help="ms: data folder holding ultrafeedback/ (default $SIMSTEER_DATA, else the HF hub)",
    )
    p.add_argument(
        "--seed", type=seed, default=defaults["seed"], help="best-of-n and random: seed (default %(default)s)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_dpo_options(p)
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
    # The same checks as --resume, before anything loads: saved paths absolute, the model's
    # config the one the run was started with.
    check_paths(spec, like.config)
    check_model_config(like.root, spec)
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
        dpo=dpo_config(args) if args.kind == "dpo" else None,
    )
    print(f"baseline {args.kind} written to {out}")
    return 0


#: ``sims baseline dpo`` options: config field -> (flag, type, help).
DPO_OPTIONS = {
    "beta": ("--dpo-beta", positive_number, "DPO's beta"),
    "learning_rate": ("--dpo-lr", positive_number, "learning rate of the LoRA weights"),
    "epochs": ("--dpo-epochs", positive, "passes over the pairs"),
    "batch_size": ("--dpo-batch-size", positive, "pairs per optimiser step"),
    "lora_r": ("--lora-r", positive, "LoRA rank"),
    "lora_alpha": ("--lora-alpha", positive, "LoRA alpha (the update is scaled by alpha / r)"),
    "lora_dropout": ("--lora-dropout", non_negative_number, "dropout on the LoRA input"),
    "target_modules": (
        "--lora-targets",
        names,
        "comma-separated module names (default: peft's for the model)",
    ),
    "lora_layers": (
        "--lora-layers",
        str,
        "decoder layers that get an adapter: 9-20, 3,5 or =-2,-1 (default all)",
    ),
    "max_pairs": (
        "--max-pairs",
        positive,
        "train on at most this many of the run's pairs, evenly spaced (default all)",
    ),
    "max_length": ("--dpo-max-length", positive, "cut each prompt + answer to this many tokens"),
    "device": ("--dpo-device", str, "where to train"),
}


def _add_dpo_options(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("dpo (needs simsteer[baselines]; --seed seeds it too)")
    defaults = {f.name: f.default for f in dataclasses.fields(DPOBaselineConfig)}
    for field, (flag, kind, text) in DPO_OPTIONS.items():
        default = defaults[field]
        group.add_argument(
            flag,
            dest=f"dpo_{field}",
            type=kind,
            default=default,
            help=text if default is None else f"{text} (default {default})",  # None: the text says
        )


def dpo_config(args: argparse.Namespace) -> DPOBaselineConfig:
    """The DPO settings typed on the command line."""
    values = {field: getattr(args, f"dpo_{field}") for field in DPO_OPTIONS}
    return DPOBaselineConfig(**values, seed=args.seed)
