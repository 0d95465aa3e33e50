"""Plots the loop saves into a run directory (matplotlib's Agg backend, no display)."""

from __future__ import annotations

import io
from collections.abc import Sequence

from .calibration import GuardConfig
from .records import CalibrationPoint, Measurement


def render_frontier(
    points: Sequence[CalibrationPoint], base: Measurement, config: GuardConfig, title: str
) -> bytes:
    """Strength -> score, perplexity ratio and repetition, with the budget marked: a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p.multiplier for p in points]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    axes[0].plot(xs, [p.score for p in points], "o-")
    axes[0].axhline(base.score, color="grey", ls=":", label="unsteered")
    if base.contrast_score is not None and all(p.contrast_score is not None for p in points):
        axes[0].plot(xs, [p.contrast_score for p in points], "s--", color="purple", label="contrast prompts")
        limit = base.contrast_score + config.contrast_budget
        axes[0].axhline(limit, color="purple", ls=":", label="contrast budget")
    axes[0].set_ylabel("oracle score")
    axes[1].plot(xs, [p.perplexity / base.perplexity for p in points], "o-")
    axes[1].axhline(1 + (config.fluency_budget or 0), color="red", ls="--", label="budget")
    axes[1].set_ylabel("perplexity / unsteered")
    axes[2].plot(xs, [p.repetition for p in points], "o-")
    axes[2].axhline(base.repetition + config.repetition_margin, color="red", ls="--", label="budget")
    axes[2].set_ylabel("repetition rate")
    for ax in axes:
        ax.set_xlabel("strength multiplier")
        ax.legend(fontsize=7)
    for p in points:
        if not p.fluent:
            axes[0].plot(p.multiplier, p.score, "x", color="red", ms=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()
