"""Kill -9 at random times, resume, compare: crash safety of a real `sims run`, of the
`sims eval` that writes its reports into the run, and of the first model conversion.

First the embedded model's first load (the GGUF file dequantised into an empty cache) is
killed up to --kills times and started again until it finishes; the cache must then equal
an uninterrupted conversion's file for file, with no `.convert-*` folder left. Then one
uninterrupted reference run of `sims run` on the embedded model (small settings: T=2, N=4,
K=2, 16 new tokens, guard on with 2 calibration prompts) and its `sims eval`, then N
trials: each starts the same run in a fresh directory, sends SIGKILL at a random moment
(up to --kills times), resumes with `sims run --resume` (or starts again when the kill
came before the run directory was committed) until a process finishes, then evaluates it
with `sims eval` the same way (killed up to --kills times, started again), and compares
every file of the run directory with the reference: JSON without the timing fields (and
with the run's own path replaced), safetensors tensors bit for bit, the report without its
seconds, other files byte for byte, no temporaries left.

Prints PASS/FAIL per trial (with the kill times) and a summary; exit status 1 on a FAIL.

Usage: .venv/bin/python benchmarks/kill_resume.py [--trials 10] [--kills 2] [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from safetensors import safe_open

TIMING = ("seconds", "seconds_total", "fit_seconds")
SETTINGS = [
    "-T", "2", "-N", "4", "-K", "2", "--max-new-tokens", "16", "--eval-prompts", "2",
    "--calibration-prompts", "2", "--seed", "0", "--quiet",
]  # fmt: skip


EVAL = ["--bootstrap", "50"]


def sims(*args: str) -> list[str]:
    return [sys.executable, "-m", "simsteer", *args]


def run_command(out: Path, model: list[str]) -> list[str]:
    """A fresh run, or the resume of one whose config.json was committed."""
    if (out / "config.json").is_file():
        return sims("run", "--resume", str(out), "--quiet")
    return sims("run", "--out", str(out), *model, *SETTINGS)


def artefacts(root: Path) -> dict[str, object]:
    """Every file of a run directory (the lock aside), comparable across runs."""
    out: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_dir() or rel == ".sims.lock":
            continue
        if path.suffix == ".json":
            out[rel] = _drop_timing(json.loads(path.read_text().replace(str(root), "RUN")))
        elif path.suffix == ".jsonl":
            out[rel] = [_drop_timing(json.loads(x)) for x in path.read_text().splitlines()]
        elif path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as fh:
                tensors = {k: fh.get_tensor(k).numpy().tobytes() for k in fh.keys()}  # noqa: SIM118
                out[rel] = (fh.metadata(), tensors)
        elif path.suffix == ".md":  # the report: seconds and the run's path vary
            text = path.read_text().replace(str(root), "RUN")
            text = re.sub(r"\| [0-9.]+ \|$", "| - |", text, flags=re.M)
            out[rel] = re.sub(r"[0-9]+ s\.", "N s.", text)
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


def killed_until_done(
    command: Callable[[], list[str]], rng: random.Random, kills: int, window: float, env: dict[str, str]
) -> list[str]:
    """Run ``command()`` to completion with up to ``kills`` SIGKILLs; returns the events.

    The first kill lands anywhere in the command's lifetime (``window``: the reference's
    seconds); later ones in the shrinking remainder, so they may come too late.
    """
    events = []
    for attempt in range(kills + 20):  # bounded: a command that never finishes fails
        proc = subprocess.Popen(
            command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
        )
        at = rng.uniform(0.02 * window, 0.98 * window) / (attempt + 1) if attempt < kills else None
        try:
            proc.wait(timeout=at)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            events.append(f"kill@{at:.1f}s")
            continue
        if proc.returncode != 0:
            raise RuntimeError(f"exit status {proc.returncode}: {proc.stderr.read()[-500:]}")
        events.append("done")
        return events
    raise RuntimeError("the command did not finish")


def timed(command: list[str], env: dict[str, str]) -> float:
    """Seconds an uninterrupted ``command`` takes (it must succeed)."""
    begin = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command[3:5])} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - begin


def cache_files(cache: Path) -> dict[str, str]:
    """SHA-256 of every file of a conversion cache (its lock aside)."""
    return {
        str(p.relative_to(cache)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(cache.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def conversion_trial(work: Path, rng: random.Random, kills: int, model: str | None) -> tuple[bool, Path]:
    """The first load into an empty cache, killed and started again, against an
    uninterrupted one; returns (passed, the reference cache for the runs)."""
    load = [
        sys.executable,
        "-c",
        f"from simsteer.models import load_model; load_model({model!r}, device='cpu')",
    ]
    reference = work / "cache-reference"
    window = timed(load, {**os.environ, "SIMSTEER_CACHE": str(reference)})
    killed = work / "cache-killed"
    env = {**os.environ, "SIMSTEER_CACHE": str(killed)}
    try:
        events = killed_until_done(lambda: load, rng, kills, window, env)
        diff = sorted(set(cache_files(killed).items()) ^ set(cache_files(reference).items()))
        leftovers = [p.name for p in killed.rglob(".convert-*")]
    except RuntimeError as exc:
        events, diff, leftovers = [str(exc)], ["(unfinished)"], []
    ok = not diff and not leftovers
    detail = "" if ok else f"  differs: {diff[:4]} leftovers: {leftovers[:4]}"
    print(f"conversion: {'PASS' if ok else 'FAIL'}  {' '.join(events)} (reference {window:.1f} s){detail}")
    return ok, reference


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--kills", type=int, default=2, help="SIGKILLs per command (each at a random time)")
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
        converted, cache = conversion_trial(work, rng, args.kills, args.model)
        env = {**os.environ, "SIMSTEER_CACHE": str(cache)}  # converted: not part of a run
        ref_run = work / "reference"
        window = timed(run_command(ref_run, model), env)  # kills land anywhere in a run's lifetime
        eval_window = timed(sims("eval", str(ref_run), *EVAL), env)
        expected = artefacts(ref_run)
        print(f"reference run: {window:.1f} s, sims eval: {eval_window:.1f} s, {len(expected)} files")
        passed = killed = 0
        for i in range(args.trials):
            out = work / f"trial_{i}"
            try:
                start = lambda out=out: run_command(out, model)  # noqa: E731
                evaluate = lambda out=out: sims("eval", str(out), *EVAL)  # noqa: E731
                events = killed_until_done(start, rng, args.kills, window, env)
                events += ["| eval", *killed_until_done(evaluate, rng, args.kills, eval_window, env)]
                killed += sum(e.startswith("kill") for e in events)
                diff = differences(artefacts(out), expected)
                leftovers = [p.name for p in out.rglob(".*") if p.name.endswith((".tmp", ".old"))]
            except RuntimeError as exc:
                events, diff, leftovers = [str(exc)], ["(unfinished)"], []
            ok = not diff and not leftovers
            passed += ok
            detail = "" if ok else f"  differs: {diff[:5]} leftovers: {leftovers[:5]}"
            print(f"trial {i}: {'PASS' if ok else 'FAIL'}  {' '.join(events)}{detail}", flush=True)
        print(
            f"{passed}/{args.trials} PASS ({killed} kills), conversion {'PASS' if converted else 'FAIL'}, "
            f"in {time.perf_counter() - clock:.0f} s"
        )
    return 0 if passed == args.trials and converted else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
