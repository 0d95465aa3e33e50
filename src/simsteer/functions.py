"""Steering functions: one layer's edit, its tensors, and how it applies itself.

A steering function maps a layer's hidden states ``[..., d] -> [..., d]`` at a *site*
(:data:`simsteer.hooks.SITES`). Every built-in kind lives here, below the learners that
fit them, so that :meth:`simsteer.steering.Steering.load` can rebuild any saved
function without importing a learner first:

- ``add``, :class:`AddVector` (residual): CAA, and ActAdd with ``mode=mean``;
- ``actadd``, :class:`PositionalAdd` (residual): ActAdd with ``mode=positions``;
- ``hpr``, :class:`HouseholderRotation` (residual): HPR;
- ``sea``, :class:`SpectralProjection` (residual): SEA;
- ``iti``, :class:`HeadShift` (``attn_heads``: the attention output projection's input): ITI.

A new kind subclasses :class:`SteeringFunction` with a unique ``kind``; it is found by
:func:`function_kind` as soon as its class is defined (no registry to fill).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SimsError
from .hooks import SITES, current_token_index

#: Most cast tensors a function keeps (a server asked for many strengths keeps the latest).
CAST_CACHE_SIZE = 8


class CastCache:
    """A small LRU of tensors cast for one (device, dtype, strength), so that decoding
    casts once per generation, not once per step, and a long-lived server that is asked
    for ever new strengths keeps at most :data:`CAST_CACHE_SIZE` of them."""

    def __init__(self, size: int = CAST_CACHE_SIZE) -> None:
        self.size = size
        self.items: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self.items)

    def get(self, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The tensor for ``key``, made with ``make()`` when missing (evicting the oldest)."""
        value = self.items.get(key)
        if value is None:
            value = self.items[key] = make()
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        else:
            self.items.move_to_end(key)
        return value


#: Tensor names of the HPR angle MLP, in ``nn.Linear`` layout.
HPR_MLP_NAMES = ("w1", "b1", "w2", "b2", "w3", "b3", "w4", "b4")
SEA_MODES = ("rescale", "average")


class SteeringFunction(nn.Module):
    """One layer's edit. Subclasses set ``kind`` (and ``site`` when not the residual
    stream), implement :meth:`edit` and store their parameters as buffers (so
    ``state_dict`` is what gets saved)."""

    kind: ClassVar[str] = ""
    #: Where the edit applies in its layer, one of :data:`simsteer.hooks.SITES`.
    site: ClassVar[str] = "residual"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.site not in SITES:
            raise TypeError(f"{cls.__name__}.site must be one of {', '.join(SITES)}, not {cls.site!r}")

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


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_subclasses(sub))
    return found


def function_kinds() -> dict[str, type[SteeringFunction]]:
    """Every defined steering-function class by its ``kind`` (the latest definition wins)."""
    return {sub.kind: sub for sub in _subclasses(SteeringFunction) if sub.kind}


def function_kind(kind: str) -> type[SteeringFunction]:
    """The class that rebuilds a saved function of ``kind``.

    Example:
        >>> function_kind("add")
        <class 'simsteer.functions.AddVector'>
    """
    kinds = function_kinds()
    if kind not in kinds:
        raise SimsError(f"unknown steering function kind {kind!r} (known: {sorted(kinds)})")
    return kinds[kind]


