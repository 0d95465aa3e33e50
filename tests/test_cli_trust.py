"""``sims run --resume`` is explicit about trust: code a run directory names (a ``python:``
oracle, ``trust_remote_code``) and the API key variable of its judge are used only with the
same flag typed again; saved paths are absolute and never looked up from the current
folder; a changed model or oracle is refused in one line, before the expensive work."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from simsteer.cli import trust
from simsteer.cli.main import build_parser, given_options, main
from simsteer.cli.trust import check_rebuilt, check_trust
from simsteer.errors import SimsError
from simsteer.loop.rundir import RunDir

from .conftest import TINY_RUN

TINY = [*TINY_RUN, "--layers", "1-2"]

#: A user oracle that leaves a marker next to itself when it is imported.
SCORER = """\
import pathlib

pathlib.Path(__file__).with_name("imported.marker").touch()


def score(prompt, response):
    return float(len(response))
"""


class Started:
    """A finished run started from ``home`` with relative paths, then interrupted."""

    def __init__(self, home: Path, run: Path, scores: list[float]) -> None:
        self.home, self.run, self.scores = home, run, scores
        self.oracle = f"python:{home / 'scorer.py'}:score"  # as saved: absolute
        self.marker = home / "imported.marker"


@pytest.fixture(scope="module")
def started(tmp_path_factory, tiny_model_dir) -> Iterator[Started]:
    home = tmp_path_factory.mktemp("home")
    shutil.copytree(tiny_model_dir, home / "model")
    (home / "scorer.py").write_text(SCORER)
    (home / "prompts.txt").write_text("the good day\na cat is happy\nI love the sun\nwe walk home\n")
    cwd = Path.cwd()
    os.chdir(home)  # every path typed relative to the run's home folder
    try:
        argv = ["run", "--model", "model", "--prompts", "prompts.txt", "--oracle", "python:scorer.py:score"]
        assert main([*argv, "--out", "run", *TINY]) == 0
    finally:
        os.chdir(cwd)
    run = home / "run"
    scores = [r.eval_score for r in RunDir(run).history()]
    # Interrupted after its first iteration: a resume has work left.
    (run / "summary.json").unlink()
    (run / "iter_1" / "summary.json").unlink()
    yield Started(home, run, scores)


def _copy(started: Started, tmp_path: Path, edit: Callable[[dict], Any] | None = None) -> Path:
    """A copy of the run (its config.json edited), with the import marker cleared."""
    run = tmp_path / "run"
    shutil.copytree(started.run, run)
    if edit is not None:
        cfg = json.loads((run / "config.json").read_text())
        edit(cfg)
        (run / "config.json").write_text(json.dumps(cfg))
    started.marker.unlink(missing_ok=True)
    return run


def _tree(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _refused(argv: list[str], capsys, *needles: str) -> str:
    """Run ``sims`` expecting one error line (exit 2) that holds every needle."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sims: error: "), err
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    return err[0]


