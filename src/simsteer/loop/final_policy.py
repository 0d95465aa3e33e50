"""Which policy a run returns: the last one, or under the fluency guard the one the
calibration scores pick (``GuardConfig.selection``).

Policy 0 is the unsteered model; policy i + 1 is calibrated in iteration i's row. Rules:

- ``"best"``: the best calibration score (ties to the earlier, weaker policy);
- ``"one-se"`` (default): the earliest steered policy within one standard error of the
  best one (:func:`select_policy`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from .outcome import Selection
from .records import CalibrationRecord, IterationRecord, Measurement

#: How the final policy is chosen (``GuardConfig.selection``).
SELECTIONS = ("one-se", "best")


def calibration_scores(base: Measurement, calibrations: Sequence[CalibrationRecord]) -> list[float]:
    """Best fluent calibration score of policies 0, 1, ... (policy 0: unsteered); a policy
    with no fluent strength scores minus infinity."""
    return [base.score, *(c.score if c.score is not None else -math.inf for c in calibrations)]


def calibrated_policies(
    history: Sequence[IterationRecord],
) -> tuple[list[float], list[list[float] | None]] | None:
    """Calibration score and per-prompt scores of policies 0, 1, ... (``None`` without a
    calibration)."""
    calibrations = [row.calibration for row in history if row.calibration is not None]
    if not calibrations:
        return None
    per_prompt = [calibrations[0].base.prompt_scores]
    per_prompt += [None if c.chosen_point is None else c.chosen_point.prompt_scores for c in calibrations]
    return calibration_scores(calibrations[0].base, calibrations), per_prompt


def final_index(history: Sequence[IterationRecord], rule: str | None) -> int:
    """Which policy a run returns: the last, or with a ``rule`` (the guard on) the one
    :func:`select_policy` picks."""
    calibrated = calibrated_policies(history) if rule is not None else None
    if calibrated is None:
        return history[-1].iteration
    return select_policy(*calibrated, rule)


def final_selection(history: Sequence[IterationRecord], rule: str | None) -> Selection | None:
    """The ``selection`` section of ``outcome.json``: the rule, and the policy with the
    best calibration score (``None`` without the guard or a calibration)."""
    calibrated = calibrated_policies(history) if rule is not None else None
    if calibrated is None:
        return None
    return Selection(rule=rule, best_calibrated=select_policy(*calibrated, "best"))


def select_policy(
    scores: Sequence[float], prompt_scores: Sequence[Sequence[float] | None], selection: str = "one-se"
) -> int:
    """The final policy from the calibration scores of policies 0 (unsteered), 1, ...

    ``"best"``: the best score (ties to the earlier, weaker policy). ``"one-se"``: if the
    best is a steered policy b, the earliest steered policy i < b whose score is at least
    b's minus one standard error of their paired difference (the per-prompt scores of
    both on the same calibration prompts), else b. Each later policy is a refit on
    samples of the one before, and its lead on a few calibration prompts is often noise:
    picking the best of several noisy scores favours whichever was overestimated most.
    Policies without per-prompt scores (runs written before they were saved) are chosen
    by the best score.

    Args:
        scores: calibration score of each policy (minus infinity: nothing fluent).
        prompt_scores: per-prompt scores of each policy's chosen strength, or ``None``.
        selection: ``"one-se"`` or ``"best"``.

    Example:
        >>> select_policy([0.0, 0.5, 0.6], [None, [0.0, 1.0], [1.0, 0.2]])  # lead 0.1 < SE 0.9
        1
    """
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    if selection == "best" or best == 0:
        return best
    reference = prompt_scores[best]
    for i in range(1, best):
        other = prompt_scores[i]
        if reference is None or other is None or len(other) != len(reference) or len(reference) < 2:
            continue
        if not math.isfinite(scores[i]):
            continue
        differences = [a - b for a, b in zip(reference, other, strict=True)]
        error = statistics.stdev(differences) / math.sqrt(len(differences))
        if scores[i] >= scores[best] - error:
            return i
    return best
