"""HPR, Householder pseudo-rotation (Pham & Nguyen, EMNLP 2024) — the SIMS paper's default.

Per layer a bias-free linear probe ``v`` (a hyperplane through the origin) tells the
preferred side from the dispreferred one, and an angle regressor ``g`` (MLP d -> d/2 ->
d/4 -> d/8 -> 1 with GELU) predicts ``θ(h) = π sigmoid(g(h))``. An activation on the
negative side (``sigmoid(v·h) < 1/2``) is rotated toward its Householder reflection
``Hh = h - 2 v (v·h)/(v·v)`` by ``γ1 = α θ(h)`` along the great circle through ``h``
and ``Hh``; its norm is kept exactly. Positive-side activations are left alone. The
edit is :class:`~simsteer.functions.HouseholderRotation`.

Training (as in the HPR paper): token-aligned pairs ``(h+_j, h-_j)`` from the Cartesian product
of each prompt's D+ and D- responses, BCE on the probe + MSE on the angle, Adam (lr
5e-4, 5 epochs, batch 16), the checkpoint with the best held-out probe accuracy kept per
layer, and the top-k layers by that accuracy enabled. All layers train together as one
batched model (their parameters never interact, so this equals separate training) so a
30-layer fit takes seconds on CPU.

Positions: the reference edits the last position of each forward during generation, so
the learner's default is ``positions="last"`` (the CLI's ``--positions`` overrides it).
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SimsError
from ..functions import HPR_MLP_NAMES, HouseholderRotation, SteeringFunction, householder_slerp
from ..steering import Steering
from .base import Learner, LearnerConfig, PreferenceActivations, register_learner

__all__ = [
    "HPR",
    "HPRConfig",
    "HouseholderRotation",
    "householder_slerp",
    "mlp_widths",
    "token_pairs",
    "train_hpr",
]


def mlp_widths(d: int) -> list[int]:
    """Widths of the angle MLP: d -> d/2 -> d/4 -> d/8 -> 1."""
    return [d, max(1, d // 2), max(1, d // 4), max(1, d // 8), 1]


@dataclass(frozen=True)
class HPRConfig(LearnerConfig):
    """HPR options.

    Attributes:
        alpha: angle scale α (``γ1 = α θ(h)``; the reference uses 1, > 1 can overshoot).
        top_k: layers enabled, the best by held-out probe accuracy (reference 5).
        epochs / batch_size / lr: Adam training (reference 5, 16 pairs, 5e-4).
        max_pairs: cap on token pairs (a random subset), so a fit takes seconds.
        max_response_tokens: response tokens per sample whose activations are kept.
        held_out: share of the data held out for checkpoint and layer selection
            (split by prompt when there are at least 5 prompts, else by pair).
        seed: pair sampling, split and initialisation.
    """

    layers: str = "all"
    positions: str = "last"
    alpha: float = 1.0
    top_k: int = 5
    epochs: int = 5
    batch_size: int = 16
    lr: float = 5e-4
    max_pairs: int = 512
    max_response_tokens: int = 32
    held_out: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.top_k < 1 or self.epochs < 1 or self.batch_size < 1 or self.max_pairs < 2:
            raise SimsError("HPR needs top_k >= 1, epochs >= 1, batch_size >= 1 and max_pairs >= 2")
        if not 0 < self.held_out < 1:
            raise SimsError(f"HPR held_out must be in (0, 1), got {self.held_out}")


def token_pairs(
    data: PreferenceActivations, max_pairs: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Token-aligned ``(h+_j, h-_j)`` pairs from each prompt's D+ x D- product.

    Pairs whose vectors agree in >= 75% of their elements (a shared prefix: both
    responses start with the same tokens) are skipped; "agree" allows float noise from
    batching (``rtol 1e-4``). At most ``max_pairs`` pairs are drawn at random.

    Returns:
        ``[P, L, d]`` positive and negative activations and each pair's prompt group.
    """
    if data.positive_tokens is None or data.negative_tokens is None:
        raise SimsError("HPR needs per-token activations (PreferenceActivations.positive_tokens)")
    found: list[tuple[int, int, int, int]] = []  # (pos row, neg row, token count, group)
    for i, gi in enumerate(data.positive_groups):
        for j, gj in enumerate(data.negative_groups):
            if gi == gj:
                found.append((i, j, min(len(data.positive_tokens[i]), len(data.negative_tokens[j])), gi))
    keep: list[tuple[int, int, int, int]] = []
    for i, j, n, g in found:
        if n == 0:
            continue
        a, b = data.positive_tokens[i][:n], data.negative_tokens[j][:n]
        same = torch.isclose(a, b, rtol=1e-4, atol=1e-6).float().mean(dim=(1, 2))
        keep.extend((i, j, t, g) for t in torch.nonzero(same < 0.75).flatten().tolist())
    if len(keep) < 2:
        raise SimsError(
            f"HPR found {len(keep)} usable token pairs (it needs prompts with both a D+ and a "
            "D- response that differ): sample more prompts or responses"
        )
    random.Random(seed).shuffle(keep)
    keep = keep[:max_pairs]
    pos = torch.stack([data.positive_tokens[i][t] for i, _, t, _ in keep]).float()
    neg = torch.stack([data.negative_tokens[j][t] for _, j, t, _ in keep]).float()
    return pos, neg, [g for *_, g in keep]


