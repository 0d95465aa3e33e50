"""``sims run`` options for the SIMS variants and the model-based and external oracles.

Kept apart from :mod:`simsteer.cli.main` so the variant/oracle flags live in one place:
:func:`add_run_options` adds them to the ``run`` parser, :func:`resolve_oracle_name`
fills the default oracle of a variant, :func:`bank_config` and :func:`build_oracle`
turn the flags into objects.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..loop.bank import BankConfig


def add_run_options(run: argparse.ArgumentParser) -> None:
    """Add ``--variant``, the bank and the judge flags to the ``run`` sub-parser."""
    run.add_argument(
        "--variant",
        choices=("sims", "pr", "cs"),
        default="sims",
        help="sims: win rate > 1/2 -> D+; pr: top/bottom-ranked answer per prompt "
        "(default oracle self-rank); cs: contrast sampling from a response bank",
    )
    run.add_argument(
        "--oracle-template",
        default=None,
        metavar="FILE",
        help="replace the built-in prompt template of self-rank, self-judge* or judge",
    )
    run.add_argument("--bank-capacity", type=int, default=0, help="cs: most bank entries kept (0: all)")
    run.add_argument("--bank-top", type=int, default=0, help="cs: entries trained on per update (0: N)")
    run.add_argument("--bank-rescore", action="store_true", help="cs: re-ask the oracle about older entries")
    judge = run.add_argument_group("LLM judge (--oracle judge:MODEL@BASE_URL, or --oracle judge)")
    judge.add_argument("--judge-model", default=None, help="model name at the endpoint")
    judge.add_argument("--judge-base-url", default=None, help="e.g. http://127.0.0.1:8000/v1")
    judge.add_argument(
        "--judge-api-key-env",
        default="OPENAI_API_KEY",
        metavar="VAR",
        help="environment variable with the API key (only its name is saved)",
    )
    judge.add_argument("--judge-mode", choices=("pairwise", "rank"), default="pairwise")
    judge.add_argument("--judge-concurrency", type=int, default=4)
    judge.add_argument("--judge-timeout", type=float, default=60.0, help="seconds per request")
    judge.add_argument("--judge-retries", type=int, default=4, help="retries on 429/5xx/timeouts")
    judge.add_argument(
        "--judge-cache",
        type=_absolute,  # saved absolute in the run config: --resume from another folder finds it
        default=None,
        metavar="FILE",
        help="judgment cache (default: user cache)",
    )


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve())


def resolve_oracle_name(args: argparse.Namespace) -> str:
    """The oracle named by ``--oracle``, or the variant's default."""
    if getattr(args, "oracle", None):
        return args.oracle
    return "self-rank" if getattr(args, "variant", "sims") == "pr" else "sentiment"


def bank_config(args: argparse.Namespace) -> BankConfig:
    return BankConfig(
        capacity=getattr(args, "bank_capacity", 0),
        top=getattr(args, "bank_top", 0),
        rescore=getattr(args, "bank_rescore", False),
    )


def judge_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {
        "api_key_env": getattr(args, "judge_api_key_env", "OPENAI_API_KEY"),
        "mode": getattr(args, "judge_mode", "pairwise"),
        "concurrency": getattr(args, "judge_concurrency", 4),
        "timeout": getattr(args, "judge_timeout", 60.0),
        "retries": getattr(args, "judge_retries", 4),
        "cache": getattr(args, "judge_cache", None),
    }
    if getattr(args, "judge_model", None):
        options["model"] = args.judge_model
    if getattr(args, "judge_base_url", None):
        options["base_url"] = args.judge_base_url
    return options


def build_oracle(args: argparse.Namespace, lm: Any):
    """The oracle of ``sims run`` (after the model is loaded: self-* oracles use it)."""
    from ..oracles import get_oracle

    return get_oracle(
        resolve_oracle_name(args),
        device=args.device,
        lm=lm,
        template=getattr(args, "oracle_template", None),
        judge_options=judge_options(args),
    )
