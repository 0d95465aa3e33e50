"""A policy: the stack of steerings applied together, possibly empty (the unsteered model).

SIMS's policy at iteration t is the base model with steerings stacked on it: one when
each fit replaces the last, several when they compose. :class:`Policy` is that stack,
immutable, and a :class:`~collections.abc.Sequence` of :class:`Steering` so that code
written for a list of steerings takes a policy unchanged.

On disk a policy is one steering folder, or a composed stack saved as ``step_<i>/``
steering folders (``step_1`` applied first). An unsteered policy is saved the way runs
have always saved it: a steering folder without layers whose metadata says
``"unsteered": true``; :meth:`Policy.load` reads that back as an empty policy.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import torch
from torch import nn

from .errors import SimsError
from .functions import AddVector
from .hooks import RowSelector
from .io import staged_dir
from .steering import CONFIG_NAME, WEIGHTS_NAME, Steering, check_replaceable

__all__ = [
    "Policy",
    "PolicyPayload",
    "load_policy",
    "payload_key",
    "policy_from_payload",
    "policy_payload",
]

#: Metadata key of the steering folder that stands for the unsteered model.
UNSTEERED_KEY = "unsteered"

#: Largest multiplier (in absolute value) a command or a ``sims serve`` request may put on
#: a saved strength: far past any useful steering, short of the overflow that turns a
#: model's logits into inf/NaN garbage.
STRENGTH_LIMIT = 10.0


@dataclass(frozen=True)
class Policy(Sequence[Steering]):
    """An immutable stack of steerings, applied in order; empty = the unsteered model.

    Attributes:
        steerings: the stack, first applied first.

    Example:
        >>> policy = Policy.load("runs/demo/final")
        >>> with policy.scaled(0.5).applied(lm.model):
        ...     lm.model.generate(**inputs)
        >>> Policy().is_unsteered
        True
    """

    steerings: tuple[Steering, ...] = ()

    def __post_init__(self) -> None:
        stack = (self.steerings,) if isinstance(self.steerings, Steering) else tuple(self.steerings)
        bad = [type(s).__name__ for s in stack if not isinstance(s, Steering)]
        if bad:
            raise TypeError(f"a policy holds Steering objects, not {bad[0]}")
        object.__setattr__(self, "steerings", stack)

    @classmethod
    def of(cls, steering: Policy | Steering | Iterable[Steering] | None) -> Policy:
        """``steering`` as a policy: a policy as is, one steering, a list, or ``None``
        (the unsteered model)."""
        if isinstance(steering, Policy):
            return steering
        return cls(() if steering is None else steering)  # type: ignore[arg-type]

    # -- the sequence ----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.steerings)

    def __iter__(self) -> Iterator[Steering]:
        return iter(self.steerings)

    @overload
    def __getitem__(self, index: int) -> Steering: ...

    @overload
    def __getitem__(self, index: slice) -> Policy: ...

    def __getitem__(self, index: int | slice) -> Steering | Policy:
        if isinstance(index, slice):
            return Policy(self.steerings[index])
        return self.steerings[index]

    def __bool__(self) -> bool:
        return bool(self.steerings)

    @property
    def is_unsteered(self) -> bool:
        """True when applying the policy changes nothing: no steering has a layer."""
        return not any(s.functions for s in self.steerings)

    # -- copies ----------------------------------------------------------------------
    def scaled(self, multiplier: float) -> Policy:
        """A copy with every steering's strength times ``multiplier``."""
        return Policy(s.scaled(multiplier) for s in self.steerings)

    def with_positions(self, positions: str) -> Policy:
        """A copy with every steering applied at ``positions``."""
        return Policy(s.with_positions(positions) for s in self.steerings)

    def with_metadata(self, **values: Any) -> Policy:
        """A copy with ``values`` added to every steering's metadata."""
        return Policy(s.with_metadata(**values) for s in self.steerings)

    def appended(self, steering: Steering) -> Policy:
        """A copy with ``steering`` stacked on top."""
        return Policy((*self.steerings, steering))

    # -- use -------------------------------------------------------------------------
    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`SimsError` unless every steering was learned on ``model``."""
        for steering in self.steerings:
            steering.check_model(model)

    @contextmanager
    def applied(
        self,
        model: nn.Module,
        strength: float | None = None,
        positions: str | None = None,
        prompt_end: torch.Tensor | None = None,
        rows: RowSelector | None = None,
    ) -> Iterator[None]:
        """Apply every steering, in order, inside the block; hooks are always removed.

        Args:
            model: the ``nn.Module`` to steer (``lm.model``).
            strength: multiplier on each steering's own strength.
            positions: override every steering's positions.
            prompt_end: for teacher-forced forwards, where each row's response starts.
            rows: steer only the rows it selects before each forward.
        """
        with ExitStack() as stack:
            for steering in self.steerings:
                stack.enter_context(
                    steering.applied(
                        model, strength=strength, positions=positions, prompt_end=prompt_end, rows=rows
                    )
                )
            yield

    def additive_vectors(self) -> dict[int, torch.Tensor]:
        """The policy as one constant vector per layer added to the layer's output at
        every position, when it is that (the form llama.cpp control vectors and a baked
        MLP bias can hold); raise :class:`SimsError` saying why it is not.

        Additive edits at all positions commute, so a stack of them is their sum. The
        vectors are float32, with each steering's strength applied.
        """
        vectors: dict[int, torch.Tensor] = {}
        for steering in self.steerings:
            for layer, fn in steering.functions.items():
                if not isinstance(fn, AddVector) or fn.site != "residual":
                    raise SimsError(
                        f"layer {layer} of the {steering.learner} steering is a {fn.kind!r} function, "
                        "not a constant vector added to the layer output; only CAA/ActAdd-style "
                        "additive policies fit these formats (save others as steering folders)"
                    )
                if steering.positions != "all":
                    raise SimsError(
                        f"the {steering.learner} steering applies at {steering.positions!r} positions; "
                        "these formats add their vector at every position (positions 'all' only)"
                    )
                delta = fn.vector.detach().float() * float(steering.strength)
                vectors[layer] = vectors[layer] + delta if layer in vectors else delta.clone()
        return dict(sorted(vectors.items()))

    # -- persistence -----------------------------------------------------------------
    def save(
        self,
        path: str | Path,
        *,
        steps: bool | None = None,
        fingerprint: Mapping[str, Any] | None = None,
        learner: str = "none",
        metadata: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write the policy to the folder ``path`` in one step (crash-safe).

        The whole folder, a composed stack's ``step_<i>/`` included, is filled as a hidden
        temporary sibling and renamed into place; a policy or steering folder already at
        ``path`` is replaced as a whole (renamed aside, then deleted), so a reader sees the
        old policy or the new one, never a shorter stack.

        Args:
            steps: write ``step_<i>/`` folders; by default only when there is more than
                one steering.
            fingerprint: recorded for an empty policy, which is written as a steering
                without layers (then required).
            learner: recorded for an empty policy, as its learner's name.
            metadata: added to every saved steering's metadata (and the empty one's).

        Returns:
            ``path``.
        """
        path = Path(path)
        extra = dict(metadata or {})
        if self.steerings:
            stack = [s.with_metadata(**extra) if extra else s for s in self.steerings]
        else:
            if fingerprint is None:
                raise SimsError("saving an unsteered policy needs the model fingerprint")
            marker = {UNSTEERED_KEY: True, **extra}
            stack = [Steering({}, learner, dict(fingerprint), metadata=marker)]
        if steps is None:
            steps = len(stack) > 1
        if not steps and len(stack) != 1:
            raise SimsError(f"a policy of {len(stack)} steerings is saved as step folders (steps=True)")
        check_replaceable(path)
        with staged_dir(path) as tmp:
            if not steps:
                stack[0].write_files(tmp)
            for i, steering in enumerate(stack if steps else [], 1):
                (tmp / f"step_{i}").mkdir()
                steering.write_files(tmp / f"step_{i}")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        """Load a policy folder: one steering, or a composed stack saved as ``step_<i>/``.

        The unsteered marker (a steering without layers and with ``"unsteered": true``
        in its metadata, as runs save an unsteered final policy) loads as no steering.

        Example:
            >>> policy = Policy.load("runs/demo/final")
            >>> len(policy), policy.is_unsteered
        """
        path = Path(path)
        if (path / CONFIG_NAME).is_file() or not path.is_dir():
            found = [Steering.load(path)]
        else:
            folders = [p for p in path.glob("step_*") if p.name[5:].isdigit()]
            if not folders:
                raise SimsError(f"{path} is not a steering folder (no {CONFIG_NAME} and no step_<i>/)")
            found = [Steering.load(p) for p in sorted(folders, key=lambda p: int(p.name[5:]))]
        return cls(s for s in found if not _is_unsteered_marker(s))


