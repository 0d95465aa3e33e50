"""The server's worker on the continuous-batching engine: rows with different steerings
and settings share one batch, each getting exactly what it gets alone; rows join a
running batch; a request seed reproduces its samples whatever else runs."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from simsteer.functions import AddVector
from simsteer.serve.engine import BatchEngine, GenerationRequest
from simsteer.steering import Steering
from simsteer.tokens import encode_prompt


def _request(lm, text, events, **kw) -> GenerationRequest:
    done = threading.Event()
    out: dict = {"text": "", "done": done}

    def emit(kind, payload):
        if kind == "delta":
            out["text"] += payload
        else:
            out["end"] = (kind, payload)
            done.set()

    events.append(out)
    return GenerationRequest(ids=encode_prompt(lm.tokenizer, text), emit=emit, **kw)


@pytest.fixture()
def engine(tiny_lm):
    torch.manual_seed(0)
    big = Steering({2: AddVector(torch.randn(tiny_lm.hidden_size) * 0.01)}, "caa", tiny_lm.fingerprint())
    eng = BatchEngine(tiny_lm, {"big": [big]}, max_batch=8, wait_s=0.05)
    eng.start()
    yield eng
    eng.close()


def _run(engine, tiny_lm, specs):
    """Submit every (text, kwargs) together; return the texts in order."""
    events: list = []
    reqs = [_request(tiny_lm, text, events, **kw) for text, kw in specs]
    engine.submit(*reqs)
    for e in events:
        assert e["done"].wait(60), "a row never finished"
    assert all(e["end"][0] == "done" for e in events)
    return [e["text"] for e in events]


SPECS = [
    ("the good day", {"max_tokens": 8, "temperature": 0.0}),
    ("the good day", {"max_tokens": 8, "temperature": 0.0, "steering": "big"}),
    ("the good day", {"max_tokens": 8, "temperature": 0.0, "steering": "big", "strength": 0.5}),
    ("a cat is happy", {"max_tokens": 5, "temperature": 1.0, "seed": 3}),
    ("a cat is happy", {"max_tokens": 5, "temperature": 1.0, "seed": 3, "top_p": 0.5}),
]


def test_mixed_rows_in_one_batch_match_each_row_alone(engine, tiny_lm):
    before = engine.batches
    together = _run(engine, tiny_lm, SPECS)
    assert engine.batches - before == 1  # all five were admitted together
    alone = [_run(engine, tiny_lm, [spec])[0] for spec in SPECS]
    assert together == alone
    assert together[0] != together[1] != together[2]  # the steering and its strength act per row


def test_a_seed_reproduces_samples_whatever_else_runs(engine, tiny_lm):
    spec = ("I love the rain", {"max_tokens": 8, "temperature": 1.0, "seed": 11})
    first = _run(engine, tiny_lm, [spec])[0]
    crowded = _run(engine, tiny_lm, [("the sad dog", {"max_tokens": 8, "temperature": 1.0})] * 3 + [spec])
    assert crowded[-1] == first
    other = _run(engine, tiny_lm, [("I love the rain", {"max_tokens": 8, "temperature": 1.0, "seed": 12})])[0]
    assert other != first


def test_rows_join_a_running_batch(engine, tiny_lm):
    events: list = []
    long_row = _request(tiny_lm, "the good day", events, max_tokens=200, temperature=1.0)
    engine.submit(long_row)
    deadline = time.monotonic() + 30
    while not engine.active and time.monotonic() < deadline:
        time.sleep(0.01)
    short = _request(tiny_lm, "happy", events, max_tokens=2, temperature=0.0)
    engine.submit(short)
    assert events[1]["done"].wait(60)
    # The short row ended while the long one was still decoding: no waiting for the batch.
    assert not events[0]["done"].is_set() or len(events[0]["text"].split()) > 2
    long_row.cancel()
