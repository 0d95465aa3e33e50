"""The paper's baselines, built through the same code paths as SIMS (arXiv 2507.08967):

- ``vanilla``: the unsteered model, greedy;
- ``ms``: conventional steering from *labelled* pairs (UltraFeedback chosen / rejected):
  the same activation path as the loop
  (:func:`~simsteer.activations.collect_preference_activations`: unsteered model, one
  summary per answer plus whatever the learner needs) and the same learner ``fit``;
- ``random``: the SIMS loop with an oracle that scores at random, so D+ / D- are a
  random split of the policy's own samples (same prompts, K, N, T, learner);
- ``best-of-n``: N samples of the unsteered model per prompt, the oracle keeps the best;
- ``dpo``: a LoRA adapter fine-tuned with DPO on the run's own D+ / D- pairs, the same
  oracle budget (:mod:`.dpo`; needs the extra ``simsteer[baselines]``).

A baseline lives in a folder like a run directory (``config.json`` with a ``baseline``
field, ``eval_prompts.jsonl``, ``final/`` when it has a steering), so ``sims eval`` and
``sims compare`` treat it like a run. :func:`build_baseline` builds one from a run.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..activations import collect_preference_activations
from ..errors import SimsError
from ..generation.sampling import Generation, SamplingConfig
from ..io import read_json, write_json
from ..learners import get_learner
from ..learners.base import Learner
from ..loop.rundir import RunDir
from ..loop.sims import SIMS
from ..loop.spec import ModelSpec, RunSpec, consents
from ..models import LoadedModel, load_model, parse_layers
from ..oracles.base import Oracle, ScoreOracle
from ..prompts import load_prompts
from ..steering import Steering
from ..workers import WorkerPool
from .datasets import PreferencePair, load_pair_set, load_pairs
from .dpo import DPOBaselineConfig, build_dpo_baseline, require_baselines_extra
from .dpo_pairs import run_pairs

BASELINES = ("vanilla", "ms", "random", "best-of-n", "dpo")


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


def check_trusted(
    where: Any, oracle: dict[str, Any] | str, model: ModelSpec | dict[str, Any], trusted: Collection[str]
) -> None:
    """Refuse a saved oracle or model that would run code or send to an endpoint (a
    ``python:`` oracle, ``trust_remote_code``, a judge's URL and API key variable) unless
    ``trusted`` holds its consent flag, which names the target
    (:func:`~simsteer.loop.spec.consents`): a folder's ``config.json`` is only as
    trustworthy as the folder."""
    for _, flag, what in consents(oracle, model):
        if flag not in trusted:
            raise SimsError(
                f"{where}: {what}; a run directory may have been edited by someone else, so that "
                f"happens only when asked: add {flag} to the command (trusted={{{flag!r}}} in Python)"
            )


def fit_labelled_steering(
    lm: LoadedModel,
    learner: Learner,
    pairs: Sequence[PreferencePair],
    summary: str = "mean",
    batch_size: int = 8,
    max_response_tokens: int | None = 128,
    progress: bool | str = False,
) -> tuple[Steering, int]:
    """The MS baseline: fit ``learner`` on labelled chosen / rejected pairs.

    Each pair is one prompt group (chosen in D+, rejected in D-), so a pairing learner
    such as CAA subtracts within pairs exactly as it does within prompts in the loop.
    The activations come from the loop's own path, so every learner works here: HPR
    gets its per-token activations, ITI its heads, ActAdd the model.

    Args:
        summary: the run's per-answer summary (``mean`` or ``last``).
        max_response_tokens: answers are cut to this many tokens (long GPT-4 answers cost
            a lot of CPU time; the summary is a mean, so a prefix still carries the style).
            Per-token activations keep at most the learner's own cap, as in the loop.
        progress: show progress bars (a string is used as their label).

    Returns:
        the steering and the number of tokens that went through the model.

    Example:
        >>> steering, tokens = fit_labelled_steering(lm, get_learner("caa"), pairs)
    """
    if not pairs:
        raise SimsError("MS needs labelled pairs")
    learner.prepare(lm)  # learners that need the model at fit time (ActAdd)
    layers = parse_layers(learner.config.layers, lm.num_layers)
    n = len(pairs)
    token_cap = getattr(learner.config, "max_response_tokens", 32)
    if max_response_tokens is not None:
        token_cap = min(token_cap, max_response_tokens)
    data, tokens = collect_preference_activations(
        lm,
        learner.needs,
        [p.prompt for p in pairs] * 2,
        [p.chosen for p in pairs] + [p.rejected for p in pairs],
        n,
        list(range(n)) * 2,
        layers,
        summary=summary,
        batch_size=batch_size,
        max_response_tokens=token_cap,
        summary_max_tokens=max_response_tokens,
        progress=progress,
    )
    steering = learner.fit(data, lm.fingerprint())
    steering = steering.with_metadata(baseline="ms", pairs=n)
    return steering, tokens


def best_of_n(
    pool: WorkerPool,
    oracle: Oracle,
    prompts: Sequence[str],
    n: int,
    sampling: SamplingConfig,
    policy: Sequence[Steering] = (),
    seed: int = 0,
) -> tuple[list[Generation], int]:
    """For each prompt, N samples and the one the oracle ranks best (highest win rate).

    Args:
        pool: where the samples are drawn and judged (``LocalPool(lm)``: this process).

    Returns:
        the chosen generations and the number of tokens generated in all.
    """
    if n < 1:
        raise SimsError(f"best-of-N needs N >= 1, got {n}")
    gens = pool.generate(list(prompts), n, sampling, list(policy), seed=seed)
    if n == 1:
        return [g[0] for g in gens], sum(g[0].num_tokens for g in gens)
    judged = pool.judge(oracle, list(prompts), [[g.text for g in gs] for gs in gens])
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


def build_baseline(
    kind: str,
    like: Path,
    out: Path,
    *,
    n: int = 4,
    pairs: str | None = None,
    pairs_limit: int = 1000,
    max_response_tokens: int = 128,
    data: str | None = None,
    seed: int = 0,
    progress: bool = True,
    trusted: Collection[str] = (),
    dpo: DPOBaselineConfig | None = None,
) -> Path:
    """Build the baseline ``kind`` that mirrors the run ``like`` into the folder ``out``.

    Args:
        kind: one of :data:`BASELINES`.
        like: the SIMS run whose model, oracle, learner and prompts to use.
        out: the baseline folder (must not hold a run or baseline yet).
        n: best-of-n: samples per prompt.
        pairs: ms: labelled pairs file (default: UltraFeedback train in ``data``).
        pairs_limit: ms: pairs used.
        max_response_tokens: ms: answer tokens used per pair.
        data: ms: data folder holding ``ultrafeedback/`` (default ``$SIMSTEER_DATA``, then
            the Hugging Face hub).
        seed: best-of-n and random: the sampling / scoring seed.
        progress: show progress bars (random: the loop's).
        trusted: the consent flags for what ``like`` names that runs code or sends a key
            (``"--oracle python:..."``, ``"--trust-remote-code"``,
            ``"--judge-api-key-env VAR"``); one it needs and lacks is refused before
            anything is loaded (:func:`check_trusted`), whatever the kind.
        dpo: dpo: the training settings (default :class:`~.dpo.DPOBaselineConfig`).

    Returns:
        ``out``.

    Example:
        >>> build_baseline("ms", Path("runs/sims"), Path("runs/ms"))
    """
    if kind not in BASELINES:
        raise SimsError(f"unknown baseline {kind!r}; baselines: {', '.join(BASELINES)}")
    like, out = Path(like), Path(out)
    if not RunDir(like).is_run():
        raise SimsError(f"{like} is not a run directory (no config.json)")
    spec = RunDir(like).spec()
    check_trusted(like, spec.oracle, spec.model, trusted)
    if kind == "vanilla":
        write_baseline(out, "vanilla", like)
    elif kind == "best-of-n":
        write_baseline(out, "best-of-n", like, {"n": n, "seed": seed})
    elif kind == "dpo":
        _build_dpo(spec, like, out, dpo or DPOBaselineConfig(), progress)
    else:
        options = dict(spec.learner)
        if str(options.get("name", "")).startswith("python:"):  # code a run directory names
            raise SimsError(
                f"{like}: its learner {options['name']} is code the run directory names; the "
                f"{kind} baseline does not import it (build it in Python with that learner)"
            )
        learner = get_learner(options.pop("name"), **options)
        lm = load_model(
            spec.model.source,
            dtype=spec.model.dtype,
            trust_remote_code=spec.model.trust_remote_code,
        )
        if kind == "ms":
            _build_ms(lm, learner, spec, like, out, pairs, pairs_limit, max_response_tokens, data)
        else:
            _build_random(lm, learner, spec, like, out, seed, progress)
    return out


def _build_ms(
    lm: LoadedModel,
    learner: Learner,
    spec: RunSpec,
    like: Path,
    out: Path,
    pairs: str | None,
    pairs_limit: int,
    max_response_tokens: int,
    data: str | None,
) -> None:
    # Refuse before the (long) fit, not after it.
    if RunDir(out).is_run():
        raise SimsError(f"{out} already holds a run or baseline: pick another --out")
    if pairs:
        labelled, pairs_path = load_pairs(pairs, pairs_limit), pairs
    else:
        labelled, pairs_path = load_pair_set("ultrafeedback", data, pairs_limit)
    clock = time.perf_counter()
    steering, tokens = fit_labelled_steering(
        lm, learner, labelled, spec.sims.summary, max_response_tokens=max_response_tokens
    )
    extra = {
        "pairs": str(pairs_path),
        "num_pairs": len(labelled),
        "tokens_forward": tokens,
        "fit_seconds": round(time.perf_counter() - clock, 1),
    }
    write_baseline(out, "ms", like, extra, steering)


def _build_dpo(spec: RunSpec, like: Path, out: Path, config: DPOBaselineConfig, progress: bool) -> None:
    # Refuse before the fit, not after it; the pairs are the run's own judgments.
    require_baselines_extra()
    if RunDir(out).is_run():
        raise SimsError(f"{out} already holds a run or baseline: pick another --out")
    pairs = run_pairs(like, config.max_pairs)
    model = {"source": spec.model.source, "trust_remote_code": spec.model.trust_remote_code}
    write_baseline(out, "dpo", like, build_dpo_baseline(model, pairs, out, config, progress))


def _build_random(
    lm: LoadedModel,
    learner: Learner,
    spec: RunSpec,
    like: Path,
    out: Path,
    seed: int,
    progress: bool,
) -> None:
    # The run's prompt pool (not its drawn prompts.jsonl): the same split must follow.
    sources = spec.prompts
    if not sources:
        raise SimsError(f"{like} was not started by `sims run`: its prompt pool is unknown")
    pool = load_prompts(sources.get("prompts"))
    held_out = load_prompts(sources["eval_prompts_file"]) if sources.get("eval_prompts_file") else None
    contrast = load_prompts(sources["contrast_prompts"]) if sources.get("contrast_prompts") else None
    sims = SIMS(lm, RandomOracle(seed), learner, spec.sims, progress=progress)
    # The whole oracle spec: `sims eval` rebuilds the mirrored run's oracle from it.
    extra = {"baseline": "random", "eval_oracle": spec.oracle, "like": str(like)}
    kept = {key: sources.get(key) for key in ("prompts", "eval_prompts_file")}
    if contrast is not None:
        kept["contrast_prompts"] = sources["contrast_prompts"]
    sims.fit(pool, out, eval_prompts=held_out, prompt_sources=kept, extra=extra, contrast_prompts=contrast)
