from __future__ import annotations

import pytest
import torch

from simsteer.errors import SimsError
from simsteer.generation.sampling import SamplingConfig, generate

PROMPTS = ["the good day", "a cat is very happy", "I love the rain"]


def test_fixed_seed_gives_identical_responses(tiny_lm):
    cfg = SamplingConfig(max_new_tokens=10, batch_size=4)
    a = generate(tiny_lm, PROMPTS, 3, cfg, seed=7)
    b = generate(tiny_lm, PROMPTS, 3, cfg, seed=7)
    c = generate(tiny_lm, PROMPTS, 3, cfg, seed=8)
    assert a == b
    assert a != c
    assert [len(x) for x in a] == [3, 3, 3]
    # K samples of one prompt differ from each other (temperature > 0).
    assert len({g.text for g in a[1]}) > 1


def test_seeded_sampling_leaves_global_rng_alone(tiny_lm):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generate(tiny_lm, PROMPTS[:1], 2, SamplingConfig(max_new_tokens=4), seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_greedy_is_batch_order_independent_and_counts_tokens(tiny_lm):
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=6)
    together = generate(tiny_lm, PROMPTS, 1, cfg)
    alone = [generate(tiny_lm, [p], 1, cfg)[0] for p in PROMPTS]
    assert [g[0].text for g in together] == [g[0].text for g in alone]
    longer = generate(tiny_lm, PROMPTS, 1, SamplingConfig(temperature=0.0, max_new_tokens=9))
    for (g,), (h,) in zip(together, longer, strict=True):
        assert 1 <= g.num_tokens <= 6
        # Ended by the end-of-sequence token: it ends there under a larger cap too (greedy,
        # the same prefix); cut by the cap: it goes on. Shorter than the cap: it ended.
        assert g.finished == (h.num_tokens == g.num_tokens)
        assert g.finished or g.num_tokens == 6


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"batch_size": 0}, "batch_size"),
        ({"cache_mb": 0}, "cache_mb"),
    ],
)
def test_invalid_sampling_settings(kwargs, message):
    with pytest.raises(SimsError, match=message):
        SamplingConfig(**kwargs)


def test_key_value_budget_reaches_the_engine_and_does_not_change_samples(tiny_lm, monkeypatch):
    import simsteer.generation.sampling as sampling
    from simsteer.generation.torch_engine import Engine

    seen = []

    class Recording(Engine):
        def run(self, *args, **kwargs):
            stats = super().run(*args, **kwargs)
            seen.append((self.cache_bytes, stats.max_rows))
            return stats

    monkeypatch.setattr(sampling, "Engine", Recording)
    prompts = ["the good day", "a cat is very happy and the dog is sad", "I love the rain"]
    roomy = generate(tiny_lm, prompts, 3, SamplingConfig(max_new_tokens=8), seed=4)
    tight = generate(tiny_lm, prompts, 3, SamplingConfig(max_new_tokens=8, cache_mb=1), seed=4)
    assert tight == roomy
    assert seen[0][0] == SamplingConfig().cache_mb << 20 and seen[1][0] == 1 << 20
