"""BiPO learner: the training forward is the inference edit, a planted preference is
learned in both directions, pairs, options, save/load, the loop and the CLI."""

from __future__ import annotations

import math

import pytest
import torch

from simsteer.activations import collect_preference_activations
from simsteer.errors import SimsError
from simsteer.functions import AddVector
from simsteer.learners import PreferenceActivations, get_learner
from simsteer.learners.bipo import preference_pairs, response_logprobs
from simsteer.loop.activation_store import load_preference_activations, save_preference_activations
from simsteer.steering import Steering
from simsteer.tokens import encode_pairs, encode_prompt, left_pad

from .conftest import TINY_RUN

SUBJECTS = ["the cat", "a dog", "the city", "we", "they", "the tree", "you", "the town"]
GOOD, BAD = ["good and happy", "very nice"], ["bad and sad", "very awful"]
HELD_OUT = [("the road is", "good and happy", "bad and sad"), ("I was", "very nice", "very awful")]


def _data(layers, pos, neg, pos_groups, neg_groups, norm=5.0) -> PreferenceActivations:
    """Texts-only data (the summaries are unused by BiPO; only their token norms matter)."""
    return PreferenceActivations(
        layers=list(layers),
        positive=torch.zeros(len(pos), len(layers), 1),
        negative=torch.zeros(len(neg), len(layers), 1),
        positive_groups=pos_groups,
        negative_groups=neg_groups,
        token_norms=torch.full((len(layers),), norm),
        positive_texts=pos,
        negative_texts=neg,
    )


def _planted(layers, prompts=SUBJECTS):
    """Every prompt prefers the GOOD answers to the BAD ones."""
    pos = [(f"{s} is", r) for s in prompts for r in GOOD]
    neg = [(f"{s} is", r) for s in prompts for r in BAD]
    groups = [i for i in range(len(prompts)) for _ in GOOD]
    return _data(layers, pos, neg, groups, groups)


def _margins(lm, layer, vector):
    """Held-out log p(y+) - log p(y-), with ``vector`` added at ``layer`` (None: unsteered)."""
    rows_pos = encode_pairs(lm.tokenizer, [h[0] for h in HELD_OUT], [h[1] for h in HELD_OUT])
    rows_neg = encode_pairs(lm.tokenizer, [h[0] for h in HELD_OUT], [h[2] for h in HELD_OUT])
    vectors = None if vector is None else {layer: vector}
    with torch.no_grad():
        return response_logprobs(lm, rows_pos, vectors) - response_logprobs(lm, rows_neg, vectors)


