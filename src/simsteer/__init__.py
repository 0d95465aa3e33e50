"""simsteer: Self-Improving Model Steering (SIMS, arXiv 2507.08967).

The pieces read like the paper: a frozen ``model``, an ``oracle`` that ranks sampled
responses, a ``learner`` that turns preferred/dispreferred activations into steering
functions, and ``SIMS`` that iterates; the result is a ``Steering`` (the policy's edits)
that loads onto the frozen model anywhere.
"""

from ._version import __version__
from .errors import SimsError
from .generation.sampling import SamplingConfig, generate
from .learners import get_learner
from .loop import SIMS, SIMSConfig, SIMSResult
from .models import load_model
from .oracles import get_oracle
from .policy import Policy, load_policy
from .prompts import load_prompts
from .steering import Steering

__all__ = [
    "SIMS",
    "Policy",
    "SIMSConfig",
    "SIMSResult",
    "SamplingConfig",
    "SimsError",
    "Steering",
    "__version__",
    "generate",
    "get_learner",
    "get_oracle",
    "load_model",
    "load_policy",
    "load_prompts",
]
