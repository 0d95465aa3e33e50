"""The fluency guard: strength calibration under a fluency budget, and early stopping.

A self-improvement loop can hack its oracle: scores rise while answers degenerate into
repetition. After each fit the guard answers a held-out *calibration* slice of prompts
greedily at every strength of a small grid (multipliers on the learner's own strength
knob: CAA coefficient, HPR angle scale, ITI alpha, SEA blend) and keeps the strength with
the best oracle score among those that stay fluent:

    perplexity under the unsteered model <= (1 + budget) x the unsteered model's
    repetition rate                      <= the unsteered model's + margin

A run may also name *contrast* prompts: requests on which the steered behaviour must not
appear (benign requests for a refusal steering). Their greedy answers are scored by the
same oracle at every strength, and a strength is kept only if that mean score rises by at
most ``contrast_budget`` over the unsteered model's (for the ``refusal`` oracle: benign
requests may not be refused more often). The steering is constant across prompts, so
this is what keeps it from pushing every request the same way.

The whole frontier (strength -> score, perplexity, repetition, loops) is returned (the
loop saves it and its plot, :func:`simsteer.loop.plots.render_frontier`). If no strength
is fluent enough, or the best fluent score has not improved for ``patience`` iterations,
the loop stops and keeps the best policy so far; which calibrated policy a run returns is
:mod:`simsteer.loop.final_policy`. Nothing here reads or writes a run directory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import SimsError
from ..fluency import distinct_n, ends_in_loop, perplexities, repetition_rate
from ..generation.sampling import SamplingConfig
from ..models import LoadedModel
from ..oracles.base import Oracle, ScoreOracle
from ..prompts import Prompt
from ..steering import Steering
from ..workers.pool import LocalPool, WorkerPool
from .final_policy import SELECTIONS, calibration_scores, final_index, final_selection
from .outcome import Selection
from .records import CalibrationPoint, CalibrationRecord, IterationRecord, Measurement

#: ``measure(multiplier, strength)``: the candidate measured at one strength of the grid.
MeasureFn = Callable[[float, float], Measurement]
#: Called with every point measured so far (grid order) after each new one.
PointsCallback = Callable[[list[CalibrationPoint]], None]


@dataclass(frozen=True)
class GuardConfig:
    """Settings of the fluency guard.

    Attributes:
        fluency_budget: allowed relative perplexity increase over the unsteered model
            (0.10 = +10%); ``None`` turns the guard off (the paper's plain loop).
        repetition_margin: allowed increase of the repetition rate (absolute).
        strength_grid: multipliers on the learner's strength tried after every fit.
        calibration_prompts: held-out prompts the strengths are compared on (disjoint
            from the training pool and from the evaluation prompts).
        patience: stop after this many iterations without a better fluent calibration
            score (0: never stop early).
        stop_at_unfluent: scan the grid from the smallest multiplier up and stop at the
            first one that breaks the budget (perplexity and repetition grow with the
            strength, so larger ones almost never pass; this halves calibration time);
            false scores every multiplier.
        contrast_budget: allowed rise of the oracle's mean score on the run's contrast
            prompts over the unsteered model's (used only when the run has contrast
            prompts).
        selection: how the run's final policy is chosen among the calibrated ones:
            ``"one-se"`` (default) takes the earliest steered policy whose calibration
            score is within one standard error of the best one's (the error of their
            paired per-prompt difference), ``"best"`` the best score outright; see
            :func:`select_policy`.
    """

    fluency_budget: float | None = 0.12
    repetition_margin: float = 0.03
    strength_grid: tuple[float, ...] = (0.125, 0.25, 0.375, 0.5, 0.75, 1.0)
    calibration_prompts: int = 16
    patience: int = 2
    stop_at_unfluent: bool = True
    contrast_budget: float = 0.05
    selection: str = "one-se"

    def __post_init__(self) -> None:
        if self.fluency_budget is not None and self.fluency_budget < 0:
            raise SimsError(f"the fluency budget must be >= 0 or off, got {self.fluency_budget}")
        if self.repetition_margin < 0:
            raise SimsError(f"the repetition margin must be >= 0, got {self.repetition_margin}")
        if not self.strength_grid or any(not s > 0 for s in self.strength_grid):
            raise SimsError(f"the strength grid needs positive multipliers, got {self.strength_grid}")
        if self.calibration_prompts < 1:
            raise SimsError("the guard needs at least one calibration prompt")
        if self.selection not in SELECTIONS:
            choices = ", ".join(SELECTIONS)
            raise SimsError(f"unknown policy selection {self.selection!r}: use one of {choices}")
        if self.patience < 0:
            raise SimsError(f"patience must be >= 0, got {self.patience}")
        if not self.contrast_budget >= 0:
            raise SimsError(f"the contrast budget must be >= 0, got {self.contrast_budget}")
        object.__setattr__(self, "strength_grid", tuple(float(s) for s in self.strength_grid))

    @property
    def enabled(self) -> bool:
        return self.fluency_budget is not None


def measure(
    lm: LoadedModel,
    oracle: Oracle,
    prompts: Sequence[Prompt],
    policy: Sequence[Steering],
    sampling: SamplingConfig,
    progress: bool | str = False,
    pool: WorkerPool | None = None,
    contrast: Sequence[Prompt] = (),
) -> Measurement:
    """Greedy answers of ``policy`` to ``prompts``: oracle score and fluency metrics.

    Args:
        lm: the model; policy: the steerings applied (empty: unsteered).
        sampling: ``max_new_tokens`` and ``batch_size`` are used (answers are greedy).
        progress: a progress-bar label, or false.
        pool: where the answers are generated and scored (default: this process);
            perplexities are always computed here.
        contrast: contrast prompts, answered in the same batches; their mean oracle score
            is the measurement's ``contrast_score`` (fluency is measured on ``prompts``).
    """
    pool = pool or LocalPool(lm)
    if not isinstance(oracle, ScoreOracle):
        raise SimsError(
            f"the fluency guard needs an oracle with scores; {oracle.name} has none "
            "(turn the guard off with --fluency-budget off)"
        )
    greedy = sampling.as_greedy()
    asked = [p.text for p in [*prompts, *contrast]]
    answers = [g[0].text for g in pool.generate(asked, 1, greedy, list(policy), progress=progress)]
    all_scores = [float(x) for x in pool.score(oracle, asked, answers)]
    texts, scores = answers[: len(prompts)], all_scores[: len(prompts)]
    contrast_scores = all_scores[len(prompts) :]
    ppl = [p for p in perplexities(lm, [p.text for p in prompts], texts) if not math.isnan(p)]
    n = len(texts)
    return Measurement(
        score=float(sum(scores) / n),
        perplexity=math.exp(sum(math.log(p) for p in ppl) / len(ppl)) if ppl else math.nan,
        repetition=sum(repetition_rate(t) for t in texts) / n,
        loop_share=sum(ends_in_loop(t) for t in texts) / n,
        distinct_2=distinct_n(texts, 2),
        contrast_score=float(sum(contrast_scores) / len(contrast_scores)) if contrast_scores else None,
        prompt_scores=scores,
    )


def is_fluent(point: Measurement | CalibrationPoint, base: Measurement, config: GuardConfig) -> bool:
    """Within the guard's budgets: fluency and, when measured, the contrast budget."""
    assert config.fluency_budget is not None
    contrast_ok = (
        point.contrast_score is None
        or base.contrast_score is None
        or point.contrast_score <= base.contrast_score + config.contrast_budget + 1e-12
    )
    return (
        point.perplexity <= (1 + config.fluency_budget) * base.perplexity
        and point.repetition <= base.repetition + config.repetition_margin
        and contrast_ok
    )


