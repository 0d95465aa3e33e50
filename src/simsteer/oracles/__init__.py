"""Preference oracles: attribute scorers and reward models behind one name lookup.

Oracle names (``sims run --oracle NAME``):

- ``sentiment``, ``negativity``, ``readability``, ``length:N``: built-in text scorers;
- ``reward-model:PATH_OR_ID`` (or ``rm:PATH_OR_ID``): a sequence-classification reward model;
- ``self-rank``: the backbone ranks its own K answers (SIMS-PR, :mod:`.self_rank`);
- ``self-judge`` / ``self-judge-pairwise``: verdict-token likelihoods of the backbone
  (:mod:`.self_judge`);
- ``judge:MODEL@BASE_URL`` (or ``judge`` with ``judge_options``): an LLM judge over an
  OpenAI-compatible API (:mod:`.llm_judge`);
- ``python:MODULE:FUNCTION`` / ``python:FILE.py:FUNCTION``: your own scorer or ranker,
  ``self-consistency``: majority vote over final answers (:mod:`.user`).
"""

from __future__ import annotations

import difflib
from typing import Any

from ..errors import SimsError
from .attributes import ATTRIBUTES, AttributeOracle, attribute_oracle
from .base import Judgment, Oracle, ScoreOracle, bradley_terry, win_rates
from .llm_judge import JudgeConfig, JudgeOracle
from .reward_model import RewardModelOracle
from .self_judge import SelfJudgeOracle, SelfJudgePairwiseOracle
from .self_rank import SelfRankOracle
from .user import SelfConsistencyOracle, python_oracle

MODEL_ORACLES = ("self-rank", "self-judge", "self-judge-pairwise")
ORACLE_NAMES = (
    *ATTRIBUTES,
    "reward-model:PATH",
    *MODEL_ORACLES,
    "judge:MODEL@BASE_URL",
    "python:MODULE:FUNCTION",
    "self-consistency",
)


def get_oracle(
    spec: str,
    temperature: float = 1.0,
    device: str | None = None,
    lm: Any = None,
    template: str | None = None,
    judge_options: dict[str, Any] | None = None,
) -> Oracle:
    """Build an oracle from its name (see the module docstring).

    Args:
        lm: the loaded backbone (:class:`~simsteer.models.LoadedModel`), needed by the
            ``self-*`` oracles.
        template: a template file replacing the oracle's built-in one.
        judge_options: :class:`JudgeConfig` fields for ``judge`` (model, base_url, mode, ...).
    """
    kind, _, arg = spec.partition(":")
    if kind in ("reward-model", "rm"):
        if not arg:
            raise SimsError("reward-model needs a model: use reward-model:PATH_OR_ID")
        return RewardModelOracle(arg, device=device, temperature=temperature)
    if spec in MODEL_ORACLES:
        if lm is None:
            raise SimsError(f"the {spec} oracle needs the loaded model (pass lm=...)")
        if spec == "self-rank":
            return SelfRankOracle(lm, template=template or "rank")
        if spec == "self-judge":
            return SelfJudgeOracle(lm, template=template or "pointwise")
        return SelfJudgePairwiseOracle(lm, template=template or "pairwise")
    if kind == "judge":
        options = dict(judge_options or {})
        if arg:
            model, at, base_url = arg.rpartition("@")
            if not at:
                raise SimsError(f"write the judge as judge:MODEL@BASE_URL, got {spec!r}")
            options.update(model=model, base_url=base_url)
        if template:
            options["template"] = template
        try:
            return JudgeOracle(JudgeConfig(**options))
        except TypeError as exc:
            raise SimsError(f"judge: {exc}") from None
    if kind == "python":
        return python_oracle(arg, temperature)
    if spec == "self-consistency":
        return SelfConsistencyOracle()
    try:
        return attribute_oracle(spec, temperature)
    except KeyError:
        pass
    close = difflib.get_close_matches(kind, [n.split(":")[0] for n in ORACLE_NAMES], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise SimsError(f"unknown oracle {spec!r}{hint}; known oracles: {', '.join(ORACLE_NAMES)}")


__all__ = [
    "ORACLE_NAMES",
    "AttributeOracle",
    "JudgeConfig",
    "JudgeOracle",
    "Judgment",
    "Oracle",
    "RewardModelOracle",
    "ScoreOracle",
    "SelfConsistencyOracle",
    "SelfJudgeOracle",
    "SelfJudgePairwiseOracle",
    "SelfRankOracle",
    "bradley_terry",
    "get_oracle",
    "win_rates",
]
