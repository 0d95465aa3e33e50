"""The typed rows of a run directory: what the loop writes, and what everybody reads back.

Each record is a frozen dataclass with ``to_json()`` (the exact dict written: same keys,
same order, same values as the files of runs written before the records existed) and
``from_json()`` (accepts those files). Optional entries are left out of the JSON when they
are ``None``, as they were left out of the dict rows:

- :class:`IterationRecord`: one row of the summary table (``iter_<t>/summary.json``), with
  its nested :class:`FluencyRecord`, :class:`JudgingStats`, :class:`FitRecord` and
  :class:`CalibrationRecord` (whose points are :class:`CalibrationPoint`, measured against
  the unsteered model's :class:`Measurement`);
- :class:`SampleRecord`: one of the K answers to a prompt (``iter_<t>/samples.jsonl``);
- :class:`TrainingPair`: one side of a D+ / D- pair (``iter_<t>/train_pairs.jsonl``);
- :class:`EvalRecord`: a greedy answer to a held-out prompt (``iter_<t>/eval.jsonl``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from ..schema import NonNegativeInt, Probability, UndefinedFloat, check, undefined_fields

R = TypeVar("R", bound="FlatRecord")

#: Labels of a sample: D+, D-, a win rate of exactly 1/2, not picked by the variant
#: (``pr``, ``cs``), or a prompt the oracle could not judge.
LABELS = ("positive", "negative", "tie", "unused", "skipped")


def _put(out: dict[str, Any], key: str, value: Any) -> None:
    """Write an optional entry: left out when ``None`` (as the dict rows did)."""
    if value is not None:
        out[key] = value


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


class FlatRecord:
    """``to_json`` / ``from_json`` of a record whose JSON is its fields, in field order
    (a field with a default may be missing from older files).

    Fields annotated :data:`~simsteer.schema.UndefinedFloat` hold metrics that may be
    undefined (NaN in memory): they are written as ``null`` (JSON has no NaN) and read back
    as NaN. Every value is checked against the annotations (:func:`simsteer.schema.check`);
    keys that name no field are left alone (``schema_open``).
    """

    schema_open: ClassVar[bool] = True
    #: Optional fields left out of the JSON when ``None`` (added after files were written).
    omitted_when_none: ClassVar[tuple[str, ...]] = ()

    def to_json(self) -> dict[str, Any]:
        out = {
            f.name: getattr(self, f.name)
            for f in fields(self)  # type: ignore[arg-type]
            if not (f.name in self.omitted_when_none and getattr(self, f.name) is None)
        }
        undefined = undefined_fields(type(self))
        out = {k: None if k in undefined and _is_nan(v) else v for k, v in out.items()}
        return out

    @classmethod
    def from_json(cls: type[R], data: dict[str, Any]) -> R:
        check(cls, data)
        names = fields(cls)  # type: ignore[arg-type]
        values = {f.name: data[f.name] for f in names if f.name in data}
        undefined = undefined_fields(cls)
        values = {k: math.nan if v is None and k in undefined else v for k, v in values.items()}
        return cls(**values)


@dataclass(frozen=True)
class FluencyRecord(FlatRecord):
    """Fluency of a set of answers (:class:`simsteer.fluency.FluencyReport`, rounded)."""

    perplexity: UndefinedFloat  # NaN when no answer has tokens
    repetition: float
    distinct_2: float
    loop_share: float
    mean_tokens: float


@dataclass(frozen=True)
class Measurement(FlatRecord):
    """What the fluency guard measures of one policy on the calibration prompts
    (``contrast_score``: the oracle's mean score on the contrast prompts, when the run has
    them; ``prompt_scores``: the oracle's score of each calibration answer, in prompt
    order, which the final choice between policies pairs up; absent in older runs)."""

    omitted_when_none = ("contrast_score", "prompt_scores")

    score: float
    perplexity: UndefinedFloat  # NaN when no answer has tokens
    repetition: float
    loop_share: float
    distinct_2: float
    contrast_score: float | None = None
    prompt_scores: list[float] | None = None


@dataclass(frozen=True)
class CalibrationPoint(FlatRecord):
    """One strength of the guard's grid: the measurement and whether it is within the
    guard's budgets (``fluent``: fluency, and the contrast budget when the run has contrast
    prompts)."""

    omitted_when_none = ("contrast_score", "prompt_scores")

    multiplier: float
    strength: float
    score: float
    perplexity: UndefinedFloat  # NaN when no answer has tokens
    repetition: float
    loop_share: float
    distinct_2: float
    fluent: bool
    contrast_score: float | None = None
    prompt_scores: list[float] | None = None

    @classmethod
    def measured(cls, multiplier: float, strength: float, m: Measurement, fluent: bool) -> CalibrationPoint:
        """The point of ``m`` measured at ``multiplier`` (absolute ``strength``)."""
        return cls(
            multiplier,
            strength,
            m.score,
            m.perplexity,
            m.repetition,
            m.loop_share,
            m.distinct_2,
            fluent,
            m.contrast_score,
            m.prompt_scores,
        )


@dataclass(frozen=True)
class CalibrationRecord:
    """The guard's calibration of one fit (see :mod:`simsteer.loop.calibration`).

    Attributes:
        base: the unsteered model on the calibration prompts.
        points: the strengths measured, in ascending order.
        chosen: the multiplier kept (best fluent score), ``None`` if none is fluent.
        score: the chosen point's score.
    """

    base: Measurement
    points: tuple[CalibrationPoint, ...]
    chosen: float | None
    score: float | None

    @property
    def chosen_point(self) -> CalibrationPoint | None:
        return next((p for p in self.points if p.multiplier == self.chosen), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "base": self.base.to_json(),
            "points": [p.to_json() for p in self.points],
            "chosen": self.chosen,
            "score": self.score,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CalibrationRecord:
        check(cls, data)
        return cls(
            base=Measurement.from_json(data["base"]),
            points=tuple(CalibrationPoint.from_json(p) for p in data["points"]),
            chosen=data["chosen"],
            score=data["score"],
        )


#: The optional entries of :class:`JudgingStats`, in the order a row writes them.
JUDGING_KEYS = (
    "ranking_parse_rate",
    "judge_requests",
    "judge_cache_hits",
    "judge_parse_failures",
    "train_pairs",
    "bank_size",
)


@dataclass(frozen=True)
class JudgingStats:
    """How the oracle's judging of an iteration went; each entry is left out of the row
    when it does not apply (``None``).

    Attributes:
        ranking_parse_rate: share of the iteration's prompts the oracle could judge.
        judge_requests, judge_cache_hits, judge_parse_failures: an LLM judge's traffic.
        train_pairs: SIMS-CS pairs trained on; bank_size: the response bank's size.
    """

    schema_open: ClassVar[bool] = True  # its keys are a row's

    ranking_parse_rate: Probability | None = None
    judge_requests: NonNegativeInt | None = None
    judge_cache_hits: NonNegativeInt | None = None
    judge_parse_failures: NonNegativeInt | None = None
    train_pairs: NonNegativeInt | None = None
    bank_size: NonNegativeInt | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in JUDGING_KEYS:
            _put(out, name, getattr(self, name))
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JudgingStats:
        check(cls, data)
        return cls(**{name: data.get(name) for name in JUDGING_KEYS})


@dataclass(frozen=True)
class FitRecord(FlatRecord):
    """What the learner did in an iteration (``carried_over``: nothing to learn from, the
    previous policy was kept)."""

    learner: str
    carried_over: bool


@dataclass(frozen=True)
class IterationRecord:
    """One row of the summary table: policy t evaluated, sampled, ranked (and, except in
    the last row, learned from).

    Attributes:
        iteration: t.
        policy: ``unsteered`` or ``iter_<t>``.
        strength: the policy's strength (0 for the unsteered model).
        eval_score, eval_fluency: the greedy answers to the held-out prompts.
        sample_score, sample_fluency: the K samples per prompt.
        num_prompts, num_positive, num_negative: prompts drawn, |D+|, |D-|.
        tokens_generated: sampled and evaluation tokens; mean_response_tokens: per sample.
        judging: the oracle's parse rate and traffic, the SIMS-CS bank.
        tokens_forward: tokens of the activation forward (``None`` in the last row).
        fit: the learner's step (``None`` in the last row).
        calibration: the guard's calibration (``None`` without the guard / last row).
        stop: why the loop stops after this row (with the guard; ``None`` to go on).
        seconds: wall time per step; seconds_total: their sum.
        engine: the engine that sampled policy t (``torch`` or ``llamacpp``: what
            ``--engine auto`` resolved to for this policy).
    """

    schema_open: ClassVar[bool] = True  # the judging entries are the row's keys

    iteration: NonNegativeInt
    policy: str
    strength: float
    eval_score: float | None = None
    eval_fluency: FluencyRecord | None = None
    sample_score: float | None = None
    sample_fluency: FluencyRecord | None = None
    num_prompts: NonNegativeInt = 0
    num_positive: NonNegativeInt = 0
    num_negative: NonNegativeInt = 0
    tokens_generated: NonNegativeInt = 0
    mean_response_tokens: float = 0.0
    judging: JudgingStats = field(default_factory=JudgingStats)
    tokens_forward: NonNegativeInt | None = None
    fit: FitRecord | None = None
    calibration: CalibrationRecord | None = None
    stop: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    seconds_total: float = 0.0
    engine: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "iteration": self.iteration,
            "policy": self.policy,
            "strength": self.strength,
            "eval_score": self.eval_score,
            "eval_fluency": None if self.eval_fluency is None else self.eval_fluency.to_json(),
            "sample_score": self.sample_score,
            "sample_fluency": None if self.sample_fluency is None else self.sample_fluency.to_json(),
            "num_prompts": self.num_prompts,
            "num_positive": self.num_positive,
            "num_negative": self.num_negative,
            "tokens_generated": self.tokens_generated,
            "mean_response_tokens": self.mean_response_tokens,
            **self.judging.to_json(),
        }
        _put(out, "tokens_forward", self.tokens_forward)
        _put(out, "fit", None if self.fit is None else self.fit.to_json())
        if self.calibration is not None:
            # A calibrated row always says whether the loop stops (null: it goes on).
            out["calibration"] = self.calibration.to_json()
            out["stop"] = self.stop
        else:
            _put(out, "stop", self.stop)
        out["seconds"] = dict(self.seconds)
        out["seconds_total"] = self.seconds_total
        _put(out, "engine", self.engine)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> IterationRecord:
        check(cls, data)

        def nested(key: str, kind: Any) -> Any:
            value = data.get(key)
            return None if value is None else kind.from_json(value)

        return cls(
            iteration=data["iteration"],
            policy=data["policy"],
            strength=data["strength"],
            eval_score=data.get("eval_score"),
            eval_fluency=nested("eval_fluency", FluencyRecord),
            sample_score=data.get("sample_score"),
            sample_fluency=nested("sample_fluency", FluencyRecord),
            num_prompts=data.get("num_prompts", 0),
            num_positive=data.get("num_positive", 0),
            num_negative=data.get("num_negative", 0),
            tokens_generated=data.get("tokens_generated", 0),
            mean_response_tokens=data.get("mean_response_tokens", 0.0),
            judging=JudgingStats.from_json(data),
            tokens_forward=data.get("tokens_forward"),
            fit=nested("fit", FitRecord),
            calibration=nested("calibration", CalibrationRecord),
            stop=data.get("stop"),
            seconds=dict(data.get("seconds", {})),
            seconds_total=data.get("seconds_total", 0.0),
            engine=data.get("engine"),
        )


@dataclass(frozen=True)
class SampleRecord(FlatRecord):
    """One of the K sampled answers to a training prompt, judged and labelled.

    Attributes:
        sample: k, the answer's index among the prompt's K.
        score: the oracle's score (``None`` for oracles without scores).
        win_rate: the answer's mean preference over the other K - 1.
        label: one of :data:`LABELS`.
        judged: whether the oracle could judge the prompt.
        judge_info: the judge's traffic for the prompt (on sample 0 only).
    """

    iteration: NonNegativeInt
    prompt_id: str
    prompt: str
    sample: NonNegativeInt
    response: str
    num_tokens: NonNegativeInt
    finished: bool
    score: float | None
    win_rate: Probability
    label: str
    judged: bool = True
    judge_info: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        if self.judge_info is None:
            del out["judge_info"]  # only a judge that reports its traffic writes it
        return out


@dataclass(frozen=True)
class TrainingPair(FlatRecord):
    """One answer an update learns from: D+ (``positive``) or D- (``negative``).

    SIMS-CS writes them in pairs (best, worst answer of a bank entry) with the entry's
    contrast ``reward``; the other variants train on their labelled samples directly
    (``reward`` is ``None``).
    """

    iteration: NonNegativeInt
    prompt_id: str
    prompt: str
    sample: NonNegativeInt
    response: str
    label: str
    reward: float | None = None

    @classmethod
    def from_sample(cls, row: SampleRecord) -> TrainingPair:
        return cls(row.iteration, row.prompt_id, row.prompt, row.sample, row.response, row.label)


@dataclass(frozen=True)
class EvalRecord(FlatRecord):
    """Policy t's greedy answer to a held-out prompt, with the oracle's score."""

    iteration: NonNegativeInt
    prompt_id: str
    prompt: str
    response: str
    num_tokens: NonNegativeInt
    finished: bool
    score: float | None
