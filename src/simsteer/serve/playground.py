"""The steering playground of ``sims serve``: a static page at ``/playground``.

The page (HTML, CSS and JavaScript shipped in ``simsteer/serve/static``; no CDN, no build
step) talks to the server's own OpenAI-compatible endpoints from the browser: it lists the
steerings from ``/v1/models`` and streams an unsteered and a steered answer (or one answer
per strength of a sweep) side by side. The page holds no data, so it is served without the
API key (:data:`PUBLIC_PATHS`); every API call it makes carries the key the user types in.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

#: Paths :class:`~simsteer.serve.access.AccessControl` serves without the API key.
PUBLIC_PREFIX = "/playground"

#: The page may load only its own files and talk only to its own server.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def is_public(path: str) -> bool:
    """Whether ``path`` is one of the playground's files (served without the key)."""
    return path == PUBLIC_PREFIX or path.startswith(PUBLIC_PREFIX + "/")


def static_dir() -> Any:
    """The folder of the page's files inside the installed package."""
    return resources.files("simsteer.serve") / "static"


def add_playground(app: Any) -> None:
    """Serve the page at ``/playground`` and its files under ``/playground/``."""
    from fastapi.responses import HTMLResponse
    from starlette.staticfiles import StaticFiles

    page = (static_dir() / "playground.html").read_text(encoding="utf-8")

    async def playground() -> HTMLResponse:
        return HTMLResponse(page, headers=SECURITY_HEADERS)

    for path in (PUBLIC_PREFIX, PUBLIC_PREFIX + "/"):  # before the mount, which would take the second
        app.add_api_route(path, playground, methods=["GET"], include_in_schema=False)

    app.mount(PUBLIC_PREFIX, StaticFiles(packages=[("simsteer.serve", "static")]), name="playground")
