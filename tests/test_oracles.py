from __future__ import annotations

import numpy as np
import pytest
import torch

from simsteer.errors import SimsError
from simsteer.oracles import RewardModelOracle, bradley_terry, get_oracle, win_rates
from simsteer.oracles.base import Judgment

from .conftest import build_tokenizer


def test_bradley_terry_and_win_rates():
    p = bradley_terry(np.array([2.0, 0.0, 0.0]))
    assert np.allclose(p + p.T, 1.0)
    assert np.allclose(np.diag(p), 0.5)
    assert p[0, 1] == pytest.approx(1 / (1 + np.exp(-2.0)))
    w = win_rates(p)
    assert w[0] == pytest.approx(p[0, 1])  # mean over the two others, both equal
    assert w[1] == pytest.approx((p[1, 0] + 0.5) / 2)
    assert w[0] > 0.5 > w[1]
    # Hand-computed example: a pairwise matrix from a judge.
    m = np.array([[0.5, 0.9, 0.6], [0.1, 0.5, 0.3], [0.4, 0.7, 0.5]])
    assert np.allclose(win_rates(m), [0.75, 0.2, 0.55])
    assert Judgment(m).win_rates.tolist() == win_rates(m).tolist()


def test_attribute_oracles():
    sentiment = get_oracle("sentiment")
    s = sentiment.score(["q", "q"], ["What a wonderful, lovely day!", "This is awful and sad."])
    assert s[0] > 0.5 and s[1] < -0.5
    assert get_oracle("negativity").score(["q"], ["awful"])[0] > 0
    length = get_oracle("length:4")
    assert length.score(["q"] * 2, ["one two three four", "one"]).tolist() == [0.0, -0.75]
    read = get_oracle("readability").score(
        ["q"] * 2,
        ["The cat sat.", "Notwithstanding multitudinous considerations, institutionalization predominates."],
    )
    assert read[0] > read[1]
    (j,) = sentiment.judge(["q"], [["great!", "meh", "terrible"]])
    assert j.scores is not None and np.argmax(j.win_rates) == 0 and np.argmin(j.win_rates) == 2


