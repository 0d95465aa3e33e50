"""CAA, contrastive activation addition (Rimsky/Panickssery et al., ACL 2024).

Per layer, ``v = mean over prompts of (mean h+ - mean h-)`` (paired by prompt, so what
the prompt itself contributes cancels), added to the hidden states with a coefficient
(:class:`~simsteer.functions.AddVector`). With ``normalize`` (default) ``v`` is a unit
vector scaled to ``coefficient`` times the layer's mean token norm, so one coefficient
means the same across layers and models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import SimsError
from ..functions import AddVector, SteeringFunction
from ..steering import Steering
from .base import Learner, LearnerConfig, PreferenceActivations, register_learner

__all__ = ["CAA", "AddVector", "CAAConfig", "mean_difference"]


@dataclass(frozen=True)
class CAAConfig(LearnerConfig):
    """CAA options.

    Attributes:
        coefficient: added amount; with ``normalize`` a fraction of the layer's mean
            token norm (0.04 = 4%), else a multiplier on the raw mean difference.
        normalize: scale unit directions by the layer norm (see module docstring).
        paired: difference within each prompt first (falls back to unpaired means when
            no prompt has both a positive and a negative response).
    """

    coefficient: float = 0.04
    normalize: bool = True
    paired: bool = True


def paired_differences(
    pos: torch.Tensor,
    neg: torch.Tensor,
    pos_groups: list[int],
    neg_groups: list[int],
    paired: bool = True,
    learner: str = "CAA",
) -> torch.Tensor:
    """``[n, d]``: per shared prompt ``mean h+ - mean h-``, or one row
    ``mean(pos) - mean(neg)`` when unpaired (no shared prompt, or ``paired=False``).

    Args:
        learner: named in the error when either side is empty.
    """
    if len(pos) == 0 or len(neg) == 0:
        raise SimsError(f"{learner} needs at least one positive and one negative response")
    if paired:
        shared = sorted(set(pos_groups) & set(neg_groups))
        if shared:
            pg, ng = torch.tensor(pos_groups), torch.tensor(neg_groups)
            return torch.stack([pos[pg == g].mean(0) - neg[ng == g].mean(0) for g in shared])
    return (pos.mean(0) - neg.mean(0)).unsqueeze(0)


def mean_difference(
    pos: torch.Tensor,
    neg: torch.Tensor,
    pos_groups: list[int],
    neg_groups: list[int],
    paired: bool = True,
) -> torch.Tensor:
    """Mean of per-prompt (mean h+ - mean h-) differences, or the unpaired difference."""
    return paired_differences(pos, neg, pos_groups, neg_groups, paired).mean(0)


@register_learner
class CAA(Learner):
    name = "caa"
    config_class = CAAConfig

    def fit(self, data: PreferenceActivations, fingerprint: dict[str, Any]) -> Steering:
        cfg: CAAConfig = self.config  # type: ignore[assignment]
        functions: dict[int, SteeringFunction] = {}
        for i, layer in enumerate(data.layers):
            pos, neg = data.at(layer)
            v = mean_difference(
                pos.double(), neg.double(), data.positive_groups, data.negative_groups, cfg.paired
            )
            if cfg.normalize:
                norm = v.norm()
                v = v / norm * float(data.token_norms[i]) if norm > 0 else v
            functions[layer] = AddVector((cfg.coefficient * v).float())
        return self.steering(
            functions,
            fingerprint,
        )
