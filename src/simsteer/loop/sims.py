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
finished step is never redone on ``resume``. :class:`SIMS` is the only code that writes a
run directory: what each step computes is a pure function (:mod:`simsteer.loop.steps`,
selection, calibration, the outcome) that returns typed records
(:mod:`simsteer.loop.records`), and the loop saves them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..activations import collect_preference_activations
from ..errors import SimsError
from ..generation.engines import choose_engine
from ..io import atomic_write_bytes, fsync_dir, write_json, write_jsonl
from ..learners.base import Learner, PreferenceActivations
from ..models import LoadedModel, parse_layers
from ..oracles.base import Oracle
from ..policy import Policy
from ..prompts import Prompt
from ..steering import Steering
from ..workers.pool import LocalPool, WorkerPool
from .activation_store import load_preference_activations, save_preference_activations
from .calibration import FluencyGuard
from .config import SIMSConfig
from .outcome import run_outcome
from .plots import render_frontier
from .prompt_sets import PromptSplit, split_prompts
from .records import CalibrationPoint, CalibrationRecord, EvalRecord, FitRecord, IterationRecord
from .rundir import RunDir, create_run, resume_run
from .selection import Selection
from .spec import RunSpec
from .steps import fit_steering, fluency, held_out_answers, iteration_row, run_spec, sample_and_select
from .stopwatch import Stopwatch
from .table import TABLE_HEADER, format_row

log = logging.getLogger(__name__)

StepCallback = Callable[[str, int], None]