def _is_unsteered_marker(steering: Steering) -> bool:
    return not steering.functions and bool(steering.metadata.get(UNSTEERED_KEY))


def load_policy(path: str | Path) -> Policy:
    """Load a saved policy (see :meth:`Policy.load`).

    Args:
        path: a steering folder, a folder of ``step_<i>/`` steering folders, or a
            steering folder's file.
    """
    return Policy.load(path)


#: A policy on the wire: per steering, its (config JSON, safetensors weights) bytes.
PolicyPayload = tuple[tuple[bytes, bytes], ...]


def policy_payload(policy: Policy | Sequence[Steering]) -> PolicyPayload:
    """The files of each steering of ``policy`` as bytes (the round trip of ``save``/``load``)."""
    out = []
    with tempfile.TemporaryDirectory(prefix="simsteer-policy-") as tmp:
        for i, steering in enumerate(policy):
            folder = Path(tmp) / str(i)
            folder.mkdir()
            steering.write_files(folder)
            out.append(((folder / CONFIG_NAME).read_bytes(), (folder / WEIGHTS_NAME).read_bytes()))
    return tuple(out)


def payload_key(payload: PolicyPayload) -> str:
    """A content hash of a policy payload (the workers cache the policy under it).

    The safetensors header is hashed with sorted keys: safetensors writes its metadata
    entries in a random order, so the same tensors can come as different bytes.
    """
    h = hashlib.sha256()
    for config, weights in payload:
        size = int.from_bytes(weights[:8], "little")
        header = json.dumps(json.loads(weights[8 : 8 + size]), sort_keys=True).encode()
        for part in (config, header, weights[8 + size :]):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
    return h.hexdigest()


def policy_from_payload(payload: PolicyPayload) -> Policy:
    """The policy of a payload, each steering loaded (and checked) as from its folder."""
    out = []
    with tempfile.TemporaryDirectory(prefix="simsteer-policy-") as tmp:
        for i, (config, weights) in enumerate(payload):
            folder = Path(tmp) / str(i)
            folder.mkdir()
            (folder / CONFIG_NAME).write_bytes(config)
            (folder / WEIGHTS_NAME).write_bytes(weights)
            out.append(Steering.load(folder))
    return Policy(tuple(out))
