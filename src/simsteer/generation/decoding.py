"""Choosing the next token: greedy, or a draw from the filtered distribution with one
uniform number per row taken from that row's own random stream.

Every sequence, a (prompt key, sample index) pair, owns a counter-based stream derived
from the run seed: the ``step``-th number of a stream depends only on ``(seed, key,
sample, step)``. Nothing depends on which rows share a batch, on the batch size or on how
the work is split between processes, so the same seed gives the same samples for any of
them (up to floating-point differences between batch shapes, which move a draw only when
its number falls within rounding of a boundary of the cumulative distribution).

A draw is an inverse-CDF lookup over the candidates left after temperature, top-k and
top-p, sorted by probability (top-k returns them sorted, so this costs nothing extra).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from ..errors import SimsError

_MASK64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """SplitMix64's finaliser: a bijective avalanche of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def stream_id(seed: int, key: int, sample: int) -> int:
    """The 64-bit identity of the random stream of sample ``sample`` of prompt ``key``."""
    return _mix(_mix(_mix(seed & _MASK64) ^ (key & _MASK64)) ^ (sample & _MASK64))


def stream_uniform(stream: int, step: int) -> float:
    """The ``step``-th number in [0, 1) of a stream (53 random bits)."""
    return (_mix(stream ^ _mix(step & _MASK64)) >> 11) * (1.0 / (1 << 53))


def uniforms(streams: Sequence[int], steps: Sequence[int]) -> torch.Tensor:
    """``[rows]`` float64 numbers, one per (stream, step)."""
    return torch.tensor(
        [stream_uniform(s, t) for s, t in zip(streams, steps, strict=True)], dtype=torch.float64
    )


def choose_tokens(
    logits: torch.Tensor,
    draws: torch.Tensor | None,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """The next token of each row.

    Args:
        logits: ``[rows, vocab]`` next-token logits.
        draws: ``[rows]`` uniforms in [0, 1) (ignored when greedy).
        temperature: 0 = greedy (argmax).
        top_k: keep the k most likely tokens (0 = all).
        top_p: keep the smallest set of most likely tokens whose probability reaches it.

    Returns:
        ``[rows]`` token ids.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    if draws is None:
        raise ValueError("sampling needs one uniform draw per row")
    # Ranking before scaling: a positive temperature keeps the order, so only the k kept
    # logits are converted and divided (not the whole [rows, vocab] block).
    if 0 < top_k < logits.shape[-1]:
        values, index = logits.topk(top_k, dim=-1)
    else:
        values, index = logits.sort(dim=-1, descending=True)
    values = values.float() / temperature
    probs = torch.softmax(values, dim=-1)
    if not bool(torch.isfinite(probs).all()):
        raise SimsError(
            "the model produced non-finite logits while sampling (is a steering strength too large?)"
        )
    if top_p < 1.0:
        before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(before >= top_p, 0.0)
    cdf = probs.double().cumsum(dim=-1)
    target = draws.to(cdf.device, torch.float64).unsqueeze(1) * cdf[:, -1:]
    choice = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)
    return index.gather(1, choice).squeeze(1)


class TokenSettings(Protocol):
    """What :func:`choose_rows` reads of a row's sampling settings (hashable)."""

    temperature: float
    top_k: int
    top_p: float


def choose_rows(
    logits: torch.Tensor,
    settings: Sequence[TokenSettings],
    streams: Sequence[int],
    steps: Sequence[int],
) -> list[int]:
    """The next token of rows that may sample with different settings: one
    :func:`choose_tokens` call per distinct setting, each row drawing the ``steps[i]``-th
    number of its stream ``streams[i]``.

    Args:
        logits: ``[rows, vocab]`` next-token logits.
        settings: each row's temperature, top-k and top-p.
        streams / steps: each row's random stream and the index of its draw (its tokens
            so far), so that a row's sample never depends on the other rows.
    """
    by_setting: dict[TokenSettings, list[int]] = {}
    for i, s in enumerate(settings):
        by_setting.setdefault(s, []).append(i)
    out = [0] * len(settings)
    for s, idx in by_setting.items():
        part = logits if len(idx) == len(settings) else logits[idx]
        draws = uniforms([streams[i] for i in idx], [steps[i] for i in idx]) if s.temperature > 0 else None
        chosen = choose_tokens(part, draws, s.temperature, s.top_k, s.top_p)
        for i, token in zip(idx, chosen.tolist(), strict=True):
            out[i] = token
    return out
