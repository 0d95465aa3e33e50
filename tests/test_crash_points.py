"""Crash points: a tiny run is interrupted at every file-system commit, right before and
right after its rename, resumed, and must end bit-identical to the run that was never
interrupted. A few of the crashes are real ``SIGKILL``s. The runs: guarded, replacing or
composing its policies, and SIMS-CS (its response bank is shared by the iterations, with
eviction and re-scoring).

A *commit* is the rename that puts a finished file or folder in place
(:func:`simsteer.io.commit_hook` sees each one). The reference run records them; each case
then raises at one of them (or kills the process there), checks what a reader would see
at that instant, resumes and compares every file of the run directory (JSON parsed with
the timing fields dropped, everything else byte for byte).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from simsteer.errors import SimsError
from simsteer.generation.sampling import SamplingConfig
from simsteer.io import commit_hook, is_temporary
from simsteer.learners import get_learner
from simsteer.loop import sims as sims_module
from simsteer.loop.bank import BankConfig
from simsteer.loop.calibration import GuardConfig
from simsteer.loop.config import SIMSConfig
from simsteer.loop.rundir import LOCK_NAME, RunDir
from simsteer.loop.sims import SIMS
from simsteer.oracles import get_oracle
from simsteer.oracles.base import ScoreOracle
from simsteer.policy import Policy

PROMPTS = [
    f"the {w} day is very {v}"
    for w in ("good", "bad", "cold", "warm", "long", "short")
    for v in ("happy", "sad")
]
TIMING = ("seconds", "seconds_total", "fit_seconds")


KINDS = ("replace", "compose", "cs")


def config(kind: str) -> SIMSConfig:
    """T=2, N=2, K=2, 4 tokens. replace / compose: the guard on (every strength fluent, so
    each iteration saves fitted/, calibration and policy t+1). cs: the guard off, a bank of
    3 entries (iteration 1 evicts one) re-scored every iteration, top-2 pairs."""
    if kind == "cs":
        return SIMSConfig(
            iterations=2,
            prompts_per_iteration=2,
            samples_per_prompt=2,
            eval_prompts=1,
            sampling=SamplingConfig(max_new_tokens=4, batch_size=8),
            seed=CS_SEED,
            variant="cs",
            bank=BankConfig(capacity=3, top=2, rescore=True),
            guard=GuardConfig(fluency_budget=None),
        )
    compose = kind == "compose"
    return SIMSConfig(
        iterations=2,
        prompts_per_iteration=2,
        samples_per_prompt=2,
        eval_prompts=1,
        sampling=SamplingConfig(max_new_tokens=4, batch_size=8),
        seed=7 if compose else 5,  # both iterations find D+ and D-; policy 2 calibrates best
        compose=compose,
        guard=GuardConfig(
            fluency_budget=1e9,
            repetition_margin=1.0,
            strength_grid=(0.1, 0.2),
            calibration_prompts=1,
            patience=0,
        ),
    )


def fake_frontier(points, base, guard_config, title) -> bytes:
    """A stand-in for the PNG (matplotlib costs ~1 s a plot): same inputs, same bytes."""
    return json.dumps([title, base.to_json(), [p.to_json() for p in points]]).encode()


CS_SEED = 0  # every iteration's bank has an entry with contrast; iteration 1 evicts


class CharsOracle(ScoreOracle):
    """Longer answers win (characters: rarely a tie); prompts with "cold" cannot be judged."""

    name = "chars"

    def score(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        return np.array([float(len(r)) for r in responses])

    def judge(self, prompts, responses):
        judged = super().judge(prompts, responses)
        return [replace(j, parsed="cold" not in p) for p, j in zip(prompts, judged, strict=True)]


def run(lm, out: Path, kind: str) -> None:
    learner = get_learner("caa", layers="1-2", coefficient=0.5)
    oracle = CharsOracle() if kind == "cs" else get_oracle("length:4")
    SIMS(lm, oracle, learner, config(kind), progress=False).fit(PROMPTS, out)


def artefacts(root: Path) -> dict[str, object]:
    """Every file of a run (the lock's pid aside): JSON without timings, safetensors as
    metadata and tensors bit for bit (the header's key order varies), other files' bytes."""
    out: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_dir() or rel == LOCK_NAME:
            continue
        if path.suffix == ".json":
            out[rel] = _drop_timing(json.loads(path.read_text()))
        elif path.suffix == ".jsonl":
            out[rel] = [_drop_timing(json.loads(x)) for x in path.read_text().splitlines()]
        elif path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as fh:
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
                out[rel] = (
                    fh.metadata(),
                    {k: (v.dtype, v.shape, v.numpy().tobytes()) for k, v in tensors.items()},
                )
        else:
            out[rel] = path.read_bytes()
    return out


def _drop_timing(data):
    if isinstance(data, dict):
        return {k: _drop_timing(v) for k, v in data.items() if k not in TIMING}
    if isinstance(data, list):
        return [_drop_timing(v) for v in data]
    return data


class SimulatedCrash(BaseException):
    """Raised from a commit hook: nothing in the library catches it, like a kill."""


@dataclass
class Reference:
    kind: str
    root: Path
    commits: list[str]  # the target of each commit, relative to the run's parent
    files: dict[str, object]
    final: Policy


@pytest.fixture(scope="module")
def fast(tiny_model_dir):
    """One thread (tiny matmuls on a busy machine), no plot, no fsync (kills, not power
    cuts, are simulated here: the renames are the same)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sims_module, "render_frontier", fake_frontier)
        mp.setattr("simsteer.io.os.fsync", lambda fd: None)
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lm(tiny_model_dir, fast):
    from simsteer.models import load_model

    return load_model(str(tiny_model_dir), device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def references(lm, tmp_path_factory) -> dict[str, Reference]:
    """The uninterrupted runs, each recording its commits."""
    return {kind: _reference(lm, tmp_path_factory.mktemp("reference"), kind) for kind in KINDS}


@pytest.fixture(params=KINDS)
def reference(request, references) -> Reference:
    return references[request.param]


def _reference(lm, base: Path, kind: str) -> Reference:
    commits: list[str] = []

    def count(phase: str, target: Path) -> None:
        if phase == "before":
            commits.append(str(target.relative_to(base)))

    with commit_hook(count):
        run(lm, base / "run", kind)
    root = base / "run"
    rows = RunDir(root).history()
    # The case is only worth its time if both fits were kept and (guarded) calibrated.
    assert [row.fit is not None for row in rows] == [True, True, False]
    assert all((root / f"iter_{t}" / "steering" / "steering_config.json").is_file() for t in (1, 2))
    final = Policy.load(root / "final")
    assert len(final) == (2 if kind == "compose" else 1) and not final.is_unsteered  # final/step_<i>/
    if kind == "cs":
        _check_cs_reference(root, commits)
    return Reference(kind, root, commits, artefacts(root), final)


def _check_cs_reference(root: Path, commits: list[str]) -> None:
    """Each iteration commits its bank beside the samples before them and moves it to
    bank.jsonl after them; the bank evicts, skips a prompt and trains on older entries."""
    for t in range(3):
        step = [c for c in commits if c.startswith(f"run/iter_{t}/") or c == "run/bank.jsonl"]
        sampled = step.index(f"run/iter_{t}/samples.jsonl")
        assert step[sampled - 2 : sampled + 2] == [
            f"run/iter_{t}/bank.pending.jsonl",
            f"run/iter_{t}/train_pairs.jsonl",
            f"run/iter_{t}/samples.jsonl",
            "run/bank.jsonl",
        ]
    run_dir = RunDir(root)
    assert not list(root.glob("iter_*/bank.pending.jsonl"))
    rows = run_dir.history()
    assert [row.fit.carried_over for row in rows[:2]] == [False, False]  # both fits learned
    assert [row.judging.bank_size for row in rows] == [2, 3, 3]  # capacity 3: iteration 1 evicts
    assert any(s.label == "skipped" for t in range(3) for s in run_dir.read_samples(t))
    assert any(p.iteration < t for t in (1, 2) for p in run_dir.read_pairs(t))  # older entries


def crash_at(index: int, when: str):
    """A commit hook raising SimulatedCrash at commit ``index``, ``when`` before/after."""
    seen = [0]

    def hook(phase: str, target: Path) -> None:
        if phase == "before":
            seen[0] += 1
        if seen[0] - 1 == index and phase == when:
            raise SimulatedCrash(f"{when} commit {index}: {target}")

    return hook


def check_reader_view(root: Path, ref: Reference) -> None:
    """What ``sims info`` / ``Policy.load`` see at the crash: a final/ is whole or absent."""
    run_dir = RunDir(root)
    if run_dir.final.exists():
        loaded = Policy.load(run_dir.final)
        assert len(loaded) == len(ref.final)
        for a, b in zip(loaded, ref.final, strict=True):
            assert a.layers == b.layers and a.strength == b.strength
    if run_dir.is_run():
        run_dir.spec()  # the initial files are complete once config.json is there
        assert run_dir.read_prompts(run_dir.prompts)


def test_every_commit_point_resumes_to_the_same_artefacts(lm, reference, tmp_path):
    ref = reference
    assert len(ref.commits) >= 20  # initial files, per-iteration files and folders, final/
    failures = []
    for index, target in enumerate(ref.commits):
        for when in ("before", "after"):
            out = tmp_path / f"{index}-{when}" / "run"
            with commit_hook(crash_at(index, when)), pytest.raises(SimulatedCrash):
                run(lm, out, ref.kind)
            check_reader_view(out, ref)
            run(lm, out, ref.kind)  # resume (a fresh run if the crash came first)
            if artefacts(out) != ref.files:
                failures.append(f"{when} commit {index} ({target})")
    assert not failures, failures


def test_crash_while_replacing_final(lm, reference, tmp_path):
    """Re-running a finished run replaces final/: renamed aside, the new one renamed in."""
    ref = reference
    for index in range(4):  # summary.json, outcome.json, final/ aside, final/ in
        for when in ("before", "after"):
            out = tmp_path / f"{index}-{when}"
            shutil.copytree(ref.root, out)
            with commit_hook(crash_at(index, when)), pytest.raises(SimulatedCrash):
                run(lm, out, ref.kind)
            check_reader_view(out, ref)
            run(lm, out, ref.kind)
            assert artefacts(out) == ref.files, (index, when)


KILLER = textwrap.dedent("""
    import json, os, signal, sys, torch
    sys.path.insert(0, {tests!r})
    import test_crash_points as t
    from simsteer.io import commit_hook
    from simsteer.loop import sims as sims_module
    from simsteer.models import load_model

    # One child per kill, forked before any torch work: the imports are paid once and
    # each child is really SIGKILLed, right before the rename of commit `index`.
    status = {{}}
    for index, kind, out in {cases!r}:
        pid = os.fork()
        if pid == 0:
            torch.set_num_threads(1)
            sims_module.render_frontier = t.fake_frontier
            os.fsync = lambda fd: None
            lm = load_model({model!r}, device="cpu", dtype="fp32")
            seen = [0]

            def kill(phase, target):
                seen[0] += phase == "before"
                if seen[0] - 1 == index and phase == "before":
                    os.kill(os.getpid(), signal.SIGKILL)

            with commit_hook(kill):
                t.run(lm, t.Path(out), kind)
            os._exit(0)
        status[out] = os.waitpid(pid, 0)[1]
    print(json.dumps(status))
""")


def test_sigkill_inside_a_commit_resumes_to_the_same_artefacts(lm, references, tiny_model_dir, tmp_path):
    plain, composed, cs = references["replace"], references["compose"], references["cs"]
    # The run directory itself, a staged steering folder (fitted/), the guard's policy
    # t + 1 (the save whose kill used to wedge every resume), a composed final/, SIMS-CS's
    # samples with the new bank committed beside them but not yet in bank.jsonl.
    picks = [
        (0, plain),
        (plain.commits.index("run/iter_0/fitted"), plain),
        (plain.commits.index("run/iter_1/steering"), plain),
        (len(composed.commits) - 1, composed),
        (cs.commits.index("run/iter_1/samples.jsonl"), cs),
    ]
    cases = [(index, ref.kind, str(tmp_path / f"kill-{i}" / "run")) for i, (index, ref) in enumerate(picks)]
    script = KILLER.format(tests=str(Path(__file__).parent), cases=cases, model=str(tiny_model_dir))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = json.loads(proc.stdout.strip().splitlines()[-1])
    for (index, ref), (_, _, out) in zip(picks, cases, strict=True):
        assert status[out] == signal.SIGKILL, (index, status[out])  # killed, not finished
        root = Path(out)
        left = [p for p in root.parent.rglob("*") if is_temporary(p.name)]
        assert left, f"a kill before commit {index} leaves its temporary"
        check_reader_view(root, ref)
        run(lm, root, ref.kind)
        assert artefacts(root) == ref.files, index
        assert not [p for p in root.parent.rglob("*") if is_temporary(p.name)]  # swept


def test_second_writer_is_refused_naming_the_holder(lm, references, tmp_path):
    reference = references["replace"]
    out = tmp_path / "run"
    shutil.copytree(reference.root, out)

    def resume_inside(phase: str, target: Path) -> None:
        if phase == "before":
            with pytest.raises(SimsError, match=rf"being written by another process \(pid {os.getpid()}\)"):
                run(lm, out, reference.kind)
            raise SimulatedCrash

    with commit_hook(resume_inside), pytest.raises(SimulatedCrash):
        run(lm, out, reference.kind)
    run(lm, out, reference.kind)  # the lock was released with the first writer


def test_half_written_policy_folder_is_redone_not_trusted(lm, references, tmp_path):
    """A steering folder without its config (what a kill inside the old, file-by-file
    save left) is not a finished step: the resume saves it again instead of failing on
    every resume with "not a steering folder"."""
    ref = references["replace"]
    out = tmp_path / "run"
    shutil.copytree(ref.root, out)
    for path in ("iter_0/summary.json", "iter_1", "iter_2", "summary.json", "outcome.json", "final"):
        target = out / path
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    (out / "iter_1" / "steering").mkdir(parents=True)
    (out / "iter_1" / "steering" / "steering.safetensors").write_bytes(b"half")
    run(lm, out, ref.kind)
    assert artefacts(out) == ref.files
