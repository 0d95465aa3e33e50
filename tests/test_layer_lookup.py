"""Layer, attention-output and head lookup (simsteer.architecture) for every listed
family, on stand-in module trees and the tiny models."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from torch import nn

from simsteer.architecture import (
    ATTN_OUT_PATHS,
    LAYER_PATHS,
    decoder_module,
    find_attn_output,
    find_layers,
    num_attention_heads,
    walk,
)
from simsteer.errors import SimsError
from simsteer.models import load_model


def _tree(path: str, leaf: nn.Module) -> nn.Module:
    """A module tree holding ``leaf`` at dotted ``path``."""
    root = nn.Module()
    node = root
    parts = path.split(".")
    for part in parts[:-1]:
        child = nn.Module()
        setattr(node, part, child)
        node = child
    setattr(node, parts[-1], leaf)
    return root


def test_walk():
    leaf = nn.Linear(2, 2)
    root = _tree("a.b.c", leaf)
    assert walk(root, "a.b.c") is leaf
    assert walk(root, "a.x.c") is None and walk(root, "a.b.c.d") is None


@pytest.mark.parametrize("path", LAYER_PATHS)
def test_layers_found_at_every_known_path(path):
    layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
    assert find_layers(_tree(path, layers)) is layers


def test_layer_path_override_and_clear_error():
    layers = nn.ModuleList([nn.Linear(2, 2)])
    model = _tree("backbone.blocks", layers)
    with pytest.raises(SimsError, match=r"unsupported architecture Module.*layers_path="):
        find_layers(model)
    assert find_layers(model, "backbone.blocks") is layers
    # An empty list is no layer stack.
    with pytest.raises(SimsError, match=r"no decoder layers at model\.layers"):
        find_layers(_tree("model.layers", nn.ModuleList()), "model.layers")


@pytest.mark.parametrize("path", ATTN_OUT_PATHS)
def test_attention_output_found_at_every_known_path(path):
    proj = nn.Linear(2, 2)
    assert find_attn_output(_tree(path, proj)) is proj


def test_attention_output_missing_is_clear():
    with pytest.raises(SimsError, match="no attention output projection in Linear"):
        find_attn_output(nn.Linear(2, 2))


@pytest.mark.parametrize("field", ["num_attention_heads", "n_head", "num_heads"])
def test_head_count_from_each_config_field(field):
    model = nn.Module()
    model.config = SimpleNamespace(**{field: 6})
    assert num_attention_heads(model) == 6
    model.config = SimpleNamespace(hidden_size=8)
    with pytest.raises(SimsError, match="number of attention heads"):
        num_attention_heads(model)


def test_tiny_llama_and_gpt2(tiny_lm, tiny_gpt2_dir):
    llama = tiny_lm.model
    assert find_layers(llama) is llama.model.layers
    assert find_attn_output(llama.model.layers[0]) is llama.model.layers[0].self_attn.o_proj
    assert num_attention_heads(llama) == 4
    assert decoder_module(llama) is llama.model
    gpt2 = load_model(str(tiny_gpt2_dir), device="cpu", dtype="fp32").model
    assert find_layers(gpt2) is gpt2.transformer.h
    assert find_attn_output(gpt2.transformer.h[0]) is gpt2.transformer.h[0].attn.c_proj
    assert num_attention_heads(gpt2) == 4
    assert decoder_module(gpt2) is gpt2.transformer
    # A bare decoder is its own decoder module.
    assert decoder_module(llama.model) is llama.model
