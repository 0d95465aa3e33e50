"""Steering-function learners, one module each, behind one registry.

The functions they fit (``AddVector``, ``HouseholderRotation``, ...) live below them in
:mod:`simsteer.functions`, so a saved steering loads without this package; they are
re-exported here for convenience.
"""

from ..functions import (
    AddVector,
    GatedAdd,
    HeadShift,
    HouseholderRotation,
    PositionalAdd,
    SpectralProjection,
)
from .actadd import ActAdd, ActAddConfig, fit_actadd
from .base import (
    Learner,
    LearnerConfig,
    PreferenceActivations,
    get_learner,
    learner_names,
    register_learner,
)
from .bipo import BiPO, BiPOConfig
from .caa import CAA, CAAConfig
from .cast import CAST, CASTConfig
from .hpr import HPR, HPRConfig
from .iti import ITI, ITIConfig
from .pca import PCA, PCAConfig
from .sea import SEA, SEAConfig

__all__ = [
    "CAA",
    "CAST",
    "HPR",
    "ITI",
    "PCA",
    "SEA",
    "ActAdd",
    "ActAddConfig",
    "AddVector",
    "BiPO",
    "BiPOConfig",
    "CAAConfig",
    "CASTConfig",
    "GatedAdd",
    "HPRConfig",
    "HeadShift",
    "HouseholderRotation",
    "ITIConfig",
    "Learner",
    "LearnerConfig",
    "PCAConfig",
    "PositionalAdd",
    "PreferenceActivations",
    "SEAConfig",
    "SpectralProjection",
    "fit_actadd",
    "get_learner",
    "learner_names",
    "register_learner",
]
