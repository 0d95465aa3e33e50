"""PCA of paired differences (the representation-reading direction of Zou et al., 2023,
as in repeng's ``pca_diff``).

Per layer: one difference per prompt, ``mean h+ - mean h-`` over that prompt's D+ and D-
responses (paired as in :mod:`~simsteer.learners.caa`, so what the prompt contributes
cancels; unpaired means only when no prompt has both, as CAA does). The direction is the
first principal component of these differences (centred by default, as repeng does),
its sign chosen so that it points along the mean difference, unit-normalised and scaled
to ``coefficient`` times the layer's mean token norm, then added like CAA
(:class:`~simsteer.functions.AddVector`, so it saves, exports and loads like CAA).

Degenerate data is handled explicitly: when the (centred) differences have no spread
(one pair, or all differences identical) the first component is undefined and the
direction is the mean difference itself (listed in ``metadata["mean_fallback"]``); when
the differences are all zero there is no direction and fitting stops with a
:class:`~simsteer.errors.SimsError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import SimsError
from ..functions import AddVector, SteeringFunction
from ..steering import Steering
from .base import Learner, LearnerConfig, PreferenceActivations, register_learner
from .caa import paired_differences

__all__ = ["PCA", "PCAConfig", "first_component", "paired_differences"]

#: Relative size under which a top singular value counts as no spread at all.
_SPREAD_TOL = 1e-5


@dataclass(frozen=True)
class PCAConfig(LearnerConfig):
    """PCA options.

    Attributes:
        coefficient: added amount; with ``normalize`` a fraction of the layer's mean
            token norm (the same scale as CAA's), else a multiplier on the mean
            difference's length along the component.
        normalize: scale the unit direction by the layer norm (see module docstring).
        paired: difference within each prompt first (falls back to unpaired means when
            no prompt has both a positive and a negative response).
        center: subtract the mean difference before the PCA (repeng does); the
            component then follows how the differences vary, not their mean.
    """

    coefficient: float = 0.04
    normalize: bool = True
    paired: bool = True
    center: bool = True


def first_component(diffs: torch.Tensor, center: bool = True) -> tuple[torch.Tensor, bool]:
    """The unit first principal component of ``diffs`` (``[n, d]``), sign-aligned to
    their mean, and whether the mean difference stood in for it (no spread).

    Raises:
        SimsError: when every difference is zero (no direction at all).
    """
    diffs = diffs.double()
    mean = diffs.mean(0)
    x = diffs - mean if center else diffs
    scale = float(diffs.abs().max()) * (len(diffs) ** 0.5)
    if scale == 0:
        raise SimsError("PCA: every D+/D- difference is zero, there is no direction to steer along")
    # torch.linalg.svd on CPU in float32: exact and deterministic, and cheap at these
    # sizes (n prompts x d, n in the hundreds: O(n^2 d)); a power iteration would only
    # pay off for a very large n x d and needs a tolerance and a start vector.
    _, s, vh = torch.linalg.svd(x.float().cpu(), full_matrices=False)
    if float(s[0]) <= _SPREAD_TOL * scale:
        # No spread (one pair, identical differences): the component is undefined; the
        # mean difference is the limit of the component as the spread vanishes.
        norm = mean.norm()
        if norm == 0:
            raise SimsError("PCA: the D+/D- differences have no spread and a zero mean")
        return (mean / norm).float(), True
    v = vh[0].double()
    dot = float(v @ mean)
    if dot == 0:  # orthogonal to the mean: make the largest entry positive (deterministic)
        dot = float(v[v.abs().argmax()])
    v = v if dot > 0 else -v
    return (v / v.norm()).float(), False


@register_learner
class PCA(Learner):
    name = "pca"
    config_class = PCAConfig

    def fit(self, data: PreferenceActivations, fingerprint: dict[str, Any]) -> Steering:
        cfg: PCAConfig = self.config  # type: ignore[assignment]
        functions: dict[int, SteeringFunction] = {}
        fallback: list[int] = []
        for i, layer in enumerate(data.layers):
            pos, neg = data.at(layer)
            diffs = paired_differences(
                pos.double(), neg.double(), data.positive_groups, data.negative_groups, cfg.paired, "PCA"
            )
            try:
                u, used_mean = first_component(diffs, cfg.center)
            except SimsError as err:
                raise SimsError(f"layer {layer}: {err}") from None
            if used_mean:
                fallback.append(layer)
            if cfg.normalize:
                v = u.double() * float(data.token_norms[i])
            else:
                v = u.double() * float(u.double() @ diffs.mean(0))
            functions[layer] = AddVector((cfg.coefficient * v).float())
        return self.steering(
            functions,
            fingerprint,
            metadata={"mean_fallback": fallback},
        )
