"""The DPO baseline: the run's own pairs, a LoRA adapter trained with TRL, the missing-extra
error, and ``sims baseline dpo`` -> ``sims eval`` -> ``sims compare`` end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from simsteer.cli.main import main
from simsteer.errors import SimsError
from simsteer.evaluation.dpo import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    DPOBaselineConfig,
    fit_dpo,
    load_dpo_model,
    require_baselines_extra,
)
from simsteer.evaluation.dpo_pairs import DPOPair, encode_dpo_pair, end_token_id, run_pairs
from simsteer.io import new_file_mode
from simsteer.loop.rundir import RunDir
from simsteer.models import LoadedModel, load_model

from .conftest import TINY_RUN

PROMPTS = ["the good day", "a cat is happy", "I love the sun", "we walk home", "the cold rain", "a big dog"]


@pytest.fixture()
def prompt_file(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def _run(tmp_path: Path, model: Path, prompts: Path, *extra: str) -> Path:
    out = tmp_path / ("run" + "".join(extra).replace("-", ""))
    # K=4 answers per prompt: the length oracle ranks them, so most prompts get D+ and D-.
    argv = ["run", "--model", str(model), "--dtype", "fp32", "--prompts", str(prompts)]
    argv += ["--oracle", "length:3", "--layers", "1-2", "--fluency-budget", "off", "--out", str(out)]
    assert main([*argv, *TINY_RUN, "-K", "4", "--max-new-tokens", "6", *extra]) == 0
    return out


@pytest.fixture()
def tiny_run(tmp_path, tiny_model_dir, prompt_file) -> Path:
    return _run(tmp_path, tiny_model_dir, prompt_file)


def _logps(lm: LoadedModel, pairs: list[DPOPair]) -> torch.Tensor:
    """log p(answer | prompt) of every pair's chosen and rejected answer as DPO scores them
    (one right-padded forward); shape (pairs, 2)."""
    eos = end_token_id(lm.tokenizer, lm.model)
    rows = [encode_dpo_pair(lm.tokenizer, pair, eos) for pair in pairs]
    seqs = [(r["prompt_ids"], r[side]) for r in rows for side in ("chosen_ids", "rejected_ids")]
    width = max(len(p) + len(a) for p, a in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, (p, a) in enumerate(seqs):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        mask[i, : len(p) + len(a)] = 1
    with torch.no_grad():
        logp = lm.model(input_ids=ids, attention_mask=mask).logits[:, :-1].log_softmax(-1)
    token = logp.gather(-1, ids[:, 1:, None])[..., 0]
    out = torch.stack([token[i, len(p) - 1 : len(p) + len(a) - 1].sum() for i, (p, a) in enumerate(seqs)])
    return out.view(len(pairs), 2)


def _margins(policy: LoadedModel, reference: LoadedModel, pairs: list[DPOPair]) -> list[float]:
    """DPO's implicit reward margin: the policy's log-ratio chosen / rejected minus the reference's."""
    pol, ref = _logps(policy, pairs), _logps(reference, pairs)
    return ((pol[:, 0] - pol[:, 1]) - (ref[:, 0] - ref[:, 1])).tolist()


# -- the pairs -------------------------------------------------------------------------


def test_run_pairs_are_every_positive_with_every_negative_of_a_prompt(tiny_run):
    run = RunDir(tiny_run)
    expected = []
    t = 0
    while run.iteration(t).is_dir():
        rows = run.read_samples(t) if run.samples(t).is_file() else []
        for pid in dict.fromkeys(r.prompt_id for r in rows):
            group = [r for r in rows if r.prompt_id == pid]
            expected += [
                (t, pid, p.response, n.response)
                for p in group
                if p.label == "positive"
                for n in group
                if n.label == "negative" and n.response != p.response
            ]
        t += 1
    pairs = run_pairs(tiny_run)
    assert len(expected) >= 2, "the tiny run should label some pairs"
    assert [(p.iteration, p.prompt_id, p.chosen, p.rejected) for p in pairs] == expected
    assert run_pairs(tiny_run) == pairs  # deterministic
    # A cap keeps an evenly spaced subset, in order, starting with the first pair.
    capped = run_pairs(tiny_run, max_pairs=2)
    assert len(capped) == 2 and capped[0] == pairs[0] and capped[1] in pairs[1:]
    with pytest.raises(SimsError, match="max-pairs"):
        run_pairs(tiny_run, max_pairs=0)


def test_run_pairs_of_a_cs_run_are_its_train_pairs(tmp_path, tiny_model_dir, prompt_file):
    run_dir = _run(tmp_path, tiny_model_dir, prompt_file, "--variant", "cs")
    run = RunDir(run_dir)
    bank = [row for t in range(3) for row in (run.read_pairs(t) or [])]
    assert bank, "a cs run writes train_pairs.jsonl"
    expected = list(
        dict.fromkeys(
            (pos.iteration, pos.prompt_id, pos.response, neg.response)
            for pos, neg in zip(bank[::2], bank[1::2], strict=True)
            if pos.response != neg.response
        )
    )
    assert [(p.iteration, p.prompt_id, p.chosen, p.rejected) for p in run_pairs(run_dir)] == expected


