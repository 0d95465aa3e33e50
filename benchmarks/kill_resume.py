"""Kill -9 at random times, resume, compare: crash safety of a real `sims run`.

One uninterrupted reference run of `sims run` on the embedded model (small settings:
T=2, N=4, K=2, 16 new tokens, guard on with 2 calibration prompts), then N trials: each
starts the same run in a fresh directory, sends SIGKILL at a random moment (up to
--kills times), resumes with `sims run --resume` (or starts again when the kill came
before the run directory was committed) until a process finishes, and compares every
file of the run directory with the reference: JSON without the timing fields,
safetensors tensors bit for bit, other files byte for byte, no temporaries left.

Prints PASS/FAIL per trial (with the kill times) and a summary; exit status 1 on a FAIL.

Usage: .venv/bin/python benchmarks/kill_resume.py [--trials 10] [--kills 2] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors import safe_open

TIMING = ("seconds", "seconds_total", "fit_seconds")
SETTINGS = [
    "-T", "2", "-N", "4", "-K", "2", "--max-new-tokens", "16", "--eval-prompts", "2",
    "--calibration-prompts", "2", "--seed", "0", "--quiet",
]  # fmt: skip


def sims(*args: str) -> list[str]:
    return [sys.executable, "-m", "simsteer", *args]


def start(out: Path, model: list[str]) -> subprocess.Popen:
    """A fresh run, or the resume of one whose config.json was committed."""
    if (out / "config.json").is_file():
        cmd = sims("run", "--resume", str(out), "--quiet")
    else:
        cmd = sims("run", "--out", str(out), *model, *SETTINGS)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def artefacts(root: Path) -> dict[str, object]:
    """Every file of a run directory (the lock aside), comparable across runs."""
    out: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_dir() or rel == ".sims.lock":
            continue
        if path.suffix == ".json":
            out[rel] = _drop_timing(json.loads(path.read_text()))
        elif path.suffix == ".jsonl":
            out[rel] = [_drop_timing(json.loads(x)) for x in path.read_text().splitlines()]
        elif path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as fh:
                tensors = {k: fh.get_tensor(k).numpy().tobytes() for k in fh.keys()}  # noqa: SIM118
                out[rel] = (fh.metadata(), tensors)
        else:
            out[rel] = path.read_bytes()
    return out


def _drop_timing(data):
    if isinstance(data, dict):
        return {k: _drop_timing(v) for k, v in data.items() if k not in TIMING}
    if isinstance(data, list):
        return [_drop_timing(v) for v in data]
    return data


def differences(a: dict[str, object], b: dict[str, object]) -> list[str]:
    names = sorted(set(a) | set(b))
    return [n for n in names if a.get(n, "<missing>") != b.get(n, "<missing>")]


def trial(
    out: Path, rng: random.Random, kills: int, window: float, model: list[str]
) -> tuple[list[str], int]:
    """Run to completion with up to ``kills`` SIGKILLs; returns (events, processes).

    The first kill lands anywhere in a whole run's lifetime (``window``: the reference
    run's seconds); later ones in the shrinking remainder, so they may come too late.
    """
    events, processes = [], 0
    for attempt in range(kills + 20):  # bounded: a run that never finishes fails
        proc = start(out, model)
        processes += 1
        at = rng.uniform(0.02 * window, 0.98 * window) / (attempt + 1) if attempt < kills else None
        try:
            proc.wait(timeout=at)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            events.append(f"kill@{at:.1f}s")
            continue
        if proc.returncode != 0:
            raise RuntimeError(f"sims exited {proc.returncode}: {proc.stderr.read()[-500:]}")
        events.append("done")
        return events, processes
    raise RuntimeError("the run did not finish")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--kills", type=int, default=2, help="SIGKILLs per trial (each at a random time)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument("--keep", help="keep the run directories in this folder")
    parser.add_argument("--model", help="another model than the embedded one (a quick check)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    clock = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        model = ["--model", args.model] if args.model else []
        # A first load dequantises the embedded model and fills its cache: not part of a run.
        warm = f"from simsteer.models import load_model; load_model({args.model!r}, device='cpu')"
        subprocess.run([sys.executable, "-c", warm], capture_output=True, check=True)
        begin = time.perf_counter()
        reference = sims("run", "--out", str(work / "reference"), *model, *SETTINGS)
        ref = subprocess.run(reference, capture_output=True, text=True)
        if ref.returncode != 0:
            print(ref.stderr[-2000:], file=sys.stderr)
            return 1
        window = time.perf_counter() - begin  # kills land anywhere in a run's lifetime
        expected = artefacts(work / "reference")
        print(f"reference run: {window:.1f} s, {len(expected)} files")
        passed = killed = 0
        for i in range(args.trials):
            out = work / f"trial_{i}"
            try:
                events, processes = trial(out, rng, args.kills, window, model)
                killed += sum(e.startswith("kill") for e in events)
                diff = differences(artefacts(out), expected)
                leftovers = [p.name for p in out.rglob(".*") if p.name.endswith((".tmp", ".old"))]
            except RuntimeError as exc:
                events, processes, diff, leftovers = [str(exc)], 0, ["(unfinished)"], []
            ok = not diff and not leftovers
            passed += ok
            detail = "" if ok else f"  differs: {diff[:5]} leftovers: {leftovers[:5]}"
            print(
                f"trial {i}: {'PASS' if ok else 'FAIL'}  {' '.join(events)} ({processes} processes){detail}"
            )
        print(f"{passed}/{args.trials} PASS ({killed} kills) in {time.perf_counter() - clock:.0f} s")
    return 0 if passed == args.trials else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
