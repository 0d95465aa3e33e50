"""Built-in text scorers for attribute steering, from maintained libraries.

- ``sentiment``: VADER compound polarity in [-1, 1] (vaderSentiment).
- ``negativity``: minus the VADER compound (steer toward negative tone).
- ``readability``: Flesch reading ease / 100; higher is easier to read. Syllables are
  counted with pyphen's hyphenation dictionary (textstat now needs an NLTK corpus download
  at run time, which offline machines cannot do).
- ``length:N``: closeness of the word count to N, ``-|words - N| / N``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import SimsError
from .base import ScoreOracle
from .registry import register_oracle


class AttributeOracle(ScoreOracle):
    """Scores each response alone with a text function (the prompt is not used)."""

    def __init__(self, name: str, fn: Callable[[str], float], temperature: float = 1.0) -> None:
        super().__init__(temperature)
        self.name = name
        self._fn = fn

    def score(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        return np.array([float(self._fn(r)) for r in responses], dtype=np.float64)


def _vader() -> Callable[[str], float]:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    return lambda text: analyzer.polarity_scores(text)["compound"]


def _readability() -> Callable[[str], float]:
    import re

    import pyphen

    dic = pyphen.Pyphen(lang="en_US")

    def flesch(text: str) -> float:
        words = re.findall(r"[A-Za-z]+(?:'[A-Za-z]+)?", text)
        if not words:
            return 0.0
        sentences = max(1, len(re.findall(r"[.!?]+(?:\s|$)", text.strip() + " ")))
        syllables = sum(max(1, len(dic.positions(w.lower())) + 1) for w in words)
        ease = 206.835 - 1.015 * len(words) / sentences - 84.6 * syllables / len(words)
        return ease / 100.0

    return flesch


def _length(target: int) -> Callable[[str], float]:
    return lambda text: -abs(len(text.split()) - target) / target


ATTRIBUTES = ("sentiment", "negativity", "readability", "length:N")


def attribute_oracle(spec: str, temperature: float = 1.0) -> AttributeOracle:
    """Build a built-in attribute oracle from its name (see module docstring)."""
    if spec == "sentiment":
        return AttributeOracle("sentiment", _vader(), temperature)
    if spec == "negativity":
        vader = _vader()
        return AttributeOracle("negativity", lambda t: -vader(t), temperature)
    if spec == "readability":
        return AttributeOracle("readability", _readability(), temperature)
    if spec.startswith("length"):
        _, _, value = spec.partition(":")
        try:
            target = int(value or 50)
        except ValueError:
            raise SimsError(f"invalid length target in {spec!r}: use length:N with N words") from None
        if target < 1:
            raise SimsError(f"the length target must be >= 1 word, got {target}")
        return AttributeOracle(f"length:{target}", _length(target), temperature)
    raise KeyError(spec)


@register_oracle("attribute", names=ATTRIBUTES)
def _build(name: str, settings: dict[str, Any], device: str | None, lm: Any) -> AttributeOracle:
    return attribute_oracle(name, **settings)
