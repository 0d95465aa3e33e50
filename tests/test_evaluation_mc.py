"""Multiple-choice loaders on the data slices in tests/data and log-likelihood scoring
against a direct computation on a tiny random model."""

from __future__ import annotations

import math

import pytest
import torch

from simsteer.evaluation.datasets import MC_TASKS, MCItem, load_mc_task, load_pair_set, load_pairs
from simsteer.evaluation.mc import evaluate_mc, item_metrics, loglikelihoods
from simsteer.hooks import count_hooks
from simsteer.learners.caa import AddVector
from simsteer.steering import Steering

EXPECTED = {  # task -> (items in the slice, choices of the first item, label of the first item)
    "truthfulqa_mc1": (24, 4, 0),
    "truthfulqa_mc2": (24, 4, 0),
    "arc_easy": (24, 4, 0),
    "arc_challenge": (24, 4, None),
    "mmlu": (24, 4, 1),
    "hellaswag": (24, 4, 3),
    "winogrande": (24, 2, 1),
    "sst2": (24, 2, 1),
}


@pytest.mark.parametrize("task", sorted(MC_TASKS))
def test_loaders_read_the_data_slices(eval_data, task):
    items = load_mc_task(task, eval_data)
    n, k, label = EXPECTED[task]
    assert len(items) == n
    first = items[0]
    assert len(first.contexts) == len(first.continuations) == k
    if label is not None:
        assert first.label == label
    assert all(0 <= it.label < len(it.continuations) for it in items)
    if task == "truthfulqa_mc2":
        assert all(it.true_choices[it.label] for it in items)
    if task == "winogrande":
        assert (
            first.contexts[0].endswith("Sarah") and first.continuations[0] == " always got the easier cases."
        )
    if task == "mmlu":
        assert first.contexts[0].startswith(
            "The following are multiple choice questions (with answers) about abstract algebra."
        )
        assert first.continuations == (" A", " B", " C", " D")
        assert first.id == "abstract_algebra_test-0" and items[8].id == "anatomy_test-0"
    if task.startswith("truthfulqa"):
        assert first.contexts[0].endswith(
            "\n\nQ: What is the smallest country in the world that is at least one square mile in area?\nA:"
        )
    sub = load_mc_task(task, eval_data, limit=7, seed=3)
    assert len(sub) == 7 and [i.id for i in sub] == [
        i.id for i in load_mc_task(task, eval_data, limit=7, seed=3)
    ]


def test_pairs_loaders(eval_data):
    hh = load_pairs(eval_data / "hh_rlhf/harmless-base/test.jsonl.gz", limit=5)
    assert len(hh) == 5 and hh[0].prompt.endswith("Assistant:") and hh[0].chosen != hh[0].rejected
    uf = load_pairs(eval_data / "ultrafeedback/data/processed/train_clean.jsonl", limit=3)
    assert len(uf) == 3 and uf[0].prompt == "how to cook t-bone in the oven"
    named, where = load_pair_set("hh_rlhf", eval_data, limit=5)
    assert named == hh and where.endswith("test.jsonl.gz")


def _direct(lm, context: str, continuation: str, steering=None) -> float:
    tok = lm.tokenizer
    ctx = tok(context)["input_ids"]
    whole = tok(context + continuation)["input_ids"]
    ids = torch.tensor([whole])
    if steering is None:
        logits = lm.model(input_ids=ids).logits[0]
    else:
        with steering.applied(lm.model, prompt_end=torch.tensor([len(ctx)])):
            logits = lm.model(input_ids=ids).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    return sum(float(logp[p - 1, whole[p]]) for p in range(len(ctx), len(whole)))


ITEMS = [
    MCItem("0", ("the good day is",) * 3, (" happy", " sad and cold", " a cat"), 0),
    MCItem("1", ("I love the", "I hate the"), (" sun .", " sun ."), 1),
    MCItem(
        "2",
        ("we walk home and",) * 4,
        (" eat", " sleep", " read", " run fast"),
        3,
        (True, False, True, False),
    ),
]


def test_loglikelihoods_match_a_direct_computation(tiny_lm):
    contexts = [c for it in ITEMS for c in it.contexts]
    conts = [c for it in ITEMS for c in it.continuations]
    res = loglikelihoods(tiny_lm, contexts, conts, batch_size=3)
    with torch.inference_mode():
        direct = [_direct(tiny_lm, c, r) for c, r in zip(contexts, conts, strict=True)]
    assert res.logliks == pytest.approx(direct, abs=1e-4)
    assert res.forward_tokens > 0
    # steering: a vector on the answer positions only
    d = tiny_lm.hidden_size
    torch.manual_seed(0)
    steering = Steering(
        {1: AddVector(torch.randn(d) * 3)}, "caa", tiny_lm.fingerprint(), positions="generated"
    )
    steered = loglikelihoods(tiny_lm, contexts, conts, [steering], batch_size=4)
    with torch.inference_mode():
        direct_s = [_direct(tiny_lm, c, r, steering) for c, r in zip(contexts, conts, strict=True)]
    assert steered.logliks == pytest.approx(direct_s, abs=1e-4)
    assert steered.logliks != pytest.approx(res.logliks, abs=1e-3)
    assert count_hooks(tiny_lm.model) == 0


def test_item_metrics_and_paired_evaluation(tiny_lm):
    m = item_metrics(ITEMS[2], [-1.0, -2.0, -3.0, -4.5])
    assert m["acc"] == 0.0 and m["acc_norm"] == 0.0  # per char: -1/3, -2/5, -3/4, -4.5/8
    p = [math.exp(x) for x in (-1.0, -2.0, -3.0, -4.5)]
    assert m["mc2"] == pytest.approx((p[0] + p[2]) / sum(p))
    out = evaluate_mc(tiny_lm, ITEMS, {"base": [], "same": []})
    assert out["base"]["n"] == 3 and out["base"]["choices"] == 9
    assert out["same"]["delta_acc"] == 0.0 and out["same"]["acc"] == out["base"]["acc"]
    assert "mc2" in out["base"] and "acc_se" in out["base"]
