"""The MS baseline for every learner (it shares the loop's activation path), and
:func:`build_baseline` on a tiny run: `sims baseline ms --like RUN` for runs of any learner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from simsteer.activations import PreferenceActivations, collect_activations
from simsteer.errors import SimsError
from simsteer.evaluation.baselines import build_baseline, fit_labelled_steering
from simsteer.evaluation.datasets import PreferencePair
from simsteer.learners import get_learner
from simsteer.loop.rundir import RunDir
from simsteer.steering import Steering

# Options that keep each learner fast and well-posed on the tiny 4-layer model.
LEARNERS = {
    "caa": {},
    "hpr": {"layers": "1-2", "top_k": 1, "max_response_tokens": 4},
    "sea": {},
    "iti": {},
    "actadd": {},
}

PAIRS = [
    PreferencePair(prompt=p, chosen=c, rejected=r)
    for p, c, r in [
        ("the day", "a good happy day", "a bad sad night"),
        ("the cat", "the cat is nice and warm", "the cat is cold"),
        ("the sun", "I love the sun", "I hate the rain"),
        ("we walk", "we walk home fast", "we run slow"),
        ("the dog", "a big happy dog", "a small sad dog"),
        ("the town", "the town is great", "the town is awful"),
    ]
]


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_ms_fits_every_learner(tiny_lm, name):
    steering, tokens = fit_labelled_steering(
        tiny_lm, get_learner(name, **LEARNERS[name]), PAIRS, max_response_tokens=8
    )
    assert isinstance(steering, Steering) and steering.learner == name and steering.layers
    assert steering.metadata["baseline"] == "ms" and steering.metadata["pairs"] == len(PAIRS)
    # Learners that read activations report the forward's tokens; ActAdd reads none.
    assert (tokens == 0) == (name == "actadd")


def test_ms_summaries_are_the_plain_collection(tiny_lm):
    """CAA's vector is built from exactly what collect_activations gives (numbers kept)."""
    learner = get_learner("caa", layers="2")
    steering, tokens = fit_labelled_steering(tiny_lm, learner, PAIRS, max_response_tokens=3)
    acts = collect_activations(
        tiny_lm,
        [p.prompt for p in PAIRS] * 2,
        [p.chosen for p in PAIRS] + [p.rejected for p in PAIRS],
        [2],
        batch_size=8,
        max_response_tokens=3,
    )
    assert tokens == acts.num_tokens
    n, groups = len(PAIRS), list(range(len(PAIRS)))
    data = PreferenceActivations(
        [2], acts.summaries[:n], acts.summaries[n:], groups, groups, acts.token_norms
    )
    expected = get_learner("caa", layers="2").fit(data, tiny_lm.fingerprint())
    assert torch.equal(steering.functions[2].vector, expected.functions[2].vector)


def test_ms_needs_pairs(tiny_lm):
    with pytest.raises(SimsError, match="labelled pairs"):
        fit_labelled_steering(tiny_lm, get_learner("caa"), [])


@pytest.fixture(scope="module")
def tiny_caa_run(tmp_path_factory, tiny_model_dir) -> Path:
    from simsteer.cli.main import main

    root = tmp_path_factory.mktemp("baseline-run")
    prompts = root / "prompts.txt"
    prompts.write_text(
        "the good day\na cat is happy\nI love the sun\nwe walk home\nthe cold rain\na big dog\n"
    )
    out = root / "sims"
    args = ["run", "--model", str(tiny_model_dir), "--dtype", "fp32", "--prompts", str(prompts)]
    args += ["-T", "1", "-N", "2", "-K", "2", "--eval-prompts", "2", "--max-new-tokens", "3"]
    args += ["--fluency-budget", "off", "--quiet", "--out", str(out)]
    assert main(args) == 0
    return out


def _run_like(run: Path, tmp_path: Path, learner: str) -> Path:
    """A copy of ``run``'s directory files as if it had been trained with ``learner``."""
    like = tmp_path / f"run-{learner}"
    like.mkdir()
    config = json.loads(RunDir(run).config.read_text())
    config["learner"] = {**get_learner(learner, **LEARNERS[learner]).hyperparameters(), "name": learner}
    RunDir(like).config.write_text(json.dumps(config))
    (like / "eval_prompts.jsonl").write_bytes(RunDir(run).eval_prompts.read_bytes())
    return like


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_build_ms_baseline_for_a_run_of_every_learner(tiny_caa_run, tmp_path, name):
    like = _run_like(tiny_caa_run, tmp_path, name)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(vars(p)) + "\n" for p in PAIRS))
    out = build_baseline("ms", like, tmp_path / "ms", pairs=str(pairs), max_response_tokens=8)
    assert out == tmp_path / "ms"
    config = json.loads(RunDir(out).config.read_text())
    assert config["baseline"] == "ms" and config["learner"]["name"] == name
    assert config["num_pairs"] == len(PAIRS)
    steering = Steering.load(RunDir(out).final)
    assert steering.learner == name and steering.metadata["baseline"] == "ms"
    assert RunDir(out).eval_prompts.is_file()
    with pytest.raises(SimsError, match="already holds"):
        build_baseline("ms", like, out, pairs=str(pairs))


def test_build_baseline_refuses_bad_input(tiny_caa_run, tmp_path):
    with pytest.raises(SimsError, match="unknown baseline"):
        build_baseline("best-of-3", tiny_caa_run, tmp_path / "x")
    with pytest.raises(SimsError, match="not a run directory"):
        build_baseline("vanilla", tmp_path, tmp_path / "x")
    out = build_baseline("best-of-n", tiny_caa_run, tmp_path / "bon", n=3, seed=1)
    config = json.loads(RunDir(out).config.read_text())
    assert config["baseline"] == "best-of-n" and config["n"] == 3 and config["seed"] == 1
