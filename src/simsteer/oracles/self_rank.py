"""SIMS-PR's oracle: the backbone model ranks its own K answers in one greedy reply.

The ranking prompt (``templates/rank.txt``, replaceable) shows the request and the
numbered answers and asks for a JSON leaderboard, best first. The reply is read with
:func:`simsteer.oracles.ranking.parse_ranking`; when no ranking can be recovered the
prompt is marked ``parsed=False`` and skipped by the loop (counted in the iteration's
``ranking_parse_rate``), never given an invented order.

Absolute scores (the loop's ``sample_score`` / ``eval_score``) come from the pointwise
likelihood self-judge, since a ranking has no scale: a mean rank is always the middle.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..generation.sampling import SamplingConfig, generate
from ..models import LoadedModel
from .base import Judgment, ScoreOracle
from .likelihood import PointwiseJudge
from .ranking import parse_ranking
from .registry import register_oracle
from .templates import Template, load_template, numbered_responses


class SelfRankOracle(ScoreOracle):
    """The model's own leaderboard of its K answers (SIMS-PR).

    Args:
        lm: the backbone model (judges unsteered).
        template: ranking template name or file (placeholders ``{prompt}``,
            ``{responses}``, ``{num_responses}``).
        max_new_tokens: length of the ranking reply.
        batch_size: ranking prompts decoded together.

    Example:
        >>> oracle = SelfRankOracle(load_model())
        >>> j = oracle.judge(["Name a colour."], [["Blue.", "Colour.", "A blue sky is blue."]])[0]
        >>> j.parsed, j.info["raw"]
    """

    def __init__(
        self,
        lm: LoadedModel,
        template: str | Template = "rank",
        max_new_tokens: int = 96,
        batch_size: int = 16,
    ) -> None:
        super().__init__(temperature=0.1)  # of the pointwise scores, as the self-judge's
        self.pointwise = PointwiseJudge(lm, batch_size=batch_size)
        self.template = self.pointwise.template
        self.lm = lm
        self.rank_template = (
            template if isinstance(template, Template) else load_template(template)
        ).require("prompt", "responses")
        self.max_new_tokens = max_new_tokens
        self.rank_batch_size = batch_size
        self.name = "self-rank"

    def ranking_prompts(self, prompts: list[str], responses: list[list[str]]) -> list[str]:
        return [
            self.rank_template.render(prompt=p, responses=numbered_responses(rs), num_responses=str(len(rs)))
            for p, rs in zip(prompts, responses, strict=True)
        ]

    def score(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        """Each answer's pointwise likelihood self-judge score (a ranking has no scale)."""
        return self.pointwise.score(prompts, responses)

    def judge(self, prompts: list[str], responses: list[list[str]]) -> list[Judgment]:
        greedy = SamplingConfig(
            temperature=0.0, max_new_tokens=self.max_new_tokens, batch_size=self.rank_batch_size
        )
        replies = generate(self.lm, self.ranking_prompts(prompts, responses), 1, greedy)
        flat_p = [p for p, rs in zip(prompts, responses, strict=True) for _ in rs]
        scores = self.score(flat_p, [r for rs in responses for r in rs])
        out, start = [], 0
        for rs, reply in zip(responses, replies, strict=True):
            k, text = len(rs), reply[0].text
            s = scores[start : start + k]
            start += k
            ranking = parse_ranking(text, k)
            info = {"raw": text, "method": ranking.method if ranking else None}
            if ranking is None:
                out.append(Judgment(np.full((k, k), 0.5), scores=s, parsed=False, info=info))
            else:
                out.append(Judgment(ranking.preference(), scores=s, info=info))
        return out

    def describe(self) -> dict:
        return {
            "name": self.name,
            "template": self.rank_template.name,
            "score_template": self.template.name,
            "max_new_tokens": self.max_new_tokens,
        }


@register_oracle("self-rank", settings=("template", "max_new_tokens", "score_template"), needs_model=True)
def _build(name: str, settings: dict[str, Any], device: str | None, lm: Any) -> SelfRankOracle:
    settings = dict(settings)
    settings.pop("score_template", None)  # informative: self-rank always scores with pointwise
    return SelfRankOracle(lm, **settings)
