"""The fluency guard: calibration on a planted trade-off, early stopping, compose vs
replace, resume in the middle of a calibration."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from simsteer.errors import SimsError
from simsteer.generation.sampling import SamplingConfig
from simsteer.hooks import count_hooks
from simsteer.learners import get_learner
from simsteer.learners.caa import AddVector
from simsteer.loop.calibration import FluencyGuard, GuardConfig, calibrate, early_stop, measure
from simsteer.loop.config import SIMSConfig
from simsteer.loop.records import CalibrationRecord, IterationRecord, Measurement
from simsteer.loop.sims import SIMS
from simsteer.oracles import get_oracle
from simsteer.oracles.attributes import AttributeOracle
from simsteer.policy import load_policy
from simsteer.prompts import Prompt
from simsteer.steering import CONFIG_NAME, Steering

from .test_loop_sims import PROMPTS

SAMPLING = SamplingConfig(max_new_tokens=8, batch_size=8)
CAL_PROMPTS = [Prompt(str(i), p) for i, p in enumerate(PROMPTS[:6])]


def _push_toward(lm, word: str) -> Steering:
    """Steering that adds the unembedding direction of ``word`` to the last layer: the
    stronger, the more the model says ``word`` (and the less fluent it is)."""
    token = lm.tokenizer.convert_tokens_to_ids(word)
    direction = lm.model.get_output_embeddings().weight[token].detach().float()
    direction = direction / direction.norm()
    last = lm.num_layers - 1
    return Steering({last: AddVector(direction)}, "caa", lm.fingerprint())


def _share_of(word: str) -> AttributeOracle:
    return AttributeOracle(word, lambda text: text.split().count(word) / max(len(text.split()), 1))


def test_planted_trade_off_is_real(tiny_lm):
    steering, oracle = _push_toward(tiny_lm, "cat"), _share_of("cat")
    points = []
    for strength in (0.0, 0.05, 0.2):
        policy = [steering.with_strength(strength)] if strength else []
        points.append(measure(tiny_lm, oracle, CAL_PROMPTS, policy, SAMPLING))
    assert points[0].score < points[1].score < points[2].score
    assert points[0].perplexity < points[2].perplexity
    assert points[0].repetition < points[2].repetition


@pytest.mark.parametrize("budget, margin", [(1e9, 1.0), (0.1, 0.2), (0.0, 0.0)])
def test_calibration_picks_best_fluent_strength(tiny_lm, tmp_path, budget, margin):
    oracle = _share_of("cat")
    base = measure(tiny_lm, oracle, CAL_PROMPTS, [], SAMPLING)
    config = GuardConfig(
        fluency_budget=budget, repetition_margin=margin, strength_grid=(4, 1, 2), stop_at_unfluent=False
    )
    candidate = _push_toward(tiny_lm, "cat").with_strength(0.05)
    saved: list = []
    record = FluencyGuard(tiny_lm, oracle, config, SAMPLING).calibrate(
        CAL_PROMPTS, [], candidate, base, on_point=saved.append
    )
    points, chosen = list(record.points), record.chosen_point
    assert [p.multiplier for p in points] == [1, 2, 4]
    assert [p.strength for p in points] == pytest.approx([0.05, 0.1, 0.2])
    assert candidate.strength == 0.05  # the candidate itself is left as it was
    fluent = [
        p
        for p in points
        if p.perplexity <= (1 + budget) * base.perplexity and p.repetition <= base.repetition + margin
    ]
    assert [p.fluent for p in points] == [p in fluent for p in points]
    if budget == 1e9:
        assert chosen.multiplier == 4  # no budget: the strongest push scores best
    elif budget == 0.0:
        assert chosen is None  # nothing steered is as fluent as the base model here
    else:
        # +10% perplexity allows the weakest push only, although stronger ones score more.
        assert chosen is not None and chosen.multiplier == 1
        assert chosen.score == max(p.score for p in fluent) < max(p.score for p in points)
    # Points are handed over as they finish (the loop saves them), so a resumed
    # calibration skips them.
    assert saved == [points[:1], points[:2], points]
    # The default scan (ascending, stops at the first strength that breaks the budget)
    # scores a prefix of the grid and, on this monotone trade-off, picks the same one.
    scan = GuardConfig(fluency_budget=budget, repetition_margin=margin, strength_grid=(4, 1, 2))
    scan_record = FluencyGuard(tiny_lm, oracle, scan, SAMPLING).calibrate(CAL_PROMPTS, [], candidate, base)
    scanned, chosen_scan = list(scan_record.points), scan_record.chosen_point
    first_unfluent = next((i for i, p in enumerate(points) if not p.fluent), len(points) - 1)
    assert scanned == points[: first_unfluent + 1]
    assert chosen_scan == chosen


@pytest.mark.parametrize(
    "scores, patience, stop",
    [
        ([0.1, 0.3, 0.2], 1, True),
        ([0.1, 0.3, 0.4], 1, False),
        ([0.1, 0.3, 0.2, 0.25], 2, True),
        ([0.1, 0.3, 0.2, 0.35], 2, False),
        ([0.1, 0.3, 0.3], 1, True),
        ([0.5, 0.1], 0, False),
        ([0.1], 1, False),
    ],
)
def test_early_stopping_on_scripted_scores(scores, patience, stop):
    assert early_stop(scores, patience) is stop


def test_guard_settings_are_validated():
    for kwargs in (
        {"fluency_budget": -1},
        {"strength_grid": ()},
        {"strength_grid": (0.5, 0)},
        {"patience": -1},
        {"calibration_prompts": 0},
    ):
        with pytest.raises(SimsError):
            GuardConfig(**kwargs)


def _guarded_config(**guard) -> SIMSConfig:
    return SIMSConfig(
        iterations=2,
        prompts_per_iteration=3,
        samples_per_prompt=3,
        eval_prompts=2,
        sampling=SAMPLING,
        seed=1,
        guard=GuardConfig(calibration_prompts=2, strength_grid=(0.5, 1.0), stop_at_unfluent=False, **guard),
    )


def test_guarded_run_artefacts_and_best_policy(tiny_lm, tmp_path):
    learner = get_learner("caa", layers="1-2", coefficient=0.5)
    result = SIMS(
        tiny_lm, get_oracle("length:4"), learner, _guarded_config(fluency_budget=5.0), progress=False
    ).fit(PROMPTS, tmp_path / "r")
    root = result.run_dir
    assert (root / "calibration_base.json").is_file()
    assert (root / "iter_0" / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = [json.loads(x) for x in (root / "iter_0" / "calibration.jsonl").read_text().splitlines()]
    assert [p["multiplier"] for p in points] == [0.5, 1.0]
    row = result.history[0]
    chosen = row.calibration.chosen
    if chosen is not None:
        saved = Steering.load(root / "iter_1" / "steering")
        fitted = Steering.load(root / "iter_0" / "fitted")
        assert saved.strength == pytest.approx(fitted.strength * chosen)
    # The final policy is the best fluent one, and it says which iteration it is.
    policy = load_policy(root / "final")
    final_iteration = policy[-1].metadata["policy_iteration"] if policy else 0  # empty: unsteered
    scores = [row.calibration.base.score] + [
        r.calibration.score if r.calibration.score is not None else -1e9
        for r in result.history
        if r.calibration is not None
    ]
    assert final_iteration == scores.index(max(scores))
    if result.history[-1].stop:
        assert len(result.history) <= 3
    outcome = json.loads((root / "outcome.json").read_text())
    assert outcome["final_policy"] == final_iteration
    held = outcome["held_out"]
    lo, hi = held["ci95"]
    assert lo <= held["improvement"] <= hi and held["prompts"] == 2
    assert held["improvement"] == pytest.approx(held["final_score"] - held["base_score"])


def test_guard_stops_when_nothing_is_fluent(tiny_lm, tmp_path):
    learner = get_learner("caa", layers="all", coefficient=50.0)  # absurdly strong
    result = SIMS(
        tiny_lm,
        get_oracle("length:4"),
        learner,
        _guarded_config(fluency_budget=0.0, repetition_margin=0.0),
        progress=False,
    ).fit(PROMPTS, tmp_path / "r")
    assert len(result.history) == 1
    assert "no strength" in result.history[0].stop
    assert not (result.run_dir / "iter_1" / "steering").exists()
    final = load_policy(result.run_dir / "final")
    assert not final and final.is_unsteered  # the unsteered marker loads as an empty policy
    marker = json.loads((result.run_dir / "final" / CONFIG_NAME).read_text())
    assert marker["metadata"]["policy_iteration"] == 0 and not marker["layers"]


@pytest.mark.parametrize("compose", [False, True])
def test_compose_and_replace_hook_stacks(tiny_lm, tmp_path, compose):
    config = SIMSConfig(
        iterations=2,
        prompts_per_iteration=3,
        samples_per_prompt=3,
        eval_prompts=0,
        sampling=SAMPLING,
        compose=compose,
        guard=GuardConfig(fluency_budget=None),
    )
    sims = SIMS(tiny_lm, get_oracle("length:4"), get_learner("caa", layers="1-2"), config, progress=False)
    result = sims.fit(PROMPTS, tmp_path / "r")
    from simsteer.loop.rundir import RunDir

    stack = sims._policy(RunDir(result.run_dir), 2)
    assert len(stack) == (2 if compose else 1)
    before = count_hooks(tiny_lm.model)
    with stack[0].applied(tiny_lm.model):
        if compose:
            with stack[1].applied(tiny_lm.model):
                assert count_hooks(tiny_lm.model) == before + 2 * 3  # 2 layers + tracker, twice
        else:
            assert count_hooks(tiny_lm.model) == before + 3
    assert count_hooks(tiny_lm.model) == before
    final = load_policy(result.run_dir / "final")
    assert len(final) == len(stack)
    for a, b in zip(final, stack, strict=True):
        assert all(torch.equal(a.functions[i].vector, b.functions[i].vector) for i in a.layers)


KILL_MID_CALIBRATION = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    import simsteer.loop.calibration as guard
    from simsteer.models import load_model
    from tests.test_loop_calibration import _run_guarded

    calls = []
    original = guard.measure

    def measure(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # base, first grid point... then die inside the second
            os._exit(9)
        return original(*args, **kwargs)

    guard.measure = measure
    _run_guarded(load_model({model!r}, device="cpu", dtype="fp32"), {out!r})
""")


