"""Studies of runs: evaluation, comparison, sweeps, baselines, judge checks, reports.

The instruments the loop uses too (fluency metrics, bootstrap statistics) live below the
loop, in :mod:`simsteer.fluency` and :mod:`simsteer.stats`."""
