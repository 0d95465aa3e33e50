"""The LLM judge against a fake OpenAI-compatible server on 127.0.0.1: verdict parsing,
position swap, retries with backoff and Retry-After, timeouts, the on-disk cache (keys,
WAL, corrupt files), the API key policy, URL redaction and clear errors."""

from __future__ import annotations

import base64
import json
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from simsteer.errors import SimsError
from simsteer.oracles import JudgeConfig, JudgeOracle, get_oracle, llm_judge
from simsteer.oracles.judge_cache import JudgmentCache, cache_key
from simsteer.oracles.llm_judge import parse_verdict, redact_url, retry_after


class FakeJudge:
    """A loopback server answering chat completions; ``script`` lists the statuses of the
    first answers (an int, or ``(status, headers)``), then every answer is 200. ``status``
    picks a status from each message instead (``"empty"``: 200 with no ``choices``);
    ``hold`` keeps every request unanswered until the event is set (a judge that never
    answers); ``paths`` records each request's path and query."""

    def __init__(self, script=None, answer=None, status=None, hold: threading.Event | None = None) -> None:
        self.script = list(script or [])
        self.answer = answer or (lambda message: "[[A]]")
        self.status = status or (lambda message: 200)
        self.hold = hold
        self.requests: list[str] = []
        self.headers: list[dict[str, str]] = []  # each request's headers
        self.paths: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                message = body["messages"][0]["content"]
                fake.requests.append(message)
                fake.headers.append(dict(self.headers))
                fake.paths.append(self.path)
                status = fake.script.pop(0) if fake.script else fake.status(message)
                status, extra = status if isinstance(status, tuple) else (status, {})
                if fake.hold is not None:
                    fake.hold.wait(600)  # a guard against a hang only: the test sets it at the end
                if status == "empty":
                    payload = {
                        "id": "x",
                        "object": "chat.completion",
                        "created": 0,
                        "model": "m",
                        "choices": [],
                    }
                    status = 200
                elif status != 200:
                    payload = {"error": {"message": "busy", "type": "x", "code": status}}
                else:
                    payload = {
                        "id": "x",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": fake.answer(message)},
                                "finish_reason": "stop",
                            }
                        ],
                    }
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    for name, value in extra.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.hold is not None:
            self.hold.set()
        self.server.shutdown()
        self.server.server_close()


def _longer_wins(message: str) -> str:
    """Prefers the longer answer, whatever its position (a position-fair judge)."""
    a = message.split("[Answer A]\n")[1].split("\n\n[Answer B]")[0]
    b = message.split("[Answer B]\n")[1].split("\n\nGive your verdict")[0]
    return "I think [[A]]" if len(a) >= len(b) else "Verdict: [[B]]"


def _oracle(url, tmp_path, **kw) -> JudgeOracle:
    options = dict(model="fake", base_url=url, cache=str(tmp_path / "cache.sqlite"), backoff=0.01)
    options.update(kw)
    return JudgeOracle(JudgeConfig(**options))


def test_parse_verdict():
    assert parse_verdict("blah [[A]] then [[B]]") == "B"
    assert parse_verdict("The better answer is B.") == "B"
    assert parse_verdict("Answer A is better because") == "A"
    assert parse_verdict("A") == "A"
    assert parse_verdict("Both are fine.") is None


def test_pairwise_with_swap_and_cache(tmp_path):
    with FakeJudge(answer=_longer_wins) as fake:
        oracle = _oracle(fake.url, tmp_path)
        responses = [["short", "a much longer answer", "mid length"]]
        j = oracle.judge(["q"], responses)[0]
        assert len(fake.requests) == 6  # 3 pairs x 2 orders
        assert np.allclose(j.preference + j.preference.T, 1.0)
        assert list(np.argsort(-j.win_rates)) == [1, 2, 0]
        assert {k: j.info[k] for k in ("requests", "cache_hits", "parse_failures")} == {
            "requests": 6,
            "cache_hits": 0,
            "parse_failures": 0,
        }
        # Raw single-order verdicts (k shown first vs j): this judge has no position bias.
        assert j.info["shown_first"] == [[None, 0.0, 0.0], [1.0, None, 1.0], [1.0, 0.0, None]]
        # A second judge (rerun / resume) asks nothing.
        again = _oracle(fake.url, tmp_path).judge(["q"], responses)[0]
        assert len(fake.requests) == 6
        assert again.info["cache_hits"] == 6 and np.array_equal(again.preference, j.preference)


