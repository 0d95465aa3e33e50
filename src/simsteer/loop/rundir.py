"""The layout of a run directory. Every artefact is written atomically and a step counts
as done when its artefact exists, which is what ``--resume`` relies on.

::

    RUN/
      config.json                 resolved configuration (model, oracle, learner, loop)
      prompts.jsonl               the training pool in the order it is drawn
      eval_prompts.jsonl          held-out prompts scored for every policy
      calibration_prompts.jsonl   held-out prompts the fluency guard calibrates on
      calibration_base.json       the unsteered model's score and fluency on them
      iter_<t>/eval.jsonl         greedy answers of policy t to the held-out prompts
      iter_<t>/samples.jsonl      K samples per prompt with scores, win rates, labels
      iter_<t>/activations.safetensors   D+ / D- summaries learned from
      iter_<t>/fitted/            the learner's raw output at iteration t
      iter_<t>/calibration.jsonl  the guard's frontier: strength -> score, fluency
      iter_<t>/frontier.png       the same, plotted
      iter_<t>/steering/          steering of policy t (t >= 1), at the chosen strength
      iter_<t>/summary.json       the iteration's row of the summary table
      summary.json                all rows, written at the end
      outcome.json                final policy vs unsteered on the held-out prompts
      final/                      the last policy's steering
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    root: Path

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

    def iteration_summary(self, t: int) -> Path:
        return self.iteration(t) / "summary.json"

    def is_run(self) -> bool:
        return self.config.is_file()
