"""Preference oracles: attribute scorers and reward models behind one name lookup.

Oracle names (``sims run --oracle NAME``):

- ``sentiment``, ``negativity``, ``readability``, ``length:N``: built-in text scorers;
- ``reward-model:PATH_OR_ID`` (or ``rm:PATH_OR_ID``): a sequence-classification reward model.
"""

from __future__ import annotations

import difflib

from ..errors import SimsError
from .attributes import ATTRIBUTES, AttributeOracle, attribute_oracle
from .base import Judgment, Oracle, ScoreOracle, bradley_terry, win_rates
from .reward_model import RewardModelOracle

ORACLE_NAMES = (*ATTRIBUTES, "reward-model:PATH")


def get_oracle(spec: str, temperature: float = 1.0, device: str | None = None) -> Oracle:
    """Build an oracle from its name (see the module docstring)."""
    kind, _, arg = spec.partition(":")
    if kind in ("reward-model", "rm"):
        if not arg:
            raise SimsError("reward-model needs a model: use reward-model:PATH_OR_ID")
        return RewardModelOracle(arg, device=device, temperature=temperature)
    try:
        return attribute_oracle(spec, temperature)
    except KeyError:
        pass
    close = difflib.get_close_matches(kind, [n.split(":")[0] for n in ORACLE_NAMES], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise SimsError(f"unknown oracle {spec!r}{hint}; known oracles: {', '.join(ORACLE_NAMES)}")


__all__ = [
    "ORACLE_NAMES",
    "AttributeOracle",
    "Judgment",
    "Oracle",
    "RewardModelOracle",
    "ScoreOracle",
    "bradley_terry",
    "get_oracle",
    "win_rates",
]
