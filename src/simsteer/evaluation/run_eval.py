"""``sims eval RUN``: did steering help, how much, at what cost, is it significant?

For a run directory (or a baseline folder, see :mod:`.baselines`) this answers the
held-out prompts with the unsteered model and with the run's policy, then measures:

- every built-in attribute scorer on both answer sets (mean, bootstrap CI, paired delta);
- fluency under the *unsteered* model (perplexity, repetition, distinct-2, loops, mean
  length: :func:`~simsteer.fluency.fluency_report`);
- win rate and LC win rate of the policy's answers against the base model's own answers,
  judged in both orders by the run's oracle and by any ``judges`` (pick one the loop did
  not train on);
- optionally, AlpacaEval win rates against the gpt4_1106_preview reference answers and
  multiple-choice accuracy (steered and unsteered in the same pass);
- costs per stage (generated tokens, forward tokens, judge calls, seconds).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar

import numpy as np

from ..errors import SimsError
from ..fluency import fluency_report, perplexities
from ..generation.sampling import SamplingConfig
from ..io import read_json, read_jsonl
from ..loop.records import IterationRecord
from ..loop.rundir import RunDir
from ..models import LoadedModel, load_model
from ..oracles import get_oracle
from ..oracles.attributes import attribute_oracle
from ..oracles.base import finite_scores
from ..oracles.llm_judge import JUDGE_WAITS
from ..policy import load_policy
from ..schema import NonNegativeInt, Rule, UndefinedFloat, check
from ..stats import bootstrap_ci
from ..steering import Steering
from ..workers import LocalPool, WorkerPool, open_pool
from .baselines import best_of_n, check_trusted
from .costs import CostMeter, saved_bytes
from .datasets import load_alpaca_reference, load_mc_task
from .dpo import dpo_mc, load_dpo_model
from .lc import length_controlled_win_rate
from .mc import evaluate_mc
from .winrate import judge_pairs, win_rate

SCORERS = ("sentiment", "negativity", "readability", "length:50")


@dataclass(frozen=True)
class EvalConfig:
    """What ``sims eval`` measures.

    Attributes:
        judges: extra judges (oracle names) for win rates, beside the run's oracle.
        scorers: attribute scorers reported on every answer set.
        mc_tasks: multiple-choice tasks (see :data:`~.datasets.MC_TASKS`).
        mc_limit: items per task (a seeded random subset; ``None`` = all).
        alpaca: AlpacaEval instructions answered and judged against the reference (0 = off).
        prompts: held-out prompt file overriding the run's ``eval_prompts.jsonl``.
        limit: answer only the first N held-out prompts (``None``: all).
        max_new_tokens: answer length cap (default: the run's).
        data: the evaluation data folder (``--data-dir``; ``None``: ``$SIMSTEER_DATA``, then
            the Hugging Face hub).
        bootstrap_rounds: resamples for every interval.
        samples_shown: prompts shown side by side in the report.
        judge_options: :class:`~simsteer.oracles.JudgeConfig` fields for the LLM judges of
            ``judges`` (timeout, retries, key variable, ...); of these, only how long to
            wait and how much at once (:data:`~simsteer.oracles.llm_judge.JUDGE_WAITS`)
            also apply to a judge the run names.
    """

    judges: tuple[str, ...] = ()
    scorers: tuple[str, ...] = SCORERS
    mc_tasks: tuple[str, ...] = ()
    mc_limit: int | None = 200
    alpaca: int = 0
    prompts: str | None = None
    limit: int | None = None
    max_new_tokens: int | None = None
    data: str | None = None
    batch_size: int = 16
    bootstrap_rounds: int = 1000
    samples_shown: int = 4
    seed: int = 0
    judge_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mc_limit is not None and self.mc_limit < 1:
            raise SimsError(f"--mc-limit must be >= 1, got {self.mc_limit}")
        if self.alpaca < 0:
            raise SimsError(f"--alpaca must be >= 0, got {self.alpaca}")
        if self.limit is not None and self.limit < 1:
            raise SimsError(f"--limit must be >= 1, got {self.limit}")


@dataclass(frozen=True)
class BaselineSettings:
    """What a baseline folder's ``config.json`` records beside the mirrored run's settings
    (:func:`~.baselines.write_baseline`); checked by :func:`read_run`."""

    schema_open: ClassVar[bool] = True  # the run's own settings are there too

    baseline: str = "sims"
    like: str = ""
    n: Annotated[int, Rule(low=1)] = 1
    seed: int = 0
    tokens_forward: NonNegativeInt = 0
    fit_seconds: Annotated[float, Rule(low=0.0)] = 0.0
    eval_oracle: dict[str, Any] | str | None = None


@dataclass(frozen=True)
class RunInfo:
    """What a run or baseline folder says about itself (``config``: its ``config.json``,
    checked against :class:`~simsteer.loop.spec.RunSpec` and :class:`BaselineSettings`)."""

    path: Path
    kind: str  # "sims" or a baseline name
    config: dict[str, Any]
    policy: list[Steering]
    history: list[IterationRecord]

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(**self.config["sims"]["sampling"])


@dataclass(frozen=True)
class MeanCI:
    """A mean with its 95% bootstrap interval."""

    mean: float
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class ScoreComparison:
    """A scorer's mean on the unsteered model's answers, the policy's, and their paired delta."""

    base: MeanCI
    policy: MeanCI
    delta: MeanCI


@dataclass(frozen=True)
class EvalResult:
    """What ``sims eval`` measures of a run or baseline folder (``eval.json``).

    Attributes:
        run, kind, model, oracle, learner: what was evaluated (``kind``: ``sims`` or a
            baseline's name; ``oracle``: the one its win rates are judged by).
        steered: whether the folder's policy steers (a run that kept the unsteered model
            does not).
        num_prompts, max_new_tokens: the held-out prompts answered, and the answer cap.
        scores: per attribute scorer, the base, policy and paired-delta means.
        fluency: ``base`` / ``policy`` -> the fluency report (perplexity null when undefined).
        win_rates_vs_base: per judge, the win rate and LC win rate against the base answers.
        alpaca_eval, mc: the optional benchmarks (empty when not asked for).
        history: the run's summary rows; samples: answers shown side by side.
        answers, per_prompt: every answer and per-prompt value (to pool seeds later).
        costs, training_costs: what the evaluation and the policy cost.
        seconds: the evaluation's wall time; config: the :class:`EvalConfig` used.
    """

    schema_open: ClassVar[bool] = True  # an older eval.json may hold keys no longer written

    run: str
    kind: str
    model: str
    oracle: str
    learner: str | None
    steered: bool
    num_prompts: NonNegativeInt
    max_new_tokens: NonNegativeInt
    scores: dict[str, ScoreComparison]
    fluency: dict[str, dict[str, UndefinedFloat]]
    win_rates_vs_base: dict[str, dict[str, Any]]
    costs: dict[str, Any]
    training_costs: dict[str, Annotated[float, Rule(low=0.0)]]
    # What ``sims compare`` does not need may be missing from an older eval.json.
    alpaca_eval: dict[str, Any] = dataclasses.field(default_factory=dict)
    mc: dict[str, Any] = dataclasses.field(default_factory=dict)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    samples: list[dict[str, str]] = dataclasses.field(default_factory=list)
    answers: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    per_prompt: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: Annotated[float, Rule(low=0.0)] = 0.0
    config: dict[str, Any] = dataclasses.field(default_factory=dict)

    #: The keys of ``eval.json``, in the order it has always written them.
    KEYS: ClassVar[tuple[str, ...]] = (
        "run", "kind", "model", "oracle", "learner", "steered", "num_prompts", "max_new_tokens",
        "scores", "fluency", "win_rates_vs_base", "alpaca_eval", "mc", "history", "samples",
        "answers", "per_prompt", "costs", "training_costs", "seconds", "config",
    )  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        """What ``eval.json`` holds (NaN fluency values as null: JSON has no NaN)."""
        out = {name: getattr(self, name) for name in self.KEYS}
        out["scores"] = {name: dataclasses.asdict(c) for name, c in self.scores.items()}
        out["fluency"] = {
            side: {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in report.items()}
            for side, report in self.fluency.items()
        }
        return out

    @classmethod
    def from_json(cls, data: Any, where: str = "eval.json") -> EvalResult:
        """A parsed ``eval.json``, checked (:func:`simsteer.schema.check`): a hand-edited
        or damaged file raises :class:`~simsteer.schema.SchemaError` naming the field."""
        check(cls, data, where)
        scores = {
            name: ScoreComparison(*(MeanCI(**c[side]) for side in ("base", "policy", "delta")))
            for name, c in data["scores"].items()
        }
        fluency = {
            side: {k: math.nan if v is None else v for k, v in report.items()}
            for side, report in data["fluency"].items()
        }
        values = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data}
        return cls(**{**values, "scores": scores, "fluency": fluency})


