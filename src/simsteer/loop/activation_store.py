"""Persistence of :class:`~simsteer.learners.base.PreferenceActivations` in a run
directory: one safetensors file per iteration (summaries, group ids, token norms, and the
optional per-token and per-head activations), written atomically so ``--resume`` never
reads half a file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from ..activations import tensor_texts, texts_tensor
from ..errors import SimsError
from ..io import atomic_write_bytes
from ..learners.base import PreferenceActivations

#: The tensors every activations file holds.
REQUIRED = (
    "positive",
    "negative",
    "positive_groups",
    "negative_groups",
    "token_norms",
    "layers",
    "num_tokens",
)


def save_preference_activations(path: Path, data: PreferenceActivations, num_tokens: int) -> None:
    """Write ``data`` (and the forward token count) to one safetensors file, atomically.

    Raises:
        SimsError: an activation is NaN or infinite (the model overflowed, e.g. in fp16):
            nothing is written, so a resume does not learn from them again.
    """
    tensors = {
        "positive": data.positive.contiguous(),
        "negative": data.negative.contiguous(),
        "positive_groups": torch.tensor(data.positive_groups, dtype=torch.long),
        "negative_groups": torch.tensor(data.negative_groups, dtype=torch.long),
        "token_norms": data.token_norms.contiguous(),
        "layers": torch.tensor(data.layers, dtype=torch.long),
        "num_tokens": torch.tensor([num_tokens], dtype=torch.long),
    }
    # Optional per-token activations: concatenated, with each response's length.
    for name in ("positive_tokens", "negative_tokens"):
        seqs = getattr(data, name)
        if seqs is not None:
            empty = data.positive.new_zeros(0, *data.positive.shape[1:])
            tensors[name] = torch.cat([empty, *seqs]).contiguous()
            tensors[f"{name}_lengths"] = torch.tensor([len(x) for x in seqs], dtype=torch.long)
    for name in ("positive_heads", "negative_heads"):
        if getattr(data, name) is not None:
            tensors[name] = getattr(data, name).contiguous()
    for name in ("positive_texts", "negative_texts"):  # (prompt, response) texts, BiPO
        if getattr(data, name) is not None:
            tensors[name] = texts_tensor(getattr(data, name))
    if data.num_heads:
        tensors["num_heads"] = torch.tensor([data.num_heads], dtype=torch.long)
    bad = _non_finite(tensors)
    if bad:
        raise SimsError(
            f"the model produced NaN or infinite activations ({bad}); nothing was saved (try --dtype fp32)"
        )
    # Serialised in memory and committed by one rename (no fixed temporary name that two
    # writers could share).
    atomic_write_bytes(path, save(tensors))


def _non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or inf, else None."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def load_preference_activations(path: Path) -> tuple[PreferenceActivations, int]:
    """Read what :func:`save_preference_activations` wrote: (data, forward tokens).

    Raises:
        SimsError: the file is damaged, lacks a tensor, holds NaN / inf or tensors of
            inconsistent shapes (one line naming the file).
    """
    try:
        t = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise SimsError(f"{path} is not a readable activations file ({exc})") from None
    missing = [name for name in REQUIRED if name not in t]
    if missing:
        raise SimsError(f"{path} was not written by this simsteer version (missing {', '.join(missing)})")
    bad = _non_finite(t)
    if bad:
        raise SimsError(f"{path}: tensor {bad!r} holds NaN or infinite values")
    try:
        return _activations(t)
    except (KeyError, ValueError, RuntimeError, IndexError, TypeError) as exc:
        raise SimsError(f"{path} holds inconsistent activations ({exc})") from None


def _activations(t: dict[str, torch.Tensor]) -> tuple[PreferenceActivations, int]:
    extra: dict[str, Any] = {}
    for name in ("positive_tokens", "negative_tokens"):
        if name in t:
            extra[name] = list(torch.split(t[name], t[f"{name}_lengths"].tolist()))
    for name in ("positive_heads", "negative_heads"):
        if name in t:
            extra[name] = t[name]
    for name in ("positive_texts", "negative_texts"):
        if name in t:
            extra[name] = tensor_texts(t[name])
    if "num_heads" in t:
        extra["num_heads"] = int(t["num_heads"][0])
    data = PreferenceActivations(
        layers=t["layers"].tolist(),
        positive=t["positive"],
        negative=t["negative"],
        positive_groups=t["positive_groups"].tolist(),
        negative_groups=t["negative_groups"].tolist(),
        token_norms=t["token_norms"],
        **extra,
    )
    return data, int(t["num_tokens"][0])
