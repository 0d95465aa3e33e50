"""``sims serve``: an OpenAI-compatible HTTP server for a model with its steerings.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``
(both with ``stream: true`` as server-sent events), ``GET /health`` and a steering playground
page at ``GET /playground`` (:mod:`simsteer.serve.playground`). Existing
``openai`` clients work unchanged; steering is chosen per request in the body (the
``extra_body`` of the Python client)::

    client.chat.completions.create(model="smollm2", messages=[...],
                                   extra_body={"steering": "kind", "strength": 0.5})

``steering`` names one of the server's ``--steering NAME=PATH`` policies (``"none"``
for the unsteered model; absent: ``--default-steering``); ``strength`` multiplies its
saved strength. Requests are decoded together by :class:`~simsteer.serve.engine.BatchEngine`.
The server binds 127.0.0.1 unless told otherwise, can require a bearer key (read from an
environment variable) and refuses oversize bodies (413), prompts and ``max_tokens`` (400);
the full list of limits is :class:`~simsteer.serve.config.ServeConfig`'s.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import SimsError
from ..generation.engines import choose_engine
from ..generation.llamacpp import SERVE_CELLS
from ..models import LoadedModel
from ..policy import Policy
from .config import ServeConfig
from .engine import BatchEngine

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def load_steerings(specs: Sequence[str], lm: LoadedModel) -> dict[str, Policy]:
    """``NAME=PATH`` (or ``PATH``: named after its folder) -> policies checked against ``lm``.

    Args:
        specs: steering folders or run directories (a run serves its final policy).
        lm: the served model; a steering learned on another model is refused.
    """
    from ..loop.rundir import RunDir
    from ..policy import load_policy

    out: dict[str, Policy] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        folder = Path(path)
        if RunDir(folder).is_run():
            folder = RunDir(folder).final
        policy = load_policy(folder)
        policy.check_model(lm.model)
        if name in out or name == "none":
            raise SimsError(f"steering name {name!r} is used twice or reserved; write NAME=PATH")
        out[name] = policy
    return out


def require_dependencies() -> None:
    """Raise a one-line error unless FastAPI and uvicorn (the ``serve`` extra) are installed."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise SimsError('sims serve needs FastAPI and uvicorn: pip install -e ".[serve]"') from None


def serve(lm: LoadedModel, steerings: dict[str, Policy], config: ServeConfig) -> None:
    """Serve ``lm`` with its named ``steerings`` until interrupted.

    Example:
        >>> serve(load_model(), load_steerings(["kind=runs/sims"], lm), ServeConfig(port=8001))
    """
    require_dependencies()
    import uvicorn

    from .app import create_app  # FastAPI is imported only when serving

    if config.default_steering and config.default_steering not in steerings:
        raise SimsError(f"--default-steering {config.default_steering!r} is not one of --steering's names")
    if config.host not in LOOPBACK and not config.api_key:
        print(f"sims serve: warning: listening on {config.host} without an API key", file=sys.stderr)
    chosen = choose_engine(config.engine, lm, steerings, purpose="serve")
    engine = BatchEngine(
        lm,
        {name: list(policy) for name, policy in steerings.items()},
        max_batch=config.max_batch,
        wait_s=config.batch_wait_ms / 1000,
        seed=config.seed,
        max_queue=config.max_queue,
        engine=chosen,
        cells=max(SERVE_CELLS, config.max_prompt_tokens + config.max_tokens_limit + 1),
    )
    engine.start()
    # One line per request (its steering and strength) besides the warnings.
    logging.getLogger("simsteer.serve").setLevel(logging.INFO)
    try:
        print(
            f"sims serve: {config.model_name} on http://{config.host}:{config.port}/v1 "
            f"(steerings: {', '.join(steerings) or 'none'}; engine: {chosen}; "
            f"playground: http://{config.host}:{config.port}/playground)",
            file=sys.stderr,
            flush=True,
        )
        uvicorn.run(create_app(engine, config), host=config.host, port=config.port, log_level="warning")
    finally:
        engine.close()
