"""The generation engine behind ``sims serve``: one worker thread owns the model and
decodes queued requests together.

Requests that arrive within ``wait_s`` of each other and share a steering, strength,
temperature and top-p are decoded as one left-padded batch (up to ``max_batch``). Each
row stops on its own (end-of-sequence token, its ``max_tokens``, a stop string) through a
per-row stopping criterion, and every new piece of text is handed to the request's
``emit`` callback as it is decoded, which is what streaming sends. The model is only
ever touched by the worker thread, so steering hooks never mix between requests.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
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

    def key(self) -> tuple:
        return (self.steering, self.strength, self.temperature, self.top_p)


class _Rows(BaseStreamer, StoppingCriteria):
    """Turns each decoding step's tokens into text deltas and per-row stop flags."""

    def __init__(self, tokenizer, requests: list[GenerationRequest], eos: list[int]) -> None:
        self.tok, self.requests, self.eos = tokenizer, requests, set(eos)
        self.tokens: list[list[int]] = [[] for _ in requests]
        self.sent = [""] * len(requests)
        self.done = [False] * len(requests)
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        for row, token in enumerate(value.view(-1).tolist()):
            if self.done[row]:
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
            if not self.done[row]:
                self._finish(row, "length")

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)

    def _send(self, row: int, text: str) -> None:
        if text.startswith(self.sent[row]) and len(text) > len(self.sent[row]):
            self.requests[row].emit("delta", text[len(self.sent[row]) :])
            self.sent[row] = text

    def _finish(self, row: int, reason: str) -> None:
        self.done[row] = True
        self.requests[row].emit("done", reason)


class BatchEngine:
    """A worker thread that batches and decodes :class:`GenerationRequest` objects.

    Args:
        lm: the frozen model.
        steerings: named policies a request may pick (each a stack of steerings).
        max_batch: most sequences decoded together.
        wait_s: how long the worker waits for more requests before decoding.
        seed: seeds the sampling of each batch (batch i uses ``seed + i``).
    """

    def __init__(
        self,
        lm: LoadedModel,
        steerings: dict[str, list[Steering]] | None = None,
        max_batch: int = 32,
        wait_s: float = 0.01,
        seed: int = 0,
    ) -> None:
        self.lm = lm
        self.steerings = steerings or {}
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.seed = seed
        self.eos = eos_token_ids(lm.model, lm.tokenizer)
        self.pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else self.eos[0]
        self.batches = 0
        self._queue: queue.Queue[GenerationRequest] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sims-serve-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def submit(self, request: GenerationRequest) -> None:
        self._queue.put(request)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            pending = [first]
            deadline = time.monotonic() + self.wait_s
            while len(pending) < self.max_batch:
                left = deadline - time.monotonic()
                try:
                    pending.append(
                        self._queue.get(timeout=max(left, 0)) if left > 0 else self._queue.get_nowait()
                    )
                except queue.Empty:
                    break
            groups: dict[tuple, list[GenerationRequest]] = {}
            for req in pending:
                groups.setdefault(req.key(), []).append(req)
            for group in groups.values():
                self._decode(group)

    def _decode(self, group: list[GenerationRequest]) -> None:
        rows = _Rows(self.lm.tokenizer, group, self.eos)
        first = group[0]
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
                    req.emit("error", f"{type(exc).__name__}: {exc}")
