"""ITI, inference-time intervention (Li et al., NeurIPS 2023).

Works on the attention heads' outputs *before* the output projection (``o_proj``'s
input, reshaped to ``heads x head_dim``) at the last token of each (prompt, response):

1. one logistic probe per (layer, head) on an 80% split, accuracy on the other 20%
   (stratified, so both classes are in both parts);
2. the top K heads by validation accuracy (ties: lower validation loss). The reference
   keeps 48 of 1,024 heads (32 layers x 32 heads); by default K scales with the head
   count, ``K = max(1, round(48 / 1024 x heads in the selected layers))``;
3. per kept head the mass-mean direction ``θ̂ = normalize(mean x+ - mean x-)`` and ``σ``,
   the standard deviation of all activations' projections on it;
4. edit: ``x_head <- x_head + α σ θ̂`` (α = 15; the apply-time strength multiplies α) on
   o_proj's input, which equals adding ``W_o δ`` to its output (the reference's
   bias-baking script stores δ without ``W_o``, a bug not reproduced here). The edit is
   :class:`~simsteer.functions.HeadShift`, whose site is ``"attn_heads"``.

Positions: the reference edits the last position of each forward, so the learner's
default is ``positions="last"``; layers default to ``all`` (every head is a candidate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import SimsError
from ..functions import HeadShift, SteeringFunction
from ..steering import Steering
from .base import Learner, LearnerConfig, PreferenceActivations, register_learner

__all__ = ["ITI", "HeadShift", "ITIConfig", "probe_heads", "stratified_split"]

#: The reference's share of heads kept: 48 of LLaMA-7B's 1,024.
REFERENCE_HEAD_SHARE = 48 / 1024


@dataclass(frozen=True)
class ITIConfig(LearnerConfig):
    """ITI options.

    Attributes:
        alpha: shift in standard deviations (reference 15).
        top_heads: heads kept (0: scaled from the reference, see the module docstring).
        val_fraction: validation share for the probes (reference 0.2).
        probe_steps: full-batch Adam steps per probe fit.
        weight_decay: L2 penalty of the probes (like scikit-learn's default C = 1).
        seed: the split.
    """

    layers: str = "all"
    positions: str = "last"
    alpha: float = 15.0
    top_heads: int = 0
    val_fraction: float = 0.2
    probe_steps: int = 200
    weight_decay: float = 1e-2
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.top_heads < 0 or self.probe_steps < 1:
            raise SimsError("ITI needs top_heads >= 0 (0 = automatic) and probe_steps >= 1")
        if not 0 < self.val_fraction < 1:
            raise SimsError(f"ITI val_fraction must be in (0, 1), got {self.val_fraction}")


def stratified_split(n_pos: int, n_neg: int, fraction: float, seed: int) -> torch.Tensor:
    """Validation mask over ``n_pos`` positives then ``n_neg`` negatives: ``fraction``
    of each class, at least one of each."""
    if n_pos < 2 or n_neg < 2:
        raise SimsError(
            f"ITI needs at least 2 positive and 2 negative responses to train and validate "
            f"its head probes (got {n_pos} and {n_neg})"
        )
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n_pos + n_neg, dtype=torch.bool)
    for offset, n in ((0, n_pos), (n_pos, n_neg)):
        k = min(n - 1, max(1, round(fraction * n)))
        mask[offset + torch.randperm(n, generator=gen)[:k]] = True
    return mask


def probe_heads(
    x: torch.Tensor, y: torch.Tensor, val: torch.Tensor, steps: int = 200, weight_decay: float = 1e-2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit one logistic probe per head, all heads at once.

    Args:
        x: ``[n, heads, head_dim]`` activations (heads of all layers flattened).
        y: ``[n]`` labels (1 = preferred).
        val: ``[n]`` validation mask.

    Returns:
        validation accuracy and validation log-loss per head (``[heads]`` each).
    """
    x = x.float()
    train = ~val
    # Standardised features (train statistics) make one step size fit every head.
    mean = x[train].mean(0)
    std = x[train].std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], x.shape[2], requires_grad=True)
    b = torch.zeros(x.shape[1], requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    yt = y[train].float().unsqueeze(-1).expand(-1, x.shape[1])
    with torch.enable_grad():
        for _ in range(steps):
            logits = torch.einsum("nhd,hd->nh", z[train], w) + b
            # Mean over samples, summed over heads: the probes are independent.
            loss = F.binary_cross_entropy_with_logits(logits, yt, reduction="none").mean(0).sum()
            loss = loss + weight_decay * (w**2).sum() / 2
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        logits = torch.einsum("nhd,hd->nh", z[val], w) + b
        yv = y[val].float().unsqueeze(-1).expand_as(logits)
        acc = ((logits >= 0).float() == yv).float().mean(0)
        val_loss = F.binary_cross_entropy_with_logits(logits, yv, reduction="none").mean(0)
    return acc, val_loss


@register_learner
class ITI(Learner):
    """Inference-time intervention; needs per-head activations (``needs = "heads"``)."""

    name = "iti"
    config_class = ITIConfig
    needs = "heads"

    def fit(self, data: PreferenceActivations, fingerprint: dict[str, Any]) -> Steering:
        cfg: ITIConfig = self.config  # type: ignore[assignment]
        if data.positive_heads is None or data.negative_heads is None or data.num_heads < 1:
            raise SimsError("ITI needs per-head activations (PreferenceActivations.positive_heads)")
        n_pos, n_neg = len(data.positive_heads), len(data.negative_heads)
        val = stratified_split(n_pos, n_neg, cfg.val_fraction, cfg.seed)
        heads = data.num_heads
        acts = torch.cat([data.positive_heads, data.negative_heads]).float()  # [n, L, H*dh]
        n, num_layers, width = acts.shape
        if width % heads:
            raise SimsError(f"attention width {width} is not divisible by {heads} heads")
        x = acts.reshape(n, num_layers * heads, width // heads)
        y = torch.cat([torch.ones(n_pos), torch.zeros(n_neg)])
        acc, val_loss = probe_heads(x, y, val, cfg.probe_steps, cfg.weight_decay)
        total = num_layers * heads
        k = cfg.top_heads or max(1, round(REFERENCE_HEAD_SHARE * total))
        k = min(k, total)
        # Best accuracy first, then lowest validation loss (small splits give many ties).
        order = sorted(range(total), key=lambda h: (-float(acc[h]), float(val_loss[h])))[:k]
        # Mass-mean directions and projection spread, from all activations.
        diff = x[:n_pos].mean(0) - x[n_pos:].mean(0)  # [L*H, dh]
        theta = diff / diff.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        sigma = torch.einsum("nhd,hd->nh", x, theta).std(0)
        directions = torch.zeros_like(theta)
        sigmas = torch.zeros(total)
        directions[order] = theta[order]
        sigmas[order] = sigma[order]
        functions: dict[int, SteeringFunction] = {}
        for i, layer in enumerate(data.layers):
            rows = slice(i * heads, (i + 1) * heads)
            if bool(sigmas[rows].any()):
                functions[layer] = HeadShift(directions[rows], sigmas[rows], cfg.alpha)
        return self.steering(
            functions,
            fingerprint,
            metadata={
                "heads": [[data.layers[h // heads], h % heads] for h in order],
                "val_accuracy": [round(float(acc[h]), 4) for h in order],
            },
        )
