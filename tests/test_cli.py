"""Every bad input gives one line on stderr and exit status 2, never a traceback, and
never damages what a run already wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from simsteer.cli.main import main
from simsteer.learners.caa import AddVector
from simsteer.steering import Steering

from .conftest import TINY_RUN, build_tiny_model


@pytest.fixture()
def prompt_file(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text(
        "\n".join(
            ["the good day", "a cat is happy", "I love the sun", "we walk home", "the cold rain", "a big dog"]
        )
        + "\n"
    )
    return path


def _error(capsys, argv) -> str:
    capsys.readouterr()  # drop what earlier commands printed
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1, err
    assert err[0].startswith("sims: error: ")
    return err[0]


def test_run_then_generate_and_info(tmp_path, tiny_model_dir, prompt_file, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "run",
                "--model",
                str(tiny_model_dir),
                "--prompts",
                str(prompt_file),
                "--oracle",
                "length:3",
                "--layers",
                "1-2",
                "--out",
                str(out),
                *TINY_RUN,
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "sample_score" in table and (out / "final" / "steering.safetensors").is_file()
    assert main(["info", str(out)]) == 0
    assert "status: complete" in capsys.readouterr().out
    # The final policy's greedy answers to the held-out prompts are the run's last eval rows.
    gen_out = tmp_path / "gen.jsonl"
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_model_dir),
                "--steering",
                str(out),
                "--prompts",
                str(out / "eval_prompts.jsonl"),
                "--max-new-tokens",
                "4",
                "--output",
                str(gen_out),
                "--quiet",
            ]
        )
        == 0
    )
    steered = [json.loads(x)["response"] for x in gen_out.read_text().splitlines()]
    # Under the fluency guard the final policy is the best fluent one, named in its metadata.
    final = json.loads((out / "final" / "steering_config.json").read_text())["metadata"]
    last = [
        json.loads(x)["response"]
        for x in (out / f"iter_{final['policy_iteration']}" / "eval.jsonl").read_text().splitlines()
    ]
    assert steered == last
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_model_dir),
                "--no-steer",
                "--prompts",
                str(out / "eval_prompts.jsonl"),
                "--max-new-tokens",
                "4",
                "--output",
                str(gen_out),
                "--quiet",
            ]
        )
        == 0
    )
    plain = [json.loads(x)["response"] for x in gen_out.read_text().splitlines()]
    base = [json.loads(x)["response"] for x in (out / "iter_0" / "eval.jsonl").read_text().splitlines()]
    assert plain == base
    # A second run into the same folder is refused and leaves the run untouched.
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    msg = _error(
        capsys,
        ["run", "--model", str(tiny_model_dir), "--prompts", str(prompt_file), "--out", str(out), *TINY_RUN],
    )
    assert "--resume" in msg
    assert before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_bad_inputs(tmp_path, tiny_model_dir, prompt_file, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    base = ["run", "--model", str(tiny_model_dir), "--out", str(tmp_path / "r")]
    cases = [
        ([*base, "--prompts", str(tmp_path / "missing.txt")], "prompt file not found"),
        ([*base, "--prompts", str(empty)], "has no prompts"),
        ([*base, "--prompts", str(prompt_file), "--oracle", "sentimnt"], "unknown oracle"),
        ([*base, "--prompts", str(prompt_file), "--learner", "cca"], "did you mean 'caa'"),
        ([*base, "--prompts", str(prompt_file), "-K", "1"], "K"),
        ([*base, "--prompts", str(prompt_file), "-T", "0"], "iterations"),
        ([*base, "--prompts", str(prompt_file), "-N", "x"], "not an integer"),
        ([*base, "--prompts", str(prompt_file), "--top-p", "2"], "top_p"),
        ([*base, "--prompts", str(prompt_file), "--layers", "40"], "out of range"),
        ([*base, "--prompts", str(prompt_file), "-L", "bogus=1"], "no option 'bogus'"),
        ([*base, "--prompts", str(prompt_file), "--positions", "middle"], "unknown positions"),
        (["run", "--resume", str(tmp_path / "nothing")], "not a run directory"),
        (["frobnicate"], "invalid choice"),
        (["info", str(tmp_path)], "not a steering folder"),
    ]
    for argv, message in cases:
        assert message in _error(capsys, argv), argv
    assert not (tmp_path / "r").exists()  # nothing was written by a refused command


def test_steering_errors(tmp_path, tiny_model_dir, tiny_gpt2_dir, capsys):
    from simsteer.models import load_model

    lm = load_model(str(tiny_model_dir), device="cpu", dtype="fp32")
    good = Steering({1: AddVector(torch.ones(lm.hidden_size))}, "caa", lm.fingerprint())
    good.save(tmp_path / "s")
    gen = ["generate", "-p", "the good day", "--max-new-tokens", "2", "--quiet"]
    msg = _error(capsys, [*gen, "--model", str(tiny_gpt2_dir), "--steering", str(tmp_path / "s")])
    assert "another model" in msg
    (tmp_path / "s" / "steering.safetensors").write_bytes(b"\x00garbage")
    msg = _error(capsys, [*gen, "--model", str(tiny_model_dir), "--steering", str(tmp_path / "s")])
    assert "corrupt steering file" in msg
    assert "not found" in _error(capsys, [*gen, "--steering", str(tmp_path / "none")])
    assert "--no-steer" in _error(capsys, [*gen, "--model", str(tiny_model_dir)])


def test_unknown_architecture_one_line_without_traceback(tmp_path):
    from transformers import AutoTokenizer, MambaConfig, MambaForCausalLM

    path = tmp_path / "mamba"
    MambaForCausalLM(
        MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, state_size=4)
    ).save_pretrained(path)
    build_tiny_model(tmp_path / "tok")
    AutoTokenizer.from_pretrained(tmp_path / "tok").save_pretrained(path)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "simsteer", "generate", "--model", str(path), "--no-steer", "-p", "hi"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
    assert lines == [lines[-1]] and "unsupported architecture MambaForCausalLM" in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr
