import numpy as np
import pytest

from simsteer.errors import SimsError
from simsteer.evaluation.pooled import pooled_row, pooled_table


def _eval(seed: int, shift: float, prompts: int = 60, run: str = "r") -> dict:
    rng = np.random.default_rng(seed)
    base = rng.normal(0.0, 0.3, prompts)
    policy = base + shift + rng.normal(0.0, 0.1, prompts)
    ppl_base = rng.uniform(3.0, 6.0, prompts)
    return {
        "run": f"{run}{seed}",
        "oracle": "sentiment",
        "answers": {"prompts": [f"p{i}" for i in range(prompts)]},
        "per_prompt": {
            "scores": {
                "sentiment": {"base": base.tolist(), "policy": policy.tolist()},
                "readability": {"base": base.tolist(), "policy": base.tolist()},
            },
            "perplexity": {"base": ppl_base.tolist(), "policy": [*(ppl_base * 1.1).tolist()[:-1], None]},
        },
        "training_costs": {"tokens_generated": 100 * (seed + 1), "tokens_forward": 10, "seconds": 2.0},
        "costs": {"generate_policy": {"generated_tokens": 4 * 48 * prompts, "judge_calls": 4 * prompts}},
    }


def test_a_real_shift_is_significant_and_no_shift_is_not():
    up = pooled_row([_eval(s, 0.2) for s in range(3)])
    assert up["seeds"] == 3 and up["prompts"] == 60
    assert 0.15 < up["delta"]["mean"] < 0.25 and up["delta"]["ci_low"] > 0
    assert up["attribute_delta"] == {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    # The answer without tokens (None) is left out, not counted as 0 or infinity.
    assert up["perplexity_ratio"]["mean"] == pytest.approx(1.1)
    assert up["tokens_generated"] == 200.0
    assert up["answer_tokens"] == 192.0 and up["answer_oracle_calls"] == 4.0  # best-of-4 at 48 tokens
    flat = pooled_row([_eval(s, 0.0) for s in range(3)])
    assert flat["delta"]["ci_low"] < 0 < flat["delta"]["ci_high"]
    table = pooled_table({"sims": up, "vanilla": flat})
    sims_line = next(line for line in table.splitlines() if line.startswith("| sims "))
    vanilla_line = next(line for line in table.splitlines() if line.startswith("| vanilla "))
    assert sims_line.count("*") == 1 and "*" not in vanilla_line
    assert "3 seeds x 60 held-out prompts" in table
    assert sims_line.endswith("| 192.0 | 4.0 |")


def test_seeds_must_share_their_prompts_and_carry_per_prompt_values():
    other = _eval(1, 0.2, prompts=59)
    with pytest.raises(SimsError, match="other held-out prompts"):
        pooled_row([_eval(0, 0.2), other])
    old = _eval(0, 0.2)
    del old["per_prompt"]
    with pytest.raises(SimsError, match="no per-prompt values"):
        pooled_row([old])