def test_logprobs_are_the_model_s_and_the_training_edit_is_the_saved_one(tiny_lm):
    prompts, responses = ["the good day", "a cat", "we walk home"], ["is very happy", "", "and run fast"]
    rows = encode_pairs(tiny_lm.tokenizer, prompts, responses)
    expected = []
    for row in rows:  # one unpadded full-model forward per row
        with torch.no_grad():
            logits = tiny_lm.model(input_ids=torch.tensor([row.ids])).logits[0].float()
        lp = logits.log_softmax(-1)[:-1].gather(1, torch.tensor(row.ids[1:]).view(-1, 1)).squeeze(1)
        expected.append(float(lp[len(row.ids) - 1 - row.response_len :].sum()))
    with torch.no_grad():
        got = response_logprobs(tiny_lm, rows)
    assert got[1] == 0.0  # an empty response has no tokens to score
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-4, rtol=1e-5)
    v = torch.randn(tiny_lm.hidden_size, generator=torch.Generator().manual_seed(1))
    for sign in (1.0, -1.0):
        steering = Steering({2: AddVector(sign * v)}, "bipo", tiny_lm.fingerprint(), positions="all")
        with torch.no_grad():
            signed = response_logprobs(tiny_lm, rows, {2: v}, torch.full((3,), sign))
            with steering.applied(tiny_lm.model):
                plain = response_logprobs(tiny_lm, rows)
        torch.testing.assert_close(signed, plain, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(signed, got)


@pytest.mark.parametrize("positions", ["prompt", "generated", "last"])
def test_training_edit_follows_positions(tiny_lm, positions):
    rows = encode_pairs(tiny_lm.tokenizer, ["the good day", "a cat"], ["is very happy", "and run fast"])
    width = max(len(r.ids) for r in rows)
    start = torch.tensor([width - r.response_len for r in rows])  # left padding
    v = torch.randn(tiny_lm.hidden_size, generator=torch.Generator().manual_seed(2))
    steering = Steering({1: AddVector(v)}, "bipo", tiny_lm.fingerprint())
    # "last" steers the last prompt token and every generated one, as in generation.
    where, end = ("generated", start - 1) if positions == "last" else (positions, start)
    with torch.no_grad():
        trained = response_logprobs(tiny_lm, rows, {1: v}, positions=positions)
        with steering.applied(tiny_lm.model, positions=where, prompt_end=end):
            applied = response_logprobs(tiny_lm, rows)
        every = response_logprobs(tiny_lm, rows, {1: v})
    torch.testing.assert_close(trained, applied, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(trained, every)


@pytest.mark.parametrize("layer", [1, 3])
def test_planted_preference_is_learned_in_both_directions(tiny_lm, layer):
    learner = get_learner("bipo", layers=str(layer), epochs=2, batch_size=8, lr=0.05, beta=0.5, max_norm=1.0)
    learner.prepare(tiny_lm)
    steering = learner.fit(_planted([layer]), tiny_lm.fingerprint())
    v = steering.functions[layer].vector
    assert isinstance(steering.functions[layer], AddVector) and steering.positions == "all"
    meta = steering.metadata
    assert meta["pairs"] == 32 and meta["steps"] == 8 and meta["paired"] is True
    assert meta["loss"][-1] < meta["loss"][0] < math.log(2)  # log 2: the loss at v = 0
    assert 0 < meta["relative_norm"][str(layer)] <= 1.0 + 1e-6
    base, plus, minus = (
        _margins(tiny_lm, layer, None),
        _margins(tiny_lm, layer, v),
        _margins(tiny_lm, layer, -v),
    )
    # Held-out prompts: +v prefers y+ more than the unsteered model, -v less.
    assert (plus > base + 0.1).all() and (minus < base - 0.1).all()
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # a random vector of the same length does not do it
        r = torch.randn(tiny_lm.hidden_size, generator=g)
        assert _margins(tiny_lm, layer, r / r.norm() * v.norm()).mean() < plus.mean()
    if layer == tiny_lm.num_layers - 1:
        # At the last layer the planted direction is known: the LM head's y+ minus y- rows.
        head = tiny_lm.model.get_output_embeddings().weight
        ids = tiny_lm.tokenizer.convert_tokens_to_ids
        planted = sum(head[ids(w)] for w in ("good", "happy", "nice")) - sum(
            head[ids(w)] for w in ("bad", "sad", "awful")
        )
        assert float(torch.cosine_similarity(v, planted.detach(), dim=0)) > 0.8


def test_norm_is_capped_and_fit_is_deterministic(tiny_lm):
    learner = get_learner("bipo", layers="2", epochs=1, batch_size=8, lr=0.5, max_norm=0.05)
    learner.prepare(tiny_lm)
    data = _planted([2], SUBJECTS[:4])
    a, b = learner.fit(data, {}), learner.fit(data, {})
    assert a.functions[2].vector.norm() == pytest.approx(0.05 * 5.0, rel=1e-4)  # max_norm x token norm
    assert torch.equal(a.functions[2].vector, b.functions[2].vector)


def test_pairs_within_prompts_unpaired_fallback_and_subset():
    pos = [("p0", "a"), ("p0", "b"), ("p1", "c")]
    neg = [("p0", "x"), ("p1", "y"), ("p1", "z")]
    pairs, paired = preference_pairs(_data([1], pos, neg, [0, 0, 1], [0, 1, 1]), 10)
    assert paired and pairs == [
        (("p0", "a"), ("p0", "x")),
        (("p0", "b"), ("p0", "x")),
        (("p1", "c"), ("p1", "y")),
        (("p1", "c"), ("p1", "z")),
    ]
    sub, _ = preference_pairs(_data([1], pos, neg, [0, 0, 1], [0, 1, 1]), 2, seed=3)
    again, _ = preference_pairs(_data([1], pos, neg, [0, 0, 1], [0, 1, 1]), 2, seed=3)
    assert len(sub) == 2 and sub == again and set(sub) <= set(pairs)
    unpaired, paired = preference_pairs(_data([1], pos, neg[:2], [0, 0, 1], [5, 6]), 10)
    assert not paired and unpaired == [(pos[0], neg[0]), (pos[1], neg[1]), (pos[2], neg[0])]
    with pytest.raises(SimsError, match="at least one positive"):
        preference_pairs(_data([1], pos, [], [0, 0, 1], []), 10)
    texts_missing = PreferenceActivations(
        [1], torch.zeros(1, 1, 1), torch.zeros(1, 1, 1), [0], [0], torch.ones(1)
    )
    with pytest.raises(SimsError, match='needs="texts"'):
        preference_pairs(texts_missing, 10)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("beta", 0.0),
        ("lr", -1.0),
        ("max_norm", float("nan")),
        ("lr", float("inf")),
        ("epochs", 0),
        ("batch_size", 2.5),
        ("max_pairs", True),
        ("max_response_tokens", 0),
    ],
)
def test_bad_options_are_one_line_errors(option, value):
    with pytest.raises(SimsError, match=option) as err:
        get_learner("bipo", **{option: value})
    assert "\n" not in str(err.value)


