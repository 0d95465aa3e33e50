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
- ``python:MODULE:FUNCTION`` / ``python:FILE.py:FUNCTION``: your own scorer or ranker
  (:mod:`.python_function`);
- ``self-consistency``: majority vote over final answers (:mod:`.self_consistency`).

A name is shorthand for a *spec*, a JSON-ready dict with the oracle's ``name`` and its
settings (:func:`oracle_spec`). ``oracle.describe()`` returns the full spec, which a run
saves in ``config.json``, and :func:`get_oracle` accepts a spec back, so the saved run's
oracle can be rebuilt as it was (template, judge endpoint, temperature, ...). File paths in
a spec are absolute so the spec works from any folder.
"""

from __future__ import annotations

import difflib
from typing import Any

from ..errors import SimsError
from .base import Judgment, Oracle, ScoreOracle, bradley_terry, win_rates
from .registry import find_oracle, register_oracle, registered_oracles
from .templates import template_ref

# Each module registers its kinds of oracle (:mod:`.registry`) when imported, so the order
# of these imports is the order help and errors list the names in.
# isort: off
from .attributes import AttributeOracle
from .refusal import RefusalOracle
from .reward_model import RewardModelOracle
from .self_rank import SelfRankOracle
from .self_judge import SelfJudgeOracle, SelfJudgePairwiseOracle
from .llm_judge import JudgeConfig, JudgeOracle
from .python_function import PythonRankOracle, PythonScoreOracle
from .self_consistency import SelfConsistencyOracle
# isort: on

#: The oracles that judge with the loaded backbone (``get_oracle(..., lm=)``).
MODEL_ORACLES = tuple(k.kind for k in registered_oracles() if k.needs_model)
#: Every oracle name, as help and errors list them.
ORACLE_NAMES = tuple(name for k in registered_oracles() for name in k.names)


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
    kind = find_oracle(name)
    spec = {"name": name} if kind is None else kind.name_spec(name, judge_options or {})
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
    kind = find_oracle(name)
    if kind is None:
        close = difflib.get_close_matches(
            name.partition(":")[0], [n.split(":")[0] for n in ORACLE_NAMES], n=1
        )
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SimsError(f"unknown oracle {name!r}{hint}; known oracles: {', '.join(ORACLE_NAMES)}")
    unknown = sorted(set(spec) - set(kind.settings))
    if unknown:
        raise SimsError(
            f"oracle {name!r} has no setting {unknown[0]!r} (settings: {', '.join(kind.settings)})"
        )
    if kind.needs_model and lm is None:
        raise SimsError(f"the {name} oracle needs the loaded model (pass lm=...)")
    return kind.build(name, spec, device, lm)


__all__ = [
    "MODEL_ORACLES",
    "ORACLE_NAMES",
    "AttributeOracle",
    "JudgeConfig",
    "JudgeOracle",
    "Judgment",
    "Oracle",
    "PythonRankOracle",
    "PythonScoreOracle",
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
    "register_oracle",
    "win_rates",
]
