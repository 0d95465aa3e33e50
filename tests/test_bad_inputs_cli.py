"""Bad command lines and bad input files: each gives exactly one line on stderr
(``sims: error: ...``), exit status 2 (a known mistake; 1 for an unexpected error), no
traceback, and leaves an existing run directory byte-identical.

Most cases fail while the arguments or input files are read, before any model loads; the
few that need a model use the tiny random ones of ``conftest.py``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest

from simsteer.cli.main import main

from .conftest import TINY_RUN

PROMPTS = ["the good day", "a cat is happy", "I love the sun", "we walk home", "the cold rain", "a big dog"]


def tree_hash(root: Path) -> str:
    """One digest of every file's path and bytes under ``root``."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def one_line_error(capsys, argv: list[str], status: int = 2) -> str:
    """Run ``sims argv``; check the status and the single stderr line, and return it."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert code == status, err
    assert len(lines) == 1, err
    assert lines[0].startswith("sims: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The bad input files the cases name, written once."""
    root = tmp_path_factory.mktemp("bad-inputs")

    def put(name: str, text: str | bytes) -> Path:
        path = root / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path

    (root / "folder").mkdir()
    pairs = [{"prompt": "p", "chosen": "a", "rejected": "b"}]
    return {
        "good_prompts": put("prompts.txt", "\n".join(PROMPTS) + "\n"),
        "dup_ids": put("dup.jsonl", '{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n'),
        "list_id": put("list_id.jsonl", '{"id": [1], "prompt": "x"}\n'),
        "latin1": put("latin1.txt", "caf\xe9\n".encode("latin-1")),
        "folder": root / "folder",
        "missing": root / "missing.jsonl",
        "not_json": put("not_json.jsonl", "{oops\n"),
        "list_row": put("list_row.jsonl", "[1, 2]\n"),
        "number_pair": put("number_pair.jsonl", '{"prompt": "p", "chosen": 1, "rejected": "b"}\n'),
        "no_assistant": put("no_assistant.jsonl", '{"chosen": "Human: hi", "rejected": "Human: yo"}\n'),
        "not_gzip": put("pairs.jsonl.gz", b"plain text, not gzip"),
        "empty": put("empty.jsonl", "\n"),
        "good_pairs_gz": put("good.jsonl.gz", gzip.compress(json.dumps(pairs[0]).encode() + b"\n")),
        "ann_not_json": put("ann_bad.json", "[{"),
        "ann_ints": put("ann_ints.json", "[1, 2, 3]"),
        "ann_no_output": put("ann_no_output.json", '[{"preference": 2}]'),
        "ann_empty": put("ann_empty.json", "[]"),
        "ann_object": put("ann_object.json", '{"preference": 2}'),
        "judgment_no_model": put("j_no_model.jsonl", '{"games": [{"score": "A>B"}]}\n'),
        "judgment_bad_verdict": put("j_verdict.jsonl", '{"model": "m", "games": [{"score": "X"}]}\n'),
        "judgment_games_text": put("j_games.jsonl", '{"model": "m", "games": "A>B"}\n'),
        "questions": put("q.jsonl", '{"question_id": 1, "prompt": "hi"}\n'),
        "answers_empty_choices": put("a.jsonl", '{"question_id": 1, "choices": []}\n'),
        "answers_good": put("b.jsonl", '{"question_id": 1, "answer": "hello"}\n'),
    }


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir) -> Path:
    """One finished tiny run, shared by the module: no case may change a byte of it."""
    root = tmp_path_factory.mktemp("tiny-run")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = root / "run"
    argv = ["run", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--oracle", "length:3"]
    assert main([*argv, "--layers", "1-2", "--out", str(out), *TINY_RUN]) == 0
    return out


ARENA = ["arena", "--judge", "length"]

# (case id, argv with {placeholders}, text the error line must contain)
CASES: list[tuple[str, list[str], str]] = [
    # -- sims run: floats must be finite ---------------------------------------------------
    ("temperature-nan", ["run", "--temperature", "nan"], "not a finite number"),
    ("temperature-inf", ["run", "--temperature", "inf"], "not a finite number"),
    ("top-p-nan", ["run", "--top-p", "NaN"], "not a finite number"),
    ("fluency-budget-inf", ["run", "--fluency-budget", "inf"], "not a finite number"),
    ("fluency-budget-nan", ["run", "--fluency-budget", "nan"], "not a finite number"),
    ("repetition-margin-minus-inf", ["run", "--repetition-margin=-inf"], "not a finite number"),
    ("strength-grid-nan", ["run", "--strength-grid", "0.5,nan"], "not a finite number"),
    ("temperature-text", ["run", "--temperature", "warm"], "not a number"),
    # -- sims run: learner options typed like their defaults ---------------------------------
    ("learner-strength-text", ["run", "-L", "strength=abc"], "strength"),
    ("learner-coefficient-nan-text", ["run", "-L", "coefficient=nan"], "a finite number"),
    ("learner-coefficient-json-nan", ["run", "-L", "coefficient=NaN"], "must be finite"),
    ("learner-coefficient-infinity", ["run", "-L", "coefficient=-Infinity"], "must be finite"),
    ("learner-normalize-number", ["run", "-L", "normalize=3"], "true or false"),
    ("learner-strength-bool", ["run", "-L", "strength=true"], "a finite number"),
    ("learner-alpha-list", ["run", "--learner", "hpr", "-L", "alpha=[1, NaN]"], "must be finite"),
    ("learner-epochs-float", ["run", "--learner", "hpr", "-L", "epochs=2.5"], "an integer"),
    # -- sims run: integer ranges ---------------------------------------------------------
    ("seed-2-63", ["run", "--seed", str(2**63)], "out of range"),
    ("seed-huge", ["run", "--seed", "9" * 30], "out of range"),
    ("seed-2-32", ["run", "--seed", str(2**32)], "2**32"),
    ("seed-negative", ["run", "--seed", "-1"], "2**32"),
    ("iterations-huge", ["run", "-T", "1" + "0" * 25], "out of range"),
    ("prompts-per-iteration-negative", ["run", "-N", "-1"], "N"),
    ("samples-per-prompt-negative", ["run", "-K", "-3"], "K"),
    ("eval-prompts-negative", ["run", "--eval-prompts", "-5"], "eval prompts"),
    ("max-new-tokens-zero", ["run", "--max-new-tokens", "0"], "max_new_tokens"),
    ("batch-size-negative", ["run", "--batch-size", "-1"], "batch_size"),
    ("top-k-negative", ["run", "--top-k", "-1"], "top_k"),
    ("calibration-prompts-negative", ["run", "--calibration-prompts", "-1"], "calibration prompt"),
    ("patience-negative", ["run", "--patience", "-1"], "patience"),
    ("bank-capacity-negative", ["run", "--bank-capacity", "-1"], "capacity"),
    ("judge-timeout-nan", ["run", "--judge-timeout", "nan"], "not a finite number"),
    ("judge-timeout-zero", ["run", "--judge-timeout", "0"], "must be > 0"),
    ("judge-concurrency-zero", ["run", "--judge-concurrency", "0"], "must be >= 1"),
    ("judge-retries-negative", ["run", "--judge-retries", "-1"], "must be >= 0"),
    ("judge-url-credentials", ["run", "--oracle", "judge:m@https://me:s3cret@h/v1"], "--judge-url-env"),
    (
        "judge-url-query-secret",
        ["run", "--oracle", "judge", "--judge-model", "m", "--judge-base-url", "https://h/v1?api_key=s3cret"],
        "--judge-url-env",
    ),
    (
        "judge-url-twice",
        [
            "run",
            "--oracle",
            "judge",
            "--judge-model",
            "m",
            "--judge-base-url",
            "https://h/v1",
            "--judge-url-env",
            "V",
        ],
        "give the judge's URL once",
    ),
    (
        "judge-url-env-unset",
        ["run", "--oracle", "judge", "--judge-model", "m", "--judge-url-env", "SIMS_TEST_UNSET_VARIABLE"],
        "$SIMS_TEST_UNSET_VARIABLE is empty",
    ),
    ("judge-check-judge-timeout-zero", ["judge-check", "--oracle", "length", "--judge-timeout", "0"], "> 0"),
    ("arena-judge-retries-negative", [*ARENA, "--judge-retries", "-1"], "must be >= 0"),
    ("eval-judge-timeout-nan", ["eval", "{run}", "--judge-timeout", "nan"], "not a finite number"),
    # -- sims run: prompt files (read before the model loads) --------------------------------
    ("prompts-duplicate-ids", ["run", "--prompts", "{dup_ids}"], "appears more than once"),
    ("prompts-list-id", ["run", "--prompts", "{list_id}"], "'id' must be text"),
    ("prompts-not-utf8", ["run", "--prompts", "{latin1}"], "not UTF-8"),
    ("prompts-folder", ["run", "--prompts", "{folder}"], "is a folder"),
    ("prompts-missing", ["run", "--prompts", "{missing}"], "not found"),
    ("prompts-not-json", ["run", "--prompts", "{not_json}"], "not valid JSON"),
    ("eval-prompts-duplicate-ids", ["run", "--eval-prompts-file", "{dup_ids}"], "appears more than once"),
    # -- sims run into / from the shared run ------------------------------------------------
    ("run-into-existing-run", ["run", "--out", "{run}"], "--resume"),
    ("resume-other-temperature", ["run", "--resume", "{run}", "--temperature", "0.3"], "--temperature"),
    ("resume-nan-temperature", ["run", "--resume", "{run}", "--temperature", "nan"], "finite"),
    ("resume-other-seed", ["run", "--resume", "{run}", "--seed", "5"], "--seed"),
    # -- sims generate ------------------------------------------------------------------------
    ("generate-num-samples-zero", ["generate", "--no-steer", "-p", "hi", "--num-samples", "0"], ">= 1"),
    ("generate-strength-nan", ["generate", "--no-steer", "-p", "hi", "--strength", "nan"], "finite"),
    ("generate-seed-negative", ["generate", "--no-steer", "-p", "hi", "--seed", "-5"], "2**32"),
    ("generate-duplicate-ids", ["generate", "--no-steer", "--prompts", "{dup_ids}"], "more than once"),
    ("generate-temperature-inf", ["generate", "--no-steer", "-p", "hi", "--temperature", "inf"], "finite"),
    # the bounds sims serve puts on a request's strength (issue 23, item 12)
    ("generate-strength-huge", ["generate", "--no-steer", "-p", "hi", "--strength", "1e300"], "-10 to 10"),
    ("generate-strength-below", ["generate", "--no-steer", "-p", "hi", "--strength", "-10.5"], "-10 to 10"),
    # -- sims serve (refused before the model loads) ------------------------------------------
    ("serve-port-huge", ["serve", "--port", "70000"], "port"),
    ("serve-batch-wait-negative", ["serve", "--batch-wait-ms", "-1"], ">= 0"),
    ("serve-batch-wait-nan", ["serve", "--batch-wait-ms", "nan"], "finite"),
    ("serve-max-batch-zero", ["serve", "--max-batch", "0"], ">= 1"),
    ("serve-seed-huge", ["serve", "--seed", str(2**64)], "out of range"),
    ("serve-body-timeout-zero", ["serve", "--body-timeout", "0"], "> 0"),
    ("serve-body-timeout-nan", ["serve", "--body-timeout", "nan"], "finite"),
    # -- sims eval / baseline -------------------------------------------------------------
    ("eval-mc-limit-negative", ["eval", "{run}", "--mc-limit", "-1"], ">= 0"),
    ("eval-bootstrap-negative", ["eval", "{run}", "--bootstrap", "-1"], ">= 0"),
    ("baseline-n-zero", ["baseline", "best-of-n", "--like", "{run}", "--out", "x", "--n", "0"], ">= 1"),
    # -- sims judge-check: the pairs file is read before the oracle -------------------------
    ("judge-check-limit-zero", ["judge-check", "--oracle", "length", "--limit", "0"], ">= 1"),
    ("judge-check-missing", ["judge-check", "--oracle", "length", "--pairs", "{missing}"], "not found"),
    ("judge-check-not-json", ["judge-check", "--oracle", "length", "--pairs", "{not_json}"], "pairs file"),
    (
        "judge-check-list-row",
        ["judge-check", "--oracle", "length", "--pairs", "{list_row}"],
        "chosen and rejected",
    ),
    ("judge-check-number", ["judge-check", "--oracle", "length", "--pairs", "{number_pair}"], "text"),
    ("judge-check-dialogue", ["judge-check", "--oracle", "length", "--pairs", "{no_assistant}"], "Assistant"),
    ("judge-check-not-gzip", ["judge-check", "--oracle", "length", "--pairs", "{not_gzip}"], "pairs file"),
    ("judge-check-empty", ["judge-check", "--oracle", "length", "--pairs", "{empty}"], "no preference pairs"),
    ("judge-check-folder", ["judge-check", "--oracle", "length", "--pairs", "{folder}"], "not found"),
    # -- sims lc: annotation and leaderboard files ----------------------------------------
    ("lc-missing", ["lc", "{missing}"], "not found"),
    ("lc-not-json", ["lc", "{ann_not_json}"], "annotation file"),
    ("lc-list-of-numbers", ["lc", "{ann_ints}"], "annotation file"),
    ("lc-no-outputs", ["lc", "{ann_no_output}"], "annotation file"),
    ("lc-empty-list", ["lc", "{ann_empty}"], "annotation file"),
    ("lc-object", ["lc", "{ann_object}"], "annotation file"),
    ("lc-folder", ["lc", "{folder}"], "is a folder"),
    ("lc-leaderboard-missing", ["lc", "{ann_ints}", "--leaderboard", "{missing}"], "not found"),
    # -- sims arena: judgment, question and answer files ---------------------------------
    ("arena-judgments-not-json", ["arena", "--judgments", "{not_json}"], "not valid JSON"),
    ("arena-judgments-list-row", ["arena", "--judgments", "{list_row}"], "judgment file"),
    ("arena-judgments-no-model", ["arena", "--judgments", "{judgment_no_model}"], "judgment file"),
    ("arena-judgments-verdict", ["arena", "--judgments", "{judgment_bad_verdict}"], "unknown verdict"),
    ("arena-judgments-games-text", ["arena", "--judgments", "{judgment_games_text}"], "judgment file"),
    ("arena-judgments-missing", ["arena", "--judgments", "{missing}"], "not found"),
    (
        "arena-answers-empty-choices",
        [
            *ARENA,
            "--questions",
            "{questions}",
            "--baseline",
            "{answers_good}",
            "--answers",
            "{answers_empty_choices}",
        ],
        "answer file",
    ),
    (
        "arena-questions-missing",
        [*ARENA, "--questions", "{missing}", "--baseline", "{answers_good}", "--answers", "{answers_good}"],
        "not found",
    ),
    # -- the parser itself ------------------------------------------------------------------
    ("unknown-command", ["frobnicate"], "invalid choice"),
    ("unknown-option", ["run", "--frobnicate"], "unrecognized arguments"),
]


@pytest.mark.parametrize("argv, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line(argv, message, files, tiny_run, tiny_model_dir, tmp_path, capsys):
    names = {**files, "run": tiny_run}
    argv = [a.format(**{k: str(v) for k, v in names.items()}) for a in argv]
    if argv[0] in ("run", "generate", "serve") and "--resume" not in argv:
        argv += ["--model", str(tiny_model_dir)]
    if argv[0] == "run" and "--resume" not in argv:
        if "--prompts" not in argv:
            argv += ["--prompts", str(files["good_prompts"])]
        if "--out" not in argv:
            argv += ["--out", str(tmp_path / "out")]
    before = tree_hash(tiny_run)
    line = one_line_error(capsys, argv)
    assert message in line, line
    assert "s3cret" not in line  # a secret typed in a URL is never printed
    assert tree_hash(tiny_run) == before
    assert not (tmp_path / "out").exists()  # a refused run writes nothing


def test_there_are_at_least_sixty_distinct_cases():
    assert len({c[0] for c in CASES}) == len(CASES) >= 60


# -- what needs the model --------------------------------------------------------------------
def test_prompt_longer_than_the_context(tmp_path, tiny_gpt2_dir, tiny_run, capsys):
    long = " ".join(["the good day"] * 100)  # 300 words: past GPT-2's 256 positions
    line = one_line_error(capsys, ["generate", "--model", str(tiny_gpt2_dir), "--no-steer", "-p", long])
    assert "context of 256 tokens" in line


def test_run_prompt_longer_than_the_context_is_refused_before_work(tmp_path, tiny_gpt2_dir, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the good day\n" + " ".join(["the good day"] * 100) + "\n")  # 300 words
    out = tmp_path / "run"
    argv = ["run", "--model", str(tiny_gpt2_dir), "--prompts", str(prompts), "--out", str(out), *TINY_RUN]
    line = one_line_error(capsys, argv)
    assert "context of 256 tokens" in line and "'1'" in line, line
    assert not out.exists()  # refused before anything was written


def test_nan_score_from_a_python_oracle_names_it(tmp_path, tiny_model_dir, files, capsys):
    scorer = tmp_path / "scorer.py"
    scorer.write_text("def score(prompt, response):\n    return float('nan')\n")
    out = tmp_path / "run"
    argv = ["run", "--model", str(tiny_model_dir), "--prompts", str(files["good_prompts"])]
    argv += ["--oracle", f"python:{scorer}:score", "--out", str(out), *TINY_RUN]
    line = one_line_error(capsys, argv)
    assert "scorer.py:score" in line and "finite" in line
    assert not list(out.rglob("*.json")) or "NaN" not in "".join(p.read_text() for p in out.rglob("*.json"))


def test_a_full_disk_or_denied_write_is_one_line_exit_1(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import errno

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    # The output passes the checks made before the work; its commit then meets a full disk.
    monkeypatch.setattr("simsteer.io.os.replace", full_disk)
    argv = ["generate", "--model", str(tiny_model_dir), "--no-steer", "-p", "hi", "--max-new-tokens", "2"]
    line = one_line_error(capsys, [*argv, "--quiet", "--output", str(tmp_path / "answers.jsonl")], status=1)
    assert line == "sims: error: OSError: [Errno 28] No space left on device"
    assert not list(tmp_path.iterdir())  # the temporary was removed


def test_output_under_a_file_is_refused_before_the_work(tiny_model_dir, capsys):
    # /dev/null is a file: no folder can be made under it (this fails even for root).
    argv = ["generate", "--model", str(tiny_model_dir), "--no-steer", "-p", "hi", "--max-new-tokens", "2"]
    line = one_line_error(capsys, [*argv, "--quiet", "--output", "/dev/null/x/answers.jsonl"])
    assert "/dev/null is not a folder" in line


def test_an_unexpected_error_is_one_line_exit_1(monkeypatch, capsys):
    import simsteer.cli.info as info

    def boom(args):
        raise RuntimeError("something broke\nover two lines")

    monkeypatch.setattr(info, "cmd_info", boom)
    monkeypatch.delenv("SIMS_DEBUG", raising=False)
    line = one_line_error(capsys, ["info", "."], status=1)
    assert line == "sims: error: RuntimeError: something broke over two lines"


def test_sims_debug_shows_the_traceback(monkeypatch, capsys):
    import simsteer.cli.info as info

    monkeypatch.setattr(info, "cmd_info", lambda args: 1 / 0)
    monkeypatch.setenv("SIMS_DEBUG", "1")
    assert main(["info", "."]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("sims: error: ZeroDivisionError")


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_every_score_oracle_refuses_non_finite_scores(value):
    import numpy as np

    from simsteer.errors import SimsError
    from simsteer.oracles.base import ScoreOracle
    from simsteer.oracles.python_function import PythonScoreOracle

    with pytest.raises(SimsError, match="python:mine"):
        PythonScoreOracle(lambda p, r: value, "python:mine").score(["p"], ["r"])

    class Plugin(ScoreOracle):
        name = "plugin"

        def score(self, prompts, responses):
            return np.full(len(responses), value)

    with pytest.raises(SimsError, match="oracle plugin"):
        Plugin().judge(["p"], [["a", "b"]])
