"""Layer activations of (prompt, response) pairs under the *unsteered* model, and the
D+ / D- data learners fit on (:class:`PreferenceActivations`).

Every collection is one teacher-forced forward through the decoder stack
(:func:`~simsteer.tokens.teacher_forced`; the LM head never runs) with the layers
recorded. Each response is summarised per layer as the mean of its token activations
(default) or its last token; learners that need more also get per-token or per-head
activations. :func:`collect_preference_activations` is the one path from labelled
answers to a learner's input, shared by the SIMS loop and the MS baseline.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .architecture import num_attention_heads
from .errors import SimsError
from .hooks import record
from .models import LoadedModel
from .tokens import TokenRow, encode_pairs, teacher_forced

SUMMARIES = ("mean", "last")
#: What a learner can need (``Learner.needs``): the summaries only, also per-token or
#: per-head activations, also the (prompt, response) texts (learners that run the model
#: themselves, BiPO), or nothing at all ("mean"/"last" are old names of "summaries").
NEEDS = ("summaries", *SUMMARIES, "tokens", "heads", "texts", "none")


@dataclass(frozen=True)
class ResponseActivations:
    """Summaries ``[n, len(layers), d]`` (float32) plus the mean single-token norm per
    layer and the number of response tokens that went through the model; ``norm_sum``
    (float64) and ``norm_count`` are the mean's sum and count, so that collections of
    separate batches add up to the same norms (:mod:`simsteer.workers`)."""

    layers: list[int]
    summaries: torch.Tensor
    token_norms: torch.Tensor
    num_tokens: int
    norm_sum: torch.Tensor | None = None
    norm_count: int = 0


@dataclass(frozen=True)
class PreferenceActivations:
    """Per-layer activation summaries of D+ and D- responses.

    Attributes:
        layers: the model layers the summaries come from (``hidden_states[l + 1]``).
        positive: ``[n_pos, len(layers), d]`` float32 summaries of preferred responses.
        negative: ``[n_neg, len(layers), d]`` for dispreferred responses.
        positive_groups / negative_groups: prompt index of each row, for pairing.
        token_norms: ``[len(layers)]`` mean L2 norm of single-token activations, the
            scale against which relative strengths are expressed.
        positive_tokens / negative_tokens: per response, ``[T_i, len(layers), d]``
            activations of its first response tokens (learners with ``needs =
            "tokens"``, e.g. HPR); ``None`` when not collected.
        positive_heads / negative_heads: ``[n, len(layers), heads * head_dim]`` inputs of
            the attention output projection at each sequence's last token (learners
            with ``needs = "heads"``, e.g. ITI); ``None`` when not collected.
        num_heads: attention heads per layer (with the head activations).
        positive_texts / negative_texts: per response, its ``(prompt, response)`` texts
            (learners with ``needs = "texts"``, e.g. BiPO); ``None`` when not collected.
    """

    layers: list[int]
    positive: torch.Tensor
    negative: torch.Tensor
    positive_groups: list[int]
    negative_groups: list[int]
    token_norms: torch.Tensor
    positive_tokens: list[torch.Tensor] | None = None
    negative_tokens: list[torch.Tensor] | None = None
    positive_heads: torch.Tensor | None = None
    negative_heads: torch.Tensor | None = None
    num_heads: int = 0
    positive_texts: list[tuple[str, str]] | None = None
    negative_texts: list[tuple[str, str]] | None = None

    def __post_init__(self) -> None:
        if self.positive.shape[1:] != self.negative.shape[1:]:
            raise ValueError("positive and negative activations have different shapes")
        if len(self.positive_groups) != len(self.positive) or len(self.negative_groups) != len(self.negative):
            raise ValueError("one group id is needed per activation row")
        for name, rows in (
            ("positive_tokens", len(self.positive)),
            ("negative_tokens", len(self.negative)),
            ("positive_heads", len(self.positive)),
            ("negative_heads", len(self.negative)),
            ("positive_texts", len(self.positive)),
            ("negative_texts", len(self.negative)),
        ):
            extra = getattr(self, name)
            if extra is not None and len(extra) != rows:
                raise ValueError(f"{name} needs one entry per activation row ({len(extra)} != {rows})")

    def at(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(positive, negative) summaries at model layer ``layer``."""
        i = self.layers.index(layer)
        return self.positive[:, i], self.negative[:, i]


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

    Args:
        summary: ``"mean"`` over the response's tokens or its ``"last"`` token.
        max_response_tokens: keep each response's first tokens only (``None``: all).
        progress: show a progress bar (a string is used as its label).

    Example:
        >>> acts = collect_activations(lm, ["Hi"], ["Hello there"], [3, 4])
        >>> acts.summaries.shape  # [1, 2, d]
    """
    if summary not in SUMMARIES:
        raise SimsError(f"unknown activation summary {summary!r}: use one of {', '.join(SUMMARIES)}")
    rows = encode_pairs(lm.tokenizer, prompts, responses, max_response_tokens)
    out = torch.zeros(len(rows), len(layers), lm.hidden_size, dtype=torch.float32)
    norm_sum = torch.zeros(len(layers), dtype=torch.float64)
    norm_count = 0
    total_tokens = 0
    batches = teacher_forced(
        lm,
        rows,
        batch_size,
        hooks=lambda _: record(lm.model, layers),
        stop_after=max(layers, default=None),  # the layers above the deepest one read do not run
        progress=progress,
        desc="activations",
    )
    with torch.inference_mode():
        for batch in batches:
            idx, width = batch.index, batch.width
            resp_len = torch.tensor(batch.response_lens)
            # Response tokens sit at the right end of each left-padded row.
            positions = torch.arange(width).view(1, -1)
            in_resp = positions >= (width - resp_len).view(-1, 1)
            empty = resp_len == 0
            in_resp[empty, -1] = True  # fall back to the last prompt token
            if summary == "last":
                in_resp = torch.zeros_like(in_resp)
                in_resp[:, -1] = True
            weights = in_resp.float() / in_resp.sum(1, keepdim=True).float()
            for j, layer in enumerate(layers):
                h = batch.recorded[layer][0].float().cpu()  # [b, width, d]
                out[idx, j] = torch.einsum("bt,btd->bd", weights, h)
                tok_mask = in_resp & ~empty.view(-1, 1)
                if tok_mask.any():
                    norm_sum[j] += h[tok_mask].norm(dim=-1).double().sum()
            norm_count += int((in_resp & ~empty.view(-1, 1)).sum())
            total_tokens += batch.num_tokens
    token_norms = (norm_sum / max(norm_count, 1)).float()
    return ResponseActivations(
        layers=list(layers),
        summaries=out,
        token_norms=token_norms,
        num_tokens=total_tokens,
        norm_sum=norm_sum,
        norm_count=norm_count,
    )


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
    rows = _rows(lm, prompts, responses, max_response_tokens)
    out: list[torch.Tensor | None] = [None] * len(rows)
    with torch.inference_mode():
        for batch in _recorded(lm, rows, layers, batch_size, site, progress):
            acts = batch.recorded
            stacked = torch.stack([acts[layer][0] for layer in layers], dim=2).float().cpu()  # [b, w, L, d]
            for row, i in enumerate(batch.index):
                n = rows[i].response_len
                # Response tokens sit at the right end of each left-padded row.
                out[i] = (
                    stacked[row, batch.width - n :].clone() if n else stacked.new_zeros(0, *stacked.shape[2:])
                )
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
    rows = _rows(lm, prompts, responses, None)
    out: torch.Tensor | None = None
    with torch.inference_mode():
        for batch in _recorded(lm, rows, layers, batch_size, "attn_heads", progress):
            acts = batch.recorded
            last = torch.stack([acts[layer][0][:, -1] for layer in layers], dim=1).float().cpu()
            if out is None:
                out = torch.zeros(len(rows), len(layers), last.shape[-1])
            out[batch.index] = last
    assert out is not None
    return out


def _rows(
    lm: LoadedModel, prompts: list[str], responses: list[str], max_response_tokens: int | None
) -> list[TokenRow]:
    rows = encode_pairs(lm.tokenizer, prompts, responses, max_response_tokens)
    if not rows:
        raise SimsError("no (prompt, response) pairs to collect activations from")
    return rows


def _recorded(
    lm: LoadedModel,
    rows: list[TokenRow],
    layers: list[int],
    batch_size: int,
    site: str,
    progress: bool | str,
):
    """The teacher-forced batches with ``layers`` recorded at ``site``."""
    return teacher_forced(
        lm,
        rows,
        batch_size,
        hooks=lambda _: record(lm.model, layers, site=site),
        stop_after=max(layers, default=None),
        progress=progress,
        desc="activations",
    )


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
    """What a learner with ``needs = kind`` needs beyond the summaries, as
    :class:`PreferenceActivations` fields; the first ``num_positive`` pairs are the
    positives. Empty for ``"mean"``/``"last"``."""
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
    if kind == "texts":  # no forward: the learner runs the model on the texts itself
        texts = list(zip(prompts, responses, strict=True))
        return {"positive_texts": texts[:num_positive], "negative_texts": texts[num_positive:]}
    if kind == "summaries" or kind in SUMMARIES:
        return {}
    raise SimsError(f"unknown learner activation kind {kind!r}")


def check_collection(needs: str, prompts: Sequence[str], groups: Sequence[int]) -> None:
    """Refuse an unknown ``needs``, and (unless ``"none"``) groups not aligned with the answers."""
    if needs not in NEEDS:
        raise SimsError(f"unknown learner activation kind {needs!r}: use one of {', '.join(NEEDS)}")
    if needs != "none" and len(groups) != len(prompts):
        raise ValueError("one group id per answer is needed")


def no_preference_activations(layers: list[int], hidden_size: int) -> PreferenceActivations:
    """The empty data of a learner that needs none (``needs = "none"``)."""
    empty = torch.zeros(0, len(layers), hidden_size)
    return PreferenceActivations(layers, empty, empty, [], [], torch.zeros(len(layers)))


def collect_preference_activations(
    lm: LoadedModel,
    needs: str,
    prompts: list[str],
    responses: list[str],
    num_positive: int,
    groups: list[int],
    layers: list[int],
    *,
    summary: str = "mean",
    batch_size: int = 16,
    max_response_tokens: int = 32,
    summary_max_tokens: int | None = None,
    progress: bool | str = False,
) -> tuple[PreferenceActivations, int]:
    """A learner's input from labelled answers: the summaries of every answer plus what
    the learner ``needs`` beyond them (the one path of the SIMS loop and the MS baseline).

    Args:
        needs: the learner's ``needs``: ``"summaries"`` (summaries only),
            ``"tokens"``, ``"heads"``, ``"texts"``, or ``"none"`` (no forward at all:
            empty data).
        prompts / responses: the answers, the ``num_positive`` first ones D+, the rest D-.
        groups: prompt group of each answer (for pairing learners), aligned with them.
        layers: model layers to read.
        summary: per-answer summary, ``"mean"`` or ``"last"`` (the loop's setting).
        max_response_tokens: response tokens kept per answer for per-token activations.
        summary_max_tokens: response tokens kept per answer for the summaries
            (``None``: all, as in the loop).
        progress: show progress bars (a string is used as their label).

    Returns:
        the data and the number of tokens of the summaries' forward.

    Example:
        >>> data, tokens = collect_preference_activations(
        ...     lm, learner.needs, prompts, answers, n_pos, groups, [3, 4])
        >>> steering = learner.fit(data, lm.fingerprint())
    """
    check_collection(needs, prompts, groups)
    if needs == "none":
        return no_preference_activations(layers, lm.hidden_size), 0
    acts = collect_activations(
        lm,
        prompts,
        responses,
        layers,
        summary=summary,
        batch_size=batch_size,
        max_response_tokens=summary_max_tokens,
        progress=progress,
    )
    # Per-token / per-head activations, only for learners that ask (HPR, ITI).
    extra = collect_extra_activations(
        lm,
        needs,
        prompts,
        responses,
        layers,
        num_positive,
        batch_size=batch_size,
        max_response_tokens=max_response_tokens,
        progress=f"{progress} {needs}" if isinstance(progress, str) else progress,
    )
    data = PreferenceActivations(
        layers=layers,
        positive=acts.summaries[:num_positive],
        negative=acts.summaries[num_positive:],
        positive_groups=groups[:num_positive],
        negative_groups=groups[num_positive:],
        token_norms=acts.token_norms,
        **extra,  # type: ignore[arg-type]
    )
    return data, acts.num_tokens


def texts_tensor(texts: list[tuple[str, str]]) -> torch.Tensor:
    """``(prompt, response)`` texts as one uint8 tensor of UTF-8 JSON, so that they are
    saved with the activations (safetensors holds tensors only); :func:`tensor_texts`
    reads them back."""
    return torch.frombuffer(bytearray(json.dumps(texts).encode()), dtype=torch.uint8).clone()


def tensor_texts(tensor: torch.Tensor) -> list[tuple[str, str]]:
    """The ``(prompt, response)`` texts :func:`texts_tensor` stored."""
    return [(p, r) for p, r in json.loads(tensor.numpy().tobytes().decode())]
