"""The SIMS algorithm: the loop, its config, the run records, the run directory,
selection and the guard."""

from .config import SIMSConfig
from .records import IterationRecord
from .rundir import RunDir
from .sims import SIMS, SIMSResult
from .spec import RunSpec

__all__ = ["SIMS", "IterationRecord", "RunDir", "RunSpec", "SIMSConfig", "SIMSResult"]
