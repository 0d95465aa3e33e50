"""An LLM judge behind any OpenAI-compatible API (a hosted model, vLLM, or ``sims serve``).

Modes:

- ``pairwise``: every pair of answers is shown in both orders (position swap) and
  ``P[k, j]`` is the share of the two verdicts that k won (0.5 when neither parses);
- ``rank``: one leaderboard per prompt (``swap`` adds a second request with the answers
  reversed, and the two preference matrices are averaged).

Requests are built and answers parsed separately; they run on ``concurrency`` threads
with a per-request timeout and retries with exponential backoff on 429, 5xx, timeouts
and refused connections. Every wait is bounded by the timeout: the backoff is capped at
it, and a ``Retry-After`` longer than it is not waited at all (the request fails at once,
in one line, so ``retries`` x ``timeout`` bounds how long one request can hold a command);
each wait is announced on stderr. A request the judge refuses on its own merits (HTTP 400,
413 or 422) or answers with no ``choices`` counts as an unparsed answer (``parse_failures``,
and ``refused`` in the judgment's info) and the run goes on: it is never cached, so a
resume asks again, but it cannot stop the run. Every answer that parses is cached on disk
(:mod:`.judge_cache`) as soon as it arrives. Answers are placed in the template in one
pass (:meth:`~.templates.Template.render`): an answer holding ``{response_b}`` reaches the
judge as written.

Credentials: no API key is sent unless ``api_key_env`` names the environment variable that
holds it (no ``$OPENAI_API_KEY`` by default), and a key (or URL credentials) is never sent
over plain ``http://`` to a host other than loopback. A URL holding secrets (``user:pass@``,
or a query parameter such as ``key``, ``token``, ``api_key`` or ``sig``) is given only
through an environment variable the user names (``base_url_env``, ``--judge-url-env``): it
is read from there again on every resume, and only its redacted form
(``https://***@host/v1?key=***``) is saved (``describe()``, so ``config.json``), shown in the
oracle's name or put in a message. A secret-holding URL given directly is refused.
"""

from __future__ import annotations

import email.utils
import ipaddress
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np
from tqdm.auto import tqdm

from ..errors import SimsError
from .base import Judgment, Oracle
from .judge_cache import JudgmentCache, cache_key
from .ranking import parse_ranking
from .registry import register_oracle
from .templates import Template, load_template, numbered_responses

MODES = ("pairwise", "rank")

#: the judge is asked greedily; part of every cache key
TEMPERATURE = 0.0

# Patched by tests: a Retry-After of minutes must not make them wait.
_sleep = time.sleep


def _announce(message: str) -> None:
    """A wait on stderr, beside any progress bar."""
    tqdm.write(message, file=sys.stderr)


#: Query parameters whose value is a secret (matched in the name, any case): redacted.
SECRET_QUERY = re.compile(r"key|token|secret|sig|password|passwd|pwd|auth|credential|session", re.I)

#: Settings that say how long to wait and how much at once, not what is asked (no cache
#: key holds them): a command may change them for a judge a folder saved (``sims eval RUN``).
JUDGE_WAITS = ("concurrency", "timeout", "retries")

#: HTTP statuses that refuse one request on its own merits (too long, malformed): that
#: pair counts as unparsed and the run goes on.
REFUSED_REQUEST = (400, 413, 422)


def _secret_query(url: str) -> list[str]:
    """The names of ``url``'s query parameters that hold a secret."""
    return [
        name
        for name, _ in parse_qsl(urlsplit(url).query, keep_blank_values=True)
        if SECRET_QUERY.search(name)
    ]


def redact_url(url: str) -> str:
    """``url`` with any ``user:password@`` replaced by ``***@`` and the value of every
    secret query parameter (:data:`SECRET_QUERY`) by ``***``, safe to save or print.

    Example:
        >>> redact_url("https://me:s3cret@api.example.com/v1?api_key=abc&v=2")
        'https://***@api.example.com/v1?api_key=***&v=2'
    """
    parts = urlsplit(url)
    if "@" in parts.netloc:
        parts = parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2])
    if _secret_query(url):
        query = parse_qsl(parts.query, keep_blank_values=True)
        hidden = [(k, "***" if SECRET_QUERY.search(k) else v) for k, v in query]
        parts = parts._replace(query=urlencode(hidden, safe="*"))
    return urlunsplit(parts)


