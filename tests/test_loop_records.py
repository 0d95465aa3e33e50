"""The typed run records write exactly the JSON of the dict rows they replace (same keys,
same order, same values) and read the files of a run written before them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simsteer.loop.records import (
    CalibrationPoint,
    CalibrationRecord,
    EvalRecord,
    FitRecord,
    FluencyRecord,
    IterationRecord,
    JudgingStats,
    Measurement,
    SampleRecord,
    TrainingPair,
)
from simsteer.schema import SchemaError

#: A run directory written by simsteer 0.1.0 (``sims run --variant cs`` with the guard,
#: T=1, on the tiny test model), before the records existed: config format 1.
OLD_RUN = Path(__file__).parent / "fixtures" / "run_v1"


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _same(a, b) -> bool:
    """Equal values *and* key order (``json.dumps`` keeps the order)."""
    return json.dumps(a) == json.dumps(b)


@pytest.mark.parametrize(
    "pattern, kind",
    [
        ("iter_*/summary.json", IterationRecord),
        ("iter_*/samples.jsonl", SampleRecord),
        ("iter_*/eval.jsonl", EvalRecord),
        ("iter_*/train_pairs.jsonl", TrainingPair),
        ("iter_*/calibration.jsonl", CalibrationPoint),
        ("calibration_base.json", Measurement),
    ],
)
def test_old_files_round_trip_exactly(pattern, kind):
    paths = sorted(OLD_RUN.glob(pattern))
    assert paths
    for path in paths:
        rows = _jsonl(path) if path.suffix == ".jsonl" else [json.loads(path.read_text())]
        for row in rows:
            assert _same(kind.from_json(row).to_json(), row), path


def test_summary_rows_are_the_iteration_rows():
    summary = json.loads((OLD_RUN / "summary.json").read_text())
    records = [IterationRecord.from_json(r) for r in summary]
    assert [r.iteration for r in records] == [0, 1]
    first, last = records
    assert first.fit == FitRecord("caa", False) and first.tokens_forward and first.calibration
    assert first.judging.train_pairs == 1 and first.judging.bank_size == 2
    assert last.fit is None and last.calibration is None and last.tokens_forward is None
    assert first.calibration.chosen_point.multiplier == first.calibration.chosen == 0.5


def _row(**kw) -> IterationRecord:
    fl = FluencyRecord(perplexity=12.5, repetition=0.1, distinct_2=0.9, loop_share=0.0, mean_tokens=7.0)
    base = dict(
        iteration=1,
        policy="iter_1",
        strength=0.5,
        eval_score=0.25,
        eval_fluency=fl,
        sample_score=None,
        sample_fluency=fl,
        num_prompts=2,
        num_positive=1,
        num_negative=1,
        tokens_generated=40,
        mean_response_tokens=6.5,
        seconds={"eval": 0.1},
        seconds_total=0.1,
    )
    return IterationRecord(**{**base, **kw})


def test_optional_entries_are_left_out_as_before():
    last = _row().to_json()
    # The last row has no collect / fit / calibration step: those keys are absent.
    assert list(last) == [
        "iteration",
        "policy",
        "strength",
        "eval_score",
        "eval_fluency",
        "sample_score",
        "sample_fluency",
        "num_prompts",
        "num_positive",
        "num_negative",
        "tokens_generated",
        "mean_response_tokens",
        "seconds",
        "seconds_total",
    ]
    assert last["sample_score"] is None  # present as null, as the dict rows wrote it
    base = Measurement(score=0.0, perplexity=10.0, repetition=0.0, loop_share=0.0, distinct_2=1.0)
    calibration = CalibrationRecord(base, (), None, None)
    guarded = _row(
        judging=JudgingStats(ranking_parse_rate=1.0, judge_requests=3),
        tokens_forward=12,
        fit=FitRecord("caa", True),
        calibration=calibration,
    ).to_json()
    keys = list(guarded)
    assert keys[keys.index("mean_response_tokens") + 1 : keys.index("seconds")] == [
        "ranking_parse_rate",
        "judge_requests",
        "tokens_forward",
        "fit",
        "calibration",
        "stop",
    ]
    assert guarded["stop"] is None  # a calibrated row always says whether it stops
    assert IterationRecord.from_json(guarded) == _row(
        judging=JudgingStats(ranking_parse_rate=1.0, judge_requests=3),
        tokens_forward=12,
        fit=FitRecord("caa", True),
        calibration=calibration,
    )


def test_sample_judge_info_only_when_given():
    row = SampleRecord(0, "p", "prompt", 0, "answer", 3, True, 0.5, 0.75, "positive")
    assert "judge_info" not in row.to_json()
    with_info = SampleRecord(
        0, "p", "prompt", 0, "answer", 3, True, None, 0.75, "positive", True, {"requests": 2}
    )
    assert with_info.to_json()["judge_info"] == {"requests": 2}
    assert SampleRecord.from_json(with_info.to_json()) == with_info
    # A row from before the ``judged`` entry: judged by default.
    old = {k: v for k, v in row.to_json().items() if k != "judged"}
    assert SampleRecord.from_json(old).judged is True


def test_missing_required_entry_is_an_error():
    row = EvalRecord(0, "p", "prompt", "answer", 3, True, None).to_json()
    del row["response"]
    with pytest.raises(SchemaError, match="'response' is missing"):
        EvalRecord.from_json(row)


def test_records_are_frozen():
    pair = TrainingPair(0, "p", "prompt", 1, "answer", "positive", 0.5)
    with pytest.raises(AttributeError):
        pair.label = "negative"  # type: ignore[misc]
