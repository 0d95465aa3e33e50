"""What travels between the driver and the workers, and how work is cut into shards.

Steerings and activations cross as safetensors bytes (plus JSON), never as pickled
tensors. Work is cut so that each piece is computed exactly as in one process: prompts
into contiguous shards that keep their global stream keys, activation collection into
the very batches :func:`simsteer.tokens.teacher_forced` would form.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ..policy import PolicyPayload, payload_key, policy_from_payload, policy_payload
from ..steering import Steering

__all__ = ["PolicyPayload", "load_policy", "payload_key", "policy_payload"]


def load_policy(payload: PolicyPayload) -> list[Steering]:
    """The steerings of a payload, loaded (and checked) as from their folders."""
    return list(policy_from_payload(payload).steerings)


def tensors_to_bytes(tensors: dict[str, torch.Tensor], meta: dict | None = None) -> bytes:
    """Tensors (and a small JSON-ready dict) as safetensors bytes."""
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return save_safetensors(flat, metadata={"meta": json.dumps(meta or {})})


def bytes_to_tensors(data: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    """What :func:`tensors_to_bytes` wrote."""
    # safetensors: an 8-byte little-endian header length, then the JSON header.
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    return load_safetensors(data), json.loads(header.get("__metadata__", {}).get("meta", "{}"))


def shards(n: int, parts: int) -> list[range]:
    """``range(n)`` cut into at most ``parts`` contiguous, non-empty, near-equal shards."""
    parts = max(1, min(parts, n))
    size, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + size + (i < extra)
        out.append(range(start, stop))
        start = stop
    return [r for r in out if len(r)]


@dataclass(frozen=True)
class ForwardBatch:
    """One teacher-forced batch of a collection pass: the pair indices, in batch order."""

    index: list[int]


def forward_batches(lengths: Sequence[int], batch_size: int) -> list[ForwardBatch]:
    """The batches :func:`simsteer.tokens.teacher_forced` forms (longest first, stable).

    Given the rows of one batch in this order and ``batch_size >= len(batch)``,
    ``teacher_forced`` forms that same batch again, so a worker computes it bit for bit
    as the single process would.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [ForwardBatch(order[s : s + batch_size]) for s in range(0, len(order), batch_size)]
