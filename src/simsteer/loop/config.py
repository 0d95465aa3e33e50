"""Configuration of the SIMS loop and how its prompts are split and drawn."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..activations import SUMMARIES
from ..errors import SimsError
from ..generation.sampling import SamplingConfig
from ..prompts import Prompt
from .bank import BankConfig
from .guard import GuardConfig


@dataclass(frozen=True)
class SIMSConfig:
    """The loop's settings (the paper's T, N, K and how samples are drawn).

    Attributes:
        iterations: T, the number of learning iterations (>= 1).
        prompts_per_iteration: N, new prompts drawn each iteration without replacement
            while the pool lasts (then the pool is reshuffled).
        samples_per_prompt: K responses per prompt (>= 2).
        eval_prompts: held-out prompts answered greedily by every policy (0 = none).
        sampling: temperature, top-k, top-p, max_new_tokens and batch size.
        summary: activation summary per response, ``mean`` over tokens or ``last``.
        activation_batch_size: sequences per forward when collecting activations.
        compose: stack each iteration's functions on the previous policy instead of
            replacing them (the paper replaces).
        guard: the fluency guard (strength calibration and early stopping; see
            :mod:`simsteer.loop.guard`); ``GuardConfig(fluency_budget=None)`` turns it off.
        seed: the run's seed (prompt order and sampling).
        variant: ``sims`` (Algorithm 1), ``pr`` (top/bottom-ranked answer per prompt) or
            ``cs`` (contrast sampling from a response bank); see :mod:`simsteer.loop.selection`.
        bank: SIMS-CS response-bank options (capacity, top-N, re-scoring).
    """

    iterations: int = 3
    prompts_per_iteration: int = 16
    samples_per_prompt: int = 4
    eval_prompts: int = 32
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    summary: str = "mean"
    activation_batch_size: int = 16
    compose: bool = False
    seed: int = 0
    guard: GuardConfig = field(default_factory=GuardConfig)
    variant: str = "sims"
    bank: BankConfig = field(default_factory=BankConfig)

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise SimsError(f"iterations (T) must be >= 1, got {self.iterations}")
        if self.prompts_per_iteration < 1:
            raise SimsError(f"prompts per iteration (N) must be >= 1, got {self.prompts_per_iteration}")
        if self.samples_per_prompt < 2:
            raise SimsError(
                f"samples per prompt (K) must be >= 2 to compare responses, got {self.samples_per_prompt}"
            )
        if self.eval_prompts < 0:
            raise SimsError(f"eval prompts must be >= 0, got {self.eval_prompts}")
        if self.summary not in SUMMARIES:
            raise SimsError(f"unknown activation summary {self.summary!r}: use {', '.join(SUMMARIES)}")
        if self.activation_batch_size < 1:
            raise SimsError("activation batch size must be >= 1")
        if self.sampling.greedy:
            raise SimsError("SIMS needs K distinct samples: use a temperature > 0")
        if self.variant not in ("sims", "pr", "cs"):
            raise SimsError(f"unknown SIMS variant {self.variant!r}: use sims, pr or cs")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SIMSConfig:
        data = dict(data)
        data["sampling"] = SamplingConfig(**data.get("sampling", {}))
        guard = dict(data.get("guard", {}))
        if "strength_grid" in guard:
            guard["strength_grid"] = tuple(guard["strength_grid"])
        data["guard"] = GuardConfig(**guard)
        data["bank"] = BankConfig(**data.get("bank", {}))
        return cls(**data)


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
            by the guard at every strength (:mod:`simsteer.loop.guard`); needs the guard.
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


def label_by_win_rate(win_rate: float) -> str:
    """D+ above one half, D- below, ties dropped (Algorithm 1 of the SIMS paper)."""
    if win_rate > 0.5:
        return "positive"
    if win_rate < 0.5:
        return "negative"
    return "tie"
