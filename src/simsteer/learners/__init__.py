"""Steering-function learners, one module each, behind one registry."""

from .base import (
    Learner,
    LearnerConfig,
    PreferenceActivations,
    get_learner,
    learner_names,
    register_learner,
)
from .caa import CAA, AddVector, CAAConfig

__all__ = [
    "CAA",
    "AddVector",
    "CAAConfig",
    "Learner",
    "LearnerConfig",
    "PreferenceActivations",
    "get_learner",
    "learner_names",
    "register_learner",
]
