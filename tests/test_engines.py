"""Which engine generates: one ENGINES, one choose_engine for sampling and serving, and
the one-line refusals a user sees through the CLI."""

from __future__ import annotations

import pytest
import torch

from simsteer.cli.main import main
from simsteer.errors import SimsError
from simsteer.functions import AddVector, HeadShift
from simsteer.generation import engines, vllm_engine
from simsteer.generation.engines import ENGINES, choose_engine
from simsteer.policy import Policy
from simsteer.steering import Steering


def test_one_list_of_engines():
    assert ENGINES == ("torch", "llamacpp", "vllm", "auto")
    with pytest.raises(SimsError, match="unknown engine 'tgi'"):
        choose_engine("tgi", None, None)


def test_vllm_refusals_name_what_it_cannot_run(tiny_lm, tiny_gpt2_dir, monkeypatch):
    from simsteer.models import load_model

    monkeypatch.setattr(vllm_engine, "vllm_installed", lambda: True)
    assert choose_engine("vllm", tiny_lm, None) == "vllm"
    gpt2 = load_model(str(tiny_gpt2_dir), device="cpu", dtype="fp32")
    with pytest.raises(SimsError, match=r"--engine vllm cannot sample: .*not 'gpt2'"):
        choose_engine("vllm", gpt2, None)
    heads = tiny_lm.model.config.num_attention_heads
    iti = Steering(
        {1: HeadShift(torch.ones(heads, tiny_lm.hidden_size // heads), torch.ones(heads))},
        "iti",
        tiny_lm.fingerprint(),
    )
    with pytest.raises(SimsError, match=r"cannot serve the steering 'iti'.*attn_heads"):
        choose_engine("vllm", tiny_lm, {"iti": Policy((iti,))}, purpose="serve")
    caa = Steering({1: AddVector(torch.ones(tiny_lm.hidden_size))}, "caa", tiny_lm.fingerprint())
    assert choose_engine("vllm", tiny_lm, {"caa": Policy((caa,))}, purpose="serve") == "vllm"


def test_auto_uses_vllm_only_on_cuda(tiny_lm, monkeypatch):
    monkeypatch.setattr(vllm_engine, "vllm_installed", lambda: True)
    assert engines._auto_order(tiny_lm) == ["llamacpp"]  # a CPU model: vLLM is not the fast engine
    assert choose_engine("auto", tiny_lm, None) == "torch"  # not a GGUF model either


def test_missing_vllm_is_one_line_before_the_model_loads(tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setattr(vllm_engine, "vllm_installed", lambda: False)
    loads = []
    monkeypatch.setattr("simsteer.models.load_model", lambda *a, **k: loads.append(a))
    for command in (
        ["generate", "--model", str(tiny_model_dir), "--no-steer", "-p", "hi", "--engine", "vllm"],
        ["serve", "--model", str(tiny_model_dir), "--engine", "vllm"],
    ):
        assert main(command) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["sims: error: --engine vllm needs vLLM: " + vllm_engine.INSTALL]
    assert loads == []


def test_a_resumed_run_keeps_its_engine(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["run", "--model", str(tiny_model_dir), "--iterations", "1", "--prompts-per-iteration", "2"]
    base += ["--samples-per-prompt", "2", "--eval-prompts", "0", "--max-new-tokens", "4", "--quiet"]
    base += ["--layers", "1", "--oracle", "length:3", "--fluency-budget", "off", "-o", str(out)]
    assert main(base) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["run", "--resume", str(out), "--engine", "vllm", "--quiet"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("sims: error: --engine is vllm here but torch"), line
    assert before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
