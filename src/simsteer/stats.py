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


def seeds_and_prompts_ci(
    values: np.ndarray,
    rounds: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of a (seeds x prompts) table.

    Both sources of variation count: each resample draws the seeds with replacement and
    then the prompts with replacement (the same prompts for every drawn seed, since every
    seed answers the same held-out prompts). With one seed this is :func:`bootstrap_ci`
    over the prompts. ``nan`` cells (an answer without tokens) are left out of a mean.

    Args:
        values: shape (seeds, prompts), e.g. per-prompt score differences per seed.
        rounds: bootstrap resamples.
        level: coverage of the interval.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.size == 0:
        return (float("nan"), float("nan"))
    n_seeds, n_prompts = values.shape
    rng = np.random.default_rng(seed)
    stats = np.empty(rounds)
    for r in range(rounds):
        rows = rng.integers(0, n_seeds, n_seeds)
        cols = rng.integers(0, n_prompts, n_prompts)
        stats[r] = np.nanmean(values[np.ix_(rows, cols)])
    alpha = (1 - level) / 2
    return float(np.nanquantile(stats, alpha)), float(np.nanquantile(stats, 1 - alpha))
