"""The saved, shareable :class:`Steering`: one learned set of per-layer edits.

A :class:`Steering` holds one steering function (:mod:`simsteer.functions`) per layer
plus what is needed to apply and check it: the learner that made it, where it applies
(positions), a strength multiplier and the fingerprint of the model it was learned on.
It is immutable: :meth:`Steering.with_strength` and friends return changed copies. On
disk it is a folder:

- ``steering.safetensors``: tensors named ``layers.<index>.<name>``;
- ``steering_config.json``: learner, kind, layers, positions, strength,
  hyper-parameters, model fingerprint and library version.

Loading uses safetensors only (no pickle), rebuilds every built-in function kind without
importing a learner, and refuses a steering for another model. A stack of steerings (a
policy, possibly empty) is :class:`simsteer.policy.Policy`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Annotated, Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from torch import nn

from .errors import SimsError
from .functions import SteeringFunction, function_kind
from .hooks import POSITIONS, Edit, RowSelector, check_positions, steer
from .io import atomic_write_bytes, is_temporary, staged_dir, write_json
from .schema import Rule, SchemaError, check

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "Steering", "SteeringFunction", "function_kind"]

FORMAT_VERSION = 1
WEIGHTS_NAME = "steering.safetensors"
CONFIG_NAME = "steering_config.json"


#: Where each built-in function kind keeps its width: (tensor, dimension); ITI's width is
#: its heads x head_dim (every element of ``directions``), checked apart.
WIDTHS = {"add": ("vector", -1), "actadd": ("delta", -1), "hpr": ("v", -1), "sea": ("u_pos", 0)}


def function_width(fn: SteeringFunction) -> int | None:
    """The width of the hidden states ``fn`` edits (``None`` for a kind not known here)."""
    if fn.kind == "iti":
        return int(fn.directions.numel())
    where = WIDTHS.get(fn.kind)
    tensor = getattr(fn, where[0], None) if where else None
    return int(tensor.shape[where[1]]) if isinstance(tensor, torch.Tensor) and tensor.dim() else None


def site_width(model: nn.Module, index: int, site: str) -> int | None:
    """The width of ``model``'s hidden states at ``site`` of layer ``index`` (``None``: unknown)."""
    from .architecture import find_attn_output, find_layers

    if site == "residual":
        return int(model.config.hidden_size)
    layers = find_layers(model)
    if not 0 <= index < len(layers):
        return None  # steer() names the missing layer
    proj = find_attn_output(layers[index])
    width = getattr(proj, "in_features", None) or getattr(proj, "nx", None)  # Linear / GPT-2 Conv1D
    return int(width) if width else None


@dataclass(frozen=True)
class _LayerEntry:
    """One layer's function in ``steering_config.json``."""

    schema_open: ClassVar[bool] = True

    kind: str
    params: dict[str, Any]


@dataclass(frozen=True)
class _ModelSizes:
    """What a steering's ``fingerprint`` says of the model's sizes (other keys are free)."""

    schema_open: ClassVar[bool] = True

    hidden_size: Annotated[int, Rule(low=1)] | None = None
    num_layers: Annotated[int, Rule(low=1)] | None = None


@dataclass(frozen=True)
class SteeringFile:
    """The fields of ``steering_config.json`` that :func:`check_config` checks (with
    :func:`simsteer.schema.check`); the layer keys and positions are checked beside."""

    schema_open: ClassVar[bool] = True

    learner: str
    layers: dict[str, _LayerEntry]
    fingerprint: _ModelSizes
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    positions: str = "all"
    strength: float = 1.0


def check_config(file: Path, config: Any) -> None:
    """Refuse a ``steering_config.json`` whose fields have the wrong type, in one line
    naming the file and the field (a hand edit must not end in a traceback or a NaN).

    Args:
        file: the file, for the message.
        config: its parsed JSON.
    """
    if not isinstance(config, dict):
        raise SchemaError(f"{file}: must hold a JSON object, got {json.dumps(config)[:80]}")
    if config.get("format_version") != FORMAT_VERSION:
        raise SimsError(f"{file.parent}: steering format {config.get('format_version')!r} is not supported")
    layers = config.get("layers")
    for key in layers if isinstance(layers, dict) else ():
        if not key.isdigit():
            raise SchemaError(f"{file}: field 'layers.{key}' must be keyed by a layer index, got {key!r}")
    check(SteeringFile, config, str(file))
    if config.get("positions", "all") not in POSITIONS:
        raise SchemaError(
            f"{file}: field 'positions' must be one of {', '.join(POSITIONS)}, got {config['positions']!r}"
        )


