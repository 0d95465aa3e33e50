"""``sims run``: run the SIMS loop (or continue one with ``--resume``) and save the steering."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..activations import SUMMARIES
from ..errors import SimsError
from ..hooks import POSITIONS
from ..learners import learner_names
from ..learners.base import PYTHON_PREFIX, python_learner_target
from ..loop.config import VARIANTS, SIMSConfig
from ..oracles import ORACLE_NAMES
from .checks import check_context, checked_learner
from .options import (
    absolute_path,
    add_bank_options,
    add_guard_options,
    add_judge_options,
    add_model_options,
    add_sampling_options,
    add_worker_options,
    bank_config,
    check_workers,
    guard_config,
    integer,
    judge_options,
    key_value,
    model_source,
    positions,
    sampling_config,
)

DEFAULT_RUN_DIR = "runs/sims"
DEFAULT_LEARNER = "caa"


def default_oracle(variant: str) -> str:
    """The oracle of a variant when ``--oracle`` is not given: SIMS-PR ranks with the
    model itself, the others score sentiment."""
    return "self-rank" if variant == "pr" else "sentiment"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``sims run``."""
    base = SIMSConfig()
    p = sub.add_parser("run", help="run the SIMS loop and save the learned steering")
    add_model_options(p)
    data = p.add_argument_group("prompts and output")
    data.add_argument(
        "--prompts",
        default=None,
        help="JSONL (prompt or instruction field) or text file, one prompt per line "
        "(default: the built-in everyday prompt set)",
    )
    data.add_argument(
        "--eval-prompts-file", default=None, help="held-out prompts (default: split off the pool)"
    )
    data.add_argument("--out", "-o", default=DEFAULT_RUN_DIR, help="run directory (default %(default)s)")
    data.add_argument(
        "--resume",
        metavar="RUN_DIR",
        default=None,
        help="continue an interrupted run with its saved settings (flags that differ are refused; "
        "a run that names code to run, a judge to send to or a key to send needs its "
        "--oracle python:..., --trust-remote-code --model SOURCE, --judge-base-url URL "
        "(or --judge-url-env VAR) or --judge-api-key-env VAR typed again)",
    )
    plug = p.add_argument_group("oracle and learner")
    plug.add_argument(
        "--oracle",
        default=None,
        help=f"one of: {', '.join(ORACLE_NAMES)} "
        f"(default: {default_oracle('sims')}; {default_oracle('pr')} for --variant pr)",
    )
    plug.add_argument(
        "--oracle-template",
        default=None,
        metavar="FILE",
        help="replace the built-in prompt template of self-rank, self-judge* or judge",
    )
    plug.add_argument(
        "--learner",
        default=DEFAULT_LEARNER,
        type=learner_name,
        help=f"steering-function learner, one of: {', '.join(learner_names())}, or your own Learner "
        "subclass as python:MODULE:CLASS or python:FILE.py:CLASS (default %(default)s)",
    )
    plug.add_argument(
        "-L",
        "--learner-option",
        action="append",
        type=key_value,
        default=[],
        metavar="KEY=VALUE",
        help="learner hyper-parameter, e.g. -L coefficient=0.04",
    )
    plug.add_argument(
        "--layers",
        default=None,
        help="all, middle, 4-11 or 3,5,7 (default: the learner's own, middle for CAA)",
    )
    plug.add_argument(
        "--positions",
        type=positions,
        default=None,
        help=f"where edits apply, one of: {', '.join(POSITIONS)} (default: the learner's own)",
    )
    loop = p.add_argument_group("loop")
    loop.add_argument(
        "--iterations", "-T", type=integer, default=base.iterations, help="T (default %(default)s)"
    )
    loop.add_argument(
        "--prompts-per-iteration",
        "-N",
        type=integer,
        default=base.prompts_per_iteration,
        help="N new prompts per iteration (default %(default)s)",
    )
    loop.add_argument(
        "--samples-per-prompt",
        "-K",
        type=integer,
        default=base.samples_per_prompt,
        help="K answers sampled per prompt (default %(default)s)",
    )
    loop.add_argument(
        "--eval-prompts",
        type=integer,
        default=base.eval_prompts,
        help="held-out prompts answered by every policy (0: none; default %(default)s)",
    )
    loop.add_argument(
        "--summary", choices=SUMMARIES, default=base.summary, help="activation summary (default %(default)s)"
    )
    loop.add_argument(
        "--compose",
        action="store_true",
        default=base.compose,
        help="stack each iteration's functions on the previous ones (paper: replace)",
    )
    loop.add_argument(
        "--variant",
        choices=VARIANTS,
        default=base.variant,
        help="sims: win rate > 1/2 -> D+; pr: top/bottom-ranked answer per prompt "
        "(default oracle self-rank); cs: contrast sampling from a response bank",
    )
    add_guard_options(p)
    add_bank_options(p)
    add_judge_options(p)
    add_sampling_options(p)
    add_worker_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_run)


