"""The SIMS loop on a tiny model: artefacts, labels, resume after a kill."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from simsteer.errors import SimsError
from simsteer.generation.sampling import SamplingConfig
from simsteer.learners import get_learner
from simsteer.loop.calibration import GuardConfig
from simsteer.loop.prompt_sets import draw_prompts, split_pool
from simsteer.loop.selection import label_by_win_rate
from simsteer.loop.sims import SIMS, SIMSConfig
from simsteer.oracles import get_oracle
from simsteer.prompts import Prompt

PROMPTS = [
    f"the {w} day is very {v}"
    for w in ("good", "bad", "cold", "warm", "long", "short")
    for v in ("happy", "sad")
]
CONFIG = SIMSConfig(
    iterations=2,
    prompts_per_iteration=3,
    samples_per_prompt=3,
    eval_prompts=2,
    sampling=SamplingConfig(max_new_tokens=6, batch_size=5),
    seed=3,
    guard=GuardConfig(fluency_budget=None),  # the paper's plain loop; the guard has its own tests
)


def _run(lm, out: Path, callback=None):
    sims = SIMS(
        lm,
        get_oracle("length:4"),
        get_learner("caa", layers="1-2", coefficient=0.5),
        CONFIG,
        progress=False,
        callback=callback,
    )
    return sims.fit(PROMPTS, out)


def test_run_writes_every_artefact(tiny_lm, tmp_path):
    result = _run(tiny_lm, tmp_path / "run")
    root = result.run_dir
    assert [r.iteration for r in result.history] == [0, 1, 2]
    for t in range(3):
        samples = [json.loads(x) for x in (root / f"iter_{t}" / "samples.jsonl").read_text().splitlines()]
        assert len(samples) == 3 * 3
        for row in samples:
            assert row["label"] == label_by_win_rate(row["win_rate"])
            assert set(row) >= {"prompt_id", "response", "score", "win_rate", "label", "num_tokens"}
        assert (root / f"iter_{t}" / "eval.jsonl").is_file()
    assert (root / "iter_1" / "steering" / "steering.safetensors").is_file()
    assert (root / "final" / "steering_config.json").is_file()
    assert not (root / "iter_0" / "steering").exists()
    summary = json.loads((root / "summary.json").read_text())
    assert summary == [r.to_json() for r in result.history]
    row = summary[0]
    assert row["num_positive"] + row["num_negative"] <= 9
    assert row["tokens_generated"] > 0 and row["tokens_forward"] > 0
    assert set(row["seconds"]) == {"eval", "sample_and_rank", "collect", "fit"}
    config = json.loads((root / "config.json").read_text())
    assert config["sims"]["samples_per_prompt"] == 3 and config["layers"] == [1, 2]
    # Training prompts never overlap the held-out ones.
    held = {json.loads(x)["prompt"] for x in (root / "eval_prompts.jsonl").read_text().splitlines()}
    seen = {
        s["prompt"]
        for t in range(3)
        for s in map(json.loads, (root / f"iter_{t}" / "samples.jsonl").read_text().splitlines())
    }
    assert not held & seen


def test_prompts_drawn_without_replacement():
    pool = [Prompt(str(i), str(i)) for i in range(10)]
    draws = [draw_prompts(pool, t, 4, seed=0) for t in range(3)]
    first_pass = [p.id for d in draws[:2] for p in d] + [p.id for p in draws[2][:2]]
    assert sorted(first_pass) == sorted(str(i) for i in range(10))  # the whole pool, once
    assert len(draws[2]) == 4
    train, held = split_pool(pool, 3, seed=0)
    assert len(train) == 7 and len(held) == 3 and not {p.id for p in train} & {p.id for p in held}
    with pytest.raises(SimsError, match="leave none for training"):
        split_pool(pool[:3], 3, seed=0)


def test_labels_split_on_one_half():
    assert label_by_win_rate(0.51) == "positive"
    assert label_by_win_rate(0.49) == "negative"
    assert label_by_win_rate(0.5) == "tie"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"iterations": 0}, "iterations"),
        ({"samples_per_prompt": 1}, "K"),
        ({"prompts_per_iteration": 0}, "N"),
        ({"sampling": SamplingConfig(temperature=0)}, "temperature"),
    ],
)
def test_invalid_loop_settings(kwargs, message):
    with pytest.raises(SimsError, match=message):
        SIMSConfig(**kwargs)


KILL_SCRIPT = textwrap.dedent("""
    import os, sys
    from simsteer.models import load_model
    sys.path.insert(0, {tests!r})
    from test_loop_sims import _run
    lm = load_model({model!r}, device="cpu", dtype="fp32")

    def kill(step, t):
        if (step, t) == ({step!r}, {t}):
            os._exit(9)  # a hard kill: no cleanup, no exception handlers

    _run(lm, __import__("pathlib").Path({out!r}), callback=kill)
