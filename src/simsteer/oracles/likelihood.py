"""The backbone model's verdict-token likelihoods, shared by the self-judging oracles
(:mod:`.self_judge`, :mod:`.self_rank`).

No text is sampled: one batched forward pass per question, and the verdict is the
next-token probability of a favourable word against an unfavourable one, renormalised
over the two (each word counts with its spelling variants: ``Yes``, `` Yes``, ``yes``).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import SimsError
from ..models import LoadedModel
from ..tokens import TokenRow, encode_prompt, teacher_forced
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


class PointwiseJudge:
    """Scores each answer alone: ``P(favourable verdict)`` for "is this a good answer?".

    Args:
        lm: the (frozen) model that judges.
        template: template name or file (placeholders ``{prompt}``, ``{response}``).
        verdicts: the favourable and the unfavourable verdict word.
        batch_size: questions per forward pass.
    """

    def __init__(
        self,
        lm: LoadedModel,
        template: str | Template = "pointwise",
        verdicts: tuple[str, str] = ("Yes", "No"),
        batch_size: int = 8,
    ) -> None:
        self.judge_lm = LikelihoodJudge(lm, batch_size)
        self.template = (template if isinstance(template, Template) else load_template(template)).require(
            "prompt", "response"
        )
        self.verdicts = verdicts

    def score(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        questions = [
            self.template.render(prompt=p, response=r) for p, r in zip(prompts, responses, strict=True)
        ]
        return self.judge_lm.probability(questions, *self.verdicts)
