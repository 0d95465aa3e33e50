"""``sims serve --engine llamacpp``: which steerings llama.cpp may serve, and the
server's worker on llama.cpp, where each (steering, strength) group of rows is decoded
with its own control vector set on one shared context (the CAA policy is a copy of a
real run's final steering: layers 9-20, strength 0.25)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from simsteer.cli.main import main
from simsteer.errors import SimsError
from simsteer.functions import AddVector
from simsteer.generation.engines import choose_engine
from simsteer.generation.llamacpp import LlamaCppBackend, gguf_file
from simsteer.generation.torch_engine import DecodeSettings, Job
from simsteer.policy import Policy, load_policy
from simsteer.serve.config import ServeConfig
from simsteer.serve.engine import BatchEngine
from simsteer.steering import Steering
from simsteer.tokens import encode_prompt, eos_token_ids

from .test_serve_engine import _request

CAA = Path(__file__).parent / "fixtures" / "smollm2_caa"
needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python (simsteer[llamacpp]) not installed",
)
PROMPT = "Tell me about cats."


def test_engine_names_are_checked():
    with pytest.raises(SimsError, match="engine"):
        ServeConfig(engine="tgi")
    assert ServeConfig().engine == "torch"


def test_a_torch_model_is_served_by_torch(tiny_lm):
    assert choose_engine("auto", tiny_lm, {}, purpose="serve") == "torch"
    assert choose_engine("torch", tiny_lm, {}, purpose="serve") == "torch"
    with pytest.raises(SimsError, match="GGUF"):
        choose_engine("llamacpp", tiny_lm, {}, purpose="serve")
    with pytest.raises(SimsError, match="unknown engine"):
        choose_engine("tgi", tiny_lm, {}, purpose="serve")
    with pytest.raises(SimsError, match="GGUF"):
        BatchEngine(tiny_lm, {}, engine="llamacpp").start()


def test_cli_serve_engine_llamacpp_on_a_non_gguf_model_is_one_line(tiny_model_dir, capsys):
    code = main(["serve", "--model", str(tiny_model_dir), "--engine", "llamacpp", "--port", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "GGUF" in err[0], err


@needs_llama_cpp
@pytest.mark.slow
def test_llamacpp_serves_only_when_every_steering_is_additive(embedded_lm):
    caa = load_policy(CAA)
    prompt_only = Policy([caa[0].with_positions("prompt")])
    assert choose_engine("auto", embedded_lm, {"caa": caa}, purpose="serve") == "llamacpp"
    assert choose_engine("llamacpp", embedded_lm, {}, purpose="serve") == "llamacpp"
    assert choose_engine("auto", embedded_lm, {"caa": caa, "p": prompt_only}, purpose="serve") == "torch"
    with pytest.raises(SimsError, match=r"'p'.*positions"):
        choose_engine("llamacpp", embedded_lm, {"caa": caa, "p": prompt_only}, purpose="serve")


def _serve(engine: BatchEngine, lm, specs: list[dict]) -> list[dict]:
    """Submit every request together; their events once all have ended."""
    events: list = []
    engine.submit(*[_request(lm, PROMPT, events, **kw) for kw in specs])
    for e in events:
        assert e["done"].wait(120), "a row never finished"
    return events


def _alone(lm, vectors: dict[int, torch.Tensor], max_tokens: int) -> str:
    """Greedy text of PROMPT on a backend whose own control vector is ``vectors``."""
    out: dict = {}
    eos = eos_token_ids(lm.model, lm.tokenizer)
    with LlamaCppBackend(gguf_file(lm), vectors) as backend:
        ids = [encode_prompt(lm.tokenizer, PROMPT)]
        settings = DecodeSettings(0.0, 0, 1.0, max_tokens, 1)
        backend.run(ids, [Job(0, 0, 1)], settings, lambda job, tokens: out.setdefault(0, tokens), eos)
    tokens = [t for t in out[0] if t not in eos]
    return lm.tokenizer.decode(tokens, skip_special_tokens=True)


@pytest.fixture()
def llama_engine(embedded_lm):
    engine = BatchEngine(
        embedded_lm, {"caa": list(load_policy(CAA))}, max_batch=8, wait_s=0.05, engine="llamacpp"
    )
    engine.start()
    yield engine
    engine.close()


@needs_llama_cpp
@pytest.mark.slow
def test_each_steering_group_gets_its_own_control_vector(llama_engine, embedded_lm):
    """A row alone decodes exactly as a backend holding its group's vector times its
    strength; rows of three groups in one batch stay steered each by its own vector."""
    lm, vectors = embedded_lm, load_policy(CAA).additive_vectors()
    specs = [
        {"max_tokens": 24, "temperature": 0.0},
        {"max_tokens": 24, "temperature": 0.0, "steering": "caa"},
        {"max_tokens": 24, "temperature": 0.0, "steering": "caa", "strength": 4.0},
    ]
    scales = [0.0, 1.0, 4.0]
    references = [_alone(lm, {k: v * s for k, v in vectors.items()} if s else {}, 24) for s in scales]
    assert len(set(references)) == 3  # the strengths make a difference
    for spec, reference in zip(specs, references, strict=True):
        (alone,) = _serve(llama_engine, lm, [spec])
        assert alone["end"] == ("done", "length") and alone["text"] == reference
    together = _serve(llama_engine, lm, specs)
    # Sharing the cache with other sequences rounds a little differently (quantised
    # activations), which may part a greedy answer from its reference at a near-tie
    # after a while, never at the start.
    for event, reference in zip(together, references, strict=True):
        head = lm.tokenizer.encode(reference, add_special_tokens=False)[:8]
        assert lm.tokenizer.encode(event["text"], add_special_tokens=False)[:8] == head, (event, reference)


@needs_llama_cpp
@pytest.mark.slow
def test_llamacpp_rows_are_seeded_stopped_and_cancelled(llama_engine, embedded_lm):
    lm = embedded_lm
    sampled = {"max_tokens": 16, "temperature": 0.9, "seed": 5, "steering": "caa"}
    first, again = (_serve(llama_engine, lm, [sampled])[0]["text"] for _ in range(2))
    assert first == again  # a request seed reproduces the sample
    assert _serve(llama_engine, lm, [{**sampled, "seed": 6}])[0]["text"] != first
    (stopped,) = _serve(llama_engine, lm, [{"max_tokens": 32, "temperature": 0.0, "stop": ("cat",)}])
    assert stopped["end"] == ("done", "stop") and "cat" not in stopped["text"]
    events: list = []
    request = _request(lm, PROMPT, events, max_tokens=400, temperature=0.0)
    request.cancel()  # a client that left before its row was admitted
    llama_engine.submit(request)
    (tail,) = _serve(llama_engine, lm, [{"max_tokens": 4, "temperature": 0.0}])
    assert tail["end"] == ("done", "length") and "end" not in events[0]
    assert llama_engine.rows_cancelled == 1


@needs_llama_cpp
@pytest.mark.slow
def test_a_group_vector_must_fit_the_model(embedded_lm):
    """A steering whose vector has the wrong width fails that batch with an error event,
    and the server goes on serving."""
    bad = Steering({3: AddVector(torch.ones(embedded_lm.hidden_size + 1))}, "caa", embedded_lm.fingerprint())
    engine = BatchEngine(embedded_lm, {"bad": [bad]}, max_batch=4, wait_s=0.01, engine="llamacpp")
    engine.start()
    try:
        (failed,) = _serve(engine, embedded_lm, [{"max_tokens": 4, "temperature": 0.0, "steering": "bad"}])
        assert failed["end"][0] == "error" and "width" in failed["end"][1]
        (fine,) = _serve(engine, embedded_lm, [{"max_tokens": 4, "temperature": 0.0}])
        assert fine["end"] == ("done", "length") and fine["text"]
    finally:
        engine.close()


@needs_llama_cpp
@pytest.mark.slow
def test_llamacpp_seeded_request_over_http(llama_engine, embedded_lm):
    """Issue 23, item 1 on llama.cpp: a request's seed reaches the engine over HTTP. Alone,
    the same body gets the same text; beside three other requests, the same text up to
    llama.cpp's rounding in a shared batch (the README's caveat): its first 8 tokens."""
    import threading

    from simsteer.serve.app import create_app

    from .serving import running
    from .test_serve import _post, _text

    config = ServeConfig(model_name="smol", max_tokens_limit=16)
    with running(create_app(llama_engine, config)) as port:
        url = f"http://127.0.0.1:{port}/v1/completions"
        body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0.9, "seed": 5, "steering": "caa"}
        first = _text(_post(url, body, key=None))
        assert _text(_post(url, body, key=None)) == first
        assert _text(_post(url, {**body, "seed": 6}, key=None)) != first
        others = [
            {"prompt": f"{PROMPT} {w}", "max_tokens": 16, "temperature": 0.9}
            for w in ("Dogs?", "Owls?", "Now.")
        ]
        replies: list = [None] * 4
        bodies = [others[0], body, *others[1:]]

        def send(i: int) -> None:
            replies[i] = _post(url, bodies[i], key=None)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    head = embedded_lm.tokenizer.encode(first, add_special_tokens=False)[:8]
    assert embedded_lm.tokenizer.encode(_text(replies[1]), add_special_tokens=False)[:8] == head


@needs_llama_cpp
@pytest.mark.slow
def test_llamacpp_row_with_non_finite_logits_spoils_only_its_batch(embedded_lm):
    """Issue 23, item 2 on llama.cpp: a row whose control vector overflows fails with its
    own message; the rows sharing llama.cpp's cache with it then are told why they were
    stopped (NaN in shared cells reaches them), and the rows after it decode as before
    (before: every later request failed)."""
    huge = Steering(
        {3: AddVector(torch.full((embedded_lm.hidden_size,), 1e38))}, "caa", embedded_lm.fingerprint()
    )
    engine = BatchEngine(embedded_lm, {"huge": [huge]}, max_batch=4, wait_s=0.05, engine="llamacpp")
    engine.start()
    try:
        fine = {"max_tokens": 8, "temperature": 0.0}
        (alone,) = _serve(engine, embedded_lm, [fine])
        broken = {"max_tokens": 8, "temperature": 1.0, "steering": "huge", "strength": 10.0}
        (failed,) = _serve(engine, embedded_lm, [broken])
        assert failed["end"][0] == "failed" and "inf/NaN" in failed["end"][1], failed
        assert _serve(engine, embedded_lm, [fine])[0]["text"] == alone["text"]
        together = _serve(engine, embedded_lm, [fine, broken, fine])
        assert together[1]["end"] == failed["end"]
        for event in (together[0], together[2]):
            assert event["end"][0] == "failed" and "shares one cache" in event["end"][1], event
        after = _serve(engine, embedded_lm, [fine, fine])
        assert [e["text"] for e in after] == [alone["text"]] * 2
    finally:
        engine.close()
