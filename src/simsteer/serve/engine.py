"""The generation engine behind ``sims serve``: one worker thread owns the model and
decodes every request on :class:`simsteer.generation.torch_engine.Engine`, with continuous batching.

A request's rows join the running batch as soon as a row is free (after ``wait_s`` when
the worker was idle, so that requests arriving together share a prefill), and leave it
when they end (end-of-sequence token, their ``max_tokens``, a stop string, or a client
that went away), while the other rows keep decoding. Rows with different steerings,
strengths, temperatures and top-p share the batch: each (steering, strength) pair's hooks
edit only its own rows. Every new piece of text is handed to the request's ``emit``
callback as it is decoded, which is what streaming sends. The model is only ever touched
by the worker thread.

Sampling draws from per-row random streams (:mod:`simsteer.generation.decoding`): a request with a
``seed`` gets the same answer whenever it arrives and whatever else is running; without
one, rows take the server seed and their arrival number.

A row whose logits go inf/NaN (an extreme steering) fails alone on the torch engine and
its batch-mates decode on; on llama.cpp, whose rows share one cache, the rows decoding
with it fail too and the cache is cleared (:class:`_RowSafeLlamaCpp`).

The queue is bounded (``max_queue`` waiting rows; :meth:`BatchEngine.submit` raises
:class:`QueueFull` rather than queue more), and a cancelled row (its client went away)
is dropped from the queue or stops decoding at the next token.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import SimsError
from ..generation.decoding import stream_id
from ..generation.llamacpp import LlamaCppBackend, gguf_file
from ..generation.torch_engine import DecodeSettings, Engine, Job
from ..generation.vllm_engine import vllm_backend
from ..models import LoadedModel
from ..policy import Policy
from ..steering import Steering
from ..tokens import eos_token_ids, pad_token_id

log = logging.getLogger(__name__)

# emit(kind, payload): ("delta", text) any number of times, then exactly one of
# ("done", finish_reason), ("failed", message for the client: this row alone failed) or
# ("error", internal message: the batch failed; the client is told only a request id).
Emit = Callable[[str, str], None]

#: Why a row whose logits stopped being finite failed (told to its client).
NON_FINITE = "the model's logits became inf/NaN for this completion (is the steering strength too large?)"


@dataclass
class GenerationRequest:
    """One completion to decode (an ``n > 1`` request submits n of them).

    Attributes:
        seed: makes the row's samples reproducible (with ``sample``, its index among
            the request's ``n`` rows); None = the server seed and the arrival number.
    """

    ids: list[int]
    max_tokens: int
    emit: Emit
    temperature: float = 1.0
    top_p: float = 1.0
    steering: str | None = None
    strength: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    sample: int = 0
    completion_tokens: int = field(default=0, init=False)
    cancelled: threading.Event = field(default_factory=threading.Event, init=False, repr=False)

    def cancel(self) -> None:
        """Stop decoding this row (its client went away); safe from any thread."""
        self.cancelled.set()


class QueueFull(Exception):
    """The engine's queue has no room for a request's rows (the server answers 429)."""


def _emit(req: GenerationRequest, kind: str, payload: str) -> None:
    # One client's broken callback (its event loop closed) must not fail the whole batch.
    try:
        req.emit(kind, payload)
    except Exception:
        log.warning("dropping a row whose callback failed", exc_info=True)
        req.cancel()


@dataclass
class _Live:
    """A row in the running batch: its request and what was sent of its text."""

    req: GenerationRequest
    sent: str = ""
    reason: str | None = None  # set when a stop string ended the row
    failure: str | None = None  # set when the row failed alone (its logits went non-finite)


class BatchEngine:
    """A worker thread that batches and decodes :class:`GenerationRequest` objects.

    Args:
        lm: the frozen model.
        steerings: named policies a request may pick (each a stack of steerings).
        max_batch: most sequences decoded together.
        wait_s: how long an idle worker waits for more requests before decoding.
        seed: the random streams of rows whose request names no seed.
        max_queue: most rows waiting to be decoded (rows being decoded do not count).
        engine: ``"torch"`` (:class:`simsteer.generation.torch_engine.Engine`, any steering),
            ``"llamacpp"`` (:class:`simsteer.generation.llamacpp.LlamaCppBackend` on the model's GGUF
            file; every steering must be additive) or ``"vllm"``
            (:class:`simsteer.generation.vllm_engine.VllmBackend`: each steering a slot of the
            op's table, picked per request); see :func:`simsteer.generation.engines.choose_engine`.
        cells: llama.cpp's key/value cache in tokens (default
            :data:`simsteer.generation.llamacpp.SERVE_CELLS`).

    Attributes:
        batches: admissions so far (groups of rows prefilled together).
        rows_cancelled: rows dropped after their client went away (queued or mid-decode).
        active: the rows being decoded now (empty when idle).
    """

    def __init__(
        self,
        lm: LoadedModel,
        steerings: dict[str, list[Steering]] | None = None,
        max_batch: int = 32,
        wait_s: float = 0.01,
        seed: int = 0,
        max_queue: int = 256,
        engine: str = "torch",
        cells: int | None = None,
    ) -> None:
        if engine not in ("torch", "llamacpp", "vllm"):
            raise SimsError(f"unknown serving engine {engine!r}: torch, llamacpp or vllm")
        self.lm = lm
        self.engine = engine
        self.cells = cells
        self._backend = None  # the LlamaCppBackend or VllmBackend, made by start()
        self._slots: dict[str, int] = {}  # vLLM: steering name -> its slot in the op's table
        self.steerings = steerings or {}
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.seed = seed
        self.max_queue = max_queue
        self.eos = eos_token_ids(lm.model, lm.tokenizer)
        self.pad = pad_token_id(lm.tokenizer, self.eos[0])
        self.batches = 0
        self.rows_cancelled = 0
        self.active: list[GenerationRequest] = []
        self._live: dict[int, _Live] = {}
        self._prompts: dict[int, list[int]] = {}
        self._arrivals = 0
        self._pending: deque[GenerationRequest] = deque()
        self._ready = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sims-serve-engine", daemon=True)

    def start(self) -> None:
        """Start the worker thread (llama.cpp loads its model here, so that a file it
        cannot load is an error at start-up, not on the first request)."""
        if self.engine == "llamacpp" and self._backend is None:
            path = gguf_file(self.lm)
            if path is None:
                raise SimsError(f"the llamacpp engine needs a GGUF model; {self.lm.source!r} is not one")
            self._backend = _RowSafeLlamaCpp(path, on_bad_row=self._bad_row)
        if self.engine == "vllm" and self._backend is None:
            self._backend = vllm_backend(self.lm)
            self._backend.set_policy(Policy())
            for slot, (name, steerings) in enumerate(self.steerings.items(), start=1):
                self._backend.load_slot(slot, Policy(steerings))
                self._slots[name] = slot
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        with self._ready:
            self._ready.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        if self._backend is not None and not self._thread.is_alive():
            if self.engine == "llamacpp":  # vLLM's engine belongs to the model (vllm_backend)
                self._backend.close()
            self._backend = None

    def submit(self, *requests: GenerationRequest) -> None:
        """Queue ``requests`` all together, or none of them.

        Raises:
            QueueFull: fewer than ``len(requests)`` places are free in the queue.
        """
        with self._ready:
            if len(self._pending) + len(requests) > self.max_queue:
                self._purge()  # rows whose clients left hold no place
            if len(self._pending) + len(requests) > self.max_queue:
                raise QueueFull(f"{len(self._pending)} of {self.max_queue} queue places are taken")
            self._pending.extend(requests)
            self._ready.notify()

    @property
    def queued(self) -> int:
        """Rows waiting for the worker (cancelled ones until the worker drops them)."""
        with self._ready:
            return len(self._pending)

    def _purge(self) -> None:
        """Drop every cancelled queued row (the caller holds ``_ready``)."""
        live = deque(r for r in self._pending if not r.cancelled.is_set())
        self.rows_cancelled += len(self._pending) - len(live)
        self._pending = live

    def _pop(self) -> GenerationRequest | None:
        """The oldest live queued row (the caller holds ``_ready``); cancelled ones are dropped."""
        while self._pending:
            req = self._pending.popleft()
            if not req.cancelled.is_set():
                return req
            self.rows_cancelled += 1
        return None

    def _loop(self) -> None:
        defaults = DecodeSettings(1.0, 0, 1.0, 1, self.max_batch)
        engine = None
        if self._backend is None:
            engine = _RowSafeEngine(self.lm.model, self.eos, self.pad, on_bad_row=self._bad_row)
        while not self._stop.is_set():
            try:
                if self.engine == "vllm":
                    self._backend.run_live(
                        self._prompts,
                        defaults,
                        self._finish,
                        self.eos,
                        on_token=self._token,
                        more=self._more,
                        route=self._route,
                    )
                elif self._backend is not None:
                    self._backend.run(
                        self._prompts,
                        [],
                        defaults,
                        self._finish,
                        self.eos,
                        on_token=self._token,
                        more=self._more,
                        group_vectors=self._vectors,
                        cells=self.cells,
                    )
                else:
                    with torch.inference_mode():
                        engine.run(
                            self._prompts, [], defaults, self._finish, self._token, self._more, self._steer
                        )
            except SharedCacheSpoiled as exc:  # a NaN row on llama.cpp: its batch-mates too
                log.warning("a row's logits went non-finite; failing the rows sharing its cache")
                self._fail_live(str(exc), kind="failed")
            except Exception as exc:  # one bad batch must not take the server down
                log.exception("generation failed")
                self._fail_live(f"{type(exc).__name__}: {exc}")

    def _fail_live(self, message: str, kind: str = "error") -> None:
        """Fail every row decoding now (a row that failed alone keeps its own reason)."""
        for live in self._live.values():
            if not live.req.cancelled.is_set():
                _emit(live.req, "failed" if live.failure else kind, live.failure or message)
        self._live.clear()
        self._prompts.clear()
        self.active = []

    def _more(self, free: int, idle: bool) -> list[Job] | None:
        """Queued rows for the engine's free slots (blocks briefly when idle)."""
        if self._stop.is_set():
            return None
        with self._ready:
            if idle and not self._pending:
                self._ready.wait(0.1)
                if not self._pending:
                    return None if self._stop.is_set() else []
        if idle and self.wait_s > 0:
            time.sleep(self.wait_s)  # let requests arriving together share a prefill
        jobs = []
        with self._ready:
            while len(jobs) < free:
                req = self._pop()
                if req is None:
                    break
                jobs.append(self._job(req))
        if jobs:
            self.batches += 1
            self.active = [live.req for live in self._live.values()]
        return jobs

    def _job(self, req: GenerationRequest) -> Job:
        self._arrivals += 1
        key = self._arrivals
        if req.seed is None:
            stream = stream_id(self.seed, key, 0)
        else:
            stream = stream_id(req.seed, zlib.crc32(repr(req.ids).encode()), req.sample)
        self._prompts[key] = list(req.ids)
        self._live[key] = _Live(req)
        group = (req.steering, req.strength) if req.steering else None
        settings = DecodeSettings(req.temperature, 0, req.top_p, req.max_tokens, self.max_batch)
        return Job(key, 0, stream, group=group, settings=settings)

    def _vectors(self, group: Hashable) -> dict[int, torch.Tensor]:
        """The control vector of a (steering, strength) group (llama.cpp engine)."""
        if group is None:
            return {}
        name, strength = group
        vectors = Policy(self.steerings.get(name, [])).additive_vectors()
        return {layer: vector * float(strength) for layer, vector in vectors.items()}

    def _route(self, group: Hashable) -> tuple[int, float, str | None]:
        """A (steering, strength) group's slot in vLLM's op table, its multiplier and the
        cache salt that keeps its prompt state apart from every other steering's."""
        if group is None:
            return 0, 1.0, None
        name, strength = group
        return self._slots[name], float(strength), f"simsteer:{name}:{float(strength)!r}"

    def _steer(self, group: Hashable, rows):
        name, strength = group
        return Policy(self.steerings.get(name, [])).applied(self.lm.model, strength=strength, rows=rows)

    def _bad_row(self, job: Job) -> None:
        """A row's logits went non-finite: it ends at this token and fails alone."""
        self._live[job.prompt].failure = NON_FINITE

    def _token(self, job: Job, tokens: list[int]) -> bool:
        live = self._live[job.prompt]
        req = live.req
        if req.cancelled.is_set() or live.failure is not None:
            return False
        if tokens[-1] in self.eos:
            return True  # the engine ends the row; _finish says "stop"
        req.completion_tokens = len(tokens)
        text = self.lm.tokenizer.decode(tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in req.stop if s) if i >= 0), default=-1)
        if cut >= 0:
            self._send(live, text[:cut])
            live.reason = "stop"
            return False
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            self._send(live, text)
        return True

    def _finish(self, job: Job, tokens: list[int]) -> None:
        live = self._live.pop(job.prompt)
        self._prompts.pop(job.prompt, None)
        self.active = [r.req for r in self._live.values()]
        req = live.req
        if req.cancelled.is_set():
            with self._ready:
                self.rows_cancelled += 1
            return
        if live.failure is not None:
            log.warning("a row failed alone: %s", live.failure)
            _emit(req, "failed", live.failure)
            return
        if live.reason is None:
            ended = bool(tokens) and tokens[-1] in self.eos
            if not ended:
                self._send(live, self.lm.tokenizer.decode(tokens, skip_special_tokens=True))
            live.reason = "stop" if ended else "length"
        _emit(req, "done", live.reason)

    def _send(self, live: _Live, text: str) -> None:
        if text.startswith(live.sent) and len(text) > len(live.sent):
            _emit(live.req, "delta", text[len(live.sent) :])
            live.sent = text


