"""An LLM judge behind any OpenAI-compatible API (a hosted model, vLLM, or ``sims serve``).

Modes:

- ``pairwise``: every pair of answers is shown in both orders (position swap) and
  ``P[k, j]`` is the share of the two verdicts that k won (0.5 when neither parses);
- ``rank``: one leaderboard per prompt (``swap`` adds a second request with the answers
  reversed, and the two preference matrices are averaged).

Requests are built and answers parsed separately; they run on ``concurrency`` threads
with a per-request timeout and retries with exponential backoff on 429, 5xx, timeouts
and refused connections. Every answer is cached on disk (:mod:`.judge_cache`) as soon as
it arrives. The API key is read from the environment variable ``api_key_env`` and never
written anywhere.
"""

from __future__ import annotations

import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SimsError
from .base import Judgment, Oracle
from .judge_cache import JudgmentCache, cache_key
from .ranking import parse_ranking
from .templates import Template, load_template, numbered_responses

MODES = ("pairwise", "rank")


@dataclass(frozen=True)
class JudgeConfig:
    """Where the judge is and how it is asked.

    Attributes:
        model: the model name the endpoint serves.
        base_url: e.g. ``http://127.0.0.1:8000/v1``.
        api_key_env: environment variable holding the key (unset: no key is sent).
        mode: ``pairwise`` or ``rank``.
        template: a template file; default ``judge_pairwise`` / ``judge_rank``.
        swap: rank mode only, also ask with the answers in reverse order.
        concurrency: requests in flight at once.
        timeout: seconds per request.
        retries: further attempts after a retryable failure.
        backoff: first wait in seconds, doubled after each failure.
        max_tokens: answer length cap.
        cache: cache file (default: ``judgments.sqlite`` in the simsteer cache folder).
    """

    model: str
    base_url: str
    api_key_env: str = "OPENAI_API_KEY"
    mode: str = "pairwise"
    template: str | None = None
    swap: bool = True
    concurrency: int = 4
    timeout: float = 60.0
    retries: int = 4
    backoff: float = 0.5
    max_tokens: int = 256
    cache: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SimsError(f"unknown judge mode {self.mode!r}: use {' or '.join(MODES)}")
        if not self.model or not self.base_url.startswith(("http://", "https://")):
            raise SimsError(
                "the judge needs a model and an http(s) base URL: judge:MODEL@http://HOST:PORT/v1"
            )
        if self.concurrency < 1 or self.timeout <= 0 or self.retries < 0:
            raise SimsError("judge concurrency >= 1, timeout > 0 and retries >= 0 are required")


def parse_verdict(text: str) -> str | None:
    """``"A"``, ``"B"`` or ``None`` from a pairwise judge's answer."""
    marked = re.findall(r"\[\[\s*([AB])\s*\]\]", text)
    if marked:
        return marked[-1]
    for pattern in (
        r"(?:verdict|winner|better answer|better response|answer)\s*(?:is|:)\s*\**\s*(?:answer\s*)?([AB])\b",
        r"\b(?:answer|response)\s+([AB])\s+is\s+better",
        r"^\W*([AB])\W*$",
    ):
        found = re.findall(pattern, text.strip(), re.I | re.M)
        if found:
            return found[-1].upper()
    return None


