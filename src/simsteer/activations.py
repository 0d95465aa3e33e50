"""Layer activations of (prompt, response) pairs under the *unsteered* model.

One batched forward through the decoder stack only: the LM head is never run (for 16 x
256 tokens its logits alone would take 768 MB on the embedded model). Each response is
summarised per layer as the mean of its token activations (default) or its last token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .errors import SimsError
from .hooks import decoder_module, num_attention_heads, record
from .models import LoadedModel, encode_prompt, left_pad

SUMMARIES = ("mean", "last")


@dataclass(frozen=True)
class ResponseActivations:
    """Summaries ``[n, len(layers), d]`` (float32) plus the mean single-token norm per
    layer and the number of response tokens that went through the model."""

    layers: list[int]
    summaries: torch.Tensor
    token_norms: torch.Tensor
    num_tokens: int


def collect_activations(
    lm: LoadedModel,
    prompts: list[str],
    responses: list[str],
    layers: list[int],
    summary: str = "mean",
    batch_size: int = 16,
    max_response_tokens: int | None = None,
    progress: bool | str = False,
) -> ResponseActivations:
    """Summarise each response's activations at ``layers`` (outputs of those decoder
    layers, i.e. ``hidden_states[l + 1]``).

    An empty response has no tokens to average: its summary is the last prompt token's
    activation (the state from which the model chose to stop).
    """
    if summary not in SUMMARIES:
        raise SimsError(f"unknown activation summary {summary!r}: use one of {', '.join(SUMMARIES)}")
    if len(prompts) != len(responses):
        raise ValueError("one prompt per response is needed")
    tok = lm.tokenizer
    rows: list[tuple[list[int], int]] = []
    for prompt, response in zip(prompts, responses, strict=True):
        p = encode_prompt(tok, prompt)
        r = list(tok(response, add_special_tokens=False)["input_ids"]) if response else []
        if max_response_tokens is not None:
            r = r[:max_response_tokens]
        rows.append((p + r, len(r)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    d = lm.hidden_size
    out = torch.zeros(len(rows), len(layers), d, dtype=torch.float32)
    norm_sum = torch.zeros(len(layers), dtype=torch.float64)
    norm_count = 0
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    decoder = decoder_module(lm.model)
    label = progress if isinstance(progress, str) else "activations"
    total_tokens = 0
    with (
        torch.inference_mode(),
        tqdm(total=len(rows), desc=label, unit="seq", disable=not progress, leave=False) as bar,
    ):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, mask = left_pad([rows[i][0] for i in idx], pad)
            width = ids.shape[1]
            resp_len = torch.tensor([rows[i][1] for i in idx])
            # Response tokens sit at the right end of each left-padded row.
            positions = torch.arange(width).view(1, -1)
            in_resp = positions >= (width - resp_len).view(-1, 1)
            empty = resp_len == 0
            in_resp[empty, -1] = True  # fall back to the last prompt token
            if summary == "last":
                in_resp = torch.zeros_like(in_resp)
                in_resp[:, -1] = True
            weights = in_resp.float() / in_resp.sum(1, keepdim=True).float()
            with record(lm.model, layers) as acts:
                decoder(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False)
            for j, layer in enumerate(layers):
                h = acts[layer][0].float().cpu()  # [b, width, d]
                out[idx, j] = torch.einsum("bt,btd->bd", weights, h)
                tok_mask = in_resp & ~empty.view(-1, 1)
                if tok_mask.any():
                    norm_sum[j] += h[tok_mask].norm(dim=-1).double().sum()
            norm_count += int((in_resp & ~empty.view(-1, 1)).sum())
            total_tokens += int(mask.sum())
            bar.update(len(idx))
    token_norms = (norm_sum / max(norm_count, 1)).float()
    return ResponseActivations(
        layers=list(layers), summaries=out, token_norms=token_norms, num_tokens=total_tokens
    )


def _encode_rows(
    lm: LoadedModel, prompts: list[str], responses: list[str], max_response_tokens: int | None
) -> list[tuple[list[int], int]]:
    """(prompt + response ids, response length) per pair, the response capped."""
    if len(prompts) != len(responses):
        raise ValueError("one prompt per response is needed")
    rows = []
    for prompt, response in zip(prompts, responses, strict=True):
        p = encode_prompt(lm.tokenizer, prompt)
        r = list(lm.tokenizer(response, add_special_tokens=False)["input_ids"]) if response else []
        if max_response_tokens is not None:
            r = r[:max_response_tokens]
        rows.append((p + r, len(r)))
    return rows


def collect_token_activations(
    lm: LoadedModel,
    prompts: list[str],
    responses: list[str],
    layers: list[int],
    batch_size: int = 16,
    max_response_tokens: int | None = 32,
    site: str = "residual",
    progress: bool | str = False,
) -> list[torch.Tensor]:
    """Per-token activations of each response at ``layers``.

    Memory is bounded by ``n x max_response_tokens x len(layers) x d`` float32 values.

    Args:
        max_response_tokens: keep each response's first tokens only (``None``: all).
        site: ``"residual"`` (layer outputs) or ``"attn_heads"`` (o_proj inputs).

    Returns:
        one ``[T_i, len(layers), d]`` float32 tensor per response (``T_i = 0`` for an
        empty response), in input order.

    Example:
        >>> toks = collect_token_activations(lm, ["Hi"], ["Hello there"], [3, 4])
        >>> toks[0].shape  # [T, 2, d]
    """
    rows = _encode_rows(lm, prompts, responses, max_response_tokens)
    out: list[torch.Tensor | None] = [None] * len(rows)
    for idx, width, acts in _batched_forward(lm, rows, layers, batch_size, site, progress):
        stacked = torch.stack([acts[layer][0] for layer in layers], dim=2).float().cpu()  # [b, w, L, d]
        for row, i in enumerate(idx):
            n = rows[i][1]
            # Response tokens sit at the right end of each left-padded row.
            out[i] = stacked[row, width - n :].clone() if n else stacked.new_zeros(0, *stacked.shape[2:])
    return [t for t in out if t is not None]


def collect_head_activations(
    lm: LoadedModel,
    prompts: list[str],
    responses: list[str],
    layers: list[int],
    batch_size: int = 16,
    progress: bool | str = False,
) -> torch.Tensor:
    """Inputs of the attention output projection (the concatenated head outputs, before
    o_proj) at the last token of each (prompt, response): ``[n, len(layers), H * d_head]``
    float32. An empty response gives the last prompt token (ITI's convention)."""
    rows = _encode_rows(lm, prompts, responses, None)
    out: torch.Tensor | None = None
    for idx, _, acts in _batched_forward(lm, rows, layers, batch_size, "attn_heads", progress):
        last = torch.stack([acts[layer][0][:, -1] for layer in layers], dim=1).float().cpu()
        if out is None:
            out = torch.zeros(len(rows), len(layers), last.shape[-1])
        out[idx] = last
    assert out is not None
    return out


def _batched_forward(
    lm: LoadedModel,
    rows: list[tuple[list[int], int]],
    layers: list[int],
    batch_size: int,
    site: str,
    progress: bool | str,
):
    """Yield ``(row indices, padded width, recorded activations)`` per batch, longest
    sequences first (tight batches); decoder stack only, no LM head."""
    if not rows:
        raise SimsError("no (prompt, response) pairs to collect activations from")
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    decoder = decoder_module(lm.model)
    label = progress if isinstance(progress, str) else "activations"
    with (
        torch.inference_mode(),
        tqdm(total=len(rows), desc=label, unit="seq", disable=not progress, leave=False) as bar,
    ):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, mask = left_pad([rows[i][0] for i in idx], pad)
            with record(lm.model, layers, site=site) as acts:
                decoder(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False)
            yield idx, ids.shape[1], acts
            bar.update(len(idx))


def collect_extra_activations(
    lm: LoadedModel,
    kind: str,
    prompts: list[str],
    responses: list[str],
    layers: list[int],
    num_positive: int,
    batch_size: int = 16,
    max_response_tokens: int | None = 32,
    progress: bool | str = False,
) -> dict[str, object]:
    """What a learner with ``summary = kind`` needs beyond the summaries, as
    :class:`~simsteer.learners.base.PreferenceActivations` fields; the first
    ``num_positive`` pairs are the positives. Empty for ``"mean"``/``"last"``."""
    if kind == "tokens":
        toks = collect_token_activations(
            lm, prompts, responses, layers, batch_size, max_response_tokens, progress=progress
        )
        return {"positive_tokens": toks[:num_positive], "negative_tokens": toks[num_positive:]}
    if kind == "heads":
        heads = collect_head_activations(lm, prompts, responses, layers, batch_size, progress)
        return {
            "positive_heads": heads[:num_positive],
            "negative_heads": heads[num_positive:],
            "num_heads": num_attention_heads(lm.model),
        }
    if kind in SUMMARIES:
        return {}
    raise SimsError(f"unknown learner activation kind {kind!r}")
