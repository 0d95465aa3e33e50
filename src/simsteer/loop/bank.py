"""SIMS-CS's response bank: every judged prompt with its K answers, kept across iterations.

Each entry holds the prompt, the K responses, the oracle's preference matrix and the
contrast reward ``r = max_k P(y_k > pi) - max_k P(y_k < pi)`` (best win rate minus worst
loss rate). The bank is a value: :meth:`ResponseBank.add` returns a new bank. The loop
keeps it in ``RUN/bank.jsonl`` (:meth:`simsteer.loop.rundir.RunDir.read_bank`), so
``--resume`` picks it up; that file only moves on once an iteration's samples are
committed, so a step redone after a crash starts from the bank before it. An entry is
keyed by (iteration, prompt id): adding a step's entries again replaces them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any

import numpy as np

from ..errors import SimsError
from ..oracles.base import Judgment, Oracle, win_rates
from ..schema import NonNegativeInt, Probability, Rule, SchemaError, check


@dataclass(frozen=True)
class BankConfig:
    """SIMS-CS options.

    Attributes:
        capacity: most entries kept; the oldest go first (0 = keep all).
        top: entries trained on per update (0 = the iteration's N prompts).
        rescore: re-ask the oracle about every older entry before selecting (for
            oracles that change or are noisy; costs oracle calls, cached judges are free).
    """

    capacity: int = 0
    top: int = 0
    rescore: bool = False

    def __post_init__(self) -> None:
        if self.capacity < 0:
            raise SimsError(f"bank capacity must be >= 0 (0 = unlimited), got {self.capacity}")
        if self.top < 0:
            raise SimsError(f"bank top-N must be >= 0 (0 = N prompts per iteration), got {self.top}")


@dataclass(frozen=True)
class BankEntry:
    """One judged prompt."""

    iteration: NonNegativeInt
    prompt_id: str
    prompt: str
    responses: Annotated[list[str], Rule(nonempty=True)]
    preference: list[list[Probability]]
    reward: float

    @property
    def best(self) -> int:
        return int(np.argmax(win_rates(np.asarray(self.preference))))

    @property
    def worst(self) -> int:
        return int(np.argmin(win_rates(np.asarray(self.preference))))

    @classmethod
    def judged(
        cls, t: int, prompt_id: str, prompt: str, responses: list[str], judgment: Judgment
    ) -> BankEntry:
        """The entry of a prompt judged in iteration ``t`` (preference and reward rounded
        to 6 digits, as saved)."""
        return cls(
            iteration=t,
            prompt_id=prompt_id,
            prompt=prompt,
            responses=responses,
            preference=np.asarray(judgment.preference, dtype=float).round(6).tolist(),
            reward=round(contrast_reward(judgment.preference), 6),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> BankEntry:
        """A row of ``bank.jsonl``, checked: a hand-edited or damaged row raises
        :class:`~simsteer.schema.SchemaError` naming the field, never an entry that fails
        later (a NaN reward, a preference matrix of the wrong size).

        Args:
            data: the parsed JSON row.
        """
        check(cls, data)
        k = len(data["responses"])
        if [len(row) for row in data["preference"]] != [k] * k:
            raise SchemaError(f"field 'preference' must be {k} x {k} (one row and column per response)")
        return cls(**data)


def contrast_reward(preference: np.ndarray) -> float:
    """``max_k P(y_k > pi) - max_k P(y_k < pi)`` with ``P(y_k < pi) = 1 - P(y_k > pi)``.

    Example:
        >>> round(contrast_reward(np.array([[0.5, 0.9, 0.6], [0.1, 0.5, 0.3], [0.4, 0.7, 0.5]])), 4)
        -0.05
    """
    wins = win_rates(np.asarray(preference, dtype=np.float64))
    return float(wins.max() - (1.0 - wins).max())


@dataclass(frozen=True)
class ResponseBank:
    """The bank's entries, oldest first, and its options; every change returns a new bank.

    Example:
        >>> bank = ResponseBank(config=BankConfig(capacity=100)).add(entries)
        >>> pairs = bank.top(8)
    """

    entries: tuple[BankEntry, ...] = ()
    config: BankConfig = field(default_factory=BankConfig)

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, entries: Sequence[BankEntry]) -> ResponseBank:
        """Add (or replace, by iteration and prompt id) entries and evict past capacity.

        Args:
            entries: the new entries.
        """
        keys = {(e.iteration, e.prompt_id) for e in entries}
        kept = [e for e in self.entries if (e.iteration, e.prompt_id) not in keys]
        merged = sorted([*kept, *entries], key=lambda e: e.iteration)  # stable: insertion order
        if self.config.capacity:
            merged = merged[-self.config.capacity :]
        return ResponseBank(tuple(merged), self.config)

    def top(self, n: int) -> list[BankEntry]:
        """The ``n`` entries with the highest reward that have a distinct best and worst.

        Ties go to the newer entry, then to the prompt id, so the choice is deterministic.
        """
        usable = [e for e in self.entries if e.best != e.worst]
        usable.sort(key=lambda e: (-e.reward, -e.iteration, e.prompt_id))
        return usable[:n]

    def rescored(self, t: int, oracle: Oracle) -> ResponseBank:
        """The bank with every entry of an iteration before ``t`` judged again by
        ``oracle`` (``BankConfig.rescore``); an entry the oracle cannot judge now keeps
        its old judgment, and ``t``'s own entries (left by a crashed attempt) are kept.

        Args:
            t: the current iteration.
            oracle: the run's oracle.
        """
        old = [e for e in self.entries if e.iteration != t]
        fresh = oracle.judge([e.prompt for e in old], [e.responses for e in old]) if old else []
        rescored = {
            (e.iteration, e.prompt_id): BankEntry.judged(e.iteration, e.prompt_id, e.prompt, e.responses, j)
            for e, j in zip(old, fresh, strict=True)
            if j.parsed
        }
        entries = tuple(rescored.get((e.iteration, e.prompt_id), e) for e in self.entries)
        return ResponseBank(entries, self.config)

    def to_json(self) -> list[dict[str, Any]]:
        """The rows of ``bank.jsonl``."""
        return [e.to_dict() for e in self.entries]

    @classmethod
    def from_json(cls, rows: Sequence[dict[str, Any]], config: BankConfig | None = None) -> ResponseBank:
        """The bank of the rows of ``bank.jsonl`` (each checked by :meth:`BankEntry.from_json`)."""
        return cls(tuple(BankEntry.from_json(r) for r in rows), config or BankConfig())
