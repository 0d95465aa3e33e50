from __future__ import annotations

import torch

from simsteer.learners import PreferenceActivations, get_learner
from simsteer.learners.caa import mean_difference


def _planted(n=200, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    direction = torch.zeros(d)
    direction[3] = 1.0
    prompts = torch.randn(n, 1, d, generator=g) * 3  # shared per-prompt content
    pos = prompts + 0.8 * direction + 0.1 * torch.randn(n, 1, d, generator=g)
    neg = prompts + 0.1 * torch.randn(n, 1, d, generator=g)
    groups = list(range(n))
    return PreferenceActivations([5], pos, neg, groups, groups, torch.tensor([10.0])), direction


def test_caa_recovers_planted_direction():
    data, direction = _planted()
    steering = get_learner("caa", layers="5", coefficient=0.5).fit(data, {"architecture": "x"})
    v = steering.functions[5].vector
    cosine = torch.nn.functional.cosine_similarity(v, direction, dim=0)
    assert cosine > 0.99
    assert torch.isclose(v.norm(), torch.tensor(0.5 * 10.0))  # coefficient x token norm


def test_pairing_cancels_prompt_content():
    g = torch.Generator().manual_seed(1)
    # Positives come mostly from prompts with a large offset: unpaired means are biased.
    offsets = torch.randn(6, 4, generator=g) * 5
    pos = torch.stack([offsets[0] + 1, offsets[0] + 1, offsets[1] + 1])
    neg = torch.stack([offsets[0], offsets[1], offsets[2], offsets[3]])
    paired = mean_difference(pos, neg, [0, 0, 1], [0, 1, 2, 3], paired=True)
    assert torch.allclose(paired, torch.ones(4))
    unpaired = mean_difference(pos, neg, [0, 0, 1], [0, 1, 2, 3], paired=False)
    assert not torch.allclose(unpaired, torch.ones(4))


def test_raw_coefficient_without_normalisation():
    data, direction = _planted()
    s = get_learner("caa", layers="5", coefficient=2.0, normalize=False).fit(data, {})
    assert torch.allclose(s.functions[5].vector, 2.0 * 0.8 * direction, atol=0.05)
