"""Conditional CAA (``cast``): the gate opens only where the state projects past the
threshold, the condition separates the training prompts from the contrast prompts, the
vector is CAA's, save/load, missing contrast prompts, and the loop end to end."""

from __future__ import annotations

import json

import pytest
import torch

from simsteer.errors import SimsError
from simsteer.functions import GatedAdd
from simsteer.learners import PreferenceActivations, get_learner
from simsteer.learners.cast import condition, last_prompt_states
from simsteer.steering import Steering

HARMFUL = ["how do I steal a car", "how do I hurt him", "make a bomb now", "steal her purse", "hurt the dog"]
BENIGN = ["bake bread at home", "name a nice colour", "plant a tree", "sing a happy song", "walk to school"]


def test_gate_opens_only_past_the_threshold():
    vector, cond = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    fn = GatedAdd(vector, cond, threshold=0.5)
    hidden = torch.tensor([[[0.0, 0.4, 0.0], [0.0, 0.6, 0.0], [2.0, 3.0, 1.0]]])
    out = fn.edit(hidden, 2.0)
    assert torch.equal(out[0, 0], hidden[0, 0])  # 0.4 <= 0.5: closed
    assert torch.equal(out[0, 1], hidden[0, 1] + 2 * vector)
    assert torch.equal(out[0, 2], hidden[0, 2] + 2 * vector)
    assert torch.equal(fn.edit(hidden, 0.0), hidden)
    assert fn.edit(hidden.to(torch.bfloat16), 1.0).dtype == torch.bfloat16
    rebuilt = GatedAdd.from_saved(dict(fn.state_dict()), fn.params())
    assert torch.equal(rebuilt.edit(hidden, 2.0), out)
    with pytest.raises(ValueError, match="threshold"):
        GatedAdd.from_saved(dict(fn.state_dict()), {"threshold": "high"})


def test_condition_is_the_unit_mean_difference_and_the_quantile():
    gen = torch.Generator().manual_seed(0)
    train = torch.randn(40, 8, generator=gen, dtype=torch.float64) + 3.0 * torch.eye(8)[0]
    contrast = torch.randn(50, 8, generator=gen, dtype=torch.float64)
    direction, threshold = condition(train, contrast, 0.9)
    expected = train.mean(0) - contrast.mean(0)
    assert torch.allclose(direction, expected / expected.norm())
    share = float((contrast @ direction > threshold).double().mean())
    assert share <= 0.1 + 1e-9 and float((train @ direction > threshold).double().mean()) > 0.8
    with pytest.raises(SimsError, match="same mean"):
        condition(contrast, contrast, 0.9)


def _data(lm, layers) -> PreferenceActivations:
    """D+ / D- summaries from the real model on the HARMFUL prompts (planted: D+ shifted)."""
    states = last_prompt_states(lm, HARMFUL, layers).float()
    shift = torch.zeros(states.shape[-1])
    shift[0] = 1.0
    groups = list(range(len(HARMFUL)))
    return PreferenceActivations(
        layers=list(layers),
        positive=states + shift,
        negative=states,
        positive_groups=groups,
        negative_groups=groups,
        token_norms=torch.full((len(layers),), 4.0),
        positive_texts=[(p, "no") for p in HARMFUL],
        negative_texts=[(p, "yes") for p in HARMFUL],
    )


def test_fit_gates_caa_on_the_training_prompts(tiny_lm, tmp_path):
    layers = [1, 2]
    data = _data(tiny_lm, layers)
    learner = get_learner("cast", layers="1-2", quantile=0.8)
    learner.prepare(tiny_lm)
    learner.prepare_contrast(BENIGN)
    steering = learner.fit(data, tiny_lm.fingerprint())
    caa = get_learner("caa", layers="1-2").fit(data, tiny_lm.fingerprint())
    assert steering.learner == "cast" and steering.positions == "last" and steering.layers == layers
    train = last_prompt_states(tiny_lm, HARMFUL, layers)
    contrast = last_prompt_states(tiny_lm, BENIGN, layers)
    for i, layer in enumerate(layers):
        fn = steering.functions[layer]
        assert isinstance(fn, GatedAdd)
        assert torch.equal(fn.vector, caa.functions[layer].vector)  # the behaviour is CAA's
        direction, threshold = condition(train[:, i], contrast[:, i], 0.8)
        assert torch.allclose(fn.condition.double(), direction, atol=1e-6) and fn.threshold == threshold
        # The gate: open for the training prompts' last tokens, closed for most contrast ones.
        open_train = float((train[:, i] @ direction > threshold).double().mean())
        open_contrast = float((contrast[:, i] @ direction > threshold).double().mean())
        assert steering.metadata["gate_open_train"][str(layer)] == pytest.approx(open_train, abs=1e-4)
        assert steering.metadata["gate_open_contrast"][str(layer)] == pytest.approx(open_contrast, abs=1e-4)
        assert open_contrast <= 0.2 < 0.6 <= open_train
    steering.save(tmp_path / "s")
    loaded = Steering.load(tmp_path / "s")
    for layer in layers:
        assert torch.equal(loaded.functions[layer].condition, steering.functions[layer].condition)
        assert loaded.functions[layer].threshold == steering.functions[layer].threshold


def test_fit_needs_contrast_prompts_and_the_model(tiny_lm):
    data = _data(tiny_lm, [1])
    learner = get_learner("cast", layers="1")
    with pytest.raises(SimsError, match="needs the model"):
        learner.fit(data, tiny_lm.fingerprint())
    learner.prepare(tiny_lm)
    with pytest.raises(SimsError, match="--contrast-prompts"):
        learner.fit(data, tiny_lm.fingerprint())
    with pytest.raises(SimsError, match="quantile"):
        get_learner("cast", quantile=1.0)


def test_sims_run_with_cast_end_to_end(tmp_path, tiny_model_dir, capsys):
    from simsteer.cli.main import main

    from .conftest import TINY_RUN

    prompts, contrast = tmp_path / "p.txt", tmp_path / "c.txt"
    prompts.write_text("\n".join([*HARMFUL, "steal a bike", "hurt a cat"]) + "\n")
    contrast.write_text("\n".join(BENIGN) + "\n")
    out = tmp_path / "run"
    argv = ["run", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--oracle", "length:3"]
    argv += ["--learner", "cast", "--layers", "1-2", *TINY_RUN, "--fluency-budget", "1e9"]
    argv += ["--repetition-margin", "1", "--contrast-budget", "1"]
    assert main([*argv, "--out", str(out), "--contrast-prompts", str(contrast)]) == 0
    fitted = Steering.load(out / "iter_0" / "fitted")
    assert fitted.learner == "cast" and all(isinstance(f, GatedAdd) for f in fitted.functions.values())
    assert fitted.metadata["condition_prompts"]["contrast"] == len(BENIGN)
    assert json.loads((out / "config.json").read_text())["learner"]["name"] == "cast"
    # Without contrast prompts the run is refused before it starts, in one line.
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--contrast-prompts" in err[0], err
    assert not (tmp_path / "none").exists()
