"""The outcome of a run, computed from the records the loop holds (no run directory)."""

from __future__ import annotations

import json

import pytest

from simsteer.loop.outcome import run_outcome
from simsteer.loop.records import EvalRecord, FluencyRecord, IterationRecord
from simsteer.loop.rundir import RunDir

from .test_loop_records import OLD_RUN


def _answers(t: int, scores: list[float | None]) -> list[EvalRecord]:
    return [EvalRecord(t, str(i), f"p{i}", "a", 3, True, s) for i, s in enumerate(scores)]


def _row(t: int, ppl: float, rep: float, loops: float, stop: str | None = None) -> IterationRecord:
    fl = FluencyRecord(perplexity=ppl, repetition=rep, distinct_2=1.0, loop_share=loops, mean_tokens=3.0)
    return IterationRecord(t, f"iter_{t}" if t else "unsteered", 1.0, eval_fluency=fl, stop=stop)


def test_held_out_improvement_and_fluency_cost():
    history = [_row(0, 10.0, 0.1, 0.0), _row(1, 15.0, 0.3, 0.5, stop="budget")]
    out = run_outcome(history, _answers(0, [0.0, 0.5, None]), _answers(1, [1.0, 1.0, 0.2]), 1)
    assert out["final_policy"] == 1 and out["stopped"] == "budget"
    held = out["held_out"]
    assert held["prompts"] == 2  # the prompt without a base score is left out
    assert held["improvement"] == pytest.approx(0.75)
    assert held["base_score"] == pytest.approx(0.25) and held["final_score"] == pytest.approx(1.0)
    lo, hi = held["ci95"]
    assert lo <= held["improvement"] <= hi
    assert out["fluency"] == pytest.approx(
        {"perplexity_ratio": 1.5, "repetition_delta": 0.2, "loop_share_delta": 0.5}
    )


def test_no_held_out_prompts():
    history = [_row(0, 10.0, 0.1, 0.0)]
    assert run_outcome(history, [], [], 0) == {"final_policy": 0, "stopped": None}


def test_same_as_the_saved_outcome_of_an_old_run():
    run = RunDir(OLD_RUN)
    history = run.history()
    saved = json.loads(run.outcome.read_text())
    best = saved["final_policy"]
    assert run_outcome(history, run.read_eval(0), run.read_eval(best), best) == saved


def test_the_selection_section_is_checked_and_explains_an_earlier_pick():
    from simsteer.loop.outcome import check_outcome, format_outcome

    out = {"final_policy": 1, "stopped": None, "selection": {"rule": "one-se", "best_calibrated": 2}}
    assert check_outcome(out) is out
    assert "within one standard error of policy 2" in format_outcome(out).splitlines()[0]
    same = {**out, "selection": {"rule": "one-se", "best_calibrated": 1}}
    assert format_outcome(same).splitlines()[0] == "final policy: iteration 1"
    with pytest.raises(TypeError, match="best_calibrated"):
        check_outcome({**out, "selection": {"rule": "one-se", "best_calibrated": -1}})
    with pytest.raises(KeyError, match="rule"):
        check_outcome({**out, "selection": {"best_calibrated": 1}})
