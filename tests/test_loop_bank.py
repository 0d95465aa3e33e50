"""SIMS-CS's response bank and the variants' selection: contrast reward, top-N, capacity,
persistence across ``resume``; the pr variant's top/bottom pairs and skipped prompts."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from simsteer.generation.sampling import SamplingConfig
from simsteer.io import commit_hook, write_jsonl
from simsteer.learners import get_learner
from simsteer.loop.bank import BankConfig, BankEntry, ResponseBank, contrast_reward
from simsteer.loop.calibration import GuardConfig
from simsteer.loop.config import SIMSConfig
from simsteer.loop.prompt_sets import draw_prompts
from simsteer.loop.rundir import RunDir
from simsteer.loop.sims import SIMS
from simsteer.oracles.base import Judgment, Oracle

# Hand-computed: win rates [0.75, 0.2, 0.55], loss rates [0.25, 0.8, 0.45].
P = [[0.5, 0.9, 0.6], [0.1, 0.5, 0.3], [0.4, 0.7, 0.5]]


def _entry(t, pid, pref, reward=None):
    return BankEntry(
        t,
        pid,
        f"prompt {pid}",
        ["r0", "r1", "r2"],
        pref,
        contrast_reward(np.array(pref)) if reward is None else reward,
    )


def test_contrast_reward_by_hand():
    assert contrast_reward(np.array(P)) == pytest.approx(0.75 - 0.8)
    strong = [[0.5, 1.0, 1.0], [0.0, 0.5, 0.5], [0.0, 0.5, 0.5]]  # wins 1, .25, .25
    assert contrast_reward(np.array(strong)) == pytest.approx(1.0 - 0.75)
    tie = np.full((3, 3), 0.5)
    assert contrast_reward(tie) == 0.0


def test_top_n_best_and_worst():
    strong = [[0.5, 1.0, 1.0], [0.0, 0.5, 0.5], [0.0, 0.5, 0.5]]
    bank = ResponseBank().add(
        [_entry(0, "a", P), _entry(0, "b", strong), _entry(1, "c", np.full((3, 3), 0.5).tolist())]
    )
    top = bank.top(5)
    assert [e.prompt_id for e in top] == ["b", "a"]  # the all-tie entry has no contrast
    assert (top[1].best, top[1].worst) == (0, 1)
    assert bank.top(1)[0].prompt_id == "b"


def test_persistence_replace_and_capacity(tmp_path):
    run = RunDir(tmp_path)

    def save(bank: ResponseBank) -> ResponseBank:
        write_jsonl(run.bank, bank.to_json())  # what the loop does after every change
        return bank

    bank = save(ResponseBank(config=BankConfig(capacity=2)).add([_entry(0, "a", P)]))
    bank = save(bank.add([_entry(0, "a", P, reward=0.3)]))  # the same step redone replaces its entry
    assert len(run.read_bank()) == 1 and run.read_bank().entries[0].reward == 0.3
    bank = save(bank.add([_entry(1, "b", P), _entry(2, "c", P)]))
    assert [e.prompt_id for e in run.read_bank().entries] == ["b", "c"]  # oldest evicted


class FirstWordOracle(Oracle):
    """Planted preference: more 'good' tokens win; prompts containing 'sad' are unjudgeable."""

    name = "planted"

    def __init__(self):
        self.calls = 0

    def judge(self, prompts, responses):
        self.calls += 1
        out = []
        for p, rs in zip(prompts, responses, strict=True):
            s = np.array([r.split().count("good") + 0.01 * len(r) for r in rs], dtype=float)
            pref = 1.0 / (1.0 + np.exp(-(s[:, None] - s[None, :])))
            if "sad" in p:
                out.append(Judgment(np.full((len(rs), len(rs)), 0.5), parsed=False))
            else:
                out.append(Judgment(pref, scores=s))
        return out


PROMPTS = [
    f"the {w} day is very {v}"
    for w in ("good", "bad", "cold", "warm", "long", "short")
    for v in ("happy", "sad")
]
BASE = SIMSConfig(
    iterations=2,
    prompts_per_iteration=4,
    samples_per_prompt=3,
    eval_prompts=2,
    sampling=SamplingConfig(max_new_tokens=6, batch_size=6),
    seed=1,
    guard=GuardConfig(fluency_budget=None),
)


def _sims(lm, config, callback=None):
    learner = get_learner("caa", layers="1-2", coefficient=0.5)
    return SIMS(lm, FirstWordOracle(), learner, config, progress=False, callback=callback)


def _read(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pr_variant_labels_top_and_bottom(tiny_lm, tmp_path):
    result = _sims(tiny_lm, dataclasses.replace(BASE, variant="pr")).fit(PROMPTS, tmp_path / "run")
    rows = _read(result.run_dir / "iter_0" / "samples.jsonl")
    for pid in {r["prompt_id"] for r in rows}:
        labels = sorted(r["label"] for r in rows if r["prompt_id"] == pid)
        assert labels in (["negative", "positive", "unused"], ["skipped"] * 3, ["unused"] * 3)
    judged = {r["prompt_id"]: r["judged"] for r in rows}
    parse_rate = result.history[0].judging.ranking_parse_rate
    assert parse_rate == pytest.approx(sum(judged.values()) / len(judged))
    assert 0 < parse_rate < 1  # the 'sad' prompts are skipped and counted


def test_cs_bank_survives_resume(tiny_lm, tmp_path):
    config = dataclasses.replace(BASE, variant="cs", bank=BankConfig(top=3))
    out = tmp_path / "run"

    class Stop(Exception):
        pass

    def crash(step, t):
        if step == "sample" and t == 1:
            raise Stop

    with pytest.raises(Stop):
        _sims(tiny_lm, config, callback=crash).fit(PROMPTS, out)
    bank = _read(out / "bank.jsonl")
    assert {e["iteration"] for e in bank} == {0, 1}
    result = _sims(tiny_lm, config).fit(PROMPTS, out)
    bank = _read(out / "bank.jsonl")
    keys = [(e["iteration"], e["prompt_id"]) for e in bank]
    assert len(keys) == len(set(keys))  # nothing added twice by the resume
    assert {e["iteration"] for e in bank} == {0, 1, 2}
    for e in bank:
        assert e["reward"] == pytest.approx(contrast_reward(np.array(e["preference"])), abs=1e-5)
    pairs = _read(out / "iter_1" / "train_pairs.jsonl")
    rewards = sorted((e["reward"] for e in bank if e["iteration"] <= 1), reverse=True)
    assert [p["reward"] for p in pairs[::2]] == pytest.approx(rewards[:3])  # top-3 by r, old ones too
    assert [p["label"] for p in pairs] == ["positive", "negative"] * 3
    assert result.history[1].judging.train_pairs == 3 and result.history[1].judging.bank_size >= 4


class RefusingOracle(Oracle):
    """Longer answers win; a prompt in ``refuse`` cannot be judged (an unreadable verdict)."""

    name = "refusing"

    def __init__(self):
        self.refuse: set[str] = set()

    def judge(self, prompts, responses):
        out = []
        for p, rs in zip(prompts, responses, strict=True):
            s = np.array([float(len(r)) for r in rs])
            pref = 1.0 / (1.0 + np.exp(-(s[:, None] - s[None, :])))
            out.append(Judgment(pref, scores=s, parsed=p not in self.refuse))
        return out


def test_cs_redone_sampling_starts_from_the_bank_before_it(tiny_lm, tmp_path):
    """Killed after iteration 1's bank was committed but before its samples: the redone step
    is judged again (an unreadable verdict is asked again and may now differ) and must start
    from the bank before iteration 1, not from the first attempt's, which had already
    evicted an older entry for a prompt the redo cannot judge."""
    config = dataclasses.replace(BASE, iterations=1, prompts_per_iteration=2, variant="cs")
    config = dataclasses.replace(config, bank=BankConfig(capacity=3))
    out = tmp_path / "run"
    run = RunDir(out)
    oracle = RefusingOracle()
    learner = get_learner("caa", layers="1-2", coefficient=0.5)
    saved = {}

    class Kill(Exception):
        pass

    def kill(phase: str, target: Path) -> None:
        if phase == "before" and target == run.samples(1):
            raise Kill

    def snapshot(step: str, t: int) -> None:
        if step == "summary" and t == 0:
            saved["bank"] = run.read_bank().entries

    with commit_hook(kill), pytest.raises(Kill):
        SIMS(tiny_lm, oracle, learner, config, progress=False, callback=snapshot).fit(PROMPTS, out)
    assert len(saved["bank"]) == 2  # iteration 1's two entries evict one of these
    batch = draw_prompts(run.read_prompts(run.prompts), 1, 2, config.seed)
    oracle.refuse = {batch[0].text}
    SIMS(tiny_lm, oracle, learner, config, progress=False).fit(PROMPTS, out)
    bank = run.read_bank().entries
    assert [e for e in bank if e.iteration == 0] == list(saved["bank"])
    assert [e.prompt_id for e in bank if e.iteration == 1] == [batch[1].id]
    assert not list(out.glob("iter_*/bank.pending.jsonl"))
