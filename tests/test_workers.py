"""Worker pools: Ray actors give the loop the same samples, activations and steerings as
one process; a killed worker is restarted and its shard redone; without Ray, one line.

One local Ray cluster serves the module (2 CPUs, as in CI: one torch thread per worker).
The tiny-model tests share one 2-worker pool (a class fixture, closed before the tests
after it start their own workers); "1 worker" is that pool cut to its first actor.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from simsteer.cli.main import main
from simsteer.errors import SimsError
from simsteer.functions import AddVector
from simsteer.generation.sampling import SamplingConfig, generate
from simsteer.learners import get_learner
from simsteer.loop.calibration import GuardConfig
from simsteer.loop.config import SIMSConfig
from simsteer.loop.sims import SIMS
from simsteer.models import load_model
from simsteer.oracles import get_oracle
from simsteer.steering import Steering
from simsteer.tokens import encode_pairs, teacher_forced
from simsteer.workers import LocalPool, RayPool, WorkerSpec, import_ray, open_pool
from simsteer.workers.payload import forward_batches, load_policy, payload_key, policy_payload, shards

from .conftest import TINY_RUN

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")

PROMPTS = [
    f"the {w} day is {v}" for w in ("good", "bad", "cold", "warm", "long", "short") for v in ("nice", "sad")
]
#: A self-judge the tiny vocabulary can answer (it has no "Yes" / "No").
SELF_JUDGE = {"name": "self-judge", "verdicts": ["good", "bad"]}
SAMPLING = SamplingConfig(max_new_tokens=8, batch_size=5)
CONFIG = SIMSConfig(
    iterations=1,
    prompts_per_iteration=5,
    samples_per_prompt=3,
    eval_prompts=2,
    sampling=SAMPLING,
    seed=3,
    activation_batch_size=3,  # several collection batches, split over the workers
    guard=GuardConfig(calibration_prompts=3, strength_grid=(0.5, 1.0), stop_at_unfluent=False),
)


@pytest.fixture(scope="module")
def cluster():
    ray = import_ray()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' thread count, so both paths compute alike
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()
    torch.set_num_threads(threads)


def _policy(lm) -> list[Steering]:
    torch.manual_seed(1)
    return [Steering({1: AddVector(torch.randn(lm.hidden_size))}, "caa", lm.fingerprint())]


def _one_worker(pool: RayPool) -> RayPool:
    """The same pool cut to its first actor (a 1-worker pool without starting another)."""
    one = copy.copy(pool)
    one.actors = pool.actors[:1]
    one._owns = False
    return one


def _run(lm, pool, out: Path, oracle: str = "length:4"):
    learner = get_learner("caa", layers="1-2")
    sims = SIMS(lm, get_oracle(oracle), learner, CONFIG, progress=False, workers=pool)
    return sims.fit(PROMPTS, out)


def _artefacts(root: Path) -> dict[str, object]:
    """Every file of a run: bytes, safetensors as tensors, JSON without timings."""
    out: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        if path.is_dir() or path.suffix == ".png":
            continue
        rel = str(path.relative_to(root))
        if path.suffix == ".safetensors":
            out[rel] = load_file(path)
        elif rel.endswith("summary.json") or rel == "summary.json" or path.name == "steering_config.json":
            out[rel] = _drop_timing(json.loads(path.read_text()))
        else:
            out[rel] = path.read_bytes()
    return out


def _drop_timing(data):
    if isinstance(data, dict):
        timing = ("seconds", "seconds_total", "fit_seconds")
        return {k: _drop_timing(v) for k, v in data.items() if k not in timing}
    if isinstance(data, list):
        return [_drop_timing(v) for v in data]
    return data


def _same(a: dict[str, object], b: dict[str, object]) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        if isinstance(value, dict) and value and isinstance(next(iter(value.values())), torch.Tensor):
            assert value.keys() == b[name].keys(), name
            assert all(torch.equal(value[k], b[name][k]) for k in value), name
        else:
            assert value == b[name], name


@pytest.fixture(scope="class")
def lm(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu", dtype="fp32")


@pytest.fixture(scope="class")
def pool(cluster, lm):
    """Two workers for the class's tests (closed after them; they hold both CPUs). The
    workers also hold a self-judge, so a model-based oracle judges there."""
    with RayPool(WorkerSpec.of(lm, get_oracle(SELF_JUDGE, lm=lm)), workers=2) as pool:
        yield pool


@needs_ray
class TestTinyModelOnTwoWorkers:
    def test_generate_is_the_same_as_in_process(self, pool, lm):
        policy = _policy(lm)
        for seed, config in ((7, SAMPLING), (0, SamplingConfig(temperature=0, max_new_tokens=6))):
            expected = generate(lm, PROMPTS[:7], 3, config, policy, seed=seed)
            assert pool.generate(PROMPTS[:7], 3, config, policy, seed=seed) == expected
            assert _one_worker(pool).generate(PROMPTS[:7], 3, config, policy, seed=seed) == expected
        keys = [40 + i for i in range(5)]
        assert pool.generate(PROMPTS[:5], 2, SAMPLING, seed=1, keys=keys) == generate(
            lm, PROMPTS[:5], 2, SAMPLING, seed=1, keys=keys
        )

    @pytest.mark.parametrize("needs", ["summaries", "tokens", "heads", "texts"])
    def test_collection_is_bitwise_the_same(self, pool, lm, needs):
        gens = generate(lm, PROMPTS, 1, SAMPLING, seed=2)
        responses = [g[0].text for g in gens]
        args = (needs, PROMPTS, responses, 5, list(range(len(PROMPTS))), [1, 2])
        expected, tokens = LocalPool(lm).collect(*args, batch_size=3, max_response_tokens=4)
        for p in (pool, _one_worker(pool)):
            data, n = p.collect(*args, batch_size=3, max_response_tokens=4)
            assert n == tokens
            for name in ("positive", "negative", "token_norms", "positive_heads", "negative_heads"):
                a, b = getattr(expected, name), getattr(data, name)
                assert (a is None and b is None) or torch.equal(a, b), name
            for name in ("positive_tokens", "negative_tokens"):
                a, b = getattr(expected, name), getattr(data, name)
                assert (a is None and b is None) or all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
            assert data.positive_texts == expected.positive_texts
            assert data.num_heads == expected.num_heads

    def test_a_model_oracle_judges_on_the_workers(self, pool, lm):
        oracle = get_oracle(SELF_JUDGE, lm=lm)
        responses = [[f"a {w} day", "sad night", "I love the sun"] for w in ("good", "bad", "cold", "warm")]
        prompts = PROMPTS[:4]
        local = oracle.judge(prompts, responses)
        remote = pool.judge(oracle, prompts, responses)
        # Shards change the oracle's own batches: equal up to float rounding, not bitwise.
        for a, b in zip(local, remote, strict=True):
            np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=1e-6)
        flat = [r for rs in responses for r in rs]
        flat_prompts = [p for p in prompts for _ in range(3)]
        np.testing.assert_allclose(
            pool.score(oracle, flat_prompts, flat), oracle.score(flat_prompts, flat), rtol=0, atol=1e-6
        )

    def test_a_run_writes_the_same_artefacts_on_any_pool(self, pool, lm, tmp_path):
        runs = {
            "local": _run(lm, None, tmp_path / "local"),
            "two": _run(lm, pool, tmp_path / "two"),
            "one": _run(lm, _one_worker(pool), tmp_path / "one"),
        }
        files = {name: _artefacts(result.run_dir) for name, result in runs.items()}
        assert "iter_1/steering/steering.safetensors" in files["local"]
        assert "iter_0/activations.safetensors" in files["local"]
        for t in (0, 1):  # the samples are byte for byte the same
            name = f"iter_{t}/samples.jsonl"
            assert files["two"][name] == files["one"][name] == files["local"][name]
        _same(files["two"], files["local"])
        _same(files["one"], files["local"])

    def test_a_killed_worker_is_restarted_and_its_shard_redone(self, pool, lm):
        policy = _policy(lm)
        config = SamplingConfig(max_new_tokens=16, batch_size=4)
        expected = generate(lm, PROMPTS, 4, config, policy, seed=11)
        before = pool.worker_pids()
        refs, sizes = pool._submit_generate(PROMPTS, 4, config, policy, 11, None)
        os.kill(before[1], signal.SIGKILL)  # while its shard is in flight
        parts = pool._gather(refs, sizes, False, "sampling")
        assert [row for part in parts for row in part] == expected
        after = pool.worker_pids()
        assert after[0] == before[0] and after[1] != before[1]  # restarted by Ray
        assert pool.generate(PROMPTS, 4, config, policy, seed=11) == expected


def test_workers_without_ray_give_one_line(monkeypatch, tiny_model_dir, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # "import ray" raises ImportError
    lm = load_model(str(tiny_model_dir), device="cpu", dtype="fp32")
    assert isinstance(open_pool(lm), LocalPool)  # no workers asked: Ray is never imported
    with pytest.raises(SimsError, match=r"pip install 'simsteer\[ray\]'"):
        RayPool(WorkerSpec.of(lm), workers=2)
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    capsys.readouterr()
    code = main(["run", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--workers", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "pip install 'simsteer[ray]'" in err[0]


@needs_ray
def test_sims_run_with_workers_matches_a_plain_run(cluster, tiny_model_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    common = ["run", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--oracle", "length:3"]
    common += ["--layers", "1-2", "--dtype", "fp32", "--device", "cpu", *TINY_RUN]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert main([*common, "--out", str(tmp_path / "ray"), "--workers", "2"]) == 0
    _same(_artefacts(tmp_path / "ray"), _artefacts(tmp_path / "plain"))


@needs_ray
def test_eval_and_sweep_on_workers_match_one_process(cluster, tiny_model_dir, tmp_path):
    """``sims eval --workers`` answers as one process does; ``sims sweep --workers`` gives
    every point's run the workers (on the Ray already running here) and the same artefacts."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    common = ["--model", str(tiny_model_dir), "--prompts", str(prompts), "--oracle", "length:3"]
    common += ["--layers", "1-2", "--dtype", "fp32", "--device", "cpu", *TINY_RUN]
    run = tmp_path / "plain"
    assert main(["run", *common, "--out", str(run)]) == 0
    evals = {}
    for name, extra in (("here", []), ("ray", ["--workers", "2"])):
        assert main(["eval", str(run), "--out", str(tmp_path / name), "--bootstrap", "10", *extra]) == 0
        evals[name] = json.loads((tmp_path / name / "eval.json").read_text())
    for key in ("answers", "per_prompt", "scores"):
        assert evals["ray"][key] == evals["here"][key], key
    k = common.index("-K")
    without_k = common[:k] + common[k + 2 :]
    sweep = tmp_path / "sweep"
    grid = ["sweep", "-o", str(sweep), "--grid", f"K={common[k + 1]}", "--workers", "2"]
    assert main([*grid, "--", *without_k]) == 0
    _same(_artefacts(sweep / f"K={common[k + 1]}"), _artefacts(run))


