"""The ``sims`` command line: ``run``, ``generate`` and ``info``.

Every user mistake ends in one line, ``sims: error: ...``, and exit status 2; nothing a
run already wrote is touched by a failed command.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from ..errors import SimsError

DEFAULT_RUN_DIR = "runs/sims"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _budget(text: str) -> float | None:
    if text.lower() in ("off", "none"):
        return None
    return _number(text)


def _grid(text: str) -> tuple[float, ...]:
    return tuple(_number(x) for x in text.split(",") if x.strip())


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"learner options look like key=value, got {text!r}")
    try:
        return key.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.replace("-", "_"), value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's own convention)
        raise SimsError(message)


def build_parser() -> argparse.ArgumentParser:
    from .._version import __version__

    parser = _Parser(prog="sims", description="Self-Improving Model Steering (SIMS).")
    parser.add_argument("--version", action="version", version=f"simsteer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--model",
            default=None,
            help="Hugging Face id, local folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)",
        )
        p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
        p.add_argument("--dtype", default="auto", help="auto, bf16, fp16 or fp32")
        p.add_argument(
            "--trust-remote-code",
            action="store_true",
            help="let transformers run code shipped with the model (off by default)",
        )

    def sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
        p.add_argument("--temperature", type=_number, default=temperature)
        p.add_argument("--top-k", type=_positive_int, default=50)
        p.add_argument("--top-p", type=_number, default=1.0)
        p.add_argument("--max-new-tokens", type=_positive_int, default=48)
        p.add_argument("--batch-size", type=_positive_int, default=64)
        p.add_argument("--seed", type=_positive_int, default=0)

    run = sub.add_parser("run", help="run the SIMS loop and save the learned steering")
    model_args(run)
    run.add_argument(
        "--prompts",
        default=None,
        help="JSONL (prompt or instruction field) or text file, one prompt per line "
        "(default: the built-in everyday prompt set)",
    )
    run.add_argument(
        "--eval-prompts-file", default=None, help="held-out prompts (default: split off the pool)"
    )
    run.add_argument(
        "--oracle",
        default=None,
        help="sentiment (default), negativity, readability, length:N, reward-model:PATH, "
        "self-rank (default of --variant pr), self-judge, self-judge-pairwise, "
        "judge:MODEL@BASE_URL, python:MODULE:FUNCTION or self-consistency",
    )
    run.add_argument("--learner", default="caa", help="steering-function learner (default caa)")
    run.add_argument(
        "-L",
        "--learner-option",
        action="append",
        type=_option,
        default=[],
        metavar="KEY=VALUE",
        help="learner hyper-parameter, e.g. -L coefficient=0.04",
    )
    run.add_argument(
        "--layers",
        default=None,
        help="all, middle, 4-11 or 3,5,7 (default: the learner's own, middle for CAA)",
    )
    run.add_argument(
        "--positions",
        default=None,
        help="all, prompt, generated or last (default: the learner's own, all for CAA)",
    )
    run.add_argument("--iterations", "-T", type=_positive_int, default=3)
    run.add_argument("--prompts-per-iteration", "-N", type=_positive_int, default=16)
    run.add_argument("--samples-per-prompt", "-K", type=_positive_int, default=4)
    run.add_argument(
        "--eval-prompts",
        type=_positive_int,
        default=16,
        help="held-out prompts answered by every policy (0: none)",
    )
    run.add_argument("--summary", default="mean", help="activation summary: mean or last")
    run.add_argument(
        "--compose",
        action="store_true",
        help="stack each iteration's functions on the previous ones (paper: replace)",
    )
    run.add_argument(
        "--fluency-budget",
        type=_budget,
        default=0.12,
        help="fluency guard: allowed perplexity increase over the unsteered model "
        "(0.10 = +10%%), or 'off' for the paper's plain loop",
    )
    run.add_argument(
        "--repetition-margin",
        type=_number,
        default=0.03,
        help="fluency guard: allowed repetition-rate increase",
    )
    run.add_argument(
        "--strength-grid",
        type=_grid,
        default=(0.125, 0.25, 0.375, 0.5, 0.75, 1.0),
        help="fluency guard: strength multipliers tried after each fit",
    )
    run.add_argument(
        "--calibration-prompts",
        type=_positive_int,
        default=16,
        help="fluency guard: held-out prompts the strengths are compared on",
    )
    run.add_argument(
        "--patience",
        type=_positive_int,
        default=2,
        help="stop after this many iterations without a better fluent score (0: never)",
    )
    run.add_argument(
        "--full-grid",
        action="store_true",
        help="fluency guard: score every strength of the grid (default: stop the ascending "
        "scan at the first strength that breaks the budget)",
    )
    run.add_argument("--out", "-o", default=DEFAULT_RUN_DIR, help="run directory")
    run.add_argument(
        "--resume",
        metavar="RUN_DIR",
        default=None,
        help="continue an interrupted run with its saved settings",
    )
    sampling_args(run, 0.8)
    from .oracle_options import add_run_options  # --variant, bank and judge flags

    add_run_options(run)
    run.add_argument("--quiet", action="store_true", help="no progress bars")

    gen = sub.add_parser("generate", help="answer prompts with or without a saved steering")
    model_args(gen)
    gen.add_argument("--steering", default=None, help="steering folder or run directory")
    gen.add_argument("--no-steer", action="store_true", help="answer with the unsteered model")
    gen.add_argument("--strength", type=_number, default=None, help="multiplier on the saved strength")
    gen.add_argument("--positions", default=None, help="override where the steering applies")
    gen.add_argument("--prompts", default=None, help="prompt file (JSONL or text)")
    gen.add_argument("--prompt", "-p", action="append", default=[], help="a prompt (repeatable)")
    gen.add_argument("--output", default=None, help="write JSONL here instead of printing")
    gen.add_argument("--num-samples", type=_positive_int, default=1)
    sampling_args(gen, 0.0)
    gen.add_argument("--quiet", action="store_true")

    info = sub.add_parser("info", help="summarise a run directory or a steering folder")
    info.add_argument("path")
    from .evaluation import add_commands  # eval, compare, baseline, sweep, judge-check, lc, arena

    add_commands(sub)
    from ..serve.server import add_serve_command  # sims serve: OpenAI-compatible HTTP server

    add_serve_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        _quiet_libraries()
        if args.command == "run":
            return cmd_run(args)
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "serve":
            from ..serve.server import cmd_serve

            return cmd_serve(args)
        from .evaluation import COMMANDS, run_command

        if args.command in COMMANDS:
            return run_command(args)
        return cmd_info(args)
    except SimsError as exc:
        print(f"sims: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sims: interrupted; finished steps are saved (continue with --resume)", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=UserWarning)
    logging.basicConfig(level=logging.WARNING, format="sims: %(message)s")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def cmd_run(args: argparse.Namespace) -> int:
    from ..io import read_json
    from ..learners import get_learner
    from ..loop.config import SIMSConfig
    from ..loop.guard import GuardConfig
    from ..loop.outcome import format_outcome
    from ..loop.rundir import RunDir
    from ..loop.sims import SIMS
    from ..loop.table import format_table
    from ..models import load_model
    from ..prompts import load_prompts
    from ..sampling import SamplingConfig
    from .oracle_options import bank_config, build_oracle, resolve_oracle_name

    if args.resume:
        run = RunDir(Path(args.resume))
        if not run.is_run():
            raise SimsError(f"{args.resume} is not a run directory (no config.json)")
        from ..io import read_json

        saved = read_json(run.config)
        cli = saved.get("cli")
        if not cli:
            raise SimsError(f"{args.resume} was not started by `sims run`; resume it from Python")
        args = argparse.Namespace(
            **{**vars(args), **cli, "resume": args.resume, "out": args.resume, "quiet": args.quiet}
        )
        args.learner_option = [tuple(x) for x in args.learner_option]
    # Validate cheap settings before the slow model load.
    sampling = SamplingConfig(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
    )
    config = SIMSConfig(
        iterations=args.iterations,
        prompts_per_iteration=args.prompts_per_iteration,
        samples_per_prompt=args.samples_per_prompt,
        eval_prompts=args.eval_prompts,
        sampling=sampling,
        summary=args.summary,
        compose=args.compose,
        seed=args.seed,
        guard=GuardConfig(
            fluency_budget=args.fluency_budget,
            repetition_margin=args.repetition_margin,
            strength_grid=tuple(args.strength_grid),
            calibration_prompts=args.calibration_prompts,
            patience=args.patience,
            stop_at_unfluent=not args.full_grid,
        ),
        variant=args.variant,
        bank=bank_config(args),
    )
    options = dict(args.learner_option)
    # Only what the user gave overrides the learner's own defaults.
    if args.layers is not None:
        options.setdefault("layers", args.layers)
    if args.positions is not None:
        options.setdefault("positions", args.positions)
    learner = get_learner(args.learner, **options)
    out = Path(args.out)
    if not args.resume and RunDir(out).is_run():
        raise SimsError(f"{out} already holds a run: continue it with --resume {out} or pick --out")
    prompts = None if args.resume else load_prompts(args.prompts)
    eval_prompts = (
        load_prompts(args.eval_prompts_file) if args.eval_prompts_file and not args.resume else None
    )
    args.oracle = resolve_oracle_name(args)
    lm = load_model(
        args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code
    )
    oracle = build_oracle(args, lm)  # after the model: the self-* oracles judge with it
    sims = SIMS(lm, oracle, learner, config, progress=not args.quiet)
    cli = {k: v for k, v in vars(args).items() if k not in ("command", "resume", "quiet")}
    result = sims.fit(prompts or [], out, eval_prompts=eval_prompts, extra_config={"cli": cli})
    print(format_table(result.history))
    print(format_outcome(read_json(RunDir(result.run_dir).outcome)))
    print(f"steering saved to {result.run_dir / 'final'}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from ..io import write_jsonl
    from ..loop.rundir import RunDir
    from ..models import load_model
    from ..prompts import Prompt, load_prompts
    from ..sampling import SamplingConfig, generate
    from ..steering import load_policy

    if args.no_steer and args.steering:
        raise SimsError("--no-steer and --steering exclude each other")
    if not args.no_steer and not args.steering:
        raise SimsError("name a --steering folder or run directory, or pass --no-steer")
    prompts = [Prompt(str(i), p) for i, p in enumerate(args.prompt)]
    if args.prompts:
        prompts += load_prompts(args.prompts)
    if not prompts:
        raise SimsError("no prompts: pass --prompts FILE or --prompt TEXT")
    sampling = SamplingConfig(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
    )
    policy = []
    if args.steering:
        path = Path(args.steering)
        if RunDir(path).is_run():
            path = RunDir(path).final
        policy = load_policy(path)
    lm = load_model(
        args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code
    )
    for steering in policy:
        steering.check_model(lm.model)
        if args.strength is not None:
            steering.strength *= args.strength
        if args.positions is not None:
            from ..hooks import check_positions

            steering.positions = check_positions(args.positions)
    gens = generate(
        lm,
        [p.text for p in prompts],
        args.num_samples,
        sampling,
        policy,
        seed=args.seed,
        progress=False if args.quiet else "generating",
    )
    rows = [
        {
            "id": p.id,
            "prompt": p.text,
            "sample": k,
            "response": g.text,
            "num_tokens": g.num_tokens,
            "steered": bool(policy),
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


def cmd_info(args: argparse.Namespace) -> int:
    from ..io import read_json
    from ..loop.rundir import RunDir
    from ..loop.table import format_table
    from ..steering import CONFIG_NAME, load_policy

    path = Path(args.path)
    run = RunDir(path)
    if run.is_run():
        cfg = read_json(run.config)
        print(f"run {path}")
        print(
            f"  model   {cfg['model']['source']} ({cfg['model']['fingerprint']['architecture']}, "
            f"{cfg['model']['dtype']})"
        )
        print(f"  oracle  {cfg['oracle']['name']}")
        learner = dict(cfg["learner"])
        print(f"  learner {learner.pop('name')} {json.dumps(learner)}")
        sims = cfg["sims"]
        print(
            f"  T={sims['iterations']} N={sims['prompts_per_iteration']} "
            f"K={sims['samples_per_prompt']} eval prompts={sims['eval_prompts']}"
        )
        rows = []
        for t in range(sims["iterations"] + 1):
            if run.iteration_summary(t).is_file():
                rows.append(read_json(run.iteration_summary(t)))
        if rows:
            print(format_table(rows))
        stopped = bool(rows) and bool(rows[-1].get("stop"))
        done = (len(rows) == sims["iterations"] + 1 or stopped) and run.final.exists()
        if done and run.outcome.is_file():
            from ..loop.outcome import format_outcome

            print(format_outcome(read_json(run.outcome)))
        print(
            "status: complete"
            if done
            else f"status: incomplete ({len(rows)} of {sims['iterations'] + 1} iterations); "
            f"continue with: sims run --resume {path}"
        )
        return 0
    if (path / CONFIG_NAME).is_file() or path.is_dir():
        for steering in load_policy(path):
            print(
                f"steering {path}: learner {steering.learner}, layers {steering.layers}, "
                f"positions {steering.positions}, strength {steering.strength}"
            )
            print(f"  model {json.dumps(steering.fingerprint)}")
        return 0
    raise SimsError(f"{path} is neither a run directory nor a steering folder")
