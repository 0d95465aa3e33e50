"""SIMS-CS's response bank: every judged prompt with its K answers, kept across iterations.

Each entry holds the prompt, the K responses, the oracle's preference matrix and the
contrast reward ``r = max_k P(y_k > pi) - max_k P(y_k < pi)`` (best win rate minus worst
loss rate). The bank lives in ``RUN/bank.jsonl``, rewritten atomically on every change,
so ``--resume`` picks it up; an entry is keyed by (iteration, prompt id), so a step that
is redone after a crash replaces its entries instead of adding them twice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SimsError
from ..io import read_jsonl, write_jsonl
from ..oracles.base import win_rates


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

    iteration: int
    prompt_id: str
    prompt: str
    responses: list[str]
    preference: list[list[float]]
    reward: float

    @property
    def best(self) -> int:
        return int(np.argmax(win_rates(np.asarray(self.preference))))

    @property
    def worst(self) -> int:
        return int(np.argmin(win_rates(np.asarray(self.preference))))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def contrast_reward(preference: np.ndarray) -> float:
    """``max_k P(y_k > pi) - max_k P(y_k < pi)`` with ``P(y_k < pi) = 1 - P(y_k > pi)``.

    Example:
        >>> round(contrast_reward(np.array([[0.5, 0.9, 0.6], [0.1, 0.5, 0.3], [0.4, 0.7, 0.5]])), 4)
        -0.05
    """
    wins = win_rates(np.asarray(preference, dtype=np.float64))
    return float(wins.max() - (1.0 - wins).max())


class ResponseBank:
    """The bank file of a run (loaded on creation; every change is saved atomically)."""

    def __init__(self, path: str | Path, config: BankConfig | None = None) -> None:
        self.path = Path(path)
        self.config = config or BankConfig()
        rows = read_jsonl(self.path) if self.path.is_file() else []
        self.entries = [BankEntry(**r) for r in rows]

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, entries: list[BankEntry]) -> None:
        """Add (or replace, by iteration and prompt id) entries, evict past capacity, save."""
        keys = {(e.iteration, e.prompt_id) for e in entries}
        kept = [e for e in self.entries if (e.iteration, e.prompt_id) not in keys]
        merged = sorted([*kept, *entries], key=lambda e: e.iteration)  # stable: insertion order
        if self.config.capacity:
            merged = merged[-self.config.capacity :]
        self.entries = merged
        self.save()

    def replace_all(self, entries: list[BankEntry]) -> None:
        self.entries = list(entries)
        self.save()

    def save(self) -> None:
        write_jsonl(self.path, [e.to_dict() for e in self.entries])

    def top(self, n: int) -> list[BankEntry]:
        """The ``n`` entries with the highest reward that have a distinct best and worst.

        Ties go to the newer entry, then to the prompt id, so the choice is deterministic.
        """
        usable = [e for e in self.entries if e.best != e.worst]
        usable.sort(key=lambda e: (-e.reward, -e.iteration, e.prompt_id))
        return usable[:n]
