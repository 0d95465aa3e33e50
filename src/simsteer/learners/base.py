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
import importlib
import importlib.metadata
import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from ..activations import NEEDS, PreferenceActivations
from ..errors import SimsError
from ..hooks import check_positions
from ..models import LoadedModel
from ..steering import Steering

_LEARNERS: dict[str, type[Learner]] = {}
#: The entry-point group a package lists its learners in (``pyproject.toml``:
#: ``[project.entry-points."simsteer.learners"] mean-shift = "mypkg.learners:MeanShift"``).
ENTRY_POINT_GROUP = "simsteer.learners"
#: The prefix of a learner named by its code: ``python:MODULE:CLASS`` or ``python:FILE.py:CLASS``.
PYTHON_PREFIX = "python:"


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

    #: The name :meth:`describe` gives (``python:MODULE:CLASS`` for a learner loaded from
    #: its code, so that :func:`get_learner` finds it again); ``None``: :attr:`name`.
    spec_name: str | None = None

    def hyperparameters(self) -> dict[str, Any]:
        return asdict(self.config)

    def describe(self) -> dict[str, Any]:
        """The learner's spec: ``{"name": ..., **hyper-parameters}``, JSON-ready; a run saves it
        in ``config.json`` and :func:`get_learner` accepts it back.

        Example:
            >>> learner = get_learner("caa", coefficient=0.02)
            >>> get_learner(learner.describe()).describe() == learner.describe()
            True
        """
        return {"name": self.spec_name or self.name, **self.hyperparameters()}

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
    """The registered learners' names, and those installed packages list under the
    ``simsteer.learners`` entry-point group (loaded only when used)."""
    return sorted(set(_LEARNERS) | set(_entry_points()))


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def python_learner_target(target: str) -> str:
    """``MODULE:CLASS`` unchanged, ``FILE.py:CLASS`` with the file made absolute (a saved
    spec must find the file from any folder)."""
    module_name, sep, cls_name = target.rpartition(":")
    if sep and (module_name.endswith(".py") or "/" in module_name):
        return f"{Path(module_name).expanduser().resolve()}:{cls_name}"
    return target


def _load_python_learner(target: str) -> type[Learner]:
    """The learner class named by ``MODULE:CLASS`` or ``FILE.py:CLASS``."""
    module_name, sep, cls_name = target.rpartition(":")
    if not sep or not module_name or not cls_name:
        raise SimsError(f"a python learner is python:MODULE:CLASS or python:FILE.py:CLASS, got {target!r}")
    try:
        if module_name.endswith(".py") or "/" in module_name:
            path = Path(module_name)
            if not path.is_file():
                raise SimsError(f"python learner file not found: {path}")
            spec = importlib.util.spec_from_file_location(f"simsteer_user_learner_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(module_name)
    except SimsError:
        raise
    except Exception as exc:  # the user's code may raise anything on import
        raise SimsError(f"cannot import {module_name}: {type(exc).__name__}: {exc}") from None
    cls = getattr(module, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Learner)):
        raise SimsError(f"{module_name} has no Learner subclass {cls_name!r}")
    if not getattr(cls, "name", None):
        raise SimsError(f"{module_name}:{cls_name} needs a name (a class attribute: name = 'my-learner')")
    if cls.__abstractmethods__:
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise SimsError(f"{module_name}:{cls_name} does not implement {missing}")
    if cls.needs not in NEEDS:
        known = ", ".join(NEEDS)
        raise SimsError(f"{module_name}:{cls_name}.needs must be one of {known}, not {cls.needs!r}")
    return cls  # not registered: the registry lists what the library and packages offer


def _learner_class(name: str) -> type[Learner]:
    """The class a learner name stands for: registered, an entry point, or ``python:...``."""
    if name.startswith(PYTHON_PREFIX):
        return _load_python_learner(name.removeprefix(PYTHON_PREFIX))
    if name in _LEARNERS:
        return _LEARNERS[name]
    entry = _entry_points().get(name)
    if entry is not None:
        try:
            cls = entry.load()
        except Exception as exc:  # an installed package's code may raise anything on import
            raise SimsError(
                f"cannot load learner {name!r} ({entry.value}): {type(exc).__name__}: {exc}"
            ) from None
        if not (isinstance(cls, type) and issubclass(cls, Learner)):
            raise SimsError(f"the entry point {name!r} ({entry.value}) is not a Learner subclass")
        return cls
    close = _closest(name, learner_names())
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    raise SimsError(
        f"unknown learner {name!r}{hint}; known learners: {', '.join(learner_names())} "
        "(or python:MODULE:CLASS)"
    )


def learner_class(name: str) -> type[Learner]:
    """The learner class a name (or ``python:MODULE:CLASS``) stands for, without building it."""
    return _learner_class(name)


def get_learner(spec: str | Mapping[str, Any] | None = None, /, **options: Any) -> Learner:
    """Build a learner from its name or its spec (``learner.describe()``).

    Args:
        spec: a registered name (``caa``), a name an installed package lists under the
            ``simsteer.learners`` entry-point group, ``python:MODULE:CLASS`` /
            ``python:FILE.py:CLASS`` (your :class:`Learner` subclass, imported from there),
            or a spec dict ``{"name": ..., **options}`` (``get_learner(**spec)`` works too).
        options: the learner's options (override what a spec says).

    Example:
        >>> get_learner("caa", coefficient=0.02).describe()["coefficient"]
        0.02
    """
    if spec is None:
        spec = options.pop("name", None)
    if isinstance(spec, Mapping):
        options = {**{k: v for k, v in spec.items() if k != "name"}, **options}
        spec = spec.get("name")
    if not isinstance(spec, str):
        raise SimsError(f"a learner is named by text, got {spec!r}")
    if spec.startswith(PYTHON_PREFIX):
        spec = PYTHON_PREFIX + python_learner_target(spec.removeprefix(PYTHON_PREFIX))
    learner = _learner_class(spec)(**options)
    if spec.startswith(PYTHON_PREFIX):
        learner.spec_name = spec
    return learner


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
