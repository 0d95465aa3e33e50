"""Algorithm 1 of SIMS, top to bottom: sample, rank, select, record, learn, repeat.

Each iteration t works on policy pi_t (pi_0 is the unsteered model):

1. eval:    greedy answers of pi_t to the held-out prompts, scored by the oracle;
2. sample:  K responses for each of N new prompts from pi_t;
3. rank:    the oracle's pairwise preferences, win rates, D+ (> 1/2) and D- (< 1/2);
4. collect: activations of D+ and D- under the unsteered model;
5. fit:     the learner's steering functions -> pi_{t+1} (they replace pi_t's, or are
            stacked on top of them with ``compose``).

The last iteration (t = T) only evaluates and samples, so the table has a row for
every policy. Every step's artefact is written atomically into the run directory and a
finished step is never redone on ``resume``.
"""

from __future__ import annotations

import logging
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..activations import collect_activations, collect_extra_activations
from ..errors import SimsError
from ..fluency import fluency_report
from ..io import read_json, read_jsonl, write_json, write_jsonl
from ..learners.base import Learner, PreferenceActivations
from ..models import LoadedModel, parse_layers
from ..oracles.base import Oracle, ScoreOracle
from ..prompts import Prompt
from ..sampling import SamplingConfig, generate
from ..steering import Steering
from .activation_store import load_preference_activations, save_preference_activations
from .config import PromptSplit, SIMSConfig, draw_prompts, split_pool
from .guard import FluencyGuard
from .outcome import run_outcome
from .rundir import RunDir
from .selection import judging_stats, select_samples, training_rows
from .table import TABLE_HEADER, format_row

log = logging.getLogger(__name__)

StepCallback = Callable[[str, int], None]


@dataclass
class SIMSResult:
    """What :meth:`SIMS.fit` returns: the final policy's steering and the summary rows."""

    policy: Steering | list[Steering]
    history: list[dict[str, Any]]
    run_dir: Path


