"""ActAdd: the difference of the prompt pair's activations, added at the prompt's
first positions (padding not counted), its mean variant, and the learner wrapper."""

from __future__ import annotations

import pytest
import torch

from simsteer.errors import SimsError
from simsteer.hooks import record
from simsteer.learners import PreferenceActivations, fit_actadd, get_learner
from simsteer.learners.actadd import PositionalAdd, prompt_pair_ids
from simsteer.steering import Steering
from simsteer.tokens import encode_prompt, left_pad

# In the tiny tokenizer's vocabulary; the shorter prompt gets padded.
POSITIVE, NEGATIVE = "love the sun", "hate"


def test_delta_reproduces_difference_vector(tiny_lm):
    steering = fit_actadd(tiny_lm, POSITIVE, NEGATIVE, layers=[1, 2], coefficient=3.0)
    pos, neg, offset = prompt_pair_ids(tiny_lm.tokenizer, POSITIVE, NEGATIVE)
    assert len(pos) == len(neg) and pos[:offset] == neg[:offset]
    # The user's text starts where encode_prompt puts it.
    assert encode_prompt(tiny_lm.tokenizer, POSITIVE)[: offset + 3] == pos
    with torch.inference_mode():
        out = tiny_lm.model(input_ids=torch.tensor([pos, neg]), output_hidden_states=True)
    for layer in (1, 2):
        h = out.hidden_states[layer + 1]
        expected = 3.0 * (h[0, offset:] - h[1, offset:])
        fn = steering.functions[layer]
        assert isinstance(fn, PositionalAdd) and fn.offset == offset
        assert fn.delta.shape == (3, tiny_lm.hidden_size)
        assert torch.allclose(fn.delta, expected, atol=1e-5)
    mean = fit_actadd(tiny_lm, POSITIVE, NEGATIVE, layers=1, coefficient=3.0, mode="mean")
    assert torch.allclose(mean.functions[1].vector, steering.functions[1].delta.mean(0), atol=1e-6)


def test_added_at_first_prompt_positions_with_left_padding(tiny_lm):
    steering = fit_actadd(tiny_lm, POSITIVE, NEGATIVE, layers=1, coefficient=2.0)
    fn = steering.functions[1]
    prompts = ["the good day is very happy and warm", "a cat is here"]
    ids, mask = left_pad([encode_prompt(tiny_lm.tokenizer, p) for p in prompts], 0)
    with torch.inference_mode():
        with record(tiny_lm.model, [1]) as base:
            tiny_lm.model(input_ids=ids, attention_mask=mask)
        with steering.applied(tiny_lm.model), record(tiny_lm.model, [1]) as steered:
            tiny_lm.model(input_ids=ids, attention_mask=mask)
    diff = steered[1][0] - base[1][0]
    for row in range(2):
        pads = int((mask[row] == 0).sum())
        start = pads + fn.offset
        assert torch.allclose(diff[row, start : start + 3], fn.delta, atol=1e-5)
        rest = torch.cat([diff[row, :start], diff[row, start + 3 :]])
        assert rest.abs().max() == 0


def test_generation_steers_prefill_only_and_strength_zero_exact(tiny_lm, tmp_path):
    steering = fit_actadd(tiny_lm, POSITIVE, NEGATIVE, layers=1, coefficient=8.0)
    ids, mask = left_pad([encode_prompt(tiny_lm.tokenizer, p) for p in ("the good day", "a cat")], 0)
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        base = tiny_lm.model(input_ids=ids, attention_mask=mask).logits
        base_tokens = tiny_lm.model.generate(input_ids=ids, attention_mask=mask, **gen)
        with steering.applied(tiny_lm.model, strength=0.0):
            zero = tiny_lm.model(input_ids=ids, attention_mask=mask).logits
            zero_tokens = tiny_lm.model.generate(input_ids=ids, attention_mask=mask, **gen)
        with steering.applied(tiny_lm.model):
            steered = tiny_lm.model(input_ids=ids, attention_mask=mask).logits
            tiny_lm.model.generate(input_ids=ids, attention_mask=mask, **gen)  # decoding past T is a no-op
        loaded = Steering.load(steering.save(tmp_path / "actadd"))
        with loaded.applied(tiny_lm.model):
            again = tiny_lm.model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(base, zero) and torch.equal(base_tokens, zero_tokens)
    assert not torch.allclose(base, steered)
    assert torch.equal(steered, again)
    assert loaded.functions[1].params() == {"offset": steering.functions[1].offset}


def test_learner_needs_prepare_and_uses_center_layer(tiny_lm):
    empty = torch.zeros(0, 3, tiny_lm.hidden_size)
    data = PreferenceActivations([0, 1, 2], empty, empty, [], [], torch.zeros(3))
    learner = get_learner("actadd", layers="0-2", positive=POSITIVE, negative=NEGATIVE, coefficient=2.0)
    assert learner.needs == "none"
    with pytest.raises(SimsError, match="needs the model"):
        learner.fit(data, tiny_lm.fingerprint())
    learner.prepare(tiny_lm)
    steering = learner.fit(data, tiny_lm.fingerprint())
    assert steering.layers == [1] and steering.hyperparameters["positive"] == POSITIVE
    every = get_learner("actadd", positive=POSITIVE, negative=NEGATIVE, single_layer=False, mode="mean")
    every.prepare(tiny_lm)
    assert every.fit(data, tiny_lm.fingerprint()).layers == [0, 1, 2]
    with pytest.raises(SimsError, match="mode"):
        get_learner("actadd", mode="sum")
    with pytest.raises(SimsError, match="non-empty"):
        fit_actadd(tiny_lm, "", "hate", layers=1)


def test_loop_ignores_preferences(tiny_lm, tmp_path, caplog):
    from simsteer.generation.sampling import SamplingConfig
    from simsteer.loop.calibration import GuardConfig
    from simsteer.loop.sims import SIMS, SIMSConfig
    from simsteer.oracles import get_oracle

    config = SIMSConfig(
        iterations=1,
        prompts_per_iteration=2,
        samples_per_prompt=2,
        eval_prompts=0,
        sampling=SamplingConfig(max_new_tokens=4, batch_size=4),
        guard=GuardConfig(fluency_budget=None),
    )
    learner = get_learner("actadd", positive=POSITIVE, negative=NEGATIVE)
    with caplog.at_level("INFO"):
        result = SIMS(tiny_lm, get_oracle("length:3"), learner, config, progress=False).fit(
            ["the good day", "a cat", "we walk home"], tmp_path / "run"
        )
    assert "ignores D+ and D-" in caplog.text
    assert not (tmp_path / "run" / "iter_0" / "activations.safetensors").exists()
    assert result.history[0].tokens_forward == 0
    saved = Steering.load(tmp_path / "run" / "iter_1" / "steering")
    assert saved.learner == "actadd" and saved.layers == [tiny_lm.num_layers // 2]
