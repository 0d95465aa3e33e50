"""Forward hooks that record or edit decoder-layer outputs, always removed on exit.

Where an edit applies is an explicit option (:data:`POSITIONS`):

- ``"all"``: every non-padding position of every forward.
- ``"prompt"``: prompt positions only. In generation the prompt is what the first
  forward (the prefill) sees; in a teacher-forced forward pass ``prompt_end``.
- ``"generated"``: positions at or after the end of the prompt, i.e. the tokens the
  model generated. The first generated token is *predicted* at the last prompt position,
  so its distribution is unsteered under this option; use ``"last"`` or ``"all"`` to
  steer it.
- ``"last"``: the last position of each forward. In generation: the last prompt token
  at the prefill, then every new token, so every predicted token is steered while the
  prompt's cached keys and values stay unsteered.

Padding (``attention_mask == 0``) is never edited. The absolute position of the tokens in
a forward is worked out from the attention mask, which covers the cached tokens too:
``past = attention_mask.shape[1] - new_tokens``; a forward with ``past == 0`` starts a new
sequence (the prefill).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import SimsError
from .models import find_layers

POSITIONS = ("all", "prompt", "generated", "last")

EditFn = Callable[[torch.Tensor], torch.Tensor]


def check_positions(positions: str) -> str:
    if positions not in POSITIONS:
        raise SimsError(f"unknown positions {positions!r}: use one of {', '.join(POSITIONS)}")
    return positions


def unwrap_output(output: Any) -> torch.Tensor:
    """The hidden states of a layer output that is a tensor or a tuple starting with one."""
    return output[0] if isinstance(output, tuple) else output


def rewrap_output(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def decoder_module(model: nn.Module) -> nn.Module:
    """The module that owns the layer stack and receives the attention mask."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


@dataclass
class PositionTracker:
    """Computes, before each forward, which positions the layer hooks may edit.

    ``prompt_end`` (shape ``[batch]``, absolute index where each row's response starts)
    marks the prompt in a teacher-forced forward; without it the prefill is the prompt.
    """

    positions: str
    prompt_end: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # [batch, seq] bool for the current forward; None = all
    _prompt_len: int = 0
    _calls: int = field(default=0, repr=False)

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        embeds = kwargs.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        if ref is None:
            self.mask = None
            return
        batch, new = ref.shape[0], ref.shape[1]
        attn = kwargs.get("attention_mask")
        if isinstance(attn, torch.Tensor) and attn.dim() == 2 and attn.shape[1] >= new:
            past = attn.shape[1] - new
            valid = attn[:, past:].bool()
        else:
            cache = kwargs.get("past_key_values")
            past = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0
            valid = torch.ones(batch, new, dtype=torch.bool, device=ref.device)
        if past == 0:
            self._prompt_len = new
        self._calls += 1
        absolute = torch.arange(past, past + new, device=ref.device)
        if self.positions == "all":
            keep = valid
        elif self.positions == "last":
            keep = torch.zeros_like(valid)
            keep[:, -1] = valid[:, -1]
        else:
            if self.prompt_end is not None:
                end = self.prompt_end.to(ref.device).view(-1, 1)
            else:
                end = torch.full((batch, 1), self._prompt_len, device=ref.device)
            in_prompt = absolute.view(1, -1) < end
            keep = valid & (in_prompt if self.positions == "prompt" else ~in_prompt)
        self.mask = None if bool(keep.all()) else keep


def _edit_hook(edit: EditFn, tracker: PositionTracker) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        hidden = unwrap_output(output)
        edited = edit(hidden)
        mask = tracker.mask
        if mask is not None:
            if mask.shape != hidden.shape[:2]:
                raise RuntimeError(
                    f"position mask {tuple(mask.shape)} does not match hidden states "
                    f"{tuple(hidden.shape[:2])}"
                )
            edited = torch.where(mask.unsqueeze(-1), edited, hidden)
        return rewrap_output(output, edited)

    return hook


@contextmanager
def steer(
    model: nn.Module,
    edits: dict[int, EditFn],
    positions: str = "all",
    prompt_end: torch.Tensor | None = None,
    layers_path: str | None = None,
) -> Iterator[PositionTracker]:
    """Apply ``edits[layer](hidden) -> hidden`` to decoder-layer outputs inside the block.

    Hooks are prepended, so ``output_hidden_states`` and later hooks see the edited
    tensors, and they are removed on exit, also when the block raises.

    Args:
        edits: layer index -> function from ``[batch, seq, d]`` to the same shape.
        positions: one of :data:`POSITIONS`.
        prompt_end: for teacher-forced forwards, per-row absolute index of the first
            response token (needed by ``"prompt"`` / ``"generated"``).

    Example:
        >>> with steer(lm.model, {10: lambda h: h + v}):
        ...     lm.model.generate(**inputs)
    """
    check_positions(positions)
    layers = find_layers(model, layers_path)
    bad = [i for i in edits if not 0 <= i < len(layers)]
    if bad:
        raise SimsError(f"layers {bad} do not exist in a {len(layers)}-layer model")
    tracker = PositionTracker(positions=positions, prompt_end=prompt_end)
    with ExitStack() as stack:
        handle = decoder_module(model).register_forward_pre_hook(
            tracker.pre_hook, with_kwargs=True, prepend=True
        )
        stack.callback(handle.remove)
        for index, edit in edits.items():
            h = layers[index].register_forward_hook(_edit_hook(edit, tracker), prepend=True)
            stack.callback(h.remove)
        yield tracker


@contextmanager
def record(
    model: nn.Module, layer_indices: Sequence[int], layers_path: str | None = None
) -> Iterator[dict[int, list[torch.Tensor]]]:
    """Collect the output hidden states of the given decoder layers, one tensor per forward.

    Example:
        >>> with record(lm.model, [3, 4]) as acts:
        ...     lm.model.model(**inputs)
        >>> acts[3][0].shape  # [batch, seq, d]
    """
    layers = find_layers(model, layers_path)
    store: dict[int, list[torch.Tensor]] = {i: [] for i in layer_indices}
    with ExitStack() as stack:
        for index in layer_indices:
            if not 0 <= index < len(layers):
                raise SimsError(f"layer {index} does not exist in a {len(layers)}-layer model")

            def hook(module: nn.Module, args: tuple, output: Any, index: int = index) -> None:
                store[index].append(unwrap_output(output).detach())

            handle = layers[index].register_forward_hook(hook)
            stack.callback(handle.remove)
        yield store


def count_hooks(model: nn.Module) -> int:
    """Number of forward hooks and pre-hooks attached anywhere in ``model`` (for tests)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
