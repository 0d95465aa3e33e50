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
