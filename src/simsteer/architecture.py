"""Where things are inside a transformers causal LM: the decoder-layer list, the module
that owns it, each layer's attention output projection, and the number of heads.

Every lookup walks known dotted attribute paths (repeng's approach) with one helper,
:func:`walk`; the layer list can also be named by the user (``layers_path``), and the
error for an unknown architecture says so.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .errors import SimsError

# Attribute paths of the decoder-layer list, tried in order.
LAYER_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3, OLMo, SmolLM
    "model.language_model.layers",  # multimodal wrappers (Gemma 3, Llava)
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
    "transformer.blocks",  # MPT
    "layers",  # a bare decoder
)

# Attribute paths, inside a decoder layer, of the attention output projection.
ATTN_OUT_PATHS = (
    "self_attn.o_proj",  # Llama, Mistral, Qwen, Gemma, SmolLM
    "attn.c_proj",  # GPT-2
    "attention.dense",  # GPT-NeoX
    "self_attention.dense",  # Falcon, Bloom
    "self_attn.out_proj",  # OPT
    "attn.out_proj",  # GPT-J, MPT
)

# Config fields that hold the number of query heads, by family.
HEAD_COUNT_FIELDS = ("num_attention_heads", "n_head", "num_heads")


def walk(root: Any, path: str) -> Any | None:
    """The object at dotted attribute ``path`` below ``root``, or ``None`` if a step is missing.

    Example:
        >>> walk(model, "model.layers")  # model.model.layers
    """
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_layers(model: nn.Module, path: str | None = None) -> nn.ModuleList:
    """The decoder layers of ``model``, found by known attribute paths.

    Args:
        model: a transformers causal LM (or a bare decoder).
        path: a dotted attribute path overriding the search (e.g. ``"model.layers"``).

    Example:
        >>> len(find_layers(lm.model))
        30
    """
    paths = (path,) if path else LAYER_PATHS
    for candidate in paths:
        obj = walk(model, candidate)
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    arch = type(model).__name__
    raise SimsError(
        f"unsupported architecture {arch}: no decoder layers at {', '.join(paths)} "
        "(pass layers_path='dotted.path.to.layers' to name them)"
    )


def decoder_module(model: nn.Module) -> nn.Module:
    """The module that owns the layer stack and receives the attention mask (the model
    without its LM head, so a forward through it never computes logits)."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def find_attn_output(layer: nn.Module) -> nn.Module:
    """The attention output projection of a decoder layer (its input holds the heads).

    Args:
        layer: one decoder layer (an element of :func:`find_layers`).
    """
    for candidate in ATTN_OUT_PATHS:
        obj = walk(layer, candidate)
        if isinstance(obj, nn.Module):
            return obj
    raise SimsError(
        f"no attention output projection in {type(layer).__name__} (looked for {', '.join(ATTN_OUT_PATHS)})"
    )


def num_attention_heads(model: nn.Module) -> int:
    """Query heads per layer, from the model config.

    Args:
        model: a transformers model (its ``config`` is read).
    """
    cfg = model.config
    for name in HEAD_COUNT_FIELDS:
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise SimsError(f"cannot tell the number of attention heads of {type(model).__name__}")
