"""``sims serve`` with a tiny model on a free loopback port, driven by the openai client."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import openai
import pytest
import torch

from simsteer.learners.caa import AddVector
from simsteer.serve.app import create_app
from simsteer.serve.config import ServeConfig
from simsteer.serve.engine import BatchEngine
from simsteer.steering import Steering

KEY = "test-key-123"


@pytest.fixture()
def server(tiny_lm):
    import uvicorn

    big = Steering({1: AddVector(torch.full((tiny_lm.hidden_size,), 50.0))}, "caa", tiny_lm.fingerprint())
    engine = BatchEngine(tiny_lm, {"big": [big]}, max_batch=8, wait_s=0.02)
    engine.start()
    config = ServeConfig(model_name="tiny", api_key=KEY, max_request_bytes=4000, max_tokens_limit=16)
    srv = uvicorn.Server(
        uvicorn.Config(create_app(engine, config), host="127.0.0.1", port=0, log_level="error")
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/v1", engine
    srv.should_exit = True
    thread.join(timeout=10)
    engine.close()


def _client(url, key=KEY):
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=30)


def test_models_and_chat(server):
    url, _ = server
    client = _client(url)
    assert [m.id for m in client.models.list()] == ["tiny", "tiny:big"]
    msgs = [{"role": "user", "content": "the good day"}]
    out = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert 1 <= out.usage.completion_tokens <= 6 and out.usage.prompt_tokens > 0
    assert out.choices[0].finish_reason in ("stop", "length")
    again = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0)
    assert again.choices[0].message.content == out.choices[0].message.content  # greedy
    steered = client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=6, temperature=0, extra_body={"steering": "big"}
    )
    assert steered.choices[0].message.content != out.choices[0].message.content
    zero = client.chat.completions.create(
        model="tiny",
        messages=msgs,
        max_tokens=6,
        temperature=0,
        extra_body={"steering": "big", "strength": 0},
    )
    assert zero.choices[0].message.content == out.choices[0].message.content  # strength 0 = unsteered
    several = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, n=3)
    assert [c.index for c in several.choices] == [0, 1, 2]
    bearer = {"Authorization": f"Bearer {KEY}"}
    health = urllib.request.Request(url.removesuffix("/v1") + "/health", headers=bearer)
    with urllib.request.urlopen(health, timeout=10) as reply:
        assert json.load(reply) == {"status": "ok", "engine": "torch", "active": 0, "queued": 0}


def test_streaming_matches_non_streaming(server):
    url, _ = server
    client = _client(url)
    msgs = [{"role": "user", "content": "a cat"}]
    full = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0)
    chunks = list(
        client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0, stream=True)
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    comp = client.completions.create(model="tiny", prompt="the sun", max_tokens=5, temperature=0)
    streamed = client.completions.create(
        model="tiny", prompt="the sun", max_tokens=5, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == comp.choices[0].text
    assert comp.object == "text_completion"


def test_concurrent_requests_are_batched(server):
    url, engine = server
    client = _client(url)
    before = engine.batches
    results = []

    def ask(i):
        r = client.completions.create(model="tiny", prompt=f"the dog {i}", max_tokens=4, temperature=0)
        results.append(r.choices[0].text)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 6
    assert engine.batches - before < 6  # some requests shared a forward pass


def test_auth_and_limits(server):
    url, _ = server
    with pytest.raises(openai.AuthenticationError):
        _client(url, key="wrong").models.list()
    client = _client(url)
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError, match="over this server's limit"):
        client.chat.completions.create(model="tiny", messages=msgs, max_tokens=1000)
    with pytest.raises(openai.BadRequestError, match="unknown steering"):
        client.chat.completions.create(model="tiny", messages=msgs, extra_body={"steering": "nope"})
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x" * 5000}])
    assert err.value.status_code == 413
    req = urllib.request.Request(
        url + "/chat/completions",
        data=b"not json",
        headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as bad:
        urllib.request.urlopen(req, timeout=10)
    assert bad.value.code == 400 and "valid JSON" in json.loads(bad.value.read())["error"]["message"]
