"""Saving and loading steerings: bit-for-bit round trip, refusal of other models and of
corrupt files."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from simsteer.errors import SimsError
from simsteer.io import new_file_mode, write_json
from simsteer.learners.caa import AddVector
from simsteer.models import encode_prompt, left_pad, load_model
from simsteer.steering import CONFIG_NAME, WEIGHTS_NAME, Steering


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
