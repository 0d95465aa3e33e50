"""Scale-out benchmark (issue 13): one SIMS iteration with no Ray, 1 Ray worker and 2.

The same run (embedded model, fp32, CAA, sentiment oracle, guard off) three times in one
process, in the order no Ray / 1 worker / 2 workers, each in a fresh run directory:

- no Ray: :class:`LocalPool`, torch at the machine's thread count;
- 1 worker: a local Ray with one actor using the same thread count (so the difference is
  Ray itself: shipping prompts, policies and results, and the driver waiting);
- 2 workers: two actors with an equal share of the threads each.

Printed: the iteration's seconds (the summary row's steps, pool start-up left out and
shown on its own), sampling throughput, the ratio to no Ray, each worker's peak resident
memory, and whether the three runs wrote the same samples and steering. Target: 1 worker
within 10% of no Ray.

Usage: .venv/bin/python benchmarks/bench_scale.py [-N 32] [-K 4] [--tokens 64]
(run it alone: other torch processes on the same cores distort every figure).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import tempfile
import time
from pathlib import Path

import torch


def _digest(run: Path) -> str:
    """A hash of what a run sampled and learned: its samples and its steering tensors
    (the tensors, not the files: safetensors writes its metadata in a random order)."""
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for path in sorted(run.rglob("*")):
        if path.is_file() and path.name == "samples.jsonl":
            h.update(path.read_bytes())
        elif path.is_file() and path.suffix == ".safetensors":
            tensors = load_file(path)
            for key in sorted(tensors):
                h.update(f"{path.relative_to(run)}:{key}".encode())
                h.update(tensors[key].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-N", type=int, default=32, help="prompts per iteration")
    parser.add_argument("-K", type=int, default=4, help="samples per prompt")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per answer")
    parser.add_argument("--eval-prompts", type=int, default=16)
    parser.add_argument("--keep", type=Path, default=None, help="keep the three run directories here")
    args = parser.parse_args()

    from simsteer import SIMS, SamplingConfig, SIMSConfig, get_learner, get_oracle, load_prompts
    from simsteer.loop.calibration import GuardConfig
    from simsteer.models import load_model
    from simsteer.workers import LocalPool, RayPool, WorkerSpec

    threads = torch.get_num_threads()
    lm = load_model(device="cpu", dtype="fp32")
    oracle = get_oracle("sentiment")
    prompts = load_prompts()
    config = SIMSConfig(
        iterations=1,
        prompts_per_iteration=args.N,
        samples_per_prompt=args.K,
        eval_prompts=args.eval_prompts,
        sampling=SamplingConfig(max_new_tokens=args.tokens),
        guard=GuardConfig(fluency_budget=None),
    )
    print(f"model {lm.source} (fp32), {threads} torch threads; N={args.N} K={args.K} {args.tokens} tokens")

    def one(label: str, make_pool, root: Path) -> dict:
        start = time.perf_counter()
        pool = make_pool()
        startup = time.perf_counter() - start
        with pool:
            sims = SIMS(lm, oracle, get_learner("caa"), config, progress=False, workers=pool)
            sims.fit(prompts, root / label)
            peaks = [w["peak_rss_bytes"] for w in pool.worker_info()] if hasattr(pool, "worker_info") else []
        row = json.loads((root / label / "summary.json").read_text())[0]
        seconds = row["seconds"]
        sampled = sum(
            r["num_tokens"] for r in map(json.loads, (root / label / "iter_0" / "samples.jsonl").open())
        )
        return {
            "label": label,
            "startup": startup,
            "iteration": sum(seconds.values()),
            "sample": seconds["sample_and_rank"],
            "tokens_per_s": sampled / seconds["sample_and_rank"],
            "peaks": peaks,
            "digest": _digest(root / label),
        }

    # Warm-up: the first forward passes of a process are slower (allocator, kernels).
    from simsteer.generation.sampling import generate

    generate(lm, [p.text for p in prompts[:4]], 2, SamplingConfig(max_new_tokens=8))
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        results = [
            one("no Ray", lambda: LocalPool(lm), root),
            one("1 worker", lambda: RayPool(WorkerSpec.of(lm, oracle, threads=threads), workers=1), root),
            one(
                "2 workers",
                lambda: RayPool(WorkerSpec.of(lm, oracle, threads=max(1, threads // 2)), workers=2),
                root,
            ),
        ]
    base = results[0]["iteration"]
    head = f"{'':10} {'start s':>8} {'iter s':>8} {'x no Ray':>9} {'sample s':>9} {'tok/s':>7}"
    print(head + "  peak RSS per worker")
    for r in results:
        peaks = ", ".join(f"{p / 2**30:.2f} GB" for p in r["peaks"]) or "-"
        print(
            f"{r['label']:10} {r['startup']:8.1f} {r['iteration']:8.1f} {r['iteration'] / base:9.2f} "
            f"{r['sample']:9.1f} {r['tokens_per_s']:7.1f}  {peaks}"
        )
    driver = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"driver peak RSS {driver / 2**30:.2f} GB")
    same = len({r["digest"] for r in results}) == 1
    print(f"same samples and steering in all three: {'yes' if same else 'NO'} ({results[0]['digest']})")
    one_worker = results[1]["iteration"] / base
    verdict = "met" if one_worker <= 1.10 else "MISSED"
    print(f"Ray overhead at 1 worker: x{one_worker:.2f} (target <= x1.10: {verdict})")


if __name__ == "__main__":
    main()
