"""Several seeds' evaluations of one method pooled into one row: mean and 95% interval
across seeds *and* prompts (a two-level bootstrap, :func:`simsteer.stats.seeds_and_prompts_ci`).

Each input is what ``sims eval`` writes (``eval.json``, with its per-prompt values); every
seed must have answered the same held-out prompts. Per method:

- the oracle's score of the greedy answers, and its change over the unsteered model's
  answers to the same prompts (significant when the interval excludes 0);
- the change of an attribute the loop never trained on (default readability);
- perplexity under the unsteered model as a ratio over the unsteered answers' (exp of the
  mean per-prompt log ratio);
- cost: tokens generated and forward tokens to produce the method, and its seconds
  (means over seeds);
- answer-time cost: tokens generated and oracle calls per held-out prompt to answer it
  (best-of-N samples N answers and asks the oracle N times; a steering or an adapter
  answers once with no oracle).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import SimsError
from ..stats import seeds_and_prompts_ci


def _per_prompt(result: dict, key: str, side: str) -> np.ndarray:
    per = result.get("per_prompt")
    if not per:
        raise SimsError(
            f"{result.get('run', '?')}: eval.json has no per-prompt values (evaluate it again with sims eval)"
        )
    values = per["perplexity"][side] if key == "perplexity" else per["scores"][key][side]
    return np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)


def _summary(table: np.ndarray) -> dict[str, float]:
    """Mean and interval of a (seeds x prompts) table."""
    low, high = seeds_and_prompts_ci(table)
    return {"mean": float(np.nanmean(table)), "ci_low": low, "ci_high": high}


def pooled_row(results: list[dict[str, Any]], attribute: str = "readability") -> dict[str, Any]:
    """One method's figures pooled over its seeds.

    Args:
        results: one ``eval.json`` per seed, all on the same held-out prompts.
        attribute: a scorer ``sims eval`` reported that the loop did not train on.
    """
    if not results:
        raise SimsError("no evaluations to pool")
    oracle = results[0]["oracle"]
    prompts = results[0]["answers"]["prompts"]
    for r in results[1:]:
        if r["answers"]["prompts"] != prompts:
            raise SimsError(
                f"{r.get('run', '?')} answered other held-out prompts than {results[0].get('run', '?')}"
            )

    def table(key: str, side: str) -> np.ndarray:
        return np.stack([_per_prompt(r, key, side) for r in results])

    log_ppl = np.log(table("perplexity", "policy")) - np.log(table("perplexity", "base"))
    ppl = _summary(log_ppl)
    costs = [r["training_costs"] for r in results]
    # An unsteered policy's answers are the base answers (generated once).
    answering = [r.get("costs", {}) for r in results]
    answering = [c.get("generate_policy") or c.get("generate_base") or {} for c in answering]
    per_prompt = len(prompts) or 1
    return {
        "seeds": len(results),
        "prompts": len(prompts),
        "oracle": oracle,
        "score": _summary(table(oracle, "policy")),
        "delta": _summary(table(oracle, "policy") - table(oracle, "base")),
        "attribute": attribute,
        "attribute_delta": _summary(table(attribute, "policy") - table(attribute, "base")),
        "perplexity_ratio": {k: math.exp(v) for k, v in ppl.items()},
        "tokens_generated": float(np.mean([c.get("tokens_generated", 0) for c in costs])),
        "tokens_forward": float(np.mean([c.get("tokens_forward", 0) for c in costs])),
        "seconds": float(np.mean([c.get("seconds", 0) for c in costs])),
        "answer_tokens": float(np.mean([a.get("generated_tokens", 0) for a in answering])) / per_prompt,
        "answer_oracle_calls": float(np.mean([a.get("judge_calls", 0) for a in answering])) / per_prompt,
    }


def _ci(d: dict[str, float], spec: str = "+.3f", change: bool = True) -> str:
    """``mean [low, high]``; a change whose interval excludes 0 is marked ``*``."""
    mark = " *" if change and (d["ci_low"] > 0 or d["ci_high"] < 0) else ""
    return f"{d['mean']:{spec}} [{d['ci_low']:{spec}}, {d['ci_high']:{spec}}]{mark}"


def pooled_table(rows: dict[str, dict[str, Any]]) -> str:
    """A markdown table of :func:`pooled_row` rows keyed by method name."""
    first = next(iter(rows.values()))
    lines = [
        f"| method | {first['oracle']} score | change over unsteered | {first['attribute']} change "
        "| perplexity ratio | tokens generated | forward tokens | seconds "
        "| answer tokens / prompt | answer oracle calls / prompt |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        p = r["perplexity_ratio"]
        lines.append(
            f"| {name} | {_ci(r['score'], '.3f', change=False)} | {_ci(r['delta'])} "
            f"| {_ci(r['attribute_delta'])} | x{p['mean']:.2f} [{p['ci_low']:.2f}, {p['ci_high']:.2f}] "
            f"| {r['tokens_generated']:,.0f} | {r['tokens_forward']:,.0f} | {r['seconds']:,.0f} "
            f"| {r.get('answer_tokens', 0):.1f} | {r.get('answer_oracle_calls', 0):.1f} |"
        )
    seeds = {r["seeds"] for r in rows.values()}
    prompts = {r["prompts"] for r in rows.values()}
    lines.append("")
    lines.append(
        f"Means over {'/'.join(map(str, sorted(seeds)))} seeds x {'/'.join(map(str, sorted(prompts)))} "
        "held-out prompts; [95% interval over seeds and prompts]; * = the interval excludes 0. "
        "Tokens, forward tokens and seconds: what producing the method cost (means over seeds); "
        "answer columns: what answering one held-out prompt costs."
    )
    return "\n".join(lines)
