"""Preference oracles: attribute scorers and reward models behind one name lookup.

Oracle names (``sims run --oracle NAME``):

- ``sentiment``, ``negativity``, ``readability``, ``length:N``: built-in text scorers;
- ``refusal``: declining the request, from a documented phrase list (:mod:`.refusal`);
- ``reward-model:PATH_OR_ID`` (or ``rm:PATH_OR_ID``): a sequence-classification reward model;
- ``self-rank``: the backbone ranks its own K answers (SIMS-PR, :mod:`.self_rank`);
- ``self-judge`` / ``self-judge-pairwise``: verdict-token likelihoods of the backbone
  (:mod:`.self_judge`);
- ``judge:MODEL@BASE_URL`` (or ``judge`` with ``judge_options``): an LLM judge over an
  OpenAI-compatible API (:mod:`.llm_judge`);
- ``python:MODULE:FUNCTION`` / ``python:FILE.py:FUNCTION``: your own scorer or ranker,
  ``self-consistency``: majority vote over final answers (:mod:`.user`).

A name is shorthand for a *spec*, a JSON-ready dict with the oracle's ``name`` and its
settings (:func:`oracle_spec`). ``oracle.describe()`` returns the full spec, which a run
saves in ``config.json``, and :func:`get_oracle` accepts a spec back, so the saved run's
oracle can be rebuilt as it was (template, judge endpoint, temperature, ...). File paths in
a spec are absolute so the spec works from any folder.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from ..errors import SimsError
from .attributes import ATTRIBUTES, AttributeOracle, attribute_oracle
from .base import Judgment, Oracle, ScoreOracle, bradley_terry, win_rates
from .llm_judge import JudgeConfig, JudgeOracle
from .refusal import RefusalOracle
from .reward_model import RewardModelOracle
from .self_judge import SelfJudgeOracle, SelfJudgePairwiseOracle
from .self_rank import SelfRankOracle
from .templates import template_ref
from .user import SelfConsistencyOracle, python_oracle, python_target

MODEL_ORACLES = ("self-rank", "self-judge", "self-judge-pairwise")
ORACLE_NAMES = (
    *ATTRIBUTES,
    "refusal",
    "reward-model:PATH",
    *MODEL_ORACLES,
    "judge:MODEL@BASE_URL",
    "python:MODULE:FUNCTION",
    "self-consistency",
)

#: Settings each kind of oracle takes from a spec (besides ``name``); informative keys
#: that ``describe()`` adds (``score_template``) are accepted and ignored.
_SPEC_KEYS: dict[str, tuple[str, ...]] = {
    "attribute": ("temperature",),
    "reward-model": ("temperature",),
    "self-rank": ("template", "max_new_tokens", "score_template"),
    "self-judge": ("template", "verdicts", "temperature"),
    "self-judge-pairwise": ("template", "labels"),
    "judge": tuple(JudgeConfig.__dataclass_fields__),
    "python": ("temperature",),
    "self-consistency": ("temperature",),
}


def _kind(name: str) -> str:
    """Which kind of oracle a name builds (the keys of :data:`_SPEC_KEYS`)."""
    if name in MODEL_ORACLES or name == "self-consistency":
        return name
    kind = name.partition(":")[0]
    if kind in ("reward-model", "rm"):
        return "reward-model"
    return kind if kind in ("judge", "python") else "attribute"


def _local_path(path: str) -> str:
    """A path that exists here is made absolute; anything else (a hub id) is kept."""
    return str(Path(path).expanduser().resolve()) if Path(path).expanduser().exists() else path


def oracle_spec(
    name: str,
    temperature: float | None = None,
    template: str | None = None,
    judge_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The spec an oracle name stands for (settings left out take the oracle's defaults).

    Args:
        name: an oracle name (see the module docstring).
        temperature: Bradley-Terry temperature of score oracles (``None``: the oracle's own).
        template: a template name or file replacing the oracle's built-in one.
        judge_options: :class:`JudgeConfig` fields for ``judge`` (model, base_url, mode, ...).

    Example:
        >>> oracle_spec("judge:smollm2@http://127.0.0.1:8000/v1")
        {'name': 'judge', 'model': 'smollm2', 'base_url': 'http://127.0.0.1:8000/v1'}
    """
    kind, _, arg = name.partition(":")
    spec: dict[str, Any] = {"name": name}
    if _kind(name) == "reward-model":
        if not arg:
            raise SimsError("reward-model needs a model: use reward-model:PATH_OR_ID")
        spec["name"] = f"reward-model:{_local_path(arg)}"
    elif kind == "judge":
        spec = {"name": "judge", **(judge_options or {})}
        if arg:
            # split at the @ before the URL (the URL itself may hold user:pass@)
            at = max(arg.rfind("@http://"), arg.rfind("@https://"))
            model, base_url = (arg[:at], arg[at + 1 :]) if at > 0 else (arg, "")
            if not base_url:
                raise SimsError(f"write the judge as judge:MODEL@BASE_URL, got {name!r}")
            spec.update(model=model, base_url=base_url)
    elif kind == "python":
        spec["name"] = f"python:{python_target(arg)}"
    if template is not None:
        spec["template"] = template_ref(template)
    if temperature is not None:
        spec["temperature"] = temperature
    return spec