class JudgeOracle(Oracle):
    """An LLM judge over an OpenAI-compatible chat API (see the module docstring).

    Example:
        >>> oracle = JudgeOracle(JudgeConfig("smollm2", "http://127.0.0.1:8000/v1"))
        >>> oracle.judge(["Name a colour."], [["Blue.", "Table."]])[0].preference
    """

    def __init__(self, config: JudgeConfig) -> None:
        try:
            import openai
        except ImportError:
            raise SimsError('the judge oracle needs the openai client: pip install -e ".[judge]"') from None

        self.config = config
        self.name = f"judge:{config.model}@{config.base_url}"
        default = "judge_pairwise" if config.mode == "pairwise" else "judge_rank"
        self.template: Template = load_template(config.template or default)
        self.template.require(
            *(("response_a", "response_b") if config.mode == "pairwise" else ("responses",))
        )
        if config.cache:
            cache_path = Path(config.cache)
        else:
            from ..models import cache_dir

            cache_path = cache_dir() / "judgments.sqlite"
        self.cache = JudgmentCache(cache_path)
        self._errors = openai
        self.client = openai.OpenAI(
            base_url=config.base_url,
            api_key=os.environ.get(config.api_key_env) or "no-key",
            timeout=config.timeout,
            max_retries=0,  # retried here, with backoff we control and count
        )

    # -- requests ------------------------------------------------------------------
    def _requests(self, prompt: str, responses: list[str]) -> list[tuple[int, ...]]:
        """The orders in which the answers are shown, one per request."""
        k = len(responses)
        if self.config.mode == "pairwise":
            return [(a, b) for a in range(k) for b in range(k) if a != b]
        order = tuple(range(k))
        return [order, order[::-1]] if self.config.swap else [order]

    def _message(self, prompt: str, shown: list[str]) -> str:
        if self.config.mode == "pairwise":
            return self.template.render(prompt=prompt, response_a=shown[0], response_b=shown[1])
        return self.template.render(
            prompt=prompt, responses=numbered_responses(shown), num_responses=str(len(shown))
        )

    def _ask(self, message: str) -> str:
        cfg, errors = self.config, self._errors
        retryable = (errors.RateLimitError, errors.InternalServerError, errors.APIConnectionError)
        for attempt in range(cfg.retries + 1):
            try:
                reply = self.client.chat.completions.create(
                    model=cfg.model,
                    messages=[{"role": "user", "content": message}],
                    temperature=0.0,
                    max_tokens=cfg.max_tokens,
                )
                return reply.choices[0].message.content or ""
            except retryable as exc:
                if attempt == cfg.retries:
                    reason = getattr(exc, "status_code", None) or type(exc).__name__
                    raise SimsError(
                        f"judge endpoint {cfg.base_url} failed after {attempt + 1} attempts ({reason}); "
                        "is the server running? finished judgments are cached: rerun with --resume"
                    ) from None
                time.sleep(cfg.backoff * 2**attempt)
            except errors.APIStatusError as exc:
                raise SimsError(
                    f"judge endpoint {cfg.base_url} refused the request (HTTP {exc.status_code}): "
                    f"{str(exc.message).splitlines()[0][:200]}"
                ) from None
        raise AssertionError("unreachable")

    # -- judging -------------------------------------------------------------------
    def judge(self, prompts: list[str], responses: list[list[str]]) -> list[Judgment]:
        judge_id = f"{self.config.model}@{self.config.base_url}"
        jobs = []  # (prompt index, order shown, cache key, message)
        for n, (p, rs) in enumerate(zip(prompts, responses, strict=True)):
            for order in self._requests(p, rs):
                shown = [rs[i] for i in order]
                key = cache_key(judge_id, self.template.digest, p, shown)
                jobs.append((n, order, key, self._message(p, shown)))
        answers = {key: self.cache.get(key) for _, _, key, _ in jobs}
        hits = {key for key, a in answers.items() if a is not None}
        missing = {key: msg for _, _, key, msg in jobs if answers[key] is None}

        def fetch(item: tuple[str, str]) -> None:
            key, message = item
            answer = self._ask(message)
            self.cache.put(key, answer)  # saved at once: a crash keeps what was paid for
            answers[key] = answer

        with ThreadPoolExecutor(max_workers=self.config.concurrency) as pool:
            futures = [pool.submit(fetch, item) for item in missing.items()]
            try:
                for f in futures:
                    f.result()
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        out = [self._combine(n, len(rs), jobs, answers, hits) for n, rs in enumerate(responses)]
        total = sum(j.info["requests"] + j.info["cache_hits"] for j in out)
        failures = sum(j.info["parse_failures"] for j in out)
        if total and failures == total:
            sample = next(iter(answers.values()), "") or ""
            raise SimsError(
                f"{self.name}: none of {total} answers could be parsed "
                f"(first: {sample.strip()[:80]!r}); check the template or the judge mode"
            )
        return out

    def _combine(self, n, k, jobs, answers, hits) -> Judgment:
        mine = [(order, key) for m, order, key, _ in jobs if m == n]
        wins, counts = np.zeros((k, k)), np.zeros((k, k))
        shown_first: list[list[float | None]] = [[None] * k for _ in range(k)]
        failures = 0
        for order, key in mine:
            text = answers[key] or ""
            if self.config.mode == "pairwise":
                verdict = parse_verdict(text)
                if verdict is None:
                    failures += 1
                    continue
                shown_first[order[0]][order[1]] = 1.0 if verdict == "A" else 0.0
                winner, loser = (order[0], order[1]) if verdict == "A" else (order[1], order[0])
                wins[winner, loser] += 1
                counts[winner, loser] += 1
                counts[loser, winner] += 1
            else:
                ranking = parse_ranking(text, k)
                if ranking is None:
                    failures += 1
                    continue
                shown_pref = ranking.preference()  # indices are positions in `order`
                idx = np.asarray(order)
                wins[np.ix_(idx, idx)] += shown_pref
                counts += 1
        pref = np.where(counts > 0, wins / np.maximum(counts, 1), 0.5)
        np.fill_diagonal(pref, 0.5)
        info = {
            "requests": sum(key not in hits for _, key in mine),
            "cache_hits": sum(key in hits for _, key in mine),
            "parse_failures": failures,
        }
        if self.config.mode == "pairwise":
            info["shown_first"] = shown_first  # P(first shown wins) per order: position bias
        return Judgment(pref, parsed=failures < len(mine), info=info)

    def describe(self) -> dict:
        cfg = self.config
        return {
            "name": "judge",
            "model": cfg.model,
            "base_url": cfg.base_url,
            "api_key_env": cfg.api_key_env,  # the name only, never the key
            "mode": cfg.mode,
            "template": self.template.name,
            "swap": cfg.swap,
            "concurrency": cfg.concurrency,
            "timeout": cfg.timeout,
            "retries": cfg.retries,
            "backoff": cfg.backoff,
            "max_tokens": cfg.max_tokens,
            # absolute: the saved spec finds the same cache from any folder
            "cache": str(Path(cfg.cache).expanduser().resolve()) if cfg.cache else None,
        }
