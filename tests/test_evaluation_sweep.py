"""``run_sweep``'s command lines, with a runner that records them instead of running."""

from __future__ import annotations

import pytest

from simsteer.errors import SimsError
from simsteer.evaluation.sweep import run_sweep


def test_worker_flags_go_to_every_point_and_are_not_a_setting(tmp_path):
    calls: list[list[str]] = []

    def runner(argv: list[str]) -> int:
        calls.append(argv)
        return 1  # stop at the first point: only its command line matters here

    with pytest.raises(SimsError, match="failed"):
        run_sweep(tmp_path / "s", {"K": ["2", "3"]}, ["-T", "1"], runner, ["--workers", "2"])
    assert calls == [
        [
            "run",
            "-T",
            "1",
            "--samples-per-prompt",
            "2",
            "--workers",
            "2",
            "--out",
            str(tmp_path / "s" / "K=2"),
        ]
    ]
    # The same sweep with another worker count (or none) is the same sweep.
    with pytest.raises(SimsError, match="failed"):
        run_sweep(tmp_path / "s", {"K": ["2", "3"]}, ["-T", "1"], runner)
    assert calls[-1][-2:] == ["--out", str(tmp_path / "s" / "K=2")] and "--workers" not in calls[-1]


@pytest.mark.parametrize("flag", [["--workers", "2"], ["--workers=2"], ["--ray-address", "auto"]])
def test_worker_flags_after_the_separator_are_refused(tmp_path, flag):
    with pytest.raises(SimsError, match="to sims sweep itself"):
        run_sweep(tmp_path / "s", {"K": ["2"]}, ["-T", "1", *flag], lambda argv: 0)
    assert not (tmp_path / "s").exists()
