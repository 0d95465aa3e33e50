"""Steered-vs-unsteered sampling throughput, shared by the benchmarks.

Both runs do identical work: the same left-padded batch, ``min_new_tokens ==
max_new_tokens`` (so every row generates the same number of tokens whatever the steering
does to end-of-sequence), top-k sampling. Runs alternate in ABBA order (plain, steered,
steered, plain, ...) so slow drift of the machine hits both sides alike; the ratio is the
median of the per-pair ratios. On the shared 2-core CPU single pairs vary by about +-10%,
so the time spent inside the steering edits is also measured: it is stable from run to run
(it leaves out the hook dispatch around the edits, which all learners share).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Throughput:
    tokens: int  # generated tokens per run
    plain_seconds: list[float]
    steered_seconds: list[float]
    hook_seconds: float  # inside the steering edits, summed over all steered runs

    @property
    def plain_tps(self) -> float:
        return self.tokens / statistics.median(self.plain_seconds)

    @property
    def steered_tps(self) -> float:
        return self.tokens / statistics.median(self.steered_seconds)

    @property
    def pair_ratios(self) -> list[float]:
        """Unsteered / steered seconds of each ABBA pair (1.0 = no slowdown)."""
        return [p / s for p, s in zip(self.plain_seconds, self.steered_seconds, strict=True)]

    @property
    def ratio(self) -> float:
        return statistics.median(self.pair_ratios)

    @property
    def hook_share(self) -> float:
        """Share of the steered runs' time spent inside the edits."""
        return self.hook_seconds / sum(self.steered_seconds)

    def describe(self) -> str:
        spread = self.pair_ratios
        return (
            f"{self.ratio:.3f} (pairs {min(spread):.3f}-{max(spread):.3f}; "
            f"time inside the edits {100 * self.hook_share:.1f}%)"
        )


@contextlib.contextmanager
def timed_edits(steering_objects: list) -> Iterator[list[float]]:
    """Wrap every steering function's ``edit`` to add its wall time to the yielded list."""
    total = [0.0]
    patched = []
    for steering in steering_objects:
        for function in steering.functions.values():
            original = function.edit

            def edit(hidden: torch.Tensor, strength: float, _original=original) -> torch.Tensor:
                start = time.perf_counter()
                out = _original(hidden, strength)
                total[0] += time.perf_counter() - start
                return out

            function.edit = edit
            patched.append(function)
    try:
        yield total
    finally:
        for function in patched:
            del function.edit  # back to the class method


def measure(
    lm,
    policy: list,
    prompts: list[str],
    batch: int,
    new_tokens: int,
    repeats: int,
) -> Throughput:
    """Time ``repeats`` ABBA pairs of unsteered and steered sampling on one batch.

    Args:
        policy: Steering objects applied together (a loaded policy, or one Steering).
    """
    from simsteer.tokens import encode_prompt, left_pad

    ids, mask = left_pad([encode_prompt(lm.tokenizer, p) for p in prompts[:batch]], lm.tokenizer.pad_token_id)
    gen = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=True,
        top_k=50,
        temperature=0.8,
        pad_token_id=lm.tokenizer.pad_token_id,
    )

    def run(steered: bool) -> float:
        start = time.perf_counter()
        with torch.inference_mode(), contextlib.ExitStack() as stack:
            if steered:
                for steering in policy:
                    stack.enter_context(steering.applied(lm.model))
            lm.model.generate(input_ids=ids, attention_mask=mask, **gen)
        return time.perf_counter() - start

    run(False)  # warm-up
    plain, steered = [], []
    with timed_edits(policy) as hook_seconds:
        for i in range(repeats):
            order = (False, True) if i % 2 == 0 else (True, False)
            for flag in order:
                (steered if flag else plain).append(run(flag))
    return Throughput(ids.shape[0] * new_tokens, plain, steered, hook_seconds[0])