def get_oracle(
    spec: str | dict[str, Any],
    temperature: float | None = None,
    device: str | None = None,
    lm: Any = None,
    template: str | None = None,
    judge_options: dict[str, Any] | None = None,
) -> Oracle:
    """Build an oracle from its name or its spec (``oracle.describe()``).

    Args:
        spec: an oracle name (see the module docstring) or a spec dict.
        temperature: Bradley-Terry temperature of score oracles (default: the oracle's own).
        device: where a reward model runs.
        lm: the loaded backbone (:class:`~simsteer.models.LoadedModel`), needed by the
            ``self-*`` oracles.
        template: a template file replacing the oracle's built-in one.
        judge_options: :class:`JudgeConfig` fields for ``judge`` (model, base_url, mode, ...).

    Example:
        >>> oracle = get_oracle("length:20", temperature=0.5)
        >>> get_oracle(oracle.describe()).describe() == oracle.describe()
        True
    """
    if isinstance(spec, str):
        spec = oracle_spec(spec, temperature, template, judge_options)
    else:  # a saved spec; explicit arguments override what it says
        spec = {**spec, **oracle_spec(spec["name"], temperature, template, judge_options)}
    return _build(dict(spec), device, lm)


def _build(spec: dict[str, Any], device: str | None, lm: Any) -> Oracle:
    name = spec.pop("name")
    kind, arg = _kind(name), name.partition(":")[2]
    allowed = _SPEC_KEYS[kind]
    unknown = sorted(set(spec) - set(allowed))
    if unknown:
        raise SimsError(f"oracle {name!r} has no setting {unknown[0]!r} (settings: {', '.join(allowed)})")
    spec.pop("score_template", None)  # informative: self-rank always scores with pointwise
    for key in ("verdicts", "labels"):  # JSON lists back to the tuples the oracles take
        if key in spec:
            spec[key] = tuple(spec[key])
    if kind in MODEL_ORACLES:
        if lm is None:
            raise SimsError(f"the {name} oracle needs the loaded model (pass lm=...)")
        cls = {"self-rank": SelfRankOracle, "self-judge": SelfJudgeOracle}.get(name, SelfJudgePairwiseOracle)
        return cls(lm, **spec)
    if kind == "reward-model":
        return RewardModelOracle(arg, device=device, **spec)
    if kind == "judge":
        try:
            return JudgeOracle(JudgeConfig(**spec))
        except TypeError as exc:
            raise SimsError(f"judge: {exc}") from None
    if kind == "python":
        return python_oracle(arg, **spec)
    if kind == "self-consistency":
        return SelfConsistencyOracle(**spec)
    if name == "refusal":
        return RefusalOracle(**spec)
    try:
        return attribute_oracle(name, **spec)
    except KeyError:
        pass
    close = difflib.get_close_matches(name.partition(":")[0], [n.split(":")[0] for n in ORACLE_NAMES], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise SimsError(f"unknown oracle {name!r}{hint}; known oracles: {', '.join(ORACLE_NAMES)}")


__all__ = [
    "MODEL_ORACLES",
    "ORACLE_NAMES",
    "AttributeOracle",
    "JudgeConfig",
    "JudgeOracle",
    "Judgment",
    "Oracle",
    "RefusalOracle",
    "RewardModelOracle",
    "ScoreOracle",
    "SelfConsistencyOracle",
    "SelfJudgeOracle",
    "SelfJudgePairwiseOracle",
    "SelfRankOracle",
    "bradley_terry",
    "get_oracle",
    "oracle_spec",
    "win_rates",
]
