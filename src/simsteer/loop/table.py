"""The per-iteration table printed by ``sims run`` and ``sims info``."""

from __future__ import annotations

from collections.abc import Sequence

from .records import IterationRecord

TABLE_HEADER = (
    "iter  strength  sample_score  eval_score  eval_ppl  eval_rep  loops  |D+|  |D-|  tokens  seconds"
)


def _num(value: float | None, fmt: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{fmt}}".rjust(width)


def format_row(row: IterationRecord) -> str:
    """One line of the table (``-`` where a figure does not apply)."""
    fl = row.eval_fluency
    ppl, rep, loops = (None, None, None) if fl is None else (fl.perplexity, fl.repetition, fl.loop_share)
    return (
        f"{row.iteration:>4}  {_num(row.strength, '.3g', 8)}  "
        f"{_num(row.sample_score, '+.3f', 12)}  {_num(row.eval_score, '+.3f', 10)}  "
        f"{_num(ppl, '.2f', 8)}  {_num(rep, '.3f', 8)}  "
        f"{_num(loops, '.2f', 5)}  {row.num_positive:>4}  "
        f"{row.num_negative:>4}  {row.tokens_generated:>6}  "
        f"{row.seconds_total:>7.1f}"
    )


def format_table(history: Sequence[IterationRecord]) -> str:
    """The header, one line per row, then each calibration and the stop reason."""
    lines = [TABLE_HEADER, *(format_row(r) for r in history)]
    for row in history:
        cal = row.calibration
        if cal is not None:
            chosen = "none fluent" if cal.chosen is None else f"x{cal.chosen:g}"
            lines.append(
                f"  iter {row.iteration} calibration: strength {chosen} "
                f"(score {_num(cal.score, '+.3f', 6).strip()})"
            )
        if row.stop:
            lines.append(f"  stopped after iteration {row.iteration}: {row.stop}")
    return "\n".join(lines)
