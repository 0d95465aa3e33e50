"""`sims baseline`, `sims eval`, `sims compare` and `sims sweep` on a tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from simsteer.cli.main import main
from simsteer.evaluation.report import compare_bars, compare_rows, compare_table
from simsteer.evaluation.run_eval import EvalConfig, EvalResult, evaluate_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

TINY = [
    "-T",
    "1",
    "-N",
    "2",
    "-K",
    "2",
    "--eval-prompts",
    "3",
    "--max-new-tokens",
    "4",
    "--fluency-budget",
    "off",
    "--quiet",
]


@pytest.fixture()
def prompt_file(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text(
        "\n".join(
            [
                "the good day",
                "a cat is happy",
                "I love the sun",
                "we walk home",
                "the cold rain",
                "a big dog",
                "the sad night",
                "they run fast",
            ]
        )
        + "\n"
    )
    return path


@pytest.fixture()
def tiny_run(tmp_path, tiny_model_dir, prompt_file) -> Path:
    out = tmp_path / "sims"
    assert (
        main(
            [
                "run",
                "--model",
                str(tiny_model_dir),
                "--dtype",
                "fp32",
                "--prompts",
                str(prompt_file),
                *TINY,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


def _png(path: Path) -> None:
    assert path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def test_baselines_eval_report_and_compare(tmp_path, tiny_run, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"prompt": p, "chosen": "a good happy day", "rejected": "a bad sad night"}) + "\n"
            for p in ["the day", "the cat", "the sun"]
        )
    )
    out = {k: tmp_path / k for k in ("vanilla", "ms", "random", "bon")}
    assert main(["baseline", "vanilla", "--like", str(tiny_run), "-o", str(out["vanilla"])]) == 0
    assert main(["baseline", "ms", "--like", str(tiny_run), "-o", str(out["ms"]), "--pairs", str(pairs)]) == 0
    assert main(["baseline", "random", "--like", str(tiny_run), "-o", str(out["random"]), "--quiet"]) == 0
    assert main(["baseline", "best-of-n", "--like", str(tiny_run), "-o", str(out["bon"]), "--n", "3"]) == 0
    # the random split drew the same prompts as SIMS
    assert (out["random"] / "iter_0" / "samples.jsonl").is_file()
    sims_prompts = [
        json.loads(x)["prompt_id"] for x in (tiny_run / "iter_0/samples.jsonl").read_text().splitlines()
    ]
    rnd_prompts = [
        json.loads(x)["prompt_id"] for x in (out["random"] / "iter_0/samples.jsonl").read_text().splitlines()
    ]
    assert sims_prompts == rnd_prompts
    for run in [tiny_run, *out.values()]:
        assert main(["eval", str(run), "--judge", "readability", "--bootstrap", "50"]) == 0
        result = json.loads((run / "eval.json").read_text())
        assert set(result["win_rates_vs_base"]) == {"sentiment", "readability"}
        assert set(result["scores"]) == {"sentiment", "negativity", "readability", "length:50"}
        assert result["costs"]["total"]["generated_tokens"] > 0
        assert result["costs"]["judge_sentiment"]["judge_calls"] == 6
        assert (run / "report.md").read_text().startswith("# Evaluation of")
        _png(run / "eval_metrics.png")
    _png(tiny_run / "eval_curves.png")
    vanilla = json.loads((out["vanilla"] / "eval.json").read_text())
    assert vanilla["answers"]["base"] == vanilla["answers"]["policy"]  # no steering: a tie everywhere
    assert vanilla["win_rates_vs_base"]["sentiment"]["win_rate"]["value"] == 0.5
    ms = json.loads((out["ms"] / "eval.json").read_text())
    assert ms["kind"] == "ms" and ms["steered"]
    # MS is fitted once, outside the loop: its cost comes from what the baseline recorded.
    assert ms["training_costs"]["tokens_forward"] > 0
    assert ms["training_costs"]["tokens_generated"] == 0
    capsys.readouterr()
    assert main(["compare", str(tiny_run), *map(str, out.values()), "-o", str(tmp_path / "cmp")]) == 0
    table = capsys.readouterr().out
    assert "| sims | sims |" in table and "best-of-n" in table
    _png(tmp_path / "cmp" / "compare.png")


def test_eval_api_on_a_run_with_other_prompts(tmp_path, tiny_run, tiny_lm):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"instruction": "a good cat"}\n{"prompt": "the rain"}\n')
    record = evaluate_run(
        tiny_run, EvalConfig(prompts=str(prompts), scorers=("sentiment",), bootstrap_rounds=20), lm=tiny_lm
    )
    result = json.loads(json.dumps(record.to_json()))  # what eval.json holds
    assert EvalResult.from_json(result).to_json() == result  # read back as written
    assert result["num_prompts"] == 2 and len(result["samples"]) == 2
    assert result["history"] and result["training_costs"]["tokens_generated"] > 0
    # Per-prompt values, for pooling seeds (evaluation/pooled.py), agree with the summaries.
    per = result["per_prompt"]
    assert np.mean(per["scores"]["sentiment"]["policy"]) == pytest.approx(
        result["scores"]["sentiment"]["policy"]["mean"]
    )
    ppl = [x for x in per["perplexity"]["base"] if x is not None]
    assert len(per["perplexity"]["policy"]) == 2 and ppl
    assert np.exp(np.mean(np.log(ppl))) == pytest.approx(result["fluency"]["base"]["perplexity"], rel=1e-3)


def test_sweep_runs_points_and_resumes(tmp_path, tiny_model_dir, prompt_file, capsys):
    out = tmp_path / "sweep"
    args = [
        "sweep",
        "-o",
        str(out),
        "--grid",
        "K=2,3",
        "--",
        "--model",
        str(tiny_model_dir),
        "--dtype",
        "fp32",
        "--prompts",
        str(prompt_file),
        *TINY,
    ]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in results] == ["ran", "ran"] and [r["K"] for r in results] == ["2", "3"]
    cfg = json.loads((out / "K=3" / "config.json").read_text())
    assert cfg["sims"]["samples_per_prompt"] == 3
    # Interrupt point K=3 after its first iteration; K=2 stays finished.
    done = (out / "K=2" / "summary.json").stat().st_mtime_ns
    (out / "K=3" / "summary.json").unlink()
    for p in (out / "K=3" / "iter_1").iterdir():
        if p.is_file():
            p.unlink()
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in results] == ["done", "resumed"]
    assert (out / "K=2" / "summary.json").stat().st_mtime_ns == done
    # Other settings in the same folder are refused.
    capsys.readouterr()
    assert main(["sweep", "-o", str(out), "--grid", "K=4", "--", *args[5:]]) == 2
    assert "other settings" in capsys.readouterr().err


def test_eval_mc_caches_the_unsteered_scores(tmp_path, tiny_run, tiny_lm, eval_data, monkeypatch):
    monkeypatch.setenv("SIMSTEER_CACHE", str(tmp_path / "cache"))
    config = EvalConfig(
        scorers=("sentiment",),
        bootstrap_rounds=10,
        mc_tasks=("arc_easy", "truthfulqa_mc2"),
        mc_limit=3,
        data=str(eval_data),
    )
    first = evaluate_run(tiny_run, config, lm=tiny_lm).mc
    second = evaluate_run(tiny_run, config, lm=tiny_lm).mc
    for task in ("arc_easy", "truthfulqa_mc2"):
        assert second[task]["base"].pop("cached") is True
        assert second[task]["base"] == first[task]["base"]
        for side in (first, second):
            side[task]["policy"].pop("seconds")
        assert second[task]["policy"] == first[task]["policy"]
        assert "delta_acc" in second[task]["policy"]
    assert "mc2" in first["truthfulqa_mc2"]["policy"]


def test_eval_of_a_judge_trained_run_uses_its_judge_and_template(tmp_path, tiny_model_dir, prompt_file):
    """`sims eval` rebuilds the run's oracle from its saved spec: the judge's endpoint and
    the run's --oracle-template (the old code rebuilt it from its name, "judge", and failed)."""
    from .test_oracles_llm_judge import FakeJudge

    template = tmp_path / "judge.txt"
    template.write_text("MARKER {prompt}\n[Answer A]\n{response_a}\n\n[Answer B]\n{response_b}\n\nVerdict?")
    cache = tmp_path / "judgments.sqlite"
    out = tmp_path / "judged"
    with FakeJudge(answer=lambda m: "[[A]]" if len(m.split("[Answer B]")[0]) % 2 else "[[B]]") as fake:
        argv = ["run", "--model", str(tiny_model_dir), "--dtype", "fp32", "--prompts", str(prompt_file)]
        argv += ["--oracle", f"judge:fake@{fake.url}", "--oracle-template", str(template)]
        assert main([*argv, "--judge-cache", str(cache), *TINY, "--out", str(out)]) == 0
        trained = len(fake.requests)
        assert trained and all(m.startswith("MARKER") for m in fake.requests)
        cache.unlink()  # every judgment of the evaluation is asked anew
        # The run's judge is used with its URL typed again (the consent names the endpoint).
        argv = ["eval", str(out), "--scorers", "length:50", "--bootstrap", "20"]
        assert main([*argv, "--judge-base-url", fake.url]) == 0
        asked = fake.requests[trained:]
    # 3 held-out prompts in both orders; an order is asked once when the two answers are equal.
    assert 3 <= len(asked) <= 3 * 2 and len(set(asked)) == len(asked)
    assert all(m.startswith("MARKER") for m in asked)
    result = json.loads((out / "eval.json").read_text())
    assert result["oracle"] == "judge" and set(result["win_rates_vs_base"]) == {"judge"}


