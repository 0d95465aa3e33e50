"""The per-iteration table printed by ``sims run`` and ``sims info``."""

from __future__ import annotations

from typing import Any

TABLE_HEADER = (
    "iter  strength  sample_score  eval_score  eval_ppl  eval_rep  loops  |D+|  |D-|  tokens  seconds"
)


def _num(value: float | None, fmt: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{fmt}}".rjust(width)


def format_row(row: dict[str, Any]) -> str:
    fl = row.get("eval_fluency") or {}
    return (
        f"{row['iteration']:>4}  {_num(row.get('strength'), '.3g', 8)}  "
        f"{_num(row.get('sample_score'), '+.3f', 12)}  {_num(row.get('eval_score'), '+.3f', 10)}  "
        f"{_num(fl.get('perplexity'), '.2f', 8)}  {_num(fl.get('repetition'), '.3f', 8)}  "
        f"{_num(fl.get('loop_share'), '.2f', 5)}  {row.get('num_positive', 0):>4}  "
        f"{row.get('num_negative', 0):>4}  {row.get('tokens_generated', 0):>6}  "
        f"{row.get('seconds_total', 0):>7.1f}"
    )


def format_table(history: list[dict[str, Any]]) -> str:
    lines = [TABLE_HEADER, *(format_row(r) for r in history)]
    for row in history:
        cal = row.get("calibration")
        if cal:
            chosen = "none fluent" if cal["chosen"] is None else f"x{cal['chosen']:g}"
            lines.append(
                f"  iter {row['iteration']} calibration: strength {chosen} "
                f"(score {_num(cal['score'], '+.3f', 6).strip()})"
            )
        if row.get("stop"):
            lines.append(f"  stopped after iteration {row['iteration']}: {row['stop']}")
    return "\n".join(lines)
