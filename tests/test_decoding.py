from __future__ import annotations

import pytest
import torch

from simsteer.errors import SimsError
from simsteer.generation.decoding import choose_tokens, stream_id, stream_uniform, uniforms


def test_streams_are_deterministic_and_distinct():
    a = stream_id(0, 3, 1)
    assert a == stream_id(0, 3, 1)
    assert len({stream_id(0, 3, 1), stream_id(0, 3, 2), stream_id(0, 4, 1), stream_id(1, 3, 1)}) == 4
    draws = [stream_uniform(a, t) for t in range(5)]
    assert draws == [stream_uniform(a, t) for t in range(5)]
    assert len(set(draws)) == 5


def test_stream_numbers_look_uniform():
    values = torch.tensor([stream_uniform(stream_id(7, k, 0), t) for k in range(100) for t in range(100)])
    assert float(values.min()) >= 0 and float(values.max()) < 1
    assert abs(float(values.mean()) - 0.5) < 0.01
    counts = torch.histc(values, bins=10, min=0, max=1)
    assert float(counts.min()) > 900 and float(counts.max()) < 1100


def test_greedy_is_argmax():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 1.0]])
    assert choose_tokens(logits, None, 0.0).tolist() == [1, 0]


def test_draws_follow_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(2000, 4)
    draws = (torch.arange(2000, dtype=torch.float64) + 0.5) / 2000  # an exact grid of quantiles
    chosen = choose_tokens(logits, draws, temperature=1.0)
    freq = torch.bincount(chosen, minlength=4).float() / 2000
    assert torch.allclose(freq, probs, atol=1e-3)
    # The lowest draw takes the most likely token, the highest the least likely kept one.
    assert choose_tokens(logits[:1], torch.tensor([0.0]), 1.0).item() == 0
    assert choose_tokens(logits[:1], torch.tensor([0.999]), 1.0).item() == 3


def test_top_k_and_top_p_filter():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(1000, 4)
    draws = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000
    assert set(choose_tokens(logits, draws, 1.0, top_k=2).tolist()) == {0, 1}
    # top-p 0.7: the smallest set reaching 0.7 is {0, 1}; top-p 0.81 needs {0, 1, 2}.
    assert set(choose_tokens(logits, draws, 1.0, top_p=0.7).tolist()) == {0, 1}
    assert set(choose_tokens(logits, draws, 1.0, top_p=0.81).tolist()) == {0, 1, 2}
    kept = choose_tokens(logits, draws, 1.0, top_k=3, top_p=0.7)
    assert torch.allclose(
        torch.bincount(kept, minlength=4).float() / 1000, torch.tensor([0.625, 0.375, 0, 0]), atol=2e-3
    )


def test_temperature_sharpens():
    logits = torch.tensor([[1.0, 0.0]]).expand(1000, 2)
    draws = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000
    hot = choose_tokens(logits, draws, 2.0).float().mean()
    cold = choose_tokens(logits, draws, 0.25).float().mean()
    assert float(cold) < float(hot)


def test_non_finite_logits_are_one_clear_error():
    with pytest.raises(SimsError, match="non-finite"):
        choose_tokens(torch.tensor([[float("nan"), 0.0]]), torch.tensor([0.5]), 1.0)


def test_uniforms_pairs_streams_with_steps():
    s = [stream_id(0, 0, 0), stream_id(0, 1, 0)]
    got = uniforms(s, [0, 3])
    assert got.dtype == torch.float64
    assert got.tolist() == [stream_uniform(s[0], 0), stream_uniform(s[1], 3)]
