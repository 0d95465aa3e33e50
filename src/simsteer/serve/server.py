"""``sims serve``: an OpenAI-compatible HTTP server for a model with its steerings.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``
(both with ``stream: true`` as server-sent events) and ``GET /health``. Existing
``openai`` clients work unchanged; steering is chosen per request in the body (the
``extra_body`` of the Python client)::

    client.chat.completions.create(model="smollm2", messages=[...],
                                   extra_body={"steering": "kind", "strength": 0.5})

``steering`` names one of the server's ``--steering NAME=PATH`` policies (``"none"``
for the unsteered model; absent: ``--default-steering``); ``strength`` multiplies its
saved strength. Requests are decoded together by :class:`~simsteer.serve.engine.BatchEngine`.
The server binds 127.0.0.1 unless told otherwise, can require a bearer key (read from an
environment variable) and refuses oversize bodies (413), prompts and ``max_tokens`` (400).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import SimsError
from .engine import BatchEngine


@dataclass(frozen=True)
class ServeConfig:
    """Limits and identity of the server.

    Attributes:
        model_name: the id reported by ``/v1/models`` (any ``model`` is accepted).
        api_key: bearer key required on every request (``None``: open).
        max_request_bytes: larger bodies are refused with 413.
        max_tokens_limit: largest ``max_tokens`` a request may ask for.
        max_prompt_tokens: longest prompt accepted.
        default_max_tokens: used when a request sets none.
        default_steering: policy used when a request names none.
    """

    model_name: str = "simsteer"
    api_key: str | None = None
    max_request_bytes: int = 1_000_000
    max_tokens_limit: int = 512
    max_prompt_tokens: int = 2048
    default_max_tokens: int = 128
    default_steering: str | None = None


def load_steerings(specs: list[str], lm) -> dict[str, list]:
    """``NAME=PATH`` (or ``PATH``: named after its folder) -> policies checked against ``lm``."""
    from ..loop.rundir import RunDir
    from ..steering import load_policy

    out: dict[str, list] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        folder = Path(path)
        if RunDir(folder).is_run():
            folder = RunDir(folder).final
        policy = load_policy(folder)
        for steering in policy:
            steering.check_model(lm.model)
        if name in out or name == "none":
            raise SimsError(f"steering name {name!r} is used twice or reserved; write NAME=PATH")
        out[name] = policy
    return out


def add_serve_command(sub) -> None:
    """Register ``sims serve`` on the CLI's sub-parsers."""
    p = sub.add_parser("serve", help="serve the model and its steerings over an OpenAI-compatible API")
    p.add_argument("--model", default=None, help="as for sims run (default: the embedded model)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument(
        "--steering",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a steering folder or run directory a request may choose (repeatable)",
    )
    p.add_argument("--default-steering", default=None, help="steering used when a request names none")
    p.add_argument("--served-model-name", default=None, help="model id in /v1/models")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key-env",
        default=None,
        metavar="VAR",
        help="require 'Authorization: Bearer $VAR' on every request",
    )
    p.add_argument("--max-tokens-limit", type=int, default=512)
    p.add_argument("--max-prompt-tokens", type=int, default=2048)
    p.add_argument("--max-request-bytes", type=int, default=1_000_000)
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together")
    p.add_argument("--batch-wait-ms", type=float, default=10.0, help="wait for more requests")
    p.add_argument("--seed", type=int, default=0)


def cmd_serve(args: argparse.Namespace) -> int:
    import sys

    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise SimsError('sims serve needs FastAPI and uvicorn: pip install -e ".[serve]"') from None

    from ..models import load_model

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise SimsError(f"--api-key-env {args.api_key_env}: that environment variable is empty")
    if args.max_batch < 1 or args.max_tokens_limit < 1 or args.port < 0:
        raise SimsError("--max-batch and --max-tokens-limit must be >= 1 and --port >= 0")
    lm = load_model(
        args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code
    )
    steerings = load_steerings(args.steering, lm)
    if args.default_steering and args.default_steering not in steerings:
        raise SimsError(f"--default-steering {args.default_steering!r} is not one of --steering's names")
    config = ServeConfig(
        model_name=args.served_model_name or Path(lm.source).name,
        api_key=api_key,
        max_request_bytes=args.max_request_bytes,
        max_tokens_limit=args.max_tokens_limit,
        max_prompt_tokens=args.max_prompt_tokens,
        default_steering=args.default_steering,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"sims serve: warning: listening on {args.host} without an API key", file=sys.stderr)
    engine = BatchEngine(
        lm, steerings, max_batch=args.max_batch, wait_s=args.batch_wait_ms / 1000, seed=args.seed
    )
    from .app import create_app  # FastAPI is imported only when serving

    engine.start()
    try:
        print(
            f"sims serve: {config.model_name} on http://{args.host}:{args.port}/v1 "
            f"(steerings: {', '.join(steerings) or 'none'})",
            file=sys.stderr,
            flush=True,
        )
        uvicorn.run(create_app(engine, config), host=args.host, port=args.port, log_level="warning")
    finally:
        engine.close()
    return 0
