"""Prompt format, encoding, padding and the one teacher-forced forward, against a
straightforward per-example computation on the tiny models."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from simsteer.generation.torch_engine import _LastTokenHead
from simsteer.hooks import count_hooks, record
from simsteer.models import load_model
from simsteer.tokens import (
    PLAIN_FORMAT,
    TokenRow,
    encode_pairs,
    encode_prompt,
    eos_token_ids,
    format_prompt,
    left_pad,
    pad_sequences,
    response_logits,
    teacher_forced,
)

from .conftest import build_tiny_model

PROMPTS = ["the good day", "a cat is happy and the dog is sad", "I", "we walk home in the cold rain"]
RESPONSES = ["I love the sun", "bad bad dog", "", "the day is long and the night is dark"]


def test_prompt_format_chat_and_plain(tiny_lm, tiny_gpt2_dir):
    tok = tiny_lm.tokenizer
    assert format_prompt(tok, "hi") == "<|user|> hi <|end|> <|assistant|> "
    # A chat template writes its own special tokens: none are added.
    assert encode_prompt(tok, "hi") == list(
        tok(format_prompt(tok, "hi"), add_special_tokens=False)["input_ids"]
    )
    gpt2 = load_model(str(tiny_gpt2_dir), device="cpu", dtype="fp32")
    assert format_prompt(gpt2.tokenizer, "hi") == PLAIN_FORMAT.format(prompt="hi")
    assert eos_token_ids(tiny_lm.model, tok) == [tok.eos_token_id]


def test_padding_sides():
    ids, mask = pad_sequences([[5, 6, 7], [8], []], 0, "left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    ids, mask = pad_sequences([[5, 6, 7], [8]], 1, "right")
    assert ids.tolist() == [[5, 6, 7], [8, 1, 1]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    for a, b in zip(left_pad([[1, 2], [3]], 0), pad_sequences([[1, 2], [3]], 0), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="padding side"):
        pad_sequences([[1]], 0, "middle")


def test_encode_pairs_caps_the_response(tiny_lm):
    tok = tiny_lm.tokenizer
    rows = encode_pairs(tok, PROMPTS, RESPONSES, max_response_tokens=3)
    assert [r.response_len for r in rows] == [3, 3, 0, 3]
    assert (
        rows[0].ids
        == encode_prompt(tok, PROMPTS[0]) + tok("I love the", add_special_tokens=False)["input_ids"]
    )
    assert [r.response_len for r in encode_pairs(tok, PROMPTS, RESPONSES)] == [4, 3, 0, 9]
    with pytest.raises(ValueError, match="one prompt per response"):
        encode_pairs(tok, PROMPTS, RESPONSES[:2])


def test_batches_longest_first_and_empty_rows_left_out():
    rows = [TokenRow([1] * n, r) for n, r in [(3, 1), (5, 0), (4, 2), (2, 1), (6, 0)]]

    class Echo(nn.Module):  # only the batching is under test: a model that echoes its input
        def forward(self, input_ids, attention_mask, use_cache):
            return SimpleNamespace(last_hidden_state=input_ids.float())

    lm = SimpleNamespace(model=Echo(), tokenizer=SimpleNamespace(pad_token_id=0), device=torch.device("cpu"))
    batches = list(teacher_forced(lm, rows, 2))
    assert [b.index for b in batches] == [[4, 1], [2, 0], [3]]
    # Batches are drawn before empty rows leave them, so they stay the same.
    assert [b.index for b in teacher_forced(lm, rows, 2, skip_empty=True)] == [[2, 0], [3]]
    assert [b.index for b in teacher_forced(lm, rows, 2, longest_first=False)] == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize("padding", ["left", "right"])
def test_forward_matches_one_sequence_at_a_time(tiny_lm, padding):
    rows = encode_pairs(tiny_lm.tokenizer, PROMPTS, RESPONSES)
    seen = []
    with torch.inference_mode():
        for batch in teacher_forced(tiny_lm, rows, 3, padding=padding):
            assert batch.num_tokens == sum(len(rows[i].ids) for i in batch.index)
            for row, i in enumerate(batch.index):
                seen.append(i)
                ids = torch.tensor([rows[i].ids])
                alone = tiny_lm.model.model(input_ids=ids).last_hidden_state[0]
                n = rows[i].response_len
                # The response's states, and those of the positions that predict it.
                got = batch.hidden[row, batch.response_positions(row)]
                torch.testing.assert_close(got, alone[len(alone) - n :], atol=1e-5, rtol=1e-4)
                assert int(batch.response_start[row]) == batch.response_positions(row).start
                if n:
                    logits, target = response_logits(tiny_lm, batch, row)
                    full = tiny_lm.model(input_ids=ids).logits[0]
                    torch.testing.assert_close(logits, full[len(alone) - n - 1 : -1], atol=1e-5, rtol=1e-4)
                    assert target.tolist() == rows[i].ids[-n:]
    assert sorted(seen) == list(range(len(rows)))


def test_whole_model_logits_and_hooks(tiny_lm):
    rows = [TokenRow(encode_prompt(tiny_lm.tokenizer, p), 0) for p in PROMPTS]
    with torch.inference_mode():
        batches = list(
            teacher_forced(
                tiny_lm,
                rows,
                2,
                whole_model=True,
                longest_first=False,
                hooks=lambda _: record(tiny_lm.model, [1]),
            )
        )
        assert [b.index for b in batches] == [[0, 1], [2, 3]]
        for batch in batches:
            assert batch.hidden is None and len(batch.recorded[1]) == 1
            for row, i in enumerate(batch.index):
                alone = tiny_lm.model(input_ids=torch.tensor([rows[i].ids])).logits[0, -1]
                torch.testing.assert_close(batch.logits[row, -1], alone, atol=1e-5, rtol=1e-4)
    assert count_hooks(tiny_lm.model) == 0
    with pytest.raises(ValueError, match="decoder-stack"):
        response_logits(tiny_lm, batches[0], 0)


@pytest.mark.parametrize("arch", ["granite", "cohere", "gemma3"])
def test_response_logits_and_the_engine_head_apply_the_models_own_post_processing(arch, tmp_path):
    """Granite divides its logits, Cohere scales them, Gemma 3 soft-caps them: the
    response logits (perplexities, BiPO) and the engine's last-token head equal the
    model's own forward."""
    lm = load_model(str(build_tiny_model(tmp_path / arch, arch=arch)), device="cpu", dtype="fp32")
    rows = encode_pairs(lm.tokenizer, PROMPTS[:2], RESPONSES[:2])
    with torch.inference_mode():
        for batch in teacher_forced(lm, rows, 2, padding="right"):
            for row, i in enumerate(batch.index):
                ids = torch.tensor([rows[i].ids])
                full = lm.model(input_ids=ids).logits[0]
                logits, _ = response_logits(lm, batch, row)
                n = rows[i].response_len
                torch.testing.assert_close(logits, full[len(rows[i].ids) - n - 1 : -1], atol=1e-5, rtol=1e-4)
        head = _LastTokenHead.of(lm.model)
        ids = torch.tensor([rows[0].ids])
        last = head(head.decoder(input_ids=ids).last_hidden_state[:, -1])
        torch.testing.assert_close(last, lm.model(input_ids=ids).logits[:, -1], atol=1e-5, rtol=1e-4)