def read_run(path: str | Path) -> RunInfo:
    """Load a run directory's config, final policy and per-iteration history."""
    run = RunDir(Path(path))
    if not run.is_run():
        raise SimsError(f"{path} is not a run directory (no config.json)")
    run.spec()  # every field checked: one line naming a bad one
    cfg = read_json(run.config)
    check(BaselineSettings, cfg, str(run.config))
    kind = cfg.get("baseline", "sims")
    policy = load_policy(run.final) if run.final.exists() else []
    policy = [s for s in policy if s.functions]  # an empty steering is the unsteered model
    if kind == "sims" and not run.final.exists():
        raise SimsError(f"{path} has no final policy yet: finish it with `sims run --resume {path}`")
    return RunInfo(Path(path), kind, cfg, policy, run.history())


def eval_oracle(config: dict[str, Any]) -> dict[str, Any] | str:
    """The oracle spec ``sims eval`` judges a folder with: a random-split baseline's
    ``eval_oracle`` (the mirrored run's), else the folder's own ``oracle``."""
    return config.get("eval_oracle") or config["oracle"]


def _stage_printer(progress: bool) -> Callable[[str], None]:
    """A function that prints ``sims eval: <stage>`` to stderr, or does nothing."""

    def say(message: str) -> None:
        if progress:
            print(f"sims eval: {message}", file=sys.stderr, flush=True)

    return say


