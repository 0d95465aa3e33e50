"""The LLM-judge oracle against a real ``sims serve`` process on loopback, serving the
embedded model: one judged SIMS iteration, then a rerun that is answered from the judgment
cache without a single request. Slow (embedded model), run in CI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

#: Small, so that a slow CPU answers quickly; the template below puts the verdict first.
JUDGE_MAX_TOKENS = 32

#: A pairwise template whose verdict comes first: the built-in one asks for it on the last
#: line, which a 135M judge reaches only after far more than 32 tokens (if at all). With
#: this one it answers "The better answer is A." (a position bias, which is fine here: the
#: test is about the transport and the cache, not the judge's quality).
VERDICT_FIRST = (
    "Request: {prompt}\n\nAnswer A: {response_a}\n\nAnswer B: {response_b}\n\n"
    'Which answer is better? Start your reply with "The better answer is A" or '
    '"The better answer is B".'
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def served_judge(embedded_lm, tmp_path):
    """A ``sims serve`` subprocess with the embedded model; yields its base URL."""
    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "simsteer", "serve", "--port", str(port)),
            *("--served-model-name", "judge", "--max-tokens-limit", str(JUDGE_MAX_TOKENS)),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if proc.poll() is not None:
                pytest.fail(f"sims serve exited: {(tmp_path / 'serve.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail("sims serve did not come up in 120 s")
        yield f"{url}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _run(out: Path, base_url: str, cache: Path) -> dict:
    args = ["run", "--quiet", "--oracle", "judge", "--judge-model", "judge"]
    args += ["--judge-base-url", base_url, "--judge-cache", str(cache)]
    template = out.parent / "verdict_first.txt"
    template.write_text(VERDICT_FIRST, encoding="utf-8")
    args += ["--oracle-template", str(template)]
    # Short answers and a long timeout: a slow machine must not time out, retry and leave the
    # server decoding abandoned 256-token answers (the server now cancels those too).
    args += ["--judge-max-tokens", str(JUDGE_MAX_TOKENS), "--judge-timeout", "600"]
    args += ["-T", "1", "-N", "3", "-K", "2", "--eval-prompts", "2", "--max-new-tokens", "16"]
    args += ["--fluency-budget", "off", "-o", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "simsteer", *args],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())[0]


def test_judged_iteration_through_sims_serve_and_cached_rerun(served_judge, tmp_path):
    cache = tmp_path / "judgments.sqlite"
    first = _run(tmp_path / "a", served_judge, cache)
    # Pairwise with position swap: K=2 -> one pair asked in both orders per prompt.
    assert first["judge_requests"] == 2 * 3
    assert first["judge_cache_hits"] == 0
    samples = [json.loads(x) for x in (tmp_path / "a/iter_0/samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and all(0.0 <= s["win_rate"] <= 1.0 for s in samples)
    assert cache.is_file()
    # Same seed -> the same answers -> every parseable verdict comes from the cache; only
    # parseable ones are cached, so the unparseable ones (a 135M judge) are asked again.
    second = _run(tmp_path / "b", served_judge, cache)
    assert second["judge_requests"] == first["judge_parse_failures"]
    assert second["judge_cache_hits"] == 2 * 3 - first["judge_parse_failures"]
