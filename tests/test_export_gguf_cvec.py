"""The gguf-cvec export: llama.cpp's file layout and layer numbering, metadata, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from simsteer.errors import SimsError
from simsteer.export.gguf_cvec import (
    ARCHITECTURE,
    control_vector_buffer,
    read_gguf_cvec,
    read_gguf_cvec_metadata,
    write_gguf_cvec,
)
from simsteer.functions import AddVector
from simsteer.policy import Policy
from simsteer.steering import Steering


def _caa(lm, layers, strength=0.5, seed=0, learner="caa", positions="all") -> Steering:
    g = torch.Generator().manual_seed(seed)
    functions = {layer: AddVector(torch.randn(lm.hidden_size, generator=g)) for layer in layers}
    return Steering(functions, learner, lm.fingerprint(), positions=positions, strength=strength)


def test_round_trip_keeps_vectors_and_names_the_model(tiny_lm, tmp_path):
    policy = Policy((_caa(tiny_lm, [1, 2], 0.5), _caa(tiny_lm, [2, 3], 2.0, seed=1, learner="actadd")))
    out = write_gguf_cvec(policy, tiny_lm, tmp_path / "steer.gguf")
    back = read_gguf_cvec(out)
    expected = policy.additive_vectors()
    assert list(back) == [1, 2, 3]
    for layer, vector in expected.items():
        torch.testing.assert_close(back[layer], vector)
    meta = read_gguf_cvec_metadata(out)
    assert meta["general.architecture"] == ARCHITECTURE == "controlvector"
    assert meta["controlvector.layer_count"] == 3
    assert meta["controlvector.model_hint"] == "llama"
    assert meta["simsteer.method"] == "caa+actadd"
    assert meta["simsteer.strength"] == [0.5, 2.0]
    assert meta["simsteer.model.source"] == tiny_lm.source
    assert json.loads(meta["simsteer.model.fingerprint"]) == tiny_lm.fingerprint()
    assert "output of decoder layer" in meta["simsteer.hook_site"]
    assert [p.name for p in tmp_path.iterdir()] == ["steer.gguf"]  # no temporary left


def test_write_replaces_a_previous_file(tiny_lm, tmp_path):
    out = tmp_path / "steer.gguf"
    write_gguf_cvec(Policy((_caa(tiny_lm, [1]),)), tiny_lm, out)
    write_gguf_cvec(Policy((_caa(tiny_lm, [3], seed=4),)), tiny_lm, out)
    assert list(read_gguf_cvec(out)) == [3]


@pytest.mark.parametrize(
    ("policy", "words"),
    [
        (lambda lm: Policy((_caa(lm, [1], positions="prompt"),)), "positions"),
        (lambda lm: Policy((_caa(lm, [0, 1]),)), "layer 0"),
        (lambda lm: Policy(), "unsteered"),
    ],
)
def test_policies_llama_cpp_cannot_hold_are_refused_in_one_line(tiny_lm, tmp_path, policy, words):
    with pytest.raises(SimsError) as err:
        write_gguf_cvec(policy(tiny_lm), tiny_lm, tmp_path / "x.gguf")
    assert words in str(err.value) and "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())


def test_buffer_follows_llama_cpp_layout():
    a, b = torch.arange(4.0), -torch.arange(4.0) - 1
    data, start, end = control_vector_buffer({3: b, 1: a}, num_layers=5, hidden_size=4)
    # no row for layer 0: layer n starts at n_embd * (n - 1), the buffer covers 1..n_layer-1
    assert data.dtype == np.float32 and data.shape == (16,)
    np.testing.assert_array_equal(data[0:4], a.numpy())
    np.testing.assert_array_equal(data[4:8], 0)
    np.testing.assert_array_equal(data[8:12], b.numpy())
    assert (start, end) == (1, 3)
    assert control_vector_buffer({}, 5, 4)[1:] == (-1, -1)
    data, start, end = control_vector_buffer({4: a}, 5, 4)  # the last layer fits
    assert (start, end) == (4, 4) and data[12:].tolist() == a.tolist()
    for bad in ({0: a}, {5: a}, {2: torch.zeros(3)}):
        with pytest.raises(SimsError):
            control_vector_buffer(bad, 5, 4)


def test_reader_refuses_what_llama_cpp_refuses(tmp_path):
    import gguf

    for name, values in (("direction.0", np.ones(4, np.float32)), ("bias.3", np.ones(4, np.float32))):
        path = tmp_path / f"{name}.gguf"
        writer = gguf.GGUFWriter(path, ARCHITECTURE)
        writer.add_tensor(name, values)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with pytest.raises(SimsError, match="direction"):
            read_gguf_cvec(path)
    with pytest.raises(SimsError, match="not found"):
        read_gguf_cvec(tmp_path / "missing.gguf")


@pytest.mark.slow
def test_load_gguf_cvec_steers_a_llama_cpp_python_model_like_torch(embedded_lm, tmp_path):
    """`load_gguf_cvec` on llama-cpp-python's own `Llama`: the exported CAA policy moves the
    next-token logits the way the torch hooks move them; strength 0 and `None` give back the
    unsteered logits exactly."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from pathlib import Path

    from simsteer.export import load_gguf_cvec
    from simsteer.models import embedded_gguf_path
    from simsteer.policy import load_policy

    policy = load_policy(Path(__file__).parent / "fixtures" / "smollm2_caa")
    path = write_gguf_cvec(policy, embedded_lm, tmp_path / "tone.gguf")
    ids = embedded_lm.tokenizer("Describe a rainy Monday morning at work.")["input_ids"]
    llm = llama_cpp.Llama(model_path=str(embedded_gguf_path()), n_ctx=128, logits_all=True, verbose=False)

    def llama_logits() -> np.ndarray:
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)

    def torch_logits(steered: bool) -> np.ndarray:
        with torch.no_grad():
            if steered:
                with policy.applied(embedded_lm.model):
                    out = embedded_lm.model(torch.tensor([ids])).logits[0, -1]
            else:
                out = embedded_lm.model(torch.tensor([ids])).logits[0, -1]
        return out.double().numpy()

    base = llama_logits()
    vectors = load_gguf_cvec(llm, path)
    assert sorted(vectors) == sorted(policy.additive_vectors())
    steered = llama_logits()
    assert np.abs(steered - base).max() > 0.1
    torch_shift = torch_logits(True) - torch_logits(False)
    assert np.corrcoef(steered - base, torch_shift)[0, 1] > 0.8  # the same edit, other arithmetic
    half = load_gguf_cvec(llm, path, strength=0.5)
    assert all(torch.allclose(half[k], 0.5 * vectors[k]) for k in vectors)
    assert np.abs(llama_logits() - base).max() < np.abs(steered - base).max()
    load_gguf_cvec(llm, path, strength=0.0)
    np.testing.assert_allclose(llama_logits(), base, atol=1e-4)
    assert load_gguf_cvec(llm, None) == {}
    np.testing.assert_allclose(llama_logits(), base, atol=1e-4)
    with pytest.raises(SimsError, match="finite"):
        load_gguf_cvec(llm, path, strength=float("nan"))
