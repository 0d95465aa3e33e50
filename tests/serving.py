"""Helpers of the ``sims serve`` tests: a real uvicorn server on a free loopback port, and
a gate that holds the model's forwards, so that a test decides what shares a batch by
events and counters instead of by timing."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

WAIT_S = 60  # generous bound for "eventually"; tests never depend on speed


def until(condition, what: str) -> None:
    """Wait for ``condition()`` (fails the test after :data:`WAIT_S`)."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


@contextmanager
def running(app) -> Iterator[int]:
    """Serve ``app`` with uvicorn on 127.0.0.1; yields the port."""
    import uvicorn

    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    until(lambda: srv.started, "the server to start")
    try:
        yield srv.servers[0].sockets[0].getsockname()[1]
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


class Gate:
    """Holds every forward of ``model`` while closed (a pre-hook on its first layer).

    ``reached`` is set when a forward waits at the closed gate."""

    def __init__(self, layer) -> None:
        self.open_ = threading.Event()
        self.open_.set()
        self.reached = threading.Event()
        self._handle = layer.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        if not self.open_.is_set():
            self.reached.set()
            self.open_.wait(WAIT_S)

    def close(self) -> None:
        self.reached.clear()
        self.open_.clear()

    def open(self) -> None:
        self.open_.set()

    def remove(self) -> None:
        self.open_.set()
        self._handle.remove()
