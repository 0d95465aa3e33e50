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
from .hooks import decoder_module, record
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