class AddVector(SteeringFunction):
    """``h <- h + strength * vector``: CAA's and ActAdd's edit."""

    kind = "add"

    def __init__(self, vector: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("vector", vector.detach().float().clone())
        self._cast = CastCache()

    def edit(self, hidden: torch.Tensor, strength: float) -> torch.Tensor:
        key = (hidden.device, hidden.dtype, float(strength))
        # Cast once per device, dtype and strength, not on every decoding step.
        delta = self._cast.get(
            key, lambda: (self.vector * strength).to(device=hidden.device, dtype=hidden.dtype)
        )
        return hidden + delta

    @classmethod
    def from_saved(cls, tensors: dict[str, torch.Tensor], params: dict[str, Any]) -> AddVector:
        if set(tensors) != {"vector"} or tensors["vector"].dim() != 1:
            raise ValueError("an 'add' function needs exactly one 1-D tensor named 'vector'")
        return cls(tensors["vector"])


class GatedAdd(SteeringFunction):
    """``h <- h + strength * vector`` only where ``h . condition > threshold``: a steering
    that acts on the inputs whose activation looks like the condition (the conditional
    CAA of :mod:`simsteer.learners.cast`). The gate is read per token from the state the
    edit receives, so the same function leaves other inputs untouched."""

    kind = "gated_add"

    def __init__(self, vector: torch.Tensor, condition: torch.Tensor, threshold: float) -> None:
        super().__init__()
        if vector.dim() != 1 or condition.shape != vector.shape:
            raise ValueError("a gated add needs a 1-D vector and a condition of the same size")
        self.threshold = float(threshold)
        self.register_buffer("vector", vector.detach().float().clone())
        self.register_buffer("condition", condition.detach().float().clone())

    def gate(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., 1]``: 1 where the state projects above the threshold, else 0."""
        projection = hidden.float() @ self.condition.to(hidden.device)
        return (projection > self.threshold).unsqueeze(-1)

    def edit(self, hidden: torch.Tensor, strength: float) -> torch.Tensor:
        if strength == 0:
            return hidden
        delta = (self.vector * strength).to(device=hidden.device, dtype=hidden.dtype)
        return hidden + self.gate(hidden).to(hidden.dtype) * delta

    def params(self) -> dict[str, Any]:
        return {"threshold": self.threshold}

    @classmethod
    def from_saved(cls, tensors: dict[str, torch.Tensor], params: dict[str, Any]) -> GatedAdd:
        if set(tensors) != {"vector", "condition"} or tensors["vector"].dim() != 1:
            raise ValueError("a 'gated_add' function needs 1-D tensors 'vector' and 'condition'")
        threshold = params.get("threshold")
        number = isinstance(threshold, int | float) and not isinstance(threshold, bool)
        if not number or not math.isfinite(threshold):
            raise ValueError("a 'gated_add' function needs a finite 'threshold'")
        return cls(tensors["vector"], tensors["condition"], float(threshold))


class PositionalAdd(SteeringFunction):
    """Adds row ``i`` of ``delta`` to the token at index ``offset + i`` of each sequence
    (ActAdd's edit; the index comes from :func:`simsteer.hooks.current_token_index`)."""

    kind = "actadd"

    def __init__(self, delta: torch.Tensor, offset: int = 0) -> None:
        super().__init__()
        if delta.dim() != 2:
            raise ValueError("ActAdd's delta is [T, d]")
        self.offset = int(offset)
        self.register_buffer("delta", delta.detach().float().clone())

    def edit(self, hidden: torch.Tensor, strength: float) -> torch.Tensor:
        if strength == 0:
            return hidden
        index = current_token_index()
        if index is None or index.shape != hidden.shape[:2]:
            # Called outside steer(): every row is one unpadded sequence from index 0.
            index = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[:2])
        rel = index.to(hidden.device) - self.offset
        inside = (rel >= 0) & (rel < len(self.delta))
        if not bool(inside.any()):
            return hidden  # decoding steps past the prompt's first tokens
        rows = self.delta.to(device=hidden.device)[rel.clamp(0, len(self.delta) - 1)]
        add = torch.where(inside.unsqueeze(-1), rows * strength, torch.zeros_like(rows))
        return hidden + add.to(hidden.dtype)

    def params(self) -> dict[str, Any]:
        return {"offset": self.offset}

    @classmethod
    def from_saved(cls, tensors: dict[str, torch.Tensor], params: dict[str, Any]) -> PositionalAdd:
        if set(tensors) != {"delta"} or tensors["delta"].dim() != 2:
            raise ValueError("an 'actadd' function needs one 2-D tensor named 'delta'")
        return cls(tensors["delta"], int(params.get("offset", 0)))


def householder_slerp(h: torch.Tensor, v: torch.Tensor, gamma1: torch.Tensor) -> torch.Tensor:
    """Rotate each row of ``h`` by ``gamma1`` toward its reflection ``Hh`` across ``v``'s
    hyperplane: ``(sin γ1 / sin γ2) Hh + (sin(γ2 - γ1) / sin γ2) h``, ``γ2 = ∠(h, Hh)``.

    Computed in the identical form ``|h| (cos γ1 û + sin γ1 ŵ)``, with ``û = h/|h|`` and ``ŵ``
    the unit direction of ``Hh``'s component orthogonal to ``h``, which is
    ``-sign(v·h) v⊥/|v⊥|`` (``v⊥``: ``v`` minus its projection on ``h``). The literal ratio
    loses all precision in float32 when ``h`` lies near the hyperplane (``γ2 -> 0`` while
    ``γ1`` stays large); this form keeps the norm to rounding error. Rows with no unique
    great circle (``h`` on the hyperplane, along ``v``, or zero) are returned unchanged.

    Args:
        h: ``[n, d]`` activations.
        v: ``[d]`` probe vector (the hyperplane's normal).
        gamma1: ``[n]`` rotation angles.
    """
    tiny = torch.finfo(h.dtype).tiny
    norm = h.norm(dim=-1, keepdim=True)
    u = h / norm.clamp_min(tiny)
    vu = u @ v
    v_perp = v - vu.unsqueeze(-1) * u
    perp = v_perp.norm(dim=-1, keepdim=True)
    w = -torch.sign(vu).unsqueeze(-1) * v_perp / perp.clamp_min(tiny)
    new = norm * (torch.cos(gamma1).unsqueeze(-1) * u + torch.sin(gamma1).unsqueeze(-1) * w)
    ok = (vu != 0) & (perp.squeeze(-1) > 1e-6 * v.norm()) & (norm.squeeze(-1) > 0)
    return torch.where(ok.unsqueeze(-1), new, h)


class HouseholderRotation(SteeringFunction):
    """One layer's HPR edit; ``v`` and the angle MLP are buffers (``w*`` in
    ``nn.Linear`` layout ``[out, in]``)."""

    kind = "hpr"

    def __init__(self, v: torch.Tensor, mlp: dict[str, torch.Tensor], alpha: float = 1.0) -> None:
        super().__init__()
        self.alpha = float(alpha)
        self.register_buffer("v", v.detach().float().clone())
        for name in HPR_MLP_NAMES:
            self.register_buffer(name, mlp[name].detach().float().clone())

    def probe_logit(self, h: torch.Tensor) -> torch.Tensor:
        """``v·h``; ``sigmoid`` of it is the probability of the preferred side."""
        return h.float() @ self.v

    def angle(self, h: torch.Tensor) -> torch.Tensor:
        """``θ(h) = π sigmoid(g(h)) ∈ (0, π)``."""
        x = h.float()
        x = F.gelu(F.linear(x, self.w1, self.b1))
        x = F.gelu(F.linear(x, self.w2, self.b2))
        x = F.gelu(F.linear(x, self.w3, self.b3))
        return math.pi * torch.sigmoid(F.linear(x, self.w4, self.b4).squeeze(-1))

    def edit(self, hidden: torch.Tensor, strength: float) -> torch.Tensor:
        if strength == 0:
            return hidden
        flat = hidden.reshape(-1, hidden.shape[-1])
        negative = self.probe_logit(flat) < 0  # sigmoid(v·h) < 1/2
        if not bool(negative.any()):
            return hidden
        # Only negative-side rows pay for the MLP (in generation: one row per step).
        x = flat[negative].float()
        gamma1 = self.alpha * strength * self.angle(x)
        out = flat.clone()
        out[negative] = householder_slerp(x, self.v, gamma1).to(hidden.dtype)
        return out.reshape(hidden.shape)

    def params(self) -> dict[str, Any]:
        return {"alpha": self.alpha}

    @classmethod
    def from_saved(cls, tensors: dict[str, torch.Tensor], params: dict[str, Any]) -> HouseholderRotation:
        missing = {"v", *HPR_MLP_NAMES} - set(tensors)
        if missing:
            raise ValueError(f"an 'hpr' function is missing tensors {sorted(missing)}")
        return cls(tensors["v"], {n: tensors[n] for n in HPR_MLP_NAMES}, float(params.get("alpha", 1.0)))


class SpectralProjection(SteeringFunction):
    """``x' = P+ x + P- x`` (rescaled per token, or averaged), blended by strength
    (SEA's edit; ``P- = I - U-_head U-_headᵀ``, see :mod:`simsteer.learners.sea`)."""

    kind = "sea"

    def __init__(self, u_pos: torch.Tensor, u_neg: torch.Tensor, mode: str = "rescale") -> None:
        super().__init__()
        if mode not in SEA_MODES:
            raise SimsError(f"unknown SEA mode {mode!r}: use one of {', '.join(SEA_MODES)}")
        self.mode = mode
        self.register_buffer("u_pos", u_pos.detach().float().clone())
        self.register_buffer("u_neg", u_neg.detach().float().clone())
        self._cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def projection(self) -> torch.Tensor:
        """Dense ``P = P+ + P-`` in float64 (``P- = I - U-_head U-_headᵀ``)."""
        up, un = self.u_pos.double(), self.u_neg.double()
        eye = torch.eye(up.shape[0], dtype=torch.float64, device=up.device)
        return up @ up.T + eye - un @ un.T

    def edit(self, hidden: torch.Tensor, strength: float) -> torch.Tensor:
        if strength == 0:
            return hidden
        key = (hidden.device, hidden.dtype)
        p = self._cache.get(key)
        if p is None:
            # Built once per device/dtype; float32 unless the model runs in float64.
            dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
            p = self.projection().to(device=hidden.device, dtype=dtype)
            self._cache[key] = p
        x = hidden.to(p.dtype)
        edited = x @ p  # P is symmetric
        if self.mode == "rescale":
            norm = edited.norm(dim=-1, keepdim=True)
            edited = edited * (x.norm(dim=-1, keepdim=True) / norm.clamp_min(torch.finfo(p.dtype).tiny))
        else:
            edited = edited / 2
        return (x + strength * (edited - x)).to(hidden.dtype)

    def params(self) -> dict[str, Any]:
        return {"mode": self.mode}

    @classmethod
    def from_saved(cls, tensors: dict[str, torch.Tensor], params: dict[str, Any]) -> SpectralProjection:
        if set(tensors) != {"u_pos", "u_neg"}:
            raise ValueError("a 'sea' function needs tensors 'u_pos' and 'u_neg'")
        return cls(tensors["u_pos"], tensors["u_neg"], params.get("mode", "rescale"))


class HeadShift(SteeringFunction):
    """Adds ``α σ_h θ̂_h`` to the kept heads' slices of o_proj's input (ITI's edit)."""

    kind = "iti"
    site = "attn_heads"  # a pre-hook on the attention output projection

    def __init__(self, directions: torch.Tensor, sigmas: torch.Tensor, alpha: float = 15.0) -> None:
        super().__init__()
        if directions.dim() != 2 or sigmas.shape != directions.shape[:1]:
            raise ValueError("ITI needs directions [heads, head_dim] and sigmas [heads]")
        self.alpha = float(alpha)
        self.register_buffer("directions", directions.detach().float().clone())
        self.register_buffer("sigmas", sigmas.detach().float().clone())
        self._cast = CastCache()

    @property
    def heads(self) -> list[int]:
        """Indices of the shifted heads (those with a nonzero shift)."""
        return torch.nonzero(self.sigmas * self.directions.norm(dim=-1)).flatten().tolist()

    def shift(self, strength: float = 1.0) -> torch.Tensor:
        """δ, the ``[heads * head_dim]`` vector added to o_proj's input."""
        return (self.alpha * strength * self.sigmas.unsqueeze(-1) * self.directions).flatten()

    def edit(self, hidden: torch.Tensor, strength: float) -> torch.Tensor:
        if strength == 0:
            return hidden
        key = (hidden.device, hidden.dtype, float(strength))
        # Cast once per device, dtype and strength, not per decoding step.
        delta = self._cast.get(key, lambda: self.shift(strength).to(device=hidden.device, dtype=hidden.dtype))
        return hidden + delta

    def params(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "heads": self.heads}

    @classmethod
    def from_saved(cls, tensors: dict[str, torch.Tensor], params: dict[str, Any]) -> HeadShift:
        if set(tensors) != {"directions", "sigmas"}:
            raise ValueError("an 'iti' function needs tensors 'directions' and 'sigmas'")
        return cls(tensors["directions"], tensors["sigmas"], float(params.get("alpha", 15.0)))
