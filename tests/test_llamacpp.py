"""The llama.cpp backend: when it applies, its layer numbering, and parity with the
torch engine on the embedded model (the CAA policy is a copy of a real run's final
steering: layers 9-20, strength 0.25)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from simsteer.cli.main import main
from simsteer.errors import SimsError
from simsteer.functions import AddVector
from simsteer.generation.engines import choose_engine
from simsteer.generation.llamacpp import LlamaCppBackend, gguf_file, llamacpp_problem
from simsteer.generation.sampling import SamplingConfig, generate
from simsteer.generation.torch_engine import DecodeSettings, Engine, Job
from simsteer.policy import Policy, load_policy
from simsteer.prompts import load_prompts
from simsteer.steering import Steering
from simsteer.tokens import encode_prompt, eos_token_ids

CAA = Path(__file__).parent / "fixtures" / "smollm2_caa"
needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python (simsteer[llamacpp]) not installed",
)


def test_engine_must_be_known():
    with pytest.raises(SimsError, match="engine"):
        SamplingConfig(engine="tgi")
    assert SamplingConfig().engine == "torch"


def test_torch_models_and_non_additive_policies_stay_on_torch(tiny_lm):
    assert "GGUF" in llamacpp_problem(tiny_lm, None)
    assert choose_engine("auto", tiny_lm, None) == "torch"
    assert choose_engine("torch", tiny_lm, None) == "torch"
    with pytest.raises(SimsError, match="GGUF"):
        choose_engine("llamacpp", tiny_lm, None)


def test_cli_engine_llamacpp_on_a_non_gguf_model_is_one_line(tiny_model_dir, capsys):
    code = main(
        [
            "generate",
            "--model",
            str(tiny_model_dir),
            "--no-steer",
            "--prompt",
            "a day",
            "--engine",
            "llamacpp",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "GGUF" in err[0], err


@needs_llama_cpp
@pytest.mark.slow
def test_cli_engine_llamacpp_refuses_a_non_additive_policy(embedded_lm, tmp_path, capsys):
    steering = load_policy(CAA)[0].with_positions("prompt")
    steering.save(tmp_path / "prompt_only")
    argv = ["generate", "--steering", str(tmp_path / "prompt_only"), "--prompt", "Hi", "--engine", "llamacpp"]
    code = main([*argv, "--max-new-tokens", "2", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "positions" in err[0], err
    assert llamacpp_problem(embedded_lm, load_policy(CAA)) is None


@needs_llama_cpp
@pytest.mark.slow
def test_direction_n_is_added_to_the_output_of_layer_n(embedded_lm):
    """The effect of one vector at simsteer layer L on the logits matches llama.cpp's
    ``direction.L``, not its neighbours (quantisation noise is common to both runs)."""
    lm, layer = embedded_lm, 12
    vector = torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(0))
    vector = vector / vector.norm() * 4.0
    tokens = [encode_prompt(lm.tokenizer, p.text) for p in load_prompts()[:3]]
    policy = Policy((Steering({layer: AddVector(vector)}, "caa", lm.fingerprint()),))
    with torch.inference_mode():
        plain = [lm.model(torch.tensor([t])).logits[0].numpy() for t in tokens]
        with policy.applied(lm.model):
            steered = [lm.model(torch.tensor([t])).logits[0].numpy() for t in tokens]
    torch_effect = np.concatenate([(s - p).ravel() for s, p in zip(steered, plain, strict=True)])
    with LlamaCppBackend(gguf_file(lm)) as backend:
        base = [backend.logits(t) for t in tokens]
        corr = {}
        for shift in (-1, 0, 1):
            with LlamaCppBackend(gguf_file(lm), {layer + shift: vector}) as shifted:
                effect = np.concatenate(
                    [(shifted.logits(t) - b).ravel() for t, b in zip(tokens, base, strict=True)]
                )
            corr[shift] = float(np.corrcoef(effect, torch_effect)[0, 1])
    assert corr[0] > 0.7 and corr[0] > max(corr[-1], corr[1]) + 0.2, corr


def _torch_greedy(lm, encoded, policy, new_tokens):
    out: dict[int, list[int]] = {}
    eos = eos_token_ids(lm.model, lm.tokenizer)
    with torch.inference_mode(), policy.applied(lm.model):
        Engine(lm.model, eos, lm.tokenizer.pad_token_id).run(
            encoded,
            [Job(i, 0, 0) for i in range(len(encoded))],
            DecodeSettings(0.0, 0, 1.0, new_tokens, 32),
            lambda job, tokens: out.__setitem__(job.prompt, tokens),
        )
    return [out[i] for i in range(len(encoded))]


def _agreement(backend: LlamaCppBackend, encoded, continuations) -> float:
    """Share of the torch engine's greedy tokens that llama.cpp also ranks first, fed the
    same prefix (teacher-forced, so one near-tie does not decide the rest of a row)."""
    same = total = 0
    for prompt, answer in zip(encoded, continuations, strict=True):
        logits = backend.logits(prompt + answer[:-1])
        chosen = logits[len(prompt) - 1 :].argmax(-1)
        same += int((chosen == np.array(answer)).sum())
        total += len(answer)
    return same / total


@needs_llama_cpp
@pytest.mark.slow
def test_gguf_cvec_in_llama_cpp_agrees_with_the_torch_engine(embedded_lm, tmp_path):
    """32 prompts x 64 greedy tokens of the fp32 torch engine with the CAA policy."""
    from simsteer.export.gguf_cvec import read_gguf_cvec, write_gguf_cvec

    lm, policy = embedded_lm, load_policy(CAA)
    encoded = [encode_prompt(lm.tokenizer, p.text) for p in load_prompts()[:32]]
    steered = _torch_greedy(lm, encoded, policy, 64)
    plain = _torch_greedy(lm, encoded[:8], Policy(), 64)  # a control: the model itself agrees
    vectors = read_gguf_cvec(write_gguf_cvec(policy, lm, tmp_path / "caa.gguf"))
    with LlamaCppBackend(gguf_file(lm), vectors) as backend:
        with_cvec = _agreement(backend, encoded, steered)
    with LlamaCppBackend(gguf_file(lm)) as backend:
        unsteered = _agreement(backend, encoded[:8], plain)
        without_cvec = _agreement(backend, encoded, steered)
    print(f"agreement: steered {with_cvec:.4f}, unsteered {unsteered:.4f}, without cvec {without_cvec:.4f}")
    assert with_cvec >= 0.95 and unsteered >= 0.95
    assert without_cvec < with_cvec - 0.05  # the control vector is what makes them agree


@needs_llama_cpp
@pytest.mark.slow
def test_generate_on_llama_cpp_is_steered_seeded_and_batch_free(embedded_lm):
    lm, policy = embedded_lm, load_policy(CAA)
    prompts = [p.text for p in load_prompts()[:4]]

    def texts(config, steering=policy, seed=3):
        return [[g.text for g in row] for row in generate(lm, prompts, 2, config, steering, seed=seed)]

    greedy = SamplingConfig(temperature=0.0, max_new_tokens=24, engine="llamacpp")
    assert texts(greedy) != texts(greedy, Policy())  # the control vector changes the answers
    sampled = SamplingConfig(temperature=0.8, max_new_tokens=24, batch_size=8, engine="llamacpp")
    first = texts(sampled)
    assert texts(sampled) == first  # same seed, same samples
    assert texts(sampled, seed=4) != first
    # Rows do not see each other's tokens, but llama.cpp's rounding depends on the
    # batch (8-bit activations for the quantised weights, F16 cache, kernels chosen by
    # batch size), so a draw near a boundary of the distribution can move: most first
    # tokens still match between one row at a time and eight rows together.
    one, eight = (
        texts(SamplingConfig(temperature=0.8, max_new_tokens=1, batch_size=b, engine="llamacpp"))
        for b in (1, 8)
    )
    same = sum(a == b for ra, rb in zip(one, eight, strict=True) for a, b in zip(ra, rb, strict=True))
    assert same >= 6, (one, eight)


@needs_llama_cpp
@pytest.mark.slow
def test_a_run_with_engine_auto_says_which_engine_sampled_each_policy(tmp_path):
    """``--engine auto`` on the embedded GGUF model with CAA: llama.cpp samples every
    policy, and each summary row names it (the unsteered one included)."""
    out = tmp_path / "run"
    argv = ["run", "--engine", "auto", "--dtype", "fp32", "-T", "1", "-N", "2", "-K", "2"]
    argv += ["--max-new-tokens", "4", "--eval-prompts", "1", "--fluency-budget", "off", "--quiet"]
    assert main([*argv, "--out", str(out)]) == 0
    rows = json.loads((out / "summary.json").read_text())
    assert [r["engine"] for r in rows] == ["llamacpp", "llamacpp"]
    torch_out = tmp_path / "torch"
    assert main([*argv[:1], *argv[3:], "--out", str(torch_out)]) == 0
    assert [r["engine"] for r in json.loads((torch_out / "summary.json").read_text())] == ["torch", "torch"]
