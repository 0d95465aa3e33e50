"""The ``gguf-cvec`` export: an additive policy as a llama.cpp control-vector file.

llama.cpp's layer numbering, read from its own sources (ggml-org/llama.cpp), not from
other exporters (which disagree with each other):

- ``common/common.cpp`` (``common_control_vector_load_one``): a file holds F32 1-D
  tensors named ``direction.<n>`` (all of one width); ``n`` must parse as an integer and
  be >= 1 (``direction.0`` is refused as invalid); tensors naming the same ``n`` are
  summed, each times the file's load strength. The loaded buffer keeps no row for layer
  0: ``n``'s row starts at float ``n_embd * (n - 1)``. The CLI then applies it over
  ``il_start = 1`` to ``il_end = n_layer`` unless told otherwise.
- ``src/llama-adapter.cpp`` (``llama_adapter_cvec``): one tensor per layer ``il`` in
  ``[1, n_layer)`` (``tensors[0]`` is always null), filled from ``data + n_embd * (il -
  1)`` when the buffer is long enough; ``apply_to(cur, il)`` adds ``tensors[il]`` when
  ``il_start <= il <= il_end`` (both inclusive).
- ``src/models/llama.cpp`` (and every other decoder graph, via
  ``llm_graph_context::build_cvec`` in ``src/llama-graph.cpp``): inside ``for il in
  0..n_layer-1`` the layer ends ``cur = ffn_out + ffn_inp`` (the MLP's residual add),
  then ``cur = build_cvec(cur, il)``, named ``l_out``, which is the next layer's input.

So ``direction.<n>`` is added to the output of 0-based decoder layer ``n``, exactly
simsteer's residual site of layer ``n`` (the decoder layer's output), and layers
``1..n_layer-1`` can be held; simsteer layer 0 cannot (refused in one line).

Besides llama.cpp's own keys (``general.architecture = "controlvector"``,
``controlvector.model_hint``, ``controlvector.layer_count``, as its cvector-generator
writes them) the file names the model, the method, the strength and the hook site under
``simsteer.*`` keys, which llama.cpp ignores.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import SimsError
from ..io import fsync_dir, temporary_sibling
from ..models import LoadedModel
from ..policy import Policy

__all__ = [
    "ARCHITECTURE",
    "HOOK_SITE",
    "control_vector_buffer",
    "load_gguf_cvec",
    "read_gguf_cvec",
    "read_gguf_cvec_metadata",
    "write_gguf_cvec",
]

#: ``general.architecture`` of a control-vector file (llama.cpp's cvector-generator).
ARCHITECTURE = "controlvector"
#: Where the vectors apply, in the file's metadata.
HOOK_SITE = "residual: output of decoder layer n (after its MLP residual add), every position"
_PREFIX = "direction."


def _check_layers(layers: list[int], num_layers: int) -> None:
    if 0 in layers:
        raise SimsError(
            "layer 0 cannot be exported as a llama.cpp control vector: llama.cpp keeps no "
            "vector for the first layer's output (its loader refuses direction.0); steer layers >= 1"
        )
    bad = [layer for layer in layers if not 0 < layer < num_layers]
    if bad:
        raise SimsError(f"layer {bad[0]} is out of range for a {num_layers}-layer model")


def control_vector_buffer(
    vectors: dict[int, torch.Tensor], num_layers: int, hidden_size: int
) -> tuple[np.ndarray, int, int]:
    """The buffer and layer range for ``llama_set_adapter_cvec`` (formerly
    ``llama_apply_adapter_cvec``), laid out as llama.cpp's loader lays out a file.

    Args:
        vectors: simsteer layer -> vector added to that layer's output (llama.cpp ``il``).
        num_layers: the model's decoder layers (``n_layer``).
        hidden_size: the model's width (``n_embd``).

    Returns:
        ``(data, il_start, il_end)``: float32 ``data`` of ``hidden_size * (num_layers - 1)``
        values, layer ``il``'s row at ``hidden_size * (il - 1)``, zero rows for layers
        without a vector; the inclusive range of the steered layers (``-1, -1`` when
        there are none, which llama.cpp treats as "no control vector").
    """
    layers = sorted(int(layer) for layer in vectors)
    _check_layers(layers, num_layers)
    data = np.zeros(hidden_size * (num_layers - 1), dtype=np.float32)
    for layer in layers:
        vector = vectors[layer].detach().float().reshape(-1)
        if vector.numel() != hidden_size:
            raise SimsError(
                f"the vector of layer {layer} has {vector.numel()} values; the model's width is {hidden_size}"
            )
        data[hidden_size * (layer - 1) : hidden_size * layer] = vector.cpu().numpy()
    if not layers:
        return data, -1, -1
    return data, layers[0], layers[-1]


def _metadata(policy: Policy, lm: LoadedModel) -> dict[str, Any]:
    from .._version import __version__

    return {
        "simsteer.version": __version__,
        "simsteer.model.source": str(lm.source),
        "simsteer.model.fingerprint": json.dumps(lm.fingerprint(), sort_keys=True),
        "simsteer.method": "+".join(s.learner for s in policy),
        "simsteer.strength": [float(s.strength) for s in policy],
        "simsteer.hook_site": HOOK_SITE,
    }


def write_gguf_cvec(policy: Policy, lm: LoadedModel, out: Path) -> Path:
    """Write ``policy`` (learned on ``lm``) as a llama.cpp control-vector GGUF file.

    The vectors already include each steering's strength, so the file runs as learned
    at llama.cpp's default scale 1 (``--control-vector FILE``). The file is written to a
    temporary sibling and renamed into place, so ``out`` is never half-written.

    Args:
        policy: an additive policy (:meth:`simsteer.policy.Policy.additive_vectors`).
        lm: the model it was learned on (names the model in the metadata).
        out: the file to write (replaced if it exists).

    Returns:
        ``out``.
    """
    import gguf

    out = Path(out)
    vectors = policy.additive_vectors()
    if not vectors:
        raise SimsError("the policy is the unsteered model: nothing to export")
    _check_layers(list(vectors), lm.num_layers)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(out)
    try:
        writer = gguf.GGUFWriter(tmp, ARCHITECTURE)
        writer.add_string(f"{ARCHITECTURE}.model_hint", str(lm.model.config.model_type))
        writer.add_int32(f"{ARCHITECTURE}.layer_count", len(vectors))
        for key, value in _metadata(policy, lm).items():
            if isinstance(value, list):
                writer.add_array(key, value)
            else:
                writer.add_string(key, value)
        for layer, vector in vectors.items():
            writer.add_tensor(f"{_PREFIX}{layer}", vector.detach().float().cpu().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _reader(path: str | Path):
    import gguf

    path = Path(path)
    if not path.is_file():
        raise SimsError(f"control-vector file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise SimsError(f"{path} is not a GGUF file: {exc}") from None


def read_gguf_cvec(path: str | Path) -> dict[int, torch.Tensor]:
    """The vectors of a control-vector GGUF file, read as llama.cpp's loader reads them.

    Tensors must be ``direction.<n>`` with ``n >= 1``, F32, 1-D and all of one width;
    tensors naming the same layer are summed (load strength 1).

    Args:
        path: the ``.gguf`` file.

    Returns:
        layer ``n`` -> float32 vector added to the output of decoder layer ``n``.
    """
    import gguf

    vectors: dict[int, torch.Tensor] = {}
    width = None
    for tensor in _reader(path).tensors:
        name = tensor.name
        head, _, tail = name.partition(".")
        layer = int(tail) if head == "direction" and tail.lstrip("-").isdigit() else -1
        if layer < 1:
            raise SimsError(f"{path}: tensor {name!r} is not direction.<layer> with layer >= 1")
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32 or len(tensor.shape) != 1:
            raise SimsError(f"{path}: tensor {name!r} is not a 1-D float32 vector")
        values = torch.from_numpy(np.array(tensor.data, dtype=np.float32).reshape(-1))
        if width is not None and values.numel() != width:
            raise SimsError(f"{path}: tensor {name!r} has {values.numel()} values, the others {width}")
        width = values.numel()
        vectors[layer] = vectors[layer] + values if layer in vectors else values
    return dict(sorted(vectors.items()))


def read_gguf_cvec_metadata(path: str | Path) -> dict[str, Any]:
    """The key/value metadata of a GGUF file (strings, numbers and arrays of them),
    without the ``GGUF.*`` header fields."""
    out: dict[str, Any] = {}
    for key, field in _reader(path).fields.items():
        if key.startswith("GGUF."):
            continue
        out[key] = field.contents()
    return out


def load_gguf_cvec(llama: Any, path: str | Path | None, strength: float = 1.0) -> dict[int, torch.Tensor]:
    """Set a control-vector file on a llama-cpp-python ``Llama``, as ``llama-cli
    --control-vector-scaled FILE STRENGTH`` does (llama-cpp-python has no call for it).

    The vectors are read as llama.cpp's loader reads them (:func:`read_gguf_cvec`), times
    ``strength``, and set on the ``Llama``'s context over the layers they name; the
    ``Llama``'s cached prompt is dropped, so the next call decodes with the new vector.

    Args:
        llama: a ``llama_cpp.Llama`` of the model the file was exported from.
        path: the ``.gguf`` control-vector file (``sims export --format gguf-cvec``), or
            ``None`` to clear the control vector.
        strength: multiplier on the file's vectors (1: as exported, 0.5: half).

    Returns:
        layer -> the vector now added to that layer's output (empty when cleared).

    Example:
        >>> from llama_cpp import Llama
        >>> llm = Llama(model_path="SmolLM2-135M-Instruct.gguf", verbose=False)
        >>> load_gguf_cvec(llm, "tone.gguf", strength=1.0)
        >>> llm.create_chat_completion([{"role": "user", "content": "Describe a power cut."}])
    """
    import ctypes

    import llama_cpp

    if not np.isfinite(strength):
        raise SimsError(f"strength must be a finite number, got {strength}")
    num_layers = int(llama_cpp.llama_model_n_layer(llama.model))
    hidden_size = int(llama_cpp.llama_model_n_embd(llama.model))
    vectors = {} if path is None else {k: v * float(strength) for k, v in read_gguf_cvec(path).items()}
    data, start, end = control_vector_buffer(vectors, num_layers, hidden_size)
    pointer = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float)) if start > 0 else None
    if llama_cpp.llama_set_adapter_cvec(llama.ctx, pointer, data.size, hidden_size, start, end) != 0:
        raise SimsError(f"llama.cpp refused the control vector {path} for this model")
    llama.reset()  # the cached prompt was decoded with the previous vector
    return vectors
