"""No network at run time: a Hugging Face hub id is loaded from the local hub cache, and
one that is not there is refused in one line unless ``SIMSTEER_ALLOW_DOWNLOAD=1``. The
CLI runs in a fresh process with its own (empty, or hand-filled) hub cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import build_tiny_model

SRC = Path(__file__).resolve().parents[1] / "src"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def sims(hub: Path, *args: str, allow: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "SIMSTEER_ALLOW"))}
    env.update(HF_HUB_CACHE=str(hub), PYTHONPATH=str(SRC), PYTHONWARNINGS="ignore")
    if allow is not None:
        env["SIMSTEER_ALLOW_DOWNLOAD"] = allow
    cmd = [sys.executable, "-m", "simsteer", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def generate(hub: Path, model: str, allow: str | None = None) -> subprocess.CompletedProcess:
    argv = ["generate", "--model", model, "--no-steer", "-p", "hi", "--max-new-tokens", "2", "--quiet"]
    return sims(hub, *argv, allow=allow)


@pytest.mark.parametrize("allow", [None, "0"])
def test_an_uncached_hub_id_is_refused_in_one_line(tmp_path, allow):
    proc = generate(tmp_path / "hub", "simsteer-tests/not-in-any-cache", allow)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "simsteer-tests/not-in-any-cache" in lines[0] and "SIMSTEER_ALLOW_DOWNLOAD=1" in lines[0]
    assert not (tmp_path / "hub").exists() or not any((tmp_path / "hub").iterdir())  # nothing fetched


def test_a_cached_hub_id_loads_without_asking(tmp_path):
    hub = tmp_path / "hub"
    repo = hub / "models--simsteer-tests--tiny"
    snapshot = repo / "snapshots" / COMMIT
    build_tiny_model(tmp_path / "model")
    shutil.copytree(tmp_path / "model", snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    proc = generate(hub, "simsteer-tests/tiny")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '"response"' in proc.stdout
