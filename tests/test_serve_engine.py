"""The server's worker on the continuous-batching engine: rows with different steerings
and settings share one batch, each getting exactly what it gets alone; rows join a
running batch; a request seed reproduces its samples whatever else runs; a row whose
logits go non-finite fails alone."""

from __future__ import annotations

import threading

import pytest
import torch

from simsteer.functions import AddVector
from simsteer.generation.torch_engine import DecodeSettings, Job
from simsteer.policy import Policy
from simsteer.serve.engine import BatchEngine, GenerationRequest, _RowSafeEngine, non_finite_rows
from simsteer.steering import Steering
from simsteer.tokens import encode_prompt, eos_token_ids, pad_token_id

from .serving import WAIT_S, Gate


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
    assert len(set(together[:3])) == 3  # the steering and its strength act per row


def test_a_seed_reproduces_samples_whatever_else_runs(engine, tiny_lm):
    """The engine's part of the promise (over HTTP: test_serve.py's
    test_a_seeded_request_gets_the_same_answer_alone_and_beside_others)."""
    spec = ("I love the rain", {"max_tokens": 8, "temperature": 1.0, "seed": 11})
    first = _run(engine, tiny_lm, [spec])[0]
    crowded = _run(engine, tiny_lm, [("the sad dog", {"max_tokens": 8, "temperature": 1.0})] * 3 + [spec])
    assert crowded[-1] == first
    other = _run(engine, tiny_lm, [("I love the rain", {"max_tokens": 8, "temperature": 1.0, "seed": 12})])[0]
    assert other != first


def test_rows_join_a_running_batch(engine, tiny_lm):
    """A short row admitted while a long one decodes ends first; nothing waits for the batch."""
    gate = Gate(tiny_lm.model.model.layers[0])
    events: list = []
    long_row = _request(tiny_lm, "the good day", events, max_tokens=200, temperature=0.0)
    seen: dict = {}

    def short_emit(kind: str, payload: str) -> None:  # runs on the worker: what it sees is exact
        if kind != "delta":
            seen.update(end=kind, long_ended="end" in events[0], long_tokens=long_row.completion_tokens)
            short_done.set()

    short_done = threading.Event()
    ids = encode_prompt(tiny_lm.tokenizer, "happy")
    short = GenerationRequest(ids=ids, emit=short_emit, max_tokens=2, temperature=0.0)
    try:
        gate.close()
        engine.submit(long_row)
        assert gate.reached.wait(WAIT_S), "the long row never started"
        batches = engine.batches  # the long row's admission
        engine.submit(short)  # queued while the long row's prefill is held
        gate.open()
        assert short_done.wait(WAIT_S)
        assert seen["end"] == "done" and not seen["long_ended"] and seen["long_tokens"] < 200, seen
        assert engine.batches == batches + 1  # the short row joined the running batch
    finally:
        long_row.cancel()
        gate.remove()


def test_a_row_taking_the_place_of_a_failed_row_decodes_as_alone(tiny_lm):
    """A row whose logits went NaN leaves NaN keys and values in its row of the store;
    the next row admitted into that row must not read them (masked columns count as
    0 x value): it decodes exactly what it decodes alone."""
    huge = Policy(
        [Steering({1: AddVector(torch.full((tiny_lm.hidden_size,), 1e38))}, "caa", tiny_lm.fingerprint())]
    )
    eos = eos_token_ids(tiny_lm.model, tiny_lm.tokenizer)
    pad = pad_token_id(tiny_lm.tokenizer, eos[0])
    prompts = {
        0: encode_prompt(tiny_lm.tokenizer, "the good day"),
        1: encode_prompt(tiny_lm.tokenizer, "I love the rain and the sun and the cold night"),  # longest
        2: encode_prompt(tiny_lm.tokenizer, "a cat"),
    }
    settings = DecodeSettings(0.0, 0, 1.0, 8, 4)
    bad: list[int] = []
    out: dict[int, list[int]] = {}

    def run(jobs: list[Job], later: list[Job]) -> None:
        engine = _RowSafeEngine(tiny_lm.model, eos, pad, on_bad_row=lambda job: bad.append(job.prompt))

        def more(free: int, idle: bool):
            if later and 1 in out:  # the failed row has ended: its place is free
                return [later.pop()]
            return None if idle else []

        def steer(group, rows):
            return huge.applied(tiny_lm.model, strength=10.0, rows=rows)  # 1e39: inf

        def on_finish(job, tokens):
            out[job.prompt] = tokens

        engine.run(prompts, jobs, settings, on_finish, lambda job, t: job.prompt not in bad, more, steer)

    with torch.inference_mode():
        run([Job(2, 0, 7)], [])
        alone = out.pop(2)
        run([Job(0, 0, 5), Job(1, 0, 6, group="huge")], [Job(2, 0, 7)])
    assert bad == [1] and len(out[0]) == 8
    assert out[2] == alone


def test_non_finite_rows_are_nan_plus_inf_or_an_overflow_at_the_rows_temperature():
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor(
        [
            [1.0, nan, 0.5],
            [-inf, 1.0, 2.0],
            [1e38, 1.0, 0.0],
            [1e38, 1.0, 0.0],
            [inf, 0.0, 0.0],
            [1.0, 2.0, 3.0],
        ]
    )
    assert non_finite_rows(logits, [1.0, 1.0, 1.0, 0.001, 0.0, 0.5]) == [0, 3, 4]
