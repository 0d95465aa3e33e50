"""Small statistics shared by reports: percentile bootstrap intervals."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def bootstrap_ci(
    values: np.ndarray,
    statistic: Callable[[np.ndarray], float] = np.mean,
    rounds: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over the rows of ``values``.

    Args:
        values: one row (or value) per independent item, e.g. per-prompt score
            differences for a paired comparison.
        statistic: maps a resampled array to a number.
        rounds: bootstrap resamples.
        level: coverage of the interval.
    """
    values = np.asarray(values)
    n = len(values)
    if n == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    stats = np.array([statistic(values[rng.integers(0, n, n)]) for _ in range(rounds)], dtype=np.float64)
    alpha = (1 - level) / 2
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))
