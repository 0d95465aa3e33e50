from __future__ import annotations

import pytest

from simsteer.errors import SimsError
from simsteer.prompts import load_prompts


def test_builtin_prompt_set():
    prompts = load_prompts()
    assert len(prompts) == 240
    assert len({p.text for p in prompts}) == 240


def test_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "one"}\n\n{"instruction": "two", "id": "x"}\n')
    (tmp_path / "b.txt").write_text("first\n\nsecond\n")
    assert [(p.id, p.text) for p in load_prompts(tmp_path / "a.jsonl")] == [("0", "one"), ("x", "two")]
    assert [p.text for p in load_prompts(tmp_path / "b.txt")] == ["first", "second"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "no prompts"),
        ("\n \n", "no prompts"),
        ('{"text": "x"}\n', "'prompt' or 'instruction'"),
        ('{"prompt": "x"\n', "not valid JSON"),
    ],
)
def test_bad_files(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(SimsError, match=message):
        load_prompts(path)


def test_missing_file(tmp_path):
    with pytest.raises(SimsError, match="not found"):
        load_prompts(tmp_path / "missing.jsonl")
