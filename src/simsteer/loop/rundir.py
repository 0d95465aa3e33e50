"""The layout of a run directory. Every artefact is written atomically and a step counts
as done when its artefact exists, which is what ``--resume`` relies on.

::

    RUN/
      config.json                 resolved configuration (model, oracle, learner, loop)
      prompts.jsonl               the training pool in the order it is drawn
      eval_prompts.jsonl          held-out prompts scored for every policy
      calibration_prompts.jsonl   held-out prompts the fluency guard calibrates on
      calibration_base.json       the unsteered model's score and fluency on them
      contrast_prompts.jsonl      the guard's contrast prompts (only when the run has them)
      iter_<t>/eval.jsonl         greedy answers of policy t to the held-out prompts
      iter_<t>/samples.jsonl      K samples per prompt with scores, win rates, labels
      iter_<t>/train_pairs.jsonl  SIMS-CS: the bank's D+ / D- pairs trained on
      iter_<t>/bank.pending.jsonl SIMS-CS: the bank after iteration t, only until it
                                  replaces bank.jsonl (after samples.jsonl is committed)
      iter_<t>/activations.safetensors   D+ / D- summaries learned from
      iter_<t>/fitted/            the learner's raw output at iteration t
      iter_<t>/calibration.jsonl  the guard's frontier: strength -> score, fluency
      iter_<t>/frontier.png       the same, plotted
      iter_<t>/steering/          steering of policy t (t >= 1), at the chosen strength
      iter_<t>/summary.json       the iteration's row of the summary table
      summary.json                all rows, written at the end
      outcome.json                final policy vs unsteered on the held-out prompts
      bank.jsonl                  SIMS-CS: the response bank after the last sampled iteration
      final/                      the last policy's steering

The rows are typed (:mod:`simsteer.loop.records`); the ``read_*`` methods, :meth:`RunDir.spec`,
:meth:`RunDir.history` and :meth:`RunDir.is_complete` are how anybody reads a run. Only
the loop (:class:`simsteer.loop.sims.SIMS`) writes one, through :func:`create_run` and
:func:`resume_run`, which hold the run's lock (``RUN/.sims.lock``, naming the writer's pid)
while it writes.

Crash safety: every file and folder above is committed by one rename
(:mod:`simsteer.io`); the initial files (the prompt files and ``config.json``) are committed
together, as the run directory itself. A step is done when its committed artefact is
there: a file, or a complete steering folder. A killed writer leaves only hidden
temporaries, swept when the run is resumed. The one step with two files outside one
folder, SIMS-CS's sampling (``samples.jsonl`` marks it done; ``bank.jsonl`` is shared by
all iterations), commits the new bank as ``iter_<t>/bank.pending.jsonl`` before the
samples and moves it to ``bank.jsonl`` after them, so that ``bank.jsonl`` is never ahead
of the committed samples and a redone step starts from the same bank.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SimsError
from ..io import (
    exclusive_lock,
    is_temporary,
    process_alive,
    read_json,
    read_jsonl,
    staged_dir,
    sweep_temporaries,
)
from ..prompts import Prompt
from ..schema import SchemaError
from ..steering import CONFIG_NAME, WEIGHTS_NAME
from .bank import BankConfig, BankEntry, ResponseBank
from .outcome import OutcomeRecord
from .records import CalibrationPoint, EvalRecord, IterationRecord, Measurement, SampleRecord, TrainingPair
from .spec import RunSpec

#: The lock file of a run directory; it holds the pid of the process writing the run.
LOCK_NAME = ".sims.lock"

#: The files a run directory starts with besides ``config.json`` (committed with it).
INITIAL_FILES = frozenset(
    {"prompts.jsonl", "eval_prompts.jsonl", "calibration_prompts.jsonl", "contrast_prompts.jsonl"}
)


@dataclass(frozen=True)
class RunDir:
    """The paths of a run directory (see the module docstring) and typed readers.

    Example:
        >>> run = RunDir("runs/sims")
        >>> [row.eval_score for row in run.history()], run.is_complete()
    """

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))  # RunDir("runs/sims") works too

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def prompts(self) -> Path:
        return self.root / "prompts.jsonl"

    @property
    def eval_prompts(self) -> Path:
        return self.root / "eval_prompts.jsonl"

    @property
    def calibration_prompts(self) -> Path:
        return self.root / "calibration_prompts.jsonl"

    @property
    def contrast_prompts(self) -> Path:
        return self.root / "contrast_prompts.jsonl"

    @property
    def calibration_base(self) -> Path:
        return self.root / "calibration_base.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def outcome(self) -> Path:
        return self.root / "outcome.json"

    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def bank(self) -> Path:
        return self.root / "bank.jsonl"

    def iteration(self, t: int) -> Path:
        return self.root / f"iter_{t}"

    def eval(self, t: int) -> Path:
        return self.iteration(t) / "eval.jsonl"

    def samples(self, t: int) -> Path:
        return self.iteration(t) / "samples.jsonl"

    def activations(self, t: int) -> Path:
        return self.iteration(t) / "activations.safetensors"

    def fitted(self, t: int) -> Path:
        return self.iteration(t) / "fitted"

    def calibration(self, t: int) -> Path:
        return self.iteration(t) / "calibration.jsonl"

    def frontier(self, t: int) -> Path:
        return self.iteration(t) / "frontier.png"

    def steering(self, t: int) -> Path:
        return self.iteration(t) / "steering"

    def pairs(self, t: int) -> Path:
        return self.iteration(t) / "train_pairs.jsonl"

    def pending_bank(self, t: int) -> Path:
        return self.iteration(t) / "bank.pending.jsonl"

    def iteration_summary(self, t: int) -> Path:
        return self.iteration(t) / "summary.json"

    @property
    def lock_file(self) -> Path:
        return self.root / LOCK_NAME

    def is_run(self) -> bool:
        return self.config.is_file()

    def has_steering(self, path: Path) -> bool:
        """Whether ``path`` is a complete steering folder (a finished fit or policy)."""
        return (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()

    def has_final(self) -> bool:
        """Whether ``final/`` holds a complete policy (one steering, or ``step_1/`` on)."""
        return self.has_steering(self.final) or self.has_steering(self.final / "step_1")

    # -- typed readers -------------------------------------------------------------
    def spec(self) -> RunSpec:
        """The run's :class:`~simsteer.loop.spec.RunSpec` (``config.json``)."""
        if not self.is_run():
            raise SimsError(f"{self.root} is not a run directory (no config.json)")
        return RunSpec.from_json(read_json(self.config), source=str(self.config))

    def history(self) -> list[IterationRecord]:
        """The iteration rows written so far, in order (one per finished iteration)."""
        rows = []
        while self.iteration_summary(len(rows)).is_file():
            rows.append(self.read_iteration(len(rows)))
        return rows

    def read_iteration(self, t: int) -> IterationRecord:
        """Iteration t's row (``iter_<t>/summary.json``)."""
        path = self.iteration_summary(t)
        return _parse(path, IterationRecord.from_json, read_json(path))

    def is_complete(self) -> bool:
        """Every iteration has its row (or the last row stops the loop) and ``final/`` exists."""
        if not self.is_run() or not self.has_final():
            return False
        rows = self.history()
        if rows and rows[-1].stop:
            return True
        return len(rows) == self.spec().sims.iterations + 1

    def read_prompts(self, path: Path) -> list[Prompt]:
        """One of the run's prompt files (``prompts``, ``eval_prompts``, ...); empty if absent."""
        return _rows(path, Prompt.from_json)

    def read_eval(self, t: int) -> list[EvalRecord]:
        """Policy t's answers to the held-out prompts (empty if none were written)."""
        return _rows(self.eval(t), EvalRecord.from_json)

    def read_samples(self, t: int) -> list[SampleRecord]:
        return _rows(self.samples(t), SampleRecord.from_json)

    def read_pairs(self, t: int) -> list[TrainingPair] | None:
        """Iteration t's SIMS-CS pairs, ``None`` if it wrote none (the other variants)."""
        return _rows(self.pairs(t), TrainingPair.from_json) if self.pairs(t).is_file() else None

    def read_bank(self, config: BankConfig | None = None, pending: int | None = None) -> ResponseBank:
        """The SIMS-CS response bank (empty if there is none yet); every row is checked.

        Args:
            config: the bank's options.
            pending: read iteration ``pending``'s bank that is not in ``bank.jsonl`` yet.
        """
        path = self.bank if pending is None else self.pending_bank(pending)
        return ResponseBank(tuple(_rows(path, BankEntry.from_json)), config or BankConfig())

    def read_calibration(self, t: int) -> list[CalibrationPoint]:
        """The guard's points measured so far for iteration t's fit."""
        return _rows(self.calibration(t), CalibrationPoint.from_json)

    def read_calibration_base(self) -> Measurement | None:
        if not self.calibration_base.is_file():
            return None
        return _parse(self.calibration_base, Measurement.from_json, read_json(self.calibration_base))

    def read_outcome(self) -> OutcomeRecord | None:
        """``outcome.json`` (:class:`~simsteer.loop.outcome.OutcomeRecord`), if written."""
        if not self.outcome.is_file():
            return None
        return _parse(self.outcome, OutcomeRecord.from_json, read_json(self.outcome))


