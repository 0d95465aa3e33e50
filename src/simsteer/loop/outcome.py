"""What a finished run achieved on its held-out prompts: the final policy against the
unsteered model, paired per prompt, with a bootstrap interval, next to the fluency cost."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..schema import NonNegativeInt, check
from ..stats import bootstrap_ci
from .records import EvalRecord, IterationRecord


@dataclass(frozen=True)
class HeldOut:
    """The final policy against the unsteered model on the held-out prompts (paired per
    prompt: the prompts both scored)."""

    prompts: NonNegativeInt
    base_score: float
    final_score: float
    improvement: float
    ci95: tuple[float, float]


@dataclass(frozen=True)
class FluencyCost:
    """The final policy's held-out fluency against the unsteered model's."""

    perplexity_ratio: float
    repetition_delta: float
    loop_share_delta: float


@dataclass(frozen=True)
class Selection:
    """How the guard chose the final policy: its rule, and the policy with the best
    calibration score."""

    rule: str
    best_calibrated: NonNegativeInt


@dataclass(frozen=True)
class OutcomeRecord:
    """``outcome.json``: which policy the run kept and what it achieved.

    Attributes:
        final_policy: the policy kept (0: the unsteered model).
        stopped: why the loop stopped early (``None``: it ran every iteration).
        held_out: the held-out comparison (absent without held-out prompts).
        fluency: the fluency cost (absent when a perplexity is undefined).
        selection: the guard's rule (absent without the guard).
    """

    final_policy: NonNegativeInt
    stopped: str | None
    held_out: HeldOut | None = None
    fluency: FluencyCost | None = None
    selection: Selection | None = None

    @property
    def steered(self) -> bool:
        """Whether the run kept a steered policy (not the unsteered model)."""
        return self.final_policy > 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"final_policy": self.final_policy, "stopped": self.stopped}
        for name in ("held_out", "fluency", "selection"):
            section = getattr(self, name)
            if section is not None:
                out[name] = {
                    k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(section).items()
                }
        return out

    @classmethod
    def from_json(cls, data: Any, where: str = "") -> OutcomeRecord:
        """A parsed ``outcome.json``, checked (:func:`simsteer.schema.check`): a hand-edited
        or damaged file raises :class:`~simsteer.schema.SchemaError` naming the field.

        Args:
            data: the parsed file.
            where: the file, for the message.
        """
        check(cls, data, where)
        held, fluency, selection = data.get("held_out"), data.get("fluency"), data.get("selection")
        return cls(
            final_policy=data["final_policy"],
            stopped=data["stopped"],
            held_out=None if held is None else HeldOut(**{**held, "ci95": tuple(held["ci95"])}),
            fluency=None if fluency is None else FluencyCost(**fluency),
            selection=None if selection is None else Selection(**selection),
        )


def run_outcome(
    history: Sequence[IterationRecord],
    base_answers: Sequence[EvalRecord],
    final_answers: Sequence[EvalRecord],
    final: int,
    selection: Selection | None = None,
) -> OutcomeRecord:
    """Held-out comparison of policy ``final`` with policy 0 (see module docstring).

    Args:
        history: the run's rows.
        base_answers, final_answers: policy 0's and policy ``final``'s held-out answers
            (empty when the run has no held-out prompts).
        final: the final policy's iteration.
        selection: how the guard chose it (``None`` without the guard).
    """
    held_out = fluency = None
    if base_answers and final_answers:
        base = {r.prompt_id: r.score for r in base_answers}
        last = {r.prompt_id: r.score for r in final_answers}
        ids = [i for i in base if i in last and base[i] is not None and last[i] is not None]
        if ids:
            diffs = np.array([last[i] - base[i] for i in ids])
            low, high = bootstrap_ci(diffs)
            held_out = HeldOut(
                prompts=len(ids),
                base_score=float(np.mean([base[i] for i in ids])),
                final_score=float(np.mean([last[i] for i in ids])),
                improvement=float(diffs.mean()),
                ci95=(low, high),
            )
        f0, f1 = history[0].eval_fluency, history[final].eval_fluency
        # An undefined perplexity (no answer had tokens) gives no ratio (JSON has no NaN).
        if f0 is not None and f1 is not None and np.isfinite([f0.perplexity, f1.perplexity]).all():
            fluency = FluencyCost(
                perplexity_ratio=f1.perplexity / f0.perplexity,
                repetition_delta=f1.repetition - f0.repetition,
                loop_share_delta=f1.loop_share - f0.loop_share,
            )
    return OutcomeRecord(final, history[-1].stop, held_out, fluency, selection)


#: Above this perplexity ratio (final policy / unsteered, on the held-out answers) the
#: run's last lines warn that the steering degrades the model.
DEGRADED_PERPLEXITY_RATIO = 1.5


def format_outcome(outcome: OutcomeRecord) -> str:
    """The run's last lines: the policy kept, its held-out score and its fluency cost."""
    kept = f"iteration {outcome.final_policy}" if outcome.steered else "iteration 0 (the unsteered model)"
    lines = [f"final policy: {kept}"]
    chosen = outcome.selection
    if chosen and chosen.best_calibrated != outcome.final_policy:
        lines[0] += (
            f" (within one standard error of policy {chosen.best_calibrated}'s calibration "
            f"score, which is not clearly better: --selection {chosen.rule})"
        )
    held = outcome.held_out
    if held:
        lo, hi = held.ci95
        lines.append(
            f"held-out score {held.base_score:+.3f} -> {held.final_score:+.3f} "
            f"(improvement {held.improvement:+.3f}, 95% CI [{lo:+.3f}, {hi:+.3f}], "
            f"{held.prompts} prompts)"
        )
    fl = outcome.fluency
    if fl:
        lines.append(
            f"fluency vs unsteered: perplexity x{fl.perplexity_ratio:.3f}, "
            f"repetition {fl.repetition_delta:+.3f}, loops {fl.loop_share_delta:+.3f}"
        )
        if fl.perplexity_ratio > DEGRADED_PERPLEXITY_RATIO:
            lines.append(
                f"warning: the final policy's answers have x{fl.perplexity_ratio:.2f} the unsteered "
                "model's perplexity: the steering degrades the model here; use the fluency guard "
                "(the default) or a smaller strength"
            )
    return "\n".join(lines)
