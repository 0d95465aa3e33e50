from __future__ import annotations

import math

import pytest
import torch

from simsteer.fluency import (
    distinct_n,
    ends_in_loop,
    fluency_report,
    perplexities,
    repetition_rate,
)
from simsteer.tokens import encode_prompt


def test_repetition_rate_by_hand():
    assert repetition_rate("one two three four five") == 0.0
    # trigrams: (a b c) (b c a) (c a b) (a b c) -> one of four repeats
    assert repetition_rate("a b c a b c") == pytest.approx(0.25)
    assert repetition_rate("hi") == 0.0


def test_distinct_n_by_hand():
    assert distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)
    assert distinct_n([""], 2) == 0.0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("I can think of a few ideas. I can think of a few ideas. I can think", True),
        (
            "It was a day when the world was made to be. It was a day when the world was made "
            "to be. It was a",
            True,
        ),
        ("very very very very very", True),
        ("The sun is warm and the day is long. We walk home together.", False),
        ("It is what it is.", False),
        ("no no", False),
    ],
)
def test_loop_detection(text, expected):
    assert ends_in_loop(text) is expected


def test_perplexity_matches_direct_computation(tiny_lm):
    prompts, responses = ["the good day", "a cat"], ["I love the sun", "bad bad dog"]
    got = perplexities(tiny_lm, prompts, responses, batch_size=2)
    tok = tiny_lm.tokenizer
    for p, r, value in zip(prompts, responses, got, strict=True):
        prompt_ids = encode_prompt(tok, p)
        resp_ids = tok(r, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + resp_ids])
        with torch.no_grad():
            logits = tiny_lm.model(ids).logits[0]
        logp = torch.log_softmax(logits.float(), -1)
        nll = -sum(logp[len(prompt_ids) - 1 + j, t] for j, t in enumerate(resp_ids)) / len(resp_ids)
        assert value == pytest.approx(math.exp(float(nll)), rel=1e-4)
    assert math.isnan(perplexities(tiny_lm, ["x"], [""])[0])


def test_fluency_report(tiny_lm):
    report = fluency_report(tiny_lm, ["a", "b"], ["the sun the sun the sun the sun", "I walk home"])
    assert report.loop_share == 0.5
    assert report.perplexity > 1
    assert 0 < report.distinct_2 < 1
    assert set(report.to_dict()) == {"perplexity", "repetition", "distinct_2", "loop_share", "mean_tokens"}
