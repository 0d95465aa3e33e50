"""Selection as a pure step: judgments in, labelled sample records, training pairs and
the new bank out; no model, no run directory."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from simsteer.generation.sampling import Generation
from simsteer.loop.bank import BankConfig, BankEntry, ResponseBank
from simsteer.loop.config import SIMSConfig
from simsteer.loop.records import TrainingPair
from simsteer.loop.selection import judging_stats, select_samples, training_pairs
from simsteer.oracles.base import Judgment, Oracle
from simsteer.prompts import Prompt

PROMPTS = [Prompt("a", "prompt a"), Prompt("b", "prompt b"), Prompt("c", "prompt c")]
GENS = [[Generation(f"{p.id}{k}", 2 + k, True) for k in range(3)] for p in PROMPTS]


def _judged(scores, parsed=True, info=None) -> Judgment:
    s = np.asarray(scores, dtype=float)
    pref = 1.0 / (1.0 + np.exp(-(s[:, None] - s[None, :])))
    if not parsed:
        return Judgment(np.full((len(s), len(s)), 0.5), parsed=False, info=info)
    return Judgment(pref, scores=s, info=info)


JUDGMENTS = [
    _judged([2.0, 0.0, 1.0], info={"requests": 2, "cache_hits": 1}),
    _judged([0.0, 0.0, 3.0], info={"requests": 1}),
    _judged([1.0, 2.0, 3.0], parsed=False),
]


def _config(variant: str, **kw) -> SIMSConfig:
    return dataclasses.replace(SIMSConfig(prompts_per_iteration=2), variant=variant, **kw)


def test_sims_labels_by_win_rate():
    selection = select_samples(_config("sims"), 4, PROMPTS, GENS, JUDGMENTS)
    rows = selection.samples
    assert [(r.prompt_id, r.sample) for r in rows] == [(p.id, k) for p in PROMPTS for k in range(3)]
    assert [r.label for r in rows[:3]] == ["positive", "negative", "tie"]
    assert [r.label for r in rows[6:]] == ["skipped"] * 3
    assert rows[0].iteration == 4 and rows[0].response == "a0" and rows[0].num_tokens == 2
    assert rows[0].score == 2.0 and rows[0].win_rate > 0.5 and not rows[6].judged
    assert selection.pairs is None and selection.bank is None
    training = selection.training()
    assert [(t.prompt_id, t.sample, t.label) for t in training] == [
        ("a", 0, "positive"),
        ("a", 1, "negative"),
        ("b", 0, "negative"),
        ("b", 1, "negative"),
        ("b", 2, "positive"),
    ]
    stats = selection.judging_stats()
    assert stats.ranking_parse_rate == pytest.approx(2 / 3)
    assert (stats.judge_requests, stats.judge_cache_hits, stats.judge_parse_failures) == (3, 1, None)
    assert stats.train_pairs is None and stats.bank_size is None
    # Only the first sample of a prompt carries the judge's traffic.
    assert rows[0].judge_info == {"requests": 2, "cache_hits": 1} and rows[1].judge_info is None


def test_pr_labels_top_and_bottom_only_when_unique():
    rows = select_samples(_config("pr"), 0, PROMPTS, GENS, JUDGMENTS).samples
    assert [r.label for r in rows[:3]] == ["positive", "negative", "unused"]
    assert [r.label for r in rows[3:6]] == ["unused"] * 3  # a tie at the bottom is no ranking
    assert [r.label for r in rows[6:]] == ["skipped"] * 3


def test_cs_trains_on_the_bank_top_n():
    config = _config("cs", bank=BankConfig(top=2))
    old = BankEntry.judged(0, "z", "prompt z", ["z0", "z1", "z2"], _judged([9.0, 0.0, 0.0]))
    bank = ResponseBank((old,), config.bank)
    selection = select_samples(config, 1, PROMPTS, GENS, JUDGMENTS, bank)
    assert len(bank) == 1  # the bank given is a value: left as it was
    assert [e.prompt_id for e in selection.bank.entries] == ["z", "a", "b"]  # c was not judged
    pairs = selection.pairs
    assert [(p.iteration, p.prompt_id, p.sample, p.label) for p in pairs] == [
        (0, "z", 0, "positive"),
        (0, "z", 1, "negative"),
        (1, "b", 2, "positive"),
        (1, "b", 0, "negative"),
    ]
    assert pairs[0].reward == old.reward > pairs[2].reward
    # This iteration's own picked samples are labelled; the rest are unused or skipped.
    labels = {(r.prompt_id, r.sample): r.label for r in selection.samples}
    assert labels == {
        ("a", 0): "unused",
        ("a", 1): "unused",
        ("a", 2): "unused",
        ("b", 0): "negative",
        ("b", 1): "unused",
        ("b", 2): "positive",
        ("c", 0): "skipped",
        ("c", 1): "skipped",
        ("c", 2): "skipped",
    }
    assert selection.training() == pairs
    stats = selection.judging_stats()
    assert stats.train_pairs == 2 and stats.bank_size == 3


def test_training_pairs_and_stats_from_saved_records():
    rows = select_samples(_config("sims"), 0, PROMPTS, GENS, JUDGMENTS).samples
    pairs = [TrainingPair(0, "a", "prompt a", 0, "a0", "positive", 0.5)] * 2
    assert training_pairs(rows, pairs) == pairs
    assert judging_stats(rows, pairs, 7).bank_size == 7 and judging_stats(rows, pairs, 7).train_pairs == 1
    assert judging_stats([]).ranking_parse_rate is None


class Flip(Oracle):
    """Prefers the answer it used to dislike; cannot judge prompt y."""

    name = "flip"

    def judge(self, prompts, responses):
        return [_judged([0.0, 5.0], parsed=p != "prompt y") for p in prompts]


def test_bank_rescore_is_a_value_step():
    entries = [
        BankEntry.judged(0, "x", "prompt x", ["x0", "x1"], _judged([5.0, 0.0])),
        BankEntry.judged(0, "y", "prompt y", ["y0", "y1"], _judged([5.0, 0.0])),
        BankEntry.judged(2, "w", "prompt w", ["w0", "w1"], _judged([5.0, 0.0])),
    ]
    bank = ResponseBank(tuple(entries))
    fresh = bank.rescored(2, Flip())
    assert [e.best for e in fresh.entries] == [1, 0, 0]  # x re-judged; y unjudgeable; w is iteration 2
    assert [e.best for e in bank.entries] == [0, 0, 0]
