"""What a finished run achieved on its held-out prompts: the final policy against the
unsteered model, paired per prompt, with a bootstrap interval, next to the fluency cost."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..stats import bootstrap_ci
from .records import EvalRecord, IterationRecord


def run_outcome(
    history: Sequence[IterationRecord],
    base_answers: Sequence[EvalRecord],
    final_answers: Sequence[EvalRecord],
    final: int,
) -> dict[str, Any]:
    """Held-out comparison of policy ``final`` with policy 0 (see module docstring).

    Args:
        history: the run's rows.
        base_answers, final_answers: policy 0's and policy ``final``'s held-out answers
            (empty when the run has no held-out prompts).
        final: the final policy's iteration.
    """
    out: dict[str, Any] = {"final_policy": final, "stopped": history[-1].stop}
    if not base_answers or not final_answers:
        return out
    base = {r.prompt_id: r.score for r in base_answers}
    last = {r.prompt_id: r.score for r in final_answers}
    ids = [i for i in base if i in last and base[i] is not None and last[i] is not None]
    if ids:
        diffs = np.array([last[i] - base[i] for i in ids])
        low, high = bootstrap_ci(diffs)
        out["held_out"] = {
            "prompts": len(ids),
            "base_score": float(np.mean([base[i] for i in ids])),
            "final_score": float(np.mean([last[i] for i in ids])),
            "improvement": float(diffs.mean()),
            "ci95": [low, high],
        }
    f0, f1 = history[0].eval_fluency, history[final].eval_fluency
    # An undefined perplexity (no answer had tokens) gives no ratio (JSON has no NaN).
    if f0 is not None and f1 is not None and np.isfinite([f0.perplexity, f1.perplexity]).all():
        out["fluency"] = {
            "perplexity_ratio": f1.perplexity / f0.perplexity,
            "repetition_delta": f1.repetition - f0.repetition,
            "loop_share_delta": f1.loop_share - f0.loop_share,
        }
    return out


#: The sections of ``outcome.json`` besides ``final_policy`` and ``stopped``: each entry is
#: a finite number, ``prompts`` an integer and ``ci95`` two of them.
SECTIONS: dict[str, tuple[str, ...]] = {
    "held_out": ("prompts", "base_score", "final_score", "improvement", "ci95"),
    "fluency": ("perplexity_ratio", "repetition_delta", "loop_share_delta"),
    # How the guard chose the final policy: its rule, and the policy with the best score.
    "selection": ("rule", "best_calibrated"),
}


def check_outcome(data: Any) -> dict[str, Any]:
    """``data`` if it has the shape :func:`run_outcome` gives, else ``KeyError`` (a missing
    entry) or ``TypeError`` naming the entry (a hand-edited or damaged ``outcome.json``).

    Args:
        data: the parsed ``outcome.json``.
    """
    if not isinstance(data, dict):
        raise TypeError(f"outcome must be a JSON object, got {type(data).__name__}")
    for key in ("final_policy", "stopped"):
        if key not in data:
            raise KeyError(key)
    if not _is_int(data["final_policy"]) or data["final_policy"] < 0:
        raise TypeError(f"field 'final_policy' must be an integer >= 0, got {data['final_policy']!r}")
    if data["stopped"] is not None and not isinstance(data["stopped"], str):
        raise TypeError(f"field 'stopped' must be text or null, got {data['stopped']!r}")
    unknown = sorted(set(data) - {"final_policy", "stopped", *SECTIONS})
    if unknown:
        raise TypeError(f"unknown field {unknown[0]!r}")
    for section, names in SECTIONS.items():
        if section not in data:
            continue
        entries = data[section]
        if not isinstance(entries, dict):
            raise TypeError(f"field {section!r} must be an object, got {entries!r}")
        for name in names:
            if name not in entries:
                raise KeyError(f"{section}.{name}")
            value = entries[name]
            test, expected = _ENTRY_TYPES.get(name, (_is_number, "a finite number"))
            if not test(value):
                raise TypeError(f"field '{section}.{name}' must be {expected}, got {value!r}")
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


_ENTRY_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "prompts": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "ci95": (lambda v: isinstance(v, list) and len(v) == 2 and all(map(_is_number, v)), "two finite numbers"),
    "rule": (lambda v: isinstance(v, str), "text"),
    "best_calibrated": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
}


#: Above this perplexity ratio (final policy / unsteered, on the held-out answers) the
#: run's last lines warn that the steering degrades the model.
DEGRADED_PERPLEXITY_RATIO = 1.5


def format_outcome(outcome: dict[str, Any]) -> str:
    lines = [f"final policy: iteration {outcome['final_policy']}"]
    chosen = outcome.get("selection")
    if chosen and chosen["best_calibrated"] != outcome["final_policy"]:
        lines[0] += (
            f" (within one standard error of policy {chosen['best_calibrated']}'s calibration "
            f"score, which is not clearly better: --selection {chosen['rule']})"
        )
    held = outcome.get("held_out")
    if held:
        lo, hi = held["ci95"]
        lines.append(
            f"held-out score {held['base_score']:+.3f} -> {held['final_score']:+.3f} "
            f"(improvement {held['improvement']:+.3f}, 95% CI [{lo:+.3f}, {hi:+.3f}], "
            f"{held['prompts']} prompts)"
        )
    fl = outcome.get("fluency")
    if fl:
        lines.append(
            f"fluency vs unsteered: perplexity x{fl['perplexity_ratio']:.3f}, "
            f"repetition {fl['repetition_delta']:+.3f}, loops {fl['loop_share_delta']:+.3f}"
        )
        if fl["perplexity_ratio"] > DEGRADED_PERPLEXITY_RATIO:
            lines.append(
                f"warning: the final policy's answers have x{fl['perplexity_ratio']:.2f} the unsteered "
                "model's perplexity: the steering degrades the model here; use the fluency guard "
                "(the default) or a smaller strength"
            )
    return "\n".join(lines)
