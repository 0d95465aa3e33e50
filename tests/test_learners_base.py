"""The learner interface: the registry, what a learner needs, options checked by name."""

from __future__ import annotations

import pytest

from simsteer.activations import NEEDS
from simsteer.errors import SimsError
from simsteer.learners import Learner, get_learner, learner_names, register_learner


def test_builtin_learners_state_what_activations_they_need():
    needs = {name: type(get_learner(name)).needs for name in learner_names()}
    assert needs == {
        "actadd": "none",
        "bipo": "texts",
        "caa": "summaries",
        "cast": "texts",
        "hpr": "tokens",
        "iti": "heads",
        "pca": "summaries",
        "sea": "summaries",
    }
    assert set(needs.values()) <= set(NEEDS)


def test_a_learner_with_an_unknown_need_is_refused():
    class Odd(Learner):
        name = "odd"
        needs = "everything"

        def fit(self, data, fingerprint):
            raise NotImplementedError

    with pytest.raises(TypeError, match="needs must be one of"):
        register_learner(Odd)
    assert "odd" not in learner_names()


def test_unknown_learner_and_option_errors_name_the_choices():
    with pytest.raises(SimsError, match="did you mean 'caa'"):
        get_learner("cca")
    with pytest.raises(SimsError, match="has no option 'coeff'"):
        get_learner("caa", coeff=1.0)


def test_a_learner_by_its_code_and_its_spec_round_trip(tmp_path, monkeypatch):
    """`python:FILE.py:CLASS` and `python:MODULE:CLASS` load a Learner subclass; `describe()`
    names it so that `get_learner` finds it again; mistakes are one line."""
    (tmp_path / "my_learners.py").write_text(
        "from simsteer.learners import CAA\n\n"
        "class Shifted(CAA):\n    name = 'shifted-caa'\n\n"
        "class Nameless(CAA):\n    name = ''\n\n"
        "NOT_A_CLASS = 3\n",
        encoding="utf-8",
    )
    by_file = get_learner(f"python:{tmp_path / 'my_learners.py'}:Shifted", coefficient=0.02)
    spec = by_file.describe()
    assert spec["name"] == f"python:{tmp_path / 'my_learners.py'}:Shifted" and spec["coefficient"] == 0.02
    assert get_learner(spec).describe() == spec == get_learner(**spec).describe()
    monkeypatch.syspath_prepend(str(tmp_path))
    by_module = get_learner("python:my_learners:Shifted")
    assert by_module.describe()["name"] == "python:my_learners:Shifted" and by_module.name == "shifted-caa"
    for target, says in (
        ("python:my_learners:NOT_A_CLASS", "no Learner subclass"),
        ("python:my_learners:Nameless", "needs a name"),
        ("python:no_such_module_here:X", "cannot import"),
        (f"python:{tmp_path / 'missing.py'}:X", "not found"),
        ("python:justonepart", "python:MODULE:CLASS"),
    ):
        with pytest.raises(SimsError, match=says):
            get_learner(target)


def test_a_builtin_learner_describes_a_spec_get_learner_takes_back():
    learner = get_learner("caa", coefficient=0.02, layers="3,5")
    spec = learner.describe()
    assert spec == {"name": "caa", **learner.hyperparameters()}
    assert get_learner(spec).describe() == spec == get_learner(**spec).describe()
    assert get_learner(spec, coefficient=0.03).describe()["coefficient"] == 0.03  # options override
