"""``sims run --resume``: the run is rebuilt from its config.json (no saved parser
namespace), and a flag typed on the resume line that differs from the saved run is refused
in one line, never silently dropped."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import pytest

from simsteer.cli.main import build_parser, given_options, main
from simsteer.cli.resume import FREE, SETTINGS, check_flags
from simsteer.errors import SimsError
from simsteer.loop.rundir import RunDir

from .conftest import TINY_RUN

ALIASES = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}


@pytest.fixture()
def tiny_run(tmp_path, tiny_model_dir) -> Path:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "the good day\na cat is happy\nI love the sun\nwe walk home\nthe cold rain\na big dog\n"
    )
    out = tmp_path / "run"
    argv = ["run", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--oracle", "length:3"]
    assert main([*argv, "--layers", "1-2", "--out", str(out), *TINY_RUN]) == 0
    return out


def _args(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.given = given_options(argv)
    return args


def test_given_options_are_what_was_typed():
    assert given_options(["run", "-T", "3", "--quiet"]) == {"iterations", "quiet"}
    # Equal to the default still counts as typed; a later flag of another command does not.
    assert given_options(["run", "--temperature", "0.8"]) == {"temperature"}
    assert given_options(["generate", "--no-steer", "-p", "x"]) == {"no_steer", "prompt"}


def test_every_run_option_is_a_setting_or_free():
    """A new `sims run` flag must be taught to --resume (compared, or declared free)."""
    run = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["run"]
    dests = {a.dest for a in run._actions if a.dest != "help"}
    assert dests - set(SETTINGS) - FREE == set()


def test_config_json_holds_specs_and_absolute_paths(tiny_run, tiny_model_dir):
    cfg = json.loads((tiny_run / "config.json").read_text())
    assert "cli" not in cfg  # no parser namespace
    assert cfg["model"]["source"] == str(Path(tiny_model_dir).resolve())
    assert Path(cfg["prompts"]["prompts"]).is_absolute() and cfg["prompts"]["eval_prompts_file"] is None
    assert cfg["oracle"] == {"name": "length:3", "temperature": 1.0}


def test_conflicting_flag_is_refused(tiny_run, capsys):
    before = {p: p.read_bytes() for p in tiny_run.rglob("*") if p.is_file()}
    capsys.readouterr()
    # Old code replayed the saved namespace over these flags and resumed without a word.
    assert main(["run", "--resume", str(tiny_run), "-T", "2", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sims: error: --iterations is 2 here but 1 in "), err
    for argv, message in [
        (["-K", "3"], "--samples-per-prompt is 3 here but 2"),
        (["--oracle", "sentiment"], "--oracle is sentiment here but length:3"),
        (["--layers", "0-1"], "--layers is 0,1 here but 1,2"),
        (["-L", "strength=2"], "-L strength is 2 here but 1.0"),
        (["--fluency-budget", "off"], "--fluency-budget is none here but 0.12"),
        (["--out", str(tiny_run.parent / "elsewhere")], "--out is"),
    ]:
        assert main(["run", "--resume", str(tiny_run), *argv, "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)
    assert before == {p: p.read_bytes() for p in tiny_run.rglob("*") if p.is_file()}


def test_resume_rebuilds_from_config_json(tiny_run, tiny_model_dir, capsys):
    table = RunDir(tiny_run).history()
    # Interrupt the run after its first iteration, then resume it with flags equal to the
    # saved ones (spelled differently: layers as a list, dtype as an alias).
    (tiny_run / "summary.json").unlink()
    (tiny_run / "iter_1" / "summary.json").unlink()
    assert not RunDir(tiny_run).is_complete()
    same = [
        "-T",
        "1",
        "--layers",
        "1,2",
        "--dtype",
        ALIASES[RunDir(tiny_run).spec().model.dtype],
        "--oracle",
        "length:3",
        "--model",
        str(tiny_model_dir),
    ]
    capsys.readouterr()
    assert main(["run", "--resume", str(tiny_run), *same, "--quiet"]) == 0
    assert "sample_score" in capsys.readouterr().out
    assert RunDir(tiny_run).is_complete()
    assert [r.eval_score for r in RunDir(tiny_run).history()] == [r.eval_score for r in table]


def test_check_flags_for_judge_and_template(tiny_run, tmp_path):
    spec = RunDir(tiny_run).spec()
    oracle = {"name": "judge", "model": "m", "base_url": "http://h/v1", "template": "judge_pairwise"}
    # A judge spec that leaves out the mode (an older run): the default is what it ran with.
    judged = replace(spec, oracle=oracle)
    base = ["run", "--resume", str(tiny_run)]
    check_flags(_args([*base, "--oracle", "judge:m@http://h/v1", "--judge-mode", "pairwise"]), judged)
    with pytest.raises(SimsError, match=r"--oracle is judge:x@http://h/v1 here but judge:m@http://h/v1"):
        check_flags(_args([*base, "--oracle", "judge:x@http://h/v1"]), judged)
    with pytest.raises(SimsError, match="--judge-mode is rank here but pairwise"):
        check_flags(_args([*base, "--judge-mode", "rank"]), judged)
    (tmp_path / "t.txt").write_text("{prompt} {response_a} {response_b}")
    with pytest.raises(SimsError, match=r"--oracle-template is .*t\.txt here but judge_pairwise"):
        check_flags(_args([*base, "--oracle-template", str(tmp_path / "t.txt")]), judged)


def test_contrast_prompts_from_the_command_line(tmp_path, tiny_model_dir, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the good day\na cat is happy\nI love the sun\nwe walk home\nthe cold rain\na dog\n")
    contrast = tmp_path / "benign.txt"
    contrast.write_text("how do I bake bread\nname a colour\n")
    out = tmp_path / "run"
    argv = ["run", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--oracle", "length:3"]
    argv += ["--layers", "1-2", *TINY_RUN]
    contrast_flags = ["--contrast-prompts", str(contrast), "--contrast-budget", "0.2"]
    assert main([*argv, "--out", str(out), *contrast_flags]) == 0
    saved = [json.loads(x)["prompt"] for x in (out / "contrast_prompts.jsonl").read_text().splitlines()]
    assert saved == ["how do I bake bread", "name a colour"]
    spec = RunDir(out).spec()
    assert spec.prompts["contrast_prompts"] == str(contrast.resolve())
    assert spec.sims.guard.contrast_budget == 0.2
    assert "contrast_score" in json.loads((out / "calibration_base.json").read_text())
    capsys.readouterr()
    # A resume may not change them; without the guard there is nothing to measure them.
    assert main(["run", "--resume", str(out), "--contrast-budget", "0.5", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--contrast-budget is 0.5 here but 0.2" in err[0], err
    other = tmp_path / "other.txt"
    other.write_text("x\n")
    assert main(["run", "--resume", str(out), "--contrast-prompts", str(other), "--quiet"]) == 2
    assert "--contrast-prompts is" in capsys.readouterr().err
    off = [*argv, "--out", str(tmp_path / "off"), *contrast_flags, "--fluency-budget", "off"]
    assert main(off) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fluency guard" in err[0], err
    assert not (tmp_path / "off").exists()
    # The random-split baseline mirrors the run, contrast prompts included.
    rnd = tmp_path / "random"
    assert main(["baseline", "random", "--like", str(out), "-o", str(rnd), "--quiet"]) == 0
    assert (rnd / "contrast_prompts.jsonl").read_text() == (out / "contrast_prompts.jsonl").read_text()
    assert RunDir(rnd).spec().prompts["contrast_prompts"] == str(contrast.resolve())
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert "2 contrast prompts, budget +0.2" in capsys.readouterr().out
