"""The paper's baselines, built through the same code paths as SIMS (SIMS.md):

- ``vanilla``: the unsteered model, greedy;
- ``ms``: conventional steering from *labelled* pairs (UltraFeedback chosen / rejected):
  the same activation collection (:func:`~simsteer.activations.collect_activations`,
  unsteered model, one summary per answer) and the same learner ``fit`` as the loop;
- ``random``: the SIMS loop with an oracle that scores at random, so D+ / D- are a
  random split of the policy's own samples (same prompts, K, N, T, learner);
- ``best-of-n``: N samples of the unsteered model per prompt, the oracle keeps the best.

A baseline lives in a folder like a run directory (``config.json`` with a ``baseline``
field, ``eval_prompts.jsonl``, ``final/`` when it has a steering), so ``sims eval`` and
``sims compare`` treat it like a run.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..activations import collect_activations
from ..errors import SimsError
from ..io import read_json, write_json
from ..learners.base import Learner, PreferenceActivations
from ..loop.rundir import RunDir
from ..models import LoadedModel, parse_layers
from ..oracles.base import Oracle, ScoreOracle
from ..sampling import Generation, SamplingConfig, generate
from ..steering import Steering
from .datasets import PreferencePair

BASELINES = ("vanilla", "ms", "random", "best-of-n")


class RandomOracle(ScoreOracle):
    """Uniform random scores, fixed per (prompt, response, seed): a random D+ / D- split.

    The score is a hash of the texts, so a resumed run sees the same scores.
    """

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        super().__init__(temperature=1.0)
        self.seed = seed

    def score(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        out = []
        for p, r in zip(prompts, responses, strict=True):
            digest = hashlib.sha256(f"{self.seed}\x00{p}\x00{r}".encode()).digest()
            out.append(int.from_bytes(digest[:8], "little") / 2**64)
        return np.asarray(out, dtype=np.float64)

    def describe(self) -> dict:
        return {"name": self.name, "seed": self.seed}


def fit_labelled_steering(
    lm: LoadedModel,
    learner: Learner,
    pairs: Sequence[PreferencePair],
    summary: str = "mean",
    batch_size: int = 8,
    max_response_tokens: int | None = 128,
) -> tuple[Steering, int]:
    """The MS baseline: fit ``learner`` on labelled chosen / rejected pairs.

    Each pair is one prompt group (chosen in D+, rejected in D-), so a pairing learner
    such as CAA subtracts within pairs exactly as it does within prompts in the loop.

    Args:
        max_response_tokens: answers are cut to this many tokens (long GPT-4 answers cost
            a lot of CPU time; the summary is a mean, so a prefix still carries the style).

    Returns:
        the steering and the number of tokens that went through the model.
    """
    if not pairs:
        raise SimsError("MS needs labelled pairs")
    layers = parse_layers(learner.config.layers, lm.num_layers)
    prompts = [p.prompt for p in pairs] * 2
    answers = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    acts = collect_activations(
        lm,
        prompts,
        answers,
        layers,
        summary=summary,
        batch_size=batch_size,
        max_response_tokens=max_response_tokens,
    )
    n = len(pairs)
    data = PreferenceActivations(
        layers=layers,
        positive=acts.summaries[:n],
        negative=acts.summaries[n:],
        positive_groups=list(range(n)),
        negative_groups=list(range(n)),
        token_norms=acts.token_norms,
    )
    steering = learner.fit(data, lm.fingerprint())
    steering.metadata = {**steering.metadata, "baseline": "ms", "pairs": n}
    return steering, acts.num_tokens


def best_of_n(
    lm: LoadedModel,
    oracle: Oracle,
    prompts: Sequence[str],
    n: int,
    sampling: SamplingConfig,
    policy: Sequence[Steering] = (),
    seed: int = 0,
) -> tuple[list[Generation], int]:
    """For each prompt, N samples and the one the oracle ranks best (highest win rate).

    Returns:
        the chosen generations and the number of tokens generated in all.
    """
    if n < 1:
        raise SimsError(f"best-of-N needs N >= 1, got {n}")
    gens = generate(lm, list(prompts), n, sampling, list(policy), seed=seed)
    if n == 1:
        return [g[0] for g in gens], sum(g[0].num_tokens for g in gens)
    judged = oracle.judge(list(prompts), [[g.text for g in gs] for gs in gens])
    chosen = [gs[int(np.argmax(j.win_rates))] for gs, j in zip(gens, judged, strict=True)]
    return chosen, sum(g.num_tokens for gs in gens for g in gs)


def write_baseline(
    out: Path, kind: str, like: Path, extra: dict[str, Any] | None = None, steering: Steering | None = None
) -> None:
    """Write a baseline folder that mirrors the run ``like`` (its model, oracle, learner
    and held-out prompts)."""
    if kind not in BASELINES:
        raise SimsError(f"unknown baseline {kind!r}; baselines: {', '.join(BASELINES)}")
    src = RunDir(like)
    if not src.is_run():
        raise SimsError(f"{like} is not a run directory (no config.json)")
    if RunDir(out).is_run():
        raise SimsError(f"{out} already holds a run or baseline: pick another --out")
    cfg = read_json(src.config)
    record = {
        "baseline": kind,
        "like": str(like),
        "model": cfg["model"],
        "oracle": cfg["oracle"],
        "learner": cfg["learner"],
        "layers": cfg.get("layers"),
        "sims": cfg["sims"],
        **(extra or {}),
    }
    out.mkdir(parents=True, exist_ok=True)
    if src.eval_prompts.is_file():
        shutil.copyfile(src.eval_prompts, RunDir(out).eval_prompts)
    if steering is not None:
        steering.save(RunDir(out).final)
    write_json(RunDir(out).config, record)  # last: the folder counts as done once it exists
