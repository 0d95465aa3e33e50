"""Reading and checking the body of a ``sims serve`` request.

Bodies are read as plain JSON and checked by hand, so any field an OpenAI client sends
is accepted; every number the engine will use is checked finite and in range here,
before anything is queued (a NaN strength or temperature would give garbage, or on CUDA
a device assert that poisons every later request).
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from .config import ServeConfig

#: Largest ``n`` (completions per prompt) a request may ask for.
MAX_N = 16
#: ``seed`` is a signed 64-bit integer, as in OpenAI's API.
SEED_RANGE = (-(2**63), 2**63 - 1)


class BadRequest(Exception):
    """A request the server refuses; becomes ``{"error": {...}}`` with ``status``."""

    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", close: bool = False
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.close = status, message, kind, close


@dataclass(frozen=True)
class Options:
    """The generation settings of one request, checked."""

    max_tokens: int
    steering: str | None
    strength: float
    n: int
    stop: tuple[str, ...]
    temperature: float
    top_p: float
    stream: bool
    seed: int | None = None
    max_tokens_given: bool = True  # False: the server's default, shortened to fit the context


def _constant(name: str) -> float:
    raise BadRequest(400, f"the body contains {name}, which is not JSON; send finite numbers")


async def _read_body(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, f"request body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, limit: int, timeout_s: float) -> dict[str, Any]:
    """The body as a JSON object, refused with 413 as soon as it grows past ``limit`` bytes,
    and with 408 when the whole of it has not arrived ``timeout_s`` seconds after the
    headers (a client trickling its body must not hold a connection forever).

    Args:
        request: the incoming request (its body is read here, chunk by chunk).
        limit: most bytes accepted; a chunked body carries no length, so it is counted.
        timeout_s: the deadline for the whole body, not for each chunk.
    """
    try:
        data = await asyncio.wait_for(_read_body(request, limit), timeout_s)
    except asyncio.TimeoutError:
        raise BadRequest(408, f"the request body did not arrive within {timeout_s:g} s", close=True) from None
    try:
        body = json.loads(data, parse_constant=_constant)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: absurd nesting
        raise BadRequest(400, "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest(400, "the body must be a JSON object")
    return body


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    """``body[name]`` as a finite float in ``[low, high]`` (``None``/absent: ``default``)."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(400, f"{name} must be a number")
    try:
        number = float(value)
    except OverflowError:  # an integer too large for a float
        number = math.inf
    if not (math.isfinite(number) and low <= number <= high):
        raise BadRequest(400, f"{name} must be a finite number from {low:g} to {high:g}")
    return number


def _switch(body: dict[str, Any], name: str) -> bool:
    """``body[name]`` as a JSON boolean (absent or ``null``: false); ``"false"`` is refused,
    never read as true."""
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(400, f"{name} must be true or false (a JSON boolean), got {json.dumps(value)[:40]}")
    return value


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(400, f"{name} must be a positive integer")
    return value


def _stop(value: Any, config: ServeConfig) -> tuple[str, ...]:
    if value is None:
        return ()
    stop = [value] if isinstance(value, str) else value
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise BadRequest(400, "stop must be a string or a list of strings")
    if len(stop) > config.max_stop or any(len(s) > config.max_stop_chars for s in stop):
        raise BadRequest(
            400,
            f"stop: at most {config.max_stop} strings of at most {config.max_stop_chars} characters",
        )
    return tuple(stop)


def _seed(value: Any) -> int | None:
    """A request's ``seed``: a signed 64-bit integer (``None``: unseeded)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        raise BadRequest(400, "seed must be an integer from -2**63 to 2**63-1")
    return value


def parse_options(body: dict[str, Any], config: ServeConfig, steerings: dict[str, Any]) -> Options:
    """The checked generation settings of ``body``.

    Args:
        body: the request's JSON object.
        config: the server's limits.
        steerings: the names a request may choose.

    Raises:
        BadRequest: a setting is missing its type, out of range or over a limit (400).
    """
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    given = max_tokens is not None
    if not given:
        max_tokens = min(config.default_max_tokens, config.max_tokens_limit)
    max_tokens = _integer(max_tokens, "max_tokens")
    if max_tokens > config.max_tokens_limit:
        raise BadRequest(
            400, f"max_tokens {max_tokens} is over this server's limit {config.max_tokens_limit}"
        )
    steering = body.get("steering", config.default_steering)
    model = body.get("model")
    if "steering" not in body and isinstance(model, str) and ":" in model:  # "NAME:STEERING"
        steering = model.split(":", 1)[1]
    if steering in ("none", "", None):
        steering = None
    elif not isinstance(steering, str) or steering not in steerings:
        known = ", ".join(["none", *steerings])
        raise BadRequest(400, f"unknown steering {steering!r}; this server has: {known}")
    n = body.get("n")
    n = 1 if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise BadRequest(400, f"n must be an integer from 1 to {MAX_N}")
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise BadRequest(400, "top_p must be in (0, 1]")
    return Options(
        max_tokens=max_tokens,
        steering=steering,
        strength=_number(body, "strength", 1.0, -config.max_strength, config.max_strength),
        n=n,
        stop=_stop(body.get("stop"), config),
        temperature=_number(body, "temperature", 1.0, 0.0, config.max_temperature),
        top_p=top_p,
        stream=_switch(body, "stream"),
        seed=_seed(body.get("seed")),
        max_tokens_given=given,
    )


def check_choices(prompts: int, opts: Options, config: ServeConfig) -> None:
    """Refuse a request for more completions (prompts x n) than one request may hold."""
    limit = min(config.max_choices, config.max_queue)
    if prompts * opts.n > limit:
        raise BadRequest(
            400,
            f"{prompts} prompt(s) x n={opts.n} = {prompts * opts.n} completions; "
            f"this server's limit per request is {limit}",
        )