# -- rows that fail alone --------------------------------------------------------------------
def non_finite_rows(logits: torch.Tensor, temperatures: list[float]) -> list[int]:
    """The rows of ``[rows, vocab]`` logits that hold NaN or +inf, or whose largest logit
    overflows once divided by the row's temperature (sampling them would raise for the
    whole batch, greedy would pick garbage); a ``-inf`` logit alone is only a token that
    cannot be drawn."""
    scale = torch.tensor([t if t > 0 else 1.0 for t in temperatures], dtype=torch.float32)
    peak = logits.detach().float().amax(dim=-1).cpu()  # a NaN anywhere in a row gives NaN
    return (~torch.isfinite(peak / scale)).nonzero().flatten().tolist()


class _RowSafeEngine(Engine):
    """:class:`simsteer.generation.torch_engine.Engine` on which a row whose logits go non-finite fails
    alone: ``on_bad_row(job)`` is told, the row gets a placeholder token (its ``on_token``
    then ends it), and the batch-mates decode on.

    Its keys and values, NaN from the bad layer on, stay in its store row; masked columns
    count as ``0 x value``, so before another row is admitted every idle row is zeroed."""

    def __init__(self, model, eos, pad, on_bad_row: Callable[[Job], None]) -> None:
        super().__init__(model, eos, pad)
        self.on_bad_row = on_bad_row
        self._dirty = False  # a failed row's store row may hold NaN

    def _choose(self, logits, rows, settings):
        bad = non_finite_rows(logits, [(r.job.settings or settings).temperature for r in rows])
        if bad:
            for i in bad:
                self.on_bad_row(rows[i].job)
            logits = logits.clone()
            logits[bad] = 0.0
            self._dirty = True
        return super()._choose(logits, rows, settings)

    def _admit(self, prompts, admitted, state, store, *rest) -> None:
        if self._dirty:
            idle = [i for i, row in enumerate(state.rows) if row is None]
            for buffers in (store.keys, store.values):
                for buffer in buffers:
                    if buffer is not None and idle:
                        buffer[idle] = 0
            self._dirty = False
        super()._admit(prompts, admitted, state, store, *rest)


