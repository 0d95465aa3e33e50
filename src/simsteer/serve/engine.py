"""The generation engine behind ``sims serve``: one worker thread owns the model and
decodes queued requests together.

Requests that arrive within ``wait_s`` of each other and share a steering, strength,
temperature and top-p are decoded as one left-padded batch (up to ``max_batch``). Each
row stops on its own (end-of-sequence token, its ``max_tokens``, a stop string) through a
per-row stopping criterion, and every new piece of text is handed to the request's
``emit`` callback as it is decoded, which is what streaming sends. The model is only
ever touched by the worker thread, so steering hooks never mix between requests.

The queue is bounded (``max_queue`` waiting rows; :meth:`BatchEngine.submit` raises
:class:`QueueFull` rather than queue more), and a cancelled row (its client went away)
is dropped from the queue or stops decoding at the next token.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..models import LoadedModel
from ..steering import Steering
from ..tokens import eos_token_ids, left_pad

log = logging.getLogger(__name__)

# emit(kind, payload): ("delta", text) any number of times, then ("done", finish_reason)
# or ("error", message) exactly once.
Emit = Callable[[str, str], None]


@dataclass
class GenerationRequest:
    """One completion to decode (an ``n > 1`` request submits n of them)."""

    ids: list[int]
    max_tokens: int
    emit: Emit
    temperature: float = 1.0
    top_p: float = 1.0
    steering: str | None = None
    strength: float = 1.0
    stop: tuple[str, ...] = ()
    completion_tokens: int = field(default=0, init=False)
    cancelled: threading.Event = field(default_factory=threading.Event, init=False, repr=False)

    def key(self) -> tuple:
        return (self.steering, self.strength, self.temperature, self.top_p)

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


class _Rows(BaseStreamer, StoppingCriteria):
    """Turns each decoding step's tokens into text deltas and per-row stop flags."""

    def __init__(self, tokenizer, requests: list[GenerationRequest], eos: list[int]) -> None:
        self.tok, self.requests, self.eos = tokenizer, requests, set(eos)
        self.tokens: list[list[int]] = [[] for _ in requests]
        self.sent = [""] * len(requests)
        self.done = [False] * len(requests)
        self.cancelled = 0
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        for row, token in enumerate(value.view(-1).tolist()):
            if self.done[row] or self._dropped(row):
                continue
            req = self.requests[row]
            if token in self.eos:
                self._finish(row, "stop")
                continue
            self.tokens[row].append(token)
            req.completion_tokens = len(self.tokens[row])
            text = self.tok.decode(self.tokens[row], skip_special_tokens=True)
            cut = min((i for i in (text.find(s) for s in req.stop if s) if i >= 0), default=-1)
            if cut >= 0:
                self._send(row, text[:cut])
                self._finish(row, "stop")
            elif not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                self._send(row, text)
            if not self.done[row] and len(self.tokens[row]) >= req.max_tokens:
                self._send(row, self.tok.decode(self.tokens[row], skip_special_tokens=True))
                self._finish(row, "length")

    def end(self) -> None:
        for row in range(len(self.requests)):
            if not self.done[row] and not self._dropped(row):
                self._finish(row, "length")

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        for row in range(len(self.requests)):  # a row cancelled since put() stops now
            if not self.done[row]:
                self._dropped(row)
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)

    def _dropped(self, row: int) -> bool:
        """Mark a cancelled row done without a word to its (gone) client."""
        if not self.requests[row].cancelled.is_set():
            return False
        self.done[row] = True
        self.cancelled += 1
        return True

    def _send(self, row: int, text: str) -> None:
        if text.startswith(self.sent[row]) and len(text) > len(self.sent[row]):
            _emit(self.requests[row], "delta", text[len(self.sent[row]) :])
            self.sent[row] = text

    def _finish(self, row: int, reason: str) -> None:
        self.done[row] = True
        _emit(self.requests[row], "done", reason)


