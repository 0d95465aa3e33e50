"""Configuration of the SIMS loop."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..activations import SUMMARIES
from ..errors import SimsError
from ..generation.sampling import SamplingConfig
from .bank import BankConfig
from .calibration import GuardConfig

#: The SIMS variants: which sampled answers an update learns from (:mod:`simsteer.loop.selection`).
VARIANTS = ("sims", "pr", "cs")


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
            :mod:`simsteer.loop.calibration`); ``GuardConfig(fluency_budget=None)`` turns it off.
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
        if self.variant not in VARIANTS:
            choices = f"{', '.join(VARIANTS[:-1])} or {VARIANTS[-1]}"
            raise SimsError(f"unknown SIMS variant {self.variant!r}: use {choices}")

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
