"""Arena-Hard-style scores: pairwise judgments against a baseline's answers with a
position swap, a Bradley-Terry fit, and bootstrap confidence intervals.

Every question is judged twice (Arena-Hard's two "games"): game 1 shows the baseline's
answer as A and the model's as B, game 2 swaps them. A verdict is one of
:data:`VERDICTS`; a strong verdict (``A>>B``) counts as three battles (Arena-Hard's
weighting), a tie as half a win for each side. Ratings follow the Elo convention
(``P(a beats b) = 1 / (1 + base ** ((r_b - r_a) / scale))``, scale 400, base 10) with the
baseline anchored at 1000; a model's *score* is its predicted win rate against the
baseline, in percent. Intervals: percentile bootstrap over battles, refitting each time.

Files follow Arena-Hard's JSONL formats: questions ``{"question_id", "turns":
[{"content"}]}`` (or ``"prompt"``), answers ``{"question_id", "model_id", "choices":
[{"turns": [{"content"}]}]}`` and judgments ``{"question_id", "model", "judge",
"games": [{"score": "A>B", ...}, {...}]}``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SimsError
from ..io import read_jsonl
from ..oracles.base import Oracle
from .winrate import judge_pairs

VERDICTS = ("A>>B", "A>B", "A=B", "B>A", "B>>A")
STRONG_WEIGHT = 3


@dataclass(frozen=True)
class Battle:
    """One judged comparison: ``outcome`` is 1 if ``model_a`` won, 0.5 a tie, 0 a loss."""

    model_a: str
    model_b: str
    outcome: float
    weight: int = 1


def verdict_from_probability(p_a: float, strong: float = 0.9) -> str:
    """An Arena-Hard verdict from ``P(A > B)``: ``>>`` beyond ``strong`` (or below 1 - strong)."""
    if p_a >= strong:
        return "A>>B"
    if p_a > 0.5:
        return "A>B"
    if p_a == 0.5:
        return "A=B"
    return "B>>A" if p_a <= 1 - strong else "B>A"


def _battle(a: str, b: str, verdict: str) -> Battle:
    if verdict not in VERDICTS:
        raise SimsError(f"unknown verdict {verdict!r}: use one of {', '.join(VERDICTS)}")
    outcome = {"A": 1.0, "=": 0.5, "B": 0.0}[verdict[0] if verdict != "A=B" else "="]
    return Battle(a, b, outcome, STRONG_WEIGHT if ">>" in verdict else 1)


def battles_from_judgments(judgments: Sequence[dict[str, Any]], baseline: str) -> list[Battle]:
    """Battles from Arena-Hard judgment records (game 1: A = baseline; game 2: A = model).

    A game whose score is missing (the judge gave no verdict) is skipped.
    """
    out: list[Battle] = []
    for rec in judgments:
        model = rec["model"]
        for g, game in enumerate(rec.get("games", [])[:2]):
            score = game.get("score")
            if not score:
                continue
            a, b = (baseline, model) if g == 0 else (model, baseline)
            out.append(_battle(a, b, score))
    return out


def judge_arena(
    oracle: Oracle,
    questions: Sequence[str],
    answers: Sequence[str],
    baseline_answers: Sequence[str],
    model: str,
    question_ids: Sequence[Any] | None = None,
    judge_name: str | None = None,
) -> list[dict[str, Any]]:
    """Judge a model's answers against the baseline's in both games; Arena-Hard records."""
    pairs = judge_pairs(oracle, questions, answers, baseline_answers)
    ids = list(question_ids) if question_ids is not None else list(range(len(questions)))
    records = []
    for i, qid in enumerate(ids):
        # Game 1 shows the baseline as A: P(A > B) = 1 - P(model > baseline | baseline first).
        g1 = verdict_from_probability(1.0 - float(pairs.backward[i]))
        g2 = verdict_from_probability(float(pairs.forward[i]))
        records.append(
            {
                "question_id": qid,
                "model": model,
                "judge": judge_name or oracle.name,
                "games": [{"score": g1}, {"score": g2}],
            }
        )
    return records


def fit_bradley_terry(
    battles: Sequence[Battle],
    baseline: str,
    scale: float = 400.0,
    base: float = 10.0,
    init: float = 1000.0,
    l2: float = 1e-6,
) -> dict[str, float]:
    """Maximum-likelihood Bradley-Terry ratings (Elo scale) with ``baseline`` at ``init``.

    Args:
        battles: judged comparisons; ties are half a win for each side.
        l2: a tiny ridge so that a model that never loses keeps a finite rating.
    """
    models = sorted({b.model_a for b in battles} | {b.model_b for b in battles})
    if baseline not in models:
        raise SimsError(f"the baseline {baseline!r} is in no battle")
    free = [m for m in models if m != baseline]
    index = {m: i for i, m in enumerate(free)}
    n, d = len(battles), len(free)
    x = np.zeros((n, d))
    y = np.zeros(n)
    w = np.zeros(n)
    for row, bt in enumerate(battles):
        if bt.model_a in index:
            x[row, index[bt.model_a]] += 1.0
        if bt.model_b in index:
            x[row, index[bt.model_b]] -= 1.0
        y[row], w[row] = bt.outcome, bt.weight
    beta = np.zeros(d)
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-(x @ beta)))
        grad = x.T @ (w * (p - y)) + l2 * beta
        hess = (x * (w * p * (1 - p))[:, None]).T @ x + l2 * np.eye(d)
        step = np.linalg.solve(hess, grad)
        beta -= step
        if np.abs(step).max() < 1e-10:
            break
    factor = scale / math.log(base)
    ratings = {m: init + factor * beta[index[m]] for m in free}
    ratings[baseline] = init
    return ratings


def win_rate_from_ratings(
    r_model: float, r_baseline: float, scale: float = 400.0, base: float = 10.0
) -> float:
    return 1.0 / (1.0 + base ** ((r_baseline - r_model) / scale))


@dataclass(frozen=True)
class ArenaScore:
    """A model's Arena-Hard score (win rate vs the baseline, %) and Elo-scale rating."""

    model: str
    score: float
    ci_low: float
    ci_high: float
    rating: float
    battles: int

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def arena_scores(
    battles: Sequence[Battle], baseline: str, rounds: int = 100, level: float = 0.95, seed: int = 0
) -> list[ArenaScore]:
    """Scores with bootstrap intervals for every model, best first."""
    ratings = fit_bradley_terry(battles, baseline)
    rng = np.random.default_rng(seed)
    n = len(battles)
    boot: dict[str, list[float]] = {m: [] for m in ratings}
    for _ in range(rounds):
        sample = [battles[i] for i in rng.integers(0, n, n)]
        try:
            r = fit_bradley_terry(sample, baseline)
        except SimsError:  # the resample left out the baseline entirely
            continue
        for m in boot:
            if m in r:
                boot[m].append(100 * win_rate_from_ratings(r[m], r[baseline]))
    alpha = (1 - level) / 2
    out = []
    for m, rating in ratings.items():
        values = np.array(boot[m]) if boot[m] else np.array([np.nan])
        out.append(
            ArenaScore(
                model=m,
                score=100 * win_rate_from_ratings(rating, ratings[baseline]),
                ci_low=float(np.quantile(values, alpha)),
                ci_high=float(np.quantile(values, 1 - alpha)),
                rating=rating,
                battles=sum(1 for b in battles if m in (b.model_a, b.model_b)),
            )
        )
    return sorted(out, key=lambda s: -s.score)