def _run_guarded(lm, out):
    learner = get_learner("caa", layers="1-2", coefficient=0.5)
    return SIMS(lm, get_oracle("length:4"), learner, _guarded_config(fluency_budget=5.0), progress=False).fit(
        PROMPTS, Path(out)
    )


def test_resume_mid_calibration(tiny_lm, tiny_model_dir, tmp_path):
    from .test_loop_sims import _artefacts

    reference = _run_guarded(tiny_lm, tmp_path / "reference").run_dir
    killed = tmp_path / "killed"
    script = KILL_MID_CALIBRATION.format(
        tests=str(Path(__file__).parents[1]), model=str(tiny_model_dir), out=str(killed)
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-2000:]
    partial = [json.loads(x) for x in (killed / "iter_0" / "calibration.jsonl").read_text().splitlines()]
    assert len(partial) == 1  # one grid point was finished and saved before the kill
    _run_guarded(tiny_lm, killed)
    ref, got = _artefacts(reference), _artefacts(killed)
    assert got == ref


# -- calibration as a pure step: a planted measure, no model, no run directory --------
BASE = Measurement(score=0.0, perplexity=10.0, repetition=0.1, loop_share=0.0, distinct_2=1.0)


def _planted(calls: list):
    """Score and perplexity rise with the strength: +20% perplexity per unit."""

    def measure_at(m: float, strength: float) -> Measurement:
        calls.append(m)
        return Measurement(strength, 10.0 * (1 + 0.2 * strength), 0.1, 0.0, 1.0)

    return measure_at


