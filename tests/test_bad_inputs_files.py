"""Hand-edited, damaged or wrong-typed files in a run directory or a steering folder:
each is refused in one line naming the file and the field (exit status 2, no traceback),
and the folder is left byte-identical. Two tiny runs are made per module (the default
variant, and SIMS-CS for its response bank); every case edits its own copy."""

from __future__ import annotations

import json
import math
import os
import shutil
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from simsteer.cli.main import main
from simsteer.errors import SimsError
from simsteer.functions import AddVector, HeadShift
from simsteer.loop.records import SampleRecord
from simsteer.loop.rundir import RunDir
from simsteer.schema import Leaf, leaves
from simsteer.steering import Steering

from .conftest import TINY_RUN
from .test_bad_inputs_cli import PROMPTS, one_line_error, tree_hash


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("tiny-run-files")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = root / "run"
    argv = ["run", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--oracle", "length:3"]
    assert main([*argv, "--layers", "1-2", "--fluency-budget", "off", "--out", str(out), *TINY_RUN]) == 0
    return out


@pytest.fixture(scope="module")
def cs_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished SIMS-CS run: its bank.jsonl is checked when it is resumed."""
    root = tmp_path_factory.mktemp("tiny-cs-run")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = root / "run"
    argv = ["run", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--oracle", "length:3"]
    argv += ["--layers", "1-2", "--fluency-budget", "off", "--variant", "cs", "--out", str(out), *TINY_RUN]
    assert main(argv) == 0
    assert (out / "bank.jsonl").read_text().count("\n") >= 2
    return out


@pytest.fixture(scope="module")
def steering_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A steering with two layers for the tiny model (the tiny run's final may have none)."""
    from simsteer.models import load_model

    lm = load_model(str(tiny_model_dir), device="cpu", dtype="fp32")
    vectors = {i: AddVector(torch.linspace(-1, 1, lm.hidden_size)) for i in (1, 2)}
    return Steering(vectors, "caa", lm.fingerprint()).save(tmp_path_factory.mktemp("steering") / "s")


def json_edit(name: str, change: Callable[[Any], Any]) -> Callable[[Path], None]:
    """An edit of the JSON file ``name`` (relative to the copy): ``change`` returns the new data."""

    def apply(root: Path) -> None:
        path = root / name
        data = json.loads(path.read_text())
        path.write_text(json.dumps(change(data)))  # json.dumps writes NaN for float("nan")

    return apply


def text_edit(name: str, text: str | bytes) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        path = root / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())

    return apply


def jsonl_edit(name: str, change: Callable[[list[Any]], list[Any]], source: str | None = None):
    """An edit of the JSONL file ``name``: ``change`` maps the rows of ``source`` (default:
    the file itself) to the new rows."""

    def apply(root: Path) -> None:
        rows = [json.loads(x) for x in (root / (source or name)).read_text().splitlines()]
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in change(rows)))

    return apply


def first(change: Callable[[Any], Any]) -> Callable[[list[Any]], list[Any]]:
    """A change of the first row only."""
    return lambda rows: [change(rows[0]), *rows[1:]]


def put(data: dict, dotted: str, value: Any) -> dict:
    """``data`` with the value at ``a.b.c`` replaced (or added)."""
    node = data
    *parents, last = dotted.split(".")
    for key in parents:
        node = node[key]
    node[last] = value
    return data


def drop(data: dict, key: str) -> dict:
    data.pop(key)
    return data


CONFIG = "config.json"
SUMMARY = "iter_0/summary.json"
OUTCOME = "outcome.json"
BANK = "bank.jsonl"


def outcome_put(dotted: str, value: Any) -> Callable[[Path], None]:
    return json_edit(OUTCOME, lambda d: put(d, dotted, value))


def bank_row(change: Callable[[dict], Any], name: str = BANK) -> Callable[[Path], None]:
    """An edit of the first row of bank.jsonl (written to ``name``)."""
    return jsonl_edit(name, first(change), source=BANK)


STEERING = "final/steering_config.json"
NAN = float("nan")