@dataclass(frozen=True)
class RunPlan:
    """What ``sims run`` hands to the loop: the objects, and for a new run its prompts.

    Attributes:
        lm, oracle, learner, config: the loop's model, oracle, learner and settings.
        out: the run directory.
        prompts, eval_prompts: the prompt pool and held-out prompts (a resumed run reads
            its own from the run directory).
        contrast_prompts: the guard's contrast prompts (``--contrast-prompts``).
        sources: where the prompts came from (absolute paths), saved in the run's spec.
    """

    lm: Any
    oracle: Any
    learner: Any
    config: SIMSConfig
    out: Path
    prompts: list = field(default_factory=list)
    eval_prompts: list | None = None
    sources: dict[str, str | None] | None = None
    contrast_prompts: list | None = None


def cmd_run(args: argparse.Namespace) -> int:
    """Start a run from the flags, or continue ``--resume RUN`` from its ``config.json``."""
    from ..loop.outcome import format_outcome
    from ..loop.rundir import RunDir
    from ..loop.sims import SIMS
    from ..loop.table import format_table
    from ..workers import open_pool

    check_workers(args)
    if args.resume:
        from .resume import rebuild_run

        plan = RunPlan(*rebuild_run(args))
    else:
        plan = _new_run(args)
    # The worker count is not a setting of the run: any pool writes the same artefacts.
    with open_pool(plan.lm, plan.oracle, args.workers, args.ray_address) as pool:
        sims = SIMS(plan.lm, plan.oracle, plan.learner, plan.config, progress=not args.quiet, workers=pool)
        result = sims.fit(
            plan.prompts,
            plan.out,
            eval_prompts=plan.eval_prompts,
            prompt_sources=plan.sources,
            contrast_prompts=plan.contrast_prompts,
        )
    print(format_table(result.history))
    print(format_outcome(RunDir(result.run_dir).read_outcome()))
    if result.policy.is_unsteered:
        print(f"no steering kept: {result.run_dir / 'final'} holds the unsteered model")
    else:
        print(f"steering saved to {result.run_dir / 'final'}")
    return 0


def _new_run(args: argparse.Namespace) -> RunPlan:
    from ..loop.rundir import check_new_run_dir
    from ..models import load_model
    from ..oracles import get_oracle
    from ..prompts import load_prompts

    # Cheap settings are checked before the slow model load.
    config = SIMSConfig(
        iterations=args.iterations,
        prompts_per_iteration=args.prompts_per_iteration,
        samples_per_prompt=args.samples_per_prompt,
        eval_prompts=args.eval_prompts,
        sampling=sampling_config(args),
        summary=args.summary,
        compose=args.compose,
        seed=args.seed,
        guard=guard_config(args),
        variant=args.variant,
        bank=bank_config(args),
    )
    learner = checked_learner(args.learner, learner_options(args))
    out = Path(args.out)
    check_new_run_dir(out)  # before the slow model load, not after it
    prompts = load_prompts(args.prompts)
    eval_prompts = load_prompts(args.eval_prompts_file) if args.eval_prompts_file else None
    contrast = load_prompts(args.contrast_prompts) if args.contrast_prompts else None
    if contrast is not None and not config.guard.enabled:
        raise SimsError(
            "--contrast-prompts are measured by the fluency guard, which --fluency-budget off turns off"
        )
    sources = {
        "prompts": absolute_path(args.prompts) if args.prompts else None,
        "eval_prompts_file": absolute_path(args.eval_prompts_file) if args.eval_prompts_file else None,
    }
    if contrast is not None:
        sources["contrast_prompts"] = absolute_path(args.contrast_prompts)
    check_judge(args)  # its URL and settings, before the slow model load
    lm = load_model(
        model_source(args.model),
        device=args.device,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
    )
    check_context(lm, [*prompts, *(eval_prompts or []), *(contrast or [])], config.sampling.max_new_tokens)
    # After the model: the self-* oracles judge with it.
    oracle = get_oracle(
        args.oracle or default_oracle(args.variant),
        device=args.device,
        lm=lm,
        template=args.oracle_template,
        judge_options=judge_options(args),
    )
    return RunPlan(lm, oracle, learner, config, out, prompts, eval_prompts, sources, contrast)


def check_judge(args: argparse.Namespace) -> None:
    """Refuse a judge's bad settings (a URL holding a secret, an empty ``--judge-url-env``
    variable, ...) in one line, before anything is loaded or sent."""
    from ..oracles import oracle_spec
    from ..oracles.llm_judge import JudgeConfig

    spec = oracle_spec(args.oracle or default_oracle(args.variant), judge_options=judge_options(args))
    if spec.pop("name") == "judge":
        try:
            JudgeConfig(**spec).url()
        except TypeError as exc:
            raise SimsError(f"judge: {exc}") from None


def learner_name(text: str) -> str:
    """A ``--learner`` value; a ``python:FILE.py:CLASS`` file is made absolute (as it is saved)."""
    if text.startswith(PYTHON_PREFIX):
        return PYTHON_PREFIX + python_learner_target(text.removeprefix(PYTHON_PREFIX))
    return text


def learner_options(args: argparse.Namespace) -> dict:
    """``-L`` options, with ``--layers`` / ``--positions`` when given (else the learner's own)."""
    options = dict(args.learner_option)
    if args.layers is not None:
        options.setdefault("layers", args.layers)
    if args.positions is not None:
        options.setdefault("positions", args.positions)
    return options
