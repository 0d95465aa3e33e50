"""The lenient ranking parser, on real broken outputs of the embedded model and on the
formats small models write."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from simsteer.oracles.ranking import Ranking, parse_ranking
from simsteer.oracles.templates import load_template, numbered_responses

FIXTURES = Path(__file__).parent / "fixtures" / "smollm2_rankings.jsonl"


def test_real_smollm2_outputs():
    """Ranking replies collected from SmolLM2-135M-Instruct: almost all are unusable
    (echoed answers, repeated numbers, cut-off JSON) and must give None, not a guess."""
    rows = [json.loads(line) for line in FIXTURES.read_text().splitlines()]
    assert len(rows) >= 10
    for row in rows:
        got = parse_ranking(row["raw"], row["k"])
        assert (None if got is None else [t[0] for t in got.tiers]) == row["expected"], row["raw"][:80]
    assert sum(r["expected"] is None for r in rows) >= len(rows) - 2


@pytest.mark.parametrize(
    ("text", "order"),
    [
        ('{"leaderboard": [3, 1, 2]}', [2, 0, 1]),
        ('Sure! ```json\n{"leaderboard": ["Answer 2", "Answer 3", "Answer 1"]}\n```', [1, 2, 0]),
        ('[{"answer": 2, "rank": 2}, {"answer": 3, "rank": 1}, {"answer": 1, "rank": 3}]', [2, 1, 0]),
        ('{"leaderboard": [{"answer_number": 3}, {"answer_number": 1}, {"answer', [2, 0, 1]),
        ('{"leaderboard": [2, 3', [1, 2, 0]),  # cut off: the missing last one is implied
        ("Answer 3 > Answer 1 > Answer 2", [2, 0, 1]),
        ("response 2 < response 3 < response 1", [0, 2, 1]),
        ("1. Answer 2\n2. Answer 3\n3. Answer 1", [1, 2, 0]),
        ("Rank 1: Response 3\nRank 2: Response 1\nRank 3: Response 2", [2, 0, 1]),
        ("My ranking: 2, 1, 3", [1, 0, 2]),
        ("[1, 0, 2]", [1, 0, 2]),  # written 0-based
    ],
)
def test_formats(text, order):
    got = parse_ranking(text, 3)
    assert got is not None and [t[0] for t in got.tiers] == order


@pytest.mark.parametrize(
    "text",
    [
        "",
        "They are all good answers.",
        '{"leaderboard": [1, 1, 2]}',  # repeated
        '{"leaderboard": [4, 1, 2]}',  # out of range
        '{"leaderboard": [<number of the best answer>, ...]}',  # the template echoed
        "Answer 1 is nice.",  # one answer named is no ranking of three
    ],
)
def test_refuses_to_guess(text):
    assert parse_ranking(text, 3) is None


def test_best_worst_is_a_partial_ranking():
    got = parse_ranking("The best answer is Answer 3. The worst one is answer 1.", 4)
    assert got == Ranking(((2,), (1, 3), (0,)), "best-worst")
    assert got.best == 2 and got.worst == 0
    p = got.preference()
    assert p[2].tolist() == [1.0, 1.0, 0.5, 1.0] and p[1, 3] == 0.5
    assert np.allclose(p + p.T, 1.0)


def test_rank_template_round_trip():
    template = load_template("rank").require("prompt", "responses", "num_responses")
    text = template.render(prompt="Q?", responses=numbered_responses(["x", "y"]), num_responses="2")
    assert "Answer 2:\ny" in text and "{prompt}" not in text
