"""The LLM judge through the ``sims`` command line, against a fake OpenAI-compatible judge
on 127.0.0.1: the judge options on every command that judges (a judge that never answers,
or asks to wait longer than the timeout, gives up in one line after a bounded number of
requests), a run whose judge refuses some requests finishes, a consent names its target (a
sweep point whose judge URL was edited is refused before anything is sent), and a judge
URL holding credentials resumes without the secret in any file or message."""

from __future__ import annotations

import base64
import json
import shutil
import threading
from pathlib import Path

import pytest

from simsteer.cli.main import main
from simsteer.loop.rundir import RunDir

from .conftest import TINY_RUN
from .test_oracles_llm_judge import FakeJudge, _longer_wins

TINY = [*TINY_RUN, "--layers", "1-2", "--fluency-budget", "off"]


def _one_error(capsys, *needles: str) -> tuple[str, list[str]]:
    """The single ``sims: error:`` line of stderr (holding every needle), and the other
    stderr lines (progress: the judge's waits)."""
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("sims: error: ")]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0], [line for line in err if not line.startswith("sims: error: ")]


def _pairs(tmp_path: Path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}) + "\n")
    return path


def _arena_files(tmp_path: Path) -> list[str]:
    questions, base, ours = tmp_path / "q.jsonl", tmp_path / "base.jsonl", tmp_path / "ours.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "turns": [{"content": "Say hi."}]}) + "\n")
    for path, model, text in ((base, "base", "No."), (ours, "ours", "Hi!")):
        row = {"question_id": 1, "model_id": model, "choices": [{"turns": [{"content": text}]}]}
        path.write_text(json.dumps(row) + "\n")
    return ["--questions", str(questions), "--baseline", str(base), "--answers", str(ours)]


def _judging(command: str, url: str, tmp_path: Path) -> list[str]:
    """A command line of ``command`` that judges with ``judge:m@url``."""
    if command == "judge-check":
        return ["judge-check", "--oracle", f"judge:m@{url}", "--pairs", str(_pairs(tmp_path))]
    return ["arena", "--judge", f"judge:m@{url}", *_arena_files(tmp_path)]


# -- item 6: every command that judges takes the judge options; waits are bounded --------------
@pytest.mark.parametrize("command", ["judge-check", "arena"])
def test_a_judge_that_never_answers_gives_up_after_the_typed_retries(command, tmp_path, capsys):
    """Each attempt ends at --judge-timeout (the server answers none), and the command gives
    up after --judge-retries + 1 requests; had a timeout not worked, no second request
    would have come. Counted at the server; no clock is read."""
    with FakeJudge(hold=threading.Event()) as fake:
        argv = _judging(command, fake.url, tmp_path)
        argv += ["--judge-timeout", "0.2", "--judge-retries", "1", "--judge-concurrency", "1"]
        assert main([*argv, "--judge-cache", str(tmp_path / "c.sqlite")]) == 2
        assert len(fake.requests) == 2 and not fake.hold.is_set()
    _, progress = _one_error(capsys, "failed after 2 attempts (APITimeoutError)")
    # The wait is shown (beside the progress bar), once: the second attempt was the last.
    waits = [line.strip() for line in progress if line.strip().startswith("judge http")]
    assert waits == [f"judge {fake.url}: APITimeoutError on attempt 1 of 2, next in 0.2 s"]


@pytest.mark.parametrize("command", ["judge-check", "arena"])
def test_a_retry_after_beyond_the_timeout_is_not_waited(command, tmp_path, capsys):
    """A judge answering 429 with Retry-After: 30 is asked once: a wait longer than
    --judge-timeout fails at once, in one line, instead of 30 s x retries."""
    with FakeJudge(status=lambda message: (429, {"Retry-After": "30"})) as fake:
        argv = _judging(command, fake.url, tmp_path)
        argv += ["--judge-timeout", "2", "--judge-retries", "3", "--judge-concurrency", "1"]
        assert main([*argv, "--judge-cache", str(tmp_path / "c.sqlite")]) == 2
        assert len(fake.requests) == 1
    _one_error(capsys, "asks to wait 30 s (429, Retry-After)", "longer than the judge timeout (2 s)")


