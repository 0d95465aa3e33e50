"""The generation engine: continuous batching over one shared key/value store.

Every running sequence is a row of a key/value store whose columns all rows share; a
row's own tokens are the right-aligned run of ones in its attention-mask row, so the
model sees ordinary left-padded batches and any steering hook (which reads positions
from the attention mask) works unchanged. What the engine adds to a plain
``model.generate`` loop:

- **Continuous batching.** A row that ends (end-of-sequence or length cap) frees its slot;
  the next queued sequences are prefilled together and copied into the free slots while
  the others keep decoding. The queue is admitted longest prompt first, so a new prompt
  almost always fits in the columns already there. Leading columns no live row uses are
  dropped, and when the queue is empty and half the rows are idle the store shrinks to
  the live rows, so the work per step follows the live sequences, not the longest one.
- **One prefill per prompt.** The K samples of a prompt share its prefill: the prompt's
  keys and values are computed once and copied into K rows.
- **No per-step concatenation.** Keys and values are written in place into preallocated
  buffers; the attention reads a view of the used columns. When the buffers fill up, the
  used columns move to the front of the same buffers, and a shrinking batch keeps its
  rows in place, so neither needs a second copy of the store.
- **A key/value memory budget** (``cache_bytes``, :data:`CACHE_BYTES` by default): rows
  are admitted only while rows x columns of keys and values fit in it, so long prompts
  decode in fewer rows instead of raising the peak memory; prefill forwards are bounded
  too (at most :data:`PREFILL_TOKENS` padded tokens, each prefill's store freed once its
  rows are copied). The budget changes no sample.
- **The LM head on the last position only**, as a ``[rows, d] x [d, vocab]`` product.
- **Random streams per sequence** (:mod:`simsteer.generation.decoding`): a sample depends on its
  seed, prompt key, sample index and step, not on the batch it ran in.

Models whose cache is not a per-layer key/value list (state-space or linear-attention
layers) are refused by :func:`supports`; :mod:`simsteer.generation.sampling` then falls back to
``model.generate`` with the same per-sequence draws.
"""

from __future__ import annotations

import inspect
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin

from ..architecture import decoder_module
from ..tokens import LogitHead, left_pad
from .decoding import choose_rows

# Padded prompt tokens prefilled in one forward (bounds the prefill's activation memory).
PREFILL_TOKENS = 2048
# Key/value memory the batch may hold (rows x columns x bytes per column): long prompts
# decode in fewer rows instead of raising the peak memory (issue: 2 GB for a prompt mix
# of up to 700 tokens in fp32).
CACHE_BYTES = 512 << 20
_ATTENTION_TYPES = {"full_attention", "sliding_attention", "chunked_attention"}


@dataclass(frozen=True)
class Job:
    """One sequence to generate: sample ``sample`` of prompt ``prompt`` (an index into
    the encoded prompts), drawing from random stream ``stream``.

    Attributes:
        group: the steering group of the row (rows of one batch may be steered
            differently, see :meth:`Engine.run`); prompts are prefilled once per
            (prompt, group).
        settings: this job's own sampling settings (default: the run's).
    """

    prompt: int
    sample: int
    stream: int
    group: Hashable = None
    settings: DecodeSettings | None = None


@dataclass(frozen=True)
class DecodeSettings:
    """What the engine needs of a sampling configuration."""

    temperature: float
    top_k: int
    top_p: float
    max_new_tokens: int
    batch_size: int


def supports(model: nn.Module) -> bool:
    """Whether the engine can run ``model``: a transformers model whose every layer is an
    attention layer with a key/value cache."""
    config = getattr(model, "config", None)
    if not isinstance(model, PreTrainedModel) or config is None:
        return False
    if getattr(config, "is_encoder_decoder", False):
        return False
    types = getattr(config, "layer_types", None) or []
    return all(t in _ATTENTION_TYPES for t in types)


