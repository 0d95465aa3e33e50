"""The ``hf-bias`` export: a model folder that plain transformers loads, whose logits are
the hooked model's, with existing biases kept and non-additive policies refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from simsteer.errors import SimsError
from simsteer.export import FORMATS, check_target, export_policy, output_size
from simsteer.export.hf_bias import MANIFEST_NAME, SUPPORTED_MODEL_TYPES, read_manifest, write_hf_bias
from simsteer.functions import HPR_MLP_NAMES, AddVector, HouseholderRotation
from simsteer.models import load_model
from simsteer.policy import Policy
from simsteer.steering import Steering

from .conftest import build_tokenizer, tiny_decoder_shape

PROMPTS = ["the good day", "a cat is very happy and we walk home", "I love the sun ."]


def _caa(lm, layers, seed: int, strength: float = 1.0, positions: str = "all") -> Steering:
    gen = torch.Generator().manual_seed(seed)
    fns = {i: AddVector(torch.randn(lm.hidden_size, generator=gen)) for i in layers}
    return Steering(fns, "caa", lm.fingerprint(), positions=positions, strength=strength)


def _hpr(lm) -> HouseholderRotation:
    # Only its kind matters here: an export refuses it before looking inside.
    return HouseholderRotation(torch.randn(lm.hidden_size), {n: torch.zeros(1) for n in HPR_MLP_NAMES})


def _policy(lm) -> Policy:
    # A stack of two steerings sharing layer 1, the last layer included.
    return Policy((_caa(lm, (1, 3), seed=1, strength=0.7), _caa(lm, (1, 2), seed=2, strength=1.5)))


def _ids(lm) -> list[torch.Tensor]:
    return [lm.tokenizer(p, return_tensors="pt")["input_ids"] for p in PROMPTS]


def _logits(model, ids: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(x).logits for x in ids]


def _biased_llama(path: Path) -> Path:
    """A tiny Llama whose MLP projections already have nonzero biases."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    torch.manual_seed(3)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=3, mlp_bias=True, **tiny_decoder_shape(tok)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.5)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# Runs in a fresh interpreter: stock transformers only, and it checks that nothing
# imported simsteer on the way.
RELOAD = """
import sys, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, data, result = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(folder).eval()
tok = AutoTokenizer.from_pretrained(folder)
ids = load_file(data)
with torch.no_grad():
    out = {k: model(v).logits.contiguous() for k, v in ids.items()}
chat = tok.apply_chat_template([{"role": "user", "content": "the good day"}], add_generation_prompt=True,
                               tokenize=False)
assert chat.endswith("<|assistant|> "), chat
assert model.config.mlp_bias is True
assert model.generation_config.eos_token_id == tok.eos_token_id
assert not [m for m in sys.modules if m.split(".")[0] == "simsteer"], "simsteer was imported"
save_file(out, result)
"""


def test_reloaded_in_plain_transformers_matches_the_hooked_model(tiny_lm, tmp_path):
    policy = _policy(tiny_lm)
    ids = _ids(tiny_lm)
    with policy.applied(tiny_lm.model):
        steered = _logits(tiny_lm.model, ids)
    base = _logits(tiny_lm.model, ids)
    out = export_policy(policy, tiny_lm, "hf-bias", tmp_path / "export")
    assert out == tmp_path / "export"
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
        MANIFEST_NAME,
    } <= {p.name for p in out.iterdir()}
    save_file({f"p{i}": x.contiguous() for i, x in enumerate(ids)}, tmp_path / "ids.safetensors")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", RELOAD, str(out), str(tmp_path / "ids.safetensors"), str(tmp_path / "got.st")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    got = load_file(tmp_path / "got.st")
    for i in range(len(ids)):
        assert torch.allclose(got[f"p{i}"], steered[i], atol=1e-4, rtol=0), i
        assert (got[f"p{i}"] - base[i]).abs().max() > 0.1  # the steering is really in there
    # The source model is untouched: its own logits are still the unsteered ones.
    assert all(torch.equal(a, b) for a, b in zip(_logits(tiny_lm.model, ids), base, strict=True))