@needs_ray
@pytest.mark.slow
def test_embedded_model_run_on_two_workers_matches_one_process(cluster, embedded_lm, tmp_path):
    config = SIMSConfig(
        iterations=1,
        prompts_per_iteration=3,
        samples_per_prompt=2,
        eval_prompts=2,
        sampling=SamplingConfig(max_new_tokens=8, batch_size=8),
        seed=5,
        guard=GuardConfig(fluency_budget=None),
    )
    prompts = ["Describe your day.", "What is a cat?", "Tell me about rain.", "Name a colour.", "Why sleep?"]

    def run(pool, out: Path):
        learner = get_learner("caa", layers="9-12")
        sims = SIMS(embedded_lm, get_oracle("sentiment"), learner, config, progress=False, workers=pool)
        return sims.fit(prompts, out).run_dir

    local = _artefacts(run(None, tmp_path / "local"))
    with RayPool(WorkerSpec.of(embedded_lm), workers=2) as pool:
        two = _artefacts(run(pool, tmp_path / "two"))
    assert two["iter_0/samples.jsonl"] == local["iter_0/samples.jsonl"]
    _same(two, local)


def test_policy_bytes_round_trip_and_key(tiny_lm):
    policy = _policy(tiny_lm)
    payload = policy_payload(policy)
    back = load_policy(payload)
    assert torch.equal(back[0].functions[1].vector, policy[0].functions[1].vector)
    assert back[0].strength == policy[0].strength and back[0].learner == "caa"
    assert payload_key(payload) == payload_key(policy_payload(back))
    assert payload_key(payload) != payload_key(policy_payload([policy[0].with_strength(2.0)]))
    assert load_policy(policy_payload([])) == []


