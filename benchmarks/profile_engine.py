"""Where the generation engine's time goes: a torch.profiler breakdown of one run.

Runs the default loop's sampling shape (16 prompts x K=4, 48 new tokens, temperature 0.8,
top-k 50, batch 64) on the embedded model with a CAA steering, under ``torch.profiler``,
and prints:

- the split of wall time between prefill forwards, decode steps and the engine's own
  bookkeeping (admission, copying prompt caches into rows);
- inside the forwards, the share of each kind of operator (by self time): matrix
  multiplications of the linear layers, attention, normalisation and other elementwise
  kernels, rotary embeddings, key/value cache writes and copies, the rest;
- the steering hooks' share and token choice (sampling)'s share;
- framework overhead: wall time not spent inside any operator (Python, module calls,
  hooks' own Python, the dispatcher);
- padding waste: idle rows computed by decode steps and cache columns attended to that
  belong to no live token.

Usage: .venv/bin/python benchmarks/profile_engine.py [--dtype fp32] [--prompts 16]
       [--tokens 48] [--batch 64] [--no-steering] [--top 12]
Run it alone: two torch processes on 2 cores slow each other several times.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

# Operator name -> category (self time). Matched on the aten name without "aten::".
MATMUL = {"mm", "addmm", "bmm", "matmul", "linear", "_mkldnn_linear", "mkldnn_linear", "baddbmm"}
ATTENTION_PREFIX = ("_scaled_dot_product", "scaled_dot_product", "_flash_attention", "_efficient_attention")
NORM = {"pow", "mean", "rsqrt", "sum", "var", "var_mean", "layer_norm", "native_layer_norm"}
ACTIVATION = {"silu", "gelu", "gelu_tanh", "tanh", "mul", "add", "add_", "mul_", "div", "sub"}
ROTARY = {"neg", "cat", "cos", "sin", "slice_copy"}
CACHE = {"copy_", "index_put_", "index_select", "clone", "contiguous", "fill_", "zero_", "zeros"}


def _category(name: str) -> str:
    op = name.removeprefix("aten::")
    if op in MATMUL:
        return "linear-layer matmuls"
    if op.startswith(ATTENTION_PREFIX) or op in {"softmax", "_softmax"}:
        return "attention kernels"
    if op in NORM:
        return "RMSNorm reductions"
    if op in ACTIVATION:
        return "elementwise (norm scale, residual, SiLU gate)"
    if op in ROTARY:
        return "rotary embeddings / concatenation"
    if op in CACHE:
        return "key/value cache writes and copies"
    if op in {"where", "eq", "ne", "lt", "ge", "gt", "le", "bitwise_and", "bitwise_or", "logical_and"}:
        return "masks and comparisons"
    return "other operators"


def _wrap(owner, name: str, label: str) -> None:
    """Wrap ``owner.name`` in a profiler region ``label``."""
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        with record_function(label):
            return original(*args, **kwargs)

    setattr(owner, name, wrapped)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="fp32", help="fp32, bf16 or auto (default fp32)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--no-steering", action="store_true")
    parser.add_argument("--top", type=int, default=12, help="operators listed by self time")
    args = parser.parse_args()

    from bench_engine import _steering

    import simsteer.generation.torch_engine as engine_module
    import simsteer.hooks as hooks_module
    from simsteer.generation.decoding import stream_id
    from simsteer.generation.torch_engine import DecodeSettings, Engine, Job
    from simsteer.models import load_model
    from simsteer.prompts import load_prompts
    from simsteer.tokens import encode_prompt, eos_token_ids

    lm = load_model(device="cpu", dtype=args.dtype)
    prompts = [p.text for p in load_prompts()][: args.prompts]
    enc = [encode_prompt(lm.tokenizer, p) for p in prompts]
    jobs = [Job(i, s, stream_id(0, i, s)) for i in range(len(prompts)) for s in range(args.samples)]
    settings = DecodeSettings(0.8, 50, 1.0, args.tokens, args.batch)
    eos = eos_token_ids(lm.model, lm.tokenizer)
    pad = lm.tokenizer.pad_token_id
    policy = None if args.no_steering else _steering(lm)

    _wrap(engine_module, "choose_tokens", "sampling")
    _wrap(engine_module.Engine, "_step", "decode step")
    _wrap(engine_module.Engine, "_admit", "admission (prefill + row copies)")
    _wrap(engine_module.Engine, "_forward", "forward")
    _wrap(hooks_module, "_masked_edit", "steering edit")
    _wrap(hooks_module.PositionTracker, "pre_hook", "steering position mask")

    generated = [0]

    def done(job, tokens):
        generated[0] += len(tokens)

    def run() -> object:
        with contextlib.ExitStack() as stack, torch.inference_mode():
            if policy is not None:
                stack.enter_context(policy.applied(lm.model))
            return Engine(lm.model, eos, pad).run(enc, jobs, settings, done)

    run()  # warm-up (allocator, first-call paths)
    generated[0] = 0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        stats = run()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    regions = {e.key: e.cpu_time_total / 1e6 for e in events if not e.key.startswith("aten::")}
    ops = [e for e in events if e.key.startswith("aten::")]
    op_seconds = sum(e.self_cpu_time_total for e in ops) / 1e6
    by_category: dict[str, float] = defaultdict(float)
    for e in ops:
        by_category[_category(e.key)] += e.self_cpu_time_total / 1e6

    def pct(x: float) -> str:
        return f"{100 * x / wall:5.1f}%"

    print(
        f"engine profile: {lm.dtype}, {torch.get_num_threads()} threads, {len(prompts)} prompts x "
        f"{args.samples} samples, {args.tokens} new tokens, batch {args.batch}, "
        f"{'no steering' if policy is None else 'CAA steering'}"
    )
    print(f"  wall {wall:.2f} s (under the profiler), {generated[0]} tokens, {generated[0] / wall:.1f} tok/s")
    print("phases (inclusive)")
    for key in ("admission (prefill + row copies)", "decode step", "forward", "sampling"):
        print(f"  {key:<44} {regions.get(key, 0.0):7.2f} s {pct(regions.get(key, 0.0))}")
    steer_s = regions.get("steering edit", 0.0) + regions.get("steering position mask", 0.0)
    print(f"  {'steering hooks (edits + position masks)':<44} {steer_s:7.2f} s {pct(steer_s)}")
    print("operators (self time)")
    for name, seconds in sorted(by_category.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<44} {seconds:7.2f} s {pct(seconds)}")
    overhead = wall - op_seconds
    print(f"  {'framework overhead (no operator running)':<44} {overhead:7.2f} s {pct(overhead)}")
    print(f"top {args.top} operators by self time")
    for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[: args.top]:
        seconds = e.self_cpu_time_total / 1e6
        print(f"  {e.key:<44} {seconds:7.2f} s {pct(seconds)} ({e.count} calls)")
    idle = 1 - stats.live_row_steps / max(stats.row_steps, 1)
    print("padding waste")
    print(
        f"  idle rows {100 * idle:.1f}% of decode row-steps; {stats.steps} decode steps, "
        f"{stats.prefills} prefills ({stats.prompt_tokens} prompt tokens), "
        f"max {stats.max_columns} cache columns, max {stats.max_rows} rows"
    )


if __name__ == "__main__":
    main()
