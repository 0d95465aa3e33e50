"""The loop's per-step timing (:class:`simsteer.loop.stopwatch.Stopwatch`), on a scripted clock."""

from __future__ import annotations

import pytest

from simsteer.loop.stopwatch import Stopwatch


def test_stopwatch_records_each_steps_seconds_and_nothing_for_a_failed_step():
    ticks = iter([1.0, 3.5, 10.0, 10.25, 20.0])
    watch = Stopwatch(clock=lambda: next(ticks))
    with watch("eval"):
        pass
    with watch("fit"):
        pass
    with pytest.raises(RuntimeError), watch("calibrate"):
        raise RuntimeError("boom")
    assert watch.seconds == {"eval": 2.5, "fit": 0.25}
