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
sequence (the prefill). Edits that depend on the token's index in its sequence (ActAdd's
per-position rows) read it with :func:`current_token_index` (padding not counted).

Where an edit applies in a layer is its *site* (:data:`SITES`): ``"residual"`` edits the
decoder layer's output; ``"attn_heads"`` edits the input of the attention output
projection (``o_proj``: the concatenated per-head outputs, ITI's site), with the same
position mask. An edit states its site as data (:class:`Edit`); a plain function is a
residual edit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .architecture import decoder_module, find_attn_output, find_layers
from .errors import SimsError

POSITIONS = ("all", "prompt", "generated", "last")
SITES = ("residual", "attn_heads")

EditFn = Callable[[torch.Tensor], torch.Tensor]
# Returns, before each forward, the [batch] bool rows an edit applies to (None = all):
# how one batch carries rows with different steerings (the engine's row groups).
RowSelector = Callable[[], "torch.Tensor | None"]

# Index of each token of the current forward in its own sequence, padding not counted
# ([batch, new_tokens]); set by the position tracker of the innermost active steer().
_TOKEN_INDEX: ContextVar[torch.Tensor | None] = ContextVar("simsteer_token_index", default=None)


def current_token_index() -> torch.Tensor | None:
    """``[batch, seq]`` index of each token of the running forward in its sequence (0 =
    first non-padding token, -1 = left padding), or ``None`` outside :func:`steer`."""
    return _TOKEN_INDEX.get()


@contextmanager
def token_index_set(index: torch.Tensor) -> Iterator[None]:
    """Make :func:`current_token_index` return ``index`` inside the block: for an engine
    that applies steering functions itself (vLLM's op) and knows each token's position."""
    reset = _TOKEN_INDEX.set(index)
    try:
        yield
    finally:
        _TOKEN_INDEX.reset(reset)


@dataclass(frozen=True)
class Edit:
    """One layer's edit and where it applies in the layer.

    Attributes:
        fn: ``[batch, seq, width] -> [batch, seq, width]``, returning a new tensor.
        site: one of :data:`SITES`: ``"residual"`` (the layer output) or
            ``"attn_heads"`` (the input of the attention output projection).

    Example:
        >>> Edit(lambda h: h + v)  # the residual stream
        >>> Edit(lambda h: h + delta, site="attn_heads")
    """

    fn: EditFn
    site: str = "residual"

    def __post_init__(self) -> None:
        if self.site not in SITES:
            raise SimsError(f"unknown steering site {self.site!r}: use one of {', '.join(SITES)}")

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fn(hidden)


def check_positions(positions: str) -> str:
    if positions not in POSITIONS:
        raise SimsError(f"unknown positions {positions!r}: use one of {', '.join(POSITIONS)}")
    return positions


def unwrap_output(output: Any) -> torch.Tensor:
    """The hidden states of a layer output that is a tensor or a tuple starting with one."""
    return output[0] if isinstance(output, tuple) else output


def rewrap_output(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@dataclass
class PositionTracker:
    """Computes, before each forward, which positions the layer hooks may edit.

    ``prompt_end`` (shape ``[batch]``, absolute index where each row's response starts)
    marks the prompt in a teacher-forced forward; without it the prefill is the prompt.
    """

    positions: str
    prompt_end: torch.Tensor | None = None
    rows: RowSelector | None = None
    mask: torch.Tensor | None = None  # [batch, seq] bool for the current forward; None = all

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
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            past = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0
            valid = torch.ones(batch, new, dtype=torch.bool, device=ref.device)
        if isinstance(attn, torch.Tensor) and attn.dim() == 2 and attn.shape[1] >= new:
            index = (attn.long().cumsum(1) - 1)[:, past:]
        else:
            index = torch.arange(past, past + new, device=ref.device).expand(batch, new)
        _TOKEN_INDEX.set(index)
        absolute = torch.arange(past, past + new, device=ref.device)
        if self.positions == "all":
            keep = valid
        elif self.positions == "last":
            keep = torch.zeros_like(valid)
            keep[:, -1] = valid[:, -1]
        else:
            if self.prompt_end is not None:
                end = self.prompt_end.to(ref.device).view(-1, 1)
                in_prompt = absolute.view(1, -1) < end
            else:
                # Generation: the prefill (past == 0) is the prompt, every later forward
                # decodes generated tokens.
                in_prompt = torch.full((1, new), past == 0, device=ref.device)
            keep = valid & (in_prompt if self.positions == "prompt" else ~in_prompt)
        if self.rows is not None:
            selected = self.rows()
            if selected is not None:
                keep = keep & selected.to(ref.device).view(-1, 1)
        self.mask = None if bool(keep.all()) else keep


def _masked_edit(edit: EditFn, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    edited = edit(hidden)
    if mask is not None:
        if mask.shape != hidden.shape[:2]:
            raise RuntimeError(
                f"position mask {tuple(mask.shape)} does not match hidden states {tuple(hidden.shape[:2])}"
            )
        edited = torch.where(mask.unsqueeze(-1), edited, hidden)
    return edited


def _edit_hook(edit: EditFn, tracker: PositionTracker) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        return rewrap_output(output, _masked_edit(edit, unwrap_output(output), tracker.mask))

    return hook


def _heads_hook(edit: EditFn, tracker: PositionTracker) -> Callable[..., Any]:
    # A pre-hook on o_proj: its first argument is [batch, seq, heads * head_dim].
    def hook(module: nn.Module, args: tuple) -> tuple:
        return (_masked_edit(edit, args[0], tracker.mask), *args[1:])

    return hook


@contextmanager
def steer(
    model: nn.Module,
    edits: Mapping[int, Edit | EditFn],
    positions: str = "all",
    prompt_end: torch.Tensor | None = None,
    layers_path: str | None = None,
    rows: RowSelector | None = None,
) -> Iterator[PositionTracker]:
    """Apply ``edits[layer](hidden) -> hidden`` to decoder layers inside the block.

    Hooks are prepended, so ``output_hidden_states`` and later hooks see the edited
    tensors, and they are removed on exit, also when the block raises. Each edit states
    its site (:class:`Edit`): ``"residual"`` edits the layer output, ``"attn_heads"``
    the input of the layer's attention output projection.

    Args:
        edits: layer index -> :class:`Edit`; a plain function from ``[batch, seq, d]``
            to the same shape is a residual edit.
        positions: one of :data:`POSITIONS`.
        prompt_end: for teacher-forced forwards, per-row absolute index of the first
            response token (needed by ``"prompt"`` / ``"generated"``).
        rows: called before each forward; the ``[batch]`` bool rows to edit (None = all).

    Example:
        >>> with steer(lm.model, {10: lambda h: h + v}):
        ...     lm.model.generate(**inputs)
    """
    check_positions(positions)
    layers = find_layers(model, layers_path)
    bad = [i for i in edits if not 0 <= i < len(layers)]
    if bad:
        raise SimsError(f"layers {bad} do not exist in a {len(layers)}-layer model")
    # Resolve every target first, so a missing module raises before any hook exists.
    targets = []
    for index, edit in edits.items():
        edit = edit if isinstance(edit, Edit) else Edit(edit)
        if edit.site == "attn_heads":
            targets.append((find_attn_output(layers[index]), edit.fn, True))
        else:
            targets.append((layers[index], edit.fn, False))
    tracker = PositionTracker(positions=positions, prompt_end=prompt_end, rows=rows)
    with ExitStack() as stack:
        reset = _TOKEN_INDEX.set(None)
        stack.callback(_TOKEN_INDEX.reset, reset)
        handle = decoder_module(model).register_forward_pre_hook(
            tracker.pre_hook, with_kwargs=True, prepend=True
        )
        stack.callback(handle.remove)
        for module, edit, heads in targets:
            if heads:
                h = module.register_forward_pre_hook(_heads_hook(edit, tracker), prepend=True)
            else:
                h = module.register_forward_hook(_edit_hook(edit, tracker), prepend=True)
            stack.callback(h.remove)
        yield tracker


@contextmanager
def record(
    model: nn.Module,
    layer_indices: Sequence[int],
    layers_path: str | None = None,
    site: str = "residual",
) -> Iterator[dict[int, list[torch.Tensor]]]:
    """Collect the output hidden states of the given decoder layers, one tensor per forward.

    Args:
        site: ``"residual"`` (layer outputs) or ``"attn_heads"`` (the inputs of the
            layers' attention output projections, ``[batch, seq, heads * head_dim]``).

    Example:
        >>> with record(lm.model, [3, 4]) as acts:
        ...     lm.model.model(**inputs)
        >>> acts[3][0].shape  # [batch, seq, d]
    """
    if site not in SITES:
        raise SimsError(f"unknown recording site {site!r}: use one of {', '.join(SITES)}")
    layers = find_layers(model, layers_path)
    store: dict[int, list[torch.Tensor]] = {i: [] for i in layer_indices}
    bad = [i for i in layer_indices if not 0 <= i < len(layers)]
    if bad:
        raise SimsError(f"layer {bad[0]} does not exist in a {len(layers)}-layer model")
    with ExitStack() as stack:
        for index in layer_indices:
            if site == "attn_heads":

                def pre(module: nn.Module, args: tuple, index: int = index) -> None:
                    store[index].append(args[0].detach())

                handle = find_attn_output(layers[index]).register_forward_pre_hook(pre)
            else:

                def hook(module: nn.Module, args: tuple, output: Any, index: int = index) -> None:
                    store[index].append(unwrap_output(output).detach())

                handle = layers[index].register_forward_hook(hook)
            stack.callback(handle.remove)
        yield store


def count_hooks(model: nn.Module) -> int:
    """Number of forward hooks and pre-hooks attached anywhere in ``model`` (for tests)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
