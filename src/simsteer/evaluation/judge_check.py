"""How well an oracle agrees with human preference labels (``sims judge-check``).

Each pair is judged in both orders (chosen first, then rejected first; see
:func:`~simsteer.evaluation.winrate.judge_pairs`). Reported:

- ``accuracy``: share of pairs where the order-averaged ``P(chosen > rejected)`` is above
  one half (a tie counts half), with a bootstrap interval;
- ``position_bias_rate``: share of pairs whose verdict changes when the answers swap
  places (always 0 for score oracles, which never see positions);
- ``ece``: expected calibration error of the judge's confidence: the verdict is the
  answer with ``P > 1/2``, its confidence ``max(P, 1 - P)``; ten equal-width confidence
  bins, ``sum_b (n_b / n) * |accuracy_b - confidence_b|``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ..oracles.base import Oracle
from .datasets import PreferencePair
from .winrate import discrete_outcomes, judge_pairs, win_rate


def expected_calibration_error(p_correct: np.ndarray, bins: int = 10) -> float:
    """ECE of binary verdicts from ``P(the labelled answer wins)`` per item.

    Ties (``P = 1/2``) have confidence 1/2 and count as half right.
    """
    p = np.asarray(p_correct, dtype=np.float64)
    if len(p) == 0:
        return float("nan")
    confidence = np.maximum(p, 1 - p)
    correct = discrete_outcomes(p)
    edges = np.linspace(0.5, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - confidence[sel].mean())
    return float(ece)


@dataclass(frozen=True)
class JudgeCheck:
    """Agreement of a judge with human labels."""

    judge: str
    n: int
    accuracy: float
    ci_low: float
    ci_high: float
    position_bias_rate: float
    ece: float
    ties: int
    judge_calls: int
    seconds: float

    def to_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def check_judge(
    oracle: Oracle, pairs: Sequence[PreferencePair], seed: int = 0, progress: bool = False
) -> JudgeCheck:
    """Accuracy, position bias and calibration of ``oracle`` on human-labelled pairs.

    Example:
        >>> check_judge(get_oracle("sentiment"), load_pairs("hh_rlhf/harmless-base/test.jsonl.gz"))
    """
    clock = time.perf_counter()
    judged = judge_pairs(
        oracle,
        [p.prompt for p in pairs],
        [p.chosen for p in pairs],
        [p.rejected for p in pairs],
        progress=f"judge-check {oracle.name}" if progress else None,
    )
    wr = win_rate(judged.preference, seed=seed)
    return JudgeCheck(
        judge=oracle.name,
        n=wr.n,
        accuracy=wr.value,
        ci_low=wr.ci_low,
        ci_high=wr.ci_high,
        position_bias_rate=float(judged.position_flips.mean()) if len(pairs) else float("nan"),
        ece=expected_calibration_error(judged.preference),
        ties=wr.ties,
        judge_calls=judged.judge_calls,
        seconds=round(time.perf_counter() - clock, 2),
    )
