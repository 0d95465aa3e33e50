"""Steering functions and the saved, shareable :class:`Steering` (a policy's edits).

A steering function maps a layer's hidden states ``[..., d] -> [..., d]``. A
:class:`Steering` holds one per layer plus what is needed to apply and check it: the
learner that made it, where it applies (positions), a strength multiplier and the
fingerprint of the model it was learned on. On disk it is a folder:

- ``steering.safetensors``: tensors named ``layers.<index>.<name>``;
- ``steering_config.json``: learner, kind, layers, positions, strength,
  hyper-parameters, model fingerprint and library version.

Loading uses safetensors only (no pickle), and refuses a steering for another model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import SimsError
from .hooks import check_positions, steer
from .io import atomic_write_bytes, write_json

FORMAT_VERSION = 1
WEIGHTS_NAME = "steering.safetensors"
CONFIG_NAME = "steering_config.json"

_FUNCTION_KINDS: dict[str, type[SteeringFunction]] = {}


class SteeringFunction(nn.Module):
    """One layer's edit. Subclasses set ``kind``, implement :meth:`edit` and store their
    parameters as buffers (so ``state_dict`` is what gets saved)."""

    kind: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            _FUNCTION_KINDS[cls.kind] = cls

    def edit(self, hidden: torch.Tensor, strength: float) -> torch.Tensor:
        """Return the edited hidden states (a new tensor, same shape and dtype)."""
        raise NotImplementedError

    def forward(self, hidden: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        return self.edit(hidden, strength)

    def params(self) -> dict[str, Any]:
        """JSON hyper-parameters needed to rebuild this function with :meth:`from_saved`."""
        return {}

    @classmethod
    def from_saved(cls, tensors: dict[str, torch.Tensor], params: dict[str, Any]) -> SteeringFunction:
        raise NotImplementedError


def function_kind(kind: str) -> type[SteeringFunction]:
    if kind not in _FUNCTION_KINDS:
        raise SimsError(f"unknown steering function kind {kind!r} (known: {sorted(_FUNCTION_KINDS)})")
    return _FUNCTION_KINDS[kind]


def _library_version() -> str:
    from ._version import __version__

    return __version__


@dataclass
class Steering:
    """Steering functions for a set of layers of one model: the learned part of a policy.

    Example:
        >>> steering = Steering.load("runs/demo/final")
        >>> with steering.applied(lm.model):
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
        self.functions = dict(sorted(self.functions.items()))

    @property
    def layers(self) -> list[int]:
        return list(self.functions)

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

    @contextmanager
    def applied(
        self,
        model: nn.Module,
        strength: float | None = None,
        positions: str | None = None,
        prompt_end: torch.Tensor | None = None,
    ) -> Iterator[None]:
        """Install the functions on ``model`` inside the block; hooks are always removed.

        Args:
            strength: multiplier on the saved strength (CAA coefficient, HPR angle, ...).
            positions: override the saved positions (see :mod:`simsteer.hooks`).
        """
        self.check_model(model)
        scale = self.strength * (1.0 if strength is None else strength)
        ref = next(model.parameters())
        funcs = {i: f.to(device=ref.device) for i, f in self.functions.items()}
        edits = {i: (lambda h, f=f: f.edit(h, scale)) for i, f in funcs.items()}
        with steer(model, edits, positions or self.positions, prompt_end=prompt_end):
            yield

    # -- persistence ---------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the folder ``path`` (created if needed); each file is written atomically."""
        path = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        layer_info: dict[str, Any] = {}
        for index, fn in self.functions.items():
            for name, value in fn.state_dict().items():
                tensors[f"layers.{index}.{name}"] = value.detach().cpu().contiguous()
            layer_info[str(index)] = {"kind": fn.kind, "params": fn.params()}
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
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / f".{WEIGHTS_NAME}.tmp"
        save_file(tensors, str(tmp), metadata={"format": "pt", "learner": self.learner})
        atomic_write_bytes(path / WEIGHTS_NAME, tmp.read_bytes())
        tmp.unlink(missing_ok=True)
        write_json(path / CONFIG_NAME, config)
        return path

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
        try:
            if config.get("format_version") != FORMAT_VERSION:
                raise SimsError(f"{path}: steering format {config.get('format_version')!r} is not supported")
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


def load_policy(path: str | Path) -> list[Steering]:
    """Load a policy folder: one steering, or a composed stack saved as ``step_<i>/``."""
    path = Path(path)
    if (path / CONFIG_NAME).is_file() or not path.is_dir():
        return [Steering.load(path)]
    steps = sorted(path.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    if not steps:
        raise SimsError(f"{path} is not a steering folder (no {CONFIG_NAME})")
    return [Steering.load(p) for p in steps]
