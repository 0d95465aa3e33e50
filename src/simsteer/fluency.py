"""Fluency and diversity of generated answers: the metrics that catch an oracle being
hacked (scores rise while answers degenerate).

- perplexity of each answer under a reference model (the unsteered one by default):
  ``exp(mean NLL of the answer's tokens given the prompt)``; the LM head runs only on
  answer positions, so memory stays small;
- repetition rate: share of an answer's word n-grams (n = 3) that repeat an earlier one;
- distinct-n: unique word n-grams over all n-grams across a set of answers;
- loop detection: an answer *ends in a loop* when its tail is periodic: some unit of 1-40
  words repeats back to back covering at least one full extra copy of the unit and at
  least 4 words (a truncated last copy counts);
- mean length in tokens.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from .models import LoadedModel
from .tokens import encode_pairs, response_logits, teacher_forced

_WORD = re.compile(r"\w+(?:'\w+)?|[^\w\s]")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def repetition_rate(text: str, n: int = 3) -> float:
    """Share of the answer's n-grams that already occurred earlier in it (0 = none)."""
    grams = _ngrams(words(text), n)
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Unique n-grams / all n-grams over a set of answers (1 = no n-gram repeats)."""
    grams = [g for t in texts for g in _ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def ends_in_loop(text: str, max_unit: int = 40, min_words: int = 4) -> bool:
    """Whether the answer's tail repeats one unit of words back to back (see module doc)."""
    w = words(text)
    for unit in range(1, min(max_unit, len(w) // 2) + 1):
        run = 0
        for i in range(len(w) - 1, unit - 1, -1):
            if w[i] != w[i - unit]:
                break
            run += 1
        if run >= max(unit, min_words):
            return True
    return False


def perplexities(
    lm: LoadedModel,
    prompts: Sequence[str],
    responses: Sequence[str],
    batch_size: int = 8,
    steering=None,
) -> list[float]:
    """Per-answer perplexity under ``lm`` (steered by ``steering`` if given).

    Answers with no tokens get ``nan``.
    """
    rows = encode_pairs(lm.tokenizer, prompts, responses)
    out = [math.nan] * len(rows)
    ctx = steering.applied(lm.model) if steering is not None else contextlib.nullcontext()
    with torch.inference_mode(), ctx:
        for batch in teacher_forced(lm, rows, batch_size, skip_empty=True):
            for row, i in enumerate(batch.index):
                # The answer's tokens, predicted from the positions just before them.
                logits, target = response_logits(lm, batch, row)
                nll = torch.nn.functional.cross_entropy(logits, target)
                out[i] = float(torch.exp(nll))
    return out


@dataclass(frozen=True)
class FluencyReport:
    """Fluency and diversity of a set of answers (see module docstring)."""

    perplexity: float  # exp(mean log perplexity): the geometric mean over answers
    repetition: float  # mean repetition rate
    distinct_2: float
    loop_share: float
    mean_tokens: float

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in asdict(self).items()}


def fluency_report(
    lm: LoadedModel,
    prompts: Sequence[str],
    responses: Sequence[str],
    num_tokens: Sequence[int] | None = None,
    batch_size: int = 8,
    per_answer: Sequence[float] | None = None,
) -> FluencyReport:
    """All fluency metrics for aligned prompts and answers, perplexity under ``lm``.

    ``per_answer``: the answers' perplexities when already computed (:func:`perplexities`).
    """
    if per_answer is None:
        per_answer = perplexities(lm, prompts, responses, batch_size)
    ppl = [p for p in per_answer if not math.isnan(p)]
    log_ppl = sum(math.log(p) for p in ppl) / len(ppl) if ppl else math.nan
    n = max(len(responses), 1)
    if num_tokens is None:
        num_tokens = [len(lm.tokenizer(r, add_special_tokens=False)["input_ids"]) for r in responses]
    return FluencyReport(
        perplexity=math.exp(log_ppl) if ppl else math.nan,
        repetition=sum(repetition_rate(r) for r in responses) / n,
        distinct_2=distinct_n(responses, 2),
        loop_share=sum(ends_in_loop(r) for r in responses) / n,
        mean_tokens=sum(num_tokens) / n,
    )
