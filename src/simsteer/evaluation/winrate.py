"""Pairwise win rate of a policy's answers against reference answers (AlpacaEval style).

Any :class:`~simsteer.oracles.base.Oracle` is the judge. Each (prompt, policy answer,
reference answer) is judged in both orders, ``[policy, reference]`` and ``[reference,
policy]``, and the two verdicts are averaged, so a judge that favours a position cannot
favour a side. A score oracle sees each answer alone, so one order is enough for it: the
second would repeat the same scores (documented, and counted as one judge call per answer).

Outcomes per item: ``preference`` is ``P(policy > reference)`` in [0, 1]. The *discrete*
win rate counts a win as 1, a tie as 1/2 (ties count half) and a loss as 0; the *soft* win
rate averages the probabilities (AlpacaEval's weighted annotator). Confidence intervals are
percentile bootstrap intervals over items.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from tqdm.auto import tqdm

from ..oracles.base import Judgment, Oracle, ScoreOracle, finite_scores
from ..stats import bootstrap_ci

TIE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class PairJudgments:
    """Judge verdicts on aligned (policy, reference) answers.

    Attributes:
        forward: ``P(policy > reference)`` with the policy's answer shown first.
        backward: the same probability with the reference shown first (equal to
            ``forward`` for score oracles, which do not see positions).
        judge_calls: answers sent to the judge (a cost figure).
        shown_forward / shown_backward: for a judge that swaps positions itself (its
            judgments carry ``info["shown_first"]``), its raw single-order verdicts, from
            which the position bias is read; ``None`` otherwise.
    """

    forward: np.ndarray
    backward: np.ndarray
    judge_calls: int
    shown_forward: np.ndarray | None = None
    shown_backward: np.ndarray | None = None

    @property
    def preference(self) -> np.ndarray:
        return (self.forward + self.backward) / 2

    @property
    def position_flips(self) -> np.ndarray:
        """Items whose discrete verdict changes with the order of the answers."""
        forward = self.forward if self.shown_forward is None else self.shown_forward
        backward = self.backward if self.shown_backward is None else self.shown_backward
        return np.sign(_centered(forward)) != np.sign(_centered(backward))


def _centered(p: np.ndarray) -> np.ndarray:
    c = np.asarray(p, dtype=np.float64) - 0.5
    c[np.abs(c) <= TIE_TOLERANCE] = 0.0
    return c


def judge_pairs(
    oracle: Oracle,
    prompts: Sequence[str],
    policy: Sequence[str],
    reference: Sequence[str],
    progress: str | None = None,
    chunk: int = 32,
) -> PairJudgments:
    """Judge each policy answer against its reference answer, in both orders.

    Args:
        oracle: any oracle; its ``judge`` is called once per order on each chunk of items.
        prompts, policy, reference: aligned lists.
        progress: a label shows a progress bar (pairs judged) under that name.
        chunk: items per ``judge`` call when a model judges (the bar's step).

    Example:
        >>> j = judge_pairs(get_oracle("sentiment"), ["Hi"], ["Great!"], ["Awful."])
        >>> win_rate(j.preference).value
        1.0
    """
    if not len(prompts) == len(policy) == len(reference):
        raise ValueError("prompts, policy and reference answers must be aligned")
    prompts, policy, reference = list(prompts), list(policy), list(reference)
    if not prompts:
        return PairJudgments(np.zeros(0), np.zeros(0), 0)
    if isinstance(oracle, ScoreOracle):
        scores = finite_scores(oracle.name, oracle.score(prompts + prompts, policy + reference))
        n = len(prompts)
        diff = (scores[:n] - scores[n:]) / oracle.temperature
        p = 1.0 / (1.0 + np.exp(-diff))
        return PairJudgments(p, p.copy(), 2 * n)
    forward: list[float] = []
    backward: list[float] = []
    shown_forward: list[float] = []
    shown_backward: list[float] = []
    calls = 0
    with tqdm(total=len(prompts), desc=progress, unit="pair", disable=progress is None, leave=False) as bar:
        for start in range(0, len(prompts), max(1, chunk)):
            qs = prompts[start : start + chunk]
            pairs = list(zip(policy[start : start + chunk], reference[start : start + chunk], strict=True))
            first = oracle.judge(qs, [[a, b] for a, b in pairs])
            shown = [_shown_first(j) for j in first]
            if all(m is not None for m in shown):
                # The judge saw both orders itself: its preference is already
                # swap-averaged, and its raw verdicts tell the position bias.
                p = [float(j.preference[0, 1]) for j in first]
                forward += p
                backward += p
                shown_forward += [m[0][1] for m in shown]
                shown_backward += [1.0 - m[1][0] for m in shown]
                calls += 2 * len(qs)
            else:
                second = oracle.judge(qs, [[b, a] for a, b in pairs])
                f = [float(j.preference[0, 1]) for j in first]
                b = [1.0 - float(j.preference[0, 1]) for j in second]
                forward += f
                backward += b
                shown_forward += f
                shown_backward += b
                calls += 4 * len(qs)
            bar.update(len(qs))
    return PairJudgments(
        np.array(forward), np.array(backward), calls, np.array(shown_forward), np.array(shown_backward)
    )


def _shown_first(judgment: Judgment) -> list[list[float]] | None:
    """``info["shown_first"]`` of a two-answer judgment: ``[k][j]`` = P(the answer shown
    first wins) with answer k first and j second; an unparsed verdict counts as 1/2."""
    m = (judgment.info or {}).get("shown_first")
    if m is None:
        return None
    return [[0.5 if x is None else float(x) for x in row] for row in m]


def discrete_outcomes(preference: np.ndarray) -> np.ndarray:
    """1 for a win, 1/2 for a tie (equal within 1e-9), 0 for a loss."""
    return np.sign(_centered(preference)) / 2 + 0.5


@dataclass(frozen=True)
class WinRate:
    """A win rate (in [0, 1]) with its bootstrap interval and counts."""

    value: float
    ci_low: float
    ci_high: float
    standard_error: float
    n: int
    wins: int
    ties: int
    losses: int

    def to_dict(self) -> dict[str, float | int]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def win_rate(
    preference: np.ndarray, discrete: bool = True, rounds: int = 1000, level: float = 0.95, seed: int = 0
) -> WinRate:
    """Win rate of the policy from per-item ``P(policy > reference)``.

    Args:
        preference: one probability per item (e.g. :attr:`PairJudgments.preference`).
        discrete: count wins / ties (half) / losses; else average the probabilities.
    """
    p = np.asarray(preference, dtype=np.float64)
    p = p[~np.isnan(p)]
    outcome = discrete_outcomes(p) if discrete else p
    n = len(outcome)
    lo, hi = bootstrap_ci(outcome, rounds=rounds, level=level, seed=seed)
    se = float(outcome.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    c = _centered(p)
    return WinRate(
        value=float(outcome.mean()) if n else float("nan"),
        ci_low=lo,
        ci_high=hi,
        standard_error=se,
        n=n,
        wins=int((c > 0).sum()),
        ties=int((c == 0).sum()),
        losses=int((c < 0).sum()),
    )
