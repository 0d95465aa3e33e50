"""Win rate, LC win rate, Bradley-Terry and bootstrap on tables with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from simsteer.evaluation.arena import (
    Battle,
    arena_scores,
    battles_from_judgments,
    fit_bradley_terry,
    verdict_from_probability,
    win_rate_from_ratings,
)
from simsteer.evaluation.datasets import PreferencePair
from simsteer.evaluation.judge_check import check_judge, expected_calibration_error
from simsteer.evaluation.lc import fit_logistic, length_controlled_win_rate
from simsteer.evaluation.winrate import bootstrap_ci, judge_pairs, win_rate
from simsteer.oracles.base import Judgment, Oracle, ScoreOracle


def test_win_rate_counts_ties_half():
    # 3 wins, 2 ties, 1 loss -> (3 + 1) / 6
    wr = win_rate(np.array([1.0, 0.9, 0.6, 0.5, 0.5, 0.2]), rounds=200)
    assert wr.value == pytest.approx(4 / 6)
    assert (wr.wins, wr.ties, wr.losses, wr.n) == (3, 2, 1, 6)
    assert wr.ci_low <= wr.value <= wr.ci_high
    soft = win_rate(np.array([1.0, 0.9, 0.6, 0.5, 0.5, 0.2]), discrete=False, rounds=10)
    assert soft.value == pytest.approx(3.7 / 6)


def test_bootstrap_ci_covers_known_mean():
    rng = np.random.default_rng(1)
    x = rng.normal(0.3, 1.0, size=4000)
    lo, hi = bootstrap_ci(x, rounds=300)
    se = 1 / np.sqrt(4000)
    assert lo < 0.3 < hi
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.2)


class _Scores(ScoreOracle):
    name = "len"

    def score(self, prompts, responses):
        return np.array([len(r) for r in responses], dtype=float)


class _FirstWins(Oracle):
    """Always prefers the answer shown first: the worst position bias."""

    name = "first"

    def judge(self, prompts, responses):
        return [Judgment(np.array([[0.5, 0.9], [0.1, 0.5]])) for _ in prompts]


def test_judge_pairs_both_orders_cancel_position_bias():
    j = judge_pairs(_FirstWins(), ["p"] * 4, ["a"] * 4, ["b"] * 4)
    assert np.allclose(j.preference, 0.5)  # a pure position bias is a tie
    assert j.position_flips.all() and j.judge_calls == 16
    s = judge_pairs(_Scores(temperature=1.0), ["p", "p"], ["long answer", "x"], ["short", "xx"])
    assert s.forward[0] > 0.5 > s.forward[1] and not s.position_flips.any()
    assert win_rate(s.preference, rounds=10).value == 0.5


class _LongerWinsShown(Oracle):
    """Pairwise judge that sees the order: prefers the longer answer, with a bias to A."""

    name = "longer"

    def judge(self, prompts, responses):
        out = []
        for a, b in responses:
            p = 0.8 if len(a) > len(b) else 0.3
            out.append(Judgment(np.array([[0.5, p], [1 - p, 0.5]])))
        return out


def test_judge_pairs_in_chunks_equals_one_call(capsys):
    policy = ["x" * (i % 5 + 1) for i in range(11)]
    reference = ["y" * (i % 3 + 1) for i in range(11)]
    whole = judge_pairs(_LongerWinsShown(), ["p"] * 11, policy, reference, chunk=100)
    chunked = judge_pairs(_LongerWinsShown(), ["p"] * 11, policy, reference, progress="judging", chunk=3)
    assert np.array_equal(whole.forward, chunked.forward)
    assert np.array_equal(whole.backward, chunked.backward)
    assert chunked.judge_calls == whole.judge_calls == 44
    assert "judging" in capsys.readouterr().err  # the progress bar


class _SwapsItself(Oracle):
    """A pairwise judge that shows both orders itself (like self-judge-pairwise and the
    LLM judge) and always picks the answer shown first: a pure position bias."""

    name = "swaps"

    def __init__(self):
        self.calls = 0

    def judge(self, prompts, responses):
        self.calls += 1
        shown = [[None, 1.0], [1.0, None]]
        return [Judgment(np.array([[0.5, 0.5], [0.5, 0.5]]), info={"shown_first": shown}) for _ in prompts]


def test_judge_pairs_reads_position_bias_of_a_judge_that_swaps_itself():
    oracle = _SwapsItself()
    j = judge_pairs(oracle, ["p"] * 5, ["a"] * 5, ["b"] * 5)
    assert oracle.calls == 1  # no second, redundant pass in the other order
    assert np.allclose(j.preference, 0.5) and j.position_flips.all()
    res = check_judge(_SwapsItself(), [PreferencePair("p", "a", "b")] * 4)
    assert res.position_bias_rate == 1.0 and res.accuracy == 0.5


def test_judge_check_accuracy_bias_and_ece():
    pairs = [PreferencePair("p", "longer one", "short")] * 3 + [PreferencePair("p", "s", "longer")]
    res = check_judge(_Scores(temperature=100.0), pairs)
    assert res.accuracy == pytest.approx(0.75) and res.position_bias_rate == 0.0
    biased = check_judge(_FirstWins(), pairs)
    assert biased.position_bias_rate == 1.0 and biased.accuracy == 0.5 and biased.ties == 4
    # perfectly calibrated: confidence 0.8, right 80% of the time
    assert expected_calibration_error(np.array([0.8] * 8 + [0.2] * 2)) == pytest.approx(0.0)
    assert expected_calibration_error(np.array([1.0] * 5 + [0.0] * 5)) == pytest.approx(0.5)


def test_logistic_fit_recovers_coefficients():
    rng = np.random.default_rng(0)
    x = np.stack([np.ones(20000), rng.normal(size=20000)], axis=1)
    p = 1 / (1 + np.exp(-(x @ np.array([-0.7, 1.3]))))
    beta = fit_logistic(x, p, penalty=np.zeros(2))  # soft labels = the true probabilities
    assert beta == pytest.approx([-0.7, 1.3], abs=1e-6)


def test_lc_removes_a_pure_length_effect():
    # The judge only likes length: at equal length the policy wins half the time.
    rng = np.random.default_rng(0)
    n = 2000
    delta = rng.normal(0, 400, size=n)
    p = 1 / (1 + np.exp(-(2.0 * np.tanh(delta / delta.std(ddof=1)))))
    ref = np.full(n, 1000.0)
    lc = length_controlled_win_rate(p, ref + delta, ref, length_prior=None, rounds=20)
    assert lc.value == pytest.approx(0.5, abs=1e-3)
    assert lc.length_coefficient == pytest.approx(2.0, abs=1e-2)
    # A policy 1 logit better than the reference at every length: LC = sigmoid(1).
    lc2 = length_controlled_win_rate(
        1 / (1 + np.exp(-(1 + np.log(p / (1 - p))))), ref + delta, ref, length_prior=None, rounds=0
    )
    assert lc2.value == pytest.approx(1 / (1 + np.exp(-1)), abs=1e-3)
    # Hand table: equal lengths everywhere -> LC equals the raw win rate.
    flat = length_controlled_win_rate(np.array([1, 1, 0, 0.5]), [5, 5, 5, 5], [5, 5, 5, 5], rounds=0)
    assert flat.value == pytest.approx(0.625, abs=1e-6) == flat.raw


def test_bradley_terry_recovers_planted_ratings():
    rng = np.random.default_rng(0)
    truth = {"base": 1000.0, "m1": 1100.0, "m2": 900.0}
    battles = []
    for m in ("m1", "m2"):
        p = win_rate_from_ratings(truth[m], truth["base"])
        for _ in range(6000):
            battles.append(Battle(m, "base", float(rng.random() < p)))
    ratings = fit_bradley_terry(battles, "base")
    assert ratings["base"] == 1000.0
    assert ratings["m1"] == pytest.approx(1100, abs=15) and ratings["m2"] == pytest.approx(900, abs=15)
    scores = {s.model: s for s in arena_scores(battles, "base", rounds=30)}
    assert scores["m1"].ci_low < 100 * win_rate_from_ratings(1100, 1000) < scores["m1"].ci_high
    assert scores["base"].score == pytest.approx(50.0)


def test_arena_judgments_with_position_swap_and_strong_weight():
    recs = [
        {"model": "m", "games": [{"score": "B>>A"}, {"score": "A>B"}]},  # m wins both games
        {"model": "m", "games": [{"score": "A=B"}, {"score": None}]},
    ]
    battles = battles_from_judgments(recs, "base")
    assert [(b.model_a, b.model_b, b.outcome, b.weight) for b in battles] == [
        ("base", "m", 0.0, 3),
        ("m", "base", 1.0, 1),
        ("base", "m", 0.5, 1),
    ]
    assert [verdict_from_probability(p) for p in (0.95, 0.6, 0.5, 0.3, 0.05)] == [
        "A>>B",
        "A>B",
        "A=B",
        "B>A",
        "B>>A",
    ]
