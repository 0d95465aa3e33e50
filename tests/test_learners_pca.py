"""PCA learner: a planted direction, sign alignment, degenerate data, strength 0, save/load."""

from __future__ import annotations

import pytest
import torch

from simsteer.errors import SimsError
from simsteer.functions import AddVector
from simsteer.learners import PreferenceActivations, get_learner
from simsteer.learners.pca import first_component, paired_differences
from simsteer.steering import Steering
from simsteer.tokens import encode_prompt, left_pad

D = 16


def _planted(n=120, d=D, seed=0, flip=False):
    """Two positives and one negative per prompt; the per-prompt difference is
    ``a_i * direction`` (a_i varies, so the centred differences vary along it) plus small
    noise in every direction; each prompt carries large content shared by its rows, on
    top of a large offset shared by all."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.zeros(d)
    direction[3] = 1.0
    content = 100.0 + 20 * torch.randn(n, d, generator=g)  # cancelled by pairing
    a = 1.0 + 0.5 * torch.randn(n, generator=g)
    diff = a[:, None] * direction + 0.05 * torch.randn(n, d, generator=g)
    diff[:, 7] += 0.1 * torch.randn(n, generator=g)  # a weaker, unrelated spread
    pos1 = content + diff + 0.02 * torch.randn(n, d, generator=g)
    pos2 = 2 * (content + diff) - pos1  # the two positives average to content + diff
    pos = torch.cat([pos1, pos2])
    neg = content
    if flip:
        pos, neg = neg, torch.cat([pos1, pos2])
        pos_groups, neg_groups = list(range(n)), [*range(n), *range(n)]
    else:
        pos_groups, neg_groups = [*range(n), *range(n)], list(range(n))
    data = PreferenceActivations(
        [5], pos[:, None], neg[:, None], pos_groups, neg_groups, torch.tensor([10.0])
    )
    return data, direction


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def test_recovers_planted_direction_scaled_like_caa():
    data, direction = _planted()
    steering = get_learner("pca", layers="5", coefficient=0.5).fit(data, {"architecture": "x"})
    v = steering.functions[5].vector
    assert isinstance(steering.functions[5], AddVector) and v.dtype == torch.float32
    assert _cos(v, direction) > 0.99
    assert torch.isclose(v.norm(), torch.tensor(0.5 * 10.0))  # coefficient x token norm
    assert steering.metadata["mean_fallback"] == []
    assert get_learner("pca").config.coefficient == get_learner("caa").config.coefficient


def test_matches_the_top_eigenvector_of_the_covariance():
    data, _ = _planted(seed=3)
    pos, neg = data.at(5)
    diffs = paired_differences(pos.double(), neg.double(), data.positive_groups, data.negative_groups)
    centred = diffs - diffs.mean(0)
    _, vecs = torch.linalg.eigh(centred.T @ centred)
    u, used_mean = first_component(diffs)
    assert not used_mean and abs(_cos(u, vecs[:, -1])) > 0.9999


def test_sign_follows_the_mean_difference():
    data, direction = _planted()
    flipped, _ = _planted(flip=True)
    v = get_learner("pca", layers="5").fit(data, {}).functions[5].vector
    w = get_learner("pca", layers="5").fit(flipped, {}).functions[5].vector
    assert _cos(v, direction) > 0.99 and _cos(w, direction) < -0.99
    assert torch.allclose(v, -w, atol=1e-5)


def test_uncentred_recovers_a_constant_shift():
    g = torch.Generator().manual_seed(2)
    n = 50
    content = 100.0 + 20 * torch.randn(n, D, generator=g)
    direction = torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0)
    pos = content + 0.8 * direction + 0.01 * torch.randn(n, D, generator=g)
    groups = list(range(n))
    data = PreferenceActivations([5], pos[:, None], content[:, None], groups, groups, torch.tensor([1.0]))
    v = get_learner("pca", layers="5", center=False).fit(data, {}).functions[5].vector
    assert _cos(v, direction) > 0.99
    raw = get_learner("pca", layers="5", center=False, normalize=False, coefficient=2.0).fit(data, {})
    assert torch.allclose(raw.functions[5].vector, 2.0 * 0.8 * direction, atol=0.02)


def test_one_pair_gives_the_difference_direction():
    pos = torch.tensor([[[3.0, 1.0, 0.0, 2.0]]])
    neg = torch.tensor([[[1.0, 1.0, 1.0, 0.0]]])
    diff = (pos - neg)[0, 0]
    data = PreferenceActivations([2], pos, neg, [0], [0], torch.tensor([4.0]))
    for center in (True, False):
        s = get_learner("pca", layers="2", coefficient=0.25, center=center).fit(data, {})
        assert torch.allclose(s.functions[2].vector, diff / diff.norm() * 0.25 * 4.0, atol=1e-6)
        assert s.metadata["mean_fallback"] == ([2] if center else [])


def test_unpaired_falls_back_like_caa():
    pos = torch.tensor([[[2.0, 0.0]], [[4.0, 0.0]]])
    neg = torch.tensor([[[0.0, 1.0]]])
    data = PreferenceActivations([0], pos, neg, [0, 1], [2], torch.tensor([1.0]))  # no shared prompt
    diffs = paired_differences(*data.at(0), data.positive_groups, data.negative_groups)
    assert torch.equal(diffs, torch.tensor([[3.0, -1.0]]))
    v = get_learner("pca", layers="0", coefficient=1.0).fit(data, {}).functions[0].vector
    assert torch.allclose(v, torch.tensor([3.0, -1.0]) / 10**0.5)


def test_degenerate_differences():
    n = 5
    content = torch.randn(n, 1, 3, generator=torch.Generator().manual_seed(0))
    shift = torch.tensor([0.0, 2.0, 0.0])
    groups = list(range(n))
    same = PreferenceActivations([1], content + shift, content, groups, groups, torch.tensor([1.0]))
    s = get_learner("pca", layers="1", coefficient=1.0).fit(same, {})  # identical: no spread
    assert torch.allclose(s.functions[1].vector, torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)
    assert s.metadata["mean_fallback"] == [1]
    zero = PreferenceActivations([1], content.clone(), content, groups, groups, torch.tensor([1.0]))
    for center in (True, False):
        with pytest.raises(SimsError, match=r"layer 1: .*zero"):
            get_learner("pca", layers="1", center=center).fit(zero, {})
    empty = PreferenceActivations([1], content[:0], content, [], groups, torch.tensor([1.0]))
    with pytest.raises(SimsError, match="at least one positive"):
        get_learner("pca", layers="1").fit(empty, {})


def test_strength_zero_and_save_load_round_trip(tiny_lm, tmp_path):
    g = torch.Generator().manual_seed(0)
    d = tiny_lm.hidden_size
    pos = torch.randn(8, 2, d, generator=g) + 1
    neg = torch.randn(4, 2, d, generator=g) - 1
    data = PreferenceActivations([1, 2], pos, neg, [i // 2 for i in range(8)], list(range(4)), torch.ones(2))
    steering = get_learner("pca", coefficient=0.5).fit(data, tiny_lm.fingerprint())
    ids, mask = left_pad([encode_prompt(tiny_lm.tokenizer, p) for p in ("the good day", "a cat")], 0)
    with torch.inference_mode():
        base = tiny_lm.model(input_ids=ids, attention_mask=mask).logits
        with steering.applied(tiny_lm.model):
            steered = tiny_lm.model(input_ids=ids, attention_mask=mask).logits
        with steering.applied(tiny_lm.model, strength=0.0):
            zero = tiny_lm.model(input_ids=ids, attention_mask=mask).logits
        loaded = Steering.load(steering.save(tmp_path / "pca"))
        with loaded.applied(tiny_lm.model):
            again = tiny_lm.model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(base, zero)
    assert not torch.allclose(base, steered)
    assert torch.equal(steered, again)
    assert loaded.learner == "pca" and loaded.layers == [1, 2]
    for layer in (1, 2):
        assert isinstance(loaded.functions[layer], AddVector)
        assert torch.equal(loaded.functions[layer].vector, steering.functions[layer].vector)
    assert loaded.hyperparameters["center"] is True