def test_eval_limit_quiet_and_its_key_figures(tmp_path, tiny_run, capsys):
    """`sims eval --limit N` answers the first N held-out prompts and prints the key figures;
    the stage lines go to stderr unless --quiet; `sims compare` plots the win rate in percent,
    as its table shows it."""
    capsys.readouterr()
    assert main(["eval", str(tiny_run), "--limit", "2", "--bootstrap", "20"]) == 0
    out, err = capsys.readouterr()
    assert json.loads((tiny_run / "eval.json").read_text())["num_prompts"] == 2
    lines = out.splitlines()
    assert lines[0].startswith("2 held-out prompts")
    assert any(line.startswith("sentiment score: ") and "95% CI" in line for line in lines)
    assert any(line.startswith("perplexity ") and "repetition" in line for line in lines)
    assert any(line.startswith("win rate vs base (sentiment): ") for line in lines)
    assert lines[-1].startswith("report written to")
    assert "sims eval: answering 2 held-out prompts" in err
    assert main(["eval", str(tiny_run), "--limit", "2", "--bootstrap", "20", "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert main(["eval", str(tiny_run), "--limit", "0"]) == 2
    assert "--limit" in capsys.readouterr().err
    # `sims compare` of it: the plot's win rate is the table's percentage
    rows = compare_rows([json.loads((tiny_run / "eval.json").read_text())])
    title, heights, errors = compare_bars(rows)[1]
    assert title == "win rate vs base (%)"
    assert heights == [pytest.approx(100 * rows[0]["win_rate"])]
    low, high = rows[0]["win_ci"]
    assert errors == [
        [pytest.approx(100 * (rows[0]["win_rate"] - low))],
        [pytest.approx(100 * (high - rows[0]["win_rate"]))],
    ]
    assert f"{100 * rows[0]['win_rate']:.1f} [" in compare_table(rows)
    assert "win rate vs base, % [95% CI]" in compare_table(rows)