def test_calibrate_keeps_best_fluent_strength_without_a_model():
    config = GuardConfig(fluency_budget=0.5, strength_grid=(4, 1, 2, 3), stop_at_unfluent=False)
    calls, seen = [], []
    record = calibrate(1.0, BASE, config, _planted(calls), on_point=seen.append)
    assert calls == [1, 2, 3, 4]  # ascending
    assert [p.fluent for p in record.points] == [True, True, False, False]  # ppl x1.2, x1.4, x1.6
    assert record.chosen == 2 and record.score == 2.0 and record.chosen_point.strength == 2.0
    assert record.base == BASE and [len(s) for s in seen] == [1, 2, 3, 4]
    # The default scan stops at the first strength over budget.
    calls = []
    scan = calibrate(1.0, BASE, dataclasses.replace(config, stop_at_unfluent=True), _planted(calls))
    assert calls == [1, 2, 3] and scan.chosen == 2 and scan.points == record.points[:3]
    # A resumed calibration measures only what is missing.
    calls = []
    again = calibrate(1.0, BASE, config, _planted(calls), done=record.points[:2])
    assert calls == [3, 4] and again == record
    # Nothing fluent: no strength chosen, and the guard says why it stops.
    none = calibrate(10.0, BASE, config, _planted([]))
    assert none.chosen is None and none.score is None and none.chosen_point is None
    guard = FluencyGuard(None, None, config, SAMPLING)  # type: ignore[arg-type]
    assert "no strength" in guard.stop_reason(none, [])


