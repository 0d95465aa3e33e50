import numpy as np

from simsteer.stats import bootstrap_ci, seeds_and_prompts_ci


def test_bootstrap_interval_covers_known_mean():
    rng = np.random.default_rng(1)
    values = rng.normal(0.3, 1.0, size=400)
    low, high = bootstrap_ci(values)
    assert low < 0.3 < high
    assert high - low < 4 * 1.0 / np.sqrt(400) * 1.2  # about +-1.96 standard errors
    assert bootstrap_ci(np.zeros(10)) == (0.0, 0.0)
    assert all(np.isnan(bootstrap_ci(np.array([]))))


def test_seed_and_prompt_interval_widens_with_seed_variation():
    rng = np.random.default_rng(2)
    prompts = rng.normal(0.0, 1.0, size=(1, 200))
    same = np.repeat(prompts, 3, axis=0) + 0.3  # three seeds that agree
    shifted = same + np.array([[-0.5], [0.0], [0.5]])  # three seeds that do not
    low, high = seeds_and_prompts_ci(same)
    assert low < 0.3 < high
    assert (low, high) == seeds_and_prompts_ci(same)  # seeded
    wide_low, wide_high = seeds_and_prompts_ci(shifted)
    assert wide_high - wide_low > 1.5 * (high - low)  # the seeds' spread counts
    # One seed: the prompts alone, as bootstrap_ci gives them.
    one = seeds_and_prompts_ci(prompts)
    assert abs((one[1] - one[0]) - np.subtract(*bootstrap_ci(prompts[0]))[()] * -1) < 0.05
    assert all(np.isnan(seeds_and_prompts_ci(np.empty((0, 0)))))


def test_outcome_warns_when_the_steering_degrades_the_model():
    from simsteer.loop.outcome import OutcomeRecord, format_outcome

    held = {"base_score": 0.2, "final_score": 0.9, "improvement": 0.7, "ci95": [0.5, 0.9], "prompts": 16}
    fine = {"final_policy": 2, "stopped": None, "held_out": held, "fluency": {
        "perplexity_ratio": 1.08, "repetition_delta": 0.0, "loop_share_delta": 0.0}}  # fmt: skip
    assert "warning" not in format_outcome(OutcomeRecord.from_json(fine))
    broken = {**fine, "fluency": {**fine["fluency"], "perplexity_ratio": 806.0}}
    text = format_outcome(OutcomeRecord.from_json(broken))
    assert text.splitlines()[-1].startswith("warning: the final policy's answers have x806.00")
