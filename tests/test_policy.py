"""Policies: a stack of steerings (possibly empty), applied together with hooks always
removed, saved as one folder or step folders, and the unsteered marker of older runs."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

from simsteer.errors import SimsError
from simsteer.functions import AddVector
from simsteer.generation.sampling import SamplingConfig, generate
from simsteer.hooks import count_hooks
from simsteer.models import load_model
from simsteer.policy import Policy, load_policy
from simsteer.steering import CONFIG_NAME, WEIGHTS_NAME, Steering
from simsteer.tokens import encode_prompt, left_pad


def _steering(lm, seed: int, layers=(1, 2), strength: float = 1.0) -> Steering:
    g = torch.Generator().manual_seed(seed)
    fns = {i: AddVector(torch.randn(lm.hidden_size, generator=g)) for i in layers}
    return Steering(fns, "caa", lm.fingerprint(), strength=strength, metadata={"seed": seed})


def _logits(lm, ctx=None):
    ids, mask = left_pad(
        [encode_prompt(lm.tokenizer, p) for p in ("the good day", "a cat")], lm.tokenizer.pad_token_id
    )
    with torch.inference_mode():
        if ctx is None:
            return lm.model(input_ids=ids, attention_mask=mask).logits
        with ctx:
            return lm.model(input_ids=ids, attention_mask=mask).logits


def test_policy_is_an_immutable_sequence_of_steerings(tiny_lm):
    a, b = _steering(tiny_lm, 0), _steering(tiny_lm, 1)
    policy = Policy([a, b])
    assert len(policy) == 2 and list(policy) == [a, b] and policy[0] is a and policy[-1] is b
    assert isinstance(policy[1:], Policy) and list(policy[1:]) == [b]
    assert policy and not Policy() and Policy().is_unsteered and not policy.is_unsteered
    assert Policy(a).steerings == (a,) and Policy.of(None) == Policy() and Policy.of(policy) is policy
    assert list(Policy.of([a])) == [a]
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.steerings = ()  # type: ignore[misc]
    with pytest.raises(TypeError, match="Steering objects"):
        Policy(["not a steering"])  # type: ignore[list-item]
    scaled = policy.scaled(0.5)
    assert [s.strength for s in scaled] == [0.5, 0.5] and [s.strength for s in policy] == [1.0, 1.0]
    assert [s.positions for s in policy.with_positions("last")] == ["last", "last"]
    assert all(s.metadata["t"] == 3 for s in policy.with_metadata(t=3))
    assert list(policy.appended(a)) == [a, b, a]


def test_empty_policy_is_a_no_op(tiny_lm):
    before = count_hooks(tiny_lm.model)
    base = _logits(tiny_lm)
    assert torch.equal(_logits(tiny_lm, Policy().applied(tiny_lm.model)), base)
    assert count_hooks(tiny_lm.model) == before


def test_applied_equals_the_nested_steerings_and_removes_hooks(tiny_lm):
    a, b = _steering(tiny_lm, 0, strength=0.5), _steering(tiny_lm, 1, layers=(2, 3))
    policy = Policy([a, b])
    nested = _nested(tiny_lm, a, b)
    assert torch.equal(_logits(tiny_lm, policy.applied(tiny_lm.model)), nested)
    assert not torch.equal(nested, _logits(tiny_lm))
    # The strength argument multiplies every steering's own strength.
    assert torch.equal(
        _logits(tiny_lm, policy.applied(tiny_lm.model, strength=2.0)),
        _logits(tiny_lm, policy.scaled(2.0).applied(tiny_lm.model)),
    )
    before = count_hooks(tiny_lm.model)
    with policy.applied(tiny_lm.model):
        assert count_hooks(tiny_lm.model) == before + 2 * 3  # 2 layers + tracker, twice
    assert count_hooks(tiny_lm.model) == before
    with pytest.raises(RuntimeError, match="boom"), policy.applied(tiny_lm.model):
        raise RuntimeError("boom")
    assert count_hooks(tiny_lm.model) == before


def _nested(lm, a, b):
    ids, mask = left_pad(
        [encode_prompt(lm.tokenizer, p) for p in ("the good day", "a cat")], lm.tokenizer.pad_token_id
    )
    with torch.inference_mode(), a.applied(lm.model), b.applied(lm.model):
        return lm.model(input_ids=ids, attention_mask=mask).logits


def test_a_failing_steering_leaves_no_hook_of_the_earlier_ones(tiny_lm, tiny_gpt2_dir):
    gpt2 = load_model(str(tiny_gpt2_dir), device="cpu", dtype="fp32")
    policy = Policy([_steering(gpt2, 0), _steering(tiny_lm, 1)])  # the second is for another model
    before = count_hooks(gpt2.model)
    with pytest.raises(SimsError, match="another model"), policy.applied(gpt2.model):
        pass
    assert count_hooks(gpt2.model) == before
    with pytest.raises(SimsError, match="another model"):
        policy.check_model(gpt2.model)


def _same_steerings(a: Policy, b: Policy) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.layers == y.layers and x.strength == y.strength and x.metadata == y.metadata
        assert all(torch.equal(x.functions[i].vector, y.functions[i].vector) for i in x.layers)


def test_round_trip_single_and_composed(tmp_path, tiny_lm):
    single = Policy([_steering(tiny_lm, 0, strength=0.25)])
    single.save(tmp_path / "one")
    assert (tmp_path / "one" / WEIGHTS_NAME).is_file() and (tmp_path / "one" / CONFIG_NAME).is_file()
    _same_steerings(Policy.load(tmp_path / "one"), single)
    _same_steerings(load_policy(tmp_path / "one" / CONFIG_NAME), single)  # a file of the folder

    composed = Policy([_steering(tiny_lm, 0), _steering(tiny_lm, 1, layers=(3,))])
    composed.save(tmp_path / "two")
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["step_1", "step_2"]
    loaded = load_policy(tmp_path / "two")
    assert isinstance(loaded, Policy)
    _same_steerings(loaded, composed)
    assert torch.equal(
        _logits(tiny_lm, loaded.applied(tiny_lm.model)), _logits(tiny_lm, composed.applied(tiny_lm.model))
    )
    # steps=True keeps a one-steering stack in a step folder (a composing run's layout).
    single.save(tmp_path / "steps", steps=True, metadata={"policy_iteration": 1})
    again = Policy.load(tmp_path / "steps")
    assert (tmp_path / "steps" / "step_1" / CONFIG_NAME).is_file()
    assert again[0].metadata == {"seed": 0, "policy_iteration": 1}
    with pytest.raises(SimsError, match="step folders"):
        composed.save(tmp_path / "bad", steps=False)


def test_unsteered_policy_keeps_the_format_of_older_runs(tmp_path, tiny_lm):
    # What the loop wrote for an unsteered final policy before Policy existed.
    Steering({}, "caa", tiny_lm.fingerprint(), metadata={"unsteered": True, "policy_iteration": 0}).save(
        tmp_path / "old"
    )
    old = load_policy(tmp_path / "old")
    assert isinstance(old, Policy) and len(old) == 0 and old.is_unsteered
    Policy().save(
        tmp_path / "new", fingerprint=tiny_lm.fingerprint(), learner="caa", metadata={"policy_iteration": 0}
    )
    assert (tmp_path / "new" / CONFIG_NAME).read_bytes() == (tmp_path / "old" / CONFIG_NAME).read_bytes()
    for folder in ("new", "old"):  # (safetensors writes its header metadata in hash order)
        with safe_open(tmp_path / folder / WEIGHTS_NAME, "pt") as f:
            assert not list(f.keys()) and f.metadata() == {"format": "pt", "learner": "caa"}
    # A composing run wrote it as step_1.
    Policy().save(tmp_path / "steps", steps=True, fingerprint=tiny_lm.fingerprint(), learner="caa")
    assert json.loads((tmp_path / "steps" / "step_1" / CONFIG_NAME).read_text())["metadata"] == {
        "unsteered": True
    }
    assert len(load_policy(tmp_path / "steps")) == 0
    with pytest.raises(SimsError, match="fingerprint"):
        Policy().save(tmp_path / "nofp")


def test_empty_steerings_that_are_not_the_marker_stay(tmp_path, tiny_lm):
    # A carried-over empty fit is a step of a composed stack, not the unsteered marker.
    empty = Steering({}, "caa", tiny_lm.fingerprint(), metadata={"carried_over": True})
    policy = Policy([empty, _steering(tiny_lm, 0)])
    policy.save(tmp_path / "p")
    loaded = load_policy(tmp_path / "p")
    assert len(loaded) == 2 and not loaded.is_unsteered
    assert Policy([empty]).is_unsteered


def test_missing_or_empty_folders(tmp_path):
    with pytest.raises(SimsError, match="not found"):
        load_policy(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SimsError, match="not a steering folder"):
        load_policy(tmp_path / "empty")


def test_generate_takes_a_policy_like_a_list(tiny_lm):
    policy = Policy([_steering(tiny_lm, 0, strength=3.0)])
    config = SamplingConfig(temperature=0.0, max_new_tokens=4, batch_size=2)
    prompts = ["the good day", "a cat"]
    as_policy = generate(tiny_lm, prompts, 1, config, policy)
    as_list = generate(tiny_lm, prompts, 1, config, list(policy))
    assert [g[0].text for g in as_policy] == [g[0].text for g in as_list]
    unsteered = generate(tiny_lm, prompts, 1, config, Policy())
    assert [g[0].text for g in unsteered] == [g[0].text for g in generate(tiny_lm, prompts, 1, config, None)]
