"""SEA: projections against numpy's SVD, a planted subspace, per-token rescaling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simsteer.errors import SimsError
from simsteer.learners import PreferenceActivations, get_learner
from simsteer.learners.sea import SpectralProjection, energy_rank, neutral_rows, principal_basis
from simsteer.steering import Steering
from simsteer.tokens import encode_prompt, left_pad


def _numpy_projector(neutral: np.ndarray, other: np.ndarray, ratio: float, keep_head: bool) -> np.ndarray:
    """LEARNERS.md directly: Ω = H Oᵀ / N, SVD, k from the energy ratio."""
    omega = neutral.T @ other / neutral.shape[0]
    u, s, _ = np.linalg.svd(omega)
    share = np.cumsum(s**2) / np.sum(s**2)
    k = int(np.argmax(share >= ratio)) + 1
    part = u[:, :k] if keep_head else u[:, k:]
    return part @ part.T


def test_projections_match_numpy_svd_float64():
    rng = np.random.default_rng(0)
    n, d = 40, 12
    neutral = rng.normal(size=(n, d))
    pos = neutral @ rng.normal(size=(d, d)) * 0.5 + rng.normal(size=(n, d))
    neg = neutral @ rng.normal(size=(d, d)) * 0.5 + rng.normal(size=(n, d))
    ratio = 0.9
    p_pos = _numpy_projector(neutral, pos, ratio, keep_head=True)
    p_neg = _numpy_projector(neutral, neg, ratio, keep_head=False)  # the tail, as in the paper
    u_pos = principal_basis(torch.from_numpy(neutral), torch.from_numpy(pos), ratio)
    u_neg = principal_basis(torch.from_numpy(neutral), torch.from_numpy(neg), ratio)
    assert u_pos.dtype == torch.float64 and 0 < u_pos.shape[1] < d
    fn = SpectralProjection(u_pos, u_neg)
    assert np.allclose(fn.projection().numpy(), p_pos + p_neg, atol=1e-6)  # stored as float32
    # The edit: x' = P+ x + P- x, rescaled to each token's own norm.
    x = rng.normal(size=(5, d))
    edited = x @ (p_pos + p_neg)
    edited *= np.linalg.norm(x, axis=1, keepdims=True) / np.linalg.norm(edited, axis=1, keepdims=True)
    out = fn.edit(torch.from_numpy(x), 1.0)
    assert out.dtype == torch.float64
    assert np.allclose(out.numpy(), edited, atol=1e-6)
    average = SpectralProjection(u_pos, u_neg, mode="average").edit(torch.from_numpy(x), 1.0)
    assert np.allclose(average.numpy(), x @ (p_pos + p_neg) / 2, atol=1e-6)


def test_energy_rank():
    sigma = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert energy_rank(sigma, 9 / 14) == 1
    assert energy_rank(sigma, 0.9) == 2
    assert energy_rank(sigma, 1.0) == 3
    with pytest.raises(SimsError, match="zero"):
        energy_rank(torch.zeros(3), 0.5)


def test_recovers_planted_positive_subspace():
    g = torch.Generator().manual_seed(0)
    n, d, k = 300, 20, 3
    basis, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    z = torch.randn(n, k, generator=g, dtype=torch.float64) * torch.tensor(
        [3.0, 2.0, 1.5], dtype=torch.float64
    )
    neutral = z @ basis.T + 0.05 * torch.randn(n, d, generator=g, dtype=torch.float64)
    positive = z @ basis.T + 0.05 * torch.randn(n, d, generator=g, dtype=torch.float64)
    u = principal_basis(neutral, positive, 0.99)
    assert u.shape == (d, k)
    # Same subspace: the projectors agree.
    assert torch.allclose(u @ u.T, basis @ basis.T, atol=0.02)


def test_rescale_is_per_token_not_per_batch():
    g = torch.Generator().manual_seed(2)
    u_pos, _ = torch.linalg.qr(torch.randn(8, 2, generator=g))
    u_neg, _ = torch.linalg.qr(torch.randn(8, 3, generator=g))
    fn = SpectralProjection(u_pos, u_neg)
    x = torch.randn(6, 8, generator=g)
    batch = fn.edit(x, 1.0)
    alone = torch.cat([fn.edit(x[i : i + 1], 1.0) for i in range(6)])
    assert torch.allclose(batch, alone, atol=1e-6)
    assert torch.allclose(batch.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    half = fn.edit(x, 0.5)
    assert torch.allclose(half, x + 0.5 * (batch - x), atol=1e-6)
    assert torch.equal(fn.edit(x, 0.0), x)


def _data(d=32, layers=(1, 2), prompts=6, seed=0) -> PreferenceActivations:
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(prompts * 2, len(layers), d, generator=g) + 1
    neg = torch.randn(prompts, len(layers), d, generator=g) - 1
    return PreferenceActivations(
        list(layers),
        pos,
        neg,
        [i // 2 for i in range(prompts * 2)],
        list(range(prompts)),
        torch.ones(len(layers)),
    )


def test_neutral_rows_are_prompt_means():
    data = _data()
    n_pos, n_neg = neutral_rows(data)
    expected = torch.stack([data.positive[0], data.positive[1], data.negative[0]]).double().mean(0)
    assert torch.allclose(n_pos[0], expected) and torch.allclose(n_pos[1], expected)
    assert torch.allclose(n_neg[0], expected)


def test_learner_last_layers_round_trip_and_strength_zero(tiny_lm, tmp_path):
    data = _data(d=tiny_lm.hidden_size)
    steering = get_learner("sea", last_layers=1, energy=0.9).fit(data, tiny_lm.fingerprint())
    assert steering.layers == [2]
    k_pos, k_neg = steering.metadata["ranks"]["2"]
    assert steering.functions[2].u_pos.shape == (32, k_pos) and steering.functions[2].u_neg.shape == (
        32,
        k_neg,
    )
    ids, mask = left_pad([encode_prompt(tiny_lm.tokenizer, p) for p in ("the good day", "a cat")], 0)
    with torch.inference_mode():
        base = tiny_lm.model(input_ids=ids, attention_mask=mask).logits
        with steering.applied(tiny_lm.model):
            steered = tiny_lm.model(input_ids=ids, attention_mask=mask).logits
        with steering.applied(tiny_lm.model, strength=0.0):
            zero = tiny_lm.model(input_ids=ids, attention_mask=mask).logits
        loaded = Steering.load(steering.save(tmp_path / "sea"))
        with loaded.applied(tiny_lm.model):
            again = tiny_lm.model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(base, zero)
    assert not torch.allclose(base, steered)
    assert torch.equal(steered, again)
    with pytest.raises(SimsError, match="mode"):
        get_learner("sea", mode="median")
