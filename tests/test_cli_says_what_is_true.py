"""What the commands print is what the run directory's records say: a run that kept the
unsteered model says so (and so do the answers generated with it), a baseline is not an
unfinished run, a random-preference baseline's own scores are named as the random
oracle's, the sweep table shows the kept policy's figures, the status counts iterations
and policies apart, and a closed output pipe ends quietly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from simsteer.cli.main import EXIT_BROKEN_PIPE, main

from .conftest import TINY_RUN
from .test_bad_inputs_cli import PROMPTS


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture(scope="module")
def flat_run(tmp_path_factory, tiny_model_dir, prompts) -> tuple[Path, str]:
    """A run whose oracle scores every answer alike: nothing to learn, so it keeps the
    unsteered model. Returns the run and what ``sims run`` printed."""
    root = tmp_path_factory.mktemp("flat")
    scorer = root / "flat_scorer.py"
    scorer.write_text("def score(prompt, response):\n    return 0.0\n")
    out = root / "run"
    argv = ["run", "--model", str(tiny_model_dir), "--prompts", str(prompts)]
    argv += ["--oracle", f"python:{scorer}:score", "--out", str(out), *TINY_RUN]
    result = subprocess.run(
        [sys.executable, "-m", "simsteer", *argv], capture_output=True, text=True, env=_env(), check=False
    )
    assert result.returncode == 0, result.stderr
    return out, result.stdout


@pytest.fixture(scope="module")
def length_run(tmp_path_factory, tiny_model_dir, prompts) -> Path:
    """A finished run without the guard."""
    out = tmp_path_factory.mktemp("length") / "run"
    argv = ["run", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--oracle", "length:3"]
    assert main([*argv, "--layers", "1-2", "--fluency-budget", "off", "--out", str(out), *TINY_RUN]) == 0
    return out


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


def test_a_run_that_kept_the_unsteered_model_says_so(flat_run):
    from simsteer.policy import load_policy

    run, printed = flat_run
    assert load_policy(run / "final").is_unsteered
    assert "steering saved to" not in printed
    assert f"no steering kept: {run / 'final'} holds the unsteered model" in printed
    info = subprocess.run(
        [sys.executable, "-m", "simsteer", "info", str(run)], capture_output=True, text=True, env=_env()
    )
    assert f"no steering kept: {run / 'final'} holds the unsteered model" in info.stdout


def test_generate_with_an_unsteered_final_says_steered_false(flat_run, tiny_model_dir, capsys):
    run, _ = flat_run
    capsys.readouterr()
    argv = ["generate", "--model", str(tiny_model_dir), "--steering", str(run), "-p", "the good day"]
    assert main([*argv, "--max-new-tokens", "3"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.splitlines()[0])["steered"] is False
    assert "holds no steering" in err


def test_generate_with_a_steering_says_steered_true(tiny_lm, tiny_model_dir, tmp_path, capsys):
    import torch

    from simsteer.functions import AddVector
    from simsteer.steering import Steering

    folder = tmp_path / "steering"
    Steering({1: AddVector(torch.ones(tiny_lm.hidden_size))}, "caa", tiny_lm.fingerprint()).save(folder)
    capsys.readouterr()
    argv = ["generate", "--model", str(tiny_model_dir), "--steering", str(folder), "-p", "the good day"]
    assert main([*argv, "--max-new-tokens", "3", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["steered"] is True


def test_info_counts_iterations_and_policies_apart(length_run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(length_run, copy)
    # As if killed after iteration 0's row: one policy evaluated, none learned yet...
    for path in [copy / "iter_1", copy / "final", copy / "summary.json", copy / "outcome.json"]:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    capsys.readouterr()
    assert main(["info", str(copy)]) == 0
    status = capsys.readouterr().out.strip().splitlines()[-1]
    assert status.startswith("status: incomplete (1 of 1 iterations learned, 1 of 2 policies evaluated)")
    assert f"sims run --resume {copy}" in status


def test_info_on_a_built_baseline_is_not_an_unfinished_run(length_run, tmp_path, capsys):
    out = tmp_path / "vanilla"
    assert main(["baseline", "vanilla", "--like", str(length_run), "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "incomplete" not in printed and "--resume" not in printed
    assert printed.splitlines()[0] == f"baseline {out}: vanilla, mirrors the run {length_run}"
    assert (
        f"status: built (a vanilla baseline has no iterations); evaluate it with: sims eval {out}" in printed
    )


def test_info_on_a_random_baseline_names_whose_scores_it_shows(length_run, tmp_path, capsys):
    out = tmp_path / "random"
    assert main(["baseline", "random", "--like", str(length_run), "-o", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "the scores below are the random oracle's" in printed and "length:3" in printed
    held = [line for line in printed.splitlines() if line.startswith("held-out score")]
    assert held and all(line.startswith("held-out score under the random oracle ") for line in held)
    assert printed.strip().splitlines()[-1] == "status: complete"


def test_a_closed_output_pipe_ends_quietly(length_run):
    """``sims info RUN | head -1``: the reader is gone before the output is written."""
    read, write = os.pipe()
    os.close(read)  # every write now fails with EPIPE, deterministically
    try:
        result = subprocess.run(
            [sys.executable, "-m", "simsteer", "info", str(length_run)],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
            check=False,
        )
    finally:
        os.close(write)
    assert result.stderr == ""
    assert result.returncode == EXIT_BROKEN_PIPE


def test_the_sweep_table_shows_the_kept_policy(tmp_path, tiny_model_dir, prompts, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "-o", str(out), "--grid", "K=2,3", "--", "--model", str(tiny_model_dir)]
    argv += ["--prompts", str(prompts), "--oracle", "length:3", *TINY_RUN]
    assert main(argv) == 0
    for row in json.loads((out / "results.json").read_text()):
        outcome = json.loads((Path(row["run"]) / "outcome.json").read_text())
        assert row["final_policy"] == outcome["final_policy"]
        assert row["eval_score"] == outcome["held_out"]["final_score"]
        assert row["eval_score_base"] == outcome["held_out"]["base_score"]
    # A point whose run kept policy 0 (its outcome.json says so, with that policy's
    # held-out figures): the table shows those, not the last policy's row.
    point = out / "K=3"
    outcome = json.loads((point / "outcome.json").read_text())
    rows = [json.loads((point / f"iter_{t}" / "summary.json").read_text()) for t in (0, 1)]
    kept = {**outcome, "final_policy": 0, "selection": {"rule": "one-se", "best_calibrated": 0}}
    kept["held_out"] = {**outcome["held_out"], "final_score": 0.4321, "improvement": 0.0, "ci95": [0.0, 0.0]}
    (point / "outcome.json").write_text(json.dumps(kept))
    capsys.readouterr()
    assert main(argv) == 0
    table = capsys.readouterr().out.splitlines()
    assert "kept policy" in table[0]
    line = next(x for x in table if x.split()[0] == "3")
    assert "+0.432" in line.split() and line.split()[2] == "0"
    row = json.loads((out / "results.json").read_text())[1]
    assert row["eval_score"] == 0.4321 and row["final_policy"] == 0
    assert row["eval_perplexity"] == rows[0]["eval_fluency"]["perplexity"]
