"""Evaluation: fluency and diversity metrics (and, later, benchmarks and reports)."""

from .fluency import (
    FluencyReport,
    distinct_n,
    ends_in_loop,
    fluency_report,
    perplexities,
    repetition_rate,
)

__all__ = [
    "FluencyReport",
    "distinct_n",
    "ends_in_loop",
    "fluency_report",
    "perplexities",
    "repetition_rate",
]
