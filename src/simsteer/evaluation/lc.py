"""Length-controlled win rate (the idea of AlpacaEval 2's LC win rate).

A judge that likes long answers rewards verbosity. The LC win rate asks: what would the
win rate be if the policy's and the reference's answers had the same length? It fits a
logistic regression (a GLM) of the per-item preference ``P(policy > reference)`` on a
length term and predicts at zero length difference.

What is fitted here (offline; AlpacaEval's instruction-difficulty table is downloaded
from the Hugging Face hub at run time and is not available):

    logit P(policy > reference) = theta + gamma * tanh(delta / std(delta))   [+ beta * difficulty]

- ``delta``: character length of the policy's answer minus the reference's (AlpacaEval
  uses character lengths and the same ``tanh`` of the standardised difference; ``std``
  is the sample standard deviation over the items);
- the preference is used as a soft label (each item enters with label 1 weighted by ``p``
  and label 0 weighted by ``1 - p``), fitted by Newton's method (maximum a posteriori);
- AlpacaEval pins the length slope ``gamma`` by fitting each model together with
  "gamed" verbose and concise versions of its own answers (not available offline).
  Without them the slope is badly identified when the policy's answers are all much
  shorter or longer than the reference (``tanh`` saturates and ``delta = 0`` is an
  extrapolation). Instead ``gamma`` gets a Gaussian prior: penalty
  ``lambda / 2 * (gamma - gamma_0)^2`` with ``gamma_0 = 1.5``, the median length slope of
  196 models in AlpacaEval's published GLM weights (``lc_weights``, the three models we
  check against left out), and ``lambda = 100`` (:data:`LENGTH_PRIOR`);
  ``length_prior=None`` fits the slope freely (README compares both);
- the difficulty term is used only when a table is given (``difficulty=``).

The LC win rate is the mean over items of the fitted probability with ``delta = 0``; with
no difficulty term it is ``sigmoid(theta)``. The interval is a percentile bootstrap over
items (the GLM is refitted on every resample).
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..stats import bootstrap_ci

#: (gamma_0, lambda): prior mean and precision of the length slope (module docstring).
LENGTH_PRIOR = (1.5, 100.0)


def fit_logistic(
    features: np.ndarray,
    target: np.ndarray,
    penalty: np.ndarray | None = None,
    prior_mean: np.ndarray | None = None,
    iterations: int = 100,
) -> np.ndarray:
    """Logistic regression with soft targets in [0, 1] by Newton's method.

    Args:
        features: ``[n, d]`` design matrix.
        target: ``[n]`` probabilities (the soft labels).
        penalty: ``[d]`` Gaussian-prior precisions (0 = flat prior), default 1e-3 each.
        prior_mean: ``[d]`` prior means (default 0).
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64)
    d = x.shape[1]
    penalty = np.full(d, 1e-3) if penalty is None else np.asarray(penalty, dtype=np.float64)
    mean = np.zeros(d) if prior_mean is None else np.asarray(prior_mean, dtype=np.float64)
    beta = mean.copy()
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(x @ beta)))
        grad = x.T @ (p - y) + penalty * (beta - mean)
        hess = (x * (p * (1 - p))[:, None]).T @ x + np.diag(penalty) + 1e-9 * np.eye(d)
        step = np.linalg.solve(hess, grad)
        beta -= step
        if np.abs(step).max() < 1e-10:
            break
    return beta


def _design(delta_std: np.ndarray, difficulty: np.ndarray | None) -> np.ndarray:
    cols = [np.ones_like(delta_std), np.tanh(delta_std)]
    if difficulty is not None:
        cols.append(difficulty)
    return np.stack(cols, axis=1)


