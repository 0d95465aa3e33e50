"""Settings of ``sims serve`` shared by the HTTP app and the server."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SimsError


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
        host: bind address (loopback only by default).
        port: TCP port.
        max_batch: most sequences decoded together.
        batch_wait_ms: how long the engine waits for more requests before decoding.
        seed: seeds the sampling of each batch.
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

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_tokens_limit < 1 or self.port < 0:
            raise SimsError("--max-batch and --max-tokens-limit must be >= 1 and --port >= 0")