def _secret_parts(url: str) -> list[str]:
    """The secret strings inside ``url`` (user info, secret query values), longest first."""
    parts = urlsplit(url)
    found = [parts.netloc.rpartition("@")[0]] if "@" in parts.netloc else []
    found += [parts.password or "", parts.username or ""] if found else []
    found += [v for k, v in parse_qsl(parts.query, keep_blank_values=True) if SECRET_QUERY.search(k)]
    return sorted({f for f in found if len(f) >= 3}, key=len, reverse=True)


def url_secrets(url: str) -> str | None:
    """What in ``url`` is secret (``"credentials"``, ``"the query parameter key"``), or ``None``."""
    if "@" in urlsplit(url).netloc:
        return "credentials (user:password@)"
    names = _secret_query(url)
    return f"the query parameter {names[0]}" if names else None


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
        base_url: e.g. ``http://127.0.0.1:8000/v1``; no secret in it (refused): a URL
            with credentials or a secret query value goes in ``base_url_env``. With
            ``base_url_env`` set, the redacted URL that variable must hold (a resume's check).
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
        base_url_env: name of an environment variable holding the whole base URL (for a
            URL with credentials or a secret query value: read again on every resume,
            never saved; only its redacted form is).
    """

    model: str
    base_url: str = ""
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
    base_url_env: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SimsError(f"unknown judge mode {self.mode!r}: use {' or '.join(MODES)}")
        if not self.model or not (self.base_url_env or self.base_url.startswith(("http://", "https://"))):
            raise SimsError(
                "the judge needs a model and an http(s) base URL: judge:MODEL@http://HOST:PORT/v1"
            )
        if self.concurrency < 1 or self.timeout <= 0 or self.retries < 0:
            raise SimsError("judge concurrency >= 1, timeout > 0 and retries >= 0 are required")
        secret = None if self.base_url_env else url_secrets(self.base_url)
        if secret:
            raise SimsError(
                f"the judge URL {redact_url(self.base_url)} holds {secret}, which is never saved or "
                "printed (so a resume could not send it): put the whole URL in an environment variable "
                "and name it with --judge-url-env VAR (JudgeConfig.base_url_env)"
            )

    def url(self) -> str:
        """The URL requests go to: ``base_url``, or the value of ``$base_url_env`` (whose
        redacted form must be ``base_url`` when that is set: the endpoint a run was started with).

        Raises:
            SimsError: the variable is empty or holds no http(s) URL, or another endpoint.
        """
        if not self.base_url_env:
            return self.base_url
        url = os.environ.get(self.base_url_env, "").strip()
        if not url.startswith(("http://", "https://")):
            state = "is empty" if not url else "holds no http(s) URL"
            raise SimsError(f"${self.base_url_env} {state}: it should hold the judge's base URL")
        if self.base_url and redact_url(url) != self.base_url:
            raise SimsError(
                f"${self.base_url_env} holds the judge URL {redact_url(url)}, but this judge's is "
                f"{self.base_url}: set ${self.base_url_env} to that endpoint, or start a new run"
            )
        return url

    def api_key(self) -> str | None:
        """The key to send: the named variable's value, checked against the URL.

        Raises:
            SimsError: a key (or URL secrets) would go over plain http to a host that is
                not loopback.
        """
        key = (os.environ.get(self.api_key_env) or None) if self.api_key_env else None
        url = self.url()
        if (key or url_secrets(url)) and url.startswith("http://") and not is_loopback(url):
            what = f"the API key from ${self.api_key_env}" if key else "the secrets in the base URL"
            raise SimsError(
                f"refusing to send {what} over plain http to {redact_url(url)}: "
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
        url = config.url()
        self.base_url = redact_url(url)  # what is saved and printed
        self._secrets = _secret_parts(url)  # scrubbed from any text the server sends back
        #: where each wait (a retry, a Retry-After) is announced
        self.notify: Callable[[str], None] = _announce
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
        # The query goes to every request (the client would append paths after it).
        query = dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))
        self.client = openai.OpenAI(
            base_url=urlunsplit(urlsplit(url)._replace(query="")),
            default_query=query or None,
            # the client falls back to $OPENAI_API_KEY when given None: pass a placeholder
            api_key=key or "no-key",
            timeout=config.timeout,
            max_retries=0,  # retried here, with backoff we control and count
            # the client also reads $OPENAI_ORG_ID / $OPENAI_PROJECT_ID: send neither
            default_headers={"OpenAI-Organization": openai.Omit(), "OpenAI-Project": openai.Omit()},
        )

    def _scrub(self, text: str) -> str:
        """``text`` without any secret of the URL (a server may echo the request back)."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

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

    def _ask(self, message: str) -> str | None:
        """The judge's answer, or ``None`` when it refused this one request (HTTP 400,
        413, 422) or answered without ``choices``: counted as unparsed, never cached."""
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
                choices = getattr(reply, "choices", None)
                if not choices:
                    return None
                return choices[0].message.content or ""
            except retryable as exc:
                reason = getattr(exc, "status_code", None) or type(exc).__name__
                if attempt == cfg.retries:
                    raise SimsError(
                        f"judge endpoint {self.base_url} failed after {attempt + 1} attempts ({reason}); "
                        "is the server running? finished judgments are cached: rerun with --resume"
                    ) from None
                # The server's own Retry-After first; one beyond the timeout is not waited.
                asked = retry_after(getattr(getattr(exc, "response", None), "headers", None))
                if asked is not None and asked > cfg.timeout:
                    raise SimsError(
                        f"judge endpoint {self.base_url} asks to wait {asked:.0f} s ({reason}, Retry-After), "
                        f"longer than the judge timeout ({cfg.timeout:g} s): rerun later with --resume, "
                        "or raise --judge-timeout"
                    ) from None
                wait = asked if asked is not None else min(cfg.backoff * 2**attempt, cfg.timeout)
                self.notify(
                    f"judge {self.base_url}: {reason} on attempt {attempt + 1} of {cfg.retries + 1}, "
                    f"next in {wait:g} s"
                )
                _sleep(wait)
            except errors.APIStatusError as exc:
                if exc.status_code in REFUSED_REQUEST:
                    return None
                hint = ""
                if exc.status_code in (401, 403) and not (self._sends_key or url_secrets(self.base_url)):
                    where = f"${cfg.api_key_env} is empty" if cfg.api_key_env else "see --judge-api-key-env"
                    hint = f" (no API key was sent: {where})"
                detail = str(exc.message).splitlines()[0][:200] if str(exc.message) else ""
                raise SimsError(
                    f"judge endpoint {self.base_url} refused the request (HTTP {exc.status_code}){hint}: "
                    f"{self._scrub(detail)}"
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

        refused: set[str] = set()
        failed = threading.Event()  # after a failure, no queued request is sent

        def fetch(item: tuple[str, str]) -> None:
            if failed.is_set():
                return
            key, message = item
            try:
                answer = self._ask(message)
            except BaseException:
                failed.set()
                raise
            if answer is None:  # refused or empty: unparsed, and the run goes on
                refused.add(key)
                answer = ""
            elif self._parses(answer, sizes[key]):  # never replay an unparseable answer
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
        out = [self._combine(n, len(rs), jobs, answers, hits, refused) for n, rs in enumerate(responses)]
        total = sum(j.info["requests"] + j.info["cache_hits"] for j in out)
        failures = sum(j.info["parse_failures"] for j in out)
        if total and failures == total:
            if len(refused) == len(answers):
                raise SimsError(
                    f"{self.name}: the judge refused all {total} requests (HTTP 400 / 413 / 422, or no "
                    "choices): check --judge-model, --judge-max-tokens and the template"
                )
            sample = next((a for a in answers.values() if a), "") or ""
            raise SimsError(
                f"{self.name}: none of {total} answers could be parsed "
                f"(first: {sample.strip()[:80]!r}); check the template or the judge mode"
            )
        return out

    def _combine(self, n, k, jobs, answers, hits, refused=frozenset()) -> Judgment:
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
            "refused": sum(key in refused for _, key in mine),  # counted in parse_failures too
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
            # the variable's name only (an older spec without it is unchanged)
            **({"base_url_env": cfg.base_url_env} if cfg.base_url_env else {}),
        }


def _name_spec(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """``judge:MODEL@BASE_URL`` (or ``judge`` with the endpoint in ``options``) -> a spec."""
    spec = {"name": "judge", **options}
    arg = name.partition(":")[2]
    if arg:
        # split at the @ before the URL (the URL itself may hold user:pass@)
        at = max(arg.rfind("@http://"), arg.rfind("@https://"))
        model, base_url = (arg[:at], arg[at + 1 :]) if at > 0 else (arg, "")
        if not base_url:
            raise SimsError(f"write the judge as judge:MODEL@BASE_URL, got {name!r}")
        spec.update(model=model, base_url=base_url)
    return spec


@register_oracle(
    "judge",
    names=("judge:MODEL@BASE_URL",),
    settings=tuple(JudgeConfig.__dataclass_fields__),
    name_spec=_name_spec,
)
def _build(name: str, settings: dict[str, Any], device: str | None, lm: Any) -> JudgeOracle:
    try:
        return JudgeOracle(JudgeConfig(**settings))
    except TypeError as exc:
        raise SimsError(f"judge: {exc}") from None
