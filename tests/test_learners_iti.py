"""ITI: planted heads are found, the shift lands on o_proj's input, persistence."""

from __future__ import annotations

import pytest
import torch

from simsteer.activations import collect_head_activations
from simsteer.architecture import find_attn_output
from simsteer.errors import SimsError
from simsteer.hooks import count_hooks, record
from simsteer.learners import PreferenceActivations, get_learner
from simsteer.learners.iti import HeadShift
from simsteer.loop.activation_store import load_preference_activations, save_preference_activations
from simsteer.steering import Steering
from simsteer.tokens import encode_prompt, left_pad

HEADS, HEAD_DIM = 4, 8


def _planted(n_pos=40, n_neg=40, layers=(1, 2), planted=((1, 3), (2, 0)), seed=0):
    """Head activations ``[n, L, H*dh]``: noise, except a mean shift along one
    coordinate at the planted (layer, head)s."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(n_pos, len(layers), HEADS, HEAD_DIM, generator=g)
    neg = torch.randn(n_neg, len(layers), HEADS, HEAD_DIM, generator=g)
    for layer, head in planted:
        pos[:, layers.index(layer), head, 5] += 3.0
    shape = (len(layers), HEADS * HEAD_DIM)
    summary = torch.zeros(1, len(layers), 4)
    data = PreferenceActivations(
        list(layers),
        summary.expand(n_pos, -1, -1),
        summary.expand(n_neg, -1, -1),
        list(range(n_pos)),
        list(range(n_neg)),
        torch.ones(len(layers)),
        positive_heads=pos.reshape(n_pos, *shape),
        negative_heads=neg.reshape(n_neg, *shape),
        num_heads=HEADS,
    )
    return data, pos, neg


def test_selects_planted_heads_with_mass_mean_direction():
    data, pos, neg = _planted()
    steering = get_learner("iti", top_heads=2, alpha=15.0).fit(data, {})
    assert sorted(map(tuple, steering.metadata["heads"])) == [(1, 3), (2, 0)]
    assert steering.layers == [1, 2]
    fn = steering.functions[1]
    assert fn.heads == [3]
    diff = pos[:, 0, 3].mean(0) - neg[:, 0, 3].mean(0)
    theta = diff / diff.norm()
    assert torch.allclose(fn.directions[3], theta, atol=1e-6)
    sigma = (torch.cat([pos[:, 0, 3], neg[:, 0, 3]]) @ theta).std()
    assert torch.isclose(fn.sigmas[3], sigma, rtol=1e-5)
    assert torch.allclose(fn.shift(2.0)[3 * HEAD_DIM : 4 * HEAD_DIM], 30.0 * sigma * theta, atol=1e-5)
    assert fn.shift().reshape(HEADS, HEAD_DIM)[[0, 1, 2]].abs().sum() == 0


def test_head_count_scales_with_reference_and_too_few_samples_raise():
    data, *_ = _planted()
    # 2 layers x 4 heads = 8 heads: round(48/1024 x 8) = 0 -> at least 1.
    assert len(get_learner("iti").fit(data, {}).metadata["heads"]) == 1
    small, *_ = _planted(n_pos=1, n_neg=5)
    with pytest.raises(SimsError, match="at least 2 positive and 2 negative"):
        get_learner("iti").fit(small, {})
    no_heads = PreferenceActivations(
        [1], torch.zeros(2, 1, 4), torch.zeros(2, 1, 4), [0, 1], [0, 1], torch.ones(1)
    )
    with pytest.raises(SimsError, match="per-head activations"):
        get_learner("iti").fit(no_heads, {})


def _steering(lm, alpha=15.0) -> Steering:
    g = torch.Generator().manual_seed(5)
    heads, dh = lm.model.config.num_attention_heads, lm.hidden_size // lm.model.config.num_attention_heads
    directions = torch.nn.functional.normalize(torch.randn(heads, dh, generator=g), dim=-1)
    sigmas = torch.tensor([0.5, 0.0, 0.2, 0.0])
    return Steering({1: HeadShift(directions, sigmas, alpha)}, "iti", lm.fingerprint(), positions="all")


def _inputs(lm):
    return left_pad([encode_prompt(lm.tokenizer, p) for p in ("the good day is warm", "a cat")], 0)


def test_shift_lands_on_o_proj_input(tiny_lm):
    steering = _steering(tiny_lm)
    ids, mask = _inputs(tiny_lm)
    o_proj = find_attn_output(tiny_lm.layers[1])
    outputs: list[torch.Tensor] = []
    handle = o_proj.register_forward_hook(lambda m, a, out: outputs.append(out))
    try:
        with torch.inference_mode():
            with record(tiny_lm.model, [1], site="attn_heads") as base:
                tiny_lm.model(input_ids=ids, attention_mask=mask)
            with steering.applied(tiny_lm.model), record(tiny_lm.model, [1], site="attn_heads") as steered:
                tiny_lm.model(input_ids=ids, attention_mask=mask)
    finally:
        handle.remove()
    delta = steering.functions[1].shift()
    real = mask.bool()
    diff = steered[1][0] - base[1][0]
    assert torch.allclose(diff[real], delta.expand(int(real.sum()), -1), atol=1e-5)
    assert diff[~real].abs().max() == 0  # padding untouched
    # Equivalent to adding W_o δ to o_proj's output.
    assert torch.allclose(
        (outputs[1] - outputs[0])[real], (o_proj.weight @ delta).expand(int(real.sum()), -1), atol=1e-4
    )


def test_collect_head_activations_last_token(tiny_lm, tmp_path):
    prompts, responses = ["the good day", "a cat"], ["is very happy", ""]
    heads = collect_head_activations(tiny_lm, prompts, responses, [0, 2])
    assert heads.shape == (2, 2, 32)
    ids = (
        encode_prompt(tiny_lm.tokenizer, prompts[0])
        + tiny_lm.tokenizer("is very happy", add_special_tokens=False)["input_ids"]
    )
    with torch.inference_mode(), record(tiny_lm.model, [2], site="attn_heads") as acts:
        tiny_lm.model(input_ids=torch.tensor([ids]))
    assert torch.allclose(heads[0, 1], acts[2][0][0, -1], atol=1e-5)
    data, *_ = _planted()
    save_preference_activations(tmp_path / "a.safetensors", data, 3)
    loaded, _ = load_preference_activations(tmp_path / "a.safetensors")
    assert loaded.num_heads == HEADS and torch.equal(loaded.positive_heads, data.positive_heads)
    assert loaded.positive_tokens is None


def test_round_trip_strength_zero_and_hooks_removed(tiny_lm, tmp_path):
    steering = _steering(tiny_lm)
    ids, mask = _inputs(tiny_lm)
    before = count_hooks(tiny_lm.model)
    with torch.inference_mode():
        base = tiny_lm.model(input_ids=ids, attention_mask=mask).logits
        with steering.applied(tiny_lm.model):
            assert count_hooks(tiny_lm.model) == before + 2  # o_proj pre-hook + position tracker
            steered = tiny_lm.model(input_ids=ids, attention_mask=mask).logits
        with steering.applied(tiny_lm.model, strength=0.0):
            zero = tiny_lm.model(input_ids=ids, attention_mask=mask).logits
        loaded = Steering.load(steering.save(tmp_path / "iti"))
        with loaded.applied(tiny_lm.model):
            again = tiny_lm.model(input_ids=ids, attention_mask=mask).logits
    assert count_hooks(tiny_lm.model) == before
    assert torch.equal(base, zero)
    assert not torch.allclose(base, steered)
    assert torch.equal(steered, again)
    assert loaded.functions[1].params() == {"alpha": 15.0, "heads": [0, 2]}


def test_gpt2_attention_output_found(tiny_gpt2_dir):
    from simsteer.models import load_model

    lm = load_model(str(tiny_gpt2_dir), device="cpu", dtype="fp32")
    heads = collect_head_activations(lm, ["the good day"], ["is warm"], [0, 1])
    assert heads.shape == (1, 2, 32)


def test_loop_collects_head_activations(tiny_lm, tmp_path):
    from simsteer.generation.sampling import SamplingConfig
    from simsteer.loop.calibration import GuardConfig
    from simsteer.loop.sims import SIMS, SIMSConfig
    from simsteer.oracles import get_oracle

    config = SIMSConfig(
        iterations=1,
        prompts_per_iteration=4,
        samples_per_prompt=3,
        eval_prompts=0,
        sampling=SamplingConfig(max_new_tokens=6, batch_size=12),
        guard=GuardConfig(fluency_budget=None),
    )
    prompts = [f"the {w} day is {v}" for w in ("good", "bad", "cold", "warm") for v in ("happy", "sad")]
    SIMS(tiny_lm, get_oracle("length:3"), get_learner("iti"), config, progress=False).fit(
        prompts, tmp_path / "run"
    )
    data, _ = load_preference_activations(tmp_path / "run" / "iter_0" / "activations.safetensors")
    assert data.num_heads == 4 and data.positive_heads.shape == (len(data.positive), 4, 32)
    saved = Steering.load(tmp_path / "run" / "iter_1" / "steering")
    assert saved.learner == "iti" and saved.positions == "last" and saved.layers
