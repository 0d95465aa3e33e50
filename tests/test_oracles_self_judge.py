"""The likelihood self-judges on the embedded SmolLM2-135M-Instruct: the verdict
probability against a direct computation, position-swap symmetry, batch invariance, and
the judges behind `sims judge-check` and `sims eval`. Slow (embedded model), run in CI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from simsteer.cli.main import main
from simsteer.oracles import get_oracle
from simsteer.oracles.self_judge import LikelihoodJudge, SelfJudgePairwiseOracle
from simsteer.tokens import encode_prompt

pytestmark = pytest.mark.slow

PROMPT = "Name a primary colour."
ANSWERS = ["Red is a primary colour.", "Table table table.", "Blue.", "I like trains."]


def test_pointwise_matches_a_direct_computation(embedded_lm):
    oracle = get_oracle("self-judge", lm=embedded_lm)
    scores = oracle.score([PROMPT] * len(ANSWERS), ANSWERS)
    judge = LikelihoodJudge(embedded_lm)
    yes, no = judge.verdict_ids("Yes"), judge.verdict_ids("No")
    tok = embedded_lm.tokenizer
    for answer, score in zip(ANSWERS, scores, strict=True):
        question = oracle.template.render(prompt=PROMPT, response=answer)
        ids = torch.tensor([encode_prompt(tok, question)])
        with torch.inference_mode():
            logits = embedded_lm.model(input_ids=ids).logits[0, -1].double()
        probs = torch.softmax(logits, -1)
        expected = probs[yes].sum() / (probs[yes].sum() + probs[no].sum())
        assert score == pytest.approx(float(expected), abs=1e-4)
    # One at a time (no padding) equals the left-padded batch.
    single = [oracle.score([PROMPT], [a])[0] for a in ANSWERS]
    np.testing.assert_allclose(single, scores, atol=1e-4)
    assert scores[0] > scores[1]  # a sensible answer beats word salad


def test_pairwise_is_swap_symmetric_and_deterministic(embedded_lm):
    oracle = get_oracle("self-judge-pairwise", lm=embedded_lm)
    (first,) = oracle.judge([PROMPT], [ANSWERS])
    p = first.preference
    np.testing.assert_allclose(p + p.T, np.ones_like(p), atol=1e-12)
    np.testing.assert_allclose(np.diag(p), 0.5)
    (again,) = oracle.judge([PROMPT], [ANSWERS])
    np.testing.assert_array_equal(again.preference, p)
    order = [2, 0, 3, 1]  # reordering the answers permutes the matrix, nothing else
    (moved,) = oracle.judge([PROMPT], [[ANSWERS[i] for i in order]])
    np.testing.assert_allclose(moved.preference, p[np.ix_(order, order)], atol=1e-4)


def test_judge_check_and_eval_with_self_judges(tmp_path, embedded_lm, capsys):
    pairs = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": PROMPT, "chosen": ANSWERS[0], "rejected": ANSWERS[1]},
        {"prompt": "Say hello.", "chosen": "Hello!", "rejected": "Goodbye forever."},
        {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "Seven hundred."},
    ]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for oracle in ("self-judge", "self-judge-pairwise"):
        capsys.readouterr()
        assert main(["judge-check", "--oracle", oracle, "--pairs", str(pairs)]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["n"] == 3 and result["judge"] == oracle and result["judge_calls"] > 0
        assert 0.0 <= result["accuracy"] <= 1.0
        if oracle == "self-judge":
            assert result["position_bias_rate"] == 0.0  # a score per answer: positions unseen
        else:
            # The oracle averages both orders itself; the bias reported is that of its raw
            # single-order verdicts: the share of pairs whose verdict follows the slot.
            judged = SelfJudgePairwiseOracle(embedded_lm).judge(
                [r["prompt"] for r in rows], [[r["chosen"], r["rejected"]] for r in rows]
            )
            flips = [
                (j.info["shown_first"][0][1] > 0.5) != (1 - j.info["shown_first"][1][0] > 0.5) for j in judged
            ]
            assert result["position_bias_rate"] == pytest.approx(sum(flips) / len(flips))

    out = tmp_path / "run"
    args = ["run", "--oracle", "self-judge", "-T", "1", "-N", "2", "-K", "2", "--eval-prompts", "2"]
    assert main([*args, "--max-new-tokens", "8", "--fluency-budget", "off", "--quiet", "-o", str(out)]) == 0
    assert main(["eval", str(out), "--scorers", "length:4"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert "self-judge" in result["win_rates_vs_base"]
