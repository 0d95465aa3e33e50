"""HPR: the slerp formula, a planted hyperplane, per-token activations, persistence."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from simsteer.activations import collect_activations, collect_token_activations
from simsteer.errors import SimsError
from simsteer.learners import PreferenceActivations, get_learner
from simsteer.learners.hpr import HouseholderRotation, householder_slerp, mlp_widths, token_pairs
from simsteer.loop.activation_store import load_preference_activations, save_preference_activations
from simsteer.steering import Steering
from simsteer.tokens import encode_prompt, left_pad


def _reflect(h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return h - 2 * (h @ v).unsqueeze(-1) / (v @ v) * v


def test_slerp_matches_hand_written_rotation():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(50, 12, generator=g, dtype=torch.float64)
    v = torch.randn(12, generator=g, dtype=torch.float64)
    gamma1 = torch.rand(50, generator=g, dtype=torch.float64) * math.pi
    # Rotation in the plane of h and Hh, written from an orthonormal basis (u, w).
    hh = _reflect(h, v)
    u = h / h.norm(dim=-1, keepdim=True)
    w = hh - (hh * u).sum(-1, keepdim=True) * u
    w = w / w.norm(dim=-1, keepdim=True)
    expected = h.norm(dim=-1, keepdim=True) * (
        torch.cos(gamma1)[:, None] * u + torch.sin(gamma1)[:, None] * w
    )
    got = householder_slerp(h, v, gamma1)
    assert torch.allclose(got, expected, atol=1e-10)
    assert torch.allclose(got.norm(dim=-1), h.norm(dim=-1), atol=1e-10)
    # LEARNERS.md's formula, literally: (sin γ1 / sin γ2) Hh + (sin(γ2 - γ1) / sin γ2) h.
    gamma2 = torch.arccos((h * hh).sum(-1) / (h.norm(dim=-1) * hh.norm(dim=-1)))
    literal = (torch.sin(gamma1) / torch.sin(gamma2))[:, None] * hh + (
        torch.sin(gamma2 - gamma1) / torch.sin(gamma2)
    )[:, None] * h
    assert torch.allclose(got, literal, atol=1e-8)
    # γ1 = γ2 lands exactly on the reflection; γ1 = 0 leaves h.
    assert torch.allclose(householder_slerp(h, v, gamma2), hh, atol=1e-9)
    assert torch.allclose(householder_slerp(h, v, torch.zeros(50, dtype=torch.float64)), h, atol=1e-12)


def _mlp(d: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    widths = mlp_widths(d)
    out = {}
    for k, (a, b) in enumerate(itertools.pairwise(widths)):
        out[f"w{k + 1}"] = torch.randn(b, a, generator=gen) / math.sqrt(a)
        out[f"b{k + 1}"] = torch.randn(b, generator=gen) * 0.1
    return out


def test_function_gates_on_probe_and_uses_formula():
    g = torch.Generator().manual_seed(1)
    d = 16
    fn = HouseholderRotation(torch.randn(d, generator=g), _mlp(d, g), alpha=0.7)
    h = torch.randn(4, 9, d, generator=g)
    out = fn.edit(h, strength=1.5)
    flat, new = h.reshape(-1, d), out.reshape(-1, d)
    neg = flat @ fn.v < 0
    assert neg.any() and (~neg).any()
    assert torch.equal(new[~neg], flat[~neg])  # positive side untouched
    expected = householder_slerp(flat[neg].double(), fn.v.double(), 0.7 * 1.5 * fn.angle(flat[neg]).double())
    assert torch.allclose(new[neg].double(), expected, atol=1e-5)
    assert torch.equal(fn.edit(h, 0.0), h)


def _planted_tokens(d=16, prompts=24, tokens=8, seed=0):
    """Layer 0: positives are the negatives reflected across a planted hyperplane;
    layer 1: no signal."""
    g = torch.Generator().manual_seed(seed)
    v = torch.zeros(d)
    v[2] = 1.0
    pos_t, neg_t = [], []
    for _ in range(prompts):
        neg0 = torch.randn(tokens, d, generator=g)
        neg0[:, 2] = -neg0[:, 2].abs() - 0.5  # negative side: v·h < 0
        pos0 = _reflect(neg0, v)
        noise = torch.randn(2, tokens, d, generator=g)
        pos_t.append(torch.stack([pos0, noise[0]], dim=1))
        neg_t.append(torch.stack([neg0, noise[1]], dim=1))
    groups = list(range(prompts))
    summary = torch.zeros(prompts, 2, d)
    data = PreferenceActivations([0, 1], summary, summary, groups, groups, torch.ones(2), pos_t, neg_t)
    return data, v


def test_planted_hyperplane_crossed_with_norms_kept():
    data, v = _planted_tokens()
    learner = get_learner("hpr", layers="all", top_k=1, epochs=10, lr=1e-2, seed=0)
    steering = learner.fit(data, {})
    assert steering.layers == [0]  # the layer with signal wins the held-out accuracy
    fn = steering.functions[0]
    assert steering.metadata["held_out_accuracy"]["0"] > 0.95
    g = torch.Generator().manual_seed(9)
    h = torch.randn(400, 16, generator=g)
    h[:, 2] = h[:, 2].abs() + 0.5
    neg_side, pos_side = _reflect(h, v), h
    moved = fn.edit(neg_side, 1.0)
    assert torch.allclose(moved.norm(dim=-1), neg_side.norm(dim=-1), rtol=1e-5)
    # Near the hyperplane the float32 edit still keeps norms (γ2 -> 0, γ1 large).
    near = neg_side.clone()
    near[:, 2] = -1e-4
    assert torch.allclose(fn.edit(near, 1.0).norm(dim=-1), near.norm(dim=-1), rtol=1e-5)
    assert ((moved @ v) > 0).float().mean() > 0.9  # across the planted hyperplane
    kept = fn.edit(pos_side, 1.0)
    on_pos = fn.probe_logit(pos_side) >= 0
    assert on_pos.float().mean() > 0.95
    assert torch.equal(kept[on_pos], pos_side[on_pos])


def test_pairs_skip_shared_prefix_and_too_few_pairs_raise():
    d, t = 4, 6
    shared = torch.randn(t, 1, d)
    other = shared.clone()
    other[4:] += 1.0  # the responses differ from token 4 on
    data = PreferenceActivations(
        [0], torch.zeros(1, 1, d), torch.zeros(1, 1, d), [0], [0], torch.ones(1), [shared], [other]
    )
    pos, neg, groups = token_pairs(data, 100)
    assert len(groups) == 2 and not torch.equal(pos, neg)
    short = other.clone()
    short[4] = shared[4]
    one = PreferenceActivations(
        [0], torch.zeros(1, 1, d), torch.zeros(1, 1, d), [0], [0], torch.ones(1), [shared], [short[:5]]
    )
    with pytest.raises(SimsError, match="usable token pairs"):
        token_pairs(one, 100)
    with pytest.raises(SimsError, match="per-token activations"):
        get_learner("hpr").fit(
            PreferenceActivations([0], torch.zeros(1, 1, d), torch.zeros(1, 1, d), [0], [0], torch.ones(1)),
            {},
        )


def test_token_activations_match_mean_summaries_and_persist(tiny_lm, tmp_path):
    prompts = ["the good day", "a cat", "the sun"]
    responses = ["is very happy and warm", "", "was nice"]
    toks = collect_token_activations(tiny_lm, prompts, responses, [1, 2], batch_size=2, max_response_tokens=3)
    assert [tuple(t.shape) for t in toks] == [(3, 2, 32), (0, 2, 32), (2, 2, 32)]
    full = collect_token_activations(tiny_lm, prompts[:1], responses[:1], [1, 2], max_response_tokens=None)
    means = collect_activations(tiny_lm, prompts[:1], responses[:1], [1, 2]).summaries
    assert torch.allclose(full[0].mean(0), means[0], atol=1e-5)
    data = PreferenceActivations(
        [1, 2], means.expand(2, -1, -1), means[:1], [0, 1], [0], torch.ones(2), toks[:2], toks[2:]
    )
    save_preference_activations(tmp_path / "acts.safetensors", data, 7)
    loaded, n = load_preference_activations(tmp_path / "acts.safetensors")
    assert n == 7 and loaded.negative_heads is None
    assert [t.shape for t in loaded.positive_tokens] == [t.shape for t in toks[:2]]
    assert all(torch.equal(a, b) for a, b in zip(loaded.negative_tokens, toks[2:], strict=True))


def _tiny_steering(lm) -> Steering:
    g = torch.Generator().manual_seed(4)
    d = lm.hidden_size
    fns = {i: HouseholderRotation(torch.randn(d, generator=g), _mlp(d, g)) for i in (1, 2)}
    return Steering(fns, "hpr", lm.fingerprint(), positions="all")


def test_save_load_round_trip_and_strength_zero(tiny_lm, tmp_path):
    steering = _tiny_steering(tiny_lm)
    ids, mask = left_pad([encode_prompt(tiny_lm.tokenizer, p) for p in ("the good day", "a cat")], 0)
    with torch.inference_mode():
        base = tiny_lm.model(input_ids=ids, attention_mask=mask).logits
        with steering.applied(tiny_lm.model):
            steered = tiny_lm.model(input_ids=ids, attention_mask=mask).logits
        with steering.applied(tiny_lm.model, strength=0.0):
            zero = tiny_lm.model(input_ids=ids, attention_mask=mask).logits
        loaded = Steering.load(steering.save(tmp_path / "hpr"))
        with loaded.applied(tiny_lm.model):
            again = tiny_lm.model(input_ids=ids, attention_mask=mask).logits
    assert (tmp_path / "hpr" / "steering.safetensors").is_file()
    assert torch.equal(base, zero)
    assert not torch.allclose(base, steered)
    assert torch.equal(steered, again)
    assert loaded.functions[1].params() == {"alpha": 1.0}


def test_loop_collects_tokens_and_refit_from_saved_activations_is_identical(tiny_lm, tmp_path):
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
    learner = get_learner("hpr", layers="1-2", top_k=1, max_response_tokens=4)
    result = SIMS(tiny_lm, get_oracle("length:3"), learner, config, progress=False).fit(
        prompts, tmp_path / "run"
    )
    data, _ = load_preference_activations(tmp_path / "run" / "iter_0" / "activations.safetensors")
    assert data.positive_tokens is not None and len(data.positive_tokens) == len(data.positive)
    assert max(len(t) for t in data.positive_tokens + data.negative_tokens) <= 4
    # What a resumed run would fit from the saved activations is what the run saved.
    refit = learner.fit(data, tiny_lm.fingerprint())
    saved = Steering.load(tmp_path / "run" / "iter_1" / "steering")
    assert saved.layers == refit.layers and saved.positions == "last"
    for layer in saved.layers:
        for name, value in saved.functions[layer].state_dict().items():
            assert torch.equal(value, refit.functions[layer].state_dict()[name])
    assert result.history[0].fit.learner == "hpr"