@dataclass(frozen=True)
class LengthControlled:
    """LC win rate (in [0, 1]) with its bootstrap interval and the fitted GLM."""

    value: float
    ci_low: float
    ci_high: float
    raw: float  # the plain (soft) win rate on the same items
    intercept: float
    length_coefficient: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _lc_value(
    rows: np.ndarray, use_difficulty: bool, prior: tuple[float, float] | None
) -> tuple[float, np.ndarray]:
    pref, delta = rows[:, 0], rows[:, 1]
    diff = rows[:, 2] if use_difficulty else None
    std = delta.std(ddof=1) if len(delta) > 1 else 0.0
    delta_std = delta / std if std > 0 else np.zeros_like(delta)
    x = _design(delta_std, diff)
    penalty = np.full(x.shape[1], 1e-3)
    penalty[0] = 0.0  # the intercept is what we estimate: no prior on it
    mean = np.zeros(x.shape[1])
    if prior is not None:
        mean[1], penalty[1] = prior
    beta = fit_logistic(x, pref, penalty, mean)
    test = _design(np.zeros_like(delta_std), diff)
    return float(np.mean(1.0 / (1.0 + np.exp(-(test @ beta))))), beta


def length_controlled_win_rate(
    preference: np.ndarray,
    policy_lengths: np.ndarray,
    reference_lengths: np.ndarray,
    difficulty: np.ndarray | None = None,
    length_prior: tuple[float, float] | None = LENGTH_PRIOR,
    rounds: int = 200,
    seed: int = 0,
) -> LengthControlled:
    """The LC win rate of the policy against the reference (see the module docstring).

    Args:
        preference: per-item ``P(policy > reference)`` (discrete 0 / 0.5 / 1 or soft).
        policy_lengths, reference_lengths: answer lengths in characters.
        difficulty: optional per-item instruction difficulty (AlpacaEval's table).
        length_prior: ``(gamma_0, lambda)`` for the length slope; ``None``: free fit.
        rounds: bootstrap resamples for the interval (0: no interval).

    Example:
        >>> lc = length_controlled_win_rate(pref, [len(a) for a in ours], [len(r) for r in refs])
        >>> print(f"LC {100 * lc.value:.1f} [{100 * lc.ci_low:.1f}, {100 * lc.ci_high:.1f}]")
    """
    pref = np.asarray(preference, dtype=np.float64)
    delta = np.asarray(policy_lengths, dtype=np.float64) - np.asarray(reference_lengths, dtype=np.float64)
    diff = np.zeros_like(pref) if difficulty is None else np.asarray(difficulty, dtype=np.float64)
    keep = ~np.isnan(pref)
    rows = np.stack([pref, delta, diff], axis=1)[keep]
    use = difficulty is not None
    value, beta = _lc_value(rows, use, length_prior)
    if rounds > 0:
        lo, hi = bootstrap_ci(rows, lambda r: _lc_value(r, use, length_prior)[0], rounds=rounds, seed=seed)
    else:
        lo = hi = float("nan")
    return LengthControlled(
        value=value,
        ci_low=lo,
        ci_high=hi,
        raw=float(rows[:, 0].mean()),
        intercept=float(beta[0]),
        length_coefficient=float(beta[1]),
        n=len(rows),
    )


def read_leaderboard(path: str | Path) -> dict[str, dict[str, str]]:
    """AlpacaEval's published leaderboard CSV: model name -> its row (``win_rate``,
    ``length_controlled_winrate``, ...); the model name is the unnamed first column."""
    with open(path, encoding="utf-8") as fh:
        return {row[""]: row for row in csv.DictReader(fh)}


def annotation_win_rates(path: str | Path, free_slope: bool = False) -> tuple[str, LengthControlled]:
    """The model and its (LC) win rate in an AlpacaEval annotation file.

    Args:
        path: ``annotations.json`` of one model (AlpacaEval's results folder layout).
        free_slope: fit the length slope freely instead of with :data:`LENGTH_PRIOR`.

    Example:
        >>> model, lc = annotation_win_rates("results/gpt4/weighted_alpaca_eval_gpt4_turbo/annotations.json")
        >>> print(model, f"LC {100 * lc.value:.1f}")
    """
    from .datasets import load_alpaca_annotations

    rows = load_alpaca_annotations(path)
    lc = length_controlled_win_rate(
        np.array([r["preference"] for r in rows]),
        [r["len_2"] for r in rows],
        [r["len_1"] for r in rows],
        length_prior=None if free_slope else LENGTH_PRIOR,
    )
    # Annotation files name the model; older ones only through their folder.
    model = rows[0]["generator_2"] or Path(path).parent.parent.name
    return model, lc
