"""``sims run --resume RUN``: rebuild a run from its ``config.json``.

The model, oracle, learner and loop config come from the run's saved spec
(:class:`~simsteer.loop.spec.RunSpec`), never from the command line. A flag typed on the
resume command line is checked against the saved value: equal is fine, different is
refused in one line that names the flag and both values (silently dropping it would run
something other than what the user asked for). ``--device``, ``--quiet`` and a judge's
``--judge-timeout`` / ``--judge-retries`` / ``--judge-concurrency`` say where and how to
run, not what, and may change.

A run directory is data that anyone with write access may have edited, so a resume is
explicit about trust (:mod:`.trust`): code the run names (a ``python:`` oracle,
``trust_remote_code`` with its model source), the endpoint its judge sends to and the API key
variable of that judge are used only when the same flags, naming the same targets, are typed
on the resume command line; saved paths are absolute and never looked up again
from the current folder; the model (fingerprint, dtype) and the oracle rebuilt are compared
with the saved ones, the model's config before its weights load.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import SimsError
from ..loop.config import SIMSConfig
from ..loop.spec import ModelSpec, RunSpec
from .checks import checked_learner
from .options import flag, model_source
from .trust import check_model_config, check_paths, check_rebuilt, check_trust

#: Options that may differ from the saved run: where and how it runs, not what it does
#: (a judge's waits: how long and how much at once, never what is asked).
FREE = frozenset(
    {
        "resume",
        "quiet",
        "device",
        "workers",
        "ray_address",
        "cache_mb",
        "judge_concurrency",
        "judge_timeout",
        "judge_retries",
    }
)

#: ``--dtype`` spellings -> the name a run saves.
_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

#: (flag, value typed, value saved): one comparison of a typed option with the run.
Comparison = tuple[str, Any, Any]
Compare = Callable[[str, Any, RunSpec, argparse.Namespace], list[Comparison]]


def _field(read: Callable[[RunSpec], Any]) -> Compare:
    """A flag that maps 1:1 to one saved field."""
    return lambda dest, given, spec, args: [(flag(dest), given, read(spec))]


def _path(value: str | None) -> str | None:
    return None if value is None else str(Path(value).expanduser().resolve())


def _out(dest: str, given: Any, spec: RunSpec, args: argparse.Namespace) -> list[Comparison]:
    return [("--out", _path(given), _path(args.resume))]


def _model(dest: str, given: Any, spec: RunSpec, args: argparse.Namespace) -> list[Comparison]:
    return [("--model", model_source(given), spec.model.source)]


def _dtype(dest: str, given: Any, spec: RunSpec, args: argparse.Namespace) -> list[Comparison]:
    if given == "auto":  # auto picks per device; the run saved what it picked
        return []
    return [("--dtype", _DTYPES.get(given, given), spec.model.dtype)]


def _prompt_file(dest: str, given: Any, spec: RunSpec, args: argparse.Namespace) -> list[Comparison]:
    return [(flag(dest), _path(given), spec.prompts.get(dest))]


def _oracle_label(spec: dict[str, Any]) -> str:
    if spec.get("name") == "judge" and spec.get("model"):
        return f"judge:{spec['model']}@{spec.get('base_url')}"
    return str(spec.get("name"))


def _oracle(dest: str, given: Any, spec: RunSpec, args: argparse.Namespace) -> list[Comparison]:
    from ..oracles import oracle_spec
    from ..oracles.llm_judge import redact_url

    # The oracle's identity: its name, and for a judge the endpoint it names (compared and
    # shown redacted: a typed URL's credentials never reach a message).
    wanted = oracle_spec(given)
    if "base_url" in wanted:
        wanted["base_url"] = redact_url(wanted["base_url"])
    same = all(wanted[k] == spec.oracle.get(k) for k in ("name", "model", "base_url") if k in wanted)
    shown = redact_url(given)
    return [("--oracle", shown, shown if same else _oracle_label(spec.oracle))]


def _template(dest: str, given: Any, spec: RunSpec, args: argparse.Namespace) -> list[Comparison]:
    from ..oracles.templates import template_ref

    return [("--oracle-template", template_ref(given), spec.oracle.get("template"))]


#: Judge flags whose spec key is not the flag's name without ``judge_``.
_JUDGE_KEYS = {"judge_url_env": "base_url_env"}


def _judge(dest: str, given: Any, spec: RunSpec, args: argparse.Namespace) -> list[Comparison]:
    from ..oracles.llm_judge import JudgeConfig, redact_url

    key = _JUDGE_KEYS.get(dest, dest.removeprefix("judge_"))
    saved = spec.oracle.get(key)
    if key not in spec.oracle and spec.oracle.get("name") == "judge":
        # Older specs leave out settings at their default.
        saved = JudgeConfig.__dataclass_fields__[key].default
    if key == "base_url" and isinstance(given, str):
        given = redact_url(given)  # compared and shown as saved: never a credential in a message
    return [(flag(dest), given, saved)]


def _learner_options(dest: str, given: Any, spec: RunSpec, args: argparse.Namespace) -> list[Comparison]:
    return [(f"-L {key}", value, spec.learner.get(key)) for key, value in given]


def _layers(dest: str, given: Any, spec: RunSpec, args: argparse.Namespace) -> list[Comparison]:
    from ..models import parse_layers

    # Compared as resolved indices: "1-2" and "1,2" are the same layers.
    num_layers = int(spec.model.fingerprint.get("num_layers", 0)) or max(spec.layers, default=0) + 1
    return [("--layers", parse_layers(given, num_layers), spec.layers)]


def _settings() -> dict[str, Compare]:
    """Every ``sims run`` option that is a setting of the run -> how to compare it."""
    table: dict[str, Compare] = {
        dest: _field(lambda s, d=dest: getattr(s.sims, d))
        for dest in (
            "iterations",
            "prompts_per_iteration",
            "samples_per_prompt",
            "eval_prompts",
            "summary",
            "compose",
            "variant",
            "seed",
        )
    }
    sampling = ("temperature", "top_k", "top_p", "max_new_tokens", "batch_size", "engine")
    for dest in (*sampling, "tensor_parallel_size", "vllm_eager"):
        table[dest] = _field(lambda s, d=dest: getattr(s.sims.sampling, d))
    guard = ("fluency_budget", "repetition_margin", "strength_grid", "calibration_prompts", "patience")
    for dest in (*guard, "contrast_budget", "selection"):
        table[dest] = _field(lambda s, d=dest: getattr(s.sims.guard, d))
    table["full_grid"] = _field(lambda s: not s.sims.guard.stop_at_unfluent)
    for dest, name in (("bank_capacity", "capacity"), ("bank_top", "top"), ("bank_rescore", "rescore")):
        table[dest] = _field(lambda s, f=name: getattr(s.sims.bank, f))
    judge = (
        "model",
        "base_url",
        "url_env",
        "api_key_env",
        "mode",
        "concurrency",
        "timeout",
        "retries",
        "cache",
        "max_tokens",
    )
    for name in judge:
        table[f"judge_{name}"] = _judge
    table.update(
        out=_out,
        model=_model,
        dtype=_dtype,
        trust_remote_code=_field(lambda s: s.model.trust_remote_code),
        prompts=_prompt_file,
        eval_prompts_file=_prompt_file,
        contrast_prompts=_prompt_file,
        oracle=_oracle,
        oracle_template=_template,
        learner=_field(lambda s: s.learner["name"]),
        learner_option=_learner_options,
        layers=_layers,
        positions=_field(lambda s: s.learner.get("positions")),
    )
    return table


#: How each run setting typed on a resume command line is compared with the saved run.
SETTINGS: dict[str, Compare] = _settings()


def _same(given: Any, saved: Any) -> bool:
    if isinstance(given, list | tuple) and isinstance(saved, list | tuple):
        return list(given) == list(saved)
    return given == saved


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _comparisons(args: argparse.Namespace, spec: RunSpec) -> list[Comparison]:
    """(flag, given value, saved value) for every option typed on the command line."""
    out: list[Comparison] = []
    for dest in sorted(args.given - FREE):
        if dest not in SETTINGS:  # an option nobody taught --resume about: refuse, never drop
            raise SimsError(f"{flag(dest)} cannot be given with --resume")
        out += SETTINGS[dest](dest, getattr(args, dest), spec, args)
    return out


def check_flags(args: argparse.Namespace, spec: RunSpec) -> None:
    """Refuse the first typed flag whose value differs from the saved run's.

    Args:
        args: the parsed ``sims run`` options; ``args.given`` names those typed.
        spec: the run's saved spec.
    """
    for name, given, saved in _comparisons(args, spec):
        if not _same(given, saved):
            raise SimsError(
                f"{name} is {_show(given)} here but {_show(saved)} in {args.resume}: "
                "leave it out to resume with the saved settings, or start a new run"
            )


def _judge_waits(args: argparse.Namespace, spec: RunSpec) -> dict[str, Any]:
    """The judge's waits typed on the resume command line (``--judge-timeout``,
    ``--judge-retries``, ``--judge-concurrency``), for a run whose oracle is a judge."""
    from ..oracles.llm_judge import JUDGE_WAITS

    if spec.oracle.get("name") != "judge":
        return {}
    return {k: getattr(args, f"judge_{k}") for k in JUDGE_WAITS if f"judge_{k}" in args.given}


def read_spec(path: Path) -> RunSpec:
    """The saved spec of a run directory that ``sims run`` can continue."""
    from ..loop.rundir import RunDir, is_half_prepared

    run = RunDir(path)
    if is_half_prepared(path):
        raise SimsError(
            f"{path} is a run killed while it was being prepared (no config.json): "
            f"start it again with sims run --out {path} and its settings"
        )
    if not run.is_run():
        raise SimsError(f"{path} is not a run directory (no config.json)")
    spec = run.spec()
    if "baseline" in spec.extra:
        raise SimsError(f"{path} is a {spec.extra['baseline']} baseline, not a run `sims run` can continue")
    return spec


def check_resume(args: argparse.Namespace) -> RunSpec:
    """The checks of ``--resume RUN`` that read only files: the run's spec, its saved
    paths, the typed flags against it and the consents it needs (each naming its target).
    Nothing of the run's is imported, loaded or sent. ``sims sweep`` runs them on every
    point it would resume before it runs any point.

    Args:
        args: the parsed ``sims run`` options (``--resume``, ``args.given``).

    Returns:
        the run's saved spec.
    """
    out = Path(args.resume)
    spec = read_spec(out)
    check_paths(spec, out / "config.json")
    check_flags(args, spec)
    check_trust(args, spec)  # before anything of the run's is imported or loaded
    return spec


def rebuild_run(args: argparse.Namespace) -> tuple[Any, Any, Any, SIMSConfig, Path]:
    """The model, oracle, learner, loop config and run directory of ``--resume RUN``.

    Everything the run names is checked before it is used: paths, typed flags, consent to
    run code, the learner's options, then the model's config (before its weights load),
    the loaded model and the oracle built.

    Args:
        args: the parsed ``sims run`` options (``--resume``, ``--device``, ``args.given``).
    """
    from ..models import load_model
    from ..oracles import get_oracle

    out = Path(args.resume)
    spec = check_resume(args)
    options = dict(spec.learner)  # checked before the slow model load
    learner = checked_learner(options.pop("name", None), options, where=f"{out / 'config.json'}: learner")
    check_model_config(out, spec)  # a changed model refused before its weights load
    lm = load_model(
        spec.model.source,
        device=args.device,  # where, not what: the best available unless told
        dtype=spec.model.dtype,
        trust_remote_code=spec.model.trust_remote_code,
    )
    model = ModelSpec.of(lm)
    check_rebuilt(out, spec, model)  # before the oracle: it may be a model or user code
    waits = _judge_waits(args, spec)
    oracle = get_oracle({**spec.oracle, **waits}, device=args.device, lm=lm)
    check_rebuilt(out, spec, model, oracle.describe())  # the waits are no change (RunSpec.mismatches)
    return lm, oracle, learner, spec.sims, out