def is_half_prepared(root: Path) -> bool:
    """Whether ``root`` is a run killed while it was being prepared: a folder with some of
    the initial files (:data:`INITIAL_FILES`) and nothing else but temporaries and the
    lock, no ``config.json``. Today the initial files are committed together with
    ``config.json`` (:func:`create_run`), so only an older simsteer or a copy interrupted
    half-way leaves one; ``sims run -o`` starts it over.
    """
    if not root.is_dir() or RunDir(root).is_run():
        return False
    names = [p.name for p in root.iterdir() if not is_temporary(p.name) and p.name != LOCK_NAME]
    return bool(names) and all(name in INITIAL_FILES and (root / name).is_file() for name in names)


def check_new_run_dir(root: Path) -> None:
    """Refuse, before anything is loaded, a folder a new run cannot be started in: one
    that holds anything but a killed writer's temporaries, the lock or a half-prepared run
    (:func:`is_half_prepared`).

    Raises:
        SimsError: one line naming the folder.
    """
    if RunDir(root).is_run():
        raise SimsError(f"{root} already holds a run: continue it with --resume {root} or pick --out")
    if root.exists() and not root.is_dir():
        raise SimsError(f"{root} exists and is not a folder: pick another --out")
    if not root.is_dir() or is_half_prepared(root):
        return
    if any(not is_temporary(p.name) and p.name != LOCK_NAME for p in root.iterdir()):
        raise SimsError(f"{root} exists and is not an empty run directory: pick another --out")


