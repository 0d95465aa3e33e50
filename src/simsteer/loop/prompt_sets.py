"""A run's prompt sets: the split of the pool into training, held-out and calibration
prompts, and the N prompts each iteration draws from the training pool."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import SimsError
from ..prompts import Prompt
from .config import SIMSConfig


@dataclass(frozen=True)
class PromptSplit:
    """Disjoint prompt sets of a run (``contrast``: the guard's contrast prompts, given by
    the user, empty when the run has none)."""

    train: list[Prompt]
    eval: list[Prompt]
    calibration: list[Prompt]
    contrast: list[Prompt] = field(default_factory=list)


def split_pool(prompts: Sequence[Prompt], n_eval: int, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """Shuffle once with the seed; the first ``n_eval`` prompts are held out."""
    order = list(prompts)
    random.Random(seed).shuffle(order)
    if n_eval and len(order) <= n_eval:
        raise SimsError(
            f"{len(order)} prompts leave none for training after {n_eval} held-out ones: "
            "add prompts or lower --eval-prompts"
        )
    return order[n_eval:], order[:n_eval]


def split_prompts(
    config: SIMSConfig,
    prompts: Sequence[Prompt | str],
    eval_prompts: Sequence[Prompt | str] | None = None,
    contrast_prompts: Sequence[Prompt | str] | None = None,
) -> PromptSplit:
    """A new run's disjoint prompt sets: training pool, held-out and calibration prompts.

    Args:
        config: the loop's settings (``eval_prompts``, ``seed``, the guard's
            ``calibration_prompts``).
        prompts: the pool (plain strings get their index as id).
        eval_prompts: held-out prompts; by default ``config.eval_prompts`` are split off
            the pool.
        contrast_prompts: prompts on which the steered behaviour must not appear, measured
            by the guard at every strength (:mod:`simsteer.loop.calibration`); needs the guard.
    """
    contrast = [
        p if isinstance(p, Prompt) else Prompt(f"contrast-{i}", p)
        for i, p in enumerate(contrast_prompts or [])
    ]
    if contrast and not config.guard.enabled:
        raise SimsError(
            "contrast prompts are measured by the fluency guard: set a --fluency-budget "
            "or leave out --contrast-prompts"
        )
    pool = [p if isinstance(p, Prompt) else Prompt(str(i), p) for i, p in enumerate(prompts)]
    if not pool:
        raise SimsError("no prompts to learn from")
    if eval_prompts is not None:
        held_out = [
            p if isinstance(p, Prompt) else Prompt(f"eval-{i}", p) for i, p in enumerate(eval_prompts)
        ]
        train = list(pool)
        random.Random(config.seed).shuffle(train)
    else:
        train, held_out = split_pool(pool, config.eval_prompts, config.seed)
    calibration: list[Prompt] = []
    if config.guard.enabled:
        n = config.guard.calibration_prompts
        if len(train) <= n:
            raise SimsError(
                f"{len(train)} training prompts leave none after {n} calibration "
                "prompts: add prompts, lower --calibration-prompts or turn the "
                "guard off with --fluency-budget off"
            )
        calibration, train = train[:n], train[n:]
    return PromptSplit(train, held_out, calibration, contrast)


def draw_prompts(pool: list[Prompt], t: int, n: int, seed: int) -> list[Prompt]:
    """Iteration t's N prompts: consecutive slices of the pool, reshuffled per pass."""
    out: list[Prompt] = []
    position = t * n
    while len(out) < n:
        epoch, offset = divmod(position, len(pool))
        order = list(pool)
        if epoch:
            random.Random(seed * 7919 + epoch).shuffle(order)
        take = order[offset : offset + n - len(out)]
        out.extend(take)
        position += len(take)
    return out