def test_position_biased_judge_gives_ties(tmp_path):
    with FakeJudge(answer=lambda m: "[[A]]") as fake:  # always the first shown
        j = _oracle(fake.url, tmp_path).judge(["q"], [["x", "y"]])[0]
    assert np.allclose(j.preference, 0.5)  # the swap cancels the position bias


def test_retries_on_429_and_5xx(tmp_path):
    with FakeJudge(script=[429, 500], answer=_longer_wins) as fake:
        oracle = _oracle(fake.url, tmp_path, retries=3, concurrency=1)
        oracle.judge(["q"], [["aa", "a"]])
        assert len(fake.requests) == 4  # two failures retried, then both orders


def test_gives_up_with_one_line_error(tmp_path):
    with FakeJudge(script=[503] * 10) as fake:
        oracle = _oracle(fake.url, tmp_path, retries=2, concurrency=1)
        with pytest.raises(SimsError, match="failed after 3 attempts") as err:
            oracle.judge(["q"], [["a", "b"]])
        assert "\n" not in str(err.value)


def test_timeout_and_unreachable(tmp_path):
    # A judge that never answers (until the test ends): each attempt ends at the timeout,
    # the client's own doing (the server answers none), and the judge gives up after
    # retries + 1 attempts. Had the timeout not worked, the first request would still be
    # waiting and no second one would have come. No clock is read.
    with FakeJudge(hold=threading.Event()) as fake:
        oracle = _oracle(fake.url, tmp_path, timeout=0.2, retries=1, concurrency=1)
        with pytest.raises(SimsError, match=r"failed after 2 attempts \(APITimeoutError\)"):
            oracle.judge(["q"], [["a", "b"]])
        assert len(fake.requests) == 2 and not fake.hold.is_set()
        url = fake.url
    with pytest.raises(SimsError, match="is the server running"):
        _oracle(url, tmp_path, retries=1, timeout=1).judge(["q"], [["a", "b"]])


def test_unparseable_answers(tmp_path):
    with (
        FakeJudge(answer=lambda m: "I cannot decide.") as fake,
        pytest.raises(SimsError, match="none of 2 answers could be parsed"),
    ):
        _oracle(fake.url, tmp_path).judge(["q"], [["a", "b"]])
    with FakeJudge(answer=lambda m: "[[A]]" if "Answer A]\nx" in m else "hmm") as fake:
        j = _oracle(fake.url, tmp_path, cache=str(tmp_path / "c2.sqlite")).judge(["q"], [["x", "y"]])[0]
        assert j.info["parse_failures"] == 1 and j.parsed
        assert j.preference[0, 1] == 1.0


def test_rank_mode_and_spec(tmp_path):
    with FakeJudge(answer=lambda m: '{"leaderboard": [2, 1]}') as fake:
        oracle = get_oracle(
            f"judge:fake@{fake.url}", judge_options={"mode": "rank", "cache": str(tmp_path / "c")}
        )
        j = oracle.judge(["q"], [["x", "y"]])[0]
        # Shown in both orders, the judge always ranks the second shown first: a tie.
        assert np.allclose(j.preference, 0.5) and j.info["requests"] == 2
        assert "api_key_env" in oracle.describe() and "key" not in json.dumps(oracle.describe()).replace(
            "api_key_env", ""
        )
    with pytest.raises(SimsError, match="judge:MODEL@BASE_URL"):
        get_oracle("judge:nourl")


def test_judge_cache_path_is_saved_absolute(tmp_path, monkeypatch):
    # The run's oracle spec saves the cache path; a relative one would point elsewhere (a
    # new, empty cache: every judgment asked again) when resumed or evaluated elsewhere.
    from simsteer.cli.main import build_parser

    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["run", "--oracle", "judge", "--judge-cache", "c.sqlite"])
    assert args.judge_cache == str((tmp_path / "c.sqlite").resolve())
    assert build_parser().parse_args(["run"]).judge_cache is None


