"""An LLM judge behind any OpenAI-compatible API (a hosted model, vLLM, or ``sims serve``).

Modes:

- ``pairwise``: every pair of answers is shown in both orders (position swap) and
  ``P[k, j]`` is the share of the two verdicts that k won (0.5 when neither parses);
- ``rank``: one leaderboard per prompt (``swap`` adds a second request with the answers
  reversed, and the two preference matrices are averaged).

Requests are built and answers parsed separately; they run on ``concurrency`` threads
with a per-request timeout and retries with exponential backoff on 429, 5xx, timeouts
and refused connections, honouring a ``Retry-After`` header (capped at the timeout).
Every answer that parses is cached on disk (:mod:`.judge_cache`) as soon as it arrives.

Credentials: no API key is sent unless ``api_key_env`` names the environment variable that
holds it (no ``$OPENAI_API_KEY`` by default), and a key (or ``user:pass@`` in the base URL)
is never sent over plain ``http://`` to a host other than loopback. The key is never written
anywhere, and credentials inside the base URL are redacted (``https://***@host/v1``) in
``describe()`` (so in ``config.json``), in the oracle's name and in every error message.
"""

from __future__ import annotations

import email.utils
import ipaddress
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from ..errors import SimsError
from .base import Judgment, Oracle
from .judge_cache import JudgmentCache, cache_key
from .ranking import parse_ranking
from .templates import Template, load_template, numbered_responses

MODES = ("pairwise", "rank")

#: the judge is asked greedily; part of every cache key
TEMPERATURE = 0.0

# Patched by tests: a Retry-After of minutes must not make them wait.
_sleep = time.sleep


def redact_url(url: str) -> str:
    """``url`` with any ``user:password@`` replaced by ``***@``, safe to save or print.

    Example:
        >>> redact_url("https://me:s3cret@api.example.com/v1")
        'https://***@api.example.com/v1'
    """
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