def test_stop_reason_and_final_policy_from_records():
    config = GuardConfig(fluency_budget=0.5, patience=1, strength_grid=(1.0,))
    guard = FluencyGuard(None, None, config, SAMPLING)  # type: ignore[arg-type]

    def cal(score: float) -> CalibrationRecord:
        return CalibrationRecord(BASE, (), 1.0, score)

    assert guard.stop_reason(cal(0.5), []) is None
    assert "did not beat" in guard.stop_reason(cal(0.4), [cal(0.5)])
    rows = [IterationRecord(t, "p", 1.0, calibration=cal(s)) for t, s in enumerate((0.5, 0.4))]
    assert guard.final_index(rows) == 1  # policy 1 (calibrated in row 0) scored best
    plain = FluencyGuard(None, None, GuardConfig(fluency_budget=None), SAMPLING)  # type: ignore[arg-type]
    assert plain.final_index([*rows, IterationRecord(2, "p", 1.0)]) == 2


# -- contrast prompts: the steered behaviour must not spread to them ----------------------


def _planted_contrast(calls: list):
    """Fluent everywhere; the contrast prompts' score rises 0.1 per unit of strength."""

    def measure_at(m: float, strength: float) -> Measurement:
        calls.append(m)
        return Measurement(strength, 10.0, 0.1, 0.0, 1.0, contrast_score=0.1 * strength)

    return measure_at


def test_contrast_budget_limits_the_strength_without_a_model():
    base = dataclasses.replace(BASE, contrast_score=0.0)
    config = GuardConfig(fluency_budget=0.5, strength_grid=(1, 2, 3, 4), contrast_budget=0.25)
    calls: list = []
    record = calibrate(1.0, base, config, _planted_contrast(calls))
    # x1 and x2 raise the contrast score by 0.1 and 0.2: kept; x3 (+0.3) breaks the budget
    # and ends the ascending scan.
    assert calls == [1, 2, 3] and [p.fluent for p in record.points] == [True, True, False]
    assert record.chosen == 2 and record.chosen_point.contrast_score == pytest.approx(0.2)
    # A larger budget lets the strongest, best-scoring strength through.
    loose = calibrate(1.0, base, dataclasses.replace(config, contrast_budget=1.0), _planted_contrast([]))
    assert loose.chosen == 4
    # Without a contrast measurement (a run without contrast prompts) nothing is limited.
    plain = calibrate(1.0, BASE, config, _planted_contrast([]))
    assert plain.chosen == 4
    guard = FluencyGuard(None, None, dataclasses.replace(config, contrast_budget=0.0), SAMPLING)  # type: ignore[arg-type]
    none = calibrate(1.0, base, guard.config, _planted_contrast([]))
    assert none.chosen is None and "contrast prompts' score within +0" in guard.stop_reason(none, [])
    # The contrast score is written only when measured, and read back from either row.
    point = record.points[0]
    assert point.to_json()["contrast_score"] == pytest.approx(0.1)
    assert "contrast_score" not in plain.points[0].to_json() or plain.points[0].contrast_score is not None
    old_row = {k: v for k, v in point.to_json().items() if k != "contrast_score"}
    assert type(point).from_json(old_row).contrast_score is None
    assert "contrast_score" not in BASE.to_json()
    assert Measurement.from_json(base.to_json()) == base
    with pytest.raises(SimsError):
        GuardConfig(contrast_budget=-0.1)


