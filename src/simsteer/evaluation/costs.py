"""Cost accounting for evaluations: tokens generated, tokens through a forward pass,
judge calls and wall seconds, per stage (the loop records the same per iteration)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

#: The folders of a run or baseline that hold what it saves: a steering, a DPO adapter.
SAVED_FOLDERS = ("final", "adapter")


@dataclass
class StageCost:
    """What one stage spent (mutable: stages add to it while they run)."""

    generated_tokens: int = 0
    forward_tokens: int = 0
    judge_calls: int = 0
    seconds: float = 0.0


@dataclass
class CostMeter:
    """Per-stage costs of one evaluation.

    Example:
        >>> meter = CostMeter()
        >>> with meter.stage("generate") as cost:
        ...     cost.generated_tokens += 48
    """

    stages: dict[str, StageCost] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[StageCost]:
        cost = self.stages.setdefault(name, StageCost())
        clock = time.perf_counter()
        try:
            yield cost
        finally:
            cost.seconds += time.perf_counter() - clock

    def total(self) -> StageCost:
        out = StageCost()
        for c in self.stages.values():
            out.generated_tokens += c.generated_tokens
            out.forward_tokens += c.forward_tokens
            out.judge_calls += c.judge_calls
            out.seconds += c.seconds
        return out

    def to_dict(self) -> dict[str, dict[str, float | int]]:
        rows = {name: asdict(c) for name, c in self.stages.items()}
        rows["total"] = asdict(self.total())
        for row in rows.values():
            row["seconds"] = round(row["seconds"], 2)
        return rows


def saved_bytes(folder: str | Path) -> int:
    """Bytes of what a run or baseline saves for its policy (``final/``, the steering; or
    ``adapter/``, a DPO baseline's LoRA adapter); 0 for one that saves none."""
    root = Path(folder)
    return sum(p.stat().st_size for name in SAVED_FOLDERS for p in (root / name).rglob("*") if p.is_file())