def test_eval_takes_the_judge_options(tmp_path, capsys, tiny_model_dir):
    with FakeJudge(answer=_longer_wins) as fake:
        run = tmp_path / "run"
        argv = ["run", "--model", str(tiny_model_dir), "--dtype", "fp32", *TINY, "-o", str(run)]
        assert main(argv) == 0
    with FakeJudge(hold=threading.Event()) as fake:
        argv = ["eval", str(run), "--scorers", "length:50", "--bootstrap", "10", "--out", str(tmp_path / "r")]
        argv += ["--judge", f"judge:m@{fake.url}", "--judge-timeout", "0.2", "--judge-retries", "0"]
        assert main([*argv, "--judge-concurrency", "1", "--judge-cache", str(tmp_path / "c.sqlite")]) == 2
        assert len(fake.requests) == 1
    _one_error(capsys, "failed after 1 attempts (APITimeoutError)")


# -- item 9: a refused request (HTTP 400) or empty choices cannot stop a run ---------------------
def test_a_run_goes_on_when_the_judge_refuses_some_requests(tmp_path, tiny_model_dir, capsys):
    count = iter(range(10**6))
    lock = threading.Lock()

    def status(message: str):
        with lock:
            n = next(count)
        return {1: 400, 3: "empty"}.get(n % 4, 200)  # never two failures in a row

    run = tmp_path / "run"
    with FakeJudge(status=status, answer=_longer_wins) as fake:
        argv = ["run", "--model", str(tiny_model_dir), "--dtype", "fp32", *TINY, "-o", str(run)]
        argv += ["--oracle", f"judge:m@{fake.url}", "--judge-concurrency", "1", "--judge-retries", "0"]
        assert main([*argv, "--judge-cache", str(tmp_path / "c.sqlite")]) == 0, capsys.readouterr().err
        asked = len(fake.requests)
    assert RunDir(run).is_complete() and asked >= 4
    summaries = [json.loads(p.read_text()) for p in sorted(run.glob("iter_*/summary.json"))]
    failures = sum(s.get("judge_parse_failures", 0) for s in summaries)
    assert failures == sum(n % 4 in (1, 3) for n in range(asked))  # each refused one, recorded


# -- item 4: a consent names its target; an edited point is refused before anything is sent -----
def _interrupt(run: Path) -> None:
    """Make a finished run look killed while it sampled its first iteration (the resume
    samples and judges again): only the prepared run is left."""
    for path in run.iterdir():
        if path.is_dir():
            shutil.rmtree(path)
        elif path.name in ("summary.json", "outcome.json"):
            path.unlink()


