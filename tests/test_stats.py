import numpy as np

from simsteer.evaluation.stats import bootstrap_ci


def test_bootstrap_interval_covers_known_mean():
    rng = np.random.default_rng(1)
    values = rng.normal(0.3, 1.0, size=400)
    low, high = bootstrap_ci(values)
    assert low < 0.3 < high
    assert high - low < 4 * 1.0 / np.sqrt(400) * 1.2  # about +-1.96 standard errors
    assert bootstrap_ci(np.zeros(10)) == (0.0, 0.0)
    assert all(np.isnan(bootstrap_ci(np.array([]))))
