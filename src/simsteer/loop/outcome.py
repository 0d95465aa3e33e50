"""What a finished run achieved on its held-out prompts: the final policy against the
unsteered model, paired per prompt, with a bootstrap interval, next to the fluency cost."""

from __future__ import annotations

from collections.abc import Sequence
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


#: Above this perplexity ratio (final policy / unsteered, on the held-out answers) the
#: run's last lines warn that the steering degrades the model.
DEGRADED_PERPLEXITY_RATIO = 1.5


def format_outcome(outcome: dict[str, Any]) -> str:
    lines = [f"final policy: iteration {outcome['final_policy']}"]
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
