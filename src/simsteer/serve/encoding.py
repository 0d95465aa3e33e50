"""Turning a ``sims serve`` request's prompt into token ids, off the event loop.

Templating and tokenising a prompt of up to ``max_request_bytes`` takes long enough (a
1 MB prompt: most of a second) to stall every other client, ``/health`` included, if it
ran on the event loop. :class:`PromptEncoder` runs it on one thread of its own, for one
request at a time, and lets at most ``max_queue`` requests wait for it (more get 429).
The ids are then checked against the server's prompt limit and the model's context.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, TypeVar

from .config import ServeConfig
from .params import BadRequest, Options

T = TypeVar("T")


class PromptEncoder:
    """The prompts of requests as token ids (see the module docstring).

    Args:
        tokenizer: the served model's tokenizer.
        config: the server's limits (``max_prompt_tokens``, ``max_queue``).
        context: the model's context in tokens (``None``: unknown, not checked); a
            prompt with its ``max_tokens`` must fit it.
    """

    def __init__(self, tokenizer: Any, config: ServeConfig, context: int | None) -> None:
        self.tok, self.config, self.context = tokenizer, config, context
        self.waiting = 0  # requests waiting for or being served by the thread (loop-only)
        # Its idle thread ends with the executor (garbage-collected with the app) or at exit.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sims-serve-tokenizer")

    async def _off_loop(self, work: Callable[..., T], *args: Any) -> T:
        if self.waiting >= self.config.max_queue:
            raise BadRequest(429, "the server is busy; retry shortly", "rate_limit_error")
        self.waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, work, *args)
        finally:
            self.waiting -= 1

    async def chat(self, messages: Any) -> list[int]:
        """The ids of a chat request's ``messages`` (templated when the tokenizer has a template)."""
        return await self._off_loop(self._chat_ids, messages)

    async def completions(self, prompts: list[str]) -> list[list[int]]:
        """The ids of each prompt of a completions request."""
        return await self._off_loop(lambda texts: [list(self.tok(t)["input_ids"]) for t in texts], prompts)

    def fit(self, prompts: list[list[int]], opts: Options) -> Options:
        """Refuse (400) an empty prompt, one over ``max_prompt_tokens``, and one that with its
        ``max_tokens`` does not fit the model's context; a ``max_tokens`` the request did
        not set is shortened to what fits.

        Returns:
            ``opts``, with the shortened ``max_tokens`` where it was the server's default.
        """
        limit = self.config.max_prompt_tokens
        for ids in prompts:
            if not ids:
                raise BadRequest(400, "the prompt is empty")
            if len(ids) > limit:
                raise BadRequest(400, f"the prompt has {len(ids)} tokens; this server's limit is {limit}")
        longest = max(len(ids) for ids in prompts)
        if self.context is None or longest + opts.max_tokens <= self.context:
            return opts
        room = self.context - longest
        if not opts.max_tokens_given and room >= 1:
            return replace(opts, max_tokens=room)
        raise BadRequest(
            400,
            f"the prompt has {longest} tokens; with max_tokens {opts.max_tokens} it does not fit the "
            f"model's context of {self.context} tokens (shorten the prompt or lower max_tokens)",
        )

    def _chat_ids(self, messages: Any) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise BadRequest(400, "messages must be a non-empty list")
        clean = []
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):  # content parts: keep the text ones
                texts = [p["text"] for p in content if isinstance(p, dict) and "text" in p]
                content = "".join(texts) if all(isinstance(t, str) for t in texts) else None
            if not isinstance(content, str):
                raise BadRequest(400, "each message needs a role and text content")
            clean.append({"role": str(m.get("role", "user")), "content": content})
        tok = self.tok
        if getattr(tok, "chat_template", None):
            try:
                text = tok.apply_chat_template(clean, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # templates raise on, e.g., roles out of order
                raise BadRequest(400, f"the chat template refused these messages: {exc}") from None
            return list(tok(text, add_special_tokens=False)["input_ids"])
        from ..tokens import format_prompt

        joined = "\n\n".join(m["content"] for m in clean if m["role"] != "assistant")
        return list(tok(format_prompt(tok, joined))["input_ids"])
