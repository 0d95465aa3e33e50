"""Conditional CAA: a CAA vector added only where the input looks like the training prompts
(after conditional activation steering, Lee et al., "Programming Refusal with Conditional
Activation Steering", 2024).

A steering vector is the same for every prompt, so a vector that makes the model refuse
harmful requests makes it refuse benign ones too (the README's refusal use case measures
it). ``cast`` learns, per layer:

- the behaviour: CAA's vector ``v`` from the D+ / D- summaries (:mod:`.caa`, same options);
- a condition: the unit direction ``c = mean(h_train) - mean(h_contrast)`` between the
  activations at the last prompt token (the position that writes the answer's first
  token) of the loop's training prompts and of the run's *contrast prompts*
  (``--contrast-prompts``: prompts the behaviour must leave alone, e.g. benign requests);
- a threshold ``theta``: the ``quantile`` of the contrast prompts' projections on ``c``
  (0.9: the gate is open for at most a tenth of them).

The function is :class:`~simsteer.functions.GatedAdd`: ``h + s v`` where ``h . c > theta``,
else ``h``, read per token from the state the edit receives. With the default positions
``last`` it acts at the last prompt token, then at each new token, which is where ``theta``
was measured. The loop's guard still scans the strength on its calibration and contrast
prompts. The prompts are the model's own activations: no labels beyond which prompt file a
prompt came from.

Fit cost: one forward pass per training and contrast prompt (the prompt only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from ..errors import SimsError
from ..functions import GatedAdd, SteeringFunction
from ..models import LoadedModel
from ..steering import Steering
from ..tokens import encode_prompt
from .base import Learner, PreferenceActivations, register_learner
from .caa import CAA, CAAConfig


@dataclass(frozen=True)
class CASTConfig(CAAConfig):
    """Conditional CAA options (CAA's, plus the gate).

    Attributes:
        quantile: the threshold is this quantile of the contrast prompts' projections on
            the condition direction (the gate opens for about ``1 - quantile`` of them).
    """

    positions: str = "last"
    quantile: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.quantile < 1:
            raise SimsError(f"cast's quantile must be in (0, 1), got {self.quantile}")


@torch.no_grad()
def last_prompt_states(lm: LoadedModel, prompts: Sequence[str], layers: Sequence[int]) -> torch.Tensor:
    """``[n, len(layers), d]`` float64: each prompt's activation at its last token (in the
    model's prompt format), unsteered, one prompt at a time (no padding)."""
    rows = []
    for prompt in prompts:
        ids = torch.tensor([encode_prompt(lm.tokenizer, prompt)], device=lm.device)
        hidden = lm.model(ids, output_hidden_states=True).hidden_states
        rows.append(torch.stack([hidden[layer + 1][0, -1].double().cpu() for layer in layers]))
    return torch.stack(rows)


def condition(train: torch.Tensor, contrast: torch.Tensor, quantile: float) -> tuple[torch.Tensor, float]:
    """The unit direction from the contrast states' mean to the training states' mean, and
    the ``quantile`` of the contrast states' projections on it (``[n, d]`` inputs)."""
    direction = train.mean(0) - contrast.mean(0)
    norm = direction.norm()
    if not norm > 0:
        raise SimsError("cast: the training and contrast prompts have the same mean activation")
    direction = direction / norm
    return direction, float(torch.quantile(contrast @ direction, quantile))


@register_learner
class CAST(Learner):
    name = "cast"
    config_class = CASTConfig
    needs = "texts"  # the training prompts' texts, for the condition
    needs_contrast = True

    def __init__(self, config: CASTConfig | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        self._lm: LoadedModel | None = None
        self._contrast: list[str] = []

    def prepare(self, lm: LoadedModel) -> None:
        self._lm = lm

    def prepare_contrast(self, prompts: Sequence[str]) -> None:
        self._contrast = list(prompts)

    def fit(self, data: PreferenceActivations, fingerprint: dict[str, Any]) -> Steering:
        cfg: CASTConfig = self.config  # type: ignore[assignment]
        if self._lm is None:
            raise SimsError("cast needs the model: call learner.prepare(lm) first")
        if not self._contrast:
            raise SimsError(
                "cast needs contrast prompts (prompts the steering must leave alone): "
                "sims run --contrast-prompts FILE"
            )
        if data.positive_texts is None or data.negative_texts is None:
            raise SimsError('cast needs the (prompt, response) texts: collect with needs="texts"')
        caa = CAAConfig(**{f.name: getattr(cfg, f.name) for f in fields(CAAConfig)})
        vectors = CAA(caa).fit(data, fingerprint).functions
        train = list(dict.fromkeys(p for p, _ in [*data.positive_texts, *data.negative_texts]))
        train_states = last_prompt_states(self._lm, train, data.layers)
        contrast_states = last_prompt_states(self._lm, self._contrast, data.layers)
        functions: dict[int, SteeringFunction] = {}
        open_train, open_contrast = {}, {}

        def share_open(states: torch.Tensor, direction: torch.Tensor, threshold: float) -> float:
            return round(float((states @ direction > threshold).double().mean()), 4)

        for i, layer in enumerate(data.layers):
            direction, threshold = condition(train_states[:, i], contrast_states[:, i], cfg.quantile)
            vector = vectors[layer].vector  # type: ignore[union-attr]
            functions[layer] = GatedAdd(vector, direction.float(), threshold)
            open_train[str(layer)] = share_open(train_states[:, i], direction, threshold)
            open_contrast[str(layer)] = share_open(contrast_states[:, i], direction, threshold)
        return self.steering(
            functions,
            fingerprint,
            metadata={
                "condition_prompts": {"train": len(train), "contrast": len(self._contrast)},
                # Share of each set whose last prompt token opens the gate, per layer.
                "gate_open_train": open_train,
                "gate_open_contrast": open_contrast,
            },
        )
