"""The continuous-batching engine: the same output as ``model.generate`` (the static
path), for every batch size and split of the work, with steering, on three
architectures (Llama, GPT-2, Gemma 3 with sliding-window layers)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from simsteer.functions import AddVector
from simsteer.generation.decoding import stream_id
from simsteer.generation.sampling import DecodeSettings, SamplingConfig, _generate_static, generate
from simsteer.generation.torch_engine import Engine, Job, KVStore, supports
from simsteer.models import load_model
from simsteer.steering import Steering
from simsteer.tokens import encode_prompt, eos_token_ids

from .conftest import build_tiny_model

PROMPTS = [
    "the good day",
    "a cat is very happy and the dog is sad",
    "I love the rain",
    "happy",
    "the sad dog and the happy cat love the good rain today",
]


@pytest.fixture(scope="module", params=["llama", "gpt2", "gemma3"])
def arch_lm(request, tmp_path_factory):
    path = build_tiny_model(
        tmp_path_factory.mktemp(request.param), arch=request.param, chat=request.param != "gpt2"
    )
    return load_model(str(path), device="cpu", dtype="fp32")


def _steering(lm, positions="all", scale=2.0):
    torch.manual_seed(1)
    fns = {i: AddVector(torch.randn(lm.hidden_size) * scale) for i in (1, 2)}
    return Steering(fns, "test", lm.fingerprint(), positions=positions)


def _both_paths(lm, settings, steering=None, samples=3):
    """(engine output, static output) as {(prompt, sample): tokens}."""
    enc = [encode_prompt(lm.tokenizer, p) for p in PROMPTS]
    jobs = [Job(i, s, stream_id(5, i, s)) for i in range(len(PROMPTS)) for s in range(samples)]
    eos = eos_token_ids(lm.model, lm.tokenizer)
    pad = lm.tokenizer.pad_token_id
    outs = []
    for run in (
        lambda fin: Engine(lm.model, eos, pad).run(enc, jobs, settings, fin),
        lambda fin: _generate_static(lm.model, enc, jobs, settings, eos, pad, fin),
    ):
        got = {}
        with contextlib.ExitStack() as stack, torch.inference_mode():
            if steering is not None:
                stack.enter_context(steering.applied(lm.model))
            run(lambda job, tokens, got=got: got.__setitem__((job.prompt, job.sample), tokens))
        outs.append(got)
    return outs


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_engine_matches_static_generate(arch_lm, temperature):
    assert supports(arch_lm.model)
    # Batch 4 < 15 sequences: rows finish and are refilled while others decode.
    settings = DecodeSettings(temperature, 20, 1.0, 12, 4)
    engine, static = _both_paths(arch_lm, settings, _steering(arch_lm))
    assert engine == static
    plain, _ = _both_paths(arch_lm, settings)
    assert plain != engine  # the steering changes the output, so the comparison can fail


@pytest.mark.parametrize("positions", ["generated", "prompt", "last"])
def test_engine_keeps_steering_positions(tiny_lm, positions):
    settings = DecodeSettings(1.0, 0, 1.0, 10, 2)
    engine, static = _both_paths(tiny_lm, settings, _steering(tiny_lm, positions, scale=4.0))
    assert engine == static


def test_samples_do_not_depend_on_batch_size(tiny_lm):
    outs = [
        generate(tiny_lm, PROMPTS, 4, SamplingConfig(max_new_tokens=10, batch_size=b), seed=3)
        for b in (1, 3, 64)
    ]
    assert outs[0] == outs[1] == outs[2]
    assert len({g.text for g in outs[0][1]}) > 1


def test_samples_do_not_depend_on_the_split(tiny_lm):
    cfg = SamplingConfig(max_new_tokens=10, batch_size=8)
    whole = generate(tiny_lm, PROMPTS, 2, cfg, seed=3)
    parts = generate(tiny_lm, PROMPTS[:2], 2, cfg, seed=3) + generate(
        tiny_lm, PROMPTS[2:], 2, cfg, seed=3, keys=range(2, len(PROMPTS))
    )
    assert parts == whole
    shifted = generate(tiny_lm, PROMPTS[2:], 2, cfg, seed=3)  # default keys 0.. differ
    assert shifted != whole[2:]


def test_engine_refills_rows_and_bounds_its_columns(tiny_lm):
    enc = [encode_prompt(tiny_lm.tokenizer, p) for p in PROMPTS] * 4
    jobs = [Job(i, 0, stream_id(0, i, 0)) for i in range(len(enc))]
    eos = eos_token_ids(tiny_lm.model, tiny_lm.tokenizer)
    done = []
    with torch.inference_mode():
        stats = Engine(tiny_lm.model, eos, tiny_lm.tokenizer.pad_token_id).run(
            enc, jobs, DecodeSettings(1.0, 0, 1.0, 16, 3), lambda job, tokens: done.append(job)
        )
    assert sorted(j.prompt for j in done) == list(range(len(enc)))
    assert stats.prompt_tokens == sum(len(e) for e in enc)
    assert stats.live_row_steps <= stats.row_steps <= 3 * stats.steps
    # Columns follow the live rows, not the whole queue's history.
    assert stats.max_columns <= max(len(e) for e in enc) + 16


def test_one_prefill_per_prompt(tiny_lm):
    enc = [encode_prompt(tiny_lm.tokenizer, p) for p in PROMPTS]
    jobs = [Job(i, s, stream_id(0, i, s)) for i in range(len(enc)) for s in range(4)]
    eos = eos_token_ids(tiny_lm.model, tiny_lm.tokenizer)
    with torch.inference_mode():
        stats = Engine(tiny_lm.model, eos, tiny_lm.tokenizer.pad_token_id).run(
            enc, jobs, DecodeSettings(1.0, 0, 1.0, 4, 64), lambda job, tokens: None
        )
    assert stats.prefills == 1
    assert stats.prompt_tokens == sum(len(e) for e in enc)


def test_kv_store_moves_columns_and_rows():
    store = KVStore(rows=2, capacity=4)
    k = torch.arange(2 * 1 * 3 * 2, dtype=torch.float32).view(2, 1, 3, 2)
    keys, values = store.write(0, k, -k)
    store.end += 3
    assert torch.equal(keys, k) and torch.equal(values, -k)
    store.reserve(3)  # 3 + 3 > 4: new buffers, same columns
    assert store.capacity >= 6 and torch.equal(store.keys[0][:, :, store.start : store.end], k)
    store.drop_leading(1)
    store.grow_left(2)  # one column is free before start, one more needs a relayout
    assert store.length == 4
    assert torch.equal(store.keys[0][:, :, store.end - 2 : store.end], k[:, :, 1:])
    store.select_rows(torch.tensor([1]))
    assert store.rows == 1 and torch.equal(store.keys[0][0, :, store.end - 2 : store.end], k[1, :, 1:])
    src = KVStore(rows=1, capacity=2)
    src.write(0, torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2))
    src.end = 2
    store.copy_row(src, 0, 0, 2)
    assert torch.equal(store.keys[0][0, :, store.end - 2 : store.end], torch.ones(1, 2, 2))


@pytest.mark.slow
def test_engine_matches_hook_based_generate_on_the_embedded_model(embedded_lm):
    """Greedy with a CAA-like steering: token for token the output of ``model.generate``."""
    from simsteer.prompts import load_prompts

    lm = embedded_lm
    torch.manual_seed(0)
    fns = {i: AddVector(torch.randn(lm.hidden_size) * 1.5) for i in (9, 12, 15)}
    steering = Steering(fns, "caa", lm.fingerprint())
    prompts = [p.text for p in load_prompts()][:8]
    enc = [encode_prompt(lm.tokenizer, p) for p in prompts]
    jobs = [Job(i, 0, 0) for i in range(len(enc))]
    eos = eos_token_ids(lm.model, lm.tokenizer)
    pad = lm.tokenizer.pad_token_id
    settings = DecodeSettings(0.0, 0, 1.0, 24, 3)
    outs = []
    for run in (
        Engine(lm.model, eos, pad).run,
        lambda *a: _generate_static(lm.model, *a[:3], eos, pad, a[3]),
    ):
        got = {}
        with steering.applied(lm.model), torch.inference_mode():
            run(enc, jobs, settings, lambda job, tokens, got=got: got.__setitem__(job.prompt, tokens))
        outs.append(got)
    assert outs[0] == outs[1]


def test_key_value_budget_caps_rows_without_changing_samples(tiny_lm):
    # Prompts of one length, so the budget is the same number of rows all along.
    enc = [encode_prompt(tiny_lm.tokenizer, PROMPTS[4])] * 8
    jobs = [Job(i, s, stream_id(2, i, s)) for i in range(len(enc)) for s in range(2)]
    eos = eos_token_ids(tiny_lm.model, tiny_lm.tokenizer)
    pad = tiny_lm.tokenizer.pad_token_id
    settings = DecodeSettings(1.0, 0, 1.0, 8, 64)
    outs, stats = [], []
    for budget in (None, 3):
        engine = Engine(tiny_lm.model, eos, pad)
        if budget is not None:  # room for `budget` rows of the longest prompt
            longest = max(len(e) for e in enc) + settings.max_new_tokens
            engine = Engine(tiny_lm.model, eos, pad, cache_bytes=budget * longest * engine.column_bytes)
        got = {}
        with torch.inference_mode():
            stats.append(
                engine.run(
                    enc, jobs, settings, lambda job, t, got=got: got.__setitem__((job.prompt, job.sample), t)
                )
            )
        outs.append(got)
    assert outs[0] == outs[1] and len(outs[0]) == len(jobs)
    assert stats[0].max_rows > 3  # unbudgeted, the batch takes many rows
    assert stats[1].max_rows <= 3


def test_engine_head_path_gives_the_full_models_logits(arch_lm):
    """The last-token head (decoder + head on [rows, d]) equals the model's own logits."""
    from simsteer.generation.torch_engine import _LastTokenHead

    head = _LastTokenHead.of(arch_lm.model)
    assert head is not None
    ids = torch.tensor([encode_prompt(arch_lm.tokenizer, PROMPTS[1])])
    with torch.inference_mode():
        full = arch_lm.model(input_ids=ids).logits[:, -1]
        mine = head(head.decoder(input_ids=ids).last_hidden_state[:, -1])
    torch.testing.assert_close(mine, full, rtol=0, atol=1e-5)
