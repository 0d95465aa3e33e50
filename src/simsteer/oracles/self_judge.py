"""The backbone model as its own judge, read from verdict-token likelihoods.

No text is sampled: one batched forward pass per question, and the verdict is the
next-token probability of a favourable word against an unfavourable one, renormalised
over the two (each word counts with its spelling variants: ``Yes``, `` Yes``, ``yes``).

- ``self-judge`` (:class:`SelfJudgeOracle`): pointwise, the score of an answer is
  ``P(Yes) / (P(Yes) + P(No))`` for "is this a good answer?";
- ``self-judge-pairwise`` (:class:`SelfJudgePairwiseOracle`): for every pair, the
  probability of ``A`` in both orders, averaged after the swap:
  ``P[k, j] = (P_A(k, j) + 1 - P_A(j, k)) / 2``, so ``P + P.T = 1`` exactly and the
  position bias of the judge cancels.

The judge runs unsteered: the steering hooks are only installed while sampling.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import SimsError
from ..models import LoadedModel
from ..tokens import TokenRow, encode_prompt, teacher_forced
from .base import Judgment, Oracle, ScoreOracle
from .templates import Template, load_template


class LikelihoodJudge:
    """Batched next-token verdict probabilities of a causal LM.

    Args:
        lm: the (frozen) model that judges.
        batch_size: questions per forward pass.
        max_length: questions longer than this keep their last tokens (the verdict
            question sits at the end).
    """

    def __init__(self, lm: LoadedModel, batch_size: int = 8, max_length: int = 1536) -> None:
        self.lm = lm
        self.batch_size = batch_size
        self.max_length = max_length

    def verdict_ids(self, word: str) -> list[int]:
        """First token of each spelling of ``word`` that the tokenizer knows."""
        tok = self.lm.tokenizer
        ids: set[int] = set()
        for form in {word, f" {word}", word.lower(), f" {word.lower()}", word.capitalize()}:
            enc = tok(form, add_special_tokens=False)["input_ids"]
            if enc and enc[0] != tok.unk_token_id:
                ids.add(int(enc[0]))
        return sorted(ids)

    def probability(self, questions: list[str], yes: str, no: str) -> np.ndarray:
        """``P(yes) / (P(yes) + P(no))`` as the first token of the reply to each question."""
        yes_ids, no_ids = self.verdict_ids(yes), self.verdict_ids(no)
        if not yes_ids or not no_ids or set(yes_ids) & set(no_ids):
            raise SimsError(f"the tokenizer cannot tell the verdicts {yes!r} and {no!r} apart")
        # The verdict is the next token after each question: no response tokens.
        rows = [TokenRow(encode_prompt(self.lm.tokenizer, q)[-self.max_length :], 0) for q in questions]
        out: list[float] = []
        with torch.inference_mode():
            batches = teacher_forced(self.lm, rows, self.batch_size, whole_model=True, longest_first=False)
            for batch in batches:
                logits = batch.logits[:, -1].float()
                log_yes = torch.logsumexp(logits[:, yes_ids], dim=-1)
                log_no = torch.logsumexp(logits[:, no_ids], dim=-1)
                out.extend(torch.sigmoid(log_yes - log_no).cpu().tolist())
        return np.asarray(out, dtype=np.float64)


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
        self.judge_lm = LikelihoodJudge(lm, batch_size)
        self.template = (template if isinstance(template, Template) else load_template(template)).require(
            "prompt", "response"
        )
        self.verdicts = verdicts
        self.name = "self-judge"

    def score(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        questions = [
            self.template.render(prompt=p, response=r) for p, r in zip(prompts, responses, strict=True)
        ]
        return self.judge_lm.probability(questions, *self.verdicts)

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


def _as_json_matrix(a: np.ndarray) -> list[list[float | None]]:
    """A matrix as JSON-ready lists (``None`` where it holds NaN, like the diagonal)."""
    return [[None if np.isnan(x) else round(float(x), 6) for x in row] for row in a]


def _position_bias(shown_first: np.ndarray) -> float:
    """Mean P(first shown wins) minus 1/2: the judge's preference for position A."""
    off = shown_first[~np.eye(shown_first.shape[0], dtype=bool)]
    return float(np.mean(off) - 0.5) if off.size else 0.0