def test_encode_pair_uses_the_chat_template_and_eos_only_when_finished(tiny_lm):
    tok = tiny_lm.tokenizer
    eos = end_token_id(tok, tiny_lm.model)
    row = encode_dpo_pair(tok, DPOPair(0, "p", "a cat", "good day", "bad day", True, False), eos)
    assert tok.decode(row["prompt_ids"]).startswith("<|user|>")
    assert row["chosen_ids"][-1] == eos and eos not in row["rejected_ids"]
    assert tok.decode(row["rejected_ids"]) == "bad day"


# -- training ----------------------------------------------------------------------------


def test_dpo_raises_the_preferred_log_ratio(tmp_path, tiny_model_dir):
    pairs = [
        DPOPair(0, str(i), p, "a good happy day", "a bad sad night", True, True)
        for i, p in enumerate(PROMPTS)
    ]
    reference = load_model(str(tiny_model_dir), device="cpu", dtype="fp32")
    before = {n: p.clone() for n, p in reference.model.named_parameters()}
    config = DPOBaselineConfig(learning_rate=5e-3, epochs=3, batch_size=2, lora_r=4)
    result = fit_dpo(
        load_model(str(tiny_model_dir), device="cpu", dtype="fp32"), pairs, tmp_path / "adapter", config
    )
    assert result.num_pairs == len(pairs) and result.tokens_forward == 2 * result.tokens_trained > 0
    # Only peft's two files: safetensors weights + JSON settings (no pickle, no model card).
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    assert result.adapter_bytes == sum(p.stat().st_size for p in (tmp_path / "adapter").iterdir())
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "adapter").iterdir()} == {new_file_mode()}
    policy = load_dpo_model(tmp_path / "adapter", reference)
    assert all(torch.equal(p, before[n]) for n, p in reference.model.named_parameters())  # base untouched
    margins = _margins(policy, reference, pairs)
    assert min(margins) > 0, margins


def test_missing_extra_is_one_line_naming_it(monkeypatch, tiny_run, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` raises ImportError
    with pytest.raises(SimsError, match=r"pip install 'simsteer\[baselines\]'"):
        require_baselines_extra()
    capsys.readouterr()
    assert main(["baseline", "dpo", "--like", str(tiny_run), "-o", str(tmp_path / "dpo")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "simsteer[baselines]" in err[0]
    assert not (tmp_path / "dpo").exists()


def test_bad_settings_are_refused():
    with pytest.raises(SimsError, match="beta"):
        DPOBaselineConfig(beta=0)
    with pytest.raises(SimsError, match="lora_r"):
        DPOBaselineConfig(lora_r=0)


# -- end to end ----------------------------------------------------------------------------


def test_cli_baseline_dpo_eval_and_compare(tmp_path, tiny_run, capsys):
    out = tmp_path / "dpo"
    argv = ["baseline", "dpo", "--like", str(tiny_run), "-o", str(out), "--quiet"]
    assert main([*argv, "--dpo-lr", "1e-3", "--lora-r", "4", "--lora-targets", "q_proj,v_proj"]) == 0
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == [
        f"adapter/{ADAPTER_CONFIG}",
        f"adapter/{ADAPTER_WEIGHTS}",
        "config.json",
        "dpo_pairs.jsonl",
        "eval_prompts.jsonl",
    ]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["baseline"] == "dpo" and cfg["num_pairs"] == len(run_pairs(tiny_run))
    assert cfg["dpo"]["lora_r"] == 4 and cfg["dpo"]["target_modules"] == ["q_proj", "v_proj"]
    assert cfg["tokens_trained"] > 0 and cfg["adapter_bytes"] > 0
    assert len((out / "dpo_pairs.jsonl").read_text().splitlines()) == cfg["num_pairs"]
    # A second build into the same folder is refused before training.
    assert main(argv) == 2
    for run in (tiny_run, out):
        assert main(["eval", str(run), "--bootstrap", "20"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["kind"] == "dpo" and result["steered"]
    assert result["training_costs"]["tokens_forward"] == 2 * cfg["tokens_trained"]
    assert result["training_costs"]["saved_bytes"] == cfg["adapter_bytes"]
    sims = json.loads((tiny_run / "eval.json").read_text())
    assert sims["training_costs"]["saved_bytes"] > 0  # the steering folder
    capsys.readouterr()
    assert main(["compare", str(tiny_run), str(out), "-o", str(tmp_path / "cmp")]) == 0
    table = capsys.readouterr().out
    assert "| train tokens | saved |" in table and "| dpo | dpo |" in table


@pytest.mark.slow
def test_dpo_on_the_embedded_model(tmp_path):
    """A handful of pairs on SmolLM2-135M: trains, saves, merges, and prefers the chosen side.
    The adapter sits on the last two layers only, so one step's backward pass is short."""
    pairs = [
        DPOPair(0, str(i), p, "What a wonderful, happy idea!", "This is awful and sad.", True, True)
        for i, p in enumerate(["Describe a park.", "Talk about rain."])
    ]
    config = DPOBaselineConfig(learning_rate=1e-3, batch_size=2, lora_r=4, lora_layers="-2,-1")
    result = fit_dpo(load_model(device="cpu", dtype="fp32"), pairs, tmp_path / "adapter", config)
    assert result.num_pairs == 2 and 0 < result.adapter_bytes < 1_000_000
    reference = load_model(device="cpu", dtype="fp32")
    policy = load_dpo_model(tmp_path / "adapter", reference)
    assert min(_margins(policy, reference, pairs)) > 0
