"""The steering engine: exact identity at zero, hook removal, and where edits land,
token by token, with left padding."""

from __future__ import annotations

import pytest
import torch

from simsteer.architecture import find_attn_output
from simsteer.errors import SimsError
from simsteer.functions import AddVector
from simsteer.hooks import Edit, count_hooks, record, steer
from simsteer.steering import Steering
from simsteer.tokens import encode_prompt, left_pad

PROMPTS = ["the good day is very happy and warm", "a cat"]


def _inputs(lm):
    ids = [encode_prompt(lm.tokenizer, p) for p in PROMPTS]
    return left_pad(ids, lm.tokenizer.pad_token_id)


def _steering(lm, scale: float, layers=(1, 2)) -> Steering:
    torch.manual_seed(3)
    fns = {i: AddVector(scale * torch.randn(lm.hidden_size)) for i in layers}
    return Steering(fns, "caa", lm.fingerprint())


def test_zero_steering_reproduces_unsteered_output_exactly(tiny_lm):
    ids, mask = _inputs(tiny_lm)
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=tiny_lm.tokenizer.pad_token_id)
    with torch.inference_mode():
        base_logits = tiny_lm.model(input_ids=ids, attention_mask=mask).logits
        base_tokens = tiny_lm.model.generate(input_ids=ids, attention_mask=mask, **gen)
        with _steering(tiny_lm, 0.0).applied(tiny_lm.model):
            zero_logits = tiny_lm.model(input_ids=ids, attention_mask=mask).logits
            zero_tokens = tiny_lm.model.generate(input_ids=ids, attention_mask=mask, **gen)
        with _steering(tiny_lm, 1.0).applied(tiny_lm.model, strength=0.0):
            strength0 = tiny_lm.model(input_ids=ids, attention_mask=mask).logits
        with _steering(tiny_lm, 1.0).applied(tiny_lm.model):
            steered = tiny_lm.model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(base_logits, zero_logits)
    assert torch.equal(base_logits, strength0)
    assert torch.equal(base_tokens, zero_tokens)
    assert not torch.allclose(base_logits, steered)


def test_hooks_removed_after_block_and_after_exception(tiny_lm):
    before = count_hooks(tiny_lm.model)
    with _steering(tiny_lm, 1.0).applied(tiny_lm.model):
        assert count_hooks(tiny_lm.model) == before + 3  # 2 layers + the position tracker
    assert count_hooks(tiny_lm.model) == before
    with pytest.raises(RuntimeError, match="boom"), _steering(tiny_lm, 1.0).applied(tiny_lm.model):
        raise RuntimeError("boom")
    assert count_hooks(tiny_lm.model) == before

    def failing(h):
        raise ValueError("edit failed")

    ids, mask = _inputs(tiny_lm)
    with pytest.raises(ValueError, match="edit failed"), steer(tiny_lm.model, {0: failing}):
        tiny_lm.model(input_ids=ids, attention_mask=mask)
    assert count_hooks(tiny_lm.model) == before
    with pytest.raises(SimsError, match="do not exist"), steer(tiny_lm.model, {99: failing}):
        pass
    assert count_hooks(tiny_lm.model) == before


def test_hidden_states_output_sees_the_edit(tiny_lm):
    ids, mask = _inputs(tiny_lm)
    delta = torch.full((tiny_lm.hidden_size,), 0.5)
    with torch.inference_mode():
        base = tiny_lm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        with steer(tiny_lm.model, {1: lambda h: h + delta}):
            out = tiny_lm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    real = mask.bool()
    diff = out.hidden_states[2] - base.hidden_states[2]
    assert torch.allclose(diff[real], delta.expand_as(diff[real]))
    assert torch.equal(out.hidden_states[1], base.hidden_states[1])  # earlier layer untouched
    assert torch.equal(diff[~real], torch.zeros_like(diff[~real]))  # padding never steered


def _edited_masks(lm, positions, generate=True, prompt_end=None):
    """Per forward, which [batch, seq] positions the layer-1 edit changed."""
    ids, mask = _inputs(lm)
    seen: list[torch.Tensor] = []
    inputs: list[torch.Tensor] = []

    def edit(h):
        inputs.append(h.clone())
        return h + 1.0

    with (
        torch.inference_mode(),
        record(lm.model, [1]) as acts,
        steer(lm.model, {1: edit}, positions=positions, prompt_end=prompt_end),
    ):
        if generate:
            lm.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=4,
                min_new_tokens=4,
                do_sample=False,
                pad_token_id=lm.tokenizer.pad_token_id,
            )
        else:
            lm.model(input_ids=ids, attention_mask=mask)
    for before, after in zip(inputs, acts[1], strict=True):
        seen.append((after - before).abs().sum(-1) > 0)
    return mask.bool(), seen


