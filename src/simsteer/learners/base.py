"""The learner interface, its registry, and the activation data learners fit on.

A learner turns activations of preferred (D+) and dispreferred (D-) responses into a
:class:`~simsteer.steering.Steering`. Adding one takes a config dataclass, a class with
``fit`` and the :func:`register_learner` decorator::

    @dataclass(frozen=True)
    class MeanShiftConfig(LearnerConfig):
        scale: float = 1.0

    @register_learner
    class MeanShift(Learner):
        name = "mean-shift"
        config_class = MeanShiftConfig

        def fit(self, data, fingerprint):
            ...  # return Steering(functions={layer: fn}, learner=self.name, ...)
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch

from ..errors import SimsError
from ..hooks import check_positions
from ..steering import Steering

_LEARNERS: dict[str, type[Learner]] = {}


@dataclass(frozen=True)
class PreferenceActivations:
    """Per-layer activation summaries of D+ and D- responses.

    Attributes:
        layers: the model layers the summaries come from (``hidden_states[l + 1]``).
        positive: ``[n_pos, len(layers), d]`` float32 summaries of preferred responses.
        negative: ``[n_neg, len(layers), d]`` for dispreferred responses.
        positive_groups / negative_groups: prompt index of each row, for pairing.
        token_norms: ``[len(layers)]`` mean L2 norm of single-token activations, the
            scale against which relative strengths are expressed.
        positive_tokens / negative_tokens: per response, ``[T_i, len(layers), d]``
            activations of its first response tokens (learners with ``needs =
            "tokens"``, e.g. HPR); ``None`` when not collected.
        positive_heads / negative_heads: ``[n, len(layers), heads * head_dim]`` inputs of
            the attention output projection at each sequence's last token (learners
            with ``needs = "heads"``, e.g. ITI); ``None`` when not collected.
        num_heads: attention heads per layer (with the head activations).
    """

    layers: list[int]
    positive: torch.Tensor
    negative: torch.Tensor
    positive_groups: list[int]
    negative_groups: list[int]
    token_norms: torch.Tensor
    positive_tokens: list[torch.Tensor] | None = None
    negative_tokens: list[torch.Tensor] | None = None
    positive_heads: torch.Tensor | None = None
    negative_heads: torch.Tensor | None = None
    num_heads: int = 0

    def __post_init__(self) -> None:
        if self.positive.shape[1:] != self.negative.shape[1:]:
            raise ValueError("positive and negative activations have different shapes")
        if len(self.positive_groups) != len(self.positive) or len(self.negative_groups) != len(self.negative):
            raise ValueError("one group id is needed per activation row")
        for name, rows in (
            ("positive_tokens", len(self.positive)),
            ("negative_tokens", len(self.negative)),
            ("positive_heads", len(self.positive)),
            ("negative_heads", len(self.negative)),
        ):
            extra = getattr(self, name)
            if extra is not None and len(extra) != rows:
                raise ValueError(f"{name} needs one entry per activation row ({len(extra)} != {rows})")

    def at(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(positive, negative) summaries at model layer ``layer``."""
        i = self.layers.index(layer)
        return self.positive[:, i], self.negative[:, i]


@dataclass(frozen=True)
class LearnerConfig:
    """Options every learner has.

    Attributes:
        layers: which layers to steer: ``"middle"``, ``"all"``, ``"4-11"``, ``"3,5,7"``.
        positions: where edits apply (``all``/``prompt``/``generated``/``last``).
        strength: multiplier on the learner's own strength knob.
    """

    layers: str = "middle"
    positions: str = "all"
    strength: float = 1.0

    def __post_init__(self) -> None:
        check_positions(self.positions)
        if not self.strength >= 0:
            raise SimsError(f"strength must be >= 0, got {self.strength}")


class Learner(ABC):
    """Fits steering functions from preference activations."""

    name: ClassVar[str]
    config_class: ClassVar[type[LearnerConfig]] = LearnerConfig
    #: The activations this learner needs: ``"mean"``/``"last"`` (the loop's summaries
    #: only), ``"tokens"`` (also per-token activations), ``"heads"`` (also per-head
    #: attention outputs) or ``"none"`` (no activations: the learner works from its
    #: own inputs, e.g. ActAdd's prompt pair).
    needs: ClassVar[str] = "mean"

    def __init__(self, config: LearnerConfig | None = None, **options: Any) -> None:
        if config is not None and options:
            raise TypeError("pass either a config or options, not both")
        if config is None:
            known = {f.name for f in fields(self.config_class)}
            unknown = sorted(set(options) - known)
            if unknown:
                raise SimsError(
                    f"learner {self.name!r} has no option {unknown[0]!r} "
                    f"(options: {', '.join(sorted(known))})"
                )
            config = self.config_class(**options)
        self.config = config

    def hyperparameters(self) -> dict[str, Any]:
        return asdict(self.config)

    def prepare(self, model: Any) -> None:
        """Called by the loop with its :class:`~simsteer.models.LoadedModel` before
        fitting; learners that need the model at fit time (ActAdd) keep it."""
        return None  # most learners need activations only

    @abstractmethod
    def fit(self, data: PreferenceActivations, fingerprint: dict[str, Any]) -> Steering:
        """Learn steering functions for ``data.layers`` of the model with ``fingerprint``."""


def register_learner(cls: type[Learner]) -> type[Learner]:
    """Class decorator adding a learner to the registry under ``cls.name``."""
    if not getattr(cls, "name", None):
        raise TypeError("a learner needs a name")
    _LEARNERS[cls.name] = cls
    return cls


def learner_names() -> list[str]:
    return sorted(_LEARNERS)


def get_learner(name: str, **options: Any) -> Learner:
    """Instantiate a registered learner, with a 'did you mean' error for a typo."""
    if name not in _LEARNERS:
        close = difflib.get_close_matches(name, list(_LEARNERS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SimsError(f"unknown learner {name!r}{hint}; known learners: {', '.join(learner_names())}")
    return _LEARNERS[name](**options)
