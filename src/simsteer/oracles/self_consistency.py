"""``self-consistency``: a label-free majority vote. Each answer's final answer is
extracted (a ``\\boxed{}`` value, the text after "answer is"/"answer:", else the last
number); the score of an answer is the share of the K answers that agree with it, so the
majority answer wins.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import numpy as np

from .base import Judgment, Oracle, bradley_terry
from .registry import register_oracle

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ANSWER = re.compile(r"(?:final answer|answer)\s*(?:is|:|=)\s*\**\s*([^\n]+)", re.I)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_answer(text: str) -> str | None:
    """The final answer of a response, normalised for voting (``None`` when there is none)."""
    boxed = _BOXED.findall(text)
    if boxed:
        return _normalise(boxed[-1])
    stated = _ANSWER.findall(text)
    if stated:
        numbers = _NUMBER.findall(stated[-1])
        return _normalise(numbers[0]) if numbers else _normalise(stated[-1].split(".")[0])
    numbers = _NUMBER.findall(text)
    return _normalise(numbers[-1]) if numbers else None


def _normalise(answer: str) -> str | None:
    a = answer.strip().strip("*$. ").lower().replace(",", "")
    try:
        number = float(a)
        return f"{number:g}"
    except ValueError:
        return a or None


class SelfConsistencyOracle(Oracle):
    """Majority vote over the K answers' final answers (no labels, no model)."""

    name = "self-consistency"

    def __init__(self, temperature: float = 0.1) -> None:
        self.temperature = temperature

    def describe(self) -> dict:
        return {"name": self.name, "temperature": self.temperature}

    def judge(self, prompts: list[str], responses: list[list[str]]) -> list[Judgment]:
        out = []
        for rs in responses:
            answers = [extract_answer(r) for r in rs]
            votes = Counter(a for a in answers if a is not None)
            share = np.array([votes[a] / len(rs) if a is not None else 0.0 for a in answers])
            out.append(
                Judgment(
                    bradley_terry(share, self.temperature),
                    scores=share,
                    info={"majority": votes.most_common(1)[0][0] if votes else None},
                )
            )
        return out


@register_oracle("self-consistency")
def _build_self_consistency(
    name: str, settings: dict[str, Any], device: str | None, lm: Any
) -> SelfConsistencyOracle:
    return SelfConsistencyOracle(**settings)
