"""Crash-safe writes (simsteer.io): one rename per commit, unique temporaries, folders
replaced in one step, the sweep of a killed writer's leftovers, the run-directory lock."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from simsteer.errors import SimsError
from simsteer.functions import AddVector
from simsteer.io import (
    atomic_write_bytes,
    commit_hook,
    exclusive_lock,
    is_temporary,
    staged_dir,
    sweep_temporaries,
    temporary_sibling,
)
from simsteer.policy import Policy
from simsteer.steering import CONFIG_NAME, WEIGHTS_NAME, Steering

FINGERPRINT = {"architecture": "Tiny", "hidden_size": 4, "num_layers": 2}


class Crash(BaseException):
    pass


def crash(at: str):
    def hook(phase: str, target: Path) -> None:
        if phase == at:
            raise Crash(target)

    return hook


def test_temporaries_are_unique_hidden_siblings_naming_the_pid(tmp_path):
    a, b = temporary_sibling(tmp_path / "x.json"), temporary_sibling(tmp_path / "x.json")
    assert a != b and a.parent == tmp_path and f".x.json.{os.getpid()}." in a.name
    assert is_temporary(a.name) and is_temporary(temporary_sibling(a, ".old").name)
    assert not is_temporary("x.json") and not is_temporary(".sims.lock")


def test_a_write_is_one_commit_and_a_crash_keeps_the_old_file(tmp_path):
    target = tmp_path / "a.txt"
    seen = []
    with commit_hook(lambda phase, path: seen.append((phase, path))):
        atomic_write_bytes(target, b"old")
    assert seen == [("before", target), ("after", target)]
    with commit_hook(crash("before")), pytest.raises(Crash):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.txt"]
    with commit_hook(crash("after")), pytest.raises(Crash):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["a.txt"]


def test_staged_folder_appears_whole_and_replaces_the_old_one(tmp_path):
    target = tmp_path / "f"
    with staged_dir(target) as tmp:
        (tmp / "one").write_text("1")
    with commit_hook(crash("before")), pytest.raises(Crash), staged_dir(target) as tmp:
        (tmp / "two").write_text("2")
    assert os.listdir(target) == ["one"] and os.listdir(tmp_path) == ["f"]  # untouched
    # Killed between "old aside" and "new in": no folder (never half of one), old kept aside.
    with commit_hook(crash("after")), pytest.raises(Crash), staged_dir(target) as tmp:
        (tmp / "two").write_text("2")
    assert not target.exists()
    assert [p for p in os.listdir(tmp_path) if p.endswith(".old")]
    sweep_temporaries(tmp_path)
    assert os.listdir(tmp_path) == []
    with staged_dir(target) as tmp:
        (tmp / "two").write_text("2")
    assert os.listdir(target) == ["two"]


def test_staged_folder_without_replace_never_overwrites_a_full_folder(tmp_path):
    (tmp_path / "run").mkdir()
    with staged_dir(tmp_path / "run", replace=False) as tmp:  # an empty folder is fine
        (tmp / "config.json").write_text("{}")
    with pytest.raises(OSError), staged_dir(tmp_path / "run", replace=False) as tmp:
        (tmp / "config.json").write_text("[]")
    assert (tmp_path / "run" / "config.json").read_text() == "{}"
    assert os.listdir(tmp_path) == ["run"]


def test_sweep_removes_only_temporaries(tmp_path):
    (tmp_path / "iter_0").mkdir()
    keep = [tmp_path / "config.json", tmp_path / ".sims.lock", tmp_path / "iter_0" / "eval.jsonl"]
    for path in keep:
        path.write_text("x")
    stale = [
        temporary_sibling(tmp_path / "config.json"),
        temporary_sibling(tmp_path / "iter_0" / "eval.jsonl"),
    ]
    for path in stale:
        path.write_text("half")
    folder = temporary_sibling(tmp_path / "final", ".old")
    (folder / "step_1").mkdir(parents=True)
    assert sorted(sweep_temporaries(tmp_path)) == sorted([*stale, folder])
    assert all(p.exists() for p in keep) and not folder.exists()


def test_second_lock_holder_is_refused_naming_the_first(tmp_path):
    lock = tmp_path / ".sims.lock"
    with exclusive_lock(lock, "run directory r"):
        assert lock.read_text().strip() == str(os.getpid())
        message = rf"^run directory r is being written by another process \(pid {os.getpid()}\)"
        with pytest.raises(SimsError, match=message), exclusive_lock(lock, "run directory r"):
            pass
    with exclusive_lock(lock, "run directory r"):  # released with the block
        pass


def _steering(value: float) -> Steering:
    return Steering({1: AddVector(torch.full((4,), value))}, "caa", FINGERPRINT)


def test_steering_save_replaces_the_whole_folder(tmp_path):
    # A composed policy saved first, then one steering at the same path: no step_<i>/ is
    # left behind to be loaded as part of it (it used to be kept next to the new files).
    Policy([_steering(1.0), _steering(2.0)]).save(tmp_path / "p")
    _steering(3.0).save(tmp_path / "p")
    assert sorted(os.listdir(tmp_path / "p")) == [WEIGHTS_NAME, CONFIG_NAME]
    assert len(Policy.load(tmp_path / "p")) == 1
    Policy([_steering(1.0), _steering(2.0)]).save(tmp_path / "p")
    assert sorted(os.listdir(tmp_path / "p")) == ["step_1", "step_2"]


def test_steering_save_refuses_to_replace_another_folder(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(SimsError, match="not a steering folder"):
        _steering(1.0).save(tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_steering_save_is_one_commit(tmp_path):
    seen = []
    with commit_hook(lambda phase, path: seen.append(phase)):
        Policy([_steering(1.0), _steering(2.0)]).save(tmp_path / "p")
    assert seen == ["before", "after"]  # the folder's rename, not each file
    with commit_hook(crash("before")), pytest.raises(Crash):
        _steering(3.0).save(tmp_path / "p")
    assert sorted(os.listdir(tmp_path)) == ["p"] and len(Policy.load(tmp_path / "p")) == 2


def _observe_syncs(monkeypatch) -> list[tuple[str, str]]:
    """Record ("fsync", path) for every fsync (the path its fd names) and ("replace", dst)
    for every rename, in order."""
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
    return events


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name an fd's file")
def test_a_commit_fsyncs_the_file_before_and_the_parent_folder_after_the_rename(tmp_path, monkeypatch):
    events = _observe_syncs(monkeypatch)
    target = tmp_path / "a.json"
    atomic_write_bytes(target, b"{}")
    (fsync_file, renamed, fsync_parent) = events
    assert fsync_file[0] == "fsync" and Path(fsync_file[1]).name.startswith(".a.json.")  # the temporary
    assert renamed == ("replace", str(target))
    assert fsync_parent == ("fsync", str(tmp_path))  # the rename itself reaches the disk


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name an fd's file")
def test_a_staged_folder_is_fsynced_whole_before_its_rename_and_its_parent_after(tmp_path, monkeypatch):
    events = _observe_syncs(monkeypatch)
    target = tmp_path / "steering"
    with staged_dir(target) as tmp:
        (tmp / "sub").mkdir()
        atomic_write_bytes(tmp / "sub" / "w.bin", b"x")
    renames = [i for i, e in enumerate(events) if e == ("replace", str(target))]
    assert len(renames) == 1
    before, after = events[: renames[0]], events[renames[0] + 1 :]
    synced = {Path(p).name for kind, p in before if kind == "fsync"}
    assert {"sub", tmp.name} <= synced  # the file's folder and the staged root
    assert any(name.startswith(".w.bin.") for name in synced)  # the file (as its temporary)
    assert ("fsync", str(tmp_path)) in after
