"""What a run's ``config.json`` holds: the resolved settings that rebuild the run.

A :class:`RunSpec` is written once when a run starts and read back by ``--resume``,
``sims info``, ``sims eval`` and the baselines. It never holds a parser namespace: only
the loop's config, the model's identity and the oracle and learner *specs*, each of which
its own registry accepts back (``get_oracle(spec.oracle)``,
``get_learner(**spec.learner)``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import SimsError
from ..schema import NonNegativeInt, SchemaError, check, check_value
from .config import SIMSConfig

if TYPE_CHECKING:
    from ..models import LoadedModel

#: Version of the config.json layout. 1: written by simsteer <= 0.1.0 before the typed
#: records (a ``cli`` namespace, no ``format_version`` key); 2: this layout.
RUN_FORMAT_VERSION = 2


@dataclass(frozen=True)
class ModelSpec:
    """How the run's model was loaded.

    Attributes:
        source: what ``load_model`` was given (a local path is saved absolute), or the
            embedded model's name.
        dtype: the resolved dtype (``float32``, ``bfloat16``, ...).
        device: the resolved device (``cpu``, ``cuda:0``, ...).
        trust_remote_code: whether transformers was allowed to run the model's code.
        fingerprint: architecture, hidden size and layer count (see ``model_fingerprint``).
    """

    schema_open: ClassVar[bool] = True  # format 1 kept other keys here

    source: str
    dtype: str
    device: str = ""
    trust_remote_code: bool = False
    fingerprint: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, lm: LoadedModel) -> ModelSpec:
        """How ``lm`` was loaded (its resolved dtype and device)."""
        return cls(
            source=lm.source,
            dtype=str(lm.dtype).replace("torch.", ""),
            device=str(lm.device),
            trust_remote_code=lm.trust_remote_code,
            fingerprint=lm.fingerprint(),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "dtype": self.dtype,
            "device": self.device,
            "trust_remote_code": self.trust_remote_code,
            "fingerprint": dict(self.fingerprint),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(
            source=data["source"],
            dtype=data["dtype"],
            device=data.get("device") or "",
            trust_remote_code=bool(data.get("trust_remote_code", False)),
            fingerprint=dict(data.get("fingerprint") or {}),
        )


def consents(
    oracle: dict[str, Any] | str, model: ModelSpec | dict[str, Any]
) -> list[tuple[tuple[str, ...], str, str]]:
    """(option dests, flags to type, what it allows) for each thing a saved oracle spec and
    model would execute or send that only an explicit consent may allow, each bound to its
    target: a ``python:`` oracle's code (its file or module), the model's shipped code
    (``trust_remote_code``: the flag and the model's source), a judge's endpoint (its
    URL, or the variable holding it: prompts and answers go there, key or not) and its API
    key variable. A consent typed for another target is refused where the typed value is
    compared with the saved one (``sims run --resume``: its flag checks; ``sims eval`` /
    ``sims baseline``: :func:`~simsteer.cli.trust.check_consent`).

    ``config.json`` is only as trustworthy as its folder, so ``sims run --resume``,
    ``sims eval`` and ``sims baseline`` use these only with the same flags typed again,
    and :func:`~simsteer.evaluation.run_eval.evaluate_run` /
    :func:`~simsteer.evaluation.baselines.build_baseline` only with the flags in ``trusted``.

    Args:
        oracle: the saved oracle spec (or its name).
        model: the saved model (a :class:`ModelSpec` or its JSON).
    """
    spec = {"name": oracle} if isinstance(oracle, str) else oracle
    if isinstance(model, ModelSpec):
        source, remote = model.source, model.trust_remote_code
    else:
        source, remote = model.get("source"), bool(model.get("trust_remote_code", False))
    out: list[tuple[tuple[str, ...], str, str]] = []
    name = str(spec.get("name", ""))
    if name.startswith("python:"):
        out.append(
            (("oracle",), f"--oracle {name}", f"its oracle imports and runs {name.removeprefix('python:')}")
        )
    if remote:
        out.append(
            (
                ("trust_remote_code", "model"),
                f"--trust-remote-code --model {source}",
                f"its model {source} runs the code shipped with it (trust_remote_code)",
            )
        )
    if name == "judge":
        where = spec.get("base_url") or "the judge"
        url_env = spec.get("base_url_env")
        if url_env:
            what = f"its judge sends prompts and answers to the URL in ${url_env} ({where})"
            out.append((("judge_url_env",), f"--judge-url-env {url_env}", what))
        else:
            what = f"its judge sends prompts and answers to {where}"
            out.append((("judge_base_url",), f"--judge-base-url {where}", what))
        key = spec.get("api_key_env")
        if key:
            out.append(
                (("judge_api_key_env",), f"--judge-api-key-env {key}", f"its judge sends ${key} to {where}")
            )
    return out


def _what_is_asked(oracle: dict[str, Any]) -> dict[str, Any]:
    """An oracle spec without a judge's waits (timeout, retries, concurrency): how long
    and how much at once, never what is asked, so a resume may change them."""
    if oracle.get("name") != "judge":
        return oracle
    from ..oracles.llm_judge import JUDGE_WAITS

    return {k: v for k, v in oracle.items() if k not in JUDGE_WAITS}


@dataclass(frozen=True)
class RunSpec:
    """Everything that rebuilds a run (see the module docstring).

    Attributes:
        model: how the model was loaded.
        oracle: the oracle's spec, ``oracle.describe()``; ``get_oracle`` accepts it back.
        learner: ``{"name": ..., **hyper-parameters}``; ``get_learner`` accepts it back.
        layers: the resolved layer indices the learner steers.
        sims: the loop's resolved config.
        prompts: where the prompt pool and held-out prompts came from (informative; the
            run directory holds the prompts themselves).
        simsteer_version: the library version that wrote the run.
        format_version: :data:`RUN_FORMAT_VERSION` (1 for a run read from the old layout).
        extra: what a study records next to the run, written at the top level of
            ``config.json`` (a random-split baseline's ``baseline``, ``like`` and
            ``eval_oracle``); empty for a plain run.

    Example:
        >>> spec = RunDir(Path("runs/sims")).spec()
        >>> oracle = get_oracle(spec.oracle["name"])
    """

    schema_open: ClassVar[bool] = True  # ``extra`` is written at the top level

    model: ModelSpec
    oracle: dict[str, Any]
    learner: dict[str, Any]
    layers: list[NonNegativeInt]
    sims: SIMSConfig
    prompts: dict[str, Any] = field(default_factory=dict)
    simsteer_version: str = ""
    format_version: int = RUN_FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """What ``config.json`` holds (always the current format)."""
        out = {
            "format_version": RUN_FORMAT_VERSION,
            "simsteer_version": self.simsteer_version,
            "model": self.model.to_json(),
            "oracle": dict(self.oracle),
            "learner": dict(self.learner),
            "layers": list(self.layers),
            "sims": self.sims.to_dict(),
            "prompts": dict(self.prompts),
        }
        clash = set(out) & set(self.extra)
        if clash:
            raise SimsError(f"extra run settings may not replace {', '.join(sorted(clash))}")
        return {**out, **self.extra}

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "config.json") -> RunSpec:
        """Read ``config.json`` of this format, or of format 1 (simsteer <= 0.1.0: no
        ``format_version``, the model without device, a ``cli`` namespace); any other
        format is refused with one line naming it, and so is a field of the wrong type
        (:func:`check_spec`).

        Args:
            data: the parsed ``config.json``.
            source: the file, for error messages.
        """
        if not isinstance(data, dict):
            raise SimsError(f"{source}: must hold a JSON object, got {type(data).__name__}")
        version = data.get("format_version", 1)
        if version not in (1, RUN_FORMAT_VERSION) or isinstance(version, bool):
            raise SimsError(
                f"{source}: run format version {version!r} is not supported by this simsteer "
                f"(it reads versions 1 and {RUN_FORMAT_VERSION})"
            )
        check_spec(data, source)
        known = {
            "format_version",
            "simsteer_version",
            "model",
            "oracle",
            "learner",
            "layers",
            "sims",
            "prompts",
        }
        model = dict(data["model"])
        if version == 1:
            # Format 1 kept how the model was loaded in the CLI namespace; the namespace
            # itself is not carried over (a spec never holds one).
            cli = data.get("cli") or {}
            model.setdefault("device", cli.get("device") or "")
            model.setdefault("trust_remote_code", bool(cli.get("trust_remote_code", False)))
            # ... and where its prompts came from (the random-split baseline re-reads them).
            sources = {key: cli.get(key) for key in ("prompts", "eval_prompts_file") if key in cli}
            data = {**data, "prompts": data.get("prompts") or sources}
            known.add("cli")
        try:
            sims = SIMSConfig.from_dict(data["sims"])
        except SimsError as exc:  # a value out of range: say where it came from
            raise SimsError(f"{source}: sims: {exc}") from None
        return cls(
            model=ModelSpec.from_json(model),
            oracle=dict(data["oracle"]),
            learner=dict(data["learner"]),
            layers=list(data.get("layers") or []),
            sims=sims,
            prompts=dict(data.get("prompts") or {}),
            simsteer_version=data.get("simsteer_version", ""),
            format_version=version,
            extra={k: v for k, v in data.items() if k not in known},
        )

    def mismatches(self, current: RunSpec) -> list[str]:
        """What ``current`` changes of this (saved) spec that a resume cannot change:
        the loop's settings, the oracle and learner specs (a judge's waits aside), the
        model's fingerprint and dtype; one ``field: saved ... now ...`` entry per differing field.

        For a format-1 spec, the oracle and learner are compared on the keys both specs
        have (newer versions describe them with more keys).

        Args:
            current: the spec of the run as it would be started now.
        """
        pairs = {
            "sims": (self.sims.to_dict(), current.sims.to_dict()),
            "oracle": (_what_is_asked(self.oracle), _what_is_asked(current.oracle)),
            "learner": (self.learner, current.learner),
            "model.fingerprint": (self.model.fingerprint, current.model.fingerprint),
            "model.dtype": (self.model.dtype, current.model.dtype),
        }
        out = []
        for name, (saved, now) in pairs.items():
            # Compare what JSON keeps (tuples become lists, keys strings).
            flat_saved, flat_now = _flatten(name, _plain(saved)), _flatten(name, _plain(now))
            if self.format_version < 2 and name in ("oracle", "learner"):
                flat_saved = {k: v for k, v in flat_saved.items() if k in flat_now}
                flat_now = {k: v for k, v in flat_now.items() if k in flat_saved}
            for key in sorted(set(flat_saved) | set(flat_now)):
                a, b = flat_saved.get(key, "(unset)"), flat_now.get(key, "(unset)")
                if a != b:
                    out.append(f"{key}: saved {a!r}, now {b!r}")
        return out


def check_spec(data: Any, source: str = "config.json") -> None:
    """Refuse a ``config.json`` (hand-edited, damaged) whose fields have the wrong type,
    in one line naming the file and the field (:func:`simsteer.schema.check` against
    :class:`RunSpec`'s annotations); ranges are left to the configs.

    Args:
        data: the parsed file.
        source: the file, for the message.
    """
    if not isinstance(data, dict):
        raise SchemaError(f"{source}: must hold a JSON object, got {type(data).__name__}")
    check(RunSpec, _with_defaults(data), source)
    for name in ("oracle", "learner"):
        check_value(str, data[name].get("name"), source, f"{name}.name")


def _with_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with what older files leave out or write as null (``layers``, ``prompts``,
    the model's ``device``) as the reader takes it."""
    out = {**data, "layers": data.get("layers") or [], "prompts": data.get("prompts") or {}}
    if isinstance(data.get("model"), dict) and data["model"].get("device", "") is None:
        out["model"] = {**data["model"], "device": ""}
    return out


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _flatten(prefix: str, value: Any) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"prefix.a.b": 1}`` (lists stay values)."""
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, item in value.items():
        out.update(_flatten(f"{prefix}.{key}", item))
    return out
