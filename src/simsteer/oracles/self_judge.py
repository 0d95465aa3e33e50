"""The backbone model as its own judge, read from verdict-token likelihoods.

No text is sampled: one batched forward pass per question, and the verdict is the
next-token probability of a favourable word against an unfavourable one, renormalised
over the two (:mod:`.likelihood`).

- ``self-judge`` (:class:`SelfJudgeOracle`): pointwise, the score of an answer is
  ``P(Yes) / (P(Yes) + P(No))`` for "is this a good answer?";
- ``self-judge-pairwise`` (:class:`SelfJudgePairwiseOracle`): for every pair, the
  probability of ``A`` in both orders, averaged after the swap:
  ``P[k, j] = (P_A(k, j) + 1 - P_A(j, k)) / 2``, so ``P + P.T = 1`` exactly and the
  position bias of the judge cancels.

The judge runs unsteered: the steering hooks are only installed while sampling.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..models import LoadedModel
from .base import Judgment, Oracle, ScoreOracle
from .likelihood import LikelihoodJudge, PointwiseJudge
from .registry import register_oracle
from .templates import Template, load_template

__all__ = ["LikelihoodJudge", "SelfJudgeOracle", "SelfJudgePairwiseOracle"]


class SelfJudgeOracle(ScoreOracle):
    """Pointwise likelihood self-judge: score = P(favourable verdict).

    Example:
        >>> oracle = SelfJudgeOracle(load_model())
        >>> oracle.score(["Name a colour."], ["Blue."])
    """

    def __init__(
        self,
        lm: LoadedModel,
        template: str | Template = "pointwise",
        verdicts: tuple[str, str] = ("Yes", "No"),
        batch_size: int = 8,
        temperature: float = 0.1,
    ) -> None:
        super().__init__(temperature)
        self.pointwise = PointwiseJudge(lm, template, verdicts, batch_size)
        self.template = self.pointwise.template
        self.verdicts = verdicts
        self.name = "self-judge"

    def score(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        return self.pointwise.score(prompts, responses)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "template": self.template.name,
            "verdicts": list(self.verdicts),
            "temperature": self.temperature,
        }


class SelfJudgePairwiseOracle(Oracle):
    """Pairwise likelihood self-judge with position swap (see the module docstring)."""

    def __init__(
        self,
        lm: LoadedModel,
        template: str | Template = "pairwise",
        labels: tuple[str, str] = ("A", "B"),
        batch_size: int = 8,
    ) -> None:
        self.judge_lm = LikelihoodJudge(lm, batch_size)
        self.template = (template if isinstance(template, Template) else load_template(template)).require(
            "prompt", "response_a", "response_b"
        )
        self.labels = labels
        self.name = "self-judge-pairwise"

    def judge(self, prompts: list[str], responses: list[list[str]]) -> list[Judgment]:
        # Every ordered pair (k, j), k != j, of every prompt in one batched pass.
        jobs = [
            (n, k, j)
            for n, rs in enumerate(responses)
            for k in range(len(rs))
            for j in range(len(rs))
            if k != j
        ]
        questions = [
            self.template.render(prompt=prompts[n], response_a=responses[n][k], response_b=responses[n][j])
            for n, k, j in jobs
        ]
        p_first = self.judge_lm.probability(questions, *self.labels) if jobs else np.zeros(0)
        shown = [np.full((len(rs), len(rs)), np.nan) for rs in responses]
        for (n, k, j), p in zip(jobs, p_first, strict=True):
            shown[n][k, j] = p  # P(the answer shown first wins | k first, j second)
        out = []
        for a in shown:
            # Averaging the two orders: P[k, j] = (a[k, j] + 1 - a[j, k]) / 2.
            pref = (a + 1.0 - a.T) / 2.0
            np.fill_diagonal(pref, 0.5)
            info = {"position_bias": _position_bias(a), "shown_first": _as_json_matrix(a)}
            out.append(Judgment(preference=pref, info=info))
        return out

    def describe(self) -> dict:
        return {"name": self.name, "template": self.template.name, "labels": list(self.labels)}


@register_oracle("self-judge", settings=("template", "verdicts", "temperature"), needs_model=True)
def _build_pointwise(name: str, settings: dict[str, Any], device: str | None, lm: Any) -> SelfJudgeOracle:
    if "verdicts" in settings:  # a JSON list back to the tuple the oracle takes
        settings = {**settings, "verdicts": tuple(settings["verdicts"])}
    return SelfJudgeOracle(lm, **settings)


@register_oracle("self-judge-pairwise", settings=("template", "labels"), needs_model=True)
def _build_pairwise(
    name: str, settings: dict[str, Any], device: str | None, lm: Any
) -> SelfJudgePairwiseOracle:
    if "labels" in settings:
        settings = {**settings, "labels": tuple(settings["labels"])}
    return SelfJudgePairwiseOracle(lm, **settings)


def _as_json_matrix(a: np.ndarray) -> list[list[float | None]]:
    """A matrix as JSON-ready lists (``None`` where it holds NaN, like the diagonal)."""
    return [[None if np.isnan(x) else round(float(x), 6) for x in row] for row in a]


def _position_bias(shown_first: np.ndarray) -> float:
    """Mean P(first shown wins) minus 1/2: the judge's preference for position A."""
    off = shown_first[~np.eye(shown_first.shape[0], dtype=bool)]
    return float(np.mean(off) - 0.5) if off.size else 0.0