def _args(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.given = given_options(argv)
    return args


# -- code a run names runs only with the flag typed again -------------------------------------
def test_python_oracle_resumes_only_with_the_same_oracle_flag(started, tmp_path, capsys):
    run = _copy(started, tmp_path)
    before = _tree(run)
    # Old code imported the saved oracle file and resumed without a word.
    _refused(
        ["run", "--resume", str(run), "--quiet"],
        capsys,
        f"add --oracle {started.oracle} to the resume command",
        "edited by someone else",
    )
    assert not started.marker.exists()  # nothing of the run's code was imported
    other = tmp_path / "other.py"
    other.write_text(SCORER)
    _refused(
        ["run", "--resume", str(run), "--oracle", f"python:{other}:score", "--quiet"], capsys, "--oracle is"
    )
    assert not started.marker.exists() and not (tmp_path / "imported.marker").exists()
    assert _tree(run) == before
    # Named again: the run resumes to what the uninterrupted run reached.
    assert main(["run", "--resume", str(run), "--oracle", started.oracle, "--quiet"]) == 0
    assert started.marker.exists() and RunDir(run).is_complete()
    assert [r.eval_score for r in RunDir(run).history()] == started.scores


def _remote_code(cfg: dict) -> None:
    cfg["model"]["trust_remote_code"] = True


def _judge_key(cfg: dict) -> None:
    cfg["oracle"] = {
        "name": "judge",
        "model": "m",
        "base_url": "https://judge.invalid/v1",
        "api_key_env": "HOME",
    }


@pytest.mark.parametrize(
    ("edit", "extra", "needle"),
    [
        (_remote_code, ["--oracle", "{oracle}"], "add --trust-remote-code --model {model} to the resume"),
        (
            _remote_code,
            ["--oracle", "{oracle}", "--trust-remote-code"],
            "--trust-remote-code --model {model}",
        ),
        (_judge_key, [], "add --judge-base-url https://judge.invalid/v1 to the resume command"),
        (
            _judge_key,
            ["--judge-base-url", "https://judge.invalid/v1"],
            "add --judge-api-key-env HOME to the resume command",
        ),
    ],
    ids=["trust-remote-code", "trust-remote-code-without-model", "judge-url", "judge-api-key"],
)
def test_edited_config_cannot_switch_on_code_or_keys(started, tmp_path, capsys, edit, extra, needle):
    """A config.json edited to load the model with its shipped code, or to send prompts
    (and a secret from the environment) to another host, is refused unless the flags naming
    the target are typed again."""
    run = _copy(started, tmp_path, edit)
    before = _tree(run)
    argv = [a.format(oracle=started.oracle) for a in extra]
    needle = needle.format(model=started.home / "model")
    _refused(["run", "--resume", str(run), *argv, "--quiet"], capsys, needle, "edited by someone else")
    assert not started.marker.exists()
    assert _tree(run) == before


def test_check_trust_names_every_kind_of_consent(started):
    spec = RunDir(started.run).spec()
    base = ["run", "--resume", str(started.run)]
    module = replace(spec, oracle={"name": "python:mypkg.scorers:helpful", "temperature": 1.0})
    with pytest.raises(SimsError, match=r"add --oracle python:mypkg\.scorers:helpful to the resume"):
        check_trust(_args(base), module)
    check_trust(_args([*base, "--oracle", "python:mypkg.scorers:helpful"]), module)
    remote = replace(spec, oracle={"name": "sentiment"}, model=replace(spec.model, trust_remote_code=True))
    with pytest.raises(SimsError, match="--trust-remote-code"):
        check_trust(_args(base), remote)
    with pytest.raises(SimsError, match="add --trust-remote-code --model"):
        check_trust(_args([*base, "--trust-remote-code"]), remote)  # the consent names the model
    check_trust(_args([*base, "--trust-remote-code", "--model", spec.model.source]), remote)
    # A keyless judge still sends prompts and answers: its URL is named, typed or in --oracle.
    plain = replace(spec, oracle={"name": "judge", "model": "m", "base_url": "http://127.0.0.1:1/v1"})
    with pytest.raises(SimsError, match=r"add --judge-base-url http://127\.0\.0\.1:1/v1 to the resume"):
        check_trust(_args(base), plain)
    check_trust(_args([*base, "--judge-base-url", "http://127.0.0.1:1/v1"]), plain)
    check_trust(_args([*base, "--oracle", "judge:m@http://127.0.0.1:1/v1"]), plain)
    with pytest.raises(SimsError, match="--judge-base-url"):
        check_trust(_args([*base, "--oracle", "judge"]), plain)  # names no URL
    from_env = replace(spec, oracle={**plain.oracle, "base_url_env": "JUDGE_URL"})
    with pytest.raises(SimsError, match=r"to the URL in \$JUDGE_URL .*add --judge-url-env JUDGE_URL"):
        check_trust(_args([*base, "--judge-base-url", "http://127.0.0.1:1/v1"]), from_env)
    check_trust(_args([*base, "--judge-url-env", "JUDGE_URL"]), from_env)


# -- saved paths are absolute, never looked up from the current folder ------------------------
@pytest.fixture()
def decoys(tmp_path, tiny_gpt2_dir, monkeypatch) -> Path:
    """Another folder holding other files under the run's relative names."""
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(tiny_gpt2_dir, elsewhere / "model")
    (elsewhere / "scorer.py").write_text(SCORER)
    (elsewhere / "prompts.txt").write_text("a big dog\nthe cold rain\n")
    monkeypatch.chdir(elsewhere)
    return elsewhere


def test_resume_from_another_folder_uses_the_saved_files(started, tmp_path, decoys, capsys):
    run = _copy(started, tmp_path)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["source"] == str(started.home / "model")
    assert cfg["prompts"]["prompts"] == str(started.home / "prompts.txt")
    assert cfg["oracle"]["name"] == started.oracle
    # Typed relative here, the oracle is this folder's scorer: another one, refused.
    _refused(
        ["run", "--resume", str(run), "--oracle", "python:scorer.py:score", "--quiet"], capsys, "--oracle"
    )
    assert main(["run", "--resume", str(run), "--oracle", started.oracle, "--quiet"]) == 0
    assert not (decoys / "imported.marker").exists() and started.marker.exists()
    assert [r.eval_score for r in RunDir(run).history()] == started.scores


def _put(field: str, value: str) -> Callable[[dict], None]:
    def edit(cfg: dict) -> None:
        section, key = field.split(".")
        cfg[section][key] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (_put("model.source", "model"), "model.source holds the relative path 'model'"),
        (_put("model.source", "./model"), "model.source holds the relative path './model'"),
        (_put("oracle.name", "python:scorer.py:score"), "oracle.name holds the relative path 'scorer.py'"),
        (_put("oracle.name", "reward-model:model"), "oracle.name holds the relative path 'model'"),
        (_put("oracle.template", "t.txt"), "oracle.template holds the relative path 't.txt'"),
        (_put("oracle.cache", "judgments.sqlite"), "oracle.cache holds the relative path"),
    ],
    ids=["model", "model-dot", "python-file", "reward-model", "template", "judge-cache"],
)
def test_relative_saved_path_is_refused(started, tmp_path, decoys, capsys, monkeypatch, edit, needle):
    """Old code loaded this folder's model (or scorer) in place of the run's."""
    run = _copy(started, tmp_path, edit)
    before = _tree(run)

    def no_load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("simsteer.models.load_model", no_load)
    argv = ["run", "--resume", str(run), "--oracle", started.oracle, "--quiet"]
    _refused(argv, capsys, needle, "never looks a saved path up from the current folder")
    assert not (decoys / "imported.marker").exists() and not started.marker.exists()
    assert _tree(run) == before


