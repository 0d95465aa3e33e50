"""States a resume cannot leave (issue 23): a diverging fit or a NaN reward is refused
before anything is committed, a planted lock link is never followed, ``sims eval`` writes
into a run under its lock and in one step, a run killed while it was being prepared is
started over, and the cheap checks come before the model loads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from simsteer.cli import main
from simsteer.learners.caa import CAA

from .conftest import TINY_RUN
from .test_bad_inputs_cli import one_line_error, tree_hash

PROMPTS = ["the good day", "a cat is happy", "I love the sun", "we walk home", "the cold rain", "a big dog"]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def run_argv(model: Path, prompts: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--model", str(model), "--prompts", str(prompts), "--oracle", "length:3",
            "--layers", "1-2", "--out", str(out), *TINY_RUN, *extra]  # fmt: skip


def steering_folders(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name in ("fitted", "steering"))


# -- item 8: a NaN steering is never committed ------------------------------------------------
def test_a_diverging_fit_is_one_line_naming_the_learner_and_commits_nothing(
    tmp_path, tiny_model_dir, prompts_file, capsys
):
    out = tmp_path / "run"
    # 1e300 is finite, but the fitted float32 vector is not.
    argv = run_argv(tiny_model_dir, prompts_file, out, "-L", "coefficient=1e300")
    line = one_line_error(capsys, argv)
    assert "learner caa produced NaN or infinite values" in line and "nothing was saved" in line
    assert steering_folders(out) == []
    assert (out / "iter_0" / "activations.safetensors").is_file()  # the work before the fit is kept
    # The resume fits again (the same one line), instead of refusing a committed NaN folder.
    line = one_line_error(capsys, ["run", "--resume", str(out), "--quiet"])
    assert "learner caa produced NaN or infinite values" in line
    assert steering_folders(out) == []


class FlakyCAA(CAA):
    """CAA whose fits are NaN while ``poisoned`` (not a setting: the run's spec is CAA's)."""

    poisoned = True

    def fit(self, data, fingerprint):
        steering = super().fit(data, fingerprint)
        if not self.poisoned:
            return steering
        nan = {
            layer: type(fn)(torch.full_like(fn.vector, float("nan")))
            for layer, fn in steering.functions.items()
        }
        return self.steering(nan, fingerprint)


def test_a_run_whose_fit_diverged_once_resumes(tmp_path, tiny_lm):
    from simsteer.errors import SimsError
    from simsteer.generation.sampling import SamplingConfig
    from simsteer.loop.calibration import GuardConfig
    from simsteer.loop.config import SIMSConfig
    from simsteer.loop.sims import SIMS
    from simsteer.oracles import get_oracle

    config = SIMSConfig(
        iterations=1,
        prompts_per_iteration=2,
        samples_per_prompt=2,
        eval_prompts=1,
        sampling=SamplingConfig(max_new_tokens=4),
        guard=GuardConfig(strength_grid=(0.5, 1.0), calibration_prompts=1),
    )
    learner = FlakyCAA(layers="1-2")
    out = tmp_path / "run"
    with pytest.raises(SimsError, match="learner caa produced NaN"):
        SIMS(tiny_lm, get_oracle("length:3"), learner, config, progress=False).fit(PROMPTS, out)
    assert steering_folders(out) == []
    learner.poisoned = False  # e.g. the transient cause is gone: the same run goes on
    SIMS(tiny_lm, get_oracle("length:3"), learner, config, progress=False).fit(PROMPTS, out)
    assert (out / "iter_0" / "fitted").is_dir() and (out / "final").is_dir()


# -- item 10: a NaN held-out or guard score names the oracle, before any commit -------------
@pytest.fixture(scope="module")
def nan_reward_model(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from .conftest import build_tokenizer

    path = tmp_path_factory.mktemp("nan-rm")
    tok = build_tokenizer(chat=True)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    model = LlamaForSequenceClassification(cfg)
    with torch.no_grad():
        model.score.weight.fill_(float("nan"))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_a_nan_reward_model_score_is_one_line_naming_it_before_any_commit(
    tmp_path, tiny_model_dir, prompts_file, nan_reward_model, capsys
):
    out = tmp_path / "run"
    argv = run_argv(tiny_model_dir, prompts_file, out)
    argv[argv.index("length:3")] = f"reward-model:{nan_reward_model}"
    line = one_line_error(capsys, argv)
    assert f"oracle reward-model:{nan_reward_model} returned the score nan" in line, line
    assert not (out / "iter_0").exists()  # the held-out answers were never committed


# -- item 11: links in a run directory --------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, prompts_file) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(run_argv(tiny_model_dir, prompts_file, out)) == 0
    return out


def copy_run(run: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(run, to, symlinks=True)
    return to


@pytest.mark.parametrize("command", ["resume", "eval"])
def test_a_lock_file_link_is_refused_and_its_target_untouched(tmp_path, finished_run, command, capsys):
    run = copy_run(finished_run, tmp_path / "run")
    victim = tmp_path / "precious.txt"
    victim.write_text("do not truncate me\n")
    (run / ".sims.lock").unlink()
    (run / ".sims.lock").symlink_to(victim)
    argv = ["run", "--resume", str(run), "--quiet"] if command == "resume" else ["eval", str(run)]
    line = one_line_error(capsys, argv)
    assert ".sims.lock" in line and "symbolic link" in line
    assert victim.read_text() == "do not truncate me\n"


def test_a_hard_linked_lock_file_is_refused(tmp_path, finished_run, capsys):
    run = copy_run(finished_run, tmp_path / "run")
    victim = tmp_path / "precious.txt"
    victim.write_text("do not truncate me\n")
    (run / ".sims.lock").unlink()
    os.link(victim, run / ".sims.lock")
    line = one_line_error(capsys, ["run", "--resume", str(run), "--quiet"])
    assert "hard link" in line
    assert victim.read_text() == "do not truncate me\n"


def test_sims_eval_writes_into_the_run_under_its_lock_and_in_one_step(tmp_path, finished_run, monkeypatch):
    from simsteer import io as sims_io

    run = copy_run(finished_run, tmp_path / "run")
    committed: list[str] = []
    locked: list[bool] = []

    def watch(phase: str, target: Path) -> None:
        if phase == "before" and target.parent == run:
            committed.append(target.name)
            # The lock is held: a second writer of the run is refused right now.
            fd = os.open(run / ".sims.lock", os.O_RDWR)
            try:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked.append(False)
            except BlockingIOError:
                locked.append(True)
            finally:
                os.close(fd)

    with sims_io.commit_hook(watch):
        assert main(["eval", str(run), "--bootstrap", "10"]) == 0
    written = {"eval.json", "report.md", "eval_curves.png", "eval_metrics.png"}
    assert written <= set(committed), committed
    assert all(locked)
    assert not [p for p in run.rglob(".*") if p.name.endswith((".tmp", ".old"))]


def test_a_second_writer_makes_sims_eval_refuse_before_any_work(tmp_path, finished_run, capsys):
    from simsteer.io import exclusive_lock

    run = copy_run(finished_run, tmp_path / "run")
    before = tree_hash(run)
    with exclusive_lock(run / ".sims.lock", "the test"):
        line = one_line_error(capsys, ["eval", str(run)])
    assert "being written by another process" in line
    assert tree_hash(run) == before


# -- item 12: a run killed while it was being prepared ----------------------------------------
def half_prepared(tmp_path: Path) -> Path:
    """What a kill after prompts.jsonl, before config.json, leaves (an older simsteer
    wrote them one by one; an interrupted copy does the same)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "prompts.jsonl").write_text(json.dumps({"id": "0", "prompt": "the good day"}) + "\n")
    (out / "eval_prompts.jsonl").write_text(json.dumps({"id": "1", "prompt": "a big dog"}) + "\n")
    (out / ".sims.lock").write_text("12345\n")
    return out