def calibrate(
    base_strength: float,
    base: Measurement,
    config: GuardConfig,
    measure_at: MeasureFn,
    done: Sequence[CalibrationPoint] = (),
    on_point: PointsCallback | None = None,
) -> CalibrationRecord:
    """Measure a fit at the strengths of the grid and choose one (a pure step).

    The grid is scanned in ascending order; with ``config.stop_at_unfluent`` the scan
    ends at the first strength that is not fluent. Points in ``done`` (a resumed
    calibration) are not measured again; ``on_point`` gets every point so far after each
    new one, so the caller can save them as they finish.

    Args:
        base_strength: the fit's own strength; multiplier m is measured at m x it.
        base: the unsteered model's measurement (the fluency reference).
        config: the guard's settings.
        measure_at: measures the candidate at ``(multiplier, strength)``.
        done: points measured before.
        on_point: progress callback (see above).

    Returns:
        the points scanned and the chosen multiplier (best fluent score; ``None`` if no
        strength is fluent).

    Example:
        >>> def measure_at(m, s):
        ...     return measure(lm, oracle, prompts, [fit.with_strength(s)], sampling)
        >>> record = calibrate(fit.strength, base, GuardConfig(), measure_at)
        >>> record.chosen, record.chosen_point.strength
    """
    measured = {p.multiplier: p for p in done}
    grid = sorted(config.strength_grid)
    points = []
    for m in grid:
        if m not in measured:
            strength = base_strength * m
            result = measure_at(m, strength)
            measured[m] = CalibrationPoint.measured(m, strength, result, is_fluent(result, base, config))
            if on_point is not None:
                on_point([measured[k] for k in grid if k in measured])
        points.append(measured[m])
        if config.stop_at_unfluent and not measured[m].fluent:
            break
    fluent = [p for p in points if p.fluent]
    chosen = max(fluent, key=lambda p: (p.score, -p.multiplier)) if fluent else None
    return CalibrationRecord(
        base=base,
        points=tuple(points),
        chosen=None if chosen is None else chosen.multiplier,
        score=None if chosen is None else chosen.score,
    )