def _tree(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("named_by", ["oracle", "base-url"])
def test_a_sweep_point_whose_judge_url_was_edited_is_refused(named_by, tmp_path, tiny_model_dir, capsys):
    """The sweep types the judge's URL again on each resume (as --oracle judge:m@URL or
    --judge-base-url URL); a point whose config.json now names another URL is refused in one
    line, before any point runs or any request is sent (the old sweep left --judge-base-url
    out and resumed with whatever URL the point named)."""
    sweep = tmp_path / "sweep"
    with FakeJudge(answer=_longer_wins) as judge, FakeJudge(answer=_longer_wins) as other:
        run_args = ["--model", str(tiny_model_dir), "--dtype", "fp32", *TINY]
        if named_by == "oracle":
            run_args += ["--oracle", f"judge:m@{judge.url}"]
            refusal = f"--oracle is judge:m@{judge.url} here but judge:m@{other.url}"
        else:
            run_args += ["--oracle", "judge", "--judge-model", "m", "--judge-base-url", judge.url]
            refusal = f"--judge-base-url is {judge.url} here but {other.url}"
        run_args += ["--judge-cache", str(tmp_path / "c.sqlite")]
        argv = ["sweep", "-o", str(sweep), "--grid", "seed=0,1", "--", *run_args]
        assert main(argv) == 0
        point = sweep / "seed=1"
        _interrupt(point)
        (tmp_path / "c.sqlite").unlink()  # a resume would ask the judge again
        config = json.loads((point / "config.json").read_text())
        config["oracle"]["base_url"] = other.url  # someone points the judge elsewhere
        (point / "config.json").write_text(json.dumps(config))
        before, asked = _tree(sweep), len(judge.requests)
        capsys.readouterr()
        assert main(argv) == 2
        _one_error(capsys, "sweep point seed=1", refusal)
        assert not other.requests and len(judge.requests) == asked  # nothing sent anywhere
        assert _tree(sweep) == before
        # A plain resume of a judge run names the judge's URL, keyless or not.
        config["oracle"]["base_url"] = judge.url
        (point / "config.json").write_text(json.dumps(config))
        assert main(["run", "--resume", str(point), "--quiet"]) == 2
        _one_error(
            capsys, f"its judge sends prompts and answers to {judge.url}", f"--judge-base-url {judge.url}"
        )
        assert main(["run", "--resume", str(point), "--judge-base-url", other.url, "--quiet"]) == 2
        _one_error(capsys, f"--judge-base-url is {other.url} here but {judge.url}")
        assert not other.requests and len(judge.requests) == asked
        assert main(["run", "--resume", str(point), "--judge-base-url", judge.url, "--quiet"]) == 0
        assert RunDir(point).is_complete() and len(judge.requests) > asked and not other.requests


# -- item 5: a judge URL with credentials resumes; the secret is in no file and no message ------
def test_a_judge_url_with_credentials_resumes_without_saving_them(
    tmp_path, tiny_model_dir, capsys, monkeypatch
):
    run, cache = tmp_path / "run", tmp_path / "c.sqlite"
    with FakeJudge(answer=_longer_wins) as fake:
        secret_url = fake.url.replace("http://", "http://me:s3cret@") + "?key=q-s3cret"
        # Typed directly, the URL is refused without the secret in the message.
        argv = ["run", "--model", str(tiny_model_dir), "--dtype", "fp32", *TINY, "-o", str(run)]
        assert main([*argv, "--oracle", f"judge:m@{secret_url}"]) == 2
        line, _ = _one_error(capsys, "--judge-url-env")
        assert not fake.requests and not run.exists()
        monkeypatch.setenv("JUDGE_URL", secret_url)
        judge = ["--oracle", "judge", "--judge-model", "m", "--judge-url-env", "JUDGE_URL"]
        assert main([*argv, *judge, "--judge-cache", str(cache)]) == 0
        first = len(fake.requests)
        _interrupt(run)
        cache.unlink()  # the resume asks the judge again
        assert main(["run", "--resume", str(run), "--quiet"]) == 2
        _one_error(capsys, "add --judge-url-env JUDGE_URL to the resume command")
        # A resume takes the judge's waits too (how long, not what): a judge that stopped
        # answering ends it after one request of 0.2 s, not the saved 60 s x 5.
        fake.hold = threading.Event()
        resume = ["run", "--resume", str(run), "--judge-url-env", "JUDGE_URL", "--quiet"]
        assert (
            main([*resume, "--judge-timeout", "0.2", "--judge-retries", "0", "--judge-concurrency", "1"]) == 2
        )
        _one_error(capsys, "failed after 1 attempts (APITimeoutError)")
        assert len(fake.requests) == first + 1
        fake.hold.set()
        fake.hold = None
        assert main(["run", "--resume", str(run), "--judge-url-env", "JUDGE_URL", "--quiet"]) == 0
        assert RunDir(run).is_complete() and len(fake.requests) > first
        auth = "Basic " + base64.b64encode(b"me:s3cret").decode()
        assert {h.get("Authorization") for h in fake.headers} == {auth}
        assert {p.partition("?")[2] for p in fake.paths} == {"key=q-s3cret"}
        out = capsys.readouterr()
    assert "s3cret" not in out.out + out.err + line
    for path in run.rglob("*"):
        assert not path.is_file() or b"s3cret" not in path.read_bytes(), path
    saved = json.loads((run / "config.json").read_text())["oracle"]
    assert saved["base_url"] == fake.url.replace("http://", "http://***@") + "?key=***"
    assert saved["base_url_env"] == "JUDGE_URL"
