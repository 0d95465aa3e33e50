"""The learner interface, its registry, and the activation data learners fit on
(:class:`~simsteer.activations.PreferenceActivations`, re-exported here).

A learner turns activations of preferred (D+) and dispreferred (D-) responses into a
:class:`~simsteer.steering.Steering` made of steering functions
(:mod:`simsteer.functions`; a new kind of edit is a new ``SteeringFunction`` subclass).
Adding a learner takes a config dataclass, a class with ``fit`` and the
:func:`register_learner` decorator::

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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from ..activations import NEEDS, PreferenceActivations
from ..errors import SimsError
from ..hooks import check_positions
from ..models import LoadedModel
from ..steering import Steering

_LEARNERS: dict[str, type[Learner]] = {}


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
    """Fits steering functions from preference activations.

    Attributes:
        name: the registry name (``--learner NAME``).
        config_class: the options dataclass (``-L key=value``).
        needs: the activations this learner needs: ``"summaries"`` (one summary per
            response only), ``"tokens"`` (also per-token activations, HPR), ``"heads"``
            (also per-head attention outputs, ITI), ``"texts"`` (also each response's
            (prompt, response) texts, for learners that run the model themselves after
            :meth:`prepare`, BiPO) or ``"none"`` (no activations: the
            learner works from its own inputs, e.g. ActAdd's prompt pair). This is not
            the response summary (mean over tokens or last token): the loop's config
            (``SIMSConfig.summary``) chooses that, the same for every learner.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[LearnerConfig]] = LearnerConfig
    needs: ClassVar[str] = "summaries"
    #: The learner fits on the run's contrast prompts too (``cast``): a run without them
    #: is refused before it starts.
    needs_contrast: ClassVar[bool] = False

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

    def steering(
        self,
        functions: dict[int, Any],
        fingerprint: dict[str, Any],
        metadata: dict[str, Any] | None = None,
    ) -> Steering:
        """The fitted ``functions`` as this learner's :class:`Steering`: its name, the
        config's positions and strength, its hyper-parameters, and facts about the fit."""
        return Steering(
            functions=functions,
            learner=self.name,
            fingerprint=fingerprint,
            positions=self.config.positions,
            strength=self.config.strength,
            hyperparameters=self.hyperparameters(),
            metadata=metadata or {},
        )

    def prepare(self, lm: LoadedModel) -> None:
        """Called by the loop with its loaded model before fitting; learners that need
        the model at fit time (ActAdd) keep it.

        Args:
            lm: the :class:`~simsteer.models.LoadedModel` the loop steers.
        """
        return None  # most learners need activations only

    def prepare_contrast(self, prompts: Sequence[str]) -> None:
        """Called by the loop with the run's contrast prompts (``--contrast-prompts``, empty
        without them) before fitting; learners that use them (``cast``) keep them.

        Args:
            prompts: the texts of prompts the steered behaviour must leave alone.
        """
        return None

    @abstractmethod
    def fit(self, data: PreferenceActivations, fingerprint: dict[str, Any]) -> Steering:
        """Learn steering functions for ``data.layers`` of the model with ``fingerprint``."""


def register_learner(cls: type[Learner]) -> type[Learner]:
    """Class decorator adding a learner to the registry under ``cls.name``."""
    if not getattr(cls, "name", None):
        raise TypeError("a learner needs a name")
    if cls.needs not in NEEDS:
        raise TypeError(f"{cls.__name__}.needs must be one of {', '.join(NEEDS)}, not {cls.needs!r}")
    _LEARNERS[cls.name] = cls
    return cls


def learner_names() -> list[str]:
    return sorted(_LEARNERS)


def get_learner(name: str, **options: Any) -> Learner:
    """Instantiate a registered learner, with a 'did you mean' error for a typo."""
    if name not in _LEARNERS:
        close = _closest(name, list(_LEARNERS))
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        raise SimsError(f"unknown learner {name!r}{hint}; known learners: {', '.join(learner_names())}")
    return _LEARNERS[name](**options)


def _closest(name: str, names: list[str]) -> list[str]:
    """The registered names closest to a typo: all that tie for the best similarity, those
    sharing its first letter first (a typo rarely hits the first letter: ``cca`` -> ``caa``
    before ``pca``)."""
    scores = {n: difflib.SequenceMatcher(None, name, n).ratio() for n in names}
    best = max(scores.values(), default=0.0)
    if best < 0.6:  # difflib.get_close_matches' own cutoff
        return []
    tied = [n for n, s in scores.items() if s == best]
    return sorted(tied, key=lambda n: (n[:1] != name[:1], n))
