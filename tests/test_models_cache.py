"""The conversion cache (:func:`simsteer.models.cached_conversion`, what a GGUF file is
dequantised into): built once, fsynced before its one rename, checked against its manifest
on every load (a truncated file is converted again, never trusted), and the folders of
killed conversions are swept. The conversion here is a real one of the tiny test model
(saved as safetensors, as the GGUF conversion saves the embedded model)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from simsteer.models import CONVERT_PREFIX, MANIFEST_NAME, cached_conversion, intact_conversion

from .conftest import build_tiny_model


class Converter:
    """Builds the tiny model into the folder it is given, counting the builds."""

    def __init__(self) -> None:
        self.builds = 0

    def __call__(self, folder: Path) -> None:
        self.builds += 1
        build_tiny_model(folder)


def weights(folder: Path) -> Path:
    return folder / "model.safetensors"


def test_a_conversion_is_built_once_and_then_read_from_the_cache(tmp_path):
    convert = Converter()
    target = tmp_path / "gguf" / "abc"
    assert cached_conversion(target, convert, "tiny") == target
    assert cached_conversion(target, convert, "tiny") == target
    assert convert.builds == 1
    manifest = json.loads((target / MANIFEST_NAME).read_text())["files"]
    assert manifest["model.safetensors"] == weights(target).stat().st_size
    assert not list(target.parent.glob(f"{CONVERT_PREFIX}*"))


@pytest.mark.parametrize("damage", ["truncated", "no-manifest", "file-missing"])
def test_a_damaged_cache_is_converted_again_not_trusted(tmp_path, damage):
    from transformers import AutoModelForCausalLM

    convert = Converter()
    target = tmp_path / "gguf" / "abc"
    cached_conversion(target, convert, "tiny")
    size = weights(target).stat().st_size
    if damage == "truncated":  # what a power cut before the data reached the disk leaves
        os.truncate(weights(target), size // 2)
    elif damage == "no-manifest":  # an older simsteer's cache, or a copy without it
        (target / MANIFEST_NAME).unlink()
    else:
        weights(target).unlink()
    assert not intact_conversion(target)
    cached_conversion(target, convert, "tiny")
    assert convert.builds == 2 and weights(target).stat().st_size == size
    AutoModelForCausalLM.from_pretrained(target)  # loads
    assert not list(target.parent.glob(f"{CONVERT_PREFIX}*"))


def test_a_failed_conversion_leaves_nothing(tmp_path):
    def broken(folder: Path) -> None:
        (folder / "half.bin").write_bytes(b"x" * 100)
        raise KeyboardInterrupt

    target = tmp_path / "gguf" / "abc"
    with pytest.raises(KeyboardInterrupt):
        cached_conversion(target, broken, "tiny")
    assert sorted(p.name for p in target.parent.iterdir()) == [".lock"]


def test_the_weights_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name an fd's file")
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        real_replace(src, dst)
        events.append(("replace", str(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "gguf" / "abc"
    cached_conversion(target, Converter(), "tiny")
    commit = events.index(("replace", str(target)))
    synced = [Path(p) for kind, p in events[:commit] if kind == "fsync"]
    assert {"model.safetensors", "config.json", MANIFEST_NAME} <= {p.name for p in synced}
    assert ("fsync", str(target.parent)) in events[commit + 1 :]


def test_a_killed_conversion_is_swept_by_the_next_one(tmp_path):
    target = tmp_path / "gguf" / "abc"
    started = tmp_path / "started"
    child = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from simsteer.models import cached_conversion

        def slow(folder):
            (folder / "model.safetensors").write_bytes(b"x" * 1000)
            Path({str(started)!r}).write_text("1")
            time.sleep(600)

        cached_conversion(Path({str(target)!r}), slow, "tiny")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-c", child], env=env)
    try:
        while not started.exists():
            assert proc.poll() is None, "the converting process died"
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    (leftover,) = target.parent.glob(f"{CONVERT_PREFIX}*")  # what the kill left
    assert leftover.name.startswith(f"{CONVERT_PREFIX}{proc.pid}-")
    live = target.parent / f"{CONVERT_PREFIX}{os.getpid()}-inprogress"  # a live process's
    live.mkdir()
    convert = Converter()
    cached_conversion(target, convert, "tiny")
    assert convert.builds == 1 and intact_conversion(target)
    assert not leftover.exists() and live.is_dir()