def test_manifest_and_file_modes(tiny_lm, tmp_path):
    policy = _policy(tiny_lm)
    out = write_hf_bias(policy, tiny_lm, tmp_path / "export")
    info = read_manifest(out)
    assert info["format"] == "hf-bias" and info["source_model"] == tiny_lm.source
    assert info["layers"] == [1, 2, 3]
    assert [s["strength"] for s in info["steerings"]] == [0.7, 1.5]
    assert info["dtype"] == "float32"
    expected = (policy.additive_vectors()[1]).norm().item()
    assert info["vector_norms"]["1"] == pytest.approx(expected, rel=1e-5)
    config = json.loads((out / "config.json").read_text())
    assert config["mlp_bias"] is True and config["model_type"] == "llama"
    assert all(p.stat().st_mode & 0o044 for p in out.iterdir())  # readable by a server's user
    assert output_size(out) == sum(p.stat().st_size for p in out.iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staged leftovers


def test_existing_biases_are_kept_and_the_vector_added(tmp_path):
    from transformers import AutoModelForCausalLM

    lm = load_model(str(_biased_llama(tmp_path / "biased")), device="cpu", dtype="fp32")
    steering = _caa(lm, (0, 2), seed=4, strength=0.5)
    policy = Policy(steering)
    ids = _ids(lm)
    with policy.applied(lm.model):
        steered = _logits(lm.model, ids)
    out = write_hf_bias(policy, lm, tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    for i, (old, new) in enumerate(zip(lm.layers, reloaded.model.layers, strict=True)):
        added = steering.functions[i].vector * 0.5 if i in steering.functions else 0.0
        assert torch.allclose(new.mlp.down_proj.bias, old.mlp.down_proj.bias + added, atol=1e-6)
        assert old.mlp.down_proj.bias.abs().min() > 0  # a real bias, kept under the vector
        assert torch.equal(new.mlp.up_proj.bias, old.mlp.up_proj.bias)
        assert torch.equal(new.mlp.gate_proj.bias, old.mlp.gate_proj.bias)
    for a, b in zip(_logits(reloaded, ids), steered, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=0)


def test_model_without_biases_gets_zero_biases_elsewhere(tiny_lm, tmp_path):
    from transformers import AutoModelForCausalLM

    policy = Policy(_caa(tiny_lm, (2,), seed=5))
    reloaded = AutoModelForCausalLM.from_pretrained(write_hf_bias(policy, tiny_lm, tmp_path / "e")).eval()
    for i, layer in enumerate(reloaded.model.layers):
        for proj in (layer.mlp.gate_proj, layer.mlp.up_proj) + (() if i == 2 else (layer.mlp.down_proj,)):
            assert not proj.bias.any(), i
    assert torch.equal(reloaded.model.layers[2].mlp.down_proj.bias, policy.additive_vectors()[2])


def test_bf16_model_is_written_in_bf16(tiny_model_dir, tmp_path):
    lm = load_model(str(tiny_model_dir), device="cpu", dtype="bf16")
    out = write_hf_bias(Policy(_caa(lm, (1,), seed=6)), lm, tmp_path / "e")
    weights = load_file(out / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (
            lambda lm: Steering({1: _hpr(lm)}, "hpr", lm.fingerprint()),
            "'hpr' function",
        ),
        (lambda lm: _caa(lm, (1,), seed=7, positions="prompt"), "'prompt' positions"),
    ],
)
def test_non_additive_policies_are_refused(tiny_lm, tmp_path, make, reason):
    policy = Policy(make(tiny_lm))
    for fmt in FORMATS:
        with pytest.raises(SimsError) as exc:
            export_policy(policy, tiny_lm, fmt, tmp_path / "out")
        message = str(exc.value)
        assert reason in message and f"{fmt} cannot hold" in message and "steering folder" in message
        assert "\n" not in message
    assert not (tmp_path / "out").exists()


def test_refusals(tiny_lm, tiny_gpt2_dir, tmp_path):
    policy = _policy(tiny_lm)
    with pytest.raises(SimsError, match="unknown export format 'onnx': use one of gguf-cvec, hf-bias"):
        export_policy(policy, tiny_lm, "onnx", tmp_path / "x")
    with pytest.raises(SimsError, match="unsteered"):
        export_policy(Policy(), tiny_lm, "hf-bias", tmp_path / "x")
    gpt2 = load_model(str(tiny_gpt2_dir), device="cpu", dtype="fp32")
    with pytest.raises(SimsError, match="hf-bias supports the model types llama, ") as exc:
        write_hf_bias(Policy(_caa(gpt2, (1,), seed=8)), gpt2, tmp_path / "x")
    assert "'gpt2'" in str(exc.value) and all(t in str(exc.value) for t in SUPPORTED_MODEL_TYPES)
    with pytest.raises(SimsError, match="another model"):
        export_policy(policy, gpt2, "hf-bias", tmp_path / "x")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SimsError, match="is a file; hf-bias writes a model folder"):
        export_policy(policy, tiny_lm, "hf-bias", tmp_path / "afile")
    with pytest.raises(SimsError, match="is a folder; gguf-cvec writes one file"):
        check_target(tmp_path, "gguf-cvec")
    with pytest.raises(SimsError, match="pass --force"):
        check_target(tmp_path / "afile", "gguf-cvec")
    assert not (tmp_path / "x").exists()