def test_a_half_prepared_run_is_started_over(tmp_path, tiny_model_dir, prompts_file, capsys):
    out = half_prepared(tmp_path)
    line = one_line_error(capsys, ["run", "--resume", str(out), "--quiet"])
    assert "killed while it was being prepared" in line and f"sims run --out {out}" in line
    assert main(run_argv(tiny_model_dir, prompts_file, out)) == 0
    assert (out / "config.json").is_file() and (out / "final").is_dir()
    assert len((out / "prompts.jsonl").read_text().splitlines()) > 1  # the new run's prompts


def test_a_folder_with_other_files_is_still_refused(tmp_path, tiny_model_dir, prompts_file, capsys):
    out = half_prepared(tmp_path)
    (out / "notes.txt").write_text("mine\n")
    before = tree_hash(out)
    line = one_line_error(capsys, run_argv(tiny_model_dir, prompts_file, out))
    assert "is not an empty run directory" in line
    assert tree_hash(out) == before


# -- item 14: cheap checks before the model loads ----------------------------------------------
@pytest.fixture()
def no_model_load(monkeypatch):
    """Any model load fails the test: the refusal must come first."""
    import simsteer.models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(simsteer.models, "load_model", refuse)


def test_run_into_a_non_empty_folder_is_refused_before_the_load(
    tmp_path, tiny_model_dir, prompts_file, no_model_load, capsys
):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "mine.txt").write_text("x")
    line = one_line_error(capsys, run_argv(tiny_model_dir, prompts_file, out))
    assert "is not an empty run directory" in line


