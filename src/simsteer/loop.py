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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .activations import SUMMARIES, collect_activations
from .errors import SimsError
from .io import atomic_write_bytes, read_json, read_jsonl, write_json, write_jsonl
from .learners.base import Learner, PreferenceActivations
from .models import LoadedModel, parse_layers
from .oracles.base import Oracle, ScoreOracle
from .prompts import Prompt
from .rundir import RunDir
from .sampling import SamplingConfig, generate
from .steering import Steering

log = logging.getLogger(__name__)

StepCallback = Callable[[str, int], None]


@dataclass(frozen=True)
class SIMSConfig:
    """The loop's settings (the paper's T, N, K and how samples are drawn).

    Attributes:
        iterations: T, the number of learning iterations (>= 1).
        prompts_per_iteration: N, new prompts drawn each iteration without replacement
            while the pool lasts (then the pool is reshuffled).
        samples_per_prompt: K responses per prompt (>= 2).
        eval_prompts: held-out prompts answered greedily by every policy (0 = none).
        sampling: temperature, top-k, top-p, max_new_tokens and batch size.
        summary: activation summary per response, ``mean`` over tokens or ``last``.
        activation_batch_size: sequences per forward when collecting activations.
        compose: stack each iteration's functions on the previous policy instead of
            replacing them (the paper replaces).
        seed: the run's seed (prompt order and sampling).
    """

    iterations: int = 3
    prompts_per_iteration: int = 16
    samples_per_prompt: int = 4
    eval_prompts: int = 16
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    summary: str = "mean"
    activation_batch_size: int = 16
    compose: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise SimsError(f"iterations (T) must be >= 1, got {self.iterations}")
        if self.prompts_per_iteration < 1:
            raise SimsError(f"prompts per iteration (N) must be >= 1, got {self.prompts_per_iteration}")
        if self.samples_per_prompt < 2:
            raise SimsError(
                f"samples per prompt (K) must be >= 2 to compare responses, got {self.samples_per_prompt}"
            )
        if self.eval_prompts < 0:
            raise SimsError(f"eval prompts must be >= 0, got {self.eval_prompts}")
        if self.summary not in SUMMARIES:
            raise SimsError(f"unknown activation summary {self.summary!r}: use {', '.join(SUMMARIES)}")
        if self.activation_batch_size < 1:
            raise SimsError("activation batch size must be >= 1")
        if self.sampling.greedy:
            raise SimsError("SIMS needs K distinct samples: use a temperature > 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SIMSConfig:
        data = dict(data)
        data["sampling"] = SamplingConfig(**data.get("sampling", {}))
        return cls(**data)


@dataclass
class SIMSResult:
    """What :meth:`SIMS.fit` returns: the final policy's steering and the summary rows."""

    policy: Steering | list[Steering]
    history: list[dict[str, Any]]
    run_dir: Path


def split_pool(prompts: Sequence[Prompt], n_eval: int, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """Shuffle once with the seed; the first ``n_eval`` prompts are held out."""
    order = list(prompts)
    random.Random(seed).shuffle(order)
    if n_eval and len(order) <= n_eval:
        raise SimsError(
            f"{len(order)} prompts leave none for training after {n_eval} held-out ones: "
            "add prompts or lower --eval-prompts"
        )
    return order[n_eval:], order[:n_eval]


def draw_prompts(pool: list[Prompt], t: int, n: int, seed: int) -> list[Prompt]:
    """Iteration t's N prompts: consecutive slices of the pool, reshuffled per pass."""
    out: list[Prompt] = []
    position = t * n
    while len(out) < n:
        epoch, offset = divmod(position, len(pool))
        order = list(pool)
        if epoch:
            random.Random(seed * 7919 + epoch).shuffle(order)
        take = order[offset : offset + n - len(out)]
        out.extend(take)
        position += len(take)
    return out


def label_by_win_rate(win_rate: float) -> str:
    """D+ above one half, D- below, ties dropped (SIMS.md)."""
    if win_rate > 0.5:
        return "positive"
    if win_rate < 0.5:
        return "negative"
    return "tie"


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

    # -- public ------------------------------------------------------------------
    def fit(
        self,
        prompts: Sequence[Prompt | str],
        run_dir: str | Path,
        eval_prompts: Sequence[Prompt | str] | None = None,
        extra_config: dict[str, Any] | None = None,
    ) -> SIMSResult:
        """Run (or resume) the loop in ``run_dir`` and return the final policy.

        Args:
            prompts: the prompt pool.
            eval_prompts: held-out prompts; by default ``config.eval_prompts`` are split
                off the pool.
            extra_config: recorded in ``config.json`` (the CLI stores how to rebuild the
                model, oracle and learner for ``--resume``).
        """
        run = RunDir(Path(run_dir))
        pool = [p if isinstance(p, Prompt) else Prompt(str(i), p) for i, p in enumerate(prompts)]
        if not pool:
            raise SimsError("no prompts to learn from")
        if run.is_run():
            train, held_out = self._check_resume(run)
        else:
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
            write_jsonl(run.prompts, [{"id": p.id, "prompt": p.text} for p in train])
            write_jsonl(run.eval_prompts, [{"id": p.id, "prompt": p.text} for p in held_out])
            write_json(run.config, self._config_record(extra_config))
        history = []
        if self.progress:
            tqdm.write(TABLE_HEADER)
        for t in range(self.config.iterations + 1):
            history.append(self._iteration(run, t, train, held_out))
            if self.progress:
                tqdm.write(format_row(history[-1]))
        write_json(run.summary, history)
        stack = self._policy(run, self.config.iterations)
        if run.final.exists():
            shutil.rmtree(run.final)
        if self.config.compose:
            for i, steering in enumerate(stack, 1):
                steering.save(run.final / f"step_{i}")
            policy: Steering | list[Steering] = stack
        else:
            policy = stack[-1]
            policy.save(run.final)
        return SIMSResult(policy=policy, history=history, run_dir=run.root)

    # -- steps -------------------------------------------------------------------
    def _iteration(self, run: RunDir, t: int, train: list[Prompt], held_out: list[Prompt]) -> dict:
        if run.iteration_summary(t).is_file():
            return read_json(run.iteration_summary(t))
        cfg = self.config
        last = t == cfg.iterations
        policy = self._policy(run, t)
        seconds: dict[str, float] = {}
        row: dict[str, Any] = {"iteration": t, "policy": f"iter_{t}" if t else "unsteered"}

        clock = time.perf_counter()
        eval_rows = self._step_eval(run, t, held_out, policy)
        seconds["eval"] = time.perf_counter() - clock
        scores = [r["score"] for r in eval_rows if r.get("score") is not None]
        row["eval_score"] = float(np.mean(scores)) if scores else None

        clock = time.perf_counter()
        samples = self._step_sample(run, t, train, policy)
        seconds["sample_and_rank"] = time.perf_counter() - clock
        sample_scores = [r["score"] for r in samples if r.get("score") is not None]
        row["sample_score"] = float(np.mean(sample_scores)) if sample_scores else None
        row["num_prompts"] = len({r["prompt_id"] for r in samples})
        row["num_positive"] = sum(r["label"] == "positive" for r in samples)
        row["num_negative"] = sum(r["label"] == "negative" for r in samples)
        row["tokens_generated"] = sum(r["num_tokens"] for r in samples) + sum(
            r["num_tokens"] for r in eval_rows
        )
        row["mean_response_tokens"] = float(np.mean([r["num_tokens"] for r in samples]))

        if not last:
            clock = time.perf_counter()
            data, forward_tokens = self._step_collect(run, t, samples)
            seconds["collect"] = time.perf_counter() - clock
            row["tokens_forward"] = forward_tokens
            clock = time.perf_counter()
            row["fit"] = self._step_fit(run, t, data, policy)
            seconds["fit"] = time.perf_counter() - clock
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
        rows = []
        for p, gs, j in zip(batch, gens, judgments, strict=True):
            wins = j.win_rates
            for k, g in enumerate(gs):
                rows.append(
                    {
                        "iteration": t,
                        "prompt_id": p.id,
                        "prompt": p.text,
                        "sample": k,
                        "response": g.text,
                        "num_tokens": g.num_tokens,
                        "finished": g.finished,
                        "score": None if j.scores is None else float(j.scores[k]),
                        "win_rate": float(wins[k]),
                        "label": label_by_win_rate(float(wins[k])),
                    }
                )
        write_jsonl(run.samples(t), rows)
        self._notify("sample", t)
        return rows

    def _step_collect(
        self, run: RunDir, t: int, samples: list[dict]
    ) -> tuple[PreferenceActivations | None, int]:
        path = run.activations(t)
        if path.is_file():
            return _load_activations(path)
        chosen = [r for r in samples if r["label"] in ("positive", "negative")]
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
        groups = {pid: i for i, pid in enumerate(dict.fromkeys(r["prompt_id"] for r in chosen))}
        data = PreferenceActivations(
            layers=self.layers,
            positive=acts.summaries[: len(pos)],
            negative=acts.summaries[len(pos) :],
            positive_groups=[groups[r["prompt_id"]] for r in pos],
            negative_groups=[groups[r["prompt_id"]] for r in neg],
            token_norms=acts.token_norms,
        )
        _save_activations(path, data, acts.num_tokens)
        self._notify("collect", t)
        return data, acts.num_tokens

    def _step_fit(
        self, run: RunDir, t: int, data: PreferenceActivations | None, policy: list[Steering]
    ) -> dict:
        target = run.steering(t + 1)
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

    # -- helpers -----------------------------------------------------------------
    def _policy(self, run: RunDir, t: int) -> list[Steering]:
        """pi_t as a stack of steerings (one element unless composing)."""
        if t == 0:
            return []
        if not self.config.compose:
            return [Steering.load(run.steering(t))]
        return [Steering.load(run.steering(s)) for s in range(1, t + 1)]

    def _check_resume(self, run: RunDir) -> tuple[list[Prompt], list[Prompt]]:
        saved = read_json(run.config)
        if saved.get("sims") != self.config.to_dict():
            raise SimsError(f"{run.root} was started with other loop settings; resume it with the same ones")
        train = [Prompt(r["id"], r["prompt"]) for r in read_jsonl(run.prompts)]
        held = [Prompt(r["id"], r["prompt"]) for r in read_jsonl(run.eval_prompts)]
        return train, held

    def _config_record(self, extra: dict[str, Any] | None) -> dict[str, Any]:
        from . import __version__

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


def _save_activations(path: Path, data: PreferenceActivations, num_tokens: int) -> None:
    tensors = {
        "positive": data.positive.contiguous(),
        "negative": data.negative.contiguous(),
        "positive_groups": torch.tensor(data.positive_groups, dtype=torch.long),
        "negative_groups": torch.tensor(data.negative_groups, dtype=torch.long),
        "token_norms": data.token_norms.contiguous(),
        "layers": torch.tensor(data.layers, dtype=torch.long),
        "num_tokens": torch.tensor([num_tokens], dtype=torch.long),
    }
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp))
    atomic_write_bytes(path, tmp.read_bytes())
    tmp.unlink(missing_ok=True)


def _load_activations(path: Path) -> tuple[PreferenceActivations, int]:
    t = load_file(str(path))
    data = PreferenceActivations(
        layers=t["layers"].tolist(),
        positive=t["positive"],
        negative=t["negative"],
        positive_groups=t["positive_groups"].tolist(),
        negative_groups=t["negative_groups"].tolist(),
        token_norms=t["token_norms"],
    )
    return data, int(t["num_tokens"][0])


def _fmt(value: float | None) -> str:
    return "   -  " if value is None else f"{value:+.3f}"


TABLE_HEADER = "iter  sample_score  eval_score  |D+|  |D-|  tokens  seconds"


def format_row(row: dict) -> str:
    return (
        f"{row['iteration']:>4}  {_fmt(row.get('sample_score')):>12}  "
        f"{_fmt(row.get('eval_score')):>10}  {row.get('num_positive', 0):>4}  "
        f"{row.get('num_negative', 0):>4}  {row.get('tokens_generated', 0):>6}  "
        f"{row.get('seconds_total', 0):>7.1f}"
    )


def format_table(history: list[dict]) -> str:
    return "\n".join([TABLE_HEADER, *(format_row(r) for r in history)])
