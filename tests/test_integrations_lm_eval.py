"""The lm-evaluation-harness adapter: the harness's own task format scores a steered model
the way ``sims eval`` does (same per-choice log-likelihoods, same accuracy)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

import lm_eval
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model, model_registry
from lm_eval.tasks import TaskManager

from simsteer.errors import SimsError
from simsteer.evaluation.datasets import load_mc_task
from simsteer.evaluation.mc import evaluate_mc, item_metrics, loglikelihoods
from simsteer.functions import AddVector
from simsteer.integrations import lm_eval as adapter
from simsteer.policy import Policy
from simsteer.steering import Steering

ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = ROOT / "tests" / "data" / "lm_eval_task"
TASK = "simsteer_arc_easy_sample"
CAA = ROOT / "tests" / "fixtures" / "smollm2_caa"


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory):
    # Local data only; the task's data_files path is relative to the repository root.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf-datasets"))
    monkeypatch.chdir(ROOT)


@pytest.fixture(scope="module")
def tasks() -> TaskManager:
    return TaskManager(include_path=str(TASK_DIR))


@pytest.fixture()
def sims_items(tmp_path):
    """The same items as ``sims eval`` reads them (its ARC loader on a data folder)."""
    (tmp_path / "arc").mkdir()
    shutil.copy(TASK_DIR / "arc_easy_sample.jsonl", tmp_path / "arc" / "arc_easy_test_normalized.jsonl")
    return load_mc_task("arc_easy", tmp_path)


@pytest.fixture()
def tiny_steering(tiny_lm, tmp_path) -> Path:
    gen = torch.Generator().manual_seed(0)
    fns = {i: AddVector(torch.randn(tiny_lm.hidden_size, generator=gen) * 2.0) for i in (1, 2)}
    return Steering(fns, "caa", tiny_lm.fingerprint()).save(tmp_path / "steering")


def harness(tasks, model_args: dict, limit: int | None = None) -> tuple[dict, list[list[float]]]:
    """Run the local task through ``simple_evaluate``; its metrics and per-item choice
    log-likelihoods."""
    out = lm_eval.simple_evaluate(
        model=adapter.MODEL_NAME,
        model_args=model_args,
        tasks=[TASK],
        task_manager=tasks,
        log_samples=True,
        device="cpu",
        batch_size=8,
        limit=limit,
    )
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    return out["results"][TASK], [[ll for ll, _ in s["filtered_resps"]] for s in samples]


def sims_logliks(lm, items, policy) -> list[list[float]]:
    contexts = [c for it in items for c in it.contexts]
    conts = [c for it in items for c in it.continuations]
    values = loglikelihoods(lm, contexts, conts, policy, batch_size=8).logliks
    return [values[4 * i : 4 * i + 4] for i in range(len(items))]  # every item has 4 choices


def flat(rows: list[list[float]]) -> list[float]:
    return [x for row in rows for x in row]


def largest_change(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for u, v in zip(a, b, strict=True) for x, y in zip(u, v, strict=True))


def test_registered_next_to_the_harness_models():
    assert adapter.MODEL_NAME in model_registry
    assert get_model("simsteer") is adapter.SimsteerLM
    assert get_model("hf").__name__ == "HFLM"  # the harness's own models stay reachable
    adapter.register()  # idempotent


def test_tiny_model_agrees_with_sims_eval(tasks, tiny_model_dir, tiny_lm, tiny_steering, sims_items):
    args = {"pretrained": str(tiny_model_dir), "dtype": "fp32"}
    base_metrics, base = harness(tasks, args)
    steered_metrics, steered = harness(tasks, {**args, "steering": str(tiny_steering)})
    policy = Policy.load(tiny_steering)
    assert len(base) == len(sims_items) == 20
    assert flat(base) == pytest.approx(flat(sims_logliks(tiny_lm, sims_items, [])), abs=1e-5)
    assert flat(steered) == pytest.approx(flat(sims_logliks(tiny_lm, sims_items, policy)), abs=1e-5)
    # The steering changes what is scored (so the comparisons above can fail).
    assert largest_change(base, steered) > 0.1
    ours = evaluate_mc(tiny_lm, sims_items, {"base": [], "steered": policy}, batch_size=8)
    for name, metrics in (("base", base_metrics), ("steered", steered_metrics)):
        assert metrics["acc,none"] == pytest.approx(ours[name]["acc"])
        assert metrics["acc_norm,none"] == pytest.approx(ours[name]["acc_norm"])


def test_strength_scales_the_saved_steering(tiny_lm, tiny_steering):
    double = adapter.SimsteerLM(lm=tiny_lm, steering=str(tiny_steering), strength=2.0)
    assert [s.strength for s in double.policy] == [2.0]
    assert adapter.SimsteerLM(lm=tiny_lm).policy.is_unsteered


def test_run_directory_means_its_final_policy(tmp_path, tiny_steering):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    shutil.copytree(tiny_steering, run / "final")
    assert adapter.load_steering(run).steerings[0].layers == [1, 2]
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.json").write_text("{}")
    with pytest.raises(SimsError, match="no final policy"):
        adapter.load_steering(tmp_path / "unfinished")


def test_bad_model_args_fail_in_one_line(tiny_lm, tmp_path):
    with pytest.raises(SimsError) as missing:
        adapter.SimsteerLM(lm=tiny_lm, steering=str(tmp_path / "nope"))
    assert "steering not found" in str(missing.value) and "\n" not in str(missing.value)
    with pytest.raises(SimsError, match="unknown simsteer model_args: steerng"):
        adapter.SimsteerLM(lm=tiny_lm, steerng="x")
    with pytest.raises(SimsError, match="batch_size"):
        adapter.SimsteerLM(lm=tiny_lm, batch_size="many")


def test_command_line_reports_a_missing_steering(tmp_path, capsys):
    args = ["--model", "simsteer", "--model_args", f"steering={tmp_path / 'nope'}", "--tasks", TASK]
    rc = adapter.main([*args, "--include_path", str(TASK_DIR), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1] == f"lm-eval: error: steering not found: {tmp_path / 'nope'} " + (
        "(give a run directory or a steering folder)"
    )


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def _generate(model: adapter.SimsteerLM, context: str, until: list[str]) -> str:
    return model.generate_until(
        _requests("generate_until", [(context, {"until": until, "max_gen_toks": 6})])
    )[0]


def test_generate_until_is_greedy_decoding_cut_at_the_stop(tiny_lm, tiny_steering):
    context = "the cat is"
    ids = torch.tensor([tiny_lm.tokenizer(context)["input_ids"]])
    expected = tiny_lm.model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False
    )
    full = tiny_lm.tokenizer.decode(expected[0, ids.shape[1] :], skip_special_tokens=True)
    model = adapter.SimsteerLM(lm=tiny_lm)
    assert _generate(model, context, []) == full
    stop = full.split()[2]
    [short] = model.generate_until(
        _requests("generate_until", [(context, {"until": [stop], "max_gen_toks": 6})])
    )
    assert short == full[: full.index(stop)]
    steered = adapter.SimsteerLM(lm=tiny_lm, steering=str(tiny_steering), strength=4.0)
    [other] = steered.generate_until(
        _requests("generate_until", [(context, {"until": [], "max_gen_toks": 6})])
    )
    assert other != full


def _windowed_logprob(lm, seq: list[int], size: int) -> float:
    """log P(seq[1:] | seq[0]) with the harness's rolling windows: the predicted tokens in
    disjoint blocks of ``size``, each block's forward seeing the ``size`` tokens before
    its last prediction (the first block: from the prefix token on)."""
    total = 0.0
    with torch.no_grad():
        for a in range(1, len(seq), size):
            b = min(a + size, len(seq))
            start = max(0, b - 1 - size)
            logits = lm.model(torch.tensor([seq[start : b - 1]])).logits[0].float()
            logp = torch.log_softmax(logits[a - 1 - start :], dim=-1)
            total += float(logp.gather(1, torch.tensor(seq[a:b]).view(-1, 1)).sum())
    return total


def test_rolling_loglikelihood_is_the_whole_text(tiny_lm):
    text = "the cat is happy and the dog is sad and the sun is hot"
    seq = [tiny_lm.tokenizer.eos_token_id, *tiny_lm.tokenizer(text, add_special_tokens=False)["input_ids"]]
    request = _requests("loglikelihood_rolling", [(text,)])
    [whole] = adapter.SimsteerLM(lm=tiny_lm).loglikelihood_rolling(request)
    assert whole == pytest.approx(_windowed_logprob(tiny_lm, seq, len(seq)), abs=1e-4)
    [windowed] = adapter.SimsteerLM(lm=tiny_lm, max_length=5).loglikelihood_rolling(request)
    assert windowed == pytest.approx(_windowed_logprob(tiny_lm, seq, 5), abs=1e-4)
    assert abs(windowed - whole) > 1e-3  # the windows matter (so the check can fail)


@pytest.mark.slow
def test_embedded_model_with_caa_agrees_with_sims_eval(tasks, embedded_lm, sims_items):
    items = sims_items[:3]
    policy = Policy.load(CAA)
    _, base = harness(tasks, {"lm": embedded_lm}, limit=3)
    # The default model_args path: pretrained = the embedded model, loaded by the adapter.
    metrics, steered = harness(tasks, {"dtype": "fp32", "steering": str(CAA)}, limit=3)
    ours = sims_logliks(embedded_lm, items, policy)
    assert flat(steered) == pytest.approx(flat(ours), abs=1e-4)
    assert largest_change(base, steered) > 0.05
    acc = sum(item_metrics(it, ll)["acc"] for it, ll in zip(items, ours, strict=True)) / len(items)
    assert metrics["acc,none"] == pytest.approx(acc)


def test_load_model_is_not_called_for_a_bad_steering(monkeypatch, tmp_path):
    # The steering path is checked before any model is loaded (seconds, not minutes).
    monkeypatch.setattr(adapter, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(SimsError, match="steering not found"):
        adapter.SimsteerLM(steering=str(tmp_path / "nope"))
