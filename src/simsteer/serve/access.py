"""The checks every ``sims serve`` request passes before it reaches an endpoint.

:class:`AccessControl` is a plain ASGI middleware (not Starlette's ``BaseHTTPMiddleware``, which
would stand between the endpoints and the client's disconnect). In order, it:

- gives the request an id (``x-request-id`` on the response, and in the server log);
- on a keyless server, accepts only a loopback or the configured ``Host`` (a web page
  that rebinds its DNS name to 127.0.0.1 sends its own name), a loopback ``Origin`` when
  there is one (a browser on another site), and ``application/json`` POST bodies (the
  only bodies a web page cannot send without the browser asking the server first);
- compares the bearer key in constant time (:func:`hmac.compare_digest`), on every path
  (``/health`` says what decodes and how busy the server is: a load balancer's check
  sends the key, or counts a 401 as "the process answers");
- refuses a declared ``Content-Length`` over the limit (a chunked body is counted as it
  streams in, by :func:`simsteer.serve.params.read_json`);
- turns any unexpected exception into a generic 500 that names the request id; the
  traceback goes to the server log, never to the client.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import uuid
from typing import Any
from urllib.parse import urlsplit

from .config import ServeConfig
from .playground import is_public

log = logging.getLogger(__name__)

#: Where :func:`request_id` finds the id in the ASGI scope.
REQUEST_ID = "simsteer.request_id"


def request_id(scope: Any) -> str:
    """The id :class:`AccessControl` gave this request (``scope``: an ASGI scope or a Request)."""
    scope = getattr(scope, "scope", scope)
    return scope.get(REQUEST_ID, "-")


def error_body(status: int, message: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "code": status}}


def internal_error_message(rid: str) -> str:
    """What a client is told when the server fails: nothing internal, only the id to report."""
    return f"internal server error (request id {rid}; details are in the server log)"


def _hostname(host: str) -> str:
    """``host[:port]`` or ``[v6]:port`` -> the bare, lower-case host name."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    if host in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AccessControl:
    """ASGI middleware with the server's request checks (see the module docstring).

    Args:
        app: the application behind the checks.
        config: the server's settings (key, host, body limit).
    """

    def __init__(self, app: Any, config: ServeConfig) -> None:
        self.app, self.config = app, config
        self.expected = f"Bearer {config.api_key}".encode() if config.api_key else None
        self.own_host = _hostname(config.host)

    def _refusal(self, scope: dict[str, Any]) -> tuple[int, str, str] | None:
        """(status, message, type) of the first check the request fails, or None."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.expected is None:
            host = _hostname(headers.get("host", ""))
            if not (is_loopback(host) or host == self.own_host):
                return 400, "Host header not allowed on a server without an API key", "invalid_request_error"
            origin = headers.get("origin")
            if origin is not None:
                origin_host = urlsplit(origin).hostname or ""
                if not (is_loopback(origin_host) or origin_host == self.own_host):
                    return 403, "cross-origin requests are refused without an API key", "permission_error"
            media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if scope["method"] == "POST" and media != "application/json":
                return 415, "POST bodies must have Content-Type: application/json", "invalid_request_error"
        size = headers.get("content-length", "")
        if size.isdigit() and int(size) > self.config.max_request_bytes:
            return 413, f"request body over {self.config.max_request_bytes} bytes", "invalid_request_error"
        # The playground's static page holds no data; every other path (/health too) needs the key.
        if self.expected is not None and not is_public(scope["path"]):
            given = headers.get("authorization", "").encode("latin-1")
            if not hmac.compare_digest(given, self.expected):
                return 401, "invalid or missing API key", "authentication_error"
        return None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = scope[REQUEST_ID] = "req-" + uuid.uuid4().hex[:16]
        started = False

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [*message.get("headers", []), (b"x-request-id", rid.encode())]
                message = {**message, "headers": headers}
            await send(message)

        refusal = self._refusal(scope)
        if refusal is not None:
            await _send_json(send_with_id, refusal[0], error_body(*refusal))
            return
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request %s %s %s failed", rid, scope["method"], scope["path"])
            if not started:  # a stream already under way can only be cut short
                body = error_body(500, internal_error_message(rid), "server_error")
                await _send_json(send_with_id, 500, body)


async def _send_json(send: Any, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
