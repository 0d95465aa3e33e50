from __future__ import annotations

import pytest
import torch

from simsteer.errors import SimsError
from simsteer.models import find_layers, load_model, parse_layers
from simsteer.tokens import PLAIN_FORMAT, format_prompt


def test_layers_found_for_llama_and_gpt2(tiny_lm, tiny_gpt2_dir):
    assert tiny_lm.num_layers == 4
    gpt2 = load_model(str(tiny_gpt2_dir), device="cpu", dtype="fp32")
    assert gpt2.num_layers == 3
    assert gpt2.fingerprint()["architecture"] == "GPT2LMHeadModel"
    # No chat template: the documented plain format is used.
    assert format_prompt(gpt2.tokenizer, "hi") == PLAIN_FORMAT.format(prompt="hi")
    assert tiny_lm.tokenizer.padding_side == "left"
    assert not any(p.requires_grad for p in tiny_lm.model.parameters())


def test_unknown_architecture_is_clear(tmp_path):
    from transformers import MambaConfig, MambaForCausalLM

    model = MambaForCausalLM(MambaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, state_size=4))
    with pytest.raises(SimsError, match="unsupported architecture MambaForCausalLM"):
        find_layers(model)
    assert len(find_layers(model, "backbone.layers")) == 2  # the override works


def test_dtype_and_missing_model(tiny_model_dir, tmp_path):
    lm = load_model(str(tiny_model_dir), device="cpu", dtype="bf16")
    assert lm.dtype == torch.bfloat16
    with pytest.raises(SimsError, match="unknown dtype"):
        load_model(str(tiny_model_dir), device="cpu", dtype="fp8")
    with pytest.raises(SimsError, match="not found"):
        load_model(str(tmp_path / "nothing.gguf"))
    with pytest.raises(SimsError, match="not found"):
        load_model(str(tmp_path / "no" / "such" / "dir"))


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("all", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
        ("middle", [3, 4, 5, 6]),
        ("2-4", [2, 3, 4]),
        ("1,3,-1", [1, 3, 9]),
        ([0, 2], [0, 2]),
    ],
)
def test_parse_layers(spec, expected):
    assert parse_layers(spec, 10) == expected


@pytest.mark.parametrize("spec", ["12", "a-b", "3,x"])
def test_parse_layers_errors(spec):
    with pytest.raises(SimsError):
        parse_layers(spec, 10)
