"""What travels between the driver and the workers, and how work is cut into shards.

Steerings and activations cross as safetensors bytes (plus JSON), never as pickled
tensors. Work is cut so that each piece is computed exactly as in one process: prompts
into contiguous shards that keep their global stream keys, activation collection into
the very batches :func:`simsteer.tokens.teacher_forced` would form.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ..steering import CONFIG_NAME, WEIGHTS_NAME, Steering

#: A policy on the wire: per steering, its (config JSON, safetensors weights) bytes.
PolicyPayload = tuple[tuple[bytes, bytes], ...]


def policy_payload(policy: Sequence[Steering]) -> PolicyPayload:
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


def load_policy(payload: PolicyPayload) -> list[Steering]:
    """The steerings of a payload, loaded (and checked) as from their folders."""
    out = []
    with tempfile.TemporaryDirectory(prefix="simsteer-policy-") as tmp:
        for i, (config, weights) in enumerate(payload):
            folder = Path(tmp) / str(i)
            folder.mkdir()
            (folder / CONFIG_NAME).write_bytes(config)
            (folder / WEIGHTS_NAME).write_bytes(weights)
            out.append(Steering.load(folder))
    return out


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