# (case id, edit, command: info / resume / info-final, text the error line must contain)
CASES: list[tuple[str, Callable[[Path], None], str, str]] = [
    # -- config.json --------------------------------------------------------------------
    ("config-not-json", text_edit(CONFIG, "{oops"), "info", "not valid JSON"),
    ("config-not-utf8", text_edit(CONFIG, b"\xff\xfe{}"), "info", "not valid JSON"),
    ("config-a-list", json_edit(CONFIG, lambda d: [d]), "info", "JSON object"),
    (
        "config-iterations-text",
        json_edit(CONFIG, lambda d: put(d, "sims.iterations", "3")),
        "info",
        "iterations",
    ),
    (
        "config-iterations-zero",
        json_edit(CONFIG, lambda d: put(d, "sims.iterations", 0)),
        "info",
        "iterations",
    ),
    (
        "config-temperature-nan",
        json_edit(CONFIG, lambda d: put(d, "sims.sampling.temperature", NAN)),
        "resume",
        "temperature",
    ),
    (
        "config-top-k-float",
        json_edit(CONFIG, lambda d: put(d, "sims.sampling.top_k", 1.5)),
        "resume",
        "top_k",
    ),
    ("config-seed-text", json_edit(CONFIG, lambda d: put(d, "sims.seed", "x")), "resume", "sims.seed"),
    ("config-seed-huge", json_edit(CONFIG, lambda d: put(d, "sims.seed", 2**70)), "resume", "sims.seed"),
    (
        "config-unknown-sims-field",
        json_edit(CONFIG, lambda d: put(d, "sims.frobnicate", 1)),
        "info",
        "frobnicate",
    ),
    (
        "config-grid-text",
        json_edit(CONFIG, lambda d: put(d, "sims.guard.strength_grid", "abc")),
        "info",
        "strength_grid",
    ),
    (
        "config-budget-inf",
        json_edit(CONFIG, lambda d: put(d, "sims.guard.fluency_budget", float("inf"))),
        "resume",
        "fluency_budget",
    ),
    ("config-bank-text", json_edit(CONFIG, lambda d: put(d, "sims.bank", "big")), "info", "sims.bank"),
    ("config-model-null", json_edit(CONFIG, lambda d: put(d, "model", None)), "info", "'model'"),
    (
        "config-model-source-number",
        json_edit(CONFIG, lambda d: put(d, "model.source", 5)),
        "resume",
        "model.source",
    ),
    (
        "config-trust-text",
        json_edit(CONFIG, lambda d: put(d, "model.trust_remote_code", "yes")),
        "resume",
        "trust_remote_code",
    ),
    (
        "config-oracle-name-number",
        json_edit(CONFIG, lambda d: put(d, "oracle.name", 5)),
        "info",
        "oracle.name",
    ),
    ("config-learner-missing", json_edit(CONFIG, lambda d: drop(d, "learner")), "info", "'learner'"),
    (
        "config-learner-strength-text",
        json_edit(CONFIG, lambda d: put(d, "learner.strength", "abc")),
        "resume",
        "strength",
    ),
    (
        "config-learner-coefficient-nan",
        json_edit(CONFIG, lambda d: put(d, "learner.coefficient", NAN)),
        "resume",
        "coefficient",
    ),
    ("config-layers-text", json_edit(CONFIG, lambda d: put(d, "layers", "1-2")), "info", "layers"),
    ("config-format-99", json_edit(CONFIG, lambda d: put(d, "format_version", 99)), "resume", "99"),
    # -- iteration rows --------------------------------------------------------------------
    ("summary-score-text", json_edit(SUMMARY, lambda d: put(d, "eval_score", "abc")), "info", "eval_score"),
    ("summary-score-nan", json_edit(SUMMARY, lambda d: put(d, "sample_score", NAN)), "info", "sample_score"),
    ("summary-iteration-text", json_edit(SUMMARY, lambda d: put(d, "iteration", "0")), "info", "iteration"),
    ("summary-a-list", json_edit(SUMMARY, lambda d: [d]), "info", "JSON object"),
    (
        "summary-fluency-text",
        json_edit(SUMMARY, lambda d: put(d, "eval_fluency.perplexity", "x")),
        "info",
        "perplexity",
    ),
    (
        "summary-seconds-text",
        json_edit(SUMMARY, lambda d: put(d, "seconds", {"eval": "slow"})),
        "info",
        "seconds",
    ),
    ("summary-not-json", text_edit(SUMMARY, "{"), "info", "not valid JSON"),
    # -- outcome.json ----------------------------------------------------------------------
    ("outcome-not-json", text_edit(OUTCOME, "{"), "info", "not valid JSON"),
    ("outcome-a-list", json_edit(OUTCOME, lambda d: [d]), "info", "JSON object"),
    (
        "outcome-final-missing",
        json_edit(OUTCOME, lambda d: drop(d, "final_policy")),
        "info",
        "'final_policy'",
    ),
    ("outcome-final-text", outcome_put("final_policy", "1"), "info", "final_policy"),
    ("outcome-final-negative", outcome_put("final_policy", -1), "info", "final_policy"),
    ("outcome-stopped-number", outcome_put("stopped", 5), "info", "stopped"),
    ("outcome-unknown-field", outcome_put("colour", 1), "info", "colour"),
    ("outcome-held-out-list", outcome_put("held_out", []), "info", "held_out"),
    (
        "outcome-improvement-nan",
        outcome_put("held_out.improvement", NAN),
        "info",
        "held_out.improvement",
    ),
    (
        "outcome-base-score-text",
        outcome_put("held_out.base_score", "low"),
        "info",
        "held_out.base_score",
    ),
    ("outcome-ci-short", outcome_put("held_out.ci95", [0.0]), "info", "held_out.ci95"),
    (
        "outcome-prompts-float",
        outcome_put("held_out.prompts", 1.5),
        "info",
        "held_out.prompts",
    ),
    (
        "outcome-ratio-inf",
        outcome_put("fluency.perplexity_ratio", float("inf")),
        "info",
        "fluency.perplexity_ratio",
    ),
    (
        "outcome-fluency-entry-missing",
        json_edit(OUTCOME, lambda d: put(d, "fluency", drop(d["fluency"], "loop_share_delta"))),
        "info",
        "fluency.loop_share_delta",
    ),
    # -- bank.jsonl (SIMS-CS, checked on resume) -----------------------------------------------
    ("bank-not-json", text_edit(BANK, "{\n"), "resume-cs", "not valid JSON"),
    ("bank-row-a-list", bank_row(lambda r: [r]), "resume-cs", "JSON object"),
    ("bank-reward-nan", bank_row(lambda r: put(r, "reward", NAN)), "resume-cs", "reward"),
    ("bank-reward-text", bank_row(lambda r: put(r, "reward", "high")), "resume-cs", "reward"),
    ("bank-preference-missing", bank_row(lambda r: drop(r, "preference")), "resume-cs", "'preference'"),
    (
        "bank-preference-wrong-size",
        bank_row(lambda r: put(r, "preference", [row[:-1] for row in r["preference"]])),
        "resume-cs",
        "preference",
    ),
    (
        "bank-preference-above-one",
        bank_row(lambda r: put(r, "preference", [[2.0] * len(x) for x in r["preference"]])),
        "resume-cs",
        "preference",
    ),
    (
        "bank-preference-nan",
        bank_row(lambda r: put(r, "preference", [[NAN] * len(x) for x in r["preference"]])),
        "resume-cs",
        "preference",
    ),
    ("bank-responses-text", bank_row(lambda r: put(r, "responses", "hi")), "resume-cs", "responses"),
    ("bank-iteration-text", bank_row(lambda r: put(r, "iteration", "0")), "resume-cs", "iteration"),
    ("bank-prompt-id-number", bank_row(lambda r: put(r, "prompt_id", 3)), "resume-cs", "prompt_id"),
    ("bank-unknown-field", bank_row(lambda r: put(r, "colour", 1)), "resume-cs", "colour"),
    (
        "bank-pending-reward-nan",
        bank_row(lambda r: put(r, "reward", NAN), "iter_1/bank.pending.jsonl"),
        "resume-cs",
        "reward",
    ),
    # -- steering folder ---------------------------------------------------------------------
    (
        "steering-strength-text",
        json_edit(STEERING, lambda d: put(d, "strength", "abc")),
        "info-final",
        "strength",
    ),
    (
        "steering-strength-nan",
        json_edit(STEERING, lambda d: put(d, "strength", NAN)),
        "info-final",
        "strength",
    ),
    (
        "steering-strength-inf",
        json_edit(STEERING, lambda d: put(d, "strength", float("inf"))),
        "info-final",
        "strength",
    ),
    (
        "steering-positions",
        json_edit(STEERING, lambda d: put(d, "positions", "middle")),
        "info-final",
        "positions",
    ),
    (
        "steering-layer-key",
        json_edit(STEERING, lambda d: put(d, "layers", {"x": {"kind": "add", "params": {}}})),
        "info-final",
        "layers.x",
    ),
    ("steering-kind-number", json_edit(STEERING, lambda d: put(d, "layers.1.kind", 5)), "info-final", "kind"),
    (
        "steering-kind-unknown",
        json_edit(STEERING, lambda d: put(d, "layers.1.kind", "warp")),
        "info-final",
        "warp",
    ),
    (
        "steering-params-list",
        json_edit(STEERING, lambda d: put(d, "layers.1.params", [])),
        "info-final",
        "params",
    ),
    ("steering-learner-number", json_edit(STEERING, lambda d: put(d, "learner", 5)), "info-final", "learner"),
    (
        "steering-fingerprint-text",
        json_edit(STEERING, lambda d: put(d, "fingerprint.hidden_size", "32")),
        "info-final",
        "hidden_size",
    ),
    ("steering-format-2", json_edit(STEERING, lambda d: put(d, "format_version", 2)), "info-final", "format"),
    ("steering-config-not-json", text_edit(STEERING, "nope"), "info-final", "corrupt steering file"),
    (
        "steering-weights-garbage",
        text_edit("final/steering.safetensors", b"\x00garbage"),
        "info-final",
        "corrupt",
    ),
    (
        "steering-metadata-list",
        json_edit(STEERING, lambda d: put(d, "metadata", [])),
        "info-final",
        "metadata",
    ),
]


