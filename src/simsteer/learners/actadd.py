"""ActAdd, activation addition (Turner et al., 2023): steering from one prompt pair.

No data set and no training: run the model on ``p+`` and ``p-`` (e.g. "Love" / "Hate"),
the shorter padded to the same token length T, and take ``Δ = c (h+ - h-) ∈ R^{T x d}``
at the chosen layer; ``Δ``'s rows are added to the first T tokens of the user's prompt.

Where the user's prompt starts (documented choice): prompts are wrapped in the model's
chat template (or the plain instruction format), so ``p±`` are run *inside that
template*, ``prefix + p±``, and ``Δ`` covers the ``p±`` tokens only; it is added at the
same positions, ``prefix_len .. prefix_len + T - 1``, of every sequence (padding not
counted). The prefix's own rows would be zero anyway (same tokens, causal model). The
shorter prompt is padded with the tokenizer's single-token space when it has one, else
its pad token.

Two variants (``mode``): ``"positions"`` (the paper's, kind ``actadd``,
:class:`~simsteer.functions.PositionalAdd`) and ``"mean"``, the mean of Δ's rows added
like a CAA vector wherever ``positions`` says (kind ``add``).
In the SIMS loop the learner ignores D+ / D- (``needs = "none"``) and needs the model,
which the loop hands over with :meth:`ActAdd.prepare`; :func:`fit_actadd` is the
standalone API.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..architecture import decoder_module
from ..errors import SimsError
from ..functions import AddVector, PositionalAdd, SteeringFunction
from ..hooks import record
from ..models import LoadedModel, parse_layers
from ..steering import Steering
from ..tokens import format_prompt
from .base import Learner, LearnerConfig, PreferenceActivations, register_learner

__all__ = [
    "ACTADD_MODES",
    "ActAdd",
    "ActAddConfig",
    "PositionalAdd",
    "actadd_delta",
    "fit_actadd",
    "prompt_pair_ids",
]

log = logging.getLogger(__name__)

ACTADD_MODES = ("positions", "mean")
_SENTINEL = "\ue000"  # a private-use character: marks where the user's text goes


def prompt_pair_ids(tokenizer: Any, positive: str, negative: str) -> tuple[list[int], list[int], int]:
    """Token ids of ``prefix + p+`` and ``prefix + p-``, padded to equal length, and the
    prefix length (where the user's text starts in the prompt format)."""
    text = format_prompt(tokenizer, _SENTINEL)
    chat = bool(getattr(tokenizer, "chat_template", None))
    # Same special-token rule as encode_prompt: a chat template writes BOS as text.
    prefix = list(tokenizer(text[: text.index(_SENTINEL)], add_special_tokens=not chat)["input_ids"])
    pos = list(tokenizer(positive, add_special_tokens=False)["input_ids"])
    neg = list(tokenizer(negative, add_special_tokens=False)["input_ids"])
    if not pos or not neg:
        raise SimsError("ActAdd needs two non-empty prompts (-L positive=... -L negative=...)")
    space = list(tokenizer(" ", add_special_tokens=False)["input_ids"])
    pad = space[0] if len(space) == 1 else tokenizer.pad_token_id
    if pad is None:
        raise SimsError("ActAdd cannot pad the shorter prompt: the tokenizer has no pad token")
    width = max(len(pos), len(neg))
    pos += [pad] * (width - len(pos))
    neg += [pad] * (width - len(neg))
    return prefix + pos, prefix + neg, len(prefix)


def actadd_delta(
    lm: LoadedModel, positive: str, negative: str, layers: list[int]
) -> tuple[torch.Tensor, int]:
    """``h+ - h-`` over the prompt pair's T tokens at ``layers``: ``[len(layers), T, d]``
    float32, and the prefix length (the offset of the first row)."""
    pos, neg, offset = prompt_pair_ids(lm.tokenizer, positive, negative)
    ids = torch.tensor([pos, neg], device=lm.device)
    with torch.inference_mode(), record(lm.model, layers) as acts:
        decoder_module(lm.model)(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    diffs = [acts[layer][0][0, offset:].float() - acts[layer][0][1, offset:].float() for layer in layers]
    return torch.stack(diffs).cpu(), offset


def fit_actadd(
    lm: LoadedModel,
    positive: str = "Love",
    negative: str = "Hate",
    layers: list[int] | int | str = "middle",
    coefficient: float = 5.0,
    mode: str = "positions",
    positions: str = "all",
    strength: float = 1.0,
) -> Steering:
    """ActAdd steering from one prompt pair.

    Args:
        positive / negative: the prompt pair (p+, p-).
        layers: layer index, list, or selection string (``parse_layers``).
        coefficient: c in ``Δ = c (h+ - h-)``.
        mode: ``"positions"`` (Δ's rows on the prompt's first T tokens) or ``"mean"``
            (the mean row, added at every position ``positions`` allows).

    Example:
        >>> steering = fit_actadd(lm, "Love", "Hate", layers=6, coefficient=5)
        >>> with steering.applied(lm.model):
        ...     lm.model.generate(**inputs)
    """
    if mode not in ACTADD_MODES:
        raise SimsError(f"unknown ActAdd mode {mode!r}: use one of {', '.join(ACTADD_MODES)}")
    chosen = [layers] if isinstance(layers, int) else parse_layers(layers, lm.num_layers)
    delta, offset = actadd_delta(lm, positive, negative, chosen)
    functions: dict[int, SteeringFunction] = {}
    for i, layer in enumerate(chosen):
        rows = coefficient * delta[i]
        functions[layer] = PositionalAdd(rows, offset) if mode == "positions" else AddVector(rows.mean(0))
    return Steering(
        functions=functions,
        learner="actadd",
        fingerprint=lm.fingerprint(),
        positions=positions,
        strength=strength,
        hyperparameters={
            "positive": positive,
            "negative": negative,
            "coefficient": coefficient,
            "mode": mode,
            "layers": chosen,
        },
        metadata={"offset": offset, "tokens": int(delta.shape[1])},
    )


@dataclass(frozen=True)
class ActAddConfig(LearnerConfig):
    """ActAdd options.

    Attributes:
        positive / negative: the prompt pair (reference example "Love" / "Hate").
        coefficient: c (reference example 5).
        mode: ``positions`` or ``mean`` (see the module docstring).
        single_layer: the reference injects at one layer: use the center of ``layers``
            (so the default is the model's middle layer); false adds at every one.
    """

    positive: str = "Love"
    negative: str = "Hate"
    coefficient: float = 5.0
    mode: str = "positions"
    single_layer: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in ACTADD_MODES:
            raise SimsError(f"unknown ActAdd mode {self.mode!r}: use one of {', '.join(ACTADD_MODES)}")


@register_learner
class ActAdd(Learner):
    """ActAdd as a learner: fits from its prompt pair, ignoring D+ / D-."""

    name = "actadd"
    config_class = ActAddConfig
    needs = "none"

    def __init__(self, config: LearnerConfig | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        self._lm: LoadedModel | None = None

    def prepare(self, lm: LoadedModel) -> None:
        self._lm = lm

    def fit(self, data: PreferenceActivations, fingerprint: dict[str, Any]) -> Steering:
        cfg: ActAddConfig = self.config  # type: ignore[assignment]
        if self._lm is None:
            raise SimsError("ActAdd needs the model: call learner.prepare(lm) first, or use fit_actadd()")
        layers = (
            data.layers[len(data.layers) // 2 : len(data.layers) // 2 + 1]
            if cfg.single_layer
            else data.layers
        )
        log.info(
            "ActAdd fits from the prompt pair %r / %r; D+ and D- are not used", cfg.positive, cfg.negative
        )
        steering = fit_actadd(
            self._lm,
            cfg.positive,
            cfg.negative,
            layers,
            cfg.coefficient,
            cfg.mode,
            cfg.positions,
            cfg.strength,
        )
        return replace(steering, hyperparameters=self.hyperparameters())