@pytest.mark.parametrize("positions", ["all", "prompt", "generated", "last"])
def test_positions_during_generation_token_by_token(tiny_lm, positions):
    prompt_mask, forwards = _edited_masks(tiny_lm, positions)
    assert len(forwards) == 4  # the prefill and three single-token decoding steps
    prefill, steps = forwards[0], forwards[1:]
    assert prefill.shape == prompt_mask.shape
    assert prompt_mask[1, 0].item() is False  # the short prompt is left-padded
    last_only = torch.zeros_like(prompt_mask)
    last_only[:, -1] = True
    expected_prefill = {
        "all": prompt_mask,
        "prompt": prompt_mask,
        "generated": torch.zeros_like(prompt_mask),
        "last": last_only,
    }[positions]
    assert torch.equal(prefill, expected_prefill)
    for step in steps:
        assert step.shape == (2, 1)
        assert bool(step.all()) is (positions != "prompt")
        assert bool(step.any()) is (positions != "prompt")


@pytest.mark.parametrize("positions", ["all", "prompt", "generated", "last"])
def test_positions_teacher_forced_with_prompt_end(tiny_lm, positions):
    ids, _mask = _inputs(tiny_lm)
    width = ids.shape[1]
    # Pretend the last two tokens of each row are the response.
    prompt_end = torch.tensor([width - 2, width - 2])
    prompt_mask, (seen,) = _edited_masks(tiny_lm, positions, generate=False, prompt_end=prompt_end)
    cols = torch.arange(width).view(1, -1)
    response = (cols >= prompt_end.view(-1, 1)).expand(2, width)
    last = torch.zeros_like(prompt_mask)
    last[:, -1] = True
    expected = {
        "all": prompt_mask,
        "prompt": prompt_mask & ~response,
        "generated": prompt_mask & response,
        "last": last,
    }[positions]
    assert torch.equal(seen, expected)


def test_unknown_positions_rejected(tiny_lm):
    with pytest.raises(SimsError, match="unknown positions"):
        _steering(tiny_lm, 1.0).applied(tiny_lm.model, positions="middle").__enter__()


def _o_proj_inputs_and_layer_outputs(lm, edits):
    """o_proj's input and the decoder layer's output at layer 1, under ``edits``."""
    ids, mask = _inputs(lm)
    seen: dict[str, torch.Tensor] = {}
    o_proj = find_attn_output(lm.layers[1])
    handles = [
        o_proj.register_forward_hook(lambda m, args, out: seen.__setitem__("heads", args[0])),
        lm.layers[1].register_forward_hook(
            lambda m, args, out: seen.__setitem__("layer", out[0] if isinstance(out, tuple) else out)
        ),
    ]
    try:
        with torch.inference_mode(), steer(lm.model, edits):
            lm.model(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    return seen["heads"], seen["layer"], mask.bool()


def test_an_edit_states_its_site_as_data(tiny_lm):
    width = find_attn_output(tiny_lm.layers[1]).in_features
    delta = torch.full((width,), 0.25)
    base_heads, base_layer, real = _o_proj_inputs_and_layer_outputs(tiny_lm, {})
    heads, layer, _ = _o_proj_inputs_and_layer_outputs(
        tiny_lm, {1: Edit(lambda h: h + delta, site="attn_heads")}
    )
    # The attn_heads edit lands on o_proj's input (padding untouched), not on the layer output.
    assert torch.allclose((heads - base_heads)[real], delta.expand(int(real.sum()), -1))
    assert torch.equal(heads[~real], base_heads[~real])
    assert not torch.allclose(layer, base_layer)
    # A plain function is a residual edit, whatever attributes it carries.
    plain = lambda h: h + 0.5  # noqa: E731
    plain.site = "attn_heads"  # type: ignore[attr-defined]
    heads, layer, _ = _o_proj_inputs_and_layer_outputs(tiny_lm, {1: plain})
    assert torch.equal(heads, base_heads)
    assert torch.allclose((layer - base_layer)[real], torch.full_like(layer[real], 0.5))
    assert Edit(plain).site == "residual"
    with pytest.raises(SimsError, match="unknown steering site"):
        Edit(plain, site="mlp")
