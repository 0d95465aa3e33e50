"""The oracle interface: for a prompt and K responses, ``P[k, j] = P(y_k > y_j)``.

Scalar-score oracles become Bradley-Terry probabilities
``P[k, j] = sigmoid((s_k - s_j) / temperature)``. The win rate of a response against
the policy is ``mean_{j != k} P[k, j]`` (the SIMS paper, arXiv 2507.08967).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import SimsError


@dataclass(frozen=True)
class Judgment:
    """An oracle's verdict on the K responses to one prompt.

    Attributes:
        preference: ``[K, K]`` with ``P[k, j] = P(y_k > y_j)``, ``P + P.T = 1`` off the
            diagonal and 0.5 on it.
        scores: the scalar scores behind ``preference`` when the oracle has them.
        parsed: False when the oracle could not judge this prompt (e.g. an unreadable
            self-ranking); ``preference`` is then all 0.5 and the prompt is skipped.
        info: oracle-specific bookkeeping (raw judge answers, requests, cache hits).
    """

    preference: np.ndarray
    scores: np.ndarray | None = None
    parsed: bool = True
    info: dict | None = None

    @property
    def win_rates(self) -> np.ndarray:
        return win_rates(self.preference)


def win_rates(preference: np.ndarray) -> np.ndarray:
    """``P(y_k > pi) = mean_{j != k} P[k, j]``."""
    k = preference.shape[0]
    if k < 2:
        raise ValueError("win rates need at least two responses")
    off = preference.sum(axis=1) - np.diag(preference)
    return off / (k - 1)


def bradley_terry(scores: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Pairwise preference probabilities from scalar scores."""
    s = np.asarray(scores, dtype=np.float64)
    diff = (s[:, None] - s[None, :]) / temperature
    return 1.0 / (1.0 + np.exp(-diff))


class Oracle(ABC):
    """Ranks K responses per prompt. Subclasses implement :meth:`judge`."""

    name: str = "oracle"

    @abstractmethod
    def judge(self, prompts: list[str], responses: list[list[str]]) -> list[Judgment]:
        """One :class:`Judgment` per prompt (batched over all prompts)."""

    def describe(self) -> dict:
        """The oracle's spec: its name and settings, which ``get_oracle`` accepts back."""
        return {"name": self.name}


def finite_scores(name: str, scores: Any) -> np.ndarray:
    """``scores`` as float64, refused in one line naming the oracle ``name`` if any is NaN
    or infinite (a NaN gives no D+ / D- and NaN metrics, silently). Every score the loop,
    the guard or an evaluation uses passes here before anything is labelled or written."""
    scores = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(scores).all():
        bad = scores[~np.isfinite(scores)][0]
        raise SimsError(f"oracle {name} returned the score {bad}; scores must be finite numbers")
    return scores


class ScoreOracle(Oracle):
    """An oracle with a scalar score per (prompt, response)."""

    def __init__(self, temperature: float = 1.0) -> None:
        if temperature <= 0:
            raise ValueError("the Bradley-Terry temperature must be > 0")
        self.temperature = temperature

    def describe(self) -> dict:
        return {"name": self.name, "temperature": self.temperature}

    @abstractmethod
    def score(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        """Scores for aligned lists of prompts and responses (higher is better)."""

    def judge(self, prompts: list[str], responses: list[list[str]]) -> list[Judgment]:
        flat_p = [p for p, rs in zip(prompts, responses, strict=True) for _ in rs]
        flat_r = [r for rs in responses for r in rs]
        scores = finite_scores(self.name, self.score(flat_p, flat_r))
        out, start = [], 0
        for rs in responses:
            s = scores[start : start + len(rs)]
            start += len(rs)
            out.append(Judgment(preference=bradley_terry(s, self.temperature), scores=s))
        return out
