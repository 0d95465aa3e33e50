"""What a run's ``config.json`` holds: the resolved settings that rebuild the run.

A :class:`RunSpec` is written once when a run starts and read back by ``--resume``,
``sims info``, ``sims eval`` and the baselines. It never holds a parser namespace: only
the loop's config, the model's identity and the oracle and learner *specs*, each of which
its own registry accepts back (``get_oracle(spec.oracle)``,
``get_learner(**spec.learner)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import SIMSConfig

#: Version of the config.json layout. 1: written by simsteer <= 0.1.0 before the typed
#: records (a ``cli`` namespace, no ``format_version`` key); 2: this layout.
RUN_FORMAT_VERSION = 2


@dataclass(frozen=True)
class ModelSpec:
    """How the run's model was loaded.

    Attributes:
        source: what ``load_model`` was given (a local path is saved absolute), or the
            embedded model's name.
        dtype: the resolved dtype (``float32``, ``bfloat16``, ...).
        device: the resolved device (``cpu``, ``cuda:0``, ...).
        trust_remote_code: whether transformers was allowed to run the model's code.
        fingerprint: architecture, hidden size and layer count (see ``model_fingerprint``).
    """

    source: str
    dtype: str
    device: str
    trust_remote_code: bool = False
    fingerprint: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunSpec:
    """Everything that rebuilds a run (see the module docstring).

    Attributes:
        model: how the model was loaded.
        oracle: the oracle's spec, ``oracle.describe()``; ``get_oracle`` accepts it back.
        learner: ``{"name": ..., **hyper-parameters}``; ``get_learner`` accepts it back.
        layers: the resolved layer indices the learner steers.
        sims: the loop's resolved config.
        prompts: where the prompt pool and held-out prompts came from (informative; the
            run directory holds the prompts themselves).
        simsteer_version: the library version that wrote the run.
        format_version: :data:`RUN_FORMAT_VERSION`.
    """

    model: ModelSpec
    oracle: dict[str, Any]
    learner: dict[str, Any]
    layers: list[int]
    sims: SIMSConfig
    prompts: dict[str, Any] = field(default_factory=dict)
    simsteer_version: str = ""
    format_version: int = RUN_FORMAT_VERSION