def check_replaceable(path: Path) -> None:
    """Refuse to save a steering over anything but a steering folder (or an empty one).

    Saving replaces the folder as a whole; this keeps a mistyped path from deleting a
    folder of other files.
    """
    if not path.exists():
        return
    if not path.is_dir():
        raise SimsError(f"{path} is a file; a steering is saved as a folder")
    for entry in path.iterdir():
        name = entry.name
        ours = name in (CONFIG_NAME, WEIGHTS_NAME) or (name.startswith("step_") and name[5:].isdigit())
        if not ours and not is_temporary(name):
            raise SimsError(f"{path} exists and is not a steering folder ({name}); not replacing it")


def _library_version() -> str:
    from ._version import __version__

    return __version__


@dataclass(frozen=True)
class Steering:
    """Steering functions for a set of layers of one model: the learned part of a policy.

    Frozen: change it with :meth:`with_strength`, :meth:`scaled`, :meth:`with_positions`
    or :meth:`with_metadata`, which return copies sharing the (read-only) functions.

    Attributes:
        functions: layer index -> steering function (kept sorted by layer).
        learner: the learner's registry name.
        fingerprint: :meth:`simsteer.models.LoadedModel.fingerprint` of the model.
        positions: where the edits apply (:data:`simsteer.hooks.POSITIONS`).
        strength: multiplier passed to every function's ``edit``.
        hyperparameters: the learner's options (JSON).
        metadata: facts about the fit (JSON): iteration, timings, calibration.

    Example:
        >>> steering = Steering.load("runs/demo/final")
        >>> with steering.with_strength(0.5).applied(lm.model):
        ...     lm.model.generate(**inputs)
    """

    functions: dict[int, SteeringFunction]
    learner: str
    fingerprint: dict[str, Any]
    positions: str = "all"
    strength: float = 1.0
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_positions(self.positions)
        # Own copies, so that changing the caller's dicts later cannot change this steering.
        object.__setattr__(self, "functions", dict(sorted(self.functions.items())))
        object.__setattr__(self, "hyperparameters", dict(self.hyperparameters))
        object.__setattr__(self, "metadata", dict(self.metadata))

    @property
    def layers(self) -> list[int]:
        return list(self.functions)

    def with_strength(self, strength: float) -> Steering:
        """A copy whose strength is ``strength`` (it replaces the saved one)."""
        return replace(self, strength=float(strength))

    def scaled(self, multiplier: float) -> Steering:
        """A copy whose strength is this one's times ``multiplier``."""
        return replace(self, strength=self.strength * multiplier)

    def with_positions(self, positions: str) -> Steering:
        """A copy applied at ``positions`` (one of :data:`simsteer.hooks.POSITIONS`)."""
        return replace(self, positions=check_positions(positions))

    def with_metadata(self, **values: Any) -> Steering:
        """A copy whose metadata has ``values`` added (or replaced), in that order."""
        return replace(self, metadata={**self.metadata, **values})

    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`SimsError` unless ``model`` matches the saved fingerprint."""
        from .models import model_fingerprint

        actual = model_fingerprint(model)
        diffs = [
            f"{key} {self.fingerprint.get(key)} != {actual.get(key)}"
            for key in ("architecture", "hidden_size", "num_layers")
            if self.fingerprint.get(key) != actual.get(key)
        ]
        if diffs:
            raise SimsError("this steering was learned on another model (" + "; ".join(diffs) + ")")
        for index, fn in self.functions.items():
            have, want = function_width(fn), site_width(model, index, fn.site)
            if have is not None and want is not None and have != want:
                raise SimsError(
                    f"the {fn.kind!r} function of layer {index} is {have} wide but the model's "
                    f"{fn.site} site is {want} wide (a steering for another model, or an edited file)"
                )

    @contextmanager
    def applied(
        self,
        model: nn.Module,
        strength: float | None = None,
        positions: str | None = None,
        prompt_end: torch.Tensor | None = None,
        rows: RowSelector | None = None,
    ) -> Iterator[None]:
        """Install the functions on ``model`` inside the block; hooks are always removed.

        Args:
            model: the ``nn.Module`` to steer (``lm.model``).
            strength: multiplier on the saved strength (CAA coefficient, HPR angle, ...).
            positions: override the saved positions (see :mod:`simsteer.hooks`).
            prompt_end: for teacher-forced forwards, where each row's response starts.
            rows: steer only the rows it selects before each forward (see :func:`steer`).
        """
        self.check_model(model)
        scale = self.strength * (1.0 if strength is None else strength)
        ref = next(model.parameters())
        edits = {
            i: Edit(partial(f.to(device=ref.device).edit, strength=scale), site=f.site)
            for i, f in self.functions.items()
        }
        with steer(model, edits, positions or self.positions, prompt_end=prompt_end, rows=rows):
            yield

    # -- persistence ---------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the steering folder ``path`` in one step (crash-safe).

        The folder is filled as a hidden temporary sibling and renamed into place, so a
        kill leaves the old folder (or none), never half of one. A steering folder
        already at ``path`` is replaced; any other non-empty folder is refused.

        Args:
            path: the folder to write.

        Returns:
            ``path``.
        """
        path = Path(path)
        check_replaceable(path)
        with staged_dir(path) as tmp:
            self.write_files(tmp)
        return path

    def write_files(self, folder: Path) -> None:
        """Write the two files of a steering folder into the existing ``folder``.

        Not atomic by itself: :meth:`save` and :meth:`simsteer.policy.Policy.save` call it
        on a staged folder that they commit in one rename.
        """
        tensors: dict[str, torch.Tensor] = {}
        layer_info: dict[str, Any] = {}
        for index, fn in self.functions.items():
            for name, value in fn.state_dict().items():
                tensors[f"layers.{index}.{name}"] = value.detach().cpu().contiguous()
            layer_info[str(index)] = {"kind": fn.kind, "params": fn.params()}
        # Checked before anything is written: a NaN steering that was committed would be
        # refused by every later load (and ``--resume``) of the folder.
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise SimsError(
                    f"learner {self.learner} produced NaN or infinite values ({name}); "
                    "nothing was saved (a diverging fit: try fp32 or gentler learner options)"
                )
        config = {
            "format_version": FORMAT_VERSION,
            "library": "simsteer",
            "library_version": _library_version(),
            "learner": self.learner,
            "layers": layer_info,
            "positions": self.positions,
            "strength": self.strength,
            "hyperparameters": self.hyperparameters,
            "fingerprint": self.fingerprint,
            "metadata": self.metadata,
        }
        weights = save_safetensors(tensors, metadata={"format": "pt", "learner": self.learner})
        atomic_write_bytes(folder / WEIGHTS_NAME, weights)
        write_json(folder / CONFIG_NAME, config)

    @classmethod
    def load(cls, path: str | Path) -> Steering:
        """Load a saved steering folder (safetensors + JSON; nothing is unpickled)."""
        path = Path(path)
        if path.is_file() and path.name in (WEIGHTS_NAME, CONFIG_NAME):
            path = path.parent
        if not path.is_dir():
            raise SimsError(f"steering not found: {path}")
        missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (path / n).is_file()]
        if missing:
            raise SimsError(f"{path} is not a steering folder (missing {', '.join(missing)})")
        try:
            config = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
            flat = load_file(str(path / WEIGHTS_NAME))
        except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError) as exc:
            raise SimsError(f"corrupt steering file in {path}: {exc}") from None
        check_config(path / CONFIG_NAME, config)
        for name, tensor in flat.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise SimsError(f"{path / WEIGHTS_NAME}: tensor {name!r} holds NaN or infinite values")
        try:
            functions: dict[int, SteeringFunction] = {}
            for key, info in config["layers"].items():
                prefix = f"layers.{key}."
                tensors = {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}
                functions[int(key)] = function_kind(info["kind"]).from_saved(tensors, info["params"])
            return cls(
                functions=functions,
                learner=config["learner"],
                fingerprint=config["fingerprint"],
                positions=config.get("positions", "all"),
                strength=float(config.get("strength", 1.0)),
                hyperparameters=config.get("hyperparameters", {}),
                metadata=config.get("metadata", {}),
            )
        except SimsError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise SimsError(f"corrupt steering file in {path}: {type(exc).__name__}: {exc}") from None
