"""Reading a ranking of K answers back from free text, leniently but never by guessing.

Small models rarely write clean JSON. :func:`parse_ranking` tries, in order:

1. JSON anywhere in the text: a list of numbers (``[3, 1, 2]``), an object holding one
   (``{"leaderboard": [...]}``), or objects with ranks (``[{"answer": 2, "rank": 1}]``);
   a truncated list after a ``leaderboard``/``ranking`` key is read up to where it stops;
2. chains: ``answer 3 > answer 1 > answer 2`` (``<`` reads the other way);
3. numbered lists: ``1. Answer 3`` / ``Rank 1: Answer 2`` / ``1st: 3``;
4. ``ranking: 3, 1, 2`` after a ranking keyword;
5. explicit best/worst statements: ``the best answer is 2 ... the worst is 4``.

A ranking must name every answer once, or all but one (the missing one is last). Only
best/worst statements give a partial ranking: best first, the rest tied, worst last.
Anything else is ``None`` and the caller skips the prompt.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np

_ITEM = r"(?:(?:answer|response|model|assistant|output|candidate)[\s_#-]*|#)?(\d+)"
_CHAIN = re.compile(rf"{_ITEM}(?:\s*(?:>|≻|>>)\s*{_ITEM})+", re.I)
_CHAIN_LT = re.compile(rf"{_ITEM}(?:\s*(?:<|≺|<<)\s*{_ITEM})+", re.I)
_NUMBERED = re.compile(
    r"^\s*(?:\*\*)?(?:rank(?:ed)?\s*|place\s*|#)?(\d+)(?:st|nd|rd|th)?(?:\*\*)?\s*[.):\-]\s*(?:\*\*)?"
    r"(?:(?:answer|response|model|assistant|candidate)[\s_#-]*|#)(\d+)",
    re.I | re.M,
)
_KEYWORD_LIST = re.compile(
    r"(?:leaderboard|ranking|ranked|order)\W{0,6}((?:[\[\s\"']*(?:answer|response)?[\s_#-]*\d+[\"'\]]*"
    r"\s*(?:,|>|;|\s)\s*){1,}(?:answer|response)?[\s_#-]*\d+)",
    re.I,
)
_BEST = re.compile(rf"\bbest\b[^.\n\d]{{0,40}}?{_ITEM}", re.I)
_WORST = re.compile(rf"\b(?:worst|weakest)\b[^.\n\d]{{0,40}}?{_ITEM}", re.I)


@dataclass(frozen=True)
class Ranking:
    """Answers grouped in tiers, best tier first; indices are 0-based.

    Attributes:
        tiers: a full ranking has one answer per tier.
        method: which rule recovered it (``json``, ``chain``, ``list``, ``keyword``, ``best-worst``).
    """

    tiers: tuple[tuple[int, ...], ...]
    method: str

    @property
    def best(self) -> int | None:
        return self.tiers[0][0] if len(self.tiers[0]) == 1 else None

    @property
    def worst(self) -> int | None:
        return self.tiers[-1][0] if len(self.tiers[-1]) == 1 else None

    def preference(self) -> np.ndarray:
        """``P[k, j]``: 1 when k's tier is above j's, 0.5 within a tier."""
        k = sum(len(t) for t in self.tiers)
        tier = np.empty(k, dtype=np.int64)
        for level, members in enumerate(self.tiers):
            tier[list(members)] = level
        p = np.where(tier[:, None] < tier[None, :], 1.0, 0.0)
        return np.where(tier[:, None] == tier[None, :], 0.5, p)


def parse_ranking(text: str, k: int) -> Ranking | None:
    """Recover a ranking of ``k`` answers (numbered from 1) from ``text``, or ``None``.

    Example:
        >>> parse_ranking('{"leaderboard": [2, 3, 1]}', 3).tiers
        ((1,), (2,), (0,))
    """
    if k < 2 or not text:
        return None
    for method, numbers in _candidates(text):
        order = _complete(numbers, k)
        if order is not None:
            return Ranking(tuple((i,) for i in order), method)
    best, worst = _BEST.search(text), _WORST.search(text)
    if best and worst:
        b, w = int(best.group(1)) - 1, int(worst.group(1)) - 1
        if b != w and 0 <= b < k and 0 <= w < k:
            rest = tuple(i for i in range(k) if i not in (b, w))
            return Ranking(((b,), rest, (w,)) if rest else ((b,), (w,)), "best-worst")
    return None


def _candidates(text: str):
    """Number sequences (best first, 1-based as written) in order of trust."""
    for numbers in _json_lists(text):
        yield "json", numbers
    for m in _CHAIN.finditer(text):
        yield "chain", [int(x) for x in re.findall(r"\d+", m.group(0))]
    for m in _CHAIN_LT.finditer(text):
        yield "chain", [int(x) for x in re.findall(r"\d+", m.group(0))][::-1]
    listed = sorted((int(pos), int(item)) for pos, item in _NUMBERED.findall(text))
    if listed:
        yield "list", [item for _, item in listed]
    for m in _KEYWORD_LIST.finditer(text):
        yield "keyword", [int(x) for x in re.findall(r"\d+", m.group(1))]


def _json_lists(text: str):
    decoder = json.JSONDecoder()
    for start in (m.start() for m in re.finditer(r"[\[{]", text)):
        try:
            obj, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        numbers = _numbers_from_json(obj)
        if numbers:
            yield numbers
    # A list cut off by the token limit: read the entries up to where it stops.
    entries = _object_entries(text)
    if entries:
        yield entries
    for m in re.finditer(r"(?:leaderboard|ranking|order)\"?\s*:\s*\[([^\]\n]*)", text, re.I):
        numbers = [int(x) for x in re.findall(r"\d+", m.group(1))]
        if numbers:
            yield numbers


def _numbers_from_json(obj) -> list[int] | None:
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        return _numbers_from_json(lists[0]) if len(lists) == 1 else None
    if not isinstance(obj, list) or not obj:
        return None
    if all(isinstance(x, dict) for x in obj):
        ranked = []
        for position, item in enumerate(obj):
            rank = next((v for key, v in item.items() if "rank" in key.lower()), None)
            ident = _object_id({key: v for key, v in item.items() if "rank" not in key.lower()})
            rank_n = position if rank is None else _as_int(rank)  # no rank field: list order
            if rank_n is None or ident is None:
                return None
            ranked.append((rank_n, ident))
        return [ident for _, ident in sorted(ranked)]
    numbers = [_as_int(x) for x in obj]
    return None if any(n is None for n in numbers) else numbers  # type: ignore[return-value]


def _object_id(fields: dict) -> int | None:
    """The answer number of a leaderboard entry: its one distinct numeric field value."""
    values = {n for n in (_as_int(v) for v in fields.values() if not isinstance(v, list)) if n is not None}
    return values.pop() if len(values) == 1 else None


def _object_entries(text: str) -> list[int] | None:
    """Answer numbers of a leaderboard of objects cut off mid-way, in list order."""
    start = re.search(r"(?:leaderboard|ranking)\"?\s*:\s*\[", text, re.I)
    if not start:
        return None
    numbers = []
    for chunk in re.findall(r"\{([^{}]*)\}", text[start.end() :]):
        fields = dict(re.findall(r"\"([^\"]+)\"\s*:\s*\"?([^\",\n]*)\"?", chunk))
        ident = _object_id({k: v for k, v in fields.items() if "rank" not in k.lower()})
        if ident is None:
            return None
        numbers.append(ident)
    return numbers or None


def _as_int(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        digits = re.findall(r"\d+", value)
        return int(digits[0]) if len(digits) == 1 else None
    return None


def _complete(numbers: list[int], k: int) -> list[int] | None:
    """0-based full order from 1-based numbers; all k, or k-1 with the last implied."""
    if numbers and min(numbers) == 0 and max(numbers) < k:
        numbers = [n + 1 for n in numbers]  # written 0-based
    seen: list[int] = []
    for n in numbers:
        if not 1 <= n <= k:
            return None
        if n - 1 in seen:
            return None  # a repeated answer means the list is not a ranking
        seen.append(n - 1)
    if len(seen) == k - 1:
        seen.append(next(i for i in range(k) if i not in seen))
    return seen if len(seen) == k else None