class _AngleBank(nn.Module):
    """Angle MLPs of several layers stacked, trained in one batched pass."""

    def __init__(self, num_layers: int, d: int, generator: torch.Generator) -> None:
        super().__init__()
        widths = mlp_widths(d)
        pairs = list(itertools.pairwise(widths))
        # nn.Linear's default initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        self.weights = nn.ParameterList([_uniform((num_layers, a, b), a, generator) for a, b in pairs])
        self.biases = nn.ParameterList([_uniform((num_layers, 1, b), a, generator) for a, b in pairs])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [L, B, d]`` -> angles ``θ = π sigmoid(g(x))``, ``[L, B]``."""
        for k, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            x = torch.baddbmm(b, x, w)
            if k < len(self.weights) - 1:
                x = F.gelu(x)
        return math.pi * torch.sigmoid(x.squeeze(-1))


def _uniform(shape: tuple[int, ...], fan_in: int, generator: torch.Generator) -> nn.Parameter:
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter((torch.rand(*shape, generator=generator) * 2 - 1) * bound)


def _split(groups: list[int], share: float, seed: int) -> torch.Tensor:
    """Boolean held-out mask over pairs: whole prompts when there are enough of them
    (token pairs of one prompt are near-duplicates, which would inflate accuracy)."""
    rng = random.Random(seed + 1)
    distinct = sorted(set(groups))
    if len(distinct) >= 5:
        rng.shuffle(distinct)
        held = set(distinct[: max(1, round(share * len(distinct)))])
        return torch.tensor([g in held for g in groups])
    order = list(range(len(groups)))
    rng.shuffle(order)
    mask = torch.zeros(len(groups), dtype=torch.bool)
    mask[order[: max(1, round(share * len(groups)))]] = True
    return mask


def train_hpr(
    pos: torch.Tensor, neg: torch.Tensor, groups: list[int], cfg: HPRConfig
) -> tuple[dict[int, dict[str, torch.Tensor]], torch.Tensor]:
    """Train HPR on ``[P, L, d]`` pairs and keep the top-k layers.

    The loss ``BCE(v) + MSE(g)`` shares no parameter between the probe and the angle
    MLP, and Adam updates each parameter on its own, so training the probes of all
    layers first, then the MLPs of the top-k layers only, on the same batches, gives
    exactly the joint training's checkpoints at a fraction of the cost (the MLP is 0.66 d²
    parameters per layer, the probe d).

    Returns:
        for each of the top-k layer positions (index into L), its checkpoint at the
        epoch of best held-out probe accuracy (``v`` and the MLP in ``nn.Linear``
        layout, the input scaling folded in); and ``[L]`` held-out probe accuracies.
    """
    held = _split(groups, cfg.held_out, cfg.seed)
    if held.all() or not held.any():
        raise SimsError("HPR needs pairs for both training and held-out selection")
    num_layers, d = pos.shape[1], pos.shape[2]
    # Inputs scaled to about unit norm per layer for well-conditioned Adam steps; the scale
    # is folded into v and the first MLP layer afterwards (the same function of raw h).
    scale = 1.0 / torch.cat([pos, neg]).norm(dim=-1).mean(0).clamp_min(1e-6)  # [L]
    x_pos = (pos * scale.view(1, -1, 1)).transpose(0, 1).contiguous()  # [L, P, d]
    x_neg = (neg * scale.view(1, -1, 1)).transpose(0, 1).contiguous()
    gen = torch.Generator().manual_seed(cfg.seed)
    train_idx = torch.nonzero(~held).flatten()
    epochs = []
    for _ in range(cfg.epochs):
        perm = train_idx[torch.randperm(len(train_idx), generator=gen)]
        epochs.append(list(perm.split(cfg.batch_size)))

    def batch(xp: torch.Tensor, xn: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hp, hn = xp[:, b], xn[:, b]
        return torch.cat([hp, hn], dim=1), torch.cat([hp, hp], dim=1)  # X = [H+; H-], P = [H+; H+]

    # Stage 1: probes of every layer, BCE; the best epoch per layer on held-out pairs.
    v = _uniform((num_layers, d), d, gen)
    opt = torch.optim.Adam([v], lr=cfg.lr)
    val = torch.nonzero(held).flatten()
    val_x = torch.cat([x_pos[:, val], x_neg[:, val]], dim=1)
    val_y = torch.cat([torch.ones(len(val)), torch.zeros(len(val))])
    best_acc = torch.full((num_layers,), -1.0)
    best_epoch = torch.zeros(num_layers, dtype=torch.long)
    best_v = v.detach().clone()
    with torch.enable_grad():
        for e, batches in enumerate(epochs):
            for b in batches:
                x, _ = batch(x_pos, x_neg, b)
                y = torch.cat([torch.ones(len(b)), torch.zeros(len(b))]).expand(num_layers, -1)
                logits = torch.einsum("lbd,ld->lb", x, v)
                # Mean over the batch per layer, summed over layers (independent parameters).
                loss = F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(1).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                acc = ((torch.einsum("lbd,ld->lb", val_x, v) >= 0).float() == val_y).float().mean(1)
                better = acc > best_acc
                best_acc = torch.where(better, acc, best_acc)
                best_epoch[better] = e
                best_v[better] = v[better]
    # Highest held-out accuracy first; a stable sort gives ties to the earlier layer.
    top = sorted(range(num_layers), key=lambda i: -float(best_acc[i]))[: min(cfg.top_k, num_layers)]

    # Stage 2: angle MLPs of the top-k layers, MSE to t = arccos(cos(x, p)), same batches;
    # each layer keeps its MLP from its best probe epoch (as a joint checkpoint would).
    rows = torch.tensor(top)
    top_pos, top_neg = x_pos[rows], x_neg[rows]
    bank = _AngleBank(len(top), d, gen)
    opt = torch.optim.Adam(bank.parameters(), lr=cfg.lr)
    saved: dict[int, dict[str, torch.Tensor]] = {}
    with torch.enable_grad():
        for e, batches in enumerate(epochs[: int(best_epoch[rows].max()) + 1]):
            for b in batches:
                x, partner = batch(top_pos, top_neg, b)
                target = torch.arccos(F.cosine_similarity(x, partner, dim=-1).clamp(-1.0, 1.0))
                loss = F.mse_loss(bank(x), target, reduction="none").mean(1).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
            for j, layer in enumerate(top):
                if int(best_epoch[layer]) == e:
                    saved[layer] = _checkpoint(bank, j, best_v[layer], float(scale[layer]))
    return saved, best_acc


def _checkpoint(bank: _AngleBank, j: int, v: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
    """Layer ``j`` of the bank in ``nn.Linear`` layout, the input scale folded in."""
    out = {"v": v * scale}
    for k, (w, b) in enumerate(zip(bank.weights, bank.biases, strict=True)):
        weight = w[j].detach().T.contiguous()  # [out, in]
        out[f"w{k + 1}"] = weight * scale if k == 0 else weight.clone()
        out[f"b{k + 1}"] = b[j, 0].detach().clone()
    return out


@register_learner
class HPR(Learner):
    """Householder pseudo-rotation; needs per-token activations (``needs = "tokens"``)."""

    name = "hpr"
    config_class = HPRConfig
    needs = "tokens"

    def fit(self, data: PreferenceActivations, fingerprint: dict[str, Any]) -> Steering:
        cfg: HPRConfig = self.config  # type: ignore[assignment]
        pos, neg, groups = token_pairs(data, cfg.max_pairs, cfg.seed)
        checkpoints, accuracy = train_hpr(pos, neg, groups, cfg)
        functions: dict[int, SteeringFunction] = {
            data.layers[i]: HouseholderRotation(ckpt["v"], {n: ckpt[n] for n in HPR_MLP_NAMES}, cfg.alpha)
            for i, ckpt in checkpoints.items()
        }
        return self.steering(
            functions,
            fingerprint,
            metadata={
                "pairs": len(groups),
                "held_out_accuracy": {
                    str(layer): round(float(a), 4) for layer, a in zip(data.layers, accuracy, strict=True)
                },
            },
        )
