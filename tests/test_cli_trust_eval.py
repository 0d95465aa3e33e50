"""``sims eval RUN`` and ``sims baseline KIND --like RUN`` are explicit about trust, like
``sims run --resume``: code a run (or a baseline folder mirroring one) names (a ``python:``
oracle, ``trust_remote_code``) and the API key variable of its judge are used only with the
same flag typed again; otherwise one error line names the flag, before anything is imported
or loaded."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from simsteer.cli.main import main
from simsteer.errors import SimsError
from simsteer.evaluation.baselines import build_baseline
from simsteer.evaluation.run_eval import evaluate_run
from simsteer.loop.rundir import RunDir

from .conftest import TINY_RUN
from .test_cli_trust import SCORER, _copy, _refused, _tree

TINY = [*TINY_RUN, "--layers", "1-2", "--fluency-budget", "off"]

#: Cheap evaluation options (the consent flags are what is tested).
EVAL = ["--scorers", "length:50", "--bootstrap", "10"]


class Finished:
    """A finished run whose oracle is the user code ``home/scorer.py``."""

    def __init__(self, home: Path, run: Path) -> None:
        self.home, self.run = home, run
        self.oracle = f"python:{home / 'scorer.py'}:score"  # as saved: absolute
        self.marker = home / "imported.marker"


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir) -> Iterator[Finished]:
    home = tmp_path_factory.mktemp("home")
    (home / "scorer.py").write_text(SCORER)
    (home / "prompts.txt").write_text("the good day\na cat is happy\nI love the sun\nwe walk home\n")
    run = home / "run"
    argv = ["run", "--model", str(tiny_model_dir), "--dtype", "fp32", "--prompts", str(home / "prompts.txt")]
    assert main([*argv, "--oracle", f"python:{home / 'scorer.py'}:score", "--out", str(run), *TINY]) == 0
    yield Finished(home, run)


@pytest.fixture()
def no_load(monkeypatch) -> list[dict[str, Any]]:
    """Model loads refused (and recorded): a refusal must come before any load."""
    calls: list[dict[str, Any]] = []

    def load(*args: Any, **kwargs: Any) -> None:
        calls.append(kwargs)
        raise SimsError("the model was loaded")

    for where in ("simsteer.models", "simsteer.evaluation.run_eval", "simsteer.evaluation.baselines"):
        monkeypatch.setattr(f"{where}.load_model", load)
    return calls


# -- a python: oracle ---------------------------------------------------------------------------
def test_eval_runs_the_python_oracle_only_with_the_same_oracle_flag(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    before = _tree(run)
    report = tmp_path / "report"
    # Old code imported the saved oracle file and evaluated without a word.
    _refused(
        ["eval", str(run), *EVAL, "--out", str(report)],
        capsys,
        f"add --oracle {finished.oracle} to the eval command",
        "edited by someone else",
    )
    assert not finished.marker.exists() and not report.exists()
    other = tmp_path / "other.py"
    other.write_text(SCORER)
    for typed in (f"python:{other}:score", "sentiment"):
        _refused(["eval", str(run), "--oracle", typed, *EVAL, "--out", str(report)], capsys, "--oracle is")
    assert not finished.marker.exists() and not (tmp_path / "imported.marker").exists()
    assert _tree(run) == before
    # Named again: the run is evaluated with its own oracle.
    assert main(["eval", str(run), "--oracle", finished.oracle, *EVAL, "--out", str(report)]) == 0
    assert finished.marker.exists() and (report / "eval.json").is_file()
    assert json.loads((report / "eval.json").read_text())["oracle"] == finished.oracle


def test_baseline_and_its_eval_ask_for_the_python_oracle(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    out = tmp_path / "vanilla"
    _refused(
        ["baseline", "vanilla", "--like", str(run), "--out", str(out)],
        capsys,
        f"add --oracle {finished.oracle} to the baseline command",
    )
    assert not out.exists() and not finished.marker.exists()
    assert (
        main(["baseline", "vanilla", "--like", str(run), "--out", str(out), "--oracle", finished.oracle]) == 0
    )
    assert RunDir(out).is_run()
    # The baseline folder names the run's oracle: evaluating it asks again.
    report = tmp_path / "report"
    _refused(["eval", str(out), *EVAL, "--out", str(report)], capsys, f"add --oracle {finished.oracle}")
    assert not finished.marker.exists() and not report.exists()
    assert main(["eval", str(out), "--oracle", finished.oracle, *EVAL, "--out", str(report)]) == 0
    assert finished.marker.exists() and (report / "eval.json").is_file()


def test_eval_of_a_random_baseline_asks_for_the_oracle_it_is_judged_with(finished, tmp_path, capsys, no_load):
    """A random-split baseline trained on random scores is judged with the mirrored run's
    oracle (``eval_oracle``): that is the one whose code would run."""

    def random_split(cfg: dict) -> None:
        cfg.update(baseline="random", eval_oracle=cfg["oracle"], oracle={"name": "random", "seed": 0})

    run = _copy(finished, tmp_path, random_split)
    _refused(["eval", str(run), *EVAL], capsys, f"add --oracle {finished.oracle} to the eval command")
    assert not finished.marker.exists() and not no_load


def test_library_functions_take_the_consent_explicitly(finished, tmp_path):
    run = _copy(finished, tmp_path)
    with pytest.raises(SimsError, match=r"add --oracle python:.* \(trusted=\{'--oracle python:"):
        evaluate_run(run)
    with pytest.raises(SimsError, match="add --oracle python:"):
        build_baseline("vanilla", run, tmp_path / "vanilla")
    assert not finished.marker.exists() and not (tmp_path / "vanilla").exists()
    build_baseline("vanilla", run, tmp_path / "vanilla", trusted={f"--oracle {finished.oracle}"})
    assert RunDir(tmp_path / "vanilla").is_run() and not finished.marker.exists()


# -- trust_remote_code --------------------------------------------------------------------------
def _remote_code(cfg: dict) -> None:
    cfg["model"]["trust_remote_code"] = True


@pytest.mark.parametrize("command", ["eval", "baseline"])
def test_trust_remote_code_is_refused_before_any_model_load(finished, tmp_path, capsys, no_load, command):
    run = _copy(finished, tmp_path, _remote_code)
    before = _tree(run)
    out = tmp_path / "out"
    argv = (
        ["eval", str(run), *EVAL, "--out", str(out)]
        if command == "eval"
        else ["baseline", "ms", "--like", str(run), "--out", str(out)]
    )
    source = json.loads((run / "config.json").read_text())["model"]["source"]
    _refused(
        [*argv, "--oracle", finished.oracle],
        capsys,
        f"add --trust-remote-code --model {source} to the {command} command",
        "runs the code shipped with it",
    )
    # The consent names the model: the flag alone, or another model, is not enough.
    argv += ["--oracle", finished.oracle, "--trust-remote-code"]
    _refused(argv, capsys, f"add --trust-remote-code --model {source}")
    _refused([*argv, "--model", str(tmp_path)], capsys, f"--model is {tmp_path} here but {source}")
    assert not no_load and not finished.marker.exists() and not out.exists()
    assert _tree(run) == before
    # Typed again: the model is loaded with the code it ships (here refused by the stub).
    _refused([*argv, "--model", source], capsys, "the model was loaded")
    assert [call.get("trust_remote_code") for call in no_load] == [True]
    assert not finished.marker.exists()


def test_eval_with_trust_remote_code_typed_again_runs(finished, tmp_path):
    run = _copy(finished, tmp_path, _remote_code)
    report = tmp_path / "report"
    source = json.loads((run / "config.json").read_text())["model"]["source"]
    argv = ["eval", str(run), "--oracle", finished.oracle, "--trust-remote-code", "--model", source]
    assert main([*argv, *EVAL, "--out", str(report)]) == 0
    assert (report / "eval.json").is_file()


# -- a judge's API key --------------------------------------------------------------------------
def _judge_key(cfg: dict) -> None:
    cfg["oracle"] = {
        "name": "judge",
        "model": "m",
        "base_url": "https://judge.invalid/v1",
        "api_key_env": "HOME",
    }


@pytest.mark.parametrize("command", ["eval", "baseline"])
def test_judge_key_is_sent_only_with_the_same_variable_typed(finished, tmp_path, capsys, no_load, command):
    run = _copy(finished, tmp_path, _judge_key)
    out = tmp_path / "out"
    argv = (
        ["eval", str(run), *EVAL, "--out", str(out)]
        if command == "eval"
        else ["baseline", "ms", "--like", str(run), "--out", str(out)]
    )
    url = "https://judge.invalid/v1"
    _refused(argv, capsys, f"add --judge-base-url {url} to the {command} command", "prompts and answers")
    _refused(
        [*argv, "--judge-base-url", "https://other.invalid/v1"], capsys, "--judge-base-url is https://other"
    )
    argv += ["--judge-base-url", url]
    _refused(argv, capsys, f"add --judge-api-key-env HOME to the {command} command", "https://judge.invalid")
    _refused([*argv, "--judge-api-key-env", "PATH"], capsys, "--judge-api-key-env is PATH here but HOME")
    assert not no_load and not out.exists()
    _refused([*argv, "--judge-api-key-env", "HOME"], capsys, "the model was loaded")  # past the check