def _mean_ci(values: np.ndarray, rounds: int, seed: int) -> MeanCI:
    lo, hi = bootstrap_ci(values, rounds=rounds, seed=seed)
    return MeanCI(float(values.mean()), lo, hi)


def _answers(
    pool: WorkerPool,
    info: RunInfo,
    prompts: list[str],
    sampling: SamplingConfig,
    meter: CostMeter,
    oracle,
    label: str,
    steered: bool,
) -> list[str]:
    greedy = sampling.as_greedy()
    with meter.stage(f"generate_{label}") as cost:
        if steered and info.kind == "best-of-n":
            n, seed = int(info.config["n"]), info.config.get("seed", 0)
            gens, tokens = best_of_n(pool, oracle, prompts, n, sampling, seed=seed)
            cost.generated_tokens += tokens
            cost.judge_calls += len(prompts) * int(info.config["n"])
        else:
            gens = [g[0] for g in pool.generate(prompts, 1, greedy, info.policy if steered else [])]
            cost.generated_tokens += sum(g.num_tokens for g in gens)
    return [g.text for g in gens]


def _compare(oracle, prompts, ours, theirs, meter, stage, rounds, seed) -> dict[str, Any]:
    with meter.stage(stage) as cost:
        judged = judge_pairs(oracle, prompts, ours, theirs)
        cost.judge_calls += judged.judge_calls
    wr = win_rate(judged.preference, rounds=rounds, seed=seed)
    lc = length_controlled_win_rate(
        judged.preference,
        [len(a) for a in ours],
        [len(b) for b in theirs],
        rounds=min(rounds, 200),
        seed=seed,
    )
    return {
        "win_rate": wr.to_dict(),
        "lc_win_rate": lc.to_dict(),
        "position_flips": float(judged.position_flips.mean()) if len(prompts) else None,
    }


def _prompt_forward_tokens(lm: LoadedModel, prompts: Sequence[str], answers: Sequence[str]) -> int:
    tok = lm.tokenizer
    return sum(
        len(tok(p)["input_ids"]) + len(tok(a)["input_ids"]) for p, a in zip(prompts, answers, strict=True)
    )


