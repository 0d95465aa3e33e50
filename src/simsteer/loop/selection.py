"""Which sampled answers a SIMS update learns from: the one function the variants swap.

- ``sims`` (Algorithm 1): every answer with win rate > 1/2 goes to D+, < 1/2 to D-;
- ``pr`` (prompt ranking): per prompt, the top-ranked answer to D+ and the bottom-ranked
  to D- (made for ranking oracles such as ``self-rank``; works with any oracle);
- ``cs`` (contrast sampling): every judged prompt joins the response bank
  (:mod:`simsteer.loop.bank`); the update trains on the bank's top-N entries by contrast
  reward, best answer to D+, worst to D-, older iterations included.

A prompt the oracle could not judge (``Judgment.parsed`` false) is labelled ``skipped``
under every variant and counted in the iteration's ``ranking_parse_rate``.

Selection is pure: it takes the batch, its generations and judgments (and the bank, for
``cs``) and returns records; the loop saves them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from ..generation.sampling import Generation
from ..oracles.base import Judgment
from ..prompts import Prompt
from .bank import BankEntry, ResponseBank
from .config import SIMSConfig
from .records import JudgingStats, SampleRecord, TrainingPair


@dataclass(frozen=True)
class Selection:
    """What selection made of one iteration's samples.

    Attributes:
        samples: one record per sample; ``label`` is positive, negative, tie, unused or
            skipped.
        pairs: ``cs`` only: the bank's D+ / D- pairs the update trains on (``None`` for
            the other variants, which train on the labelled samples).
        bank: ``cs`` only: the response bank after this iteration.
    """

    samples: list[SampleRecord]
    pairs: list[TrainingPair] | None = None
    bank: ResponseBank | None = None

    def training(self) -> list[TrainingPair]:
        """The D+ / D- answers the update learns from."""
        return training_pairs(self.samples, self.pairs)

    def judging_stats(self) -> JudgingStats:
        return judging_stats(self.samples, self.pairs, None if self.bank is None else len(self.bank))


def select_samples(
    config: SIMSConfig,
    t: int,
    prompts: Sequence[Prompt],
    gens: Sequence[Sequence[Generation]],
    judgments: Sequence[Judgment],
    bank: ResponseBank | None = None,
) -> Selection:
    """Label iteration t's samples (and, for ``cs``, add them to the bank and pick its pairs).

    Args:
        config: the loop's settings (``variant``, ``bank``, ``prompts_per_iteration``).
        t: the iteration.
        prompts, gens, judgments: aligned per prompt, as drawn and judged by the loop.
        bank: ``cs`` only: the bank before this iteration (empty by default).

    Example:
        >>> selection = select_samples(SIMSConfig(), 0, prompts, gens, oracle.judge(texts, answers))
        >>> [r.label for r in selection.samples]
    """
    labels = [_labels(config.variant, j) for j in judgments]
    if config.variant != "cs":
        return Selection(_sample_records(t, prompts, gens, judgments, labels))
    bank = (bank or ResponseBank(config=config.bank)).add(
        [
            BankEntry.judged(t, p.id, p.text, [g.text for g in gs], j)
            for p, gs, j in zip(prompts, gens, judgments, strict=True)
            if j.parsed
        ]
    )
    pairs = []
    picked: dict[tuple[str, int], str] = {}
    for e in bank.top(config.bank.top or config.prompts_per_iteration):
        for label, k in (("positive", e.best), ("negative", e.worst)):
            pairs.append(TrainingPair(e.iteration, e.prompt_id, e.prompt, k, e.responses[k], label, e.reward))
            if e.iteration == t:  # mark this iteration's own samples that were picked
                picked[(e.prompt_id, k)] = label
    rows = [
        replace(r, label=picked[(r.prompt_id, r.sample)]) if (r.prompt_id, r.sample) in picked else r
        for r in _sample_records(t, prompts, gens, judgments, labels)
    ]
    return Selection(rows, pairs, bank)


def training_pairs(
    samples: Sequence[SampleRecord], pairs: Sequence[TrainingPair] | None
) -> list[TrainingPair]:
    """The D+ / D- answers of an iteration: the bank's pairs for ``cs``, else the samples
    labelled positive or negative.

    Args:
        samples: the iteration's labelled samples.
        pairs: the ``cs`` pairs, ``None`` for the other variants.
    """
    if pairs is not None:
        return list(pairs)
    return [TrainingPair.from_sample(r) for r in samples if r.label in ("positive", "negative")]


def judging_stats(
    samples: Sequence[SampleRecord], pairs: Sequence[TrainingPair] | None = None, bank_size: int | None = None
) -> JudgingStats:
    """Summary-row entries: share of prompts judged, judge traffic, bank size.

    Args:
        samples: the iteration's samples.
        pairs: the ``cs`` pairs (``None``: no ``train_pairs`` / ``bank_size`` entries).
        bank_size: the bank's size after the iteration (``cs``).
    """
    per_prompt = {r.prompt_id: r for r in samples if r.sample == 0}
    parse_rate = sum(r.judged for r in per_prompt.values()) / len(per_prompt) if per_prompt else None
    infos = [r.judge_info or {} for r in per_prompt.values()]
    traffic: dict[str, int | None] = {}
    for key in ("requests", "cache_hits", "parse_failures"):
        # Only oracles that report a figure get the entry (an LLM judge does).
        traffic[key] = int(sum(i.get(key, 0) for i in infos)) if any(key in i for i in infos) else None
    return JudgingStats(
        ranking_parse_rate=parse_rate,
        judge_requests=traffic["requests"],
        judge_cache_hits=traffic["cache_hits"],
        judge_parse_failures=traffic["parse_failures"],
        train_pairs=None if pairs is None else len(pairs) // 2,
        bank_size=None if pairs is None else bank_size,
    )


def _sample_records(
    t: int,
    prompts: Sequence[Prompt],
    gens: Sequence[Sequence[Generation]],
    judgments: Sequence[Judgment],
    labels: Sequence[list[str]],
) -> list[SampleRecord]:
    rows = []
    for p, gs, j, lab in zip(prompts, gens, judgments, labels, strict=True):
        wins = j.win_rates
        for k, g in enumerate(gs):
            rows.append(
                SampleRecord(
                    iteration=t,
                    prompt_id=p.id,
                    prompt=p.text,
                    sample=k,
                    response=g.text,
                    num_tokens=g.num_tokens,
                    finished=g.finished,
                    score=None if j.scores is None else float(j.scores[k]),
                    win_rate=float(wins[k]),
                    label=lab[k],
                    judged=j.parsed,
                    # The judge's traffic for the prompt, once (on its first sample).
                    judge_info=j.info if k == 0 and j.info else None,
                )
            )
    return rows


def _labels(variant: str, judgment: Judgment) -> list[str]:
    k = judgment.preference.shape[0]
    if not judgment.parsed:
        return ["skipped"] * k
    wins = judgment.win_rates
    if variant == "sims":
        return [label_by_win_rate(float(w)) for w in wins]
    labels = ["unused"] * k
    # pr: top and bottom only, and only when each is unique (a tie is no ranking);
    # cs: the bank picks the pairs later.
    unique = np.sum(wins == wins.max()) == 1 and np.sum(wins == wins.min()) == 1
    if variant == "pr" and unique:
        labels[int(np.argmax(wins))] = "positive"
        labels[int(np.argmin(wins))] = "negative"
    return labels


def label_by_win_rate(win_rate: float) -> str:
    """D+ above one half, D- below, ties dropped (Algorithm 1 of the SIMS paper)."""
    if win_rate > 0.5:
        return "positive"
    if win_rate < 0.5:
        return "negative"
    return "tie"
