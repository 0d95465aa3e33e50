"""Steering-function learners, one module each, behind one registry."""

from .actadd import ActAdd, ActAddConfig, PositionalAdd, fit_actadd
from .base import (
    Learner,
    LearnerConfig,
    PreferenceActivations,
    get_learner,
    learner_names,
    register_learner,
)
from .caa import CAA, AddVector, CAAConfig
from .hpr import HPR, HouseholderRotation, HPRConfig
from .iti import ITI, HeadShift, ITIConfig
from .sea import SEA, SEAConfig, SpectralProjection

__all__ = [
    "CAA",
    "HPR",
    "ITI",
    "SEA",
    "ActAdd",
    "ActAddConfig",
    "AddVector",
    "CAAConfig",
    "HPRConfig",
    "HeadShift",
    "HouseholderRotation",
    "ITIConfig",
    "Learner",
    "LearnerConfig",
    "PositionalAdd",
    "PreferenceActivations",
    "SEAConfig",
    "SpectralProjection",
    "fit_actadd",
    "get_learner",
    "learner_names",
    "register_learner",
]