def test_measure_scores_contrast_prompts_apart(tiny_lm):
    steering, oracle = _push_toward(tiny_lm, "cat"), _share_of("cat")
    contrast = [Prompt(f"c{i}", p) for i, p in enumerate(PROMPTS[6:10])]
    policy = [steering.with_strength(0.2)]
    both = measure(tiny_lm, oracle, CAL_PROMPTS, policy, SAMPLING, contrast=contrast)
    alone = measure(tiny_lm, oracle, CAL_PROMPTS, policy, SAMPLING)
    on_contrast = measure(tiny_lm, oracle, contrast, policy, SAMPLING)
    assert alone.contrast_score is None
    assert dataclasses.replace(both, contrast_score=None) == alone  # fluency: calibration prompts only
    assert both.contrast_score == pytest.approx(on_contrast.score)


def test_contrast_budget_picks_a_weaker_strength_on_a_model(tiny_lm):
    """The push toward "cat" also raises "cat" on the contrast prompts: a tight contrast
    budget keeps a weaker strength than the fluency budget alone."""
    oracle = _share_of("cat")
    contrast = [Prompt(f"c{i}", p) for i, p in enumerate(PROMPTS[6:12])]
    config = GuardConfig(
        fluency_budget=1e9, repetition_margin=1.0, strength_grid=(1, 2, 4), stop_at_unfluent=False
    )
    guard = FluencyGuard(tiny_lm, oracle, config, SAMPLING)
    candidate = _push_toward(tiny_lm, "cat").with_strength(0.05)
    free = guard.calibrate(CAL_PROMPTS, [], candidate, guard.measure_base(CAL_PROMPTS))
    base = guard.measure_base(CAL_PROMPTS, contrast=contrast)
    rises = None
    for budget in (1e9, 0.0):
        limited = FluencyGuard(tiny_lm, oracle, dataclasses.replace(config, contrast_budget=budget), SAMPLING)
        record = limited.calibrate(CAL_PROMPTS, [], candidate, base, contrast=contrast)
        rises = [p.contrast_score - base.contrast_score for p in record.points]
        assert [p.fluent for p in record.points] == [r <= budget + 1e-12 for r in rises]
        if budget == 1e9:
            assert record.chosen == free.chosen == 4
    assert rises[-1] > 0  # the planted spill-over is real
    assert record.chosen is None or record.chosen < 4


def test_run_with_contrast_prompts_saves_and_resumes_them(tiny_lm, tmp_path):
    learner = get_learner("caa", layers="1-2", coefficient=0.5)
    contrast = PROMPTS[:3]
    config = _guarded_config(fluency_budget=5.0, contrast_budget=0.5)
    result = SIMS(tiny_lm, get_oracle("length:4"), learner, config, progress=False).fit(
        PROMPTS[3:], tmp_path / "r", contrast_prompts=contrast
    )
    root = result.run_dir
    saved = [json.loads(x)["prompt"] for x in (root / "contrast_prompts.jsonl").read_text().splitlines()]
    assert saved == contrast
    base = json.loads((root / "calibration_base.json").read_text())
    assert isinstance(base["contrast_score"], float)
    for row in result.history:
        if row.calibration is not None:
            for p in row.calibration.points:
                within = p.contrast_score <= base["contrast_score"] + 0.5 + 1e-12
                fluent = p.perplexity <= 6 * base["perplexity"] and p.repetition <= base["repetition"] + 0.03
                assert p.fluent == (within and fluent)
    # A finished run re-read (resume) keeps its contrast prompts.
    again = SIMS(tiny_lm, get_oracle("length:4"), learner, config, progress=False).fit([], root)
    assert [r.to_json() for r in again.history] == [r.to_json() for r in result.history]
    unguarded = SIMS(tiny_lm, get_oracle("length:4"), learner, _guarded_config(fluency_budget=None))
    with pytest.raises(SimsError, match="fluency guard"):
        unguarded.fit(PROMPTS, tmp_path / "r2", contrast_prompts=contrast)
