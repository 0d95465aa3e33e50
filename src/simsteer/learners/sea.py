"""SEA, spectral editing of activations (Qiu et al., NeurIPS 2024).

Closed form per layer, in float64: with paired columns ``H`` (neutral), ``H+`` and ``H-``,
``Ω± = H H±ᵀ / N = U± Σ± V±ᵀ``; ``k±`` is the smallest rank whose share of ``Σ σ_i²``
reaches the energy ratio. ``P+ = U+[:, :k+] U+[:, :k+]ᵀ`` keeps what co-varies with the
preferred responses, ``P- = U-[:, k-:] U-[:, k-:]ᵀ`` drops what co-varies with the
dispreferred ones. The edit is ``x' = P+ x + P- x`` rescaled to the token's own norm
(per token: the reference rescales per hidden dimension across the batch, which makes
an output depend on the other sequences in the batch) or the average ``(P+ x + P- x)/2``,
blended with the strength: ``h + s (x' - h)`` (:class:`~simsteer.functions.SpectralProjection`).

Storage: ``U+[:, :k+]`` and the *head* ``U-[:, :k-]`` (``d x k`` each): since ``U-`` is
orthogonal, ``P- = I - U-[:, :k-] U-[:, :k-]ᵀ``, the same projector as the tail's,
without storing ``d x (d - k-)``. At run time ``P = P+ + P-`` is built once per device and
dtype: one ``d x d`` matmul per token per layer.

SIMS decisions (documented choices):

- *Neutral activations*: SIMS has no separate greedy answer per prompt, so a prompt's
  neutral activation is the mean of the summaries of all its D+ and D- responses (the
  policy's average behaviour on that prompt); each positive / negative column is paired
  with its own prompt's neutral column.
- *Energy ratio*: 0.998 as in the reference code (the SIMS appendix says 99.98%: pass
  ``-L energy=0.9998``).
- *Site*: fitted on residual states (decoder layer outputs) and applied there, not after
  the MLP as the reference does. ``last_layers`` keeps the last L selected layers
  (reference: 21 of 32 on Llama-2-7B, i.e. ``-L layers=all -L last_layers=21``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import SimsError
from ..functions import SEA_MODES, SpectralProjection, SteeringFunction
from ..steering import Steering
from .base import Learner, LearnerConfig, PreferenceActivations, register_learner

__all__ = ["SEA", "SEAConfig", "SpectralProjection", "energy_rank", "neutral_rows", "principal_basis"]


def energy_rank(sigma: torch.Tensor, ratio: float) -> int:
    """Smallest k whose cumulative share of ``σ_i²`` reaches ``ratio``."""
    energy = sigma.double() ** 2
    total = float(energy.sum())
    if total <= 0:
        raise SimsError("SEA: the cross-covariance is zero (no signal to keep or remove)")
    share = torch.cumsum(energy, 0) / total
    # A tiny slack so a share of exactly `ratio` is not lost to rounding.
    return int(torch.searchsorted(share, torch.tensor(ratio - 1e-12, dtype=share.dtype))) + 1


def principal_basis(neutral: torch.Tensor, other: torch.Tensor, energy: float) -> torch.Tensor:
    """``U[:, :k]`` of ``Ω = H Oᵀ / N = U Σ Vᵀ`` in float64, ``k`` from the energy ratio.

    Args:
        neutral: ``[N, d]`` rows, the columns of ``H``.
        other: ``[N, d]`` rows paired with them (``H+`` or ``H-``).
        energy: energy ratio in (0, 1].

    Returns:
        ``[d, k]``: for ``H+`` the directions ``P+`` keeps, for ``H-`` the ones ``P-``
        removes.

    Example:
        >>> u_pos = principal_basis(neutral, positive, 0.998)
        >>> p_pos = u_pos @ u_pos.T
    """
    if neutral.shape != other.shape or neutral.dim() != 2:
        raise ValueError("neutral and paired activations need the same [N, d] shape")
    omega = neutral.double().T @ other.double() / neutral.shape[0]
    u, sigma, _ = torch.linalg.svd(omega)
    return u[:, : energy_rank(sigma, energy)].contiguous()


@dataclass(frozen=True)
class SEAConfig(LearnerConfig):
    """SEA options.

    Attributes:
        energy: energy ratio for ``k±`` (reference code 0.998; SIMS appendix 0.9998).
        mode: ``rescale`` (per-token norm kept) or ``average`` (``(P+ x + P- x)/2``).
        last_layers: steer only the last L of the selected layers (0: all of them).
    """

    energy: float = 0.998
    mode: str = "rescale"
    last_layers: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.energy <= 1:
            raise SimsError(f"SEA energy ratio must be in (0, 1], got {self.energy}")
        if self.mode not in SEA_MODES:
            raise SimsError(f"unknown SEA mode {self.mode!r}: use one of {', '.join(SEA_MODES)}")
        if self.last_layers < 0:
            raise SimsError(f"last_layers must be >= 0, got {self.last_layers}")


def neutral_rows(data: PreferenceActivations) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's neutral activation: the mean of its prompt's D+ and D- summaries.

    Returns:
        ``[n_pos, L, d]`` and ``[n_neg, L, d]`` neutral rows paired with the positives
        and the negatives.
    """
    rows = torch.cat([data.positive, data.negative]).double()
    groups = torch.tensor(data.positive_groups + data.negative_groups)
    means = {int(g): rows[groups == g].mean(0) for g in groups.unique()}
    pos = torch.stack([means[g] for g in data.positive_groups])
    neg = torch.stack([means[g] for g in data.negative_groups])
    return pos, neg


@register_learner
class SEA(Learner):
    """Spectral editing; closed form from the summaries (``needs = "mean"``)."""

    name = "sea"
    config_class = SEAConfig

    def fit(self, data: PreferenceActivations, fingerprint: dict[str, Any]) -> Steering:
        cfg: SEAConfig = self.config  # type: ignore[assignment]
        if len(data.positive) < 1 or len(data.negative) < 1:
            raise SimsError("SEA needs at least one positive and one negative response")
        neutral_pos, neutral_neg = neutral_rows(data)
        layers = data.layers[-cfg.last_layers :] if cfg.last_layers else data.layers
        functions: dict[int, SteeringFunction] = {}
        ranks: dict[str, list[int]] = {}
        for layer in layers:
            i = data.layers.index(layer)
            pos, neg = data.at(layer)
            # Positives and negatives each pair with their own prompts' neutral rows.
            u_pos = principal_basis(neutral_pos[:, i], pos, cfg.energy)
            u_neg = principal_basis(neutral_neg[:, i], neg, cfg.energy)
            functions[layer] = SpectralProjection(u_pos, u_neg, cfg.mode)
            ranks[str(layer)] = [u_pos.shape[1], u_neg.shape[1]]
        return self.steering(
            functions,
            fingerprint,
            metadata={"ranks": ranks},
        )