def test_shards_and_batches_match_one_process(tiny_lm):
    assert [list(r) for r in shards(5, 2)] == [[0, 1, 2], [3, 4]]
    assert [list(r) for r in shards(2, 4)] == [[0], [1]]
    assert shards(0, 3) == []
    gens = generate(tiny_lm, PROMPTS, 1, SAMPLING, seed=4)
    rows = encode_pairs(tiny_lm.tokenizer, PROMPTS, [g[0].text for g in gens])
    expected = [b.index for b in teacher_forced(tiny_lm, rows, 5)]
    assert [b.index for b in forward_batches([len(r.ids) for r in rows], 5)] == expected


def test_worker_spec_records_how_the_model_was_loaded(tiny_lm, tiny_model_dir):
    spec = WorkerSpec.of(tiny_lm, get_oracle("length:3"))
    assert (spec.source, spec.dtype, spec.device, spec.oracle) == (str(tiny_model_dir), "fp32", "cpu", None)
    assert (
        WorkerSpec.of(tiny_lm, get_oracle(SELF_JUDGE, lm=tiny_lm)).oracle
        == get_oracle(SELF_JUDGE, lm=tiny_lm).describe()
    )


def test_the_model_digest_tells_other_weights_apart(tiny_lm, tiny_model_dir, tmp_path):
    from simsteer.workers.pool import model_digest

    from .conftest import build_tiny_model

    same = load_model(str(tiny_model_dir), device="cpu", dtype="fp32")
    other = load_model(str(build_tiny_model(tmp_path / "other", seed=1)), device="cpu", dtype="fp32")
    assert model_digest(tiny_lm) == model_digest(same) == WorkerSpec.of(tiny_lm).digest
    assert model_digest(other) != model_digest(tiny_lm)


@needs_ray
def test_a_worker_that_loads_other_weights_at_the_path_is_refused(cluster, tmp_path):
    """A node whose files at the model's path are another model's (here: the folder is
    rewritten between the driver's load and the pool's start) would change every artefact."""
    from .conftest import build_tiny_model

    path = build_tiny_model(tmp_path / "model", seed=0)
    lm = load_model(str(path), device="cpu", dtype="fp32")
    spec = WorkerSpec.of(lm)
    build_tiny_model(path, seed=1)  # what the worker finds at that path
    with pytest.raises(SimsError, match="loaded another model from") as err:
        RayPool(spec, workers=1)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    build_tiny_model(path, seed=0)  # the same weights again: the pool starts
    with RayPool(spec, workers=1) as pool:
        assert pool.worker_info()[0]["digest"] == spec.digest