def evaluate_run(
    path: str | Path,
    config: EvalConfig | None = None,
    lm: LoadedModel | None = None,
    progress: bool = False,
    trusted: Collection[str] = (),
    workers: int | None = None,
    ray_address: str | None = None,
) -> EvalResult:
    """Evaluate a run directory or baseline folder; returns what ``eval.json`` holds
    (:meth:`EvalResult.to_json`).

    Args:
        progress: say on stderr which stage runs (answering, scoring, judging).
        trusted: the consent flags for what the folder names that runs code or sends a key
            (``"--oracle python:..."``, ``"--trust-remote-code"``,
            ``"--judge-api-key-env VAR"``); one it needs and lacks is refused before
            anything is loaded (:func:`check_trusted`).
        workers, ray_address: answer the prompts on Ray workers
            (:func:`simsteer.workers.open_pool`; the same answers as in this process).
            A DPO baseline's own answers stay here (the workers hold the base model).

    Example:
        >>> result = evaluate_run("runs/sims", EvalConfig(judges=("readability",), mc_tasks=("arc_easy",)))
        >>> result.win_rates_vs_base["readability"]["win_rate"]["value"]
    """
    config = config or EvalConfig()
    clock = time.perf_counter()
    info = read_run(path)
    check_trusted(path, eval_oracle(info.config), info.config["model"], trusted)
    run = RunDir(info.path)
    sampling = info.sampling
    if config.max_new_tokens:
        sampling = SamplingConfig(
            **{**info.config["sims"]["sampling"], "max_new_tokens": config.max_new_tokens}
        )
    prompt_file = Path(config.prompts) if config.prompts else run.eval_prompts
    if not prompt_file.is_file():
        raise SimsError(f"no held-out prompts: {prompt_file} is missing (pass --prompts FILE)")
    prompts = [r.get("prompt") or r.get("instruction") for r in read_jsonl(prompt_file)]
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise SimsError(f"{prompt_file} has no usable prompts")
    prompts = prompts[: config.limit]
    say = _stage_printer(progress)
    meter = CostMeter()
    # A random-split baseline trained on random scores: judge it with the oracle of the
    # run it mirrors (``eval_oracle``), like every other method.
    oracle_spec = eval_oracle(info.config)
    oracle_name = oracle_spec if isinstance(oracle_spec, str) else oracle_spec["name"]
    model_cfg = info.config["model"]
    lm = lm or load_model(
        model_cfg["source"],
        dtype=model_cfg.get("dtype"),
        trust_remote_code=bool(model_cfg.get("trust_remote_code", False)),  # checked above
    )
    # The run's oracle rebuilt from its saved spec (a judge's endpoint, a custom
    # template); self-judges (self-rank, self-judge*) judge with the unsteered backbone.
    waits = {k: v for k, v in config.judge_options.items() if k in JUDGE_WAITS}
    is_judge = isinstance(oracle_spec, dict) and oracle_spec.get("name") == "judge"
    oracle = get_oracle({**oracle_spec, **waits} if is_judge else oracle_spec, lm=lm)
    # A DPO baseline's policy is the base with its LoRA adapter merged (a second copy).
    policy_lm = load_dpo_model(info.path, lm) if info.kind == "dpo" else lm
    judges = {oracle_name: oracle}
    for name in config.judges:
        judges.setdefault(name, get_oracle(name, lm=lm, judge_options=config.judge_options))

    refs = load_alpaca_reference(config.data, config.alpaca) if config.alpaca else []
    instr = [r.instruction for r in refs]
    say(f"answering {len(prompts)} held-out prompts with the unsteered model and the policy")
    with open_pool(lm, oracle, workers, ray_address) as pool:
        policy_pool = LocalPool(policy_lm) if policy_lm is not lm else pool
        base = _answers(pool, info, prompts, sampling, meter, oracle, "base", steered=False)
        if info.policy or info.kind in ("best-of-n", "dpo"):
            ours = _answers(policy_pool, info, prompts, sampling, meter, oracle, "policy", steered=True)
        else:
            ours = list(base)
        if refs:
            answers = _answers(policy_pool, info, instr, sampling, meter, oracle, "alpaca", steered=True)

    say("scoring the answers and measuring their fluency")
    rounds, seed = config.bootstrap_rounds, config.seed
    scores: dict[str, ScoreComparison] = {}
    # Per-prompt values, so that several seeds' evaluations can be pooled
    # (benchmarks/experiment_table.py) without answering again.
    per_prompt: dict[str, Any] = {"scores": {}}
    with meter.stage("score") as cost:
        for name in config.scorers:
            scorer = attribute_oracle(name)
            s_base = finite_scores(scorer.name, scorer.score(prompts, base))
            s_ours = finite_scores(scorer.name, scorer.score(prompts, ours))
            cost.judge_calls += 2 * len(prompts)
            per_prompt["scores"][name] = {"base": s_base.tolist(), "policy": s_ours.tolist()}
            scores[name] = ScoreComparison(
                base=_mean_ci(s_base, rounds, seed),
                policy=_mean_ci(s_ours, rounds, seed),
                delta=_mean_ci(s_ours - s_base, rounds, seed),
            )
    with meter.stage("fluency") as cost:
        ppl = {"base": perplexities(lm, prompts, base), "policy": perplexities(lm, prompts, ours)}
        fluency = {
            "base": fluency_report(lm, prompts, base, per_answer=ppl["base"]).to_dict(),
            "policy": fluency_report(lm, prompts, ours, per_answer=ppl["policy"]).to_dict(),
        }
        per_prompt["perplexity"] = {k: [None if math.isnan(x) else x for x in v] for k, v in ppl.items()}
        cost.forward_tokens += _prompt_forward_tokens(lm, prompts, base) + _prompt_forward_tokens(
            lm, prompts, ours
        )
    say(f"judging policy vs unsteered answers ({', '.join(judges)})")
    win_rates = {
        name: _compare(j, prompts, ours, base, meter, f"judge_{name}", rounds, seed)
        for name, j in judges.items()
    }

    alpaca: dict[str, Any] = {}
    if refs:
        alpaca = {
            name: _compare(j, instr, answers, [r.output for r in refs], meter, f"alpaca_{name}", rounds, seed)
            for name, j in judges.items()
        }
        alpaca["n"] = len(refs)
        alpaca["mean_chars"] = {
            "policy": float(np.mean([len(a) for a in answers])),
            "reference": float(np.mean([len(r.output) for r in refs])),
        }

    mc: dict[str, Any] = {}
    for task in config.mc_tasks:
        say(f"multiple choice: {task}")
        items = load_mc_task(task, config.data, config.mc_limit, seed)
        with meter.stage(f"mc_{task}") as cost:
            mc[task] = (
                dpo_mc(lm, policy_lm, items, config.batch_size)
                if policy_lm is not lm
                else _mc_with_cached_base(lm, model_cfg, task, items, info.policy, config)
            )
            cost.forward_tokens += sum(r["forward_tokens"] for r in mc[task].values() if not r.get("cached"))

    shown = [
        {"prompt": p, "base": b, "policy": o}
        for p, b, o in list(zip(prompts, base, ours, strict=True))[: config.samples_shown]
    ]
    return EvalResult(
        run=str(info.path),
        kind=info.kind,
        model=model_cfg["source"],
        oracle=oracle_name,
        learner=info.config.get("learner", {}).get("name"),
        steered=bool(info.policy) or info.kind == "dpo",
        num_prompts=len(prompts),
        max_new_tokens=sampling.max_new_tokens,
        scores=scores,
        fluency=fluency,
        win_rates_vs_base=win_rates,
        alpaca_eval=alpaca,
        mc=mc,
        history=[row.to_json() for row in info.history],
        samples=shown,
        answers={"prompts": prompts, "base": base, "policy": ours},
        per_prompt=per_prompt,
        costs=meter.to_dict(),
        training_costs=_training_costs(info),
        seconds=round(time.perf_counter() - clock, 2),
        config={k: v for k, v in vars(config).items()},
    )


