"""Worker pools: where the SIMS loop's model work runs (this process, or Ray actors).

:class:`LocalPool` runs everything in this process (the default). :class:`RayPool`
(``pip install 'simsteer[ray]'``) spreads sampling, model-based judging and activation
collection over Ray actors with the same results; importing this package never imports
Ray.
"""

from __future__ import annotations

from .pool import LocalPool, WorkerPool, WorkerSpec, is_model_oracle
from .ray_pool import RayPool, import_ray, open_pool, ray_session

__all__ = [
    "LocalPool",
    "RayPool",
    "WorkerPool",
    "WorkerSpec",
    "import_ray",
    "is_model_oracle",
    "open_pool",
    "ray_session",
]