""")


def _artefacts(root: Path) -> dict:
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_dir():
            continue
        rel = str(path.relative_to(root))
        if path.suffix == ".safetensors":
            out[rel] = {k: v.tolist() for k, v in load_file(path).items()}
        elif path.suffix in (".json", ".jsonl"):
            text = path.read_text()
            data = [json.loads(x) for x in text.splitlines()] if path.suffix == ".jsonl" else json.loads(text)
            out[rel] = _drop_timing(data)
    return out


def _drop_timing(data):
    if isinstance(data, dict):
        return {
            k: _drop_timing(v)
            for k, v in data.items()
            if k not in ("seconds", "seconds_total", "fit_seconds")
        }
    if isinstance(data, list):
        return [_drop_timing(v) for v in data]
    return data


@pytest.mark.parametrize("step, t", [("collect", 1), ("sample", 0)])
def test_resume_after_kill_matches_uninterrupted_run(tiny_lm, tiny_model_dir, tmp_path, step, t):
    reference = _run(tiny_lm, tmp_path / "reference").run_dir
    killed = tmp_path / "killed"
    script = KILL_SCRIPT.format(
        tests=str(Path(__file__).parent), model=str(tiny_model_dir), step=step, t=t, out=str(killed)
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert not (killed / "summary.json").exists()
    _run(tiny_lm, killed)  # resume
    assert _artefacts(killed) == _artefacts(reference)
    assert not list(killed.rglob(".*.tmp"))


def test_resume_refuses_other_settings(tiny_lm, tmp_path):
    _run(tiny_lm, tmp_path / "r")
    other = SIMSConfig(iterations=3, prompts_per_iteration=3, samples_per_prompt=3, eval_prompts=2)
    sims = SIMS(tiny_lm, get_oracle("length:4"), get_learner("caa", layers="1-2"), other, progress=False)
    with pytest.raises(SimsError, match="other loop settings"):
        sims.fit(PROMPTS, tmp_path / "r")


def test_scores_are_recorded_per_sample(tiny_lm, tmp_path):
    result = _run(tiny_lm, tmp_path / "r")
    rows = [json.loads(x) for x in (result.run_dir / "iter_0" / "samples.jsonl").read_text().splitlines()]
    assert result.history[0].sample_score == pytest.approx(np.mean([r["score"] for r in rows]))


def test_config_json_is_the_run_spec(tiny_lm, tmp_path):
    from simsteer.loop.rundir import RunDir
    from simsteer.loop.spec import RUN_FORMAT_VERSION

    sims = SIMS(
        tiny_lm, get_oracle("length:4"), get_learner("caa", layers="1-2", coefficient=0.5), CONFIG, False
    )
    result = sims.fit(PROMPTS, tmp_path / "r", prompt_sources={"prompts": "/data/p.txt"})
    spec = RunDir(result.run_dir).spec()
    assert spec.format_version == RUN_FORMAT_VERSION and spec.sims == CONFIG and spec.layers == [1, 2]
    assert spec.model.device == "cpu" and spec.model.dtype == "float32"
    assert spec.model.fingerprint == tiny_lm.fingerprint() and spec.model.source == tiny_lm.source
    assert spec.oracle == get_oracle("length:4").describe() and spec.learner["coefficient"] == 0.5
    assert spec.prompts == {"prompts": "/data/p.txt"}
    assert RunDir(result.run_dir).is_complete()


def test_resume_refuses_another_oracle_or_learner_naming_both_values(tiny_lm, tmp_path):
    _run(tiny_lm, tmp_path / "r")
    learner = get_learner("caa", layers="1-2", coefficient=0.25)
    sims = SIMS(tiny_lm, get_oracle("length:5"), learner, CONFIG, progress=False)
    with pytest.raises(SimsError) as err:
        sims.fit(PROMPTS, tmp_path / "r")
    message = str(err.value)
    assert "oracle.name: saved 'length:4', now 'length:5'" in message
    assert "learner.coefficient: saved 0.5, now 0.25" in message and "\n" not in message