def test_needs_the_model_texts_and_a_token_norm(tiny_lm):
    learner = get_learner("bipo", layers="1")
    with pytest.raises(SimsError, match="needs the model"):
        learner.fit(_planted([1]), {})
    learner.prepare(tiny_lm)
    with pytest.raises(SimsError, match="token norm at layer 1"):
        learner.fit(_data([1], [("a", "good")], [("a", "bad")], [0], [0], norm=0.0), {})
    with pytest.raises(SimsError, match="at least one token"):
        learner.fit(_data([1], [("a", "")], [("a", "")], [0], [0]), {})


def test_center_layer_by_default_or_every_layer(tiny_lm):
    data = _planted([1, 2, 3], SUBJECTS[:2])
    one = get_learner("bipo", epochs=1)
    one.prepare(tiny_lm)
    assert one.fit(data, {}).layers == [2]
    every = get_learner("bipo", epochs=1, single_layer=False)
    every.prepare(tiny_lm)
    steering = every.fit(data, {})
    assert steering.layers == [1, 2, 3] and set(steering.metadata["relative_norm"]) == {"1", "2", "3"}


def test_strength_zero_and_save_load_round_trip(tiny_lm, tmp_path):
    learner = get_learner("bipo", layers="2", epochs=1, lr=0.05)
    learner.prepare(tiny_lm)
    steering = learner.fit(_planted([2], SUBJECTS[:3]), tiny_lm.fingerprint())
    ids, mask = left_pad([encode_prompt(tiny_lm.tokenizer, p) for p in ("the good day", "a cat")], 0)
    with torch.inference_mode():
        base = tiny_lm.model(input_ids=ids, attention_mask=mask).logits
        with steering.applied(tiny_lm.model):
            steered = tiny_lm.model(input_ids=ids, attention_mask=mask).logits
        with steering.applied(tiny_lm.model, strength=0.0):
            zero = tiny_lm.model(input_ids=ids, attention_mask=mask).logits
        loaded = Steering.load(steering.save(tmp_path / "bipo"))
        with loaded.applied(tiny_lm.model):
            again = tiny_lm.model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(base, zero) and not torch.allclose(base, steered) and torch.equal(steered, again)
    assert loaded.learner == "bipo" and loaded.layers == [2] and loaded.positions == "all"
    assert isinstance(loaded.functions[2], AddVector)
    assert torch.equal(loaded.functions[2].vector, steering.functions[2].vector)
    assert loaded.hyperparameters["beta"] == 0.1 and loaded.metadata["pairs"] == 12


def test_texts_are_collected_and_persist(tiny_lm, tmp_path):
    prompts = ["the day", "the day", "a cat «quoted»"]
    responses = ["is good", 'is "bad"\nand sad', ""]
    data, _ = collect_preference_activations(tiny_lm, "texts", prompts, responses, 1, [0, 0, 1], [1, 2])
    assert data.positive_texts == [("the day", "is good")]
    assert data.negative_texts == [("the day", 'is "bad"\nand sad'), ("a cat «quoted»", "")]
    assert data.positive.shape == (1, 2, tiny_lm.hidden_size) and data.positive_tokens is None
    save_preference_activations(tmp_path / "acts.safetensors", data, 3)
    loaded, n = load_preference_activations(tmp_path / "acts.safetensors")
    assert n == 3 and loaded.positive_texts == data.positive_texts
    assert loaded.negative_texts == data.negative_texts
    plain, _ = collect_preference_activations(tiny_lm, "summaries", prompts, responses, 1, [0, 0, 1], [1])
    assert plain.positive_texts is None