class SIMS:
    """Self-improving model steering.

    Example:
        >>> lm = load_model()
        >>> sims = SIMS(lm, oracle=get_oracle("sentiment"), learner=get_learner("caa"))
        >>> result = sims.fit(load_prompts(), run_dir="runs/demo")
        >>> with result.policy.applied(lm.model):
        ...     ...
    """

    def __init__(
        self,
        model: LoadedModel,
        oracle: Oracle,
        learner: Learner,
        config: SIMSConfig | None = None,
        progress: bool = True,
        callback: StepCallback | None = None,
    ) -> None:
        self.lm = model
        self.oracle = oracle
        self.learner = learner
        self.config = config or SIMSConfig()
        self.progress = progress
        self.callback = callback
        self.layers = parse_layers(learner.config.layers, model.num_layers)
        self.guard = FluencyGuard(model, oracle, self.config.guard, self.config.sampling)

    # -- public ------------------------------------------------------------------
    def fit(
        self,
        prompts: Sequence[Prompt | str],
        run_dir: str | Path,
        eval_prompts: Sequence[Prompt | str] | None = None,
        extra_config: dict[str, Any] | None = None,
    ) -> SIMSResult:
        """Run (or resume) the loop in ``run_dir`` and return the final policy.

        The final policy is the last one, or with the fluency guard on, the best fluent
        one (the loop may stop early; the last summary row says why).

        Args:
            prompts: the prompt pool.
            eval_prompts: held-out prompts; by default ``config.eval_prompts`` are split
                off the pool.
            extra_config: recorded in ``config.json`` (the CLI stores how to rebuild the
                model, oracle and learner for ``--resume``).
        """
        run = RunDir(Path(run_dir))
        split = self._prepare(run, prompts, eval_prompts, extra_config)
        history: list[dict[str, Any]] = []
        if self.progress:
            tqdm.write(TABLE_HEADER)
        for t in range(self.config.iterations + 1):
            history.append(self._iteration(run, t, split))
            if self.progress:
                tqdm.write(format_row(history[-1]))
                if history[-1].get("stop"):
                    tqdm.write(f"stopped: {history[-1]['stop']}")
            if history[-1].get("stop"):
                break
        write_json(run.summary, history)
        best = self.guard.final_index(history)
        write_json(run.outcome, run_outcome(run, history, best))
        stack = self._policy(run, best)
        if run.final.exists():
            shutil.rmtree(run.final)
        for steering in stack:
            steering.metadata = {**steering.metadata, "policy_iteration": best}
        if not stack:  # the unsteered model was best: an empty steering is a no-op
            stack = [
                Steering(
                    {},
                    self.learner.name,
                    self.lm.fingerprint(),
                    metadata={"unsteered": True, "policy_iteration": 0},
                )
            ]
        if self.config.compose:
            for i, steering in enumerate(stack, 1):
                steering.save(run.final / f"step_{i}")
            policy: Steering | list[Steering] = stack
        else:
            policy = stack[-1]
            policy.save(run.final)
        return SIMSResult(policy=policy, history=history, run_dir=run.root)

    def _prepare(
        self,
        run: RunDir,
        prompts: Sequence[Prompt | str],
        eval_prompts: Sequence[Prompt | str] | None,
        extra_config: dict[str, Any] | None,
    ) -> PromptSplit:
        """Split the pool (train / eval / calibration) for a new run, or reload it."""
        if run.is_run():
            return self._check_resume(run)
        pool = [p if isinstance(p, Prompt) else Prompt(str(i), p) for i, p in enumerate(prompts)]
        if not pool:
            raise SimsError("no prompts to learn from")
        if run.root.exists() and any(run.root.iterdir()):
            raise SimsError(f"{run.root} exists and is not an empty run directory")
        if eval_prompts is not None:
            held_out = [
                p if isinstance(p, Prompt) else Prompt(f"eval-{i}", p) for i, p in enumerate(eval_prompts)
            ]
            train = list(pool)
            random.Random(self.config.seed).shuffle(train)
        else:
            train, held_out = split_pool(pool, self.config.eval_prompts, self.config.seed)
        calibration: list[Prompt] = []
        if self.config.guard.enabled:
            n = self.config.guard.calibration_prompts
            if len(train) <= n:
                raise SimsError(
                    f"{len(train)} training prompts leave none after {n} calibration "
                    "prompts: add prompts, lower --calibration-prompts or turn the "
                    "guard off with --fluency-budget off"
                )
            calibration, train = train[:n], train[n:]
        split = PromptSplit(train, held_out, calibration)
        for path, part in (
            (run.prompts, train),
            (run.eval_prompts, held_out),
            (run.calibration_prompts, calibration),
        ):
            write_jsonl(path, [{"id": p.id, "prompt": p.text} for p in part])
        write_json(run.config, self._config_record(extra_config))
        return split

    # -- steps -------------------------------------------------------------------
    def _iteration(self, run: RunDir, t: int, split: PromptSplit) -> dict:
        if run.iteration_summary(t).is_file():
            return read_json(run.iteration_summary(t))
        cfg = self.config
        last = t == cfg.iterations
        policy = self._policy(run, t)
        seconds: dict[str, float] = {}
        row: dict[str, Any] = {
            "iteration": t,
            "policy": f"iter_{t}" if t else "unsteered",
            "strength": policy[-1].strength if policy else 0.0,
        }

        clock = time.perf_counter()
        eval_rows = self._step_eval(run, t, split.eval, policy)
        scores = [r["score"] for r in eval_rows if r.get("score") is not None]
        row["eval_score"] = float(np.mean(scores)) if scores else None
        row["eval_fluency"] = self._fluency(eval_rows)
        seconds["eval"] = time.perf_counter() - clock

        clock = time.perf_counter()
        samples = self._step_sample(run, t, split.train, policy)
        seconds["sample_and_rank"] = time.perf_counter() - clock
        sample_scores = [r["score"] for r in samples if r.get("score") is not None]
        row["sample_score"] = float(np.mean(sample_scores)) if sample_scores else None
        row["sample_fluency"] = self._fluency(samples)
        row["num_prompts"] = len({r["prompt_id"] for r in samples})
        row["num_positive"] = sum(r["label"] == "positive" for r in samples)
        row["num_negative"] = sum(r["label"] == "negative" for r in samples)
        row["tokens_generated"] = sum(r["num_tokens"] for r in samples) + sum(
            r["num_tokens"] for r in eval_rows
        )
        row["mean_response_tokens"] = float(np.mean([r["num_tokens"] for r in samples]))
        row.update(judging_stats(run, t, samples))

        if not last:
            clock = time.perf_counter()
            data, forward_tokens = self._step_collect(run, t, samples)
            seconds["collect"] = time.perf_counter() - clock
            row["tokens_forward"] = forward_tokens
            clock = time.perf_counter()
            row["fit"] = self._step_fit(run, t, data, policy)
            seconds["fit"] = time.perf_counter() - clock
            if cfg.guard.enabled:
                clock = time.perf_counter()
                row["calibration"] = self.guard.calibrate_step(
                    run,
                    t,
                    split.calibration,
                    policy if self.config.compose else [],
                    progress=self._bar(f"iter {t} calibrate"),
                )
                self._notify("calibrate", t)
                seconds["calibrate"] = time.perf_counter() - clock
                row["stop"] = self.guard.stop_reason(run, t, row["calibration"])
        row["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
        row["seconds_total"] = round(sum(seconds.values()), 2)
        write_json(run.iteration_summary(t), row)
        self._notify("summary", t)
        return row

    def _step_eval(self, run: RunDir, t: int, held_out: list[Prompt], policy: list[Steering]) -> list[dict]:
        if not held_out:
            return []
        if run.eval(t).is_file():
            return read_jsonl(run.eval(t))
        greedy = SamplingConfig(
            temperature=0.0,
            max_new_tokens=self.config.sampling.max_new_tokens,
            batch_size=self.config.sampling.batch_size,
        )
        gens = generate(
            self.lm, [p.text for p in held_out], 1, greedy, policy, progress=self._bar(f"iter {t} eval")
        )
        texts = [g[0].text for g in gens]
        scores = (
            self.oracle.score([p.text for p in held_out], texts)
            if isinstance(self.oracle, ScoreOracle)
            else [None] * len(texts)
        )
        rows = [
            {
                "iteration": t,
                "prompt_id": p.id,
                "prompt": p.text,
                "response": g[0].text,
                "num_tokens": g[0].num_tokens,
                "finished": g[0].finished,
                "score": None if s is None else float(s),
            }
            for p, g, s in zip(held_out, gens, scores, strict=True)
        ]
        write_jsonl(run.eval(t), rows)
        self._notify("eval", t)
        return rows

    def _step_sample(self, run: RunDir, t: int, train: list[Prompt], policy: list[Steering]) -> list[dict]:
        if run.samples(t).is_file():
            return read_jsonl(run.samples(t))
        cfg = self.config
        batch = draw_prompts(train, t, cfg.prompts_per_iteration, cfg.seed)
        gens = generate(
            self.lm,
            [p.text for p in batch],
            cfg.samples_per_prompt,
            cfg.sampling,
            policy,
            seed=cfg.seed * 1009 + t,
            progress=self._bar(f"iter {t} sample"),
        )
        judgments = self.oracle.judge([p.text for p in batch], [[g.text for g in gs] for gs in gens])
        # The variant (sims / pr / cs) decides the labels; cs also updates the bank.
        rows = select_samples(cfg, run, t, batch, gens, judgments, self.oracle)
        write_jsonl(run.samples(t), rows)
        self._notify("sample", t)
        return rows

    def _step_collect(
        self, run: RunDir, t: int, samples: list[dict]
    ) -> tuple[PreferenceActivations | None, int]:
        self.learner.prepare(self.lm)  # learners that need the model at fit time (ActAdd)
        kind = self.learner.needs
        if kind == "none":
            log.info("iteration %d: learner %s ignores D+ and D-", t, self.learner.name)
            empty = torch.zeros(0, len(self.layers), self.lm.hidden_size)
            return PreferenceActivations(self.layers, empty, empty, [], [], torch.zeros(len(self.layers))), 0
        path = run.activations(t)
        if path.is_file():
            return load_preference_activations(path)
        chosen = training_rows(run, t, samples)
        pos = [r for r in chosen if r["label"] == "positive"]
        neg = [r for r in chosen if r["label"] == "negative"]
        if not pos or not neg:
            log.warning("iteration %d: no contrast (D+ %d, D- %d); the policy is kept", t, len(pos), len(neg))
            return None, 0
        acts = collect_activations(
            self.lm,
            [r["prompt"] for r in pos + neg],
            [r["response"] for r in pos + neg],
            self.layers,
            summary=self.config.summary,
            batch_size=self.config.activation_batch_size,
            progress=self._bar(f"iter {t} collect"),
        )
        # Per-token / per-head activations, only for learners that ask (HPR, ITI).
        extra = collect_extra_activations(
            self.lm,
            kind,
            [r["prompt"] for r in pos + neg],
            [r["response"] for r in pos + neg],
            self.layers,
            len(pos),
            batch_size=self.config.activation_batch_size,
            max_response_tokens=getattr(self.learner.config, "max_response_tokens", 32),
            progress=self._bar(f"iter {t} collect {kind}"),
        )
        groups = {pid: i for i, pid in enumerate(dict.fromkeys(r["prompt_id"] for r in chosen))}
        data = PreferenceActivations(
            layers=self.layers,
            positive=acts.summaries[: len(pos)],
            negative=acts.summaries[len(pos) :],
            positive_groups=[groups[r["prompt_id"]] for r in pos],
            negative_groups=[groups[r["prompt_id"]] for r in neg],
            token_norms=acts.token_norms,
            **extra,  # type: ignore[arg-type]
        )
        save_preference_activations(path, data, acts.num_tokens)
        self._notify("collect", t)
        return data, acts.num_tokens

    def _step_fit(
        self, run: RunDir, t: int, data: PreferenceActivations | None, policy: list[Steering]
    ) -> dict:
        # With the guard on, the raw fit waits in fitted/ until a strength is chosen.
        target = run.fitted(t) if self.config.guard.enabled else run.steering(t + 1)
        if (target / "steering_config.json").is_file():
            saved = Steering.load(target)
            return {
                "learner": self.learner.name,
                "carried_over": bool(saved.metadata.get("carried_over", False)),
            }
        if data is None:
            if not policy:
                # Nothing learned yet: an empty steering is the unsteered model.
                steering = Steering({}, self.learner.name, self.lm.fingerprint())
            else:
                steering = policy[-1]
            steering.metadata = {**steering.metadata, "carried_over": True}
        else:
            clock = time.perf_counter()
            steering = self.learner.fit(data, self.lm.fingerprint())
            steering.metadata = {
                **steering.metadata,
                "iteration": t + 1,
                "fit_seconds": round(time.perf_counter() - clock, 3),
            }
        steering.save(target)
        self._notify("fit", t)
        return {"learner": self.learner.name, "carried_over": data is None}

    def _fluency(self, rows: list[dict]) -> dict | None:
        if not rows:
            return None
        report = fluency_report(
            self.lm,
            [r["prompt"] for r in rows],
            [r["response"] for r in rows],
            [r["num_tokens"] for r in rows],
        )
        return report.to_dict()

    # -- helpers -----------------------------------------------------------------
    def _policy(self, run: RunDir, t: int) -> list[Steering]:
        """pi_t as a stack of steerings (one element unless composing)."""
        if t == 0:
            return []
        if not self.config.compose:
            return [Steering.load(run.steering(t))]
        return [Steering.load(run.steering(s)) for s in range(1, t + 1)]

    def _check_resume(self, run: RunDir) -> PromptSplit:
        saved = read_json(run.config)
        if SIMSConfig.from_dict(saved.get("sims", {})) != self.config:
            raise SimsError(f"{run.root} was started with other loop settings; resume it with the same ones")

        def read(path: Path) -> list[Prompt]:
            return [Prompt(r["id"], r["prompt"]) for r in read_jsonl(path)] if path.is_file() else []

        return PromptSplit(read(run.prompts), read(run.eval_prompts), read(run.calibration_prompts))

    def _config_record(self, extra: dict[str, Any] | None) -> dict[str, Any]:
        from .._version import __version__

        return {
            "simsteer_version": __version__,
            "model": {
                "source": self.lm.source,
                "fingerprint": self.lm.fingerprint(),
                "dtype": str(self.lm.dtype).replace("torch.", ""),
            },
            "oracle": self.oracle.describe(),
            "learner": {"name": self.learner.name, **self.learner.hyperparameters()},
            "layers": self.layers,
            "sims": self.config.to_dict(),
            **(extra or {}),
        }

    def _bar(self, label: str) -> bool | str:
        return label if self.progress else False

    def _notify(self, step: str, t: int) -> None:
        if self.callback is not None:
            self.callback(step, t)