@contextmanager
def create_run(run: RunDir, write: Callable[[RunDir], None]) -> Iterator[None]:
    """Start the run directory ``run`` in one step and hold its lock inside the block.

    ``write`` fills a staged copy of the run directory with the initial files; it is
    renamed to ``run.root`` in one step, so a kill leaves either no run or a run with all
    of its initial files. ``run.root`` may exist if it is empty, holds only a killed
    writer's temporaries, or is a run killed while it was being prepared
    (:func:`is_half_prepared`, started over).

    Args:
        run: the run directory to create.
        write: writes the initial files into the staged :class:`RunDir` it is given.

    Raises:
        SimsError: ``run.root`` holds other files, or another process created the run
            meanwhile.
    """
    root = run.root.resolve() if run.root.is_symlink() else run.root
    _sweep_staged_roots(root)
    check_new_run_dir(run.root)
    if root.is_dir() and any(root.iterdir()):
        # A killed writer's temporaries, or a run killed while it was being prepared: no
        # run to lose, started over. The staged run replaces only an empty folder, so the
        # old lock goes too (held meanwhile: nobody else is cleaning it).
        with exclusive_lock(root / LOCK_NAME, f"run directory {run.root}"):
            for path in root.iterdir():
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
    with ExitStack() as stack:
        try:
            with staged_dir(root, replace=False) as tmp:
                # Locked before the rename, so the run is never visible unlocked.
                stack.enter_context(exclusive_lock(tmp / LOCK_NAME, f"run directory {run.root}"))
                write(RunDir(tmp))
        except OSError as exc:
            if RunDir(root).is_run():
                raise SimsError(f"{run.root} was started by another process meanwhile") from None
            raise SimsError(f"cannot create the run directory {run.root}: {exc.strerror or exc}") from None
        yield


@contextmanager
def resume_run(run: RunDir) -> Iterator[None]:
    """Hold the lock of the existing run ``run`` inside the block, after sweeping the
    temporaries a killed writer left.

    Raises:
        SimsError: another process is writing the run (the message names its pid).
    """
    with exclusive_lock(run.lock_file, f"run directory {run.root}"):
        sweep_temporaries(run.root)
        _sweep_staged_roots(run.root)
        yield


@contextmanager
def report_lock(folder: Path) -> Iterator[None]:
    """Hold the lock of ``folder`` inside the block when it is a run (or baseline) folder,
    so that a study (``sims eval``) writing its reports there never races the loop, and
    sweep the temporaries a killed writer left; any other folder is not locked.

    Raises:
        SimsError: another process is writing the run (the message names its pid).
    """
    run = RunDir(folder)
    if not run.is_run():
        yield
        return
    with exclusive_lock(run.lock_file, f"run directory {folder}"):
        sweep_temporaries(run.root)
        yield


def _sweep_staged_roots(root: Path) -> None:
    """Delete staged copies of ``root`` (``.<name>.<pid>.<random>.tmp`` next to it) whose
    writer is dead: a run that was killed before it was created."""
    if not root.parent.is_dir():
        return
    for path in root.parent.glob(f".{root.name}.*.tmp"):
        pid = path.name[len(root.name) + 2 :].split(".")[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _rows(path: Path, parse: Callable[[Any], Any]) -> list[Any]:
    if not path.is_file():
        return []
    return [_parse(path, parse, row, f" row {i}") for i, row in enumerate(read_jsonl(path), 1)]


def _parse(path: Path, parse: Callable[[Any], Any], data: Any, where: str = "") -> Any:
    """``parse(data)``; a row this version cannot read is one clear error naming the file
    (and ``where`` in it, the row of a JSONL file) and the field."""
    try:
        return parse(data)
    except SchemaError as exc:  # a field of the wrong type, or missing
        raise SimsError(f"{path}{where}: {exc}") from None
    except (KeyError, TypeError) as exc:
        raise SimsError(
            f"{path}{where} was not written by this simsteer version ({type(exc).__name__}: {exc})"
        ) from None
