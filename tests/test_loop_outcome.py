"""The outcome of a run, computed from the records the loop holds (no run directory)."""

from __future__ import annotations

import json

import pytest

from simsteer.loop.outcome import OutcomeRecord, run_outcome
from simsteer.loop.records import EvalRecord, FluencyRecord, IterationRecord
from simsteer.loop.rundir import RunDir
from simsteer.schema import SchemaError

from .test_loop_records import OLD_RUN


def _answers(t: int, scores: list[float | None]) -> list[EvalRecord]:
    return [EvalRecord(t, str(i), f"p{i}", "a", 3, True, s) for i, s in enumerate(scores)]


def _row(t: int, ppl: float, rep: float, loops: float, stop: str | None = None) -> IterationRecord:
    fl = FluencyRecord(perplexity=ppl, repetition=rep, distinct_2=1.0, loop_share=loops, mean_tokens=3.0)
    return IterationRecord(t, f"iter_{t}" if t else "unsteered", 1.0, eval_fluency=fl, stop=stop)


def test_held_out_improvement_and_fluency_cost():
    history = [_row(0, 10.0, 0.1, 0.0), _row(1, 15.0, 0.3, 0.5, stop="budget")]
    out = run_outcome(history, _answers(0, [0.0, 0.5, None]), _answers(1, [1.0, 1.0, 0.2]), 1)
    assert out.final_policy == 1 and out.stopped == "budget" and out.steered
    held = out.held_out
    assert held is not None
    assert held.prompts == 2  # the prompt without a base score is left out
    assert held.improvement == pytest.approx(0.75)
    assert held.base_score == pytest.approx(0.25) and held.final_score == pytest.approx(1.0)
    lo, hi = held.ci95
    assert lo <= held.improvement <= hi
    assert out.to_json()["fluency"] == pytest.approx(
        {"perplexity_ratio": 1.5, "repetition_delta": 0.2, "loop_share_delta": 0.5}
    )
    assert OutcomeRecord.from_json(json.loads(json.dumps(out.to_json()))) == out


def test_no_held_out_prompts():
    history = [_row(0, 10.0, 0.1, 0.0)]
    assert run_outcome(history, [], [], 0).to_json() == {"final_policy": 0, "stopped": None}


def test_same_as_the_saved_outcome_of_an_old_run():
    run = RunDir(OLD_RUN)
    history = run.history()
    saved = json.loads(run.outcome.read_text())
    best = saved["final_policy"]
    assert run_outcome(history, run.read_eval(0), run.read_eval(best), best).to_json() == saved
    assert run.read_outcome() == OutcomeRecord.from_json(saved)


def test_the_selection_section_is_checked_and_explains_an_earlier_pick():
    from simsteer.loop.outcome import format_outcome

    data = {"final_policy": 1, "stopped": None, "selection": {"rule": "one-se", "best_calibrated": 2}}
    out = OutcomeRecord.from_json(data)
    assert out.to_json() == data
    assert "within one standard error of policy 2" in format_outcome(out).splitlines()[0]
    same = OutcomeRecord.from_json({**data, "selection": {"rule": "one-se", "best_calibrated": 1}})
    assert format_outcome(same).splitlines()[0] == "final policy: iteration 1"
    with pytest.raises(SchemaError, match="best_calibrated"):
        OutcomeRecord.from_json({**data, "selection": {"rule": "one-se", "best_calibrated": -1}})
    with pytest.raises(SchemaError, match=r"selection\.rule"):
        OutcomeRecord.from_json({**data, "selection": {"best_calibrated": 1}})


def test_an_outcome_that_kept_the_unsteered_model_says_so():
    from simsteer.loop.outcome import format_outcome

    out = OutcomeRecord.from_json({"final_policy": 0, "stopped": None})
    assert not out.steered
    assert format_outcome(out) == "final policy: iteration 0 (the unsteered model)"