def load_questions(path: str | Path) -> list[tuple[Any, str]]:
    """(question_id, text) from an Arena-Hard question file (``turns`` or ``prompt``)."""
    out = []
    for row in read_jsonl(path):
        text = row.get("prompt") or (row.get("turns") or [{}])[0].get("content")
        if ("question_id" not in row and "uid" not in row) or not text:
            raise SimsError(f"{path}: each question needs question_id and turns[0].content or prompt")
        out.append((row.get("question_id", row.get("uid")), text))
    return out


def load_answers(path: str | Path) -> tuple[str, dict[Any, str]]:
    """(model name, {question_id: answer}) from an Arena-Hard model-answer file."""
    answers: dict[Any, str] = {}
    model = Path(path).stem
    for row in read_jsonl(path):
        model = row.get("model_id") or row.get("model") or model
        qid = row.get("question_id", row.get("uid"))
        if "choices" in row:
            text = row["choices"][0]["turns"][0]["content"]
        elif "messages" in row:
            last = row["messages"][-1]["content"]
            text = last.get("answer", "") if isinstance(last, dict) else last
        else:
            text = row.get("answer") or row.get("output")
        if qid is None or not isinstance(text, str):
            raise SimsError(f"{path}: an answer needs question_id and choices[0].turns[0].content")
        answers[qid] = text
    return model, answers


def judge_answer_files(
    oracle: Oracle,
    questions: str | Path,
    baseline: str | Path,
    answers: Sequence[str | Path],
) -> tuple[str, list[dict[str, Any]]]:
    """Judge every model-answer file against the baseline's on the questions both answered.

    Args:
        oracle: the judge.
        questions: Arena-Hard ``question.jsonl``.
        baseline: the baseline model's answer file.
        answers: the answer files of the models scored.

    Returns:
        the baseline's model name and the judgment records (Arena-Hard's format).

    Example:
        >>> judge = get_oracle("sentiment")
        >>> baseline, records = judge_answer_files(judge, "q.jsonl", "base.jsonl", ["m.jsonl"])
    """
    asked = load_questions(questions)
    name, base_answers = load_answers(baseline)
    records: list[dict[str, Any]] = []
    for path in answers:
        model, found = load_answers(path)
        # Only questions both sides answered are judged, in the question file's order.
        shared = [(q, text) for q, text in asked if q in found and q in base_answers]
        records += judge_arena(
            oracle,
            [text for _, text in shared],
            [found[q] for q, _ in shared],
            [base_answers[q] for q, _ in shared],
            model,
            [q for q, _ in shared],
        )
    return name, records
