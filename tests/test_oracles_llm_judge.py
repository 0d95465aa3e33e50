"""The LLM judge against a fake OpenAI-compatible server on 127.0.0.1: verdict parsing,
position swap, retries with backoff, timeouts, the on-disk cache and clear errors."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from simsteer.errors import SimsError
from simsteer.oracles import JudgeConfig, JudgeOracle, get_oracle
from simsteer.oracles.llm_judge import parse_verdict


class FakeJudge:
    """A loopback server answering chat completions from a script of (status, text)."""

    def __init__(self, script=None, answer=None, delay: float = 0.0) -> None:
        self.script = list(script or [])
        self.answer = answer or (lambda message: "[[A]]")
        self.delay = delay
        self.requests: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                message = body["messages"][0]["content"]
                fake.requests.append(message)
                status = fake.script.pop(0) if fake.script else 200
                time.sleep(fake.delay)
                if status != 200:
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
    with FakeJudge(delay=1.0) as fake:
        oracle = _oracle(fake.url, tmp_path, timeout=0.2, retries=1, concurrency=1)
        start = time.perf_counter()
        with pytest.raises(SimsError, match="failed after 2 attempts"):
            oracle.judge(["q"], [["a", "b"]])
        assert time.perf_counter() - start < 5
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