@pytest.mark.parametrize(
    "spec, message",
    [
        ("sentimnet", "did you mean 'sentiment'"),
        ("length:x", "length target"),
        ("reward-model:", "needs a model"),
        ("wat", "unknown oracle"),
    ],
)
def test_oracle_name_errors(spec, message):
    with pytest.raises(SimsError, match=message):
        get_oracle(spec)


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    path = tmp_path_factory.mktemp("rm")
    tok = build_tokenizer(chat=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_reward_model_oracle_matches_direct_computation(reward_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    oracle = get_oracle(f"reward-model:{reward_model_dir}")
    assert isinstance(oracle, RewardModelOracle)
    prompts = ["the good day", "a cat"]
    responses = ["I love the sun and warm rain", "bad"]
    batched = oracle.score(prompts, responses)
    tok = AutoTokenizer.from_pretrained(reward_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    for p, r, s in zip(prompts, responses, batched, strict=True):
        text = tok.apply_chat_template(
            [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False
        )
        with torch.no_grad():
            direct = model(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0]
        assert s == pytest.approx(float(direct), abs=1e-5)  # padding in the batch changes nothing
    (j,) = oracle.judge(["the good day"], [responses])
    assert np.allclose(j.preference, bradley_terry(j.scores))


def test_reward_model_missing_path_is_clear(tmp_path):
    with pytest.raises(SimsError, match="cannot load reward model"):
        get_oracle(f"reward-model:{tmp_path / 'none'}")


def test_every_oracle_spec_round_trips(tmp_path, monkeypatch, tiny_lm, reward_model_dir):
    """``describe()`` is a spec that ``get_oracle`` accepts back and that rebuilds the same
    oracle, from any folder (relative paths in names and templates are saved absolute)."""
    import json

    from simsteer.oracles import ORACLE_NAMES

    from .test_oracles_llm_judge import FakeJudge

    work = tmp_path / "work"
    work.mkdir()
    (work / "scorers.py").write_text(
        "def words(prompt, response):\n    return len(response.split())\n\n"
        "def shortest(prompt, responses):\n"
        "    return sorted(range(len(responses)), key=lambda i: len(responses[i]))\n"
    )
    (work / "pkg_scorers.py").write_text("def chars(prompt, response):\n    return len(response)\n")
    for name, placeholders in (("rank", "{prompt} {responses}"), ("point", "{prompt} {response}")):
        (work / f"{name}.txt").write_text(f"Custom {name} template: {placeholders}. Yes or No?")
    (work / "pair.txt").write_text("Custom: {prompt} A {response_a} B {response_b}. A or B?")
    (work / "judge.txt").write_text("Custom judge: {prompt} [A] {response_a} [B] {response_b}")
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(work))
    prompts, answers = ["the good day"], [["a happy cat", "the sad night rain", "I love the sun"]]
    with FakeJudge(answer=lambda m: "[[A]]" if "happy" in m.split("[B]")[0] else "[[B]]") as fake:
        cases = {  # ORACLE_NAMES entry -> oracles built from it, with their settings
            "sentiment": [get_oracle("sentiment", temperature=0.5)],
            "negativity": [get_oracle("negativity")],
            "readability": [get_oracle("readability", temperature=2.0)],
            "length:N": [get_oracle("length:3", temperature=0.25)],
            "refusal": [get_oracle("refusal", temperature=0.5)],
            "reward-model:PATH": [get_oracle(f"reward-model:{reward_model_dir}", temperature=0.5)],
            "self-rank": [get_oracle("self-rank", lm=tiny_lm, template="rank.txt")],
            # The tiny tokenizer has no "Yes" / "No" / "A" / "B": verdicts from its vocabulary.
            "self-judge": [
                get_oracle({"name": "self-judge", "verdicts": ["good", "bad"]}, lm=tiny_lm),
                get_oracle(
                    {"name": "self-judge", "verdicts": ["good", "bad"]}, lm=tiny_lm, template="point.txt"
                ),
            ],
            "self-judge-pairwise": [
                get_oracle(
                    {"name": "self-judge-pairwise", "labels": ["one", "two"]}, lm=tiny_lm, template="pair.txt"
                )
            ],
            "judge:MODEL@BASE_URL": [
                get_oracle(
                    f"judge:fake@{fake.url}",
                    template="judge.txt",
                    judge_options={"cache": "cache.sqlite", "concurrency": 2, "timeout": 5.0, "retries": 1},
                ),
                get_oracle(f"judge:fake@{fake.url}", judge_options={"mode": "rank", "cache": "c2.sqlite"}),
            ],
            "python:MODULE:FUNCTION": [
                get_oracle("python:./scorers.py:words", temperature=0.5),
                get_oracle("python:scorers.py:shortest"),
                get_oracle("python:pkg_scorers:chars"),
            ],
            "self-consistency": [get_oracle("self-consistency", temperature=0.2)],
        }
        assert set(cases) == set(ORACLE_NAMES)  # a new oracle name needs a case here
        specs = {name: [o.describe() for o in built] for name, built in cases.items()}
        monkeypatch.chdir(tmp_path)  # the specs must not depend on the folder they were made in
        for name, built in cases.items():
            for oracle, spec in zip(built, specs[name], strict=True):
                assert json.loads(json.dumps(spec)) == spec, name  # what config.json keeps
                again = get_oracle(json.loads(json.dumps(spec)), lm=tiny_lm)
                assert type(again) is type(oracle) and again.describe() == spec, name
                # (self-rank's scores need Yes / No tokens; a rank-mode judge needs rankings)
                if name != "self-rank" and spec.get("mode") != "rank":
                    (a,), (b,) = oracle.judge(prompts, answers), again.judge(prompts, answers)
                    assert np.allclose(a.preference, b.preference), name
    # Paths inside specs are absolute and custom templates keep their text.
    assert specs["python:MODULE:FUNCTION"][0]["name"] == f"python:{work / 'scorers.py'}:words"
    assert specs["self-rank"][0]["template"] == str(work / "rank.txt")
    assert specs["judge:MODEL@BASE_URL"][0]["cache"] == str(work / "cache.sqlite")
    rebuilt = get_oracle(specs["self-judge"][1], lm=tiny_lm)
    assert rebuilt.template.text.startswith("Custom point template")


def test_spec_settings_are_checked():
    with pytest.raises(SimsError, match="has no setting 'template'"):
        get_oracle("sentiment", template="rank")
    with pytest.raises(SimsError, match="needs the loaded model"):
        get_oracle({"name": "self-judge"})
    assert get_oracle({"name": "length:4", "temperature": 0.5}).temperature == 0.5
