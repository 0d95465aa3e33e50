"""Activation collection against a per-example computation, and the one path from
labelled answers to a learner's input (:func:`collect_preference_activations`)."""

from __future__ import annotations

import pytest
import torch

from simsteer.activations import (
    NEEDS,
    PreferenceActivations,
    collect_activations,
    collect_extra_activations,
    collect_head_activations,
    collect_preference_activations,
)
from simsteer.errors import SimsError
from simsteer.hooks import count_hooks
from simsteer.tokens import encode_prompt, encode_response

PROMPTS = ["the good day", "a cat is happy", "I", "we walk home"]
RESPONSES = ["I love the sun", "bad bad dog", "", "the day is long and the night is dark"]
LAYERS = [0, 2]  # not the last: transformers normalises hidden_states[-1]


def _alone(lm, prompt: str, response: str) -> tuple[list[torch.Tensor], int]:
    """Hidden states of one unpadded (prompt, response) at LAYERS, and the response length."""
    ids = encode_prompt(lm.tokenizer, prompt) + encode_response(lm.tokenizer, response)
    with torch.inference_mode():
        out = lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return [out.hidden_states[layer + 1][0] for layer in LAYERS], len(encode_response(lm.tokenizer, response))


@pytest.mark.parametrize("summary", ["mean", "last"])
def test_summaries_match_one_answer_at_a_time(tiny_lm, summary):
    acts = collect_activations(tiny_lm, PROMPTS, RESPONSES, LAYERS, summary=summary, batch_size=3)
    assert acts.summaries.shape == (len(PROMPTS), len(LAYERS), tiny_lm.hidden_size)
    assert count_hooks(tiny_lm.model) == 0  # (transformers' own output_hidden_states adds some)
    for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES, strict=True)):
        states, n = _alone(tiny_lm, p, r)
        for j, h in enumerate(states):
            # An empty answer is summarised by the last prompt token.
            expected = h[-1] if summary == "last" or n == 0 else h[-n:].mean(0)
            torch.testing.assert_close(acts.summaries[i, j], expected, atol=1e-5, rtol=1e-4)
    assert acts.num_tokens == sum(
        len(encode_prompt(tiny_lm.tokenizer, p)) + len(encode_response(tiny_lm.tokenizer, r))
        for p, r in zip(PROMPTS, RESPONSES, strict=True)
    )


def test_token_norms_are_the_mean_response_token_norm(tiny_lm):
    acts = collect_activations(tiny_lm, PROMPTS, RESPONSES, LAYERS, batch_size=2)
    for j in range(len(LAYERS)):
        norms = []
        for p, r in zip(PROMPTS, RESPONSES, strict=True):
            states, n = _alone(tiny_lm, p, r)
            norms += states[j][len(states[j]) - n :].norm(dim=-1).tolist() if n else []
        assert float(acts.token_norms[j]) == pytest.approx(sum(norms) / len(norms), rel=1e-4)


def test_heads_are_the_o_proj_input_at_the_last_token(tiny_lm):
    heads = collect_head_activations(tiny_lm, PROMPTS, RESPONSES, LAYERS, batch_size=3)
    assert heads.shape == (len(PROMPTS), len(LAYERS), tiny_lm.hidden_size)
    with pytest.raises(SimsError, match="no \\(prompt, response\\) pairs"):
        collect_head_activations(tiny_lm, [], [], LAYERS)


@pytest.mark.parametrize("needs", ["mean", "last", "tokens", "heads"])
def test_preference_activations_are_summaries_plus_what_the_learner_needs(tiny_lm, needs):
    groups = [0, 1, 0, 1]
    data, tokens = collect_preference_activations(
        tiny_lm, needs, PROMPTS, RESPONSES, 2, groups, LAYERS, summary="last" if needs == "last" else "mean"
    )
    assert isinstance(data, PreferenceActivations)
    acts = collect_activations(
        tiny_lm, PROMPTS, RESPONSES, LAYERS, summary="last" if needs == "last" else "mean"
    )
    assert torch.equal(data.positive, acts.summaries[:2]) and torch.equal(data.negative, acts.summaries[2:])
    assert data.positive_groups == [0, 1] and data.negative_groups == [0, 1]
    assert torch.equal(data.token_norms, acts.token_norms) and tokens == acts.num_tokens
    extra = collect_extra_activations(tiny_lm, needs, PROMPTS, RESPONSES, LAYERS, 2)
    assert (data.positive_tokens is not None) == (needs == "tokens")
    assert (data.positive_heads is not None) == (needs == "heads")
    if needs == "tokens":
        assert all(
            torch.equal(a, b) for a, b in zip(data.negative_tokens, extra["negative_tokens"], strict=True)
        )
        assert max(len(t) for t in data.negative_tokens) == 9  # the whole answer (under the cap of 32)
    if needs == "heads":
        assert torch.equal(data.positive_heads, extra["positive_heads"]) and data.num_heads == 4


def test_preference_activations_caps(tiny_lm):
    data, tokens = collect_preference_activations(
        tiny_lm,
        "tokens",
        PROMPTS,
        RESPONSES,
        2,
        [0, 1, 2, 3],
        LAYERS,
        max_response_tokens=2,
        summary_max_tokens=1,
    )
    assert max(len(t) for t in data.positive_tokens + data.negative_tokens) == 2
    capped = collect_activations(tiny_lm, PROMPTS, RESPONSES, LAYERS, max_response_tokens=1)
    assert torch.equal(data.positive, capped.summaries[:2]) and tokens == capped.num_tokens


def test_preference_activations_none_and_errors(tiny_lm):
    data, tokens = collect_preference_activations(
        tiny_lm, "none", PROMPTS, RESPONSES, 2, [0, 1, 0, 1], LAYERS
    )
    assert tokens == 0 and data.layers == LAYERS
    assert data.positive.shape == (0, len(LAYERS), tiny_lm.hidden_size) and data.positive_groups == []
    assert "none" in NEEDS
    with pytest.raises(SimsError, match="unknown learner activation kind"):
        collect_preference_activations(tiny_lm, "logits", PROMPTS, RESPONSES, 2, [0, 1, 0, 1], LAYERS)
    with pytest.raises(ValueError, match="one group id"):
        collect_preference_activations(tiny_lm, "mean", PROMPTS, RESPONSES, 2, [0], LAYERS)


def test_collection_stops_after_the_deepest_layer_it_reads(tiny_lm):
    from simsteer.architecture import find_layers

    layers = find_layers(tiny_lm.model)
    assert max(LAYERS) < len(layers) - 1  # there is a layer above the ones read
    calls = []
    handle = layers[-1].register_forward_hook(lambda *a: calls.append(1))
    try:
        collect_activations(tiny_lm, PROMPTS, RESPONSES, LAYERS, batch_size=2)
        assert calls == []  # the top layer never ran
        collect_activations(tiny_lm, PROMPTS, RESPONSES, [len(layers) - 1], batch_size=2)
        assert calls  # ... unless it is read
    finally:
        handle.remove()
    assert count_hooks(tiny_lm.model) == 0