# -- cache: only parseable answers, request parameters in the key, WAL, corrupt files ------
def test_unparseable_answers_are_asked_again(tmp_path):
    # The old cache stored every answer: "hmm" was replayed on every resume, for ever.
    with FakeJudge(answer=lambda m: "[[A]]" if "Answer A]\nx" in m else "hmm") as fake:
        first = _oracle(fake.url, tmp_path).judge(["q"], [["x", "y"]])[0]
        assert first.info["parse_failures"] == 1 and len(fake.requests) == 2
        again = _oracle(fake.url, tmp_path).judge(["q"], [["x", "y"]])[0]
        assert len(fake.requests) == 3  # only the unparseable one is asked again
        assert (again.info["requests"], again.info["cache_hits"]) == (1, 1)
        assert len(JudgmentCache(tmp_path / "cache.sqlite")) == 1  # nothing unparseable stored
        # An entry that no longer parses (an older cache, a stricter parser) is a miss too.
        oracle = _oracle(fake.url, tmp_path)
        oracle.cache.put(cache_key(oracle._request, "q", ["x", "y"]), "no verdict here")
        assert oracle.judge(["q"], [["x", "y"]])[0].info["requests"] == 2
        assert len(fake.requests) == 5


def test_cache_key_holds_the_request_parameters(tmp_path):
    with FakeJudge(answer=_longer_wins) as fake:
        _oracle(fake.url, tmp_path).judge(["q"], [["aa", "a"]])
        assert len(fake.requests) == 2
        short = _oracle(fake.url, tmp_path, max_tokens=16).judge(["q"], [["aa", "a"]])[0]
        assert short.info["requests"] == 2 and len(fake.requests) == 4  # not the 256-token answers
        other = _oracle(fake.url, tmp_path, model="other").judge(["q"], [["aa", "a"]])[0]
        assert other.info["requests"] == 2
        assert (
            _oracle(fake.url, tmp_path, max_tokens=16).judge(["q"], [["aa", "a"]])[0].info["cache_hits"] == 2
        )
    base = {"model": "m", "max_tokens": 256, "temperature": 0.0, "mode": "pairwise", "template": "t"}
    keys = {cache_key(base, "q", ["a", "b"])}
    for change in ({"max_tokens": 16}, {"temperature": 1.0}, {"mode": "rank"}, {"template": "u"}):
        keys.add(cache_key({**base, **change}, "q", ["a", "b"]))
    keys |= {cache_key(base, "q2", ["a", "b"]), cache_key(base, "q", ["b", "a"])}
    assert len(keys) == 7


def test_cache_is_wal_and_a_corrupt_file_is_one_line(tmp_path):
    with FakeJudge() as fake:
        _oracle(fake.url, tmp_path).judge(["q"], [["aa", "a"]])
        db = sqlite3.connect(tmp_path / "cache.sqlite")
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.close()
        bad = tmp_path / "bad.sqlite"
        bad.write_bytes(b"not a database, just some text " * 100)
        with pytest.raises(SimsError, match="is corrupt") as err:
            _oracle(fake.url, tmp_path, cache=str(bad))
        message = str(err.value)
        assert str(bad) in message and "--judge-cache" in message and "delete it" in message
        assert "\n" not in message and err.value.__cause__ is None and err.value.__suppress_context__
        # A file whose header reads but whose pages are gone fails on the first lookup.
        torn = tmp_path / "torn.sqlite"
        cache = JudgmentCache(torn)
        for n in range(400):
            cache.put(f"k{n}", "[[A]]" * 40)
        cache.close()
        torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])
        with pytest.raises(SimsError, match=f"judge cache {torn} is corrupt"):
            _oracle(fake.url, tmp_path, cache=str(torn)).judge(["q"], [["aa", "a"]])
        assert len(fake.requests) == 2  # nothing asked before the bad file was found


