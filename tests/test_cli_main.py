"""The ``sims`` parser: one module per command group, dispatch through ``args.func``, and
``--help`` texts that list what the registries hold (so a plug-in shows up there without
a CLI edit)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from simsteer.cli import build_parser, main
from simsteer.evaluation.baselines import BASELINES
from simsteer.evaluation.datasets import MC_TASKS
from simsteer.hooks import POSITIONS
from simsteer.learners import learner_names
from simsteer.loop.config import VARIANTS
from simsteer.oracles import ORACLE_NAMES

COMMANDS = (
    "run",
    "generate",
    "info",
    "eval",
    "compare",
    "judge-check",
    "baseline",
    "sweep",
    "lc",
    "arena",
    "serve",
    "export",
)


def _help(command: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return " ".join(sub.choices[command].format_help().split())


@pytest.fixture(autouse=True)
def _wide_help(monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # no line wrapping inside hyphenated names


def test_every_command_dispatches_to_its_handler():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(COMMANDS)
    for command, parser in sub.choices.items():
        assert callable(parser.get_default("func")), command


def test_help_lists_the_registries():
    run = _help("run")
    for name in [*learner_names(), *ORACLE_NAMES, *POSITIONS, *VARIANTS]:
        assert name in run, name
    assert all(p in _help("generate") for p in POSITIONS)
    assert all(b in _help("baseline") for b in BASELINES)
    assert all(o in _help("eval") for o in ORACLE_NAMES) and all(t in _help("eval") for t in MC_TASKS)
    assert all(o in _help("judge-check") for o in ORACLE_NAMES)


def test_help_shows_the_config_defaults():
    from simsteer.loop.config import SIMSConfig

    args = build_parser().parse_args(["run"])
    base = SIMSConfig()
    assert (args.iterations, args.samples_per_prompt, args.temperature) == (
        base.iterations,
        base.samples_per_prompt,
        base.sampling.temperature,
    )
    assert (
        args.fluency_budget == base.guard.fluency_budget and args.full_grid is not base.guard.stop_at_unfluent
    )
    assert build_parser().parse_args(["generate", "--no-steer"]).temperature == 0.0  # greedy by default


def test_a_new_learner_appears_in_run_help_without_a_cli_edit(monkeypatch):
    from simsteer.learners import base

    monkeypatch.setattr(base, "_LEARNERS", dict(base._LEARNERS))  # undone after the test

    @base.register_learner
    class Mirror(base.Learner):
        name = "mirror-test-learner"

        def fit(self, data, fingerprint):
            raise NotImplementedError

    assert "mirror-test-learner" in _help("run")


def test_python_dash_m_and_version():
    out = subprocess.run(
        [sys.executable, "-m", "simsteer", "--version"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.startswith("simsteer ")


def test_baseline_kind_is_checked(capsys):
    assert main(["baseline", "nope", "--like", "x", "-o", "y"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid choice: 'nope'" in err[0]