def test_replacing_needs_force_and_a_previous_export(tiny_lm, tmp_path):
    out = tmp_path / "export"
    write_hf_bias(_policy(tiny_lm), tiny_lm, out)
    with pytest.raises(SimsError, match="exists and is not empty; pass --force"):
        write_hf_bias(_policy(tiny_lm), tiny_lm, out)
    single = Policy(_caa(tiny_lm, (0,), seed=9))
    write_hf_bias(single, tiny_lm, out, force=True)
    assert read_manifest(out)["layers"] == [0]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(SimsError, match="not a previous export"):
        write_hf_bias(single, tiny_lm, other, force=True)
    assert (other / "keep.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (write_hf_bias(single, tiny_lm, empty) / "config.json").is_file()


def test_a_failed_write_leaves_nothing(tiny_lm, tmp_path, monkeypatch):
    out = tmp_path / "export"
    write_hf_bias(_policy(tiny_lm), tiny_lm, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(tiny_lm.tokenizer), "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        write_hf_bias(Policy(_caa(tiny_lm, (0,), seed=10)), tiny_lm, out, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old export, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


@pytest.mark.slow
def test_embedded_model_export_matches_the_hooked_model(embedded_lm, tmp_path):
    from transformers import AutoModelForCausalLM

    lm = embedded_lm
    gen = torch.Generator().manual_seed(11)
    fns = {
        i: AddVector(4 * torch.nn.functional.normalize(torch.randn(lm.hidden_size, generator=gen), dim=0))
        for i in range(9, 21)
    }  # runs/sims-like: CAA on the middle 40%
    policy = Policy(Steering(fns, "caa", lm.fingerprint(), strength=0.25))
    messages = ["Tell me about your day.", "What is the capital of France?"]
    ids = [
        lm.tokenizer.apply_chat_template(
            [{"role": "user", "content": m}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
        for m in messages
    ]
    with policy.applied(lm.model):
        steered = _logits(lm.model, ids)
    out = write_hf_bias(policy, lm, tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert (
        reloaded.config.tie_word_embeddings and reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    )
    for got, want in zip(_logits(reloaded, ids), steered, strict=True):
        assert torch.allclose(got, want, atol=1e-4, rtol=0)
