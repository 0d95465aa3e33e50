"""The FastAPI application of ``sims serve`` (see :mod:`simsteer.serve.server`).

Request bodies are read as plain JSON and checked by hand, so any field an OpenAI
client sends is accepted and the errors use OpenAI's ``{"error": {...}}`` shape.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .config import ServeConfig
from .engine import BatchEngine, GenerationRequest


class _BadRequest(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def create_app(engine: BatchEngine, config: ServeConfig):
    """The FastAPI application (the engine must be started by the caller)."""
    app = FastAPI(title="simsteer", docs_url=None, redoc_url=None)
    tok = engine.lm.tokenizer

    def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        size = request.headers.get("content-length")
        if size and size.isdigit() and int(size) > config.max_request_bytes:
            return error(413, f"request body over {config.max_request_bytes} bytes")
        key_ok = request.headers.get("authorization", "") == f"Bearer {config.api_key}"
        if config.api_key and request.url.path != "/health" and not key_ok:
            return error(401, "invalid or missing API key", "authentication_error")
        return await call_next(request)

    async def body_of(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if len(raw) > config.max_request_bytes:  # chunked bodies carry no length header
            raise _BadRequest(413, f"request body over {config.max_request_bytes} bytes")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _BadRequest(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _BadRequest(400, "the body must be a JSON object")
        return body

    def options(body: dict[str, Any]) -> dict[str, Any]:
        max_tokens = (
            body.get("max_completion_tokens")
            or body.get("max_tokens")
            or min(config.default_max_tokens, config.max_tokens_limit)
        )
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise _BadRequest(400, "max_tokens must be a positive integer")
        if max_tokens > config.max_tokens_limit:
            raise _BadRequest(
                400, f"max_tokens {max_tokens} is over this server's limit {config.max_tokens_limit}"
            )
        steering = body.get("steering", config.default_steering)
        model = str(body.get("model", ""))
        if "steering" not in body and ":" in model:  # model "NAME:STEERING" for plain clients
            steering = model.split(":", 1)[1]
        if steering in ("none", "", None):
            steering = None
        elif steering not in engine.steerings:
            known = ", ".join(["none", *engine.steerings])
            raise _BadRequest(400, f"unknown steering {steering!r}; this server has: {known}")
        n = body.get("n") or 1
        if not isinstance(n, int) or not 1 <= n <= 16:
            raise _BadRequest(400, "n must be an integer from 1 to 16")
        stop = body.get("stop") or ()
        stop = (stop,) if isinstance(stop, str) else tuple(str(s) for s in stop)
        try:
            temperature = float(body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0)
            top_p = float(body.get("top_p", 1.0) if body.get("top_p") is not None else 1.0)
            strength = float(body.get("strength", 1.0))
        except (TypeError, ValueError):
            raise _BadRequest(400, "temperature, top_p and strength must be numbers") from None
        if temperature < 0 or not 0 < top_p <= 1:
            raise _BadRequest(400, "temperature must be >= 0 and top_p in (0, 1]")
        return dict(
            max_tokens=max_tokens,
            steering=steering,
            strength=strength,
            n=n,
            stop=stop,
            temperature=temperature,
            top_p=top_p,
            stream=bool(body.get("stream", False)),
        )

    def check_length(ids: list[int]) -> list[int]:
        if len(ids) > config.max_prompt_tokens:
            raise _BadRequest(
                400, f"the prompt has {len(ids)} tokens; this server's limit is {config.max_prompt_tokens}"
            )
        return ids

    def chat_ids(messages: Any) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise _BadRequest(400, "messages must be a non-empty list")
        clean = []
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):  # content parts: keep the text ones
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if not isinstance(content, str):
                raise _BadRequest(400, "each message needs a role and text content")
            clean.append({"role": str(m.get("role", "user")), "content": content})
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(clean, tokenize=False, add_generation_prompt=True)
            return check_length(list(tok(text, add_special_tokens=False)["input_ids"]))
        from ..tokens import format_prompt

        joined = "\n\n".join(m["content"] for m in clean if m["role"] != "assistant")
        return check_length(list(tok(format_prompt(tok, joined))["input_ids"]))

    async def run(prompts: list[list[int]], opts: dict[str, Any], requests: list[GenerationRequest]):
        """Submit every (prompt, choice), collected in ``requests``, and yield
        (choice index, kind, payload) events."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        for index in range(len(prompts) * opts["n"]):

            def emit(kind: str, payload: str, index: int = index) -> None:
                loop.call_soon_threadsafe(events.put_nowait, (index, kind, payload))

            requests.append(
                GenerationRequest(
                    ids=prompts[index // opts["n"]],
                    max_tokens=opts["max_tokens"],
                    emit=emit,
                    temperature=opts["temperature"],
                    top_p=opts["top_p"],
                    steering=opts["steering"],
                    strength=opts["strength"],
                    stop=opts["stop"],
                )
            )
        for req in requests:
            engine.submit(req)
        open_rows = len(requests)
        while open_rows:
            index, kind, payload = await events.get()
            if kind != "delta":
                open_rows -= 1
            yield index, kind, payload

    async def respond(prompts: list[list[int]], opts: dict[str, Any], chat: bool):
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        kind_name = "chat.completion" if chat else "text_completion"
        base = {"id": ident, "created": created, "model": config.model_name}

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

        if opts["stream"]:

            async def sse():
                obj = kind_name + (".chunk" if chat else "")
                if chat:
                    for i in range(len(prompts) * opts["n"]):
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
                async for index, kind, payload in run(prompts, opts, []):
                    if kind == "error":
                        failure = {"error": {"message": payload, "type": "server_error"}}
                        yield f"data: {json.dumps(failure)}\n\n"
                        continue
                    text, finish = (payload, None) if kind == "delta" else (None, payload)
                    chunk = {**base, "object": obj, "choices": [choice(index, text, finish, True)]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream")

        texts: dict[int, str] = {}
        finish: dict[int, str] = {}
        requests: list[GenerationRequest] = []
        async for index, kind, payload in run(prompts, opts, requests):
            if kind == "delta":
                texts[index] = texts.get(index, "") + payload
            elif kind == "error":
                return error(500, f"generation failed: {payload}", "server_error")
            else:
                finish[index] = payload
        completion = sum(r.completion_tokens for r in requests)
        prompt_tokens = sum(len(p) for p in prompts)
        return JSONResponse(
            {
                **base,
                "object": kind_name,
                "choices": [choice(i, texts.get(i, ""), finish.get(i), False) for i in range(len(requests))],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion,
                    "total_tokens": prompt_tokens + completion,
                },
            }
        )

    @app.exception_handler(_BadRequest)
    async def bad_request(request: Request, exc: _BadRequest):
        return error(exc.status, exc.message, exc.kind)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        ids = [config.model_name, *(f"{config.model_name}:{name}" for name in engine.steerings)]
        return {
            "object": "list",
            "data": [{"id": i, "object": "model", "created": 0, "owned_by": "simsteer"} for i in ids],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await body_of(request)
        opts = options(body)
        return await respond([chat_ids(body.get("messages"))], opts, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await body_of(request)
        opts = options(body)
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise _BadRequest(400, "prompt must be a string or a list of strings")
        return await respond([check_length(list(tok(p)["input_ids"])) for p in prompts], opts, chat=False)

    return app
