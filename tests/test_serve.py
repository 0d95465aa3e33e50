"""``sims serve`` with a tiny model on a free loopback port, driven by the openai client."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from typing import NamedTuple

import openai
import pytest
import torch

from simsteer.learners.caa import AddVector
from simsteer.serve.app import create_app
from simsteer.serve.config import ServeConfig
from simsteer.serve.engine import BatchEngine
from simsteer.steering import Steering

from .serving import WAIT_S, Gate, running, until

KEY = "test-key-123"


class Server(NamedTuple):
    url: str
    engine: BatchEngine
    gate: Gate


@pytest.fixture()
def server(tiny_lm):
    big = Steering({1: AddVector(torch.full((tiny_lm.hidden_size,), 50.0))}, "caa", tiny_lm.fingerprint())
    # 1e38 per unit: at strength 10 the hidden states overflow to inf, the logits turn NaN
    huge = Steering({1: AddVector(torch.full((tiny_lm.hidden_size,), 1e38))}, "caa", tiny_lm.fingerprint())
    # a small tilt that changes the greedy answer differently at strengths 1 and 2
    tilt = torch.randn(tiny_lm.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.002
    tilted = Steering({1: AddVector(tilt)}, "caa", tiny_lm.fingerprint())
    steerings = {"big": [big], "huge": [huge], "tilt": [tilted]}
    engine = BatchEngine(tiny_lm, steerings, max_batch=8, wait_s=0.02)
    engine.start()
    gate = Gate(tiny_lm.model.model.layers[0])
    config = ServeConfig(model_name="tiny", api_key=KEY, max_request_bytes=4000, max_tokens_limit=16)
    with running(create_app(engine, config)) as port:
        yield Server(f"http://127.0.0.1:{port}/v1", engine, gate)
    gate.remove()
    engine.close()


def _post(url: str, body: dict, key: str | None = KEY) -> tuple[int, dict]:
    """POST ``body`` to ``url``; (status, JSON reply)."""
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=WAIT_S) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _text(reply: tuple[int, dict]) -> str:
    status, body = reply
    assert status == 200, body
    return body["choices"][0]["text"]


def _together(server: Server, bodies: list[dict]) -> list[tuple[int, dict]]:
    """POST every body to /completions so that all are decoded in one batch: the engine is
    held in the prefill of a first request until the others are all queued."""
    server.gate.close()
    blocker = threading.Thread(
        target=_post, args=(server.url + "/completions", {"prompt": "the", "max_tokens": 2, "temperature": 0})
    )
    blocker.start()
    assert server.gate.reached.wait(WAIT_S), "the first request never reached the model"
    replies: list = [None] * len(bodies)

    def send(i: int) -> None:
        replies[i] = _post(server.url + "/completions", bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    until(lambda: server.engine.queued == len(bodies), "the requests to queue")
    before = server.engine.batches
    server.gate.open()
    for thread in [blocker, *threads]:
        thread.join(WAIT_S)
    assert server.engine.batches - before == 1  # all of them were admitted together
    return replies


def _client(url, key=KEY):
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=30)


def test_models_and_chat(server):
    url = server.url
    client = _client(url)
    assert [m.id for m in client.models.list()] == ["tiny", "tiny:big", "tiny:huge", "tiny:tilt"]
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
    url = server.url
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


def test_concurrent_requests_share_a_batch_and_each_gets_its_own_answer(server):
    """Rows with different steerings, strengths, temperatures and top-p decoded in one batch
    each get what they get alone."""
    base = {"prompt": "the good day", "max_tokens": 6, "temperature": 0}
    bodies = [
        base,
        {**base, "steering": "tilt"},
        {**base, "steering": "tilt", "strength": 2},
        {**base, "prompt": "the dog ran", "temperature": 1, "top_p": 0.5, "seed": 8},
    ]
    alone = [_text(_post(server.url + "/completions", body)) for body in bodies]
    together = _together(server, bodies)  # asserts that the four shared one admission
    assert [_text(reply) for reply in together] == alone
    assert len(set(alone[:3])) == 3  # the steering and its strength act per row


def test_a_seeded_request_gets_the_same_answer_alone_and_beside_others(server):
    """Issue 23, item 1: the seed of a request reaches the engine over HTTP."""
    url = server.url + "/completions"
    body = {"model": "tiny", "prompt": "I love the rain", "max_tokens": 12, "temperature": 1, "seed": 3}
    first = _text(_post(url, body))
    assert _text(_post(url, body)) == first  # alone, twice
    others = [{"prompt": f"the {w} day", "max_tokens": 12, "temperature": 1} for w in ("sad", "good", "cold")]
    beside = _together(server, [others[0], body, *others[1:]])
    assert _text(beside[1]) == first  # decoded in one batch with three other requests
    assert _text(_post(url, {**body, "seed": 4})) != first  # the seed is what decides
    chat = {"messages": [{"role": "user", "content": "I love the rain"}], "max_tokens": 12, "seed": 3}
    status, reply = _post(server.url + "/chat/completions", chat)
    assert status == 200 and _post(server.url + "/chat/completions", chat)[1]["choices"] == reply["choices"]
    n = _post(url, {**body, "n": 2})[1]["choices"]
    assert n[0]["text"] == first and n[1]["text"] != first  # sample 0 is the n=1 answer


def test_a_row_with_non_finite_logits_fails_alone(server):
    """Issue 23, item 2: a completion whose logits overflow (an extreme steering) fails with
    its own message; the rows decoded beside it finish as they would alone."""
    url = server.url + "/completions"
    fine = [{"prompt": f"the {w} day", "max_tokens": 6, "temperature": 0} for w in ("good", "sad")]
    alone = [_text(_post(url, body)) for body in fine]
    broken = [
        {"prompt": "the good day", "max_tokens": 6, "temperature": 1, "steering": "huge", "strength": 10},
        {"prompt": "the good day", "max_tokens": 6, "temperature": 0, "steering": "huge", "strength": 10},
    ]
    replies = _together(server, [fine[0], *broken, fine[1]])
    assert [_text(replies[0]), _text(replies[3])] == alone
    for status, body in replies[1:3]:
        assert status == 500 and "inf/NaN" in body["error"]["message"], body
    streamed = urllib.request.Request(
        url,
        data=json.dumps({**broken[0], "stream": True}).encode(),
        headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"},
    )
    with urllib.request.urlopen(streamed, timeout=WAIT_S) as reply:
        events = reply.read().decode()
    assert "inf/NaN" in events and events.rstrip().endswith("data: [DONE]")
    assert [_text(_post(url, body)) for body in fine] == alone  # the server goes on as before


def test_health_needs_the_key_on_a_keyed_server(server):
    health = server.url.removesuffix("/v1") + "/health"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(health, headers=headers), timeout=WAIT_S)
        assert refused.value.code == 401
    keyed = urllib.request.Request(health, headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(keyed, timeout=WAIT_S) as reply:
        assert json.load(reply)["status"] == "ok"


def test_stream_must_be_a_json_boolean(server):
    url = server.url + "/completions"
    for value in ("false", "true", 0, 1, [], {}):
        status, body = _post(url, {"prompt": "the good day", "max_tokens": 2, "stream": value})
        assert status == 400 and "stream must be true or false" in body["error"]["message"], (value, body)
    assert _post(url, {"prompt": "the good day", "max_tokens": 2, "stream": None})[0] == 200  # = absent


def test_tokenising_runs_beside_the_event_loop_and_is_bounded(server, monkeypatch):
    """Issue 23, item 3: while a prompt is being templated and tokenised, /health answers;
    a request that finds every waiting place of the tokenizer taken gets 429."""
    tok = server.engine.lm.tokenizer
    entered, release = threading.Event(), threading.Event()
    template = tok.apply_chat_template

    def held(*args, **kwargs):
        entered.set()
        release.wait(WAIT_S)
        return template(*args, **kwargs)

    monkeypatch.setattr(tok, "apply_chat_template", held)
    chat = {"messages": [{"role": "user", "content": "the good day"}], "max_tokens": 2, "temperature": 0}
    replies: list = []
    sender = threading.Thread(target=lambda: replies.append(_post(server.url + "/chat/completions", chat)))
    sender.start()
    try:
        assert entered.wait(WAIT_S)
        health = urllib.request.Request(
            server.url.removesuffix("/v1") + "/health", headers={"Authorization": f"Bearer {KEY}"}
        )
        with urllib.request.urlopen(health, timeout=WAIT_S) as reply:
            assert reply.status == 200  # the loop is free while the template runs
        one_place = ServeConfig(model_name="tiny", api_key=KEY, max_tokens_limit=16, max_queue=1)
        with running(create_app(server.engine, one_place)) as port:
            blocked = threading.Thread(
                target=lambda: replies.append(_post(f"http://127.0.0.1:{port}/v1/chat/completions", chat))
            )
            entered.clear()
            blocked.start()
            assert entered.wait(WAIT_S)  # that server's one place is taken
            status, body = _post(f"http://127.0.0.1:{port}/v1/completions", {"prompt": "a", "max_tokens": 2})
            assert status == 429 and body["error"]["type"] == "rate_limit_error", body
            release.set()
            blocked.join(WAIT_S)
    finally:
        release.set()
        sender.join(WAIT_S)
    assert [status for status, _ in replies] == [200, 200]


def test_auth_and_limits(server):
    url = server.url
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


# -- the model's context (issue 23, item 2) -------------------------------------------------
@pytest.fixture()
def gpt2_server(tiny_gpt2_dir):
    """A server on the tiny GPT-2 model (256 learned positions) with the default limits
    (2,048 prompt tokens, max_tokens up to 512): only the context check stands between a
    long request and a position past the table."""
    from simsteer.models import load_model

    lm = load_model(str(tiny_gpt2_dir), device="cpu", dtype="fp32")
    engine = BatchEngine(lm, max_batch=8, wait_s=0.0)
    engine.start()
    with running(create_app(engine, ServeConfig(model_name="gpt2", api_key=KEY))) as port:
        yield f"http://127.0.0.1:{port}/v1", engine
    engine.close()


def test_a_request_that_cannot_fit_the_context_gets_400(gpt2_server):
    url, engine = gpt2_server
    long = " ".join(["the good day"] * 83)  # 249 tokens of 256
    status, body = _post(url + "/completions", {"prompt": long, "max_tokens": 16, "temperature": 0})
    assert status == 400, body
    assert "249 tokens" in body["error"]["message"] and "context of 256" in body["error"]["message"]
    too_long = _post(url + "/completions", {"prompt": long + " " + long, "max_tokens": 1})
    assert too_long[0] == 400 and "context of 256" in too_long[1]["error"]["message"]
    chat = {"messages": [{"role": "user", "content": long}], "max_tokens": 300}
    assert _post(url + "/chat/completions", chat)[0] == 400
    assert engine.batches == 0  # refused before anything was queued
    fits = _post(url + "/completions", {"prompt": long, "max_tokens": 7, "temperature": 0})
    assert fits[0] == 200 and fits[1]["usage"]["completion_tokens"] <= 7
    # without max_tokens, the server's default (128) is shortened to what fits
    default = _post(url + "/completions", {"prompt": long, "temperature": 0})
    assert default[0] == 200 and 1 <= default[1]["usage"]["completion_tokens"] <= 7, default