def early_stop(history: Sequence[float], patience: int) -> bool:
    """True when the last ``patience`` values did not beat the best one before them.

    ``history`` holds the best fluent calibration score of each policy, the unsteered
    model's first.
    """
    if patience <= 0 or len(history) <= patience:
        return False
    best_before = max(history[:-patience])
    return all(v <= best_before for v in history[-patience:])


class FluencyGuard:
    """The guard's steps for :class:`simsteer.loop.sims.SIMS`: measure, calibrate, decide
    to stop, pick the final policy (:mod:`simsteer.loop.final_policy`). It saves nothing;
    the loop does."""

    def __init__(
        self,
        lm: LoadedModel,
        oracle: Oracle,
        config: GuardConfig,
        sampling: SamplingConfig,
        pool: WorkerPool | None = None,
    ) -> None:
        self.lm = lm
        self.oracle = oracle
        self.config = config
        self.sampling = sampling
        self.pool = pool or LocalPool(lm)

    def measure_base(
        self, prompts: Sequence[Prompt], progress: bool | str = False, contrast: Sequence[Prompt] = ()
    ) -> Measurement:
        """The unsteered model's score and fluency on the calibration prompts (and its
        score on the contrast prompts, if any)."""
        return measure(self.lm, self.oracle, prompts, [], self.sampling, progress, self.pool, contrast)

    def calibrate(
        self,
        prompts: Sequence[Prompt],
        previous: Sequence[Steering],
        candidate: Steering,
        base: Measurement,
        done: Sequence[CalibrationPoint] = (),
        on_point: PointsCallback | None = None,
        progress: bool | str = False,
        contrast: Sequence[Prompt] = (),
    ) -> CalibrationRecord:
        """Calibrate ``candidate`` (stacked on ``previous``) on ``prompts`` and the
        ``contrast`` prompts; see :func:`calibrate`."""

        def measure_at(m: float, strength: float) -> Measurement:
            label = f"{progress} x{m:g}" if isinstance(progress, str) else progress
            scaled = candidate.with_strength(strength)
            policy = [*previous, scaled]
            return measure(self.lm, self.oracle, prompts, policy, self.sampling, label, self.pool, contrast)

        return calibrate(candidate.strength, base, self.config, measure_at, done, on_point)

    def frontier_title(self, t: int, contrast: bool = False) -> str:
        contrast_part = f", +{self.config.contrast_budget:g} contrast score" if contrast else ""
        return (
            f"iteration {t}: strength frontier of policy {t + 1} (budget "
            f"+{self.config.fluency_budget:.0%} perplexity, "
            f"+{self.config.repetition_margin} repetition{contrast_part})"
        )

    def stop_reason(self, calibration: CalibrationRecord, earlier: Sequence[CalibrationRecord]) -> str | None:
        """Why the loop stops after this calibration, or ``None`` to go on.

        Args:
            calibration: the calibration of iteration t.
            earlier: those of iterations 0 .. t - 1.
        """
        cfg = self.config
        if calibration.chosen is None:
            contrast = (
                f" and the contrast prompts' score within +{cfg.contrast_budget:g}"
                if calibration.base.contrast_score is not None
                else ""
            )
            return (
                f"no strength in {list(cfg.strength_grid)} keeps perplexity within "
                f"+{cfg.fluency_budget:.0%} and repetition within +{cfg.repetition_margin}"
                f"{contrast} of the unsteered model; keeping the best policy so far"
            )
        scores = calibration_scores(calibration.base, [*earlier, calibration])
        if early_stop(scores, cfg.patience):
            best = max(range(len(scores)), key=scores.__getitem__)
            return (
                f"the fluent calibration score {scores[-1]:+.3f} did not beat "
                f"{max(scores[: -cfg.patience]):+.3f} (policy {best}) for {cfg.patience} "
                "iteration(s); keeping the best policy"
            )
        return None

    def final_index(self, history: Sequence[IterationRecord]) -> int:
        """Which policy a run returns (see :func:`simsteer.loop.final_policy.final_index`)."""
        return final_index(history, self._rule)

    def selection(self, history: Sequence[IterationRecord]) -> Selection | None:
        """The ``selection`` section of ``outcome.json`` (``None`` without the guard)."""
        return final_selection(history, self._rule)

    @property
    def _rule(self) -> str | None:
        """The final-policy rule, ``None`` without the guard."""
        return self.config.selection if self.config.enabled else None
