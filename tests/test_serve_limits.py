"""``sims serve``'s limits against hostile or careless clients (issue 11, item 6): bad numbers
and JSON constants, per-request caps, a bounded queue, cancellation on disconnect, a streamed
body-size check, constant-time key check, generic 500s and the keyless Host/Origin checks."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import pytest
import torch
from starlette.testclient import TestClient

from simsteer.functions import CAST_CACHE_SIZE, AddVector, HeadShift
from simsteer.serve.app import create_app
from simsteer.serve.config import ServeConfig
from simsteer.serve.engine import BatchEngine, GenerationRequest, QueueFull

from .serving import running

WAIT_S = 60  # generous bound for "eventually"; tests never depend on speed


def _until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture()
def make(tiny_lm):
    """make(config, start=True) -> (TestClient, engine) on loopback."""
    engines = []

    def build(config: ServeConfig | None = None, start: bool = True, **engine_kw):
        config = config or ServeConfig(model_name="tiny", max_tokens_limit=8, max_request_bytes=50_000)
        engine = BatchEngine(tiny_lm, max_batch=8, wait_s=0.0, max_queue=config.max_queue, **engine_kw)
        if start:
            engine.start()
        engines.append(engine)
        client = TestClient(create_app(engine, config), base_url="http://127.0.0.1:8000")
        return client, engine

    yield build
    for engine in engines:
        engine.close()


def _post(client, path: str, body: str | dict, **headers):
    data = body if isinstance(body, str) else json.dumps(body)
    return client.post(path, content=data, headers={"content-type": "application/json", **headers})


OK_BODY = {"model": "tiny", "prompt": "the good day", "max_tokens": 2, "temperature": 0}

BAD_BODIES = [
    ('{"prompt": "a", "max_tokens": 2, "strength": NaN}', "not JSON"),
    ('{"prompt": "a", "max_tokens": 2, "temperature": Infinity}', "not JSON"),
    ('{"prompt": "a", "max_tokens": 2, "top_p": -Infinity}', "not JSON"),
    ('{"prompt": "a", "max_tokens": 2, "strength": 1e999}', "strength"),
    ({"prompt": "a", "max_tokens": 2, "strength": 1000}, "strength"),
    ({"prompt": "a", "max_tokens": 2, "strength": -10.5}, "strength"),
    ({"prompt": "a", "max_tokens": 2, "strength": 10**400}, "strength"),
    ({"prompt": "a", "max_tokens": 2, "strength": "abc"}, "strength"),
    ('{"prompt": "a", "max_tokens": 2, "temperature": 1e999}', "temperature"),
    ({"prompt": "a", "max_tokens": 2, "temperature": 50}, "temperature"),
    ({"prompt": "a", "max_tokens": 2, "temperature": -1}, "temperature"),
    ({"prompt": "a", "max_tokens": 2, "temperature": True}, "temperature"),
    ({"prompt": "a", "max_tokens": 2, "top_p": 0}, "top_p"),
    ({"prompt": "a", "max_tokens": 2, "top_p": 1.5}, "top_p"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "a", "max_tokens": -3}, "max_tokens"),
    ({"prompt": "a", "max_tokens": True}, "max_tokens"),
    ({"prompt": "a", "max_tokens": 1.5}, "max_tokens"),
    ({"prompt": "a", "max_completion_tokens": 0, "max_tokens": 2}, "max_tokens"),
    ({"prompt": "a", "max_tokens": 2, "n": 0}, "n must be"),
    ({"prompt": "a", "max_tokens": 2, "n": 17}, "n must be"),
    ({"prompt": "a", "max_tokens": 2, "n": True}, "n must be"),
    ({"prompt": "a", "max_tokens": 2, "stop": ["x"] * 17}, "stop"),
    ({"prompt": "a", "max_tokens": 2, "stop": "x" * 257}, "stop"),
    ({"prompt": "a", "max_tokens": 2, "stop": [1, 2]}, "stop"),
    ({"prompt": "a", "max_tokens": 2, "stop": {"a": 1}}, "stop"),
    ({"prompt": "a", "max_tokens": 2, "steering": ["x"]}, "unknown steering"),
    ({"prompt": "a", "max_tokens": 2, "stream": "false"}, "stream must be true or false"),
    ({"prompt": "a", "max_tokens": 2, "stream": 0}, "stream must be true or false"),
    ({"prompt": "a", "max_tokens": 2, "seed": "3"}, "seed must be"),
    ({"prompt": "a", "max_tokens": 2, "seed": 1.5}, "seed must be"),
    ({"prompt": "a", "max_tokens": 2, "seed": True}, "seed must be"),
    ({"prompt": "a", "max_tokens": 2, "seed": 2**64}, "seed must be"),
    ({"prompt": "", "max_tokens": 2}, "empty"),
    ({"prompt": ["the"] * 40, "max_tokens": 2, "n": 2}, "limit per request"),
    ("[" * 10_000 + "]" * 10_000, "valid JSON"),
]


@pytest.mark.parametrize("body,words", BAD_BODIES, ids=[str(i) for i in range(len(BAD_BODIES))])
def test_bad_numbers_and_caps_get_400_before_the_engine(make, body, words):
    client, engine = make()
    r = _post(client, "/v1/completions", body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error"
    assert engine.batches == 0 and engine.queued == 0


def test_bad_chat_content_parts_get_400(make):
    client, engine = make()
    body = {"max_tokens": 2, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}
    r = _post(client, "/v1/chat/completions", body)
    assert r.status_code == 400 and "text content" in r.json()["error"]["message"]
    assert engine.batches == 0


def test_valid_edge_values_are_accepted(make):
    client, _ = make()
    for extra in (
        {"strength": 10},
        {"strength": -10},
        {"temperature": 2},
        {"top_p": 1},
        {"stop": ["x"] * 16},
    ):
        r = _post(client, "/v1/completions", {**OK_BODY, **extra})
        assert r.status_code == 200, (extra, r.text)
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_full_queue_answers_429_with_retry_after(make):
    client, engine = make(ServeConfig(model_name="tiny", max_tokens_limit=8, max_queue=2), start=False)
    waiting = [GenerationRequest(ids=[5], max_tokens=1, emit=lambda *_: None) for _ in range(2)]
    engine.submit(*waiting)  # the worker is not started: the queue stays full
    r = _post(client, "/v1/completions", OK_BODY)
    assert r.status_code == 429 and r.headers["retry-after"].isdigit()
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert engine.queued == 2  # nothing of the refused request was queued
    too_many = _post(client, "/v1/completions", {**OK_BODY, "n": 3})  # could never fit: 400
    assert too_many.status_code == 400 and "limit per request" in too_many.json()["error"]["message"]


def test_queue_is_all_or_nothing_and_drops_cancelled_rows(tiny_lm):
    engine = BatchEngine(tiny_lm, max_queue=3)
    events = []
    rows = [GenerationRequest(ids=[9, 10], max_tokens=1, emit=lambda *e: events.append(e)) for _ in range(4)]
    engine.submit(*rows[:2])
    with pytest.raises(QueueFull):
        engine.submit(*rows[2:])
    assert engine.queued == 2
    for row in rows[:2]:
        row.cancel()
    engine.submit(*rows[2:])  # the cancelled rows gave their places back
    assert engine.queued == 2 and engine.rows_cancelled == 2
    rows[2].cancel()
    engine.start()
    try:
        _until(lambda: engine.queued == 0 and not engine.active and engine.batches == 1, "the queue to drain")
        assert engine.rows_cancelled == 3 and events[-1][0] == "done"  # only rows[3] was decoded
    finally:
        engine.close()


# -- cancellation on disconnect (a real server, a raw socket closed mid-request) --------
@pytest.fixture()
def live(tiny_lm):
    """A keyless uvicorn server whose model blocks in its first forward until released."""
    import uvicorn

    engine = BatchEngine(tiny_lm, max_batch=8, wait_s=0.0)
    reached, release = threading.Event(), threading.Event()

    def gate(module, args):
        reached.set()
        release.wait(WAIT_S)

    handle = tiny_lm.model.model.layers[0].register_forward_pre_hook(gate)
    engine.start()
    config = ServeConfig(model_name="tiny", max_tokens_limit=64, max_request_bytes=4000)
    srv = uvicorn.Server(
        uvicorn.Config(create_app(engine, config), host="127.0.0.1", port=0, log_level="error")
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    _until(lambda: srv.started, "the server to start")
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield port, engine, reached, release
    release.set()
    handle.remove()
    srv.should_exit = True
    thread.join(timeout=10)
    engine.close()


def _raw_post(port: int, path: str, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
    sock.sendall(head.encode() + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_stops_decoding(live, stream):
    port, engine, reached, release = live
    body = {"model": "tiny", "messages": [{"role": "user", "content": "the good day"}]}
    sock = _raw_post(
        port, "/v1/chat/completions", {**body, "max_tokens": 64, "temperature": 0, "stream": stream}
    )
    assert reached.wait(WAIT_S), "decoding never started"
    row = engine.active[0]
    if stream:  # the response is under way: its first chunk (the role) has arrived
        seen = b""
        while b"data:" not in seen:
            seen += sock.recv(4096)
    sock.close()
    _until(row.cancelled.is_set, "the server to notice the disconnect")
    release.set()
    _until(lambda: not engine.active, "the batch to end")
    assert engine.rows_cancelled == 1
    assert row.completion_tokens == 0  # stopped at its next token, not after 64


def test_chunked_body_over_the_limit_is_refused_while_it_streams(live):
    port, _, _, _ = live
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
    head = f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
    sock.sendall((head + "Transfer-Encoding: chunked\r\n\r\n").encode())
    for _ in range(5):  # 5000 bytes > 4000, and the body never ends
        sock.sendall(b"3e8\r\n" + b" " * 1000 + b"\r\n")
    reply = b""
    while b"\r\n\r\n" not in reply:
        part = sock.recv(4096)
        if not part:
            break
        reply += part
    sock.close()
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]


# -- the key, 500s, keyless Host/Origin/Content-Type ----------------------------------------
def test_api_key_is_compared_in_constant_time(make, monkeypatch):
    import simsteer.serve.access as access

    calls = []
    real = access.hmac.compare_digest
    monkeypatch.setattr(access.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    client, _ = make(ServeConfig(model_name="tiny", api_key="k-123"))
    assert client.get("/v1/models", headers={"authorization": "Bearer k-12"}).status_code == 401
    assert client.get("/v1/models", headers={"authorization": "Bearer k-123"}).status_code == 200
    latin = {"authorization": "Bearer k\xe9".encode("latin-1")}
    assert client.get("/v1/models", headers=latin).status_code == 401
    assert len(calls) == 3


def test_server_errors_are_generic_with_a_request_id(make, tiny_lm, caplog):
    def boom(module, args):
        raise RuntimeError("secret-detail-42")

    tiny_lm.model.model.layers[0].register_forward_pre_hook(boom)
    client, engine = make()
    caplog.set_level(logging.INFO)
    r = _post(client, "/v1/completions", OK_BODY)
    assert r.status_code == 500 and "secret" not in r.text
    rid = r.headers["x-request-id"]
    assert rid in r.json()["error"]["message"] and r.json()["error"]["type"] == "server_error"
    assert any(rid in m and "secret-detail-42" in m for m in caplog.messages)
    streamed = _post(client, "/v1/completions", {**OK_BODY, "stream": True})
    assert "secret" not in streamed.text and streamed.headers["x-request-id"] in streamed.text

    def broken(*rows):  # an unexpected failure in the app itself
        raise ValueError("secret-detail-43")

    engine.submit = broken
    r = _post(client, "/v1/completions", OK_BODY)
    assert r.status_code == 500 and "secret" not in r.text
    assert r.headers["x-request-id"] in r.json()["error"]["message"]
    assert "secret-detail-43" in caplog.text


@pytest.mark.parametrize(
    "headers,status",
    [
        ({"host": "evil.example"}, 400),
        ({"host": "evil.example:8000"}, 400),
        ({"host": "127.0.0.1.evil.example"}, 400),
        ({"host": "localhost:8000"}, 200),
        ({"host": "[::1]:8000"}, 200),
        ({"host": "127.0.0.2"}, 200),
        ({"origin": "http://evil.example"}, 403),
        ({"origin": "null"}, 403),
        ({"origin": "http://localhost:3000"}, 200),
        ({"content-type": "text/plain"}, 415),
        ({"content-type": "application/x-www-form-urlencoded"}, 415),
        ({"content-type": ""}, 415),
        ({"content-type": "application/json; charset=utf-8"}, 200),
    ],
)
def test_keyless_server_checks_host_origin_and_content_type(make, headers, status):
    client, engine = make()
    r = client.post(
        "/v1/completions",
        content=json.dumps(OK_BODY),
        headers={"content-type": "application/json", **headers},
    )
    assert r.status_code == status, r.text
    if status != 200:
        assert "error" in r.json() and engine.batches == 0


def test_configured_host_is_accepted_and_a_key_lifts_the_keyless_checks(make):
    client, _ = make(ServeConfig(model_name="tiny", max_tokens_limit=8, host="box.lan"))
    assert client.get("/v1/models", headers={"host": "box.lan:8000"}).status_code == 200
    assert client.get("/v1/models", headers={"host": "other.lan"}).status_code == 400
    keyed, _ = make(ServeConfig(model_name="tiny", max_tokens_limit=8, api_key="k"))
    r = keyed.get("/v1/models", headers={"host": "evil.example", "authorization": "Bearer k"})
    assert r.status_code == 200


def test_cast_cache_is_a_small_lru():
    hidden = torch.zeros(2, 3, 4)
    add = AddVector(torch.arange(4.0))
    shift = HeadShift(torch.ones(2, 2), torch.ones(2), alpha=1.0)
    for i in range(50):  # a server asked for 50 different strengths
        s = 0.1 * (i + 1)
        assert torch.allclose(add.edit(hidden, s), s * torch.arange(4.0).expand(2, 3, 4))
        assert torch.allclose(shift.edit(hidden, s), torch.full((2, 3, 4), s))
    assert len(add._cast) == CAST_CACHE_SIZE and len(shift._cast) == CAST_CACHE_SIZE
    latest = add._cast.get((hidden.device, hidden.dtype, s), lambda: None)  # the latest is kept
    assert torch.equal(latest, s * torch.arange(4.0))


def test_a_body_that_never_finishes_gets_408_and_the_connection_closes(tiny_lm):
    """Issue 23, item 3: a client trickling its body holds the connection only until the
    body deadline (for the whole body, not per chunk)."""
    engine = BatchEngine(tiny_lm, max_batch=2, wait_s=0.0)
    config = ServeConfig(model_name="tiny", max_tokens_limit=8, body_timeout_s=0.5)
    stop = threading.Event()
    with running(create_app(engine, config)) as port:
        sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        )
        sock.sendall((head + "Content-Length: 100000\r\n\r\n").encode() + b'{"prompt": "')

        def trickle() -> None:  # a byte now and then, never the whole body
            while not stop.wait(0.05):
                try:
                    sock.sendall(b"a")
                except OSError:
                    return

        sender = threading.Thread(target=trickle, daemon=True)
        sender.start()
        reply = b""
        while True:
            part = sock.recv(4096)
            if not part:  # the server closed the connection
                break
            reply += part
        stop.set()
        sender.join(WAIT_S)
        sock.close()
    assert reply.startswith(b"HTTP/1.1 408"), reply[:300]
    assert b"did not arrive within 0.5 s" in reply and b"connection: close" in reply.lower()