class SharedCacheSpoiled(Exception):
    """A row's logits went non-finite on llama.cpp: its NaN keys and values sit in the
    cache every row shares, so the rows decoding now cannot be trusted (see
    :class:`_RowSafeLlamaCpp`)."""


#: What the rows decoding beside such a row on llama.cpp are told.
SPOILED = (
    "a completion decoded in the same llama.cpp batch had its logits become inf/NaN (is a steering "
    "strength too large?); llama.cpp shares one cache between the rows, so every row decoding then "
    "was stopped; retry this request"
)


class _RowSafeLlamaCpp(LlamaCppBackend):
    """:class:`simsteer.generation.llamacpp.LlamaCppBackend` that stops the run as soon as a row's
    logits go non-finite (:class:`SharedCacheSpoiled`).

    Unlike the torch engine's per-row store, llama.cpp's rows share one cache, and its
    attention (flash attention stays off, see :mod:`simsteer.generation.llamacpp`) reads the masked
    cells of other rows as ``0 x value``: NaN there spreads to every row, and stays in the
    freed cells for the rows after them (every later request failed before this). The
    worker fails the rows decoding now and starts a new run, whose context clears the
    cache with its data."""

    def __init__(self, path, on_bad_row: Callable[[Job], None]) -> None:
        super().__init__(path)
        self.on_bad_row = on_bad_row

    def _advance(self, rows, logits, state):
        temperatures = [(r.job.settings or state.settings).temperature for r in rows]
        bad = non_finite_rows(torch.from_numpy(np.stack(logits)), temperatures)
        if bad:
            for i in bad:
                self.on_bad_row(rows[i].job)
            raise SharedCacheSpoiled(SPOILED)
        return super()._advance(rows, logits, state)
