"""``sims export``: a run's final policy or a steering folder written as ``hf-bias`` (and
``gguf-cvec`` where that writer is present); bad inputs end in one line, exit 2, and
write nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from simsteer.cli.main import main
from simsteer.export.hf_bias import MANIFEST_NAME, read_manifest
from simsteer.functions import HPR_MLP_NAMES, AddVector, HouseholderRotation
from simsteer.models import load_model
from simsteer.policy import Policy
from simsteer.steering import Steering

from .conftest import TINY_RUN

GGUF_WRITER = Path(__file__).resolve().parents[1] / "src" / "simsteer" / "export" / "gguf_cvec.py"


def _caa(lm, layers=(1, 3), strength: float = 0.5) -> Steering:
    gen = torch.Generator().manual_seed(0)
    fns = {i: AddVector(torch.randn(lm.hidden_size, generator=gen)) for i in layers}
    return Steering(fns, "caa", lm.fingerprint(), strength=strength)


def _one_line(capsys, argv: list[str], status: int = 2) -> str:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert code == status, err
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture()
def steering_dir(tmp_path, tiny_lm) -> Path:
    return Policy(_caa(tiny_lm)).save(tmp_path / "steering")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished tiny run (its final policy is replaced per test where it matters)."""
    root = tmp_path_factory.mktemp("export-run")
    prompts = root / "prompts.txt"
    prompts.write_text(
        "the good day\na cat is happy\nI love the sun\nwe walk home\nthe cold rain\na big dog\n"
    )
    out = root / "run"
    argv = ["run", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--oracle", "length:3"]
    assert main([*argv, "--layers", "1-2", "--out", str(out), *TINY_RUN]) == 0
    return out


def test_export_a_steering_folder(steering_dir, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "model"
    argv = [
        "export",
        str(steering_dir),
        "--format",
        "hf-bias",
        "-o",
        str(out),
        "--model",
        str(tiny_model_dir),
    ]
    line = _one_line(capsys, argv, status=0)
    assert line.startswith(f"wrote hf-bias folder {out} (") and "KB" in line and "layers 1, 3" in line
    assert json.loads((out / "config.json").read_text())["mlp_bias"] is True
    assert read_manifest(out)["steerings"][0]["strength"] == 0.5
    # Again: refused without --force, replaced with it (here at twice the strength).
    assert "pass --force" in _one_line(capsys, argv)
    _one_line(capsys, [*argv, "--force", "--strength", "2"], status=0)
    assert read_manifest(out)["steerings"][0]["strength"] == 1.0


def test_export_a_run_uses_its_final_policy_and_model(run_dir, tiny_model_dir, tmp_path, capsys):
    lm = load_model(str(tiny_model_dir), device="cpu", dtype="fp32")
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    final = Policy(_caa(lm, layers=(2,))).save(run / "final")
    out = tmp_path / "model"
    line = _one_line(capsys, ["export", str(run), "--format", "hf-bias", "-o", str(out)], status=0)
    assert "layers 2 of " in line and str(tiny_model_dir) in line  # the run's own model
    info = read_manifest(out)
    assert info["layers"] == [2] and info["source_model"] == str(tiny_model_dir)
    expected = Policy.load(final).additive_vectors()[2].norm().item()
    assert info["vector_norms"]["2"] == pytest.approx(expected, rel=1e-5)


def test_bad_inputs(run_dir, steering_dir, tiny_lm, tiny_model_dir, tiny_gpt2_dir, tmp_path, capsys):
    out = tmp_path / "out"
    hpr = HouseholderRotation(torch.randn(tiny_lm.hidden_size), {n: torch.zeros(1) for n in HPR_MLP_NAMES})
    Policy(Steering({1: hpr}, "hpr", tiny_lm.fingerprint())).save(tmp_path / "hpr")
    Policy(_caa(tiny_lm).with_positions("generated")).save(tmp_path / "late")
    unsteered = tmp_path / "unsteered-run"
    shutil.copytree(run_dir, unsteered)
    Policy().save(unsteered / "final", fingerprint=tiny_lm.fingerprint())
    incomplete = tmp_path / "incomplete-run"
    shutil.copytree(run_dir, incomplete)
    shutil.rmtree(incomplete / "final")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")

    def export(path, *more: str) -> list[str]:
        return ["export", str(path), "--format", "hf-bias", "-o", str(out), *more]

    missing_model = ["--model", str(tmp_path / "no-model")]  # refusals come before the load
    cases = [
        (["export", str(steering_dir), "--format", "onnx", "-o", str(out)], "invalid choice: 'onnx'"),
        (["export", str(steering_dir), "--format", "hf-bias"], "-o/--output"),
        (export(tmp_path / "nowhere"), "does not exist"),
        (export(tmp_path / "other"), "neither a run directory nor a steering folder"),
        (export(tmp_path / "hpr", *missing_model), "hf-bias cannot hold this policy: layer 1 of the hpr"),
        (export(tmp_path / "late", *missing_model), "applies at 'generated' positions"),
        (export(unsteered, *missing_model), "unsteered model"),
        (export(incomplete, *missing_model), "has no final policy yet"),
        (["export", str(steering_dir), "--format", "hf-bias", "-o", str(tmp_path / "full")], "pass --force"),
        (
            ["export", str(steering_dir), "--format", "hf-bias", "-o", str(tmp_path / "other"), "--force"],
            "not a previous export",
        ),
        (export(steering_dir, "--model", str(tiny_gpt2_dir)), "learned on another model"),
        (export(steering_dir, "--model", str(tiny_model_dir), "--dtype", "fp8"), "unknown dtype"),
    ]
    for argv, message in cases:
        line = _one_line(capsys, argv)
        assert line.startswith("sims: error: ") and message in line, (argv, line)
    assert not out.exists()
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "other" / MANIFEST_NAME).exists()


@pytest.mark.skipif(not GGUF_WRITER.is_file(), reason="the gguf-cvec writer is not in this tree yet")
def test_export_gguf_cvec(steering_dir, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "steer.gguf"
    model = ["--model", str(tiny_model_dir)]
    argv = ["export", str(steering_dir), "--format", "gguf-cvec", "-o", str(out), *model]
    line = _one_line(capsys, argv, status=0)
    assert line.startswith(f"wrote gguf-cvec file {out} (") and out.stat().st_size > 0
    assert "pass --force" in _one_line(capsys, argv)
    assert "writes one file" in _one_line(capsys, [*argv[:4], "-o", str(tmp_path), *model])
