"""Shared fixtures: tiny random models built in the test session (fast), the embedded
model (slow tests), and the evaluation data slices in tests/data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

WORDS = [
    "the",
    "a",
    "good",
    "bad",
    "happy",
    "sad",
    "day",
    "night",
    "sun",
    "rain",
    "I",
    "you",
    "we",
    "they",
    "is",
    "was",
    "very",
    "not",
    "and",
    "but",
    "so",
    "love",
    "hate",
    "great",
    "awful",
    "fine",
    "nice",
    "cold",
    "warm",
    "home",
    "work",
    "cat",
    "dog",
    "tree",
    "road",
    "city",
    "town",
    "walk",
    "run",
    "eat",
    "sleep",
    "read",
    "write",
    "talk",
    "think",
    "see",
    "hear",
    "know",
    "want",
    "like",
    "feel",
    "make",
    "take",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "red",
    "blue",
    "green",
    "black",
    "white",
    "old",
    "new",
    "big",
    "small",
    "long",
    "short",
    "fast",
    "slow",
    "high",
    "low",
    "hot",
    "wet",
    "dry",
    "light",
    "dark",
    "early",
    "late",
    "soft",
    "hard",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)

EVAL_DATA = Path(__file__).resolve().parent / "data"  # small slices, see tests/data/README.md


def build_tokenizer(chat: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS + [".", ",", "!", "?"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<|end|>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
    )
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_decoder_shape(tok) -> dict:
    """The config fields every tiny decoder-only test model shares (Llama, Gemma 3,
    Granite, Cohere; GPT-2 names its fields differently)."""
    return dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )


def build_tiny_model(path: Path, arch: str = "llama", chat: bool = True, seed: int = 0) -> Path:
    """Save a tiny random causal LM with a word-level tokenizer to ``path``."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(chat)
    torch.manual_seed(seed)
    common = tiny_decoder_shape(tok)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=4, tie_word_embeddings=False, **common))
    elif arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=len(tok),
            n_embd=32,
            n_layer=3,
            n_head=4,
            n_positions=256,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            bos_token_id=tok.eos_token_id,
        )
        model = GPT2LMHeadModel(cfg)
    elif arch == "gemma3":
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        cfg = Gemma3TextConfig(
            num_hidden_layers=4,
            head_dim=8,
            sliding_window=4,  # shorter than the prompts, so the window matters
            layer_types=["sliding_attention", "full_attention"] * 2,
            **common,
        )
        model = Gemma3ForCausalLM(cfg)
    elif arch in ("granite", "cohere"):  # heads with a logit divisor (/ 4) or scale (x 0.25)
        from transformers import CohereConfig, CohereForCausalLM, GraniteConfig, GraniteForCausalLM

        config_class, model_class, extra = {
            "granite": (GraniteConfig, GraniteForCausalLM, {"logits_scaling": 4.0}),
            "cohere": (CohereConfig, CohereForCausalLM, {"logit_scale": 0.25}),
        }[arch]
        model = model_class(config_class(num_hidden_layers=3, **common, **extra))
    else:
        raise ValueError(arch)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


#: `sims run` options of the smallest complete run on a tiny model (CLI tests).
TINY_RUN = [
    "-T",
    "1",
    "-N",
    "2",
    "-K",
    "2",
    "--eval-prompts",
    "2",
    "--max-new-tokens",
    "4",
    "--calibration-prompts",
    "1",
    "--quiet",
]


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Every test, and every process a test starts, uses one cache folder of this session
    (``$SIMSTEER_CACHE``), never the user's: the embedded model is converted into it once
    per session (about 30 s, only when a test needs it) and shared by the tests after."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SIMSTEER_CACHE", str(tmp_path_factory.mktemp("simsteer-cache")))
        yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), arch="gpt2", chat=False)


@pytest.fixture()
def tiny_lm(tiny_model_dir):
    from simsteer.models import load_model

    return load_model(str(tiny_model_dir), device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def embedded_lm():
    from simsteer.models import load_model

    # fp32 everywhere: on CPUs with native bf16, "auto" picks bf16, whose rounding differs
    # between a padded batch and a single sequence by more than the parity tests allow.
    return load_model(device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def eval_data() -> Path:
    """The evaluation data slices, in the layout ``--data-dir`` reads."""
    return EVAL_DATA


def pytest_collection_modifyitems(config, items):
    """The tests marked ``vllm`` run last: an in-process vLLM engine binds this process's
    OpenMP threads for good, after which bitwise comparisons with fresh processes (the Ray
    workers' tests) no longer hold."""
    items.sort(key=lambda item: item.get_closest_marker("vllm") is not None)