def is_loopback(url: str) -> bool:
    """Whether ``url``'s host is this machine (127.0.0.0/8, ::1 or ``localhost``)."""
    host = (urlsplit(url).hostname or "").rstrip(".").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def retry_after(headers) -> float | None:
    """Seconds a 429 / 503 answer asks to wait (``Retry-After``: seconds or an HTTP
    date; ``retry-after-ms``), or ``None`` when it says nothing usable."""
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(float(value) / 1000, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    return max(seconds, 0.0) if seconds == seconds else None  # NaN says nothing


@dataclass(frozen=True)
class JudgeConfig:
    """Where the judge is and how it is asked.

    Attributes:
        model: the model name the endpoint serves.
        base_url: e.g. ``http://127.0.0.1:8000/v1``.
        api_key_env: name of the environment variable holding the key; ``None`` (the
            default) sends no key, whatever the environment holds. A key goes only over
            https, or plain http to a loopback host.
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
    api_key_env: str | None = None
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

    def api_key(self) -> str | None:
        """The key to send: the named variable's value, checked against the URL.

        Raises:
            SimsError: a key (or URL credentials) would go over plain http to a host
                that is not loopback.
        """
        key = (os.environ.get(self.api_key_env) or None) if self.api_key_env else None
        in_url = "@" in urlsplit(self.base_url).netloc
        if (key or in_url) and self.base_url.startswith("http://") and not is_loopback(self.base_url):
            what = f"the API key from ${self.api_key_env}" if key else "the credentials in the base URL"
            raise SimsError(
                f"refusing to send {what} over plain http to {redact_url(self.base_url)}: "
                "use https:// (plain http is allowed to 127.0.0.1 / localhost / ::1 only)"
            )
        return key


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
        self.base_url = redact_url(config.base_url)  # what is saved and printed
        self.name = f"judge:{config.model}@{self.base_url}"
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
        key = config.api_key()
        self._sends_key = key is not None
        self.cache = JudgmentCache(cache_path).open()  # a corrupt file: one line, before any work
        self._errors = openai
        # Everything that changes an answer keys the cache (a new max_tokens asks again).
        self._request = {
            "base_url": self.base_url,
            "model": config.model,
            "mode": config.mode,
            "template": self.template.digest,
            "max_tokens": config.max_tokens,
            "temperature": TEMPERATURE,
        }
        self.client = openai.OpenAI(
            base_url=config.base_url,
            # the client falls back to $OPENAI_API_KEY when given None: pass a placeholder
            api_key=key or "no-key",
            timeout=config.timeout,
            max_retries=0,  # retried here, with backoff we control and count
            # the client also reads $OPENAI_ORG_ID / $OPENAI_PROJECT_ID: send neither
            default_headers={"OpenAI-Organization": openai.Omit(), "OpenAI-Project": openai.Omit()},
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

    def _parses(self, text: str, k: int) -> bool:
        """Whether an answer about ``k`` responses gives a verdict (only those are cached)."""
        if self.config.mode == "pairwise":
            return parse_verdict(text) is not None
        return parse_ranking(text, k) is not None

    def _ask(self, message: str) -> str:
        cfg, errors = self.config, self._errors
        retryable = (errors.RateLimitError, errors.InternalServerError, errors.APIConnectionError)
        for attempt in range(cfg.retries + 1):
            try:
                reply = self.client.chat.completions.create(
                    model=cfg.model,
                    messages=[{"role": "user", "content": message}],
                    temperature=self._request["temperature"],
                    max_tokens=cfg.max_tokens,
                )
                return reply.choices[0].message.content or ""
            except retryable as exc:
                if attempt == cfg.retries:
                    reason = getattr(exc, "status_code", None) or type(exc).__name__
                    raise SimsError(
                        f"judge endpoint {self.base_url} failed after {attempt + 1} attempts ({reason}); "
                        "is the server running? finished judgments are cached: rerun with --resume"
                    ) from None
                # The server's own Retry-After first, capped so a bad header cannot stall the run.
                asked = retry_after(getattr(getattr(exc, "response", None), "headers", None))
                _sleep(min(asked, cfg.timeout) if asked is not None else cfg.backoff * 2**attempt)
            except errors.APIStatusError as exc:
                hint = ""
                if exc.status_code in (401, 403) and not (self._sends_key or "@" in self.base_url):
                    where = f"${cfg.api_key_env} is empty" if cfg.api_key_env else "see --judge-api-key-env"
                    hint = f" (no API key was sent: {where})"
                detail = str(exc.message).splitlines()[0][:200] if str(exc.message) else ""
                raise SimsError(
                    f"judge endpoint {self.base_url} refused the request (HTTP {exc.status_code}){hint}: "
                    f"{detail.replace(cfg.base_url, self.base_url)}"
                ) from None
        raise AssertionError("unreachable")

    # -- judging -------------------------------------------------------------------
    def judge(self, prompts: list[str], responses: list[list[str]]) -> list[Judgment]:
        jobs = []  # (prompt index, order shown, cache key, message)
        sizes = {}  # cache key -> number of answers shown
        for n, (p, rs) in enumerate(zip(prompts, responses, strict=True)):
            for order in self._requests(p, rs):
                shown = [rs[i] for i in order]
                key = cache_key(self._request, p, shown)
                jobs.append((n, order, key, self._message(p, shown)))
                sizes[key] = len(shown)
        answers: dict[str, str | None] = {}
        for key in sizes:
            cached = self.cache.get(key)
            # an entry that does not parse (an older cache, a stricter parser) is asked again
            answers[key] = cached if cached is not None and self._parses(cached, sizes[key]) else None
        hits = {key for key, a in answers.items() if a is not None}
        missing = {key: msg for _, _, key, msg in jobs if answers[key] is None}

        def fetch(item: tuple[str, str]) -> None:
            key, message = item
            answer = self._ask(message)
            if self._parses(answer, sizes[key]):  # never replay an unparseable answer
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
            "base_url": self.base_url,  # credentials in the URL are never saved
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
