"""The FastAPI application of ``sims serve`` (see :mod:`simsteer.serve.server`).

Request bodies are read as plain JSON and checked by hand (:mod:`.params`), so any field
an OpenAI client sends is accepted and the errors use OpenAI's ``{"error": {...}}`` shape.
Every request passes :class:`~simsteer.serve.access.AccessControl` first; its body must arrive
within ``body_timeout_s``, and its prompt is templated and tokenised beside the event loop
(:mod:`.encoding`), then checked against the model's context. A request's rows are
queued all together or refused with 429, and cancelled as soon as its client goes away,
streaming or not, so an abandoned request stops costing decoding steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..models import context_length
from .access import AccessControl, error_body, internal_error_message, request_id
from .config import ServeConfig
from .encoding import PromptEncoder
from .engine import BatchEngine, GenerationRequest, QueueFull
from .params import BadRequest, Options, check_choices, parse_options, read_json
from .playground import add_playground

log = logging.getLogger(__name__)

#: How often (seconds) a waiting request asks whether its client is still there.
DISCONNECT_POLL_S = 0.25
#: Retry-After (seconds) sent with 429.
RETRY_AFTER_S = 1


def error(status: int, message: str, kind: str = "invalid_request_error", **headers: str) -> JSONResponse:
    return JSONResponse(error_body(status, message, kind), status, headers=headers or None)


class _Rows:
    """One request's queued rows and the events the engine sends back for them."""

    def __init__(self, engine: BatchEngine, prompts: list[list[int]], opts: Options) -> None:
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.rows: list[GenerationRequest] = []
        for index in range(len(prompts) * opts.n):

            def emit(kind: str, payload: str, index: int = index) -> None:
                # The loop may be gone when a cancelled row's last event arrives: nobody listens.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self.events.put_nowait, (index, kind, payload))

            self.rows.append(
                GenerationRequest(
                    ids=prompts[index // opts.n],
                    max_tokens=opts.max_tokens,
                    emit=emit,
                    temperature=opts.temperature,
                    top_p=opts.top_p,
                    steering=opts.steering,
                    strength=opts.strength,
                    stop=opts.stop,
                    seed=opts.seed,
                    sample=index % opts.n,
                )
            )
        try:
            engine.submit(*self.rows)
        except QueueFull:
            raise BadRequest(429, "the server is busy; retry shortly", "rate_limit_error") from None

    def cancel(self) -> None:
        for row in self.rows:
            row.cancel()

    async def events_until_done(self, request: Request) -> AsyncIterator[tuple[int, str, str]]:
        """Yield (choice index, kind, payload) until every row is done; stop (and cancel
        the rows) when the client disconnects."""
        open_rows = len(self.rows)
        checked = time.monotonic()
        try:
            while open_rows:
                # Poll for a disconnect even while events keep coming (a stream never idles).
                if time.monotonic() - checked >= DISCONNECT_POLL_S:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        log.info("request %s: client disconnected, cancelling", request_id(request))
                        return
                try:
                    index, kind, payload = await asyncio.wait_for(self.events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    continue
                if kind != "delta":
                    open_rows -= 1
                yield index, kind, payload
        finally:
            self.cancel()  # a no-op for finished rows


class _CancellingStream(StreamingResponse):
    """A streaming response that cancels its rows however it ends (also when the client
    left before the first chunk was pulled from the generator)."""

    def __init__(self, content: AsyncIterator[str], rows: _Rows) -> None:
        super().__init__(content, media_type="text/event-stream")
        self.rows = rows

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.rows.cancel()


def create_app(engine: BatchEngine, config: ServeConfig):
    """The FastAPI application (the engine must be started by the caller).

    Args:
        engine: the started :class:`BatchEngine` that decodes the requests.
        config: the server's identity and limits.
    """
    app = FastAPI(title="simsteer", docs_url=None, redoc_url=None)
    app.add_middleware(AccessControl, config=config)
    add_playground(app)  # the static page at /playground
    encoder = PromptEncoder(engine.lm.tokenizer, config, context_length(engine.lm.model))

    def failed(request: Request, kind: str, detail: str) -> str:
        """What the client is told of a row that failed: its own failure ("failed"), or
        only a request id when the batch failed ("error"; the details go to the log)."""
        rid = request_id(request)
        if kind == "failed":
            log.warning("request %s: a completion failed: %s", rid, detail)
            return f"{detail} (request id {rid})"
        log.error("request %s: generation failed: %s", rid, detail)
        return internal_error_message(rid)

    async def respond(request: Request, prompts: list[list[int]], opts: Options, chat: bool):
        check_choices(len(prompts), opts, config)
        opts = encoder.fit(prompts, opts)
        rows = _Rows(engine, prompts, opts)  # 429 here, before any response starts
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        kind_name = "chat.completion" if chat else "text_completion"
        # The steering and strength used, in every reply and chunk (extra fields an OpenAI client ignores).
        steering = opts.steering or "none"
        base = {
            "id": ident,
            "created": created,
            "model": config.model_name,
            "steering": steering,
            "strength": opts.strength,
        }
        log.info(
            "request %s: %s, steering %s, strength %g, %d completion(s), max_tokens %d",
            request_id(request),
            request.url.path,
            steering,
            opts.strength,
            len(rows.rows),
            opts.max_tokens,
        )

        def choice(index: int, text: str | None, finish: str | None, stream: bool) -> dict[str, Any]:
            if not chat:
                return {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
            if stream:
                return {
                    "index": index,
                    "delta": {} if text is None else {"content": text},
                    "finish_reason": finish,
                }
            return {
                "index": index,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
            }

        if opts.stream:

            async def sse():
                obj = kind_name + (".chunk" if chat else "")
                if chat:
                    for i in range(len(rows.rows)):
                        first = {
                            **base,
                            "object": obj,
                            "choices": [
                                {
                                    "index": i,
                                    "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None,
                                }
                            ],
                        }
                        yield f"data: {json.dumps(first)}\n\n"
                async for index, kind, payload in rows.events_until_done(request):
                    if kind in ("error", "failed"):
                        message = failed(request, kind, payload)
                        failure = {"error": {"message": message, "type": "server_error", "index": index}}
                        yield f"data: {json.dumps(failure)}\n\n"
                        continue
                    text, finish = (payload, None) if kind == "delta" else (None, payload)
                    chunk = {**base, "object": obj, "choices": [choice(index, text, finish, True)]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"

            return _CancellingStream(sse(), rows)

        texts: dict[int, str] = {}
        finish: dict[int, str] = {}
        async for index, kind, payload in rows.events_until_done(request):
            if kind == "delta":
                texts[index] = texts.get(index, "") + payload
            elif kind in ("error", "failed"):
                return error(500, failed(request, kind, payload), "server_error")
            else:
                finish[index] = payload
        if len(finish) < len(rows.rows):  # the client left; nobody reads this
            return error(400, "the client disconnected")
        completion = sum(r.completion_tokens for r in rows.rows)
        prompt_tokens = sum(len(p) for p in prompts)
        return JSONResponse(
            {
                **base,
                "object": kind_name,
                "choices": [choice(i, texts.get(i, ""), finish.get(i), False) for i in range(len(rows.rows))],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion,
                    "total_tokens": prompt_tokens + completion,
                },
            }
        )

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest):
        headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.status == 429 else {}
        if exc.close:  # e.g. a body that never finished: the connection is not reused
            headers["Connection"] = "close"
        return error(exc.status, exc.message, exc.kind, **headers)

    @app.get("/health")
    async def health():
        # What decodes, and how busy it is (rows decoding now, rows waiting).
        busy = {"active": len(engine.active), "queued": engine.queued}
        return {"status": "ok", "engine": engine.engine, **busy}

    @app.get("/v1/models")
    async def models():
        ids = [config.model_name, *(f"{config.model_name}:{name}" for name in engine.steerings)]
        return {
            "object": "list",
            "data": [{"id": i, "object": "model", "created": 0, "owned_by": "simsteer"} for i in ids],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request, config.max_request_bytes, config.body_timeout_s)
        opts = parse_options(body, config, engine.steerings)
        return await respond(request, [await encoder.chat(body.get("messages"))], opts, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request, config.max_request_bytes, config.body_timeout_s)
        opts = parse_options(body, config, engine.steerings)
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise BadRequest(400, "prompt must be a string or a list of strings")
        check_choices(len(prompts), opts, config)  # before tokenizing hundreds of prompts
        return await respond(request, await encoder.completions(prompts), opts, chat=False)

    return app