@dataclass
class SIMSResult:
    """What :meth:`SIMS.fit` returns: the final policy and the summary rows."""

    policy: Policy
    history: list[IterationRecord]
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
        lm: LoadedModel,
        oracle: Oracle,
        learner: Learner,
        config: SIMSConfig | None = None,
        progress: bool = True,
        callback: StepCallback | None = None,
        workers: WorkerPool | None = None,
    ) -> None:
        """Set up the loop.

        Args:
            lm, oracle, learner, config: the model, the oracle, the learner and the
                loop's settings.
            progress: show progress bars and the summary table.
            callback: called with (step, iteration) after each step is saved.
            workers: where sampling, model-based judging and collection run (default:
                this process, :class:`~simsteer.workers.LocalPool`); any pool gives
                the same artefacts, so a run may be resumed with another one. The
                caller closes it.
        """
        self.lm = lm
        self.oracle = oracle
        self.learner = learner
        self.config = config or SIMSConfig()
        self.progress = progress
        self.callback = callback
        self.layers = parse_layers(learner.config.layers, lm.num_layers)
        self.workers = workers or LocalPool(lm)
        self.guard = FluencyGuard(lm, oracle, self.config.guard, self.config.sampling, self.workers)

    # -- public ------------------------------------------------------------------
    def fit(
        self,
        prompts: Sequence[Prompt | str],
        run_dir: str | Path,
        eval_prompts: Sequence[Prompt | str] | None = None,
        prompt_sources: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        contrast_prompts: Sequence[Prompt | str] | None = None,
    ) -> SIMSResult:
        """Run (or resume) the loop in ``run_dir`` and return the final policy.

        The final policy is the last one, or with the fluency guard on, the best fluent
        one (the loop may stop early; the last summary row says why).

        Args:
            prompts: the prompt pool.
            eval_prompts: held-out prompts; by default ``config.eval_prompts`` are split
                off the pool.
            prompt_sources: where the prompts came from (``{"prompts": PATH, ...}``),
                recorded in ``config.json`` (:attr:`RunSpec.prompts`).
            extra: what a study records next to the run (a random-split baseline's kind,
                the run it mirrors and its evaluation oracle; :attr:`RunSpec.extra`).
            contrast_prompts: prompts on which the steered behaviour must not appear: the
                guard keeps only strengths under which the oracle's mean score on them
                rises by at most ``config.guard.contrast_budget`` (needs the guard; a
                resumed run reads its own).

        Raises:
            SimsError: resuming with other settings than the run was started with (each
                differing field is named with both values).
        """
        run = RunDir(Path(run_dir))
        spec = run_spec(self.lm, self.oracle, self.learner, self.layers, self.config, prompt_sources, extra)
        with self._open(run, prompts, eval_prompts, spec, contrast_prompts) as split:
            return self._loop(run, split)

    def _loop(self, run: RunDir, split: PromptSplit) -> SIMSResult:
        """The iterations, the summary, the outcome and ``final/`` (the run is locked)."""
        history: list[IterationRecord] = []
        if self.progress:
            tqdm.write(TABLE_HEADER)
        for t in range(self.config.iterations + 1):
            history.append(self._iteration(run, t, split, history))
            if self.progress:
                tqdm.write(format_row(history[-1]))
                if history[-1].stop:
                    tqdm.write(f"stopped: {history[-1].stop}")
            if history[-1].stop:
                break
        write_json(run.summary, [row.to_json() for row in history])
        best = self.guard.final_index(history)
        selection = self.guard.selection(history)
        outcome = run_outcome(history, run.read_eval(0), run.read_eval(best), best, selection)
        write_json(run.outcome, outcome.to_json())
        policy = Policy(self._policy(run, best)).with_metadata(policy_iteration=best)
        # An empty policy (the unsteered model was best) is saved as a steering without layers.
        # The save replaces an older final/ in one step (a resumed, finished run).
        policy.save(
            run.final,
            steps=self.config.compose,
            fingerprint=self.lm.fingerprint(),
            learner=self.learner.name,
            metadata={"policy_iteration": best},
        )
        return SIMSResult(policy=policy, history=history, run_dir=run.root)

    @contextmanager
    def _open(
        self,
        run: RunDir,
        prompts: Sequence[Prompt | str],
        eval_prompts: Sequence[Prompt | str] | None,
        spec: RunSpec,
        contrast_prompts: Sequence[Prompt | str] | None = None,
    ) -> Iterator[PromptSplit]:
        """Lock the run directory for the block and give its prompt split: a new run's
        (its initial files committed in one step) or a resumed run's, reloaded."""
        if run.is_run():
            with resume_run(run):
                yield self._check_resume(run, spec)
            return
        split = split_prompts(self.config, prompts, eval_prompts, contrast_prompts)
        if self.learner.needs_contrast and not split.contrast:
            raise SimsError(
                f"learner {self.learner.name} fits on contrast prompts (prompts the steering must "
                "leave alone): give them with --contrast-prompts FILE"
            )

        def write_initial(staged: RunDir) -> None:
            for path, part in (
                (staged.prompts, split.train),
                (staged.eval_prompts, split.eval),
                (staged.calibration_prompts, split.calibration),
            ):
                write_jsonl(path, [{"id": p.id, "prompt": p.text} for p in part])
            if split.contrast:
                write_jsonl(staged.contrast_prompts, [{"id": p.id, "prompt": p.text} for p in split.contrast])
            write_json(staged.config, spec.to_json())

        with create_run(run, write_initial):
            yield split

    # -- steps -------------------------------------------------------------------
    def _iteration(
        self, run: RunDir, t: int, split: PromptSplit, history: list[IterationRecord]
    ) -> IterationRecord:
        """Iteration t on policy pi_t (``history``: the rows of iterations 0 .. t - 1)."""
        if run.iteration_summary(t).is_file():
            return run.read_iteration(t)
        cfg = self.config
        last = t == cfg.iterations
        policy = self._policy(run, t)
        watch = Stopwatch()
        with watch("eval"):
            evals = self._step_eval(run, t, split.eval, policy)
            eval_fluency = fluency(self.lm, evals)
        with watch("sample_and_rank"):
            selection = self._step_sample(run, t, split.train, policy)

        tokens_forward = fit = calibration = stop = None
        if not last:
            with watch("collect"):
                data, tokens_forward = self._step_collect(run, t, selection)
            with watch("fit"):
                fit = self._step_fit(run, t, data, policy)
            if cfg.guard.enabled:
                previous = policy if cfg.compose else []
                with watch("calibrate"):
                    calibration = self._step_calibrate(run, t, split.calibration, previous, split.contrast)
                earlier = [row.calibration for row in history if row.calibration is not None]
                stop = self.guard.stop_reason(calibration, earlier)
        sample_fluency = fluency(self.lm, selection.samples)
        steps = (tokens_forward, fit, calibration, stop, watch.seconds)
        # The engine that sampled policy t (what ``--engine auto`` chose for it); also logged.
        engine = choose_engine(cfg.sampling.engine, self.lm, policy)
        row = iteration_row(t, policy, evals, eval_fluency, selection, sample_fluency, *steps, engine)
        write_json(run.iteration_summary(t), row.to_json())
        self._notify("summary", t)
        return row

    def _step_eval(
        self, run: RunDir, t: int, held_out: list[Prompt], policy: list[Steering]
    ) -> list[EvalRecord]:
        if not held_out:
            return []
        if run.eval(t).is_file():
            return run.read_eval(t)
        rows = held_out_answers(
            self.lm, self.oracle, self.config, t, held_out, policy, self._bar(f"iter {t} eval"), self.workers
        )
        write_jsonl(run.eval(t), [r.to_json() for r in rows])
        self._notify("eval", t)
        return rows

    def _step_sample(self, run: RunDir, t: int, train: list[Prompt], policy: list[Steering]) -> Selection:
        """Sample, judge and select; for ``cs`` also the bank after iteration t.

        ``samples.jsonl`` marks the step done, so it is committed last. A ``cs`` bank is
        first committed beside it (``iter_<t>/bank.pending.jsonl``) and only replaces
        ``RUN/bank.jsonl`` once the samples are in: until then ``RUN/bank.jsonl`` is the
        bank before iteration t, which a redone step starts from again.
        """
        if run.samples(t).is_file():
            # Resumed: the samples, and for cs the pairs and the bank, are on disk.
            pairs = run.read_pairs(t)
            if pairs is None:
                return Selection(run.read_samples(t), None, None)
            self._promote_bank(run, t)
            return Selection(run.read_samples(t), pairs, run.read_bank(self.config.bank))
        cfg = self.config
        bank = run.read_bank(cfg.bank) if cfg.variant == "cs" else None
        selection = sample_and_select(
            self.lm, self.oracle, cfg, t, train, policy, bank, self._bar(f"iter {t} sample"), self.workers
        )
        if selection.bank is not None and selection.pairs is not None:
            write_jsonl(run.pending_bank(t), selection.bank.to_json())
            write_jsonl(run.pairs(t), [p.to_json() for p in selection.pairs])
        write_jsonl(run.samples(t), [r.to_json() for r in selection.samples])
        self._promote_bank(run, t)
        self._notify("sample", t)
        return selection

    def _promote_bank(self, run: RunDir, t: int) -> None:
        """Make iteration t's committed bank ``RUN/bank.jsonl`` (a no-op once it is)."""
        pending = run.pending_bank(t)
        if pending.is_file():
            atomic_write_bytes(run.bank, pending.read_bytes())
            pending.unlink()  # a kill before this: the same bytes are promoted again
            fsync_dir(pending.parent)

    def _step_collect(
        self, run: RunDir, t: int, selection: Selection
    ) -> tuple[PreferenceActivations | None, int]:
        self.learner.prepare(self.lm)  # learners that need the model at fit time (ActAdd)
        self.learner.prepare_contrast([p.text for p in run.read_prompts(run.contrast_prompts)])
        kind = self.learner.needs
        if kind == "none":
            log.info("iteration %d: learner %s ignores D+ and D-", t, self.learner.name)
            return collect_preference_activations(self.lm, kind, [], [], 0, [], self.layers)
        path = run.activations(t)
        if path.is_file():
            saved = load_preference_activations(path)
            if saved[0].layers != self.layers or saved[0].positive.shape[-1] != self.lm.hidden_size:
                raise SimsError(f"{path} does not hold this run's layers of width {self.lm.hidden_size}")
            return saved
        chosen = selection.training()
        pos = [r for r in chosen if r.label == "positive"]
        neg = [r for r in chosen if r.label == "negative"]
        if not pos or not neg:
            log.warning("iteration %d: no contrast (D+ %d, D- %d); the policy is kept", t, len(pos), len(neg))
            return None, 0
        groups = {pid: i for i, pid in enumerate(dict.fromkeys(r.prompt_id for r in chosen))}
        data, forward_tokens = self.workers.collect(
            kind,
            [r.prompt for r in pos + neg],
            [r.response for r in pos + neg],
            len(pos),
            [groups[r.prompt_id] for r in pos + neg],
            self.layers,
            summary=self.config.summary,
            batch_size=self.config.activation_batch_size,
            max_response_tokens=getattr(self.learner.config, "max_response_tokens", 32),
            progress=self._bar(f"iter {t} collect"),
        )
        save_preference_activations(path, data, forward_tokens)
        self._notify("collect", t)
        return data, forward_tokens

    def _step_fit(
        self, run: RunDir, t: int, data: PreferenceActivations | None, policy: list[Steering]
    ) -> FitRecord:
        # With the guard on, the raw fit waits in fitted/ until a strength is chosen.
        target = run.fitted(t) if self.config.guard.enabled else run.steering(t + 1)
        if run.has_steering(target):
            saved = Steering.load(target)
            return FitRecord(self.learner.name, bool(saved.metadata.get("carried_over", False)))
        steering = fit_steering(self.lm, self.learner, t, data, policy)
        steering.save(target)
        self._notify("fit", t)
        return FitRecord(self.learner.name, data is None)

    def _step_calibrate(
        self, run: RunDir, t: int, prompts: list[Prompt], previous: list[Steering], contrast: list[Prompt]
    ) -> CalibrationRecord:
        """The guard's strength for iteration t's fit; saves policy t + 1 at it."""
        base = run.read_calibration_base()
        if base is None:
            base = self.guard.measure_base(prompts, self._bar("calibration base"), contrast)
            write_json(run.calibration_base, base.to_json())
        candidate = Steering.load(run.fitted(t))

        def save_points(points: list[CalibrationPoint]) -> None:
            # Each point is saved as it finishes, so a resumed calibration skips it.
            write_jsonl(run.calibration(t), [p.to_json() for p in points])

        calibration = self.guard.calibrate(
            prompts,
            previous,
            candidate,
            base,
            done=run.read_calibration(t),
            on_point=save_points,
            progress=self._bar(f"iter {t} calibrate"),
            contrast=contrast,
        )
        title = self.guard.frontier_title(t, bool(contrast))
        png = render_frontier(calibration.points, base, self.config.guard, title)
        atomic_write_bytes(run.frontier(t), png)
        chosen = calibration.chosen_point
        # Done is a complete steering folder, so a save killed half-way is redone.
        if chosen is not None and not run.has_steering(run.steering(t + 1)):
            policy_next = candidate.with_strength(chosen.strength).with_metadata(
                calibrated_multiplier=chosen.multiplier
            )
            policy_next.save(run.steering(t + 1))
        self._notify("calibrate", t)
        return calibration

    # -- helpers -----------------------------------------------------------------
    def _policy(self, run: RunDir, t: int) -> list[Steering]:
        """pi_t as a stack of steerings (one element unless composing)."""
        if t == 0:
            return []
        if not self.config.compose:
            return [Steering.load(run.steering(t))]
        return [Steering.load(run.steering(s)) for s in range(1, t + 1)]

    def _check_resume(self, run: RunDir, spec: RunSpec) -> PromptSplit:
        """Reload a run's prompts, after checking it was started with ``spec``'s settings."""
        diffs = run.spec().mismatches(spec)
        if diffs:
            raise SimsError(
                f"{run.root} was started with other loop settings; resume it with the same ones "
                f"({'; '.join(diffs)})"
            )
        if spec.sims.variant == "cs":
            # A damaged bank is refused now, before the resume writes anything.
            run.read_bank()
            for t in range(spec.sims.iterations + 1):
                run.read_bank(pending=t)
        return PromptSplit(
            run.read_prompts(run.prompts),
            run.read_prompts(run.eval_prompts),
            run.read_prompts(run.calibration_prompts),
            run.read_prompts(run.contrast_prompts),
        )

    def _bar(self, label: str) -> bool | str:
        return label if self.progress else False

    def _notify(self, step: str, t: int) -> None:
        if self.callback is not None:
            self.callback(step, t)
