"""Throughput of ``sims serve`` on the embedded model (issue: requests/s and tokens/s for
1, 8 and 32 concurrent clients, steered vs unsteered).

Starts a real ``sims serve`` subprocess on a free loopback port with one steering
(``--steering PATH``, a steering folder or run directory; default: a random CAA-like
AddVector on the middle layers, saved to a temporary folder), waits for ``/health``, then
for 1, 8 and 32 concurrent clients (threads with the ``openai`` client), unsteered and
steered in turn, sends ``--requests-per-client`` greedy chat completions each (fixed
``--max-tokens``, prompts from the built-in prompt set). Prints one row per (clients,
steering): requests, wall seconds, requests/s, completion tokens/s (from ``usage``),
mean and p95 latency, then the steered/unsteered tokens/s and requests/s ratios per
concurrency. The server is always stopped at the end.

Usage: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_serve.py [--quick]
       [--steering PATH] [--requests-per-client 4] [--max-tokens 64] [--port 0] [--json FILE]
       [--engine torch|llamacpp|auto]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

STEERING_NAME = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def random_steering(folder: Path, model: str | None) -> Path:
    """A CAA-like steering (random AddVector, norm ~ 0.3 * sqrt(d)) on the middle layers."""
    import torch

    from simsteer.learners.caa import AddVector
    from simsteer.models import load_model, parse_layers
    from simsteer.steering import Steering

    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    lm = load_model(model, device="cpu")
    torch.manual_seed(0)
    layers = parse_layers("middle", lm.num_layers)
    steering = Steering(
        {i: AddVector(torch.randn(lm.hidden_size) * 0.3) for i in layers}, "caa", lm.fingerprint()
    )
    path = steering.save(folder / STEERING_NAME)
    del lm, steering
    return path


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"sims serve exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"sims serve did not answer /health within {timeout:.0f} s")


def run_level(client, model: str, prompts: list[str], clients: int, per_client: int, args, steering):
    """``clients`` threads each send ``per_client`` requests; returns the measurements."""
    extra = {"steering": steering or "none"}

    def one(i: int) -> tuple[float, int]:
        start = time.perf_counter()
        reply = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompts[i % len(prompts)]}],
            max_tokens=args.max_tokens,
            temperature=0.0,
            extra_body=extra,
        )
        return time.perf_counter() - start, reply.usage.completion_tokens

    def worker(c: int) -> list[tuple[float, int]]:
        return [one(c * per_client + r) for r in range(per_client)]

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = [x for part in pool.map(worker, range(clients)) for x in part]
    wall = time.perf_counter() - start
    latencies = sorted(lat for lat, _ in results)
    tokens = sum(n for _, n in results)
    return {
        "requests": len(results),
        "wall": wall,
        "rps": len(results) / wall,
        "tps": tokens / wall,
        "tokens": tokens,
        "mean": statistics.fmean(latencies),
        "p95": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steering", default=None, help="steering folder or run directory")
    parser.add_argument("--model", default=None, help="as for sims serve (default: embedded model)")
    parser.add_argument("--device", default=None, help="as for sims serve")
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--clients", default="1,8,32", help="concurrency levels (default 1,8,32)")
    parser.add_argument("--port", type=int, default=0, help="server port (0: a free one)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--engine", default="torch", help="as for sims serve: torch, llamacpp or auto")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.requests_per_client, args.max_tokens = "1,4", 1, 8
    levels = [int(c) for c in args.clients.split(",")]

    import openai

    from simsteer import load_prompts

    prompts = [p.text for p in load_prompts()]
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        tmp_dir = Path(tmp)
        steering = args.steering or str(random_steering(tmp_dir, args.model))
        command = [sys.executable, "-m", "simsteer", "serve", "--port", str(port)]
        command += ["--steering", f"{STEERING_NAME}={steering}", "--max-batch", "32"]
        command += ["--served-model-name", "bench", "--engine", args.engine]
        if args.model:
            command += ["--model", args.model]
        if args.device:
            command += ["--device", args.device]
        log = tmp_dir / "serve.log"
        with open(log, "wb") as log_file:
            proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            started = time.perf_counter()
            wait_healthy(proc, url, log)
            print(f"server      sims {' '.join(command[3:])}")
            print(
                f"            healthy after {time.perf_counter() - started:.1f} s; "
                f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
                f"{args.requests_per_client} requests/client, max_tokens {args.max_tokens}, greedy"
            )
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
            for name in (None, STEERING_NAME):  # warm-up: one request each
                run_level(client, "bench", prompts, 1, 1, args, name)
            rows = []
            header = (
                f"{'clients':>7} {'steering':>9} {'requests':>8} {'wall s':>7} {'req/s':>7} "
                f"{'tok/s':>7} {'tokens':>7} {'mean lat s':>10} {'p95 lat s':>9}"
            )
            print(header)
            print("-" * len(header))
            for clients in levels:
                for name in (None, STEERING_NAME):
                    m = run_level(client, "bench", prompts, clients, args.requests_per_client, args, name)
                    rows.append((clients, name, m))
                    print(
                        f"{clients:>7} {'steered' if name else 'none':>9} {m['requests']:>8} "
                        f"{m['wall']:>7.2f} {m['rps']:>7.2f} {m['tps']:>7.1f} {m['tokens']:>7} "
                        f"{m['mean']:>10.2f} {m['p95']:>9.2f}",
                        flush=True,
                    )
            if args.json:
                Path(args.json).write_text(
                    json.dumps([{"clients": c, "steered": n is not None, **m} for c, n, m in rows])
                )
            print()
            print(f"{'clients':>7} {'steered/unsteered tok/s':>24} {'req/s':>7}")
            for clients in levels:
                plain = next(m for c, n, m in rows if c == clients and n is None)
                steered = next(m for c, n, m in rows if c == clients and n is not None)
                print(
                    f"{clients:>7} {steered['tps'] / plain['tps']:>24.3f} "
                    f"{steered['rps'] / plain['rps']:>7.3f}"
                )
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
