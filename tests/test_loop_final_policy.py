"""The final policy of a run: the one-SE rule over the calibrated policies' per-prompt
scores (:mod:`simsteer.loop.final_policy`)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from simsteer.errors import SimsError
from simsteer.loop.calibration import GuardConfig
from simsteer.loop.final_policy import final_index, final_selection, select_policy
from simsteer.loop.outcome import Selection
from simsteer.loop.records import CalibrationPoint, CalibrationRecord, IterationRecord

from .test_loop_calibration import BASE


def test_one_se_selection_prefers_the_earlier_policy_unless_the_later_clearly_leads():
    steady = [0.5, 0.6, 0.5, 0.6]  # policy 1, mean 0.55
    noisy = [1.0, 0.2, 0.9, 0.3]  # policy 2: mean 0.6, paired lead 0.05 with a SE of 0.23
    clear = [0.9, 1.0, 0.8, 1.0]  # policy 2': mean 0.925, lead 0.375 with a SE of 0.025
    base = [0.0, 0.0, 0.0, 0.0]
    assert select_policy([0.0, 0.55, 0.6], [base, steady, noisy]) == 1
    assert select_policy([0.0, 0.55, 0.6], [base, steady, noisy], "best") == 2
    assert select_policy([0.0, 0.55, 0.925], [base, steady, clear]) == 2
    # The unsteered model scoring best stays the answer; so does a lone steered policy.
    assert select_policy([0.7, 0.55, 0.6], [[0.7] * 4, steady, noisy]) == 0
    assert select_policy([0.0, 0.55], [base, steady]) == 1
    # No per-prompt scores (an older run) or no fluent strength: the best score decides.
    assert select_policy([0.0, 0.55, 0.6], [None, None, noisy]) == 2
    assert select_policy([0.0, float("-inf"), 0.6], [base, None, noisy]) == 2
    with pytest.raises(SimsError, match="selection"):
        GuardConfig(selection="last")


def test_final_policy_pairs_the_chosen_strengths_per_prompt_scores():
    def point(scores, fluent=True):
        return CalibrationPoint(1.0, 1.0, sum(scores) / len(scores), 2.0, 0.0, 0.0, 1.0, fluent, None, scores)

    base = dataclasses.replace(BASE, prompt_scores=[0.0, 0.0, 0.0, 0.0])
    first = CalibrationRecord(base, (point([0.5, 0.6, 0.5, 0.6]),), 1.0, 0.55)
    second = CalibrationRecord(base, (point([1.0, 0.2, 0.9, 0.3]),), 1.0, 0.6)
    rows = [IterationRecord(t, "p", 1.0, calibration=c) for t, c in enumerate((first, second))]
    for selection, policy in (("one-se", 1), ("best", 2)):
        assert final_index(rows, selection) == policy
    assert final_selection(rows, "one-se") == Selection(rule="one-se", best_calibrated=2)
    assert final_index(rows, None) == 1 and final_selection(rows, None) is None  # no guard: the last
    # The per-prompt scores survive the summary file; rows written before them still load.
    assert CalibrationRecord.from_json(json.loads(json.dumps(second.to_json()))) == second
    old = second.to_json()
    del old["points"][0]["prompt_scores"], old["base"]["prompt_scores"]
    assert CalibrationRecord.from_json(old).chosen_point.prompt_scores is None
    with pytest.raises(TypeError, match="prompt_scores"):
        CalibrationPoint.from_json({**second.points[0].to_json(), "prompt_scores": ["high"]})