def test_loop_fits_from_texts_and_refit_from_saved_activations_is_identical(tiny_lm, tmp_path):
    from simsteer.generation.sampling import SamplingConfig
    from simsteer.loop.calibration import GuardConfig
    from simsteer.loop.sims import SIMS, SIMSConfig
    from simsteer.oracles import get_oracle

    config = SIMSConfig(
        iterations=1,
        prompts_per_iteration=3,
        samples_per_prompt=3,
        eval_prompts=0,
        sampling=SamplingConfig(max_new_tokens=5, batch_size=9),
        guard=GuardConfig(fluency_budget=None),
    )
    prompts = [f"the {w} day is {v}" for w in ("good", "bad", "cold") for v in ("happy", "sad")]
    learner = get_learner("bipo", layers="1-3", epochs=1, max_response_tokens=4)
    SIMS(tiny_lm, get_oracle("length:3"), learner, config, progress=False).fit(prompts, tmp_path / "run")
    data, _ = load_preference_activations(tmp_path / "run" / "iter_0" / "activations.safetensors")
    assert data.positive_texts is not None and len(data.positive_texts) == len(data.positive)
    refit = learner.fit(data, tiny_lm.fingerprint())  # what a resumed run would fit
    saved = Steering.load(tmp_path / "run" / "iter_1" / "steering")
    assert saved.learner == "bipo" and saved.layers == refit.layers == [2]
    assert torch.equal(saved.functions[2].vector, refit.functions[2].vector)


def test_sims_run_with_bipo_end_to_end(tmp_path, tiny_model_dir, capsys):
    from simsteer.cli.main import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "\n".join(["the good day", "a cat is happy", "I love the sun", "we walk home", "the cold rain"])
    )
    out = tmp_path / "run"
    argv = ["run", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--oracle", "length:3"]
    argv += ["--learner", "bipo", "-L", "epochs=1", "-L", "max_pairs=4", "--layers", "1-2", "--out", str(out)]
    assert main([*argv, *TINY_RUN]) == 0
    fitted = Steering.load(out / "iter_0" / "fitted")  # the fit, before the guard's strength
    assert fitted.learner == "bipo" and fitted.hyperparameters["max_pairs"] == 4
    assert fitted.layers == [2] and isinstance(fitted.functions[2], AddVector)
    assert fitted.metadata["pairs"] >= 1 and fitted.strength == 1.0


@pytest.mark.slow
def test_embedded_model_one_iteration(embedded_lm, tmp_path):
    from simsteer.generation.sampling import SamplingConfig
    from simsteer.loop.calibration import GuardConfig
    from simsteer.loop.sims import SIMS, SIMSConfig
    from simsteer.oracles import get_oracle

    scorer = tmp_path / "scorer.py"  # characters: sampled answers of 8 tokens rarely tie
    scorer.write_text("def score(prompt, response):\n    return float(len(response))\n")
    config = SIMSConfig(
        iterations=1,
        prompts_per_iteration=2,
        samples_per_prompt=2,
        eval_prompts=0,
        sampling=SamplingConfig(max_new_tokens=8, batch_size=4),
        guard=GuardConfig(fluency_budget=None),
    )
    learner = get_learner("bipo", epochs=1, max_pairs=1, batch_size=1, max_response_tokens=8)
    prompts = ["Describe a sunny day.", "Describe a rainy day.", "Tell me about cats."]
    oracle = get_oracle(f"python:{scorer}:score")
    result = SIMS(embedded_lm, oracle, learner, config, progress=False).fit(prompts, tmp_path / "run")
    assert not result.history[0].fit.carried_over  # sampling is seeded: the draw has D+ and D-
    steering = Steering.load(tmp_path / "run" / "iter_1" / "steering")
    layer = steering.layers[0]
    assert steering.learner == "bipo" and steering.layers == [embedded_lm.num_layers // 2]
    assert steering.metadata["pairs"] == 1 and steering.metadata["loss"][0] < math.log(2) + 1e-6
    assert 0 < steering.metadata["relative_norm"][str(layer)] <= 0.5 + 1e-6
    assert torch.isfinite(steering.functions[layer].vector).all()
