"""Sampling through llama.cpp (the optional extra ``simsteer[llamacpp]``).

For a model loaded from a GGUF file and a policy whose every function is a constant
vector added to a layer's output at every position (CAA, ActAdd ``mode=mean``, PCA and
stacks of them), llama.cpp runs the same steering as a control vector set on its context
(:mod:`simsteer.export.gguf_cvec` has the layer numbering, read from llama.cpp's sources).

:class:`LlamaCppBackend` has the contract of :meth:`simsteer.generation.torch_engine.Engine.run`, so
:func:`simsteer.generation.sampling.generate` picks it with ``SamplingConfig(engine="llamacpp")``
(or ``"auto"``) and everything else stays the same: prompts are encoded by simsteer's
tokenizer (the same token ids as the torch engine), and every (prompt, sample) draws
from its own random stream with :func:`simsteer.generation.decoding.choose_tokens`.

How it decodes: sequences live in one unified key/value cache, one llama.cpp sequence
id per running row. A newly admitted prompt is prefilled once, into the first of its
rows, and its cache cells are shared with its other rows (``llama_memory_seq_cp``);
then each step decodes the last token of every running row in one batch. A finished
row's cells are released and its sequence id goes to the next queued job.

The model is loaded once per :class:`LlamaCppBackend`; ``generate`` opens one per call
(about a tenth of a second for the embedded model), so a caller that samples often can
keep its own backend and call :meth:`LlamaCppBackend.run` directly.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import SimsError
from ..export.gguf_cvec import control_vector_buffer
from ..models import EMBEDDED_MODEL, LoadedModel, embedded_gguf_path
from ..policy import Policy
from .decoding import choose_rows
from .torch_engine import DecodeSettings, Job, JobSource, TokenCallback

log = logging.getLogger(__name__)

__all__ = ["LlamaCppBackend", "gguf_file", "llamacpp_problem"]

#: Tokens submitted to one ``llama_decode`` (prompts are chunked to it).
BATCH_TOKENS = 512
#: Most sequences one context holds (llama.cpp's LLAMA_MAX_SEQ is 256).
MAX_SEQUENCES = 256
#: Cache cells (tokens) of a context fed by a live queue (``sims serve``): 8,192 cells,
#: about 190 MB of F16 keys and values for the embedded model.
SERVE_CELLS = 8192


def gguf_file(lm: LoadedModel) -> Path | None:
    """The GGUF file ``lm`` was loaded from (the embedded model's included), or ``None``."""
    if lm.source == EMBEDDED_MODEL:
        return embedded_gguf_path()
    if lm.source.endswith(".gguf") and Path(lm.source).is_file():
        return Path(lm.source).resolve()
    return None


def llamacpp_problem(lm: LoadedModel, policy: Policy | Sequence[Any] | None) -> str | None:
    """Why llama.cpp cannot sample this model with this policy, or ``None`` if it can.

    Args:
        lm: the loaded model (it must come from a GGUF file).
        policy: the steering to apply (additive at all positions, layers >= 1).
    """
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (pip install 'simsteer[llamacpp]')"
    if gguf_file(lm) is None:
        return f"the model {lm.source!r} was not loaded from a GGUF file, which is what llama.cpp runs"
    try:
        vectors = Policy.of(policy).additive_vectors()
        control_vector_buffer(vectors, lm.num_layers, lm.hidden_size)
    except SimsError as exc:
        return str(exc)
    return None


def _quiet() -> None:
    """Keep llama.cpp's load and context messages off stderr unless asked for.

    llama-cpp-python routes them through its ``llama-cpp-python`` logger, which prints
    everything while its level is unset; an application that set a level keeps it.
    """
    library_log = logging.getLogger("llama-cpp-python")
    if library_log.level == logging.NOTSET:
        library_log.setLevel(logging.ERROR)


@dataclass
class _State:
    """What one :meth:`LlamaCppBackend.run` shares between its steps."""

    settings: DecodeSettings
    eos: set[int]
    on_finish: Callable[[Job, list[int]], None]
    memory: Any
    free: list[int] = field(default_factory=list)  # idle sequence ids
    on_token: TokenCallback | None = None
    group_vectors: Callable[[Hashable], dict[int, torch.Tensor]] | None = None
    buffers: dict[Hashable, np.ndarray] = field(default_factory=dict)  # control vector per group
    current: tuple | None = None  # (group,) whose vector is set on the context
    cells: int = 0  # the context's cache cells
    used: int = 0  # cells the running rows may fill (prompt + length cap each)


@dataclass
class _Row:
    job: Job
    seq: int
    position: int
    cost: int  # cache cells reserved for it
    tokens: list[int] = field(default_factory=list)


class LlamaCppBackend:
    """A llama.cpp model, its context and control vector for one GGUF file.

    Args:
        path: the GGUF file.
        vectors: simsteer layer -> vector added to that layer's output (the control
            vector; empty = unsteered).
        num_threads: CPU threads (default: ``torch.get_num_threads()``).

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self, path: str | Path, vectors: dict[int, torch.Tensor] | None = None, num_threads: int | None = None
    ) -> None:
        try:
            import llama_cpp.llama_cpp as library
        except ImportError:  # pragma: no cover - llamacpp_problem checks first
            raise SimsError("llama-cpp-python is not installed (pip install 'simsteer[llamacpp]')") from None
        self.lib = library
        _quiet()
        library.llama_backend_init()
        self.path = Path(path)
        params = library.llama_model_default_params()
        self.model = library.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.model:
            raise SimsError(f"llama.cpp cannot load {self.path}")
        self.num_layers = int(library.llama_model_n_layer(self.model))
        self.hidden_size = int(library.llama_model_n_embd(self.model))
        self.vocab_size = int(library.llama_vocab_n_tokens(library.llama_model_get_vocab(self.model)))
        self.num_threads = int(num_threads or torch.get_num_threads())
        self.vectors = dict(vectors or {})
        self._cvec = control_vector_buffer(self.vectors, self.num_layers, self.hidden_size)
        self.ctx = None
        self._shape = (0, 0)  # (cells, sequences) of the current context
        self._batch = library.llama_batch_init(BATCH_TOKENS, 0, 1)

    @classmethod
    def for_model(cls, lm: LoadedModel, policy: Policy | Sequence[Any] | None = None) -> LlamaCppBackend:
        """A backend for ``lm``'s GGUF file with ``policy`` as its control vector."""
        problem = llamacpp_problem(lm, policy)
        if problem is not None:
            raise SimsError(f"llama.cpp cannot sample here: {problem}")
        return cls(gguf_file(lm), Policy.of(policy).additive_vectors())

    # -- lifetime --------------------------------------------------------------------
    def __enter__(self) -> LlamaCppBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Free the context, the batch and the model (idempotent)."""
        lib = self.lib
        if self.ctx:
            lib.llama_free(self.ctx)
            self.ctx = None
        if self._batch is not None:
            lib.llama_batch_free(self._batch)
            self._batch = None
        if self.model:
            lib.llama_model_free(self.model)
            self.model = None

    def _context(self, cells: int, sequences: int):
        """A context with at least ``cells`` cache cells and ``sequences`` sequence ids
        (made again, with the control vector set, when the current one is smaller)."""
        lib = self.lib
        if self.ctx and self._shape[0] >= cells and self._shape[1] >= sequences:
            lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
            self._set_cvec(self.ctx, *self._cvec)  # a grouped run may have left another vector set
            return self.ctx
        if self.ctx:
            lib.llama_free(self.ctx)
            self.ctx = None
        params = lib.llama_context_default_params()
        params.n_ctx = max(cells, 256)
        params.n_batch = params.n_ubatch = BATCH_TOKENS
        params.n_seq_max = max(1, sequences)
        params.n_threads = params.n_threads_batch = self.num_threads
        params.kv_unified = True  # rows of one prompt share its cells
        # Flash attention makes a row's logits depend on the other rows of its batch by
        # up to ~1 logit on the embedded model. Without it a row still rounds a little
        # differently with the batch (8-bit activations for quantised weights, F16
        # cache, kernels chosen by batch size), which moves a seeded draw only near a
        # boundary of the distribution: samples match the torch engine's contract
        # only up to that.
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.no_perf = True
        ctx = lib.llama_init_from_model(self.model, params)
        if not ctx:
            raise SimsError(f"llama.cpp cannot make a context of {cells} cells for {self.path.name}")
        try:
            self._set_cvec(ctx, *self._cvec)
        except SimsError:
            lib.llama_free(ctx)
            raise
        self.ctx, self._shape = ctx, (params.n_ctx, params.n_seq_max)
        return ctx

    def _set_cvec(self, ctx, data: np.ndarray, start: int, end: int, what: str = "") -> None:
        """Set the control vector ``data`` (layers ``start`` to ``end``; none when
        ``start`` is not positive) on ``ctx``."""
        pointer = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float)) if start > 0 else None
        if self.lib.llama_set_adapter_cvec(ctx, pointer, data.size, self.hidden_size, start, end) != 0:
            raise SimsError(f"llama.cpp refused the control vector{what} for {self.path.name}")

    # -- decoding --------------------------------------------------------------------
    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> dict[int, np.ndarray]:
        """Run ``(token, position, seq, wants_logits)`` entries in chunks; the logits of
        the entries that want them, by entry index."""
        lib, batch, out = self.lib, self._batch, {}
        for start in range(0, len(entries), BATCH_TOKENS):
            chunk = entries[start : start + BATCH_TOKENS]
            batch.n_tokens = len(chunk)
            for i, (token, position, seq, wants) in enumerate(chunk):
                batch.token[i], batch.pos[i] = token, position
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = int(wants)
            code = lib.llama_decode(self.ctx, batch)
            if code != 0:
                raise SimsError(f"llama.cpp could not decode a batch (llama_decode returned {code})")
            for i, (*_, wants) in enumerate(chunk):
                if wants:
                    row = lib.llama_get_logits_ith(self.ctx, i)
                    out[start + i] = np.ctypeslib.as_array(row, shape=(self.vocab_size,)).copy()
        return out

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """``[len(tokens), vocab]`` next-token logits at every position of one sequence
        (a teacher-forced forward, for parity checks)."""
        self._context(len(tokens) + 1, 1)
        out = self._decode([(int(t), i, 0, True) for i, t in enumerate(tokens)])
        return np.stack([out[i] for i in range(len(tokens))])

    def run(
        self,
        prompts: Sequence[Sequence[int]] | Mapping[int, Sequence[int]],
        jobs: Sequence[Job],
        settings: DecodeSettings,
        on_finish: Callable[[Job, list[int]], None],
        eos: Sequence[int] = (),
        *,
        on_token: TokenCallback | None = None,
        more: JobSource | None = None,
        group_vectors: Callable[[Hashable], dict[int, torch.Tensor]] | None = None,
        cells: int | None = None,
    ) -> None:
        """Generate every job; ``on_finish(job, tokens)`` as each one ends (``tokens``
        includes the end-of-sequence token when there is one), as
        :meth:`simsteer.generation.torch_engine.Engine.run`.

        Args:
            prompts: encoded prompts (``more`` may add to them while running).
            jobs: the sequences to generate (prompt index, sample, random stream).
            settings: temperature, top-k/p, length cap and rows decoded together (a
                job's own ``settings`` win).
            on_finish: called once per job.
            eos: token ids that end a sequence.
            on_token: called after every new token of a row; ``False`` ends the row.
            more: a live source of further jobs (a server's queue); without it the run
                ends when ``jobs`` are done.
            group_vectors: the control vector (layer -> vector) of a job group; the rows
                of each group are decoded with their own vector set on the context
                (``None``: the backend's vectors for every row).
            cells: key/value cache cells (tokens) of the context; a job is admitted only
                while the running rows' prompts and length caps leave room for its own
                (default: enough for the given jobs, or :data:`SERVE_CELLS` with ``more``).
        """
        if not jobs and more is None:
            return
        queue = deque(sorted(jobs, key=lambda j: -len(prompts[j.prompt])))
        width = min(settings.batch_size, MAX_SEQUENCES)
        if more is None:
            width = min(width, len(jobs))
        if cells is None:
            if more is not None:
                cells = SERVE_CELLS
            else:
                longest = sorted(self._cost(prompts, j, settings) for j in jobs)[-width:]
                cells = sum(longest) + BATCH_TOKENS
        self._context(cells, width)
        state = _State(settings, {int(t) for t in eos}, on_finish, self.lib.llama_get_memory(self.ctx))
        state.on_token, state.group_vectors, state.cells = on_token, group_vectors, self._shape[0]
        state.free = list(range(width - 1, -1, -1))
        rows: list[_Row] = []
        while True:
            if more is not None and state.free:
                fresh = more(len(state.free) - len(queue), not rows and not queue)
                if fresh is None:
                    break
                queue.extend(sorted(fresh, key=lambda j: -len(prompts[j.prompt])))
            if not queue and not rows:
                if more is None:
                    break
                continue
            admitted = self._take(prompts, queue, state, idle=not rows)
            if admitted:
                rows += self._admit(prompts, admitted, state)
                continue
            rows = self._step(rows, state)

    @staticmethod
    def _cost(prompts, job: Job, settings: DecodeSettings) -> int:
        """Cache cells a job can fill: its prompt, its length cap and one spare."""
        return len(prompts[job.prompt]) + (job.settings or settings).max_new_tokens + 1

    def _take(self, prompts, queue: deque[Job], state: _State, idle: bool) -> list[Job]:
        """The queued jobs that fit the free sequences and cache cells now (in order)."""
        taken: list[Job] = []
        while queue and len(taken) < len(state.free):
            cost = self._cost(prompts, queue[0], state.settings)
            if state.used + cost > state.cells:
                if idle and not taken and cost > state.cells:
                    raise SimsError(
                        f"a sequence of up to {cost} tokens does not fit llama.cpp's cache of {state.cells}"
                    )
                break
            state.used += cost
            taken.append(queue.popleft())
        return taken

    def _set_group(self, group: Hashable, state: _State) -> None:
        """Set ``group``'s control vector on the context (when rows are grouped).

        Every group's buffer spans layers 1 to n_layer - 1 (zero rows where it adds
        nothing), so switching changes only the vectors' values, never which layers
        the graph adds a vector to."""
        if state.group_vectors is None or state.current == (group,):
            return
        if group not in state.buffers:
            data, _, _ = control_vector_buffer(state.group_vectors(group), self.num_layers, self.hidden_size)
            state.buffers[group] = data
        data = state.buffers[group]
        self._set_cvec(self.ctx, data, 1, self.num_layers - 1, f" of steering group {group!r}")
        state.current = (group,)

    def _step(self, rows: list[_Row], state: _State) -> list[_Row]:
        """Decode the last token of every running row, one batch per steering group."""
        running: list[_Row] = []
        for group, members in _by_group(rows).items():
            self._set_group(group, state)
            logits = self._decode([(r.tokens[-1], r.position, r.seq, True) for r in members])
            for row in members:
                row.position += 1
            running += self._advance(members, [logits[i] for i in range(len(members))], state)
        return running

    def _admit(self, prompts, admitted: list[Job], state: _State) -> list[_Row]:
        """Prefill the admitted jobs' prompts (once per prompt and group) into free sequences."""
        new = [
            _Row(job, state.free.pop(), len(prompts[job.prompt]), self._cost(prompts, job, state.settings))
            for job in admitted
        ]
        out: list[_Row] = []
        for group, members in _by_group(new).items():
            self._set_group(group, state)
            first: dict[int, _Row] = {}
            for row in members:
                first.setdefault(row.job.prompt, row)
            entries: list[tuple[int, int, int, bool]] = []
            wanted: dict[int, int] = {}
            for prompt, row in first.items():
                ids = prompts[prompt]
                entries += [(int(t), i, row.seq, i == len(ids) - 1) for i, t in enumerate(ids)]
                wanted[prompt] = len(entries) - 1
            logits = self._decode(entries)
            for row in members:
                source = first[row.job.prompt]
                if row is not source:  # share the prompt's cells; no second prefill
                    self.lib.llama_memory_seq_cp(state.memory, source.seq, row.seq, -1, -1)
            out += self._advance(members, [logits[wanted[r.job.prompt]] for r in members], state)
        return out

    def _advance(self, rows: list[_Row], logits: list[np.ndarray], state: _State) -> list[_Row]:
        """Choose each row's next token; finish the rows that end (freeing their
        sequences and cells) and return the others."""
        chosen = choose_rows(
            torch.from_numpy(np.stack(logits)),
            [r.job.settings or state.settings for r in rows],
            [r.job.stream for r in rows],
            [len(r.tokens) for r in rows],
        )
        running = []
        for row, token in zip(rows, chosen, strict=True):
            row.tokens.append(int(token))
            limit = (row.job.settings or state.settings).max_new_tokens
            keep = state.on_token is None or state.on_token(row.job, row.tokens) is not False
            if token in state.eos or len(row.tokens) >= limit or not keep:
                state.on_finish(row.job, row.tokens)
                self.lib.llama_memory_seq_rm(state.memory, row.seq, -1, -1)
                state.free.append(row.seq)
                state.used -= row.cost
            else:
                running.append(row)
        return running


def _by_group(rows: list[_Row]) -> dict[Hashable, list[_Row]]:
    groups: dict[Hashable, list[_Row]] = {}
    for row in rows:
        groups.setdefault(row.job.group, []).append(row)
    return groups
