"""Over HTTP, what the playground relies on: the page is served without the key (the API is
not), every reply and its log line name the steering and strength used, and a request's
``seed`` makes its samples reproducible."""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from simsteer.learners.caa import AddVector
from simsteer.serve.app import create_app
from simsteer.serve.config import ServeConfig
from simsteer.serve.engine import BatchEngine
from simsteer.steering import Steering

KEY = "test-key-456"


@pytest.fixture()
def server(tiny_lm):
    import uvicorn

    big = Steering({1: AddVector(torch.full((tiny_lm.hidden_size,), 50.0))}, "caa", tiny_lm.fingerprint())
    engine = BatchEngine(tiny_lm, {"big": [big]}, max_batch=8, wait_s=0.02)
    engine.start()
    config = ServeConfig(model_name="tiny", api_key=KEY, max_tokens_limit=16)
    srv = uvicorn.Server(
        uvicorn.Config(create_app(engine, config), host="127.0.0.1", port=0, log_level="error")
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(600):
        if srv.started:
            break
        time.sleep(0.05)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)
    engine.close()


def _get(url: str, key: str | None = None) -> tuple[int, dict[str, str], bytes]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def _post(url: str, body: dict) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    request = urllib.request.Request(url, json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _chat(url: str, **fields) -> dict:
    body = {"messages": [{"role": "user", "content": "the good day"}], "max_tokens": 6, **fields}
    status, data = _post(f"{url}/v1/chat/completions", body)
    assert status == 200, data
    return json.loads(data)


def test_the_page_is_served_without_the_key_and_the_api_is_not(server):
    status, headers, page = _get(f"{server}/playground")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"/playground/playground.js" in page and b"/playground/playground.css" in page
    assert "script-src 'self'" in headers["content-security-policy"]  # nothing from elsewhere
    assert _get(f"{server}/playground/")[0] == 200
    for name, kind in (("playground.js", "javascript"), ("playground.css", "text/css")):
        status, headers, data = _get(f"{server}/playground/{name}")
        assert status == 200 and kind in headers["content-type"] and data
    assert _get(f"{server}/playground/missing.js")[0] == 404
    assert _get(f"{server}/v1/models")[0] == 401  # the API still needs the key
    assert _get(f"{server}/playgroundx")[0] == 401  # only the page's own paths are open
    assert _get(f"{server}/v1/models", KEY)[0] == 200
    # The open prefix leads nowhere else: dot segments stay inside the page's folder.
    for path in (
        "/playground/../v1/models",
        "/playground/%2e%2e/v1/models",
        "/playground/../../pyproject.toml",
    ):
        host, port = server.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", path)  # sent as is (urllib would resolve the dots)
        reply = conn.getresponse()
        assert reply.status == 404 and b'"data"' not in reply.read(), path
        conn.close()


def test_replies_and_the_log_name_the_steering_and_strength(server, caplog):
    caplog.set_level(logging.INFO, logger="simsteer.serve")
    steered = _chat(server, model="tiny:big", strength=0.5, temperature=0)
    assert (steered["steering"], steered["strength"]) == ("big", 0.5)
    plain = _chat(server, model="tiny", temperature=0)
    assert (plain["steering"], plain["strength"]) == ("none", 1.0)
    status, data = _post(
        f"{server}/v1/chat/completions",
        {"messages": [{"role": "user", "content": "a cat"}], "max_tokens": 4, "stream": True}
        | {"steering": "big", "strength": -0.25},
    )
    assert status == 200
    chunks = [json.loads(line[6:]) for line in data.decode().splitlines() if line.startswith("data: {")]
    assert chunks and all((c["steering"], c["strength"]) == ("big", -0.25) for c in chunks)
    logged = [r.getMessage() for r in caplog.records if r.name == "simsteer.serve.app"]
    assert any("steering big, strength 0.5," in m and "/v1/chat/completions" in m for m in logged)
    assert any("steering none, strength 1," in m for m in logged)
    assert any("steering big, strength -0.25," in m for m in logged)


def test_a_seed_makes_a_sampled_answer_reproducible(server):
    first = _chat(server, temperature=1.0, seed=7, max_tokens=12)
    again = _chat(server, temperature=1.0, seed=7, max_tokens=12)
    other = _chat(server, temperature=1.0, seed=8, max_tokens=12)
    text = first["choices"][0]["message"]["content"]
    assert again["choices"][0]["message"]["content"] == text
    assert other["choices"][0]["message"]["content"] != text
    several = _chat(server, temperature=1.0, seed=7, max_tokens=12, n=2)
    samples = [c["message"]["content"] for c in several["choices"]]
    assert samples[0] == text and samples[1] != text  # n samples of one seed differ
    for bad in ("7", 1.5, True, 2**63):
        status, data = _post(
            f"{server}/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "seed": bad}
        )
        assert status == 400 and b"seed must be an integer" in data
