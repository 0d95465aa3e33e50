"""The SIMS algorithm: the loop, its config, the run directory, selection and the guard."""

from .config import SIMSConfig
from .sims import SIMS, SIMSResult

__all__ = ["SIMS", "SIMSConfig", "SIMSResult"]
