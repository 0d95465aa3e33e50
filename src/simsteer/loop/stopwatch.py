"""Seconds per step of an iteration, for its row in the run's table."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Stopwatch:
    """Times named steps: ``with watch("fit"): ...`` records the block's seconds in
    ``watch.seconds["fit"]`` (a block that raises records nothing).

    Args:
        clock: seconds from any fixed point (``time.perf_counter``; a test passes its own).

    Example:
        >>> watch = Stopwatch()
        >>> with watch("eval"):
        ...     pass
        >>> list(watch.seconds)
        ['eval']
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        start = self.clock()
        yield
        self.seconds[step] = self.clock() - start
