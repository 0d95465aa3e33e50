"""What the steps of a SIMS iteration compute, apart from when they run and where their
results are saved (that is :class:`simsteer.loop.sims.SIMS`, the only writer of a run
directory).

Every function here is pure with respect to the run directory: it takes the model, the
oracle, the learner and the loop's settings, and returns records or a steering.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._version import __version__
from ..fluency import fluency_report
from ..learners.base import Learner, PreferenceActivations
from ..models import LoadedModel
from ..oracles.base import Oracle, ScoreOracle
from ..prompts import Prompt
from ..steering import Steering
from ..workers.pool import LocalPool, WorkerPool
from .bank import ResponseBank
from .config import SIMSConfig
from .prompt_sets import draw_prompts
from .records import (
    CalibrationRecord,
    EvalRecord,
    FitRecord,
    FluencyRecord,
    IterationRecord,
    SampleRecord,
)
from .selection import Selection, select_samples
from .spec import ModelSpec, RunSpec


def held_out_answers(
    lm: LoadedModel,
    oracle: Oracle,
    config: SIMSConfig,
    t: int,
    held_out: list[Prompt],
    policy: list[Steering],
    progress: bool | str = False,
    pool: WorkerPool | None = None,
) -> list[EvalRecord]:
    """Policy t's greedy answers to the held-out prompts, scored by a score oracle.

    Args:
        lm: the model.
        oracle: the run's oracle (other oracles leave the scores ``None``).
        config: the loop's settings (``max_new_tokens``, ``batch_size``).
        t: the iteration.
        held_out: the held-out prompts (not empty).
        policy: pi_t as a stack of steerings.
        progress: a progress-bar label, or False.
        pool: where the answers are generated and scored (default: this process).
    """
    pool = pool or LocalPool(lm)
    greedy = config.sampling.as_greedy()
    gens = pool.generate([p.text for p in held_out], 1, greedy, policy, progress=progress)
    texts = [g[0].text for g in gens]
    scores = (
        pool.score(oracle, [p.text for p in held_out], texts)
        if isinstance(oracle, ScoreOracle)
        else [None] * len(texts)
    )
    return [
        EvalRecord(
            iteration=t,
            prompt_id=p.id,
            prompt=p.text,
            response=g[0].text,
            num_tokens=g[0].num_tokens,
            finished=g[0].finished,
            score=None if s is None else float(s),
        )
        for p, g, s in zip(held_out, gens, scores, strict=True)
    ]


def sample_and_select(
    lm: LoadedModel,
    oracle: Oracle,
    config: SIMSConfig,
    t: int,
    train: list[Prompt],
    policy: list[Steering],
    bank: ResponseBank | None = None,
    progress: bool | str = False,
    pool: WorkerPool | None = None,
) -> Selection:
    """Iteration t's batch: K samples per drawn prompt from pi_t, judged and labelled.

    Args:
        lm, oracle, config: the model, the run's oracle and the loop's settings.
        t: the iteration (it picks the batch and the sampling seed).
        train: the training pool.
        policy: pi_t as a stack of steerings.
        bank: ``cs`` only: the response bank before iteration t (re-judged first with
            ``config.bank.rescore``); the returned selection holds the bank after it.
        progress: a progress-bar label, or False.
        pool: where the samples are drawn and judged (default: this process).
    """
    pool = pool or LocalPool(lm)
    batch = draw_prompts(train, t, config.prompts_per_iteration, config.seed)
    gens = pool.generate(
        [p.text for p in batch],
        config.samples_per_prompt,
        config.sampling,
        policy,
        seed=config.seed * 1009 + t,
        progress=progress,
    )
    judgments = pool.judge(oracle, [p.text for p in batch], [[g.text for g in gs] for gs in gens])
    if bank is not None and config.bank.rescore and len(bank):
        bank = bank.rescored(t, oracle)
    # The variant (sims / pr / cs) decides the labels; cs also updates the bank.
    return select_samples(config, t, batch, gens, judgments, bank)


def fit_steering(
    lm: LoadedModel,
    learner: Learner,
    t: int,
    data: PreferenceActivations | None,
    policy: list[Steering],
) -> Steering:
    """The steering learned at iteration t; without contrast (``data`` None) pi_t's last
    steering (an empty one for pi_0), marked ``carried_over``.

    Args:
        lm: the model (its fingerprint goes into the steering).
        learner: the run's learner.
        t: the iteration.
        data: the D+ / D- activations, or None.
        policy: pi_t as a stack of steerings.
    """
    if data is None:
        # Nothing learned yet: an empty steering is the unsteered model.
        steering = policy[-1] if policy else Steering({}, learner.name, lm.fingerprint())
        return steering.with_metadata(carried_over=True)
    clock = time.perf_counter()
    steering = learner.fit(data, lm.fingerprint())
    return steering.with_metadata(iteration=t + 1, fit_seconds=round(time.perf_counter() - clock, 3))


def fluency(lm: LoadedModel, rows: Sequence[SampleRecord] | Sequence[EvalRecord]) -> FluencyRecord | None:
    """The fluency of a step's answers (None for no answers)."""
    if not rows:
        return None
    texts = [r.prompt for r in rows], [r.response for r in rows]
    report = fluency_report(lm, *texts, [r.num_tokens for r in rows])
    return FluencyRecord.from_json(report.to_dict())


def iteration_row(
    t: int,
    policy: list[Steering],
    evals: list[EvalRecord],
    eval_fluency: FluencyRecord | None,
    selection: Selection,
    sample_fluency: FluencyRecord | None,
    tokens_forward: int | None,
    fit: FitRecord | None,
    calibration: CalibrationRecord | None,
    stop: str | None,
    seconds: dict[str, float],
    engine: str | None = None,
) -> IterationRecord:
    """Iteration t's row of the summary table, from what its steps returned."""
    samples = selection.samples
    eval_scores = [r.score for r in evals if r.score is not None]
    sample_scores = [r.score for r in samples if r.score is not None]
    return IterationRecord(
        iteration=t,
        policy=f"iter_{t}" if t else "unsteered",
        strength=policy[-1].strength if policy else 0.0,
        eval_score=float(np.mean(eval_scores)) if eval_scores else None,
        eval_fluency=eval_fluency,
        sample_score=float(np.mean(sample_scores)) if sample_scores else None,
        sample_fluency=sample_fluency,
        num_prompts=len({r.prompt_id for r in samples}),
        num_positive=sum(r.label == "positive" for r in samples),
        num_negative=sum(r.label == "negative" for r in samples),
        tokens_generated=sum(r.num_tokens for r in samples) + sum(r.num_tokens for r in evals),
        mean_response_tokens=float(np.mean([r.num_tokens for r in samples])),
        judging=selection.judging_stats(),
        tokens_forward=tokens_forward,
        fit=fit,
        calibration=calibration,
        stop=stop,
        seconds={k: round(v, 2) for k, v in seconds.items()},
        seconds_total=round(sum(seconds.values()), 2),
        engine=engine,
    )


def run_spec(
    lm: LoadedModel,
    oracle: Oracle,
    learner: Learner,
    layers: list[int],
    config: SIMSConfig,
    prompt_sources: dict[str, Any] | None,
    extra: dict[str, Any] | None,
) -> RunSpec:
    """What ``config.json`` records of a run (see :class:`RunSpec`)."""
    return RunSpec(
        model=ModelSpec.of(lm),
        oracle=oracle.describe(),
        learner=learner.describe(),
        layers=layers,
        sims=config,
        prompts=dict(prompt_sources or {}),
        simsteer_version=__version__,
        extra=dict(extra or {}),
    )
