"""Settings of ``sims serve`` shared by the HTTP app and the server."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import SimsError
from ..generation.engines import ENGINES
from ..policy import STRENGTH_LIMIT


@dataclass(frozen=True)
class ServeConfig:
    """Limits and identity of the server.

    Every number a request sends is checked against these limits before anything is
    queued; a request over a limit gets a 4xx JSON error and never reaches the model.

    Attributes:
        model_name: the id reported by ``/v1/models`` (any ``model`` is accepted).
        api_key: bearer key required on every request, ``/health`` included (``None``: open;
            then only loopback ``Host`` and ``Origin`` headers and ``application/json`` POST
            bodies are accepted).
        max_request_bytes: larger bodies are refused with 413 (checked while the body streams in).
        max_tokens_limit: largest ``max_tokens`` a request may ask for.
        max_prompt_tokens: longest prompt accepted (and a prompt with its ``max_tokens``
            must fit the model's context, whatever this says).
        default_max_tokens: used when a request sets none.
        default_steering: policy used when a request names none.
        host: bind address (loopback only by default).
        port: TCP port.
        max_batch: most sequences decoded together.
        batch_wait_ms: how long the engine waits for more requests before decoding.
        seed: seeds the sampling of each batch.
        max_strength: ``strength`` must be finite and in ``[-max_strength, max_strength]``.
        max_temperature: ``temperature`` must be finite and in ``[0, max_temperature]``
            (``top_p`` is always in ``(0, 1]``).
        max_choices: most completions one request may ask for (prompts x ``n``; never
            more than ``max_queue``, so that every accepted request fits the queue).
        max_stop: most ``stop`` strings in one request.
        max_stop_chars: longest ``stop`` string.
        max_queue: most completions waiting for the engine; a request that does not fit
            gets 429 with ``Retry-After``. Also the most requests waiting for their prompts
            to be tokenised (on one thread beside the event loop).
        body_timeout_s: a request's whole body must arrive within this many seconds of
            its headers, else 408 and the connection is closed.
        engine: ``"torch"``, ``"llamacpp"`` (llama.cpp on the model's GGUF file, every
            steering additive) or ``"auto"`` (llamacpp where it can, else torch).
    """

    model_name: str = "simsteer"
    api_key: str | None = None
    max_request_bytes: int = 1_000_000
    max_tokens_limit: int = 512
    max_prompt_tokens: int = 2048
    default_max_tokens: int = 128
    default_steering: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 32
    batch_wait_ms: float = 10.0
    seed: int = 0
    max_strength: float = STRENGTH_LIMIT
    max_temperature: float = 2.0
    max_choices: int = 64
    max_stop: int = 16
    max_stop_chars: int = 256
    max_queue: int = 256
    engine: str = "torch"
    body_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_tokens_limit < 1 or self.port < 0:
            raise SimsError("--max-batch and --max-tokens-limit must be >= 1 and --port >= 0")
        if min(self.max_request_bytes, self.max_prompt_tokens, self.max_choices, self.max_queue) < 1:
            raise SimsError("--max-request-bytes, --max-prompt-tokens and --max-queue must be >= 1")
        if self.engine not in ENGINES:
            raise SimsError(f"unknown engine {self.engine!r}: use one of {', '.join(ENGINES)}")
        limits = (self.max_strength, self.max_temperature, self.batch_wait_ms)
        if not all(math.isfinite(x) and x >= 0 for x in limits):
            raise SimsError("max_strength, max_temperature and --batch-wait-ms must be finite and >= 0")
        if not (math.isfinite(self.body_timeout_s) and self.body_timeout_s > 0):
            raise SimsError("--body-timeout must be a finite number of seconds > 0")