# -- credentials ------------------------------------------------------------------------------
def test_no_api_key_is_sent_unless_its_variable_is_named(tmp_path, monkeypatch):
    secrets = {
        "OPENAI_API_KEY": "sk-env-secret",
        "OPENAI_ORG_ID": "org-secret",
        "OPENAI_PROJECT_ID": "proj-secret",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    assert JudgeConfig("m", "http://127.0.0.1:1/v1").api_key_env is None
    with FakeJudge() as fake:
        _oracle(fake.url, tmp_path).judge(["q"], [["aa", "a"]])
        sent = json.dumps(fake.headers)
        assert not any(value in sent for value in secrets.values())
        monkeypatch.setenv("MY_JUDGE_KEY", "k-123")
        _oracle(fake.url, tmp_path, api_key_env="MY_JUDGE_KEY", max_tokens=8).judge(["q"], [["aa", "a"]])
        auth = {h.get("authorization") or h.get("Authorization") for h in fake.headers[2:]}
        assert auth == {"Bearer k-123"}


def test_a_refused_request_or_empty_choices_count_as_unparsed(tmp_path):
    """HTTP 400 / 413 / 422 or a 200 without choices fails that request only: it counts as
    an unparsed answer, is never cached, and the other answers are used."""

    def status(message: str):
        return {"x": 400, "y": "empty", "z": 422}.get(message.split("[Answer A]\n")[1][0], 200)

    responses = [["x", "aa"], ["y", "aa"], ["z", "aa"], ["bb", "a"]]
    with FakeJudge(status=status, answer=_longer_wins) as fake:
        judged = _oracle(fake.url, tmp_path, retries=0).judge(["q"] * 4, responses)
        assert [j.info["refused"] for j in judged] == [1, 1, 1, 0]
        assert [j.info["parse_failures"] for j in judged] == [1, 1, 1, 0]
        assert all(j.parsed for j in judged)
        assert judged[0].preference[1, 0] == 1.0 and judged[3].preference[0, 1] == 1.0
        assert len(fake.requests) == 8  # no retries of a refused request
        # Never cached: a rerun asks those three again, the five answers come from the cache.
        again = _oracle(fake.url, tmp_path, retries=0).judge(["q"] * 4, responses)
        assert sum(j.info["requests"] for j in again) == 3 and len(fake.requests) == 11
    with FakeJudge(script=[400, 400]) as fake, pytest.raises(SimsError, match="refused all 2 requests"):
        _oracle(fake.url, tmp_path, cache=str(tmp_path / "c2")).judge(["q"], [["a", "b"]])


def test_an_answer_holding_a_placeholder_reaches_the_judge_verbatim(tmp_path):
    answers = ["see {response_b} and {prompt}", "{response_a}{responses}{num_responses}"]
    with FakeJudge() as fake:
        _oracle(fake.url, tmp_path, concurrency=1).judge(["tell {response_a}"], [answers])
    first = fake.requests[0]
    assert "[Answer A]\nsee {response_b} and {prompt}\n" in first
    assert "[Answer B]\n{response_a}{responses}{num_responses}\n" in first
    assert "tell {response_a}" in first
    assert sum(m.count("{response_b}") for m in fake.requests) == 2  # once per order


@pytest.mark.parametrize(
    "url, refused",
    [
        ("http://judge.example.com/v1", True),
        ("http://10.0.0.5:8000/v1", True),
        ("http://127.0.0.1:8000/v1", False),
        ("http://127.3.4.5:8000/v1", False),
        ("http://localhost:8000/v1", False),
        ("http://[::1]:8000/v1", False),
        ("https://judge.example.com/v1", False),
    ],
)
def test_a_key_never_goes_over_plain_http_to_another_host(tmp_path, monkeypatch, url, refused):
    monkeypatch.setenv("MY_JUDGE_KEY", "k-123")
    options = dict(cache=str(tmp_path / "c.sqlite"), api_key_env="MY_JUDGE_KEY")
    if refused:
        with pytest.raises(
            SimsError, match="refusing to send the API key from \\$MY_JUDGE_KEY over plain http"
        ):
            JudgeOracle(JudgeConfig("m", url, **options))
    else:
        JudgeOracle(JudgeConfig("m", url, **options))  # builds; nothing is sent yet
    JudgeOracle(JudgeConfig("m", url, cache=options["cache"]))  # no key: any URL
    # Secrets inside the URL (through the variable that holds it) count as a key.
    for secret in (url.replace("//", "//me:pw@"), url + "?api_key=pw"):
        monkeypatch.setenv("JUDGE_URL", secret)
        config = JudgeConfig("m", base_url_env="JUDGE_URL", cache=options["cache"])
        if refused:
            with pytest.raises(SimsError, match="secrets in the base URL over plain http") as err:
                JudgeOracle(config)
            assert "pw" not in str(err.value)
        else:
            JudgeOracle(config)


def test_credentials_in_the_url_are_redacted(tmp_path, monkeypatch):
    assert redact_url("https://me:s3cret@api.example.com:443/v1") == "https://***@api.example.com:443/v1"
    assert redact_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"
    assert redact_url("https://h/v1?api-version=2&key=s3&SIG=s4&token=s5") == (
        "https://h/v1?api-version=2&key=***&SIG=***&token=***"
    )
    # Given directly, a secret-holding URL is refused (it could never be saved, so never
    # resumed), without the secret in the message.
    for url in ("https://me:s3cret@h/v1", "https://h/v1?api_key=s3cret", "https://h/v1?sig=s3cret"):
        with pytest.raises(SimsError, match="--judge-url-env") as err:
            get_oracle(f"judge:fake@{url}", judge_options={"cache": str(tmp_path / "c")})
        assert "s3cret" not in str(err.value)
    with FakeJudge(script=[503, 503]) as fake:
        url = fake.url.replace("http://", "http://me:s3cret@") + "?key=q-s3cret&v=1"
        monkeypatch.setenv("JUDGE_URL", url)
        options = {"cache": str(tmp_path / "c"), "retries": 1, "concurrency": 1, "base_url_env": "JUDGE_URL"}
        oracle = get_oracle("judge", judge_options={"model": "fake", **options})
        spec = oracle.describe()
        assert spec["base_url"] == fake.url.replace("http://", "http://***@") + "?key=***&v=1"
        assert spec["base_url_env"] == "JUDGE_URL"
        assert "s3cret" not in json.dumps(spec) + oracle.name
        rebuilt = get_oracle(json.loads(json.dumps(spec)))  # the URL read again from $JUDGE_URL
        assert rebuilt.describe() == spec
        with pytest.raises(SimsError, match="failed after 2 attempts") as failed:
            oracle.judge(["q"], [["aa", "a"]])
        fake.script.append(401)  # (the other request of the first call is done: the pool waited)
        with pytest.raises(SimsError, match="HTTP 401") as refused:
            oracle.judge(["q"], [["aa", "a"]])
        # The rebuilt judge sends the real credentials, as basic auth, and the query.
        rebuilt.judge(["q"], [["aa", "a"]])
        auth = "Basic " + base64.b64encode(b"me:s3cret").decode()
        assert {h.get("Authorization") for h in fake.headers[-2:]} == {auth}
        assert all(p == "/v1/chat/completions?key=q-s3cret&v=1" for p in fake.paths)
        plain = _oracle(fake.url, tmp_path, retries=0)
        fake.script.append(401)
        with pytest.raises(SimsError, match="no API key was sent: see --judge-api-key-env"):
            plain.judge(["q"], [["aa", "a"]])
        # $JUDGE_URL now naming another endpoint than the saved one is refused.
        monkeypatch.setenv("JUDGE_URL", "http://me:s3cret@127.0.0.2:9/v1")
        with pytest.raises(
            SimsError, match=r"JUDGE_URL holds the judge URL http://\*\*\*@127\.0\.0\.2"
        ) as moved:
            get_oracle(json.loads(json.dumps(spec)))
    for err in (failed, refused, moved):
        assert "s3cret" not in str(err.value) and "***@127.0.0" in str(err.value)


# -- Retry-After ----------------------------------------------------------------------------
def test_retry_after_is_honoured_and_capped(tmp_path, monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(llm_judge, "_sleep", slept.append)  # no real waits
    script = [
        (429, {"Retry-After": "7"}),
        500,
        (429, {"retry-after-ms": "1500"}),
        500,
    ]
    with FakeJudge(script=script, answer=_longer_wins) as fake:
        oracle = _oracle(fake.url, tmp_path, retries=5, concurrency=1, timeout=30.0, backoff=0.01)
        oracle.judge(["q"], [["aa", "a"]])
        assert len(fake.requests) == 6
        # The server's wait; the own backoff when it names none, capped at the timeout.
        assert slept == [7.0, 0.02, 1.5, 0.08]
        slept.clear()
        capped = _oracle(
            fake.url, tmp_path, retries=5, concurrency=1, timeout=0.05, backoff=0.04, max_tokens=9
        )
        fake.script += [500, 500, 500]
        capped.judge(["q"], [["aa", "a"]])
        assert slept == [0.04, 0.05, 0.05]
        # A Retry-After beyond the timeout is not waited: the request fails at once.
        slept.clear()
        fake.script.append((503, {"Retry-After": "86400"}))
        with pytest.raises(SimsError, match=r"asks to wait 86400 s .*longer than the judge timeout"):
            _oracle(fake.url, tmp_path, retries=5, concurrency=1, max_tokens=7).judge(["q"], [["aa", "a"]])
        assert slept == [] and len(fake.requests) == 6 + 5 + 1


def test_retry_after_values():
    from email.utils import formatdate

    assert retry_after({"retry-after": "2.5"}) == 2.5
    assert retry_after({"retry-after": "-3"}) == 0.0
    assert 50 < retry_after({"retry-after": formatdate(time.time() + 60, usegmt=True)}) <= 60
    for bad in ({"retry-after": "soon"}, {"retry-after": "nan"}, {}, None):
        assert retry_after(bad) is None