class KVStore:
    """Per-layer key and value buffers ``[rows, heads, capacity, head_dim]``; columns
    ``[start, end)`` hold the cache. Buffers start zeroed and only ever hold values the
    model computed, so masked columns are finite and contribute exactly nothing."""

    def __init__(self, rows: int, capacity: int) -> None:
        self.rows = rows
        self.capacity = max(1, capacity)
        self.keys: list[torch.Tensor | None] = []
        self.values: list[torch.Tensor | None] = []
        self.start = 0
        self.end = 0

    @property
    def length(self) -> int:
        return self.end - self.start

    def write(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write a forward's new keys and values at ``end`` and return the used columns."""
        while len(self.keys) <= layer:
            self.keys.append(None)
            self.values.append(None)
        if self.keys[layer] is None:
            shape = (self.rows, keys.shape[1], self.capacity, keys.shape[3])
            self.keys[layer] = keys.new_zeros(shape)
            self.values[layer] = values.new_zeros((*shape[:3], values.shape[3]))
        stop = self.end + keys.shape[2]
        if stop > self.capacity:
            raise RuntimeError("the key/value store was not reserved for this forward")
        k, v = self.keys[layer], self.values[layer]
        k[:, :, self.end : stop] = keys
        v[:, :, self.end : stop] = values
        return k[:, :, self.start : stop], v[:, :, self.start : stop]

    def reserve(self, new: int) -> None:
        """Make room for ``new`` columns after ``end``: move the used columns to the
        front when that is enough (dropped leading columns make room), grow otherwise."""
        if self.end + new > self.capacity:
            need = self.length + new + 64
            if need <= self.capacity:
                self._compact()
            else:
                self._relayout(0, max(2 * self.capacity, need))

    def _compact(self) -> None:
        """Move the used columns to the front of the same buffers (no new allocation
        beside one layer's temporary copy when the old and new columns overlap)."""
        length = self.length
        for store in (self.keys, self.values):
            for buf in store:
                if buf is None:
                    continue
                used = buf[:, :, self.start : self.end]
                buf[:, :, :length] = used if self.start >= length else used.clone()
        self.start, self.end = 0, length

    def grow_left(self, extra: int) -> None:
        """Add ``extra`` columns before ``start`` (their old contents are finite; the
        caller masks them for the rows that do not use them)."""
        if extra <= 0:
            return
        if self.start >= extra:
            self.start -= extra
        else:
            self._relayout(extra, max(self.capacity, self.length + extra + 64))

    def drop_leading(self, count: int) -> None:
        self.start += count

    def _relayout(self, offset: int, capacity: int) -> None:
        """Copy the used columns to ``[offset, offset + length)`` of new buffers."""
        length = self.length
        for store in (self.keys, self.values):
            for i, buf in enumerate(store):
                if buf is None:
                    continue
                new = buf.new_zeros((*buf.shape[:2], capacity, *buf.shape[3:]))
                new[:, :, offset : offset + length] = buf[:, :, self.start : self.end]
                store[i] = new
        self.capacity = capacity
        self.start, self.end = 0, offset + length

    def add_rows(self, count: int) -> None:
        """Append ``count`` zeroed rows."""
        for store in (self.keys, self.values):
            for i, buf in enumerate(store):
                if buf is not None:
                    store[i] = torch.cat([buf, buf.new_zeros((count, *buf.shape[1:]))])
        self.rows += count

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (in that order), in the first rows of the same buffers (a
        shrinking batch frees nothing, so it never needs a second copy of the store)."""
        for store in (self.keys, self.values):
            for i, buf in enumerate(store):
                if buf is not None:
                    kept = buf.index_select(0, rows.to(buf.device))
                    buf[: len(rows)] = kept
                    store[i] = buf[: len(rows)]
        self.rows = len(rows)

    def copy_row(self, src: KVStore, src_row: int, dst_row: int, length: int) -> None:
        """Copy the last ``length`` columns of ``src``'s row into this store's row,
        right-aligned at ``end``."""
        for dst_bufs, src_bufs in ((self.keys, src.keys), (self.values, src.values)):
            for i, buf in enumerate(src_bufs):
                if buf is None:
                    continue
                while len(dst_bufs) <= i:
                    dst_bufs.append(None)
                if dst_bufs[i] is None:
                    dst_bufs[i] = buf.new_zeros((self.rows, buf.shape[1], self.capacity, buf.shape[3]))
                dst_bufs[i][dst_row, :, self.end - length : self.end] = buf[
                    src_row, :, src.end - length : src.end
                ]


class _StoreLayer(CacheLayerMixin):
    """One model layer's view of a :class:`KVStore`, in the transformers cache protocol."""

    is_sliding = False
    is_compileable = False

    def __init__(self, store: KVStore, index: int) -> None:
        super().__init__()
        self.store, self.index = store, index
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.keys, self.values = self.store.write(self.index, key_states, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.store.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.store.length

    def get_max_length(self) -> int:
        return -1


def _cache(store: KVStore, num_layers: int) -> Cache:
    return Cache(layers=[_StoreLayer(store, i) for i in range(num_layers)])


@dataclass
class EngineStats:
    """What one :meth:`Engine.run` did (for profiles and benchmarks).

    Attributes:
        prefills: prefill forwards.
        prompt_tokens: prompt tokens prefilled (each prompt once, however many samples).
        steps: decode steps (one forward each).
        row_steps: rows computed over all decode steps, idle rows included.
        live_row_steps: rows that produced a token (``1 - live/row`` is the waste).
        max_columns: the most key/value columns any step attended to.
        max_rows: the most rows any step decoded (capped by the batch size and the
            key/value budget).
    """

    prefills: int = 0
    prompt_tokens: int = 0
    steps: int = 0
    row_steps: int = 0
    live_row_steps: int = 0
    max_columns: int = 0
    max_rows: int = 0


@dataclass
class _Row:
    job: Job
    tokens: list[int] = field(default_factory=list)


# on_token(job, tokens) -> False ends the row now (a stop string, a cancelled client).
TokenCallback = Callable[[Job, list[int]], bool]
# more(free_rows, idle) -> new jobs, [] for none yet, None to stop; may block when idle.
JobSource = Callable[[int, bool], "list[Job] | None"]
# steer_group(group, rows) -> a context that steers the rows ``rows()`` selects.
GroupSteerer = Callable[[Hashable, Callable[[], "torch.Tensor | None"]], AbstractContextManager]


class Engine:
    """Continuous-batching decoder for one model (see the module docstring).

    Args:
        model: a causal LM that :func:`supports` accepts. Steering shared by every row
            is attached by the caller; per-row steering goes through ``steer_group``.
        eos: token ids that end a sequence.
        pad: the padding token id.
    """

    def __init__(
        self, model: nn.Module, eos: Sequence[int], pad: int, cache_bytes: int = CACHE_BYTES
    ) -> None:
        self.model = model
        self.eos = set(int(t) for t in eos)
        self.pad = int(pad)
        self.num_layers = int(model.config.get_text_config().num_hidden_layers)
        params = inspect.signature(model.forward).parameters
        self._keep_last = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._head = _LastTokenHead.of(model)
        self.cache_bytes = int(cache_bytes)
        self.column_bytes = _column_bytes(model)
        # A prefill's own store holds at most a third of the batch's budget.
        self.prefill_tokens = max(1, min(PREFILL_TOKENS, self.cache_bytes // (3 * self.column_bytes)))
        self.device = next(model.parameters()).device
        # Groups of the rows of the forward being run (row selectors read it).
        self._forward_groups: list[Hashable] = []

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Cache
    ) -> torch.Tensor:
        inputs = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions,
            "use_cache": True,
            self._cache_arg: cache,
        }
        if self._head is not None:
            return self._head(self._head.decoder(**inputs).last_hidden_state[:, -1])
        return self.model(**inputs, **self._keep_last).logits[:, -1]

    def _rows_of(self, group: Hashable) -> torch.Tensor | None:
        groups = self._forward_groups
        if all(g == group for g in groups):
            return None
        return torch.tensor([g == group for g in groups], dtype=torch.bool)

    def run(
        self,
        prompts: Sequence[Sequence[int]],
        jobs: Sequence[Job],
        settings: DecodeSettings,
        on_finish: Callable[[Job, list[int]], None],
        on_token: TokenCallback | None = None,
        more: JobSource | None = None,
        steer_group: GroupSteerer | None = None,
    ) -> EngineStats:
        """Generate every job; ``on_finish(job, tokens)`` is called as each one ends
        (``tokens`` includes the end-of-sequence token when there is one).

        Args:
            prompts: token ids per prompt; ``more`` may append to it while running.
            jobs: the jobs known at the start (admitted longest prompt first).
            settings: sampling settings (``batch_size`` = most rows decoded together).
            on_token: called after every new token of a row.
            more: a live source of further jobs (a server's queue); without it the run
                ends when ``jobs`` are done.
            steer_group: attaches the steering of a job group to the rows it selects;
                entered when the group's first row arrives, left when its last row ends.
        """
        stats = EngineStats()
        queue = deque(sorted(jobs, key=lambda j: -len(prompts[j.prompt])))
        if not queue and more is None:
            return stats
        limit = settings.batch_size
        capacity = max((len(prompts[j.prompt]) for j in jobs), default=64) + settings.max_new_tokens + 64
        store = KVStore(0, capacity)
        cache = _cache(store, self.num_layers)
        state = _Batch(self.device, self.pad)
        groups: dict[Hashable, ExitStack] = {}
        try:
            while True:
                free = limit - state.live
                if more is not None and free > 0:
                    fresh = more(free - len(queue), state.live == 0 and not queue)
                    if fresh is None:
                        break
                    queue.extend(sorted(fresh, key=lambda j: -len(prompts[j.prompt])))
                if not queue and state.live == 0:
                    if more is None:
                        break
                    continue
                if queue:
                    free = self._room(free, state, store, prompts[queue[0].prompt], settings)
                if queue and free > 0:
                    refill_at = max(1, min(limit, state.width or limit) // 8)
                    if state.live == 0 or free >= refill_at or len(queue) <= free:
                        admitted = [queue.popleft() for _ in range(min(free, len(queue)))]
                        self._open_groups(admitted, groups, steer_group)
                        self._admit(prompts, admitted, state, store, settings, on_finish, on_token, stats)
                        self._close_groups(state, groups)
                        continue
                self._step(state, store, cache, settings, on_finish, on_token, stats)
                self._close_groups(state, groups)
                if not queue and state.width and state.live <= state.width // 2:
                    state.shrink(store)
        finally:
            for stack in groups.values():
                stack.close()
        return stats

    def _room(self, free: int, state: _Batch, store: KVStore, longest: Sequence[int], settings) -> int:
        """Free rows the key/value budget allows: every row is costed at the store's
        columns, or the next prompt's plus the new tokens when that is more; an empty
        batch always takes one row."""
        columns = max(store.capacity, len(longest) + settings.max_new_tokens)
        fits = max(1, self.cache_bytes // max(1, columns * self.column_bytes))
        return max(0, min(free, fits - state.live))

    def _open_groups(self, jobs, groups, steer_group) -> None:
        for job in jobs:
            if steer_group is not None and job.group is not None and job.group not in groups:
                stack = ExitStack()
                stack.enter_context(steer_group(job.group, lambda g=job.group: self._rows_of(g)))
                groups[job.group] = stack

    def _close_groups(self, state: _Batch, groups: dict[Hashable, ExitStack]) -> None:
        active = {r.job.group for r in state.rows if r is not None}
        for group in [g for g in groups if g not in active]:
            groups.pop(group).close()

    def _step(self, state, store, cache, settings, on_finish, on_token, stats) -> None:
        """One decode step for every row (idle rows attend to their own new column only)."""
        store.reserve(1)
        idle = torch.tensor([r is None for r in state.rows], device=self.device)
        step_mask = torch.cat([state.mask, torch.ones_like(state.mask[:, :1])], dim=1)
        self._forward_groups = [None if r is None else r.job.group for r in state.rows]
        logits = self._forward(state.last.unsqueeze(1), step_mask, state.positions.unsqueeze(1), cache)
        store.end += 1
        stats.steps += 1
        stats.row_steps += state.width
        stats.max_columns = max(stats.max_columns, step_mask.shape[1])
        stats.max_rows = max(stats.max_rows, state.width)
        state.mask = step_mask.masked_fill(idle.unsqueeze(1), 0)
        state.positions = state.positions + 1
        index = [i for i, r in enumerate(state.rows) if r is not None]
        stats.live_row_steps += len(index)
        picked = logits[index] if len(index) < state.width else logits
        chosen = self._choose(picked, [state.rows[i] for i in index], settings)
        for slot, token in zip(index, chosen, strict=True):
            self._advance(state, slot, token, settings, on_finish, on_token)
        # Drop leading columns no row uses any more.
        used = state.mask.any(dim=0)
        lead = int(used.long().argmax()) if bool(used.any()) else state.mask.shape[1]
        if lead:
            store.drop_leading(lead)
            state.mask = state.mask[:, lead:]

    def _advance(self, state, slot, token, settings, on_finish, on_token) -> None:
        row = state.rows[slot]
        row.tokens.append(token)
        limit = (row.job.settings or settings).max_new_tokens
        keep = on_token is None or on_token(row.job, row.tokens) is not False
        if token in self.eos or len(row.tokens) >= limit or not keep:
            on_finish(row.job, row.tokens)
            state.rows[slot] = None
            state.mask[slot] = 0
        else:
            state.last[slot] = token

    def _choose(self, logits: torch.Tensor, rows: list[_Row], settings: DecodeSettings) -> list[int]:
        """Next tokens, one call per distinct sampling setting among the rows."""
        return choose_rows(
            logits,
            [r.job.settings or settings for r in rows],
            [r.job.stream for r in rows],
            [len(r.tokens) for r in rows],
        )

    def _admit(self, prompts, admitted, state, store, settings, on_finish, on_token, stats) -> None:
        """Prefill the admitted jobs' prompts (once per prompt and group) into free rows.

        Each prefill forward's keys and values are copied into the rows at once and its
        own store dropped, so at most one prefill store is alive beside the batch's."""
        need = max(len(prompts[j.prompt]) for j in admitted)
        if need > store.length:
            store.grow_left(need - store.length)
            state.mask = torch.cat(
                [state.mask.new_zeros(state.width, need - state.mask.shape[1]), state.mask], 1
            )
        slots = state.free_slots(len(admitted), store)
        targets: dict[tuple, list[int]] = {}
        for job, slot in zip(admitted, slots, strict=True):
            targets.setdefault((job.prompt, job.group), []).append(slot)
        first_logits: dict[tuple, torch.Tensor] = {}
        for group in _prefill_groups(list(targets), prompts, self.prefill_tokens):
            ids, pmask = left_pad([list(prompts[p]) for p, _ in group], self.pad)
            ids, pmask = ids.to(self.device), pmask.to(self.device)
            width = ids.shape[1]
            pstore = KVStore(len(group), width)
            self._forward_groups = [g for _, g in group]
            logits = self._forward(
                ids, pmask, (pmask.cumsum(1) - 1).clamp(min=0), _cache(pstore, self.num_layers)
            )
            pstore.end = width
            stats.prefills += 1
            stats.prompt_tokens += sum(len(prompts[p]) for p, _ in group)
            for r, key in enumerate(group):
                first_logits[key] = logits[r]
                for slot in targets[key]:
                    store.copy_row(pstore, r, slot, len(prompts[key[0]]))
            del pstore
        for job, slot in zip(admitted, slots, strict=True):
            length = len(prompts[job.prompt])
            state.mask[slot] = 0
            state.mask[slot, state.mask.shape[1] - length :] = 1
            state.positions[slot] = length
            state.rows[slot] = _Row(job)
        logits = torch.stack([first_logits[(j.prompt, j.group)] for j in admitted])
        chosen = self._choose(logits, [state.rows[s] for s in slots], settings)
        for slot, token in zip(slots, chosen, strict=True):
            self._advance(state, slot, token, settings, on_finish, on_token)


def _column_bytes(model: nn.Module) -> int:
    """Bytes of one token's keys and values over every layer of ``model``."""
    config = model.config.get_text_config()
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    size = next(model.parameters()).element_size()
    return max(1, 2 * int(config.num_hidden_layers) * kv_heads * head_dim * size)


class _LastTokenHead:
    """The LM head applied to the last position's hidden states only, as a 2-D matmul.

    ``model(..., logits_to_keep=1)`` hands the head a strided ``[rows, 1, d]`` slice,
    which CPU bf16 matmul serves by expanding the ``[vocab, d]`` weight once per row
    (a 16-row prefill copied 0.9 GB and spent longer on that copy than on its layers).
    Running the decoder stack and the head separately keeps the head a plain
    ``[rows, d] x [d, vocab]`` product. Only for models whose logits are the head's output
    with the post-processing transformers models use (soft-capping, a logit scale);
    others keep ``logits_to_keep``.
    """

    def __init__(self, decoder: nn.Module, head: LogitHead) -> None:
        self.decoder, self.head = decoder, head

    @classmethod
    def of(cls, model: nn.Module) -> _LastTokenHead | None:
        if getattr(model.config, "model_type", None) not in _PLAIN_HEAD_MODELS:
            return None
        decoder = decoder_module(model)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if decoder is model or not isinstance(head, nn.Module):
            return None
        return cls(decoder, LogitHead(model))

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)


# Model types whose causal-LM forward is decoder -> head (-> the post-processing above):
# the engine runs them as decoder + last-token head.
_PLAIN_HEAD_MODELS = {
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "gpt2",
    "phi3",
    "olmo",
    "olmo2",
    "granite",
    "cohere",
    "smollm3",
}


class _Batch:
    """The rows being decoded: their jobs, attention mask, next positions and tokens."""

    def __init__(self, device: torch.device, pad: int) -> None:
        self.device, self.pad = device, pad
        self.rows: list[_Row | None] = []
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=device)
        self.positions = torch.zeros(0, dtype=torch.long, device=device)
        self.last = torch.zeros(0, dtype=torch.long, device=device)

    @property
    def width(self) -> int:
        return len(self.rows)

    @property
    def live(self) -> int:
        return sum(r is not None for r in self.rows)

    def free_slots(self, count: int, store: KVStore) -> list[int]:
        """``count`` idle rows, adding rows to the batch (and the store) when needed."""
        free = [i for i, r in enumerate(self.rows) if r is None][:count]
        extra = count - len(free)
        if extra > 0:
            start = self.width
            store.add_rows(extra)
            self.rows.extend([None] * extra)
            self.mask = torch.cat([self.mask, self.mask.new_zeros(extra, self.mask.shape[1])])
            self.positions = torch.cat([self.positions, self.positions.new_zeros(extra)])
            self.last = torch.cat([self.last, self.last.new_full((extra,), self.pad)])
            free += list(range(start, start + extra))
        return free

    def shrink(self, store: KVStore) -> None:
        """Keep only the live rows."""
        keep = torch.tensor(
            [i for i, r in enumerate(self.rows) if r is not None], dtype=torch.long, device=self.device
        )
        store.select_rows(keep)
        self.rows = [self.rows[i] for i in keep.tolist()]
        self.mask, self.positions, self.last = self.mask[keep], self.positions[keep], self.last[keep]


def _prefill_groups(unique: list[tuple], prompts: Sequence[Sequence[int]], budget: int) -> list[list[tuple]]:
    """Split (prompt, group) keys, longest prompt first, into prefill forwards of at most
    ``budget`` padded tokens (a longer prompt gets a forward of its own)."""
    order = sorted(unique, key=lambda key: -len(prompts[key[0]]))
    groups: list[list[tuple]] = []
    for key in order:
        if groups and len(prompts[groups[-1][0][0]]) * (len(groups[-1]) + 1) <= budget:
            groups[-1].append(key)
        else:
            groups.append([key])
    return groups