@pytest.mark.parametrize("edit, command, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_file_gives_one_line(edit, command, message, tiny_run, cs_run, steering_dir, tmp_path, capsys):
    source = cs_run if command == "resume-cs" else tiny_run
    original = tree_hash(source)
    copy = tmp_path / "run"
    shutil.copytree(source, copy)
    if command == "info-final":
        shutil.rmtree(copy / "final")
        shutil.copytree(steering_dir, copy / "final")
    edit(copy)
    before = tree_hash(copy)
    argv = {
        "info": ["info", str(copy)],
        "resume": ["run", "--resume", str(copy), "--quiet"],
        "resume-cs": ["run", "--resume", str(copy), "--quiet"],
        "info-final": ["info", str(copy / "final")],
    }[command]
    line = one_line_error(capsys, argv)
    assert message in line, line
    if command != "info-final" and "JSON" not in message:
        assert any(name in line for name in (CONFIG, "summary.json", OUTCOME, BANK, "bank.pending")), line
    assert tree_hash(copy) == before  # the refused command wrote nothing
    assert tree_hash(source) == original


def test_there_are_many_distinct_file_cases():
    assert len({c[0] for c in CASES}) == len(CASES) >= 40


# -- tensors ------------------------------------------------------------------------------
def test_nan_in_a_saved_vector_is_refused(tiny_run, steering_dir, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    shutil.rmtree(copy / "final")
    shutil.copytree(steering_dir, copy / "final")
    weights = copy / "final" / "steering.safetensors"
    from safetensors.torch import load_file

    tensors = load_file(str(weights))
    name = next(iter(tensors))
    tensors[name][0] = float("nan")
    save_file(tensors, str(weights))
    before = tree_hash(copy)
    line = one_line_error(capsys, ["info", str(copy / "final")])
    assert name in line and "NaN" in line
    assert tree_hash(copy) == before


def test_vector_of_the_wrong_length_for_the_model(tiny_run, steering_dir, tiny_model_dir, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    shutil.rmtree(copy / "final")
    shutil.copytree(steering_dir, copy / "final")
    weights = copy / "final" / "steering.safetensors"
    from safetensors.torch import load_file

    tensors = {k: v[:-1].contiguous() for k, v in load_file(str(weights)).items()}  # 31 of 32
    save_file(tensors, str(weights))
    before = tree_hash(copy)
    argv = ["generate", "--model", str(tiny_model_dir), "--steering", str(copy), "-p", "hi", "--quiet"]
    line = one_line_error(capsys, argv)
    assert "31 wide" in line and "32 wide" in line
    assert tree_hash(copy) == before


def test_iti_heads_of_the_wrong_size_for_the_model(tiny_lm, tiny_model_dir, tmp_path, capsys):
    # The tiny llama has 4 heads x 8 dims at o_proj's input: 4 x 7 is another model's.
    fn = HeadShift(torch.ones(4, 7), torch.ones(4))
    Steering({1: fn}, "iti", tiny_lm.fingerprint()).save(tmp_path / "iti")
    argv = ["generate", "--model", str(tiny_model_dir), "--steering", str(tmp_path / "iti"), "-p", "hi"]
    line = one_line_error(capsys, [*argv, "--quiet"])
    assert "28 wide" in line and "attn_heads" in line and "32 wide" in line
    good = Steering({1: HeadShift(torch.ones(4, 8), torch.ones(4))}, "iti", tiny_lm.fingerprint())
    good.check_model(tiny_lm.model)  # the right width passes


# -- rows read by the loop on resume (checked through the reader) --------------------------
@pytest.mark.parametrize(
    "field, value",
    [
        ("score", "high"),
        ("score", NAN),
        ("win_rate", None),
        ("sample", "0"),
        ("finished", "yes"),
        ("label", 3),
    ],
)
def test_hand_edited_sample_row_names_the_file_and_field(tiny_run, tmp_path, field, value):
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    path = copy / "iter_0" / "samples.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    rows[0][field] = value
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SimsError) as err:
        RunDir(copy).read_samples(0)
    assert "samples.jsonl" in str(err.value) and field in str(err.value)
    assert SampleRecord.from_json(json.loads(path.read_text().splitlines()[1]))  # other rows fine


@pytest.mark.parametrize("row", ['{"id": 1, "prompt": "x"}', '{"id": "1"}', "[1]"])
def test_hand_edited_prompt_row_names_the_file(tiny_run, tmp_path, row):
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    (copy / "prompts.jsonl").write_text(row + "\n")
    with pytest.raises(SimsError, match=r"prompts\.jsonl"):
        RunDir(copy).read_prompts(copy / "prompts.jsonl")


def test_runs_write_no_nan_tokens(tiny_run):
    for path in tiny_run.rglob("*.json*"):
        text = path.read_text()
        assert "NaN" not in text and "Infinity" not in text, path


def test_an_undefined_perplexity_is_written_null_and_read_back_nan():
    import math

    from simsteer.io import write_json
    from simsteer.loop.records import FluencyRecord

    record = FluencyRecord(math.nan, 0.0, 1.0, 0.0, 0.0)
    assert record.to_json()["perplexity"] is None
    assert math.isnan(FluencyRecord.from_json(record.to_json()).perplexity)
    with pytest.raises(ValueError):
        write_json("/dev/null", {"x": math.nan})  # allow_nan=False: never the NaN token


# -- generated from the checker's field table ------------------------------------------------
def _bad_values(leaf: Leaf) -> list[tuple[str, Any]]:
    """(label, value) pairs the field must refuse: the wrong type, a bool for a number, a
    non-finite number, a value under its bound, and its absence when it is required."""
    kind, out = leaf.kind, []
    if kind in (int, float):
        out += [("text", "7"), ("bool", True)]
        if kind is int:
            out.append(("fraction", 1.5))
        if not any(r.undefined for r in leaf.rules):
            out += [("nan", NAN), ("inf", float("inf"))]
        low = next((r.low for r in leaf.rules if r.low is not None), None)
        if low is not None:
            out.append(("below", low - 1))
    elif kind is str:
        out.append(("number", 5))
    elif kind is bool:
        out.append(("text", "yes"))
    elif typing.get_origin(kind) in (list, tuple):
        out += [("text", "x"), ("list-of-text", ["x"])]
    elif typing.get_origin(kind) is dict:
        out.append(("list", []))
    if leaf.required:
        out.append(("missing", MISSING))
    return out


MISSING = object()


def _edit_at(data: Any, dotted: str, value: Any) -> Any:
    node = data
    *parents, last = dotted.split(".")
    for key in parents:
        node = node[key]
    if value is MISSING:
        node.pop(last)
    else:
        node[last] = value
    return data


def _present(data: Any, dotted: str) -> bool:
    node = data
    for key in dotted.split(".")[:-1]:
        if not isinstance(node, dict) or not isinstance(node.get(key), dict):
            return False
        node = node[key]
    return True


def _schema_cases() -> list[tuple[str, str, str, Any]]:
    """(case id, file, dotted field, bad value) for every leaf of the records
    ``sims info`` reads back: ``outcome.json``, an iteration row and ``config.json``'s loop
    settings; a leaf whose section the tiny run does not write is skipped when applied."""
    from simsteer.loop.config import SIMSConfig
    from simsteer.loop.outcome import OutcomeRecord
    from simsteer.loop.records import IterationRecord, JudgingStats

    tables = [
        (OUTCOME, leaves(OutcomeRecord)),
        (
            SUMMARY,
            [x for x in leaves(IterationRecord) if not x.name.startswith(("judging.", "calibration."))],
        ),
        (SUMMARY, leaves(JudgingStats)),
        (CONFIG, leaves(SIMSConfig, "sims")),
    ]
    cases = []
    for name, table in tables:
        for leaf in table:
            for label, value in _bad_values(leaf):
                cases.append((f"schema-{name.split('/')[-1]}-{leaf.name}-{label}", name, leaf.name, value))
    return cases


SCHEMA_CASES = _schema_cases()
#: Valid sections the tiny run does not write (it runs without the guard).
VALID_SECTIONS = {"selection": {"rule": "one-se", "best_calibrated": 0}}


@pytest.mark.parametrize(
    "name, field, value", [c[1:] for c in SCHEMA_CASES], ids=[c[0] for c in SCHEMA_CASES]
)
def test_every_field_of_a_saved_record_is_checked(name, field, value, tiny_run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy, copy_function=os.link)  # cheap: only the edited file is new
    data = json.loads((copy / name).read_text())
    (copy / name).unlink()  # never write through the link into the shared run
    if not _present(data, field):  # a section this run has none of: a valid one first
        data[field.split(".")[0]] = dict(VALID_SECTIONS[field.split(".")[0]])
    (copy / name).write_text(json.dumps(_edit_at(data, field, value)))
    before = tree_hash(copy)
    line = one_line_error(capsys, ["info", str(copy)])
    assert f"'{field}" in line and name.split("/")[-1] in line, line
    assert tree_hash(copy) == before


def test_the_generated_cases_cover_every_record_field():
    assert len(SCHEMA_CASES) >= 100
    fields = {c[2] for c in SCHEMA_CASES}
    assert {
        "final_policy",
        "held_out.ci95",
        "fluency.perplexity_ratio",
        "selection.best_calibrated",
    } <= fields
    assert {"iteration", "sample_fluency.perplexity", "judge_requests", "sims.sampling.top_k"} <= fields


# -- eval.json, read back by sims compare ------------------------------------------------------
def _eval_result() -> dict[str, Any]:
    from simsteer.evaluation.run_eval import EvalResult, MeanCI, ScoreComparison

    ci = MeanCI(0.1, 0.0, 0.2)
    fluency = {"perplexity": 9.0, "repetition": 0.1, "distinct_2": 0.9, "loop_share": 0.0, "mean_tokens": 4.0}
    rate = {"value": 0.5, "ci_low": 0.4, "ci_high": 0.6}
    return EvalResult(
        run="run",
        kind="sims",
        model="m",
        oracle="length:3",
        learner="caa",
        steered=True,
        num_prompts=2,
        max_new_tokens=4,
        scores={"length:3": ScoreComparison(ci, ci, ci)},
        fluency={"base": fluency, "policy": {**fluency, "perplexity": math.nan}},
        win_rates_vs_base={"length:3": {"win_rate": rate, "lc_win_rate": rate, "position_flips": 0.0}},
        costs={"total": {"seconds": 1.0}},
        training_costs={"seconds": 2.0, "tokens_generated": 10, "tokens_forward": 5},
    ).to_json()


@pytest.mark.parametrize(
    "field, value",
    [
        ("scores.length:3.policy.mean", "high"),
        ("scores.length:3.delta.ci_low", NAN),
        ("fluency.base.perplexity", "x"),
        ("num_prompts", -1),
        ("steered", "yes"),
        ("training_costs.seconds", -1.0),
        ("oracle", MISSING),
    ],
)
def test_a_hand_edited_eval_json_is_refused_by_compare(field, value, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    good = _eval_result()
    assert json.loads(json.dumps(good))["fluency"]["policy"]["perplexity"] is None  # NaN written null
    (run / "eval.json").write_text(json.dumps(good))
    assert main(["compare", str(run), "-o", str(tmp_path / "cmp")]) == 0  # the unedited file is fine
    data = json.loads(json.dumps(good))
    node = data
    *parents, last = field.replace("length:3", "length|3").split(".")
    parents = [p.replace("length|3", "length:3") for p in parents]
    for key in parents:
        node = node[key]
    if value is MISSING:
        node.pop(last)
    else:
        node[last] = value
    (run / "eval.json").write_text(json.dumps(data))
    before = tree_hash(run)
    line = one_line_error(capsys, ["compare", str(run), "-o", str(tmp_path / "cmp2")])
    assert "eval.json" in line and f"'{field}" in line, line
    assert tree_hash(run) == before