@dataclass(frozen=True)
class MCCache:
    """A cached multiple-choice result of the unsteered model (``$SIMSTEER_CACHE/mc``)."""

    summary: dict[str, Any]
    rows: list[dict[str, Any]]


def _mc_with_cached_base(
    lm: LoadedModel, model_cfg: dict, task: str, items: list, policy: list[Steering], config: EvalConfig
) -> dict[str, Any]:
    """MC results; the unsteered model's per-item metrics are cached (``$SIMSTEER_CACHE/mc``)
    because every run of one model shares them. The key covers the model, the task, the
    item ids and the batch size; a cached result says ``"cached": true``."""
    import hashlib
    import json

    from ..models import cache_dir

    key = json.dumps(
        [
            model_cfg["source"],
            model_cfg.get("dtype"),
            model_cfg.get("fingerprint"),
            task,
            [it.id for it in items],
            config.batch_size,
        ]
    )
    path = cache_dir() / "mc" / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")
    policies: dict[str, list[Steering]] = {"policy": policy} if policy else {}
    if path.is_file():
        cached = read_json(path)
        check(MCCache, cached, str(path))
        out = {"base": {**cached["summary"], "cached": True}}
        if policies:
            out |= evaluate_mc(
                lm, items, policies, config.batch_size, reference=None, reference_rows=cached["rows"]
            )
        return out
    out, rows = evaluate_mc(lm, items, {"base": [], **policies}, config.batch_size, return_rows=True)
    from ..io import write_json

    write_json(path, {"summary": out["base"], "rows": rows["base"]})
    return out


def _training_costs(info: RunInfo) -> dict[str, float]:
    """What producing the policy cost: the loop's summary rows summed over iterations,
    or, for a baseline fitted once (MS, DPO), the figures its config records; and the
    bytes of what it saves (:func:`~.costs.saved_bytes`)."""
    if not info.history:
        return {
            "tokens_generated": 0,
            "tokens_forward": int(info.config.get("tokens_forward", 0) or 0),
            "seconds": float(info.config.get("fit_seconds", 0) or 0),
            "saved_bytes": saved_bytes(info.path),
        }
    history = info.history
    return {
        "tokens_generated": sum(r.tokens_generated for r in history),
        "tokens_forward": sum(r.tokens_forward or 0 for r in history),
        "seconds": round(sum(r.seconds_total for r in history), 2),
        "saved_bytes": saved_bytes(info.path),
    }
