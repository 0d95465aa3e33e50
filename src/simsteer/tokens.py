"""Tokens in and out of the model: the prompt format, encoding, padding, the ids that end
a response, and the one *teacher-forced* forward.

A teacher-forced forward runs known token rows (a prompt followed by a response) through
the model in batches: rows sorted longest first (tight batches; the sort is stable, so
the batches are the same on every call), padded, run through the decoder stack only (no
LM head: for 16 x 256 tokens the logits alone would take 768 MB on the embedded model)
or through the whole model where next-token logits are the point. Activation
collection, perplexities, multiple-choice log-likelihoods and the self-judge's verdict
likelihoods all use :func:`teacher_forced`; each reads what it needs from the
:class:`ForwardBatch` it yields (the recorded activations, the response positions, the
logits predicting the response).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .architecture import decoder_module, find_layers
from .models import LoadedModel

# Plain prompt format for models without a chat template (documented in the README).
PLAIN_FORMAT = "### Instruction:\n{prompt}\n\n### Response:\n"

PADDING_SIDES = ("left", "right")


def format_prompt(tokenizer: Any, prompt: str) -> str:
    """A user prompt in the model's chat template, or :data:`PLAIN_FORMAT` without one.

    Args:
        tokenizer: the model's tokenizer (its ``chat_template`` decides the format).
        prompt: the user's text.

    Example:
        >>> format_prompt(lm.tokenizer, "Name a colour.")
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return PLAIN_FORMAT.format(prompt=prompt)


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a user prompt in the model's prompt format.

    A chat template already writes any BOS token as text, so special tokens are added
    only for the plain format.

    Args:
        tokenizer: the model's tokenizer.
        prompt: the user's text (formatted here).
    """
    chat = bool(getattr(tokenizer, "chat_template", None))
    text = format_prompt(tokenizer, prompt)
    return list(tokenizer(text, add_special_tokens=not chat)["input_ids"])


def encode_response(tokenizer: Any, response: str) -> list[int]:
    """Token ids of a response as it follows its prompt (no special tokens; none for ``""``)."""
    return list(tokenizer(response, add_special_tokens=False)["input_ids"]) if response else []


def eos_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """Every token id that ends a response (generation config and tokenizer).

    Args:
        model: the causal LM (its ``generation_config`` is read).
        tokenizer: its tokenizer.
    """
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    value = getattr(gen, "eos_token_id", None) if gen is not None else None
    for v in value if isinstance(value, list) else [value]:
        if v is not None:
            ids.append(int(v))
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return sorted(set(ids))


def pad_token_id(tokenizer: Any, fallback: int = 0) -> int:
    """The tokenizer's pad id, else ``fallback`` (masked out either way)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else fallback


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``(input_ids, attention_mask)``."""
    return pad_sequences(sequences, pad_id, "left")


def pad_sequences(
    sequences: list[list[int]], pad_id: int, side: str = "left"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists into ``(input_ids, attention_mask)`` (long tensors on the CPU).

    Args:
        sequences: token lists of any lengths.
        pad_id: the id written in padding positions.
        side: ``"left"`` (generation appends on the right) or ``"right"`` (every token
            keeps its index, for models that ignore the mask when placing positions).
    """
    if side not in PADDING_SIDES:
        raise ValueError(f"unknown padding side {side!r}: use one of {', '.join(PADDING_SIDES)}")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            cols = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
            ids[row, cols] = torch.tensor(seq, dtype=torch.long)
            mask[row, cols] = 1
    return ids, mask


@dataclass(frozen=True)
class TokenRow:
    """One sequence of a teacher-forced forward.

    Attributes:
        ids: the token ids, prompt first.
        response_len: how many of the last ids are the response (0: none).
    """

    ids: list[int]
    response_len: int


def encode_pairs(
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_response_tokens: int | None = None,
) -> list[TokenRow]:
    """(prompt, response) pairs as token rows: the prompt in the model's format, then the
    response's tokens, cut to ``max_response_tokens`` (``None``: all).

    Example:
        >>> encode_pairs(lm.tokenizer, ["Hi"], ["Hello there"])[0].response_len
        2
    """
    if len(prompts) != len(responses):
        raise ValueError("one prompt per response is needed")
    rows = []
    for prompt, response in zip(prompts, responses, strict=True):
        p = encode_prompt(tokenizer, prompt)
        r = encode_response(tokenizer, response)
        if max_response_tokens is not None:
            r = r[:max_response_tokens]
        rows.append(TokenRow(p + r, len(r)))
    return rows


