"""Benchmark of the evaluation code on the embedded model.

Prints multiple-choice scoring throughput (choices/s and tokens/s, unsteered and with a
CAA-style steering on the middle layers) and judge throughput (pairs/s, both orders) for
the built-in scorers and for a model judge of the embedded model's size (its weights
behind ``RewardModelOracle`` with an untrained score head: the timing is what counts,
not the verdicts).

Usage: .venv/bin/python benchmarks/bench_eval.py [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=None)
    parser.add_argument("--items", type=int, default=50, help="items per MC task")
    parser.add_argument("--pairs", type=int, default=200, help="HH-RLHF pairs per scorer judge")
    args = parser.parse_args()

    from simsteer.evaluation.datasets import data_dir, load_mc_task, load_pairs
    from simsteer.evaluation.mc import loglikelihoods
    from simsteer.evaluation.winrate import judge_pairs
    from simsteer.learners.caa import AddVector
    from simsteer.models import cache_dir, load_model, parse_layers
    from simsteer.oracles import RewardModelOracle, get_oracle
    from simsteer.steering import Steering

    torch.set_num_threads(max(1, torch.get_num_threads()))
    lm = load_model(device="cpu")
    print(f"model: embedded SmolLM2-135M-Instruct, {lm.dtype}, {torch.get_num_threads()} threads")
    torch.manual_seed(0)
    layers = parse_layers("middle", lm.num_layers)
    steering = Steering({i: AddVector(torch.randn(lm.hidden_size)) for i in layers}, "caa", lm.fingerprint())
    print("\nmultiple choice (batch 16):")
    print(
        f"{'task':<16} {'policy':<9} {'choices':>7} {'tokens':>7} {'seconds':>8} "
        f"{'choices/s':>10} {'tokens/s':>9}"
    )
    for task in ("arc_easy", "truthfulqa_mc1", "hellaswag"):
        items = load_mc_task(task, args.data, limit=args.items)
        ctx = [c for it in items for c in it.contexts]
        cont = [c for it in items for c in it.continuations]
        for name, policy in (("base", []), ("steered", [steering])):
            res = loglikelihoods(lm, ctx, cont, policy, batch_size=16)
            print(
                f"{task:<16} {name:<9} {len(cont):>7} {res.forward_tokens:>7} {res.seconds:>8.1f} "
                f"{len(cont) / res.seconds:>10.1f} {res.forward_tokens / res.seconds:>9.0f}"
            )

    pairs = load_pairs(data_dir(args.data) / "hh_rlhf" / "harmless-base" / "test.jsonl.gz", args.pairs)
    print("\njudges on HH-RLHF pairs (both orders):")
    print(f"{'judge':<34} {'pairs':>5} {'seconds':>8} {'pairs/s':>8}")
    folder = cache_dir() / "gguf"
    judges = [
        ("sentiment", get_oracle("sentiment"), len(pairs)),
        ("readability", get_oracle("readability"), len(pairs)),
    ]
    model_dirs = [p for p in folder.iterdir() if (p / "config.json").is_file()] if folder.is_dir() else []
    if model_dirs:
        rm = RewardModelOracle(str(model_dirs[0]), device="cpu", batch_size=16, max_length=512)
        judges.append(("135M model judge (timing only)", rm, min(64, len(pairs))))
    for name, oracle, n in judges:
        sub = pairs[:n]
        start = time.perf_counter()
        judge_pairs(oracle, [p.prompt for p in sub], [p.chosen for p in sub], [p.rejected for p in sub])
        sec = time.perf_counter() - start
        print(f"{name:<34} {n:>5} {sec:>8.2f} {n / sec:>8.1f}")


if __name__ == "__main__":
    main()
