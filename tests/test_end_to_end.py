"""End to end on the embedded SmolLM2-135M-Instruct: the CLI in fresh processes, as a
user runs it. Slow (about two minutes), few, and run in CI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _sims(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "simsteer", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _responses(path: Path) -> list[str]:
    return [json.loads(x)["response"] for x in path.read_text().splitlines()]


def test_gguf_conversion_is_cached(embedded_lm, monkeypatch):
    import simsteer.models
    from simsteer.models import cache_dir, intact_conversion, load_model

    assert str(cache_dir()).startswith(os.environ["SIMSTEER_CACHE"])  # the session's, not the user's
    folders = list((cache_dir() / "gguf").glob("*/config.json"))
    assert folders, "the converted model was not cached"
    assert intact_conversion(folders[0].parent)
    assert "quantization_config" not in json.loads(folders[0].read_text())

    def no_conversion(path, folder):
        raise AssertionError("a warm load converted the GGUF file again")

    monkeypatch.setattr(simsteer.models, "_dequantise", no_conversion)
    lm = load_model(device="cpu")  # a warm load reads the cache
    assert lm.num_layers == 30 and lm.hidden_size == 576
    assert lm.tokenizer.chat_template


def test_guarded_run_improves_and_generate_reproduces_it(tmp_path):
    out = tmp_path / "run"
    proc = _sims(
        "run",
        "-T",
        "2",
        "-N",
        "8",
        "-K",
        "4",
        "--eval-prompts",
        "8",
        "--calibration-prompts",
        "8",
        "--max-new-tokens",
        "32",
        "--out",
        str(out),
        "--quiet",
        "--dtype",
        "fp32",
    )
    assert "sample_score" in proc.stdout and "final policy: iteration" in proc.stdout
    outcome = json.loads((out / "outcome.json").read_text())
    final = outcome["final_policy"]
    # The guard found a strength that raises the sentiment oracle's held-out score while
    # staying within the fluency budget on the calibration prompts. (fp32: on CPUs with
    # native bf16, `auto` picks bf16, whose samples make a different, noisier small run.)
    assert final >= 1
    assert outcome["held_out"]["improvement"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary[0]["calibration"]["chosen"] is not None
    assert (out / "iter_0" / "frontier.png").is_file()
    # A fresh process with the saved steering reproduces the final policy's answers...
    gen = tmp_path / "steered.jsonl"
    _sims(
        "generate",
        "--steering",
        str(out),
        "--prompts",
        str(out / "eval_prompts.jsonl"),
        "--max-new-tokens",
        "32",
        "--output",
        str(gen),
        "--quiet",
        "--dtype",
        "fp32",
    )
    assert _responses(gen) == _responses(out / f"iter_{final}" / "eval.jsonl")
    # ...and --no-steer gives the unsteered model's.
    _sims(
        "generate",
        "--no-steer",
        "--prompts",
        str(out / "eval_prompts.jsonl"),
        "--max-new-tokens",
        "32",
        "--output",
        str(gen),
        "--quiet",
        "--dtype",
        "fp32",
    )
    assert _responses(gen) == _responses(out / "iter_0" / "eval.jsonl")
    info = _sims("info", str(out)).stdout
    assert "LlamaForCausalLM" in info and "final policy: iteration" in info
