"""Which sampled answers a SIMS update learns from: the one function the variants swap.

- ``sims`` (Algorithm 1): every answer with win rate > 1/2 goes to D+, < 1/2 to D-;
- ``pr`` (prompt ranking): per prompt, the top-ranked answer to D+ and the bottom-ranked
  to D- (made for ranking oracles such as ``self-rank``; works with any oracle);
- ``cs`` (contrast sampling): every judged prompt joins the response bank
  (:mod:`simsteer.loop.bank`); the update trains on the bank's top-N entries by contrast
  reward, best answer to D+, worst to D-, older iterations included.

A prompt the oracle could not judge (``Judgment.parsed`` false) is labelled ``skipped``
under every variant and counted in the iteration's ``ranking_parse_rate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SimsError
from ..io import read_jsonl, write_jsonl
from ..oracles.base import Judgment, Oracle
from ..prompts import Prompt
from ..sampling import Generation
from .bank import BankEntry, ResponseBank, contrast_reward
from .config import SIMSConfig, label_by_win_rate
from .rundir import RunDir

VARIANTS = ("sims", "pr", "cs")


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise SimsError(f"unknown SIMS variant {variant!r}: use one of {', '.join(VARIANTS)}")
    return variant


def bank_path(run: RunDir) -> Path:
    return run.root / "bank.jsonl"


def pairs_path(run: RunDir, t: int) -> Path:
    return run.iteration(t) / "train_pairs.jsonl"


def select_samples(
    config: SIMSConfig,
    run: RunDir,
    t: int,
    prompts: list[Prompt],
    gens: list[list[Generation]],
    judgments: list[Judgment],
    oracle: Oracle | None = None,
) -> list[dict[str, Any]]:
    """Label iteration t's samples (and, for ``cs``, update the bank and pick its pairs).

    Args:
        prompts, gens, judgments: aligned per prompt, as drawn and judged by the loop.
        oracle: needed only to re-score the bank (``BankConfig.rescore``).

    Returns:
        one row per sample; ``label`` is positive, negative, tie, unused or skipped.
    """
    rows = []
    for p, gs, j in zip(prompts, gens, judgments, strict=True):
        wins = j.win_rates
        labels = _labels(config.variant, j)
        for k, g in enumerate(gs):
            row = {
                "iteration": t,
                "prompt_id": p.id,
                "prompt": p.text,
                "sample": k,
                "response": g.text,
                "num_tokens": g.num_tokens,
                "finished": g.finished,
                "score": None if j.scores is None else float(j.scores[k]),
                "win_rate": float(wins[k]),
                "label": labels[k],
                "judged": j.parsed,
            }
            if k == 0 and j.info:
                row["judge_info"] = j.info
            rows.append(row)
    if config.variant == "cs":
        _select_from_bank(config, run, t, prompts, gens, judgments, rows, oracle)
    return rows


def training_rows(run: RunDir, t: int, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The D+ / D- rows of iteration t: the bank's pairs for ``cs``, else labelled samples."""
    path = pairs_path(run, t)
    if path.is_file():
        return read_jsonl(path)
    return [r for r in samples if r["label"] in ("positive", "negative")]


def judging_stats(run: RunDir, t: int, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Summary-row entries: share of prompts judged, judge traffic, bank size."""
    per_prompt = {r["prompt_id"]: r for r in samples if r["sample"] == 0}
    stats: dict[str, Any] = {}
    if per_prompt:
        judged = sum(bool(r.get("judged", True)) for r in per_prompt.values())
        stats["ranking_parse_rate"] = judged / len(per_prompt)
    infos = [r.get("judge_info") or {} for r in per_prompt.values()]
    for key in ("requests", "cache_hits", "parse_failures"):
        if any(key in i for i in infos):
            stats[f"judge_{key}"] = int(sum(i.get(key, 0) for i in infos))
    path = pairs_path(run, t)
    if path.is_file():
        stats["train_pairs"] = len(read_jsonl(path)) // 2
        stats["bank_size"] = len(ResponseBank(bank_path(run)))
    return stats


def _labels(variant: str, judgment: Judgment) -> list[str]:
    k = judgment.preference.shape[0]
    if not judgment.parsed:
        return ["skipped"] * k
    wins = judgment.win_rates
    if variant == "sims":
        return [label_by_win_rate(float(w)) for w in wins]
    labels = ["unused"] * k
    # pr: top and bottom only, and only when each is unique (a tie is no ranking);
    # cs: the bank picks the pairs later.
    unique = np.sum(wins == wins.max()) == 1 and np.sum(wins == wins.min()) == 1
    if variant == "pr" and unique:
        labels[int(np.argmax(wins))] = "positive"
        labels[int(np.argmin(wins))] = "negative"
    return labels


def _select_from_bank(
    config: SIMSConfig,
    run: RunDir,
    t: int,
    prompts: list[Prompt],
    gens: list[list[Generation]],
    judgments: list[Judgment],
    rows: list[dict[str, Any]],
    oracle: Oracle | None,
) -> None:
    bank = ResponseBank(bank_path(run), config.bank)
    if config.bank.rescore and oracle is not None and len(bank):
        old = [e for e in bank.entries if e.iteration != t]
        fresh = oracle.judge([e.prompt for e in old], [e.responses for e in old]) if old else []
        rescored = {
            (e.iteration, e.prompt_id): _entry(e.iteration, e.prompt_id, e.prompt, e.responses, j)
            for e, j in zip(old, fresh, strict=True)
            if j.parsed
        }
        bank.replace_all([rescored.get((e.iteration, e.prompt_id), e) for e in bank.entries])
    bank.add(
        [
            _entry(t, p.id, p.text, [g.text for g in gs], j)
            for p, gs, j in zip(prompts, gens, judgments, strict=True)
            if j.parsed
        ]
    )
    chosen = bank.top(config.bank.top or config.prompts_per_iteration)
    pairs = []
    for e in chosen:
        for label, k in (("positive", e.best), ("negative", e.worst)):
            pairs.append(
                {
                    "iteration": e.iteration,
                    "prompt_id": e.prompt_id,
                    "prompt": e.prompt,
                    "sample": k,
                    "response": e.responses[k],
                    "label": label,
                    "reward": e.reward,
                }
            )
            if e.iteration == t:  # mark this iteration's own samples that were picked
                for row in rows:
                    if row["prompt_id"] == e.prompt_id and row["sample"] == k:
                        row["label"] = label
    write_jsonl(pairs_path(run, t), pairs)


def _entry(t: int, prompt_id: str, prompt: str, responses: list[str], j: Judgment) -> BankEntry:
    return BankEntry(
        iteration=t,
        prompt_id=prompt_id,
        prompt=prompt,
        responses=responses,
        preference=np.asarray(j.preference, dtype=float).round(6).tolist(),
        reward=round(contrast_reward(j.preference), 6),
    )