@dataclass(frozen=True)
class ForwardBatch:
    """One batch of a teacher-forced forward and what came out of it.

    Attributes:
        index: positions, in the caller's row list, of the batch's rows.
        input_ids / attention_mask: ``[b, width]`` padded rows (CPU).
        lengths: unpadded length of each row.
        response_lens: response tokens of each row (its last tokens).
        padding: ``"left"`` or ``"right"``.
        hidden: ``[b, width, d]`` last hidden states (decoder-stack forwards).
        logits: ``[b, width, vocab]`` logits (whole-model forwards).
        recorded: what the ``hooks`` context manager yielded (e.g. recorded activations).
    """

    index: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: list[int]
    response_lens: list[int]
    padding: str = "left"
    hidden: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    recorded: Any = None

    @property
    def width(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_tokens(self) -> int:
        """Non-padding tokens that went through the model."""
        return int(self.attention_mask.sum())

    def end(self, row: int) -> int:
        """Index, in the padded batch, just past row ``row``'s last token."""
        return self.width if self.padding == "left" else self.lengths[row]

    @property
    def response_start(self) -> torch.Tensor:
        """``[b]`` index of each row's first response token (``prompt_end`` of the hooks)."""
        return torch.tensor([self.end(row) - n for row, n in enumerate(self.response_lens)])

    def response_positions(self, row: int) -> slice:
        """Positions of row ``row``'s response tokens."""
        end = self.end(row)
        return slice(end - self.response_lens[row], end)

    def predicting_positions(self, row: int) -> slice:
        """Positions whose next-token predictions are row ``row``'s response tokens
        (position p predicts token p + 1)."""
        end = self.end(row)
        return slice(end - self.response_lens[row] - 1, end - 1)


def teacher_forced(
    lm: LoadedModel,
    rows: Sequence[TokenRow],
    batch_size: int,
    *,
    whole_model: bool = False,
    padding: str = "left",
    longest_first: bool = True,
    skip_empty: bool = False,
    hooks: Callable[[ForwardBatch], AbstractContextManager[Any]] | None = None,
    stop_after: int | None = None,
    progress: bool | str = False,
    desc: str = "forward",
) -> Iterator[ForwardBatch]:
    """Run token rows through ``lm`` in batches; yield each batch with its outputs.

    Args:
        rows: the sequences (see :func:`encode_pairs`).
        batch_size: rows per forward.
        whole_model: run the LM head too and keep ``logits``; by default only the decoder
            stack runs and ``hidden`` holds its last hidden states.
        padding: ``"left"`` or ``"right"`` (see :func:`pad_sequences`).
        longest_first: sort rows by length (stable) before batching; else input order.
        skip_empty: leave rows without response tokens out of the forwards.
        hooks: called with each batch (before the forward); the context manager it
            returns is entered around that forward and its value kept in ``recorded``
            (``record(...)`` to read activations, ``steering.applied(...)`` to steer).
        stop_after: end each forward after this decoder layer (the layers above it
            and the final norm do not run; ``hidden`` is then ``None``): for callers
            that only read ``recorded`` activations at or below it.
        progress: show a progress bar (a string is used as its label, else ``desc``).

    Example:
        >>> rows = encode_pairs(lm.tokenizer, ["Hi"], ["Hello there"])
        >>> for batch in teacher_forced(lm, rows, 8):
        ...     batch.hidden[0, batch.response_positions(0)]  # the response's states
    """
    if padding not in PADDING_SIDES:
        raise ValueError(f"unknown padding side {padding!r}: use one of {', '.join(PADDING_SIDES)}")
    if stop_after is not None and whole_model:
        raise ValueError("stop_after leaves the LM head out: it needs whole_model=False")
    order = list(range(len(rows)))
    if longest_first:
        order.sort(key=lambda i: -len(rows[i].ids))
    pad = pad_token_id(lm.tokenizer)
    module = lm.model if whole_model else decoder_module(lm.model)
    label = progress if isinstance(progress, str) else desc
    with tqdm(total=len(rows), desc=label, unit="seq", disable=not progress, leave=False) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            # Empty rows leave a batch after it is drawn, so batches stay the same.
            idx = [i for i in chunk if rows[i].response_len > 0] if skip_empty else chunk
            if idx:
                yield _forward(lm, module, rows, idx, pad, padding, whole_model, hooks, stop_after)
            bar.update(len(chunk))


def _forward(
    lm: LoadedModel,
    module: nn.Module,
    rows: Sequence[TokenRow],
    idx: list[int],
    pad: int,
    padding: str,
    whole_model: bool,
    hooks: Callable[[ForwardBatch], AbstractContextManager[Any]] | None,
    stop_after: int | None = None,
) -> ForwardBatch:
    ids, mask = pad_sequences([rows[i].ids for i in idx], pad, padding)
    batch = ForwardBatch(
        index=list(idx),
        input_ids=ids,
        attention_mask=mask,
        lengths=[len(rows[i].ids) for i in idx],
        response_lens=[rows[i].response_len for i in idx],
        padding=padding,
    )
    context = hooks(batch) if hooks is not None else contextlib.nullcontext()
    stop = _stopping_after(lm.model, stop_after) if stop_after is not None else contextlib.nullcontext()
    with torch.inference_mode(), context as recorded:
        try:
            with stop:
                out = module(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False)
        except _Stopped:  # the layers above ``stop_after`` did not run: no hidden states
            return replace(batch, recorded=recorded)
    if whole_model:
        return replace(batch, logits=out.logits, recorded=recorded)
    return replace(batch, hidden=out.last_hidden_state, recorded=recorded)


class _Stopped(Exception):
    """Ends a forward early (raised by the hook :func:`_stopping_after` installs)."""


@contextlib.contextmanager
def _stopping_after(model: nn.Module, layer: int) -> Iterator[None]:
    """Inside the block, a forward ends (with :class:`_Stopped`) once decoder layer
    ``layer`` has run and every hook on it has seen its output."""

    def stop(module: nn.Module, args: tuple, output: Any) -> None:
        raise _Stopped

    handle = find_layers(model)[layer].register_forward_hook(stop)
    try:
        yield
    finally:
        handle.remove()


class LogitHead:
    """A causal LM's head as its own forward applies it: the output embedding, then the
    post-processing some families add (Cohere's ``logit_scale``, Granite's
    ``logits_scaling``, Gemma 2/3's final soft-capping). Every path that turns hidden
    states into logits itself (the engine, perplexities, BiPO) goes through it.

    Args:
        model: a causal LM with ``get_output_embeddings()``.
    """

    def __init__(self, model: nn.Module) -> None:
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.head = model.get_output_embeddings()
        self.scale = getattr(config, "logit_scale", None)
        self.divide = getattr(config, "logits_scaling", None)
        self.softcap = getattr(config, "final_logit_softcapping", None)

    def __call__(self, hidden: torch.Tensor, float32: bool = False) -> torch.Tensor:
        """Logits of ``hidden`` (``[..., d]``); ``float32`` converts before the
        post-processing (else it runs in the model's dtype, as its forward does)."""
        logits = self.head(hidden.contiguous())
        if float32:
            logits = logits.float()
        if self.scale:
            logits = logits * self.scale
        if self.divide:
            logits = logits / self.divide
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def response_logits(lm: LoadedModel, batch: ForwardBatch, row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 next-token logits at the positions predicting row ``row``'s response, and
    the response's tokens: ``([n, vocab], [n])``. The LM head runs on those positions only
    (with the model's own post-processing, :class:`LogitHead`).

    Args:
        batch: a decoder-stack batch from :func:`teacher_forced`.
        row: the row within the batch.
    """
    if batch.hidden is None:
        raise ValueError("response_logits needs a decoder-stack forward (whole_model=False)")
    logits = LogitHead(lm.model)(batch.hidden[row, batch.predicting_positions(row)], float32=True)
    target = batch.input_ids[row, batch.response_positions(row)].to(logits.device)
    return logits, target