# -- the model and oracle rebuilt must be the saved ones --------------------------------------
def _other_model(started: Started, tmp_path: Path, tiny_gpt2_dir: Path) -> Path:
    """The run, with the model at its saved path replaced by another one."""
    model = tmp_path / "model"
    shutil.copytree(tiny_gpt2_dir, model)
    return _copy(started, tmp_path, _put("model.source", str(model)))


def test_changed_model_is_refused_before_its_weights_load(
    started, tmp_path, tiny_gpt2_dir, capsys, monkeypatch
):
    run = _other_model(started, tmp_path, tiny_gpt2_dir)
    before = _tree(run)

    def no_load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("simsteer.models.load_model", no_load)
    argv = ["run", "--resume", str(run), "--oracle", started.oracle, "--quiet"]
    _refused(
        argv,
        capsys,
        "was started with another model",
        "model.fingerprint.architecture: saved 'LlamaForCausalLM', now 'GPT2LMHeadModel'",
    )
    assert not started.marker.exists()
    assert _tree(run) == before


def test_changed_model_is_refused_before_the_oracle_is_built(
    started, tmp_path, tiny_gpt2_dir, capsys, monkeypatch
):
    """When its config tells nothing, the loaded model is compared before the oracle (here
    user code; elsewhere a reward model) is built."""
    run = _other_model(started, tmp_path, tiny_gpt2_dir)
    monkeypatch.setattr(trust, "predicted_fingerprint", lambda source: {})
    argv = ["run", "--resume", str(run), "--oracle", started.oracle, "--quiet"]
    _refused(argv, capsys, "model.fingerprint.num_layers: saved 4, now 3")
    assert not started.marker.exists()  # old code imported the oracle, then refused


def test_check_rebuilt_names_dtype_and_oracle(started):
    spec = RunDir(started.run).spec()
    check_rebuilt(started.run, spec, spec.model, dict(spec.oracle))
    other = "float16" if spec.model.dtype != "float16" else "float32"
    with pytest.raises(SimsError, match=rf"model\.dtype: saved '{spec.model.dtype}', now '{other}'"):
        check_rebuilt(started.run, spec, replace(spec.model, dtype=other))
    with pytest.raises(SimsError, match=r"oracle\.temperature: saved 1\.0, now 2\.0"):
        check_rebuilt(started.run, spec, spec.model, {**spec.oracle, "temperature": 2.0})


def test_sweep_resume_types_the_consent_flags_again(tmp_path):
    """A sweep resumes its points with the flags that allowed their code (typed on the sweep
    command line), else every resumed python: oracle point would be refused."""
    from simsteer.evaluation.sweep import point_name, run_sweep

    point = tmp_path / point_name({"K": "2"})
    point.mkdir(parents=True)
    (point / "config.json").write_text("{}")  # a started run: the sweep resumes it
    seen: list[list[str]] = []

    def runner(argv: list[str]) -> int:
        seen.append(argv)
        return 2

    run_args = ["--oracle", "python:/s.py:f", "-T", "1", "--trust-remote-code", "--judge-api-key-env=KEY"]
    run_args += ["--model", "/m", "--judge-base-url", "https://j/v1", "--judge-url-env=U"]
    with pytest.raises(SimsError, match="failed"):
        run_sweep(tmp_path, {"K": ["2"]}, run_args, runner)
    consent = ["--oracle", "python:/s.py:f", "--trust-remote-code", "--judge-api-key-env=KEY"]
    consent += ["--model", "/m", "--judge-base-url", "https://j/v1", "--judge-url-env=U"]
    assert seen == [["run", "--resume", str(point), *consent, "--quiet"]]
