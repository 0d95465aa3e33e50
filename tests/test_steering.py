"""Steerings: immutable copies, bit-for-bit save/load round trip, loading every function
kind without the learners, refusal of other models and of corrupt files."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from simsteer.errors import SimsError
from simsteer.functions import (
    AddVector,
    HeadShift,
    HouseholderRotation,
    PositionalAdd,
    SpectralProjection,
    function_kind,
)
from simsteer.io import new_file_mode, write_json
from simsteer.models import load_model
from simsteer.steering import CONFIG_NAME, WEIGHTS_NAME, Steering
from simsteer.tokens import encode_prompt, left_pad


@pytest.fixture()
def steering(tiny_lm):
    torch.manual_seed(0)
    fns = {1: AddVector(torch.randn(tiny_lm.hidden_size)), 3: AddVector(torch.randn(tiny_lm.hidden_size))}
    return Steering(
        fns,
        "caa",
        tiny_lm.fingerprint(),
        positions="last",
        strength=0.5,
        hyperparameters={"coefficient": 0.1},
    )


def _logits(lm, steering=None):
    ids, mask = left_pad([encode_prompt(lm.tokenizer, "the good day")], lm.tokenizer.pad_token_id)
    with torch.inference_mode():
        if steering is None:
            return lm.model(input_ids=ids, attention_mask=mask).logits
        with steering.applied(lm.model):
            return lm.model(input_ids=ids, attention_mask=mask).logits


def test_round_trip_is_exact(tmp_path, tiny_lm, steering):
    steering.save(tmp_path / "s")
    assert (tmp_path / "s" / WEIGHTS_NAME).is_file()
    config = json.loads((tmp_path / "s" / CONFIG_NAME).read_text())
    assert config["fingerprint"] == tiny_lm.fingerprint()
    assert config["learner"] == "caa" and config["positions"] == "last"
    assert set(load_file(tmp_path / "s" / WEIGHTS_NAME)) == {"layers.1.vector", "layers.3.vector"}
    loaded = Steering.load(tmp_path / "s")
    assert loaded.layers == [1, 3]
    assert loaded.strength == 0.5 and loaded.positions == "last"
    for i in (1, 3):
        assert torch.equal(loaded.functions[i].vector, steering.functions[i].vector)
    assert torch.equal(_logits(tiny_lm, loaded), _logits(tiny_lm, steering))
    assert not torch.equal(_logits(tiny_lm, loaded), _logits(tiny_lm))
    assert not list(tmp_path.glob("s/.*"))  # no temporary files left behind


def test_other_model_is_refused(tmp_path, tiny_gpt2_dir, steering):
    steering.save(tmp_path / "s")
    gpt2 = load_model(str(tiny_gpt2_dir), device="cpu", dtype="fp32")
    with pytest.raises(SimsError, match="learned on another model"):
        Steering.load(tmp_path / "s").applied(gpt2.model).__enter__()


@pytest.mark.parametrize("damage", ["truncate", "garbage_json", "missing_weights", "bad_kind"])
def test_corrupt_files_give_clear_errors(tmp_path, steering, damage):
    path = steering.save(tmp_path / "s")
    if damage == "truncate":
        data = (path / WEIGHTS_NAME).read_bytes()
        (path / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    elif damage == "garbage_json":
        (path / CONFIG_NAME).write_text("{not json")
    elif damage == "missing_weights":
        (path / WEIGHTS_NAME).unlink()
    else:
        cfg = json.loads((path / CONFIG_NAME).read_text())
        cfg["layers"]["1"]["kind"] = "nope"
        (path / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(SimsError):
        Steering.load(path)


def test_missing_folder(tmp_path):
    with pytest.raises(SimsError, match="not found"):
        Steering.load(tmp_path / "absent")


def test_written_files_get_the_usual_permissions(tmp_path):
    # mkstemp alone would leave every file 0o600, unreadable to a team sharing the run.
    old = os.umask(0o022)
    try:
        assert new_file_mode() == 0o644
        write_json(tmp_path / "a.json", {"x": 1})
        assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
        os.umask(0o077)
        assert new_file_mode() == 0o600
        write_json(tmp_path / "b.json", {"x": 1})
        assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_steering_is_frozen_and_copies_share_functions(steering):
    with pytest.raises(dataclasses.FrozenInstanceError):
        steering.strength = 2.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        steering.metadata = {}  # type: ignore[misc]
    stronger = steering.with_strength(2.0)
    assert stronger.strength == 2.0 and steering.strength == 0.5
    assert steering.scaled(3.0).strength == 1.5 and steering.strength == 0.5
    assert stronger.functions[1] is steering.functions[1]  # no tensor is copied
    assert steering.with_positions("prompt").positions == "prompt" and steering.positions == "last"
    with pytest.raises(SimsError, match="unknown positions"):
        steering.with_positions("middle")
    tagged = steering.with_metadata(a=1).with_metadata(b=2, a=3)
    assert list(tagged.metadata.items()) == [("a", 3), ("b", 2)] and steering.metadata == {}


def test_steering_keeps_its_own_dicts(tiny_lm):
    functions = {2: AddVector(torch.ones(tiny_lm.hidden_size)), 0: AddVector(torch.ones(tiny_lm.hidden_size))}
    metadata = {"x": 1}
    steering = Steering(functions, "caa", tiny_lm.fingerprint(), metadata=metadata)
    functions.clear()
    metadata["y"] = 2
    assert steering.layers == [0, 2] and steering.metadata == {"x": 1}


def test_with_strength_applies_like_the_strength_argument(tiny_lm, steering):
    ids, mask = left_pad([encode_prompt(tiny_lm.tokenizer, "the good day")], tiny_lm.tokenizer.pad_token_id)
    with torch.inference_mode():
        with steering.with_strength(1.5).applied(tiny_lm.model):
            copied = tiny_lm.model(input_ids=ids, attention_mask=mask).logits
        with steering.applied(tiny_lm.model, strength=3.0):  # 0.5 x 3
            multiplied = tiny_lm.model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(copied, multiplied)


def _one_of_each_kind(d: int, heads: int) -> dict[int, object]:
    g = torch.Generator().manual_seed(0)
    mlp = {}
    widths = [d, d // 2, d // 4, d // 8, 1]
    for k in range(4):
        mlp[f"w{k + 1}"] = torch.randn(widths[k + 1], widths[k], generator=g)
        mlp[f"b{k + 1}"] = torch.randn(widths[k + 1], generator=g)
    q, _ = torch.linalg.qr(torch.randn(d, 3, generator=g))
    return {
        0: AddVector(torch.randn(d, generator=g)),
        1: HouseholderRotation(torch.randn(d, generator=g), mlp, alpha=0.7),
        2: SpectralProjection(q[:, :2], q[:, 2:], mode="average"),
        3: HeadShift(torch.randn(heads, d // heads, generator=g), torch.rand(heads, generator=g)),
        4: PositionalAdd(torch.randn(3, d, generator=g), offset=2),
    }


# Imports simsteer.steering without running the package root (which imports the learners).
LOAD_ALONE = textwrap.dedent("""
    import importlib.util, sys, types
    spec = importlib.util.find_spec("simsteer")
    package = types.ModuleType("simsteer")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["simsteer"] = package
    from simsteer.steering import Steering
    steering = Steering.load(sys.argv[1])
    assert not [m for m in sys.modules if m.startswith("simsteer.learners")], "learners imported"
    print(" ".join(f"{i}:{f.kind}" for i, f in steering.functions.items()))
""")


def test_every_kind_loads_in_a_fresh_process_without_the_learners(tmp_path):
    d, heads = 16, 4
    functions = _one_of_each_kind(d, heads)
    fingerprint = {"architecture": "X", "hidden_size": d, "num_layers": 5}
    Steering(functions, "mixed", fingerprint).save(tmp_path / "s")
    out = subprocess.run(
        [sys.executable, "-c", LOAD_ALONE, str(tmp_path / "s")], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0:add", "1:hpr", "2:sea", "3:iti", "4:actadd"]
    loaded = Steering.load(tmp_path / "s")
    for i, fn in functions.items():
        saved = loaded.functions[i]
        assert type(saved) is type(fn) and saved.params() == fn.params()
        for name, value in fn.state_dict().items():
            assert torch.equal(saved.state_dict()[name], value)


def test_function_kinds_are_found_by_their_class_and_sites_are_declared():
    assert function_kind("add") is AddVector and function_kind("iti") is HeadShift
    assert HeadShift.site == "attn_heads" and AddVector.site == "residual"
    with pytest.raises(SimsError, match="unknown steering function kind 'nope'"):
        function_kind("nope")