class BatchEngine:
    """A worker thread that batches and decodes :class:`GenerationRequest` objects.

    Args:
        lm: the frozen model.
        steerings: named policies a request may pick (each a stack of steerings).
        max_batch: most sequences decoded together.
        wait_s: how long the worker waits for more requests before decoding.
        seed: seeds the sampling of each batch (batch i uses ``seed + i``).
        max_queue: most rows waiting to be decoded (rows being decoded do not count).

    Attributes:
        batches: forward batches decoded so far.
        rows_cancelled: rows dropped after their client went away (queued or mid-decode).
        active: the rows of the batch being decoded now (empty when idle).
    """

    def __init__(
        self,
        lm: LoadedModel,
        steerings: dict[str, list[Steering]] | None = None,
        max_batch: int = 32,
        wait_s: float = 0.01,
        seed: int = 0,
        max_queue: int = 256,
    ) -> None:
        self.lm = lm
        self.steerings = steerings or {}
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.seed = seed
        self.max_queue = max_queue
        self.eos = eos_token_ids(lm.model, lm.tokenizer)
        self.pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else self.eos[0]
        self.batches = 0
        self.rows_cancelled = 0
        self.active: list[GenerationRequest] = []
        self._pending: deque[GenerationRequest] = deque()
        self._ready = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sims-serve-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        with self._ready:
            self._ready.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

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

    def _next(self, timeout: float) -> GenerationRequest | None:
        with self._ready:
            req = self._pop()
            if req is None and timeout > 0 and not self._stop.is_set():
                self._ready.wait(timeout)
                req = self._pop()
            return req

    def _loop(self) -> None:
        while not self._stop.is_set():
            first = self._next(0.1)
            if first is None:
                continue
            pending = [first]
            deadline = time.monotonic() + self.wait_s
            while len(pending) < self.max_batch:
                req = self._next(deadline - time.monotonic())
                if req is None:
                    if time.monotonic() >= deadline:
                        break
                    continue
                pending.append(req)
            groups: dict[tuple, list[GenerationRequest]] = {}
            for req in pending:
                groups.setdefault(req.key(), []).append(req)
            for group in groups.values():
                live = [r for r in group if not r.cancelled.is_set()]  # went away while waiting
                with self._ready:
                    self.rows_cancelled += len(group) - len(live)
                if live:
                    self._decode(live)

    def _decode(self, group: list[GenerationRequest]) -> None:
        rows = _Rows(self.lm.tokenizer, group, self.eos)
        first = group[0]
        self.active = group
        try:
            ids, mask = left_pad([r.ids for r in group], self.pad)
            kwargs: dict = dict(max_new_tokens=max(r.max_tokens for r in group), pad_token_id=self.pad)
            if first.temperature == 0:
                kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
            else:
                kwargs.update(do_sample=True, temperature=first.temperature, top_k=None, top_p=first.top_p)
            stack = self.steerings.get(first.steering, []) if first.steering else []
            with contextlib.ExitStack() as ctx, torch.inference_mode(), torch.random.fork_rng(devices=[]):
                for steering in stack:
                    ctx.enter_context(steering.applied(self.lm.model, strength=first.strength))
                torch.manual_seed(self.seed + self.batches)
                self.batches += 1
                self.lm.model.generate(
                    input_ids=ids.to(self.lm.device),
                    attention_mask=mask.to(self.lm.device),
                    eos_token_id=self.eos,
                    streamer=rows,
                    stopping_criteria=StoppingCriteriaList([rows]),
                    **kwargs,
                )
            rows.end()
        except Exception as exc:  # one bad batch must not take the server down
            log.exception("generation failed")
            for row, req in enumerate(group):
                if not rows.done[row]:
                    rows.done[row] = True
                    _emit(req, "error", f"{type(exc).__name__}: {exc}")
        finally:
            with self._ready:
                self.rows_cancelled += rows.cancelled
            self.active = []