def test_generate_into_a_folder_is_refused_before_the_load(tmp_path, tiny_model_dir, no_model_load, capsys):
    argv = ["generate", "--model", str(tiny_model_dir), "--no-steer", "-p", "hi", "--output", str(tmp_path)]
    line = one_line_error(capsys, argv)
    assert "--output" in line and "folder" in line


@pytest.mark.parametrize("command", ["eval", "baseline", "export"])
def test_a_relative_saved_model_path_is_refused_by_every_command(
    tmp_path, finished_run, command, no_model_load, monkeypatch, capsys
):
    run = copy_run(finished_run, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config["model"]["source"] = "./model"
    (run / "config.json").write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)
    argv = {
        "eval": ["eval", str(run)],
        "baseline": ["baseline", "vanilla", "--like", str(run), "--out", str(tmp_path / "b")],
        "export": ["export", str(run), "--format", "gguf-cvec", "-o", str(tmp_path / "x.gguf")],
    }[command]
    line = one_line_error(capsys, argv)
    assert "model.source holds the relative path './model'" in line


def test_a_damaged_activations_file_is_one_line(tmp_path, finished_run, capsys):
    run = copy_run(finished_run, tmp_path / "run")
    for path in run.rglob("*"):
        if path.name in ("fitted", "steering", "final") or path.name == "summary.json":
            import shutil

            shutil.rmtree(path) if path.is_dir() else path.unlink()
    for path in list(run.glob("iter_*/calibration*")) + list(run.glob("iter_*/frontier.png")):
        path.unlink()
    (run / "outcome.json").unlink(missing_ok=True)
    activations = run / "iter_0" / "activations.safetensors"
    activations.write_bytes(activations.read_bytes()[:100])
    line = one_line_error(capsys, ["run", "--resume", str(run), "--quiet"])
    assert "activations.safetensors is not a readable activations file" in line


@pytest.mark.parametrize("blocker", ["point-folder", "results-folder"])
def test_sweep_refuses_a_folder_it_cannot_finish_in_before_any_point_runs(
    tmp_path, tiny_model_dir, prompts_file, blocker, capsys
):
    out = tmp_path / "sweep"
    if blocker == "point-folder":
        (out / "K=3").mkdir(parents=True)
        (out / "K=3" / "notes.txt").write_text("mine\n")
    else:
        (out / "results.json").mkdir(parents=True)
    before = tree_hash(out)
    argv = ["sweep", "--out", str(out), "--grid", "K=2,3", "--", "--model", str(tiny_model_dir)]
    argv += ["--prompts", str(prompts_file), "--oracle", "length:3", "--layers", "1-2", *TINY_RUN]
    line = one_line_error(capsys, argv)
    assert ("K=3" in line and "not an empty run directory" in line) or "results.json is a folder" in line
    assert not (out / "K=2").exists() and tree_hash(out) == before
