"""The run directory: every path of a run, and typed readers (history, completeness,
spec) that also read a run written before the records existed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from simsteer.errors import SimsError
from simsteer.loop.bank import BankConfig
from simsteer.loop.rundir import RunDir

from .test_loop_records import OLD_RUN


@pytest.fixture()
def old_run(tmp_path) -> RunDir:
    root = tmp_path / "run"
    shutil.copytree(OLD_RUN, root)
    return RunDir(root)


def test_paths(tmp_path):
    run = RunDir(tmp_path)
    assert run.bank == tmp_path / "bank.jsonl"
    assert run.pairs(2) == tmp_path / "iter_2" / "train_pairs.jsonl"
    assert run.iteration_summary(0) == tmp_path / "iter_0" / "summary.json"
    assert not run.is_run() and run.history() == [] and not run.is_complete()


def test_history_and_completeness_of_an_old_run(old_run):
    rows = old_run.history()
    assert [r.iteration for r in rows] == [0, 1]
    assert [r.to_json() for r in rows] == json.loads(old_run.summary.read_text())
    assert old_run.is_complete()
    (old_run.iteration_summary(1)).unlink()
    assert [r.iteration for r in old_run.history()] == [0] and not old_run.is_complete()
    # A stop row ends the run early: complete with fewer rows, once final/ exists.
    row = json.loads(old_run.iteration_summary(0).read_text())
    old_run.iteration_summary(0).write_text(json.dumps({**row, "stop": "no strength is fluent"}))
    assert old_run.is_complete()
    shutil.rmtree(old_run.final)
    assert not old_run.is_complete()


def test_typed_readers(old_run):
    spec = old_run.spec()
    assert spec.format_version == 1 and spec.sims.variant == "cs"
    samples = old_run.read_samples(0)
    assert len(samples) == 2 * 3 and {s.label for s in samples} <= {"positive", "negative", "unused"}
    assert [e.prompt_id for e in old_run.read_eval(1)] == ["7", "8"]
    pairs = old_run.read_pairs(0)
    assert [p.label for p in pairs] == ["positive", "negative"] and pairs[0].reward is not None
    assert old_run.read_pairs(5) is None and old_run.read_samples(5) == [] and old_run.read_eval(5) == []
    bank = old_run.read_bank(BankConfig(top=3))
    assert len(bank) == 4 and bank.config.top == 3
    assert [p.multiplier for p in old_run.read_calibration(0)] == [0.5, 1.0]
    assert old_run.read_calibration_base().perplexity > 0
    assert old_run.read_outcome().final_policy == 0
    assert [p.id for p in old_run.read_prompts(old_run.eval_prompts)] == ["7", "8"]
    assert old_run.read_prompts(old_run.root / "missing.jsonl") == []


def test_unreadable_row_is_one_clear_error(old_run):
    row = json.loads(old_run.iteration_summary(1).read_text())
    del row["policy"]
    old_run.iteration_summary(1).write_text(json.dumps(row))
    with pytest.raises(SimsError, match=r"iter_1/summary\.json: field 'policy' is missing"):
        old_run.history()


def test_spec_of_a_folder_without_config(tmp_path):
    with pytest.raises(SimsError, match="not a run directory"):
        RunDir(Path(tmp_path)).spec()
