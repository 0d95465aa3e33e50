"""Multiple-choice evaluation by log-likelihood (batched forwards, no generation).

Each choice is scored by ``log P(continuation | context)``, the sum over the
continuation's tokens, as lm-evaluation-harness does for ``output_type:
multiple_choice``: whitespace at the end of the context moves to the continuation, the
context and the concatenation are tokenised separately and the continuation's tokens are
what the concatenation has beyond the context's tokens. Metrics per item:

- ``acc``: the choice with the highest log-likelihood is the labelled one;
- ``acc_norm``: the same after dividing each log-likelihood by the choice's length in
  characters (lm-eval's length normalisation);
- ``mc2`` (TruthfulQA): the probability mass of the true answers after normalising
  ``exp(loglik)`` over all answers.

Standard errors are the sample standard deviation over items / sqrt(n) (lm-eval's
``mean`` stderr). Policies are scored on the same items in one call, so steered and
unsteered numbers come with a paired difference and its standard error. Steering is
applied with :meth:`Steering.applied` and ``prompt_end`` set to where each row's
continuation starts, so ``prompt`` / ``generated`` positions mean context / answer here.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..models import LoadedModel
from ..steering import Steering
from ..tokens import ForwardBatch, TokenRow, response_logits, teacher_forced
from .datasets import MCItem


@dataclass(frozen=True)
class LoglikResult:
    """Log-likelihoods of the requests plus what the scoring cost."""

    logliks: list[float]
    forward_tokens: int
    seconds: float


def _encode(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = list(tokenizer(context + continuation)["input_ids"])
    ctx = list(tokenizer(context)["input_ids"])
    return whole[: len(ctx)], whole[len(ctx) :]


def loglikelihoods(
    lm: LoadedModel,
    contexts: Sequence[str],
    continuations: Sequence[str],
    policy: Sequence[Steering] = (),
    batch_size: int = 16,
    max_length: int = 1024,
) -> LoglikResult:
    """``log P(continuation | context)`` for each aligned request.

    Args:
        policy: steerings applied (stacked) during the forward; empty for the base model.
        max_length: rows longer than this lose tokens from the left of the context.

    Example:
        >>> loglikelihoods(lm, ["Question: 2+2?\\nAnswer:"], [" 4"]).logliks
    """
    rows = []
    for ctx, cont in zip(contexts, continuations, strict=True):
        c, r = _encode(lm.tokenizer, ctx, cont)
        ids = (c + r)[-max_length:]
        rows.append(TokenRow(ids, min(len(r), len(ids) - 1)))
    out = [math.nan] * len(rows)
    forward_tokens = 0
    clock = time.perf_counter()

    @contextlib.contextmanager
    def steered(batch: ForwardBatch) -> Iterator[None]:
        # prompt / generated positions mean context / continuation here.
        with contextlib.ExitStack() as stack:
            for steering in policy:
                stack.enter_context(steering.applied(lm.model, prompt_end=batch.response_start))
            yield

    # Right padding keeps every real token at its true position (no position ids).
    with torch.inference_mode():
        for batch in teacher_forced(lm, rows, batch_size, padding="right", hooks=steered):
            forward_tokens += batch.num_tokens
            for row, i in enumerate(batch.index):
                logits, target = response_logits(lm, batch, row)
                logp = torch.log_softmax(logits, dim=-1).gather(1, target.view(-1, 1))
                out[i] = float(logp.sum())
    return LoglikResult(out, forward_tokens, time.perf_counter() - clock)


def item_metrics(item: MCItem, logliks: Sequence[float]) -> dict[str, float]:
    """acc, acc_norm (and mc2 when the item has true choices) for one item."""
    ll = np.asarray(logliks, dtype=np.float64)
    lengths = np.array([max(len(c.strip()), 1) for c in item.continuations], dtype=np.float64)
    metrics = {
        "acc": float(int(np.argmax(ll)) == item.label),
        "acc_norm": float(int(np.argmax(ll / lengths)) == item.label),
    }
    if item.true_choices is not None:
        p = np.exp(ll - ll.max())
        metrics["mc2"] = float(p[np.array(item.true_choices)].sum() / p.sum())
    return metrics


def _metric_names(rows: list[dict[str, float]]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r))


def _mean_se(values: np.ndarray) -> tuple[float, float]:
    n = len(values)
    se = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return float(values.mean()), se


def evaluate_mc(
    lm: LoadedModel,
    items: Sequence[MCItem],
    policies: Mapping[str, Sequence[Steering]],
    batch_size: int = 16,
    reference: str | None = "base",
    reference_rows: list[dict[str, float]] | None = None,
    return_rows: bool = False,
) -> dict[str, dict] | tuple[dict[str, dict], dict[str, list[dict[str, float]]]]:
    """Score ``items`` under every policy; means, standard errors and paired differences.

    Args:
        policies: name -> steering stack (``[]`` for the unsteered model).
        reference: the policy the others are compared with (paired difference and its
            standard error), when present.
        reference_rows: per-item metrics of the reference computed earlier (a cache).
        return_rows: also return the per-item metrics of every policy.

    Returns:
        ``{policy: {"acc": .., "acc_se": .., "acc_norm": .., ..., "n", "choices",
        "forward_tokens", "seconds", "delta_acc": .., "delta_acc_se": ..}}``.
    """
    contexts = [c for it in items for c in it.contexts]
    conts = [c for it in items for c in it.continuations]
    per_item: dict[str, list[dict[str, float]]] = {}
    results: dict[str, dict] = {}
    for name, policy in policies.items():
        res = loglikelihoods(lm, contexts, conts, policy, batch_size=batch_size)
        rows, start = [], 0
        for it in items:
            k = len(it.continuations)
            rows.append(item_metrics(it, res.logliks[start : start + k]))
            start += k
        per_item[name] = rows
        summary: dict[str, float | int] = {
            "n": len(items),
            "choices": len(conts),
            "forward_tokens": res.forward_tokens,
            "seconds": round(res.seconds, 2),
        }
        for metric in _metric_names(rows):
            mean, se = _mean_se(np.array([r[metric] for r in rows if metric in r]))
            summary[metric], summary[f"{metric}_se"] = mean, se
        results[name] = summary
    ref_rows = reference_rows if reference_rows is not None else per_item.get(reference or "")
    if ref_rows is not None:
        for name, rows in per_item.items():
            if name == reference:
                continue
            for metric in _metric_names(rows):
                diff = np.array(
                    [a[metric] - b[metric] for a, b in zip(rows, ref_rows, strict=True) if metric in a]
                )
                mean, se = _mean_se(diff)
                results[name][f"delta_{metric}"], results[name][f"delta_{metric}_se"] = mean, se
    return (results, per_item) if return_rows else results
