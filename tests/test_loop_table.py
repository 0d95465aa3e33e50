"""The summary table and the outcome lines print digit for digit as before the records."""

from __future__ import annotations

from simsteer.loop.outcome import format_outcome
from simsteer.loop.rundir import RunDir
from simsteer.loop.table import format_row, format_table

from .test_loop_records import OLD_RUN

# Printed by simsteer 0.1.0 (dict rows) for the same run.
EXPECTED_TABLE = (
    "iter  strength  sample_score  eval_score  eval_ppl  eval_rep  loops  |D+|  |D-|  tokens  seconds\n"
    "   0         0        -0.042      -0.125     73.24     0.000   0.00     1     1      32      1.9\n"
    "   1       0.5        -0.125      -0.125     73.24     0.000   0.00     2     2      32      1.8\n"
    "  iter 0 calibration: strength x0.5 (score +0.000)"
)
EXPECTED_OUTCOME = (
    "final policy: iteration 0 (the unsteered model)\n"
    "held-out score -0.125 -> -0.125 (improvement +0.000, 95% CI [+0.000, +0.000], 2 prompts)\n"
    "fluency vs unsteered: perplexity x1.000, repetition +0.000, loops +0.000"
)


def test_table_digit_for_digit():
    run = RunDir(OLD_RUN)
    assert format_table(run.history()) == EXPECTED_TABLE
    assert format_outcome(run.read_outcome()) == EXPECTED_OUTCOME


def test_missing_figures_print_as_dashes():
    from dataclasses import replace

    row = replace(RunDir(OLD_RUN).history()[1], eval_score=None, eval_fluency=None, sample_score=None)
    line = format_row(row)
    assert line.split()[2:7] == ["-", "-", "-", "-", "-"]


def test_stop_line():
    from dataclasses import replace

    row = replace(RunDir(OLD_RUN).history()[0], stop="nothing is fluent")
    assert format_table([row]).endswith("  stopped after iteration 0: nothing is fluent")
