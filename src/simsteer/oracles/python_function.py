"""Oracles you write yourself: a Python function as a scorer or a ranker.

``python:MODULE:FUNCTION`` loads a function from an importable module
(``python:mypkg.scorers:helpful``) or from a file given by path
(``python:./scorers.py:helpful``). Two shapes are accepted:

- ``fn(prompt, response) -> float``: a score per answer (higher is better);
- ``fn(prompt, responses) -> list[int]``: a ranking, answer indices best first. A
  function is taken as a ranker when its second parameter is named ``responses`` or is
  annotated as a list/sequence. Returning ``None`` skips the prompt.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SimsError
from .base import Judgment, Oracle, ScoreOracle
from .registry import register_oracle


def _is_file(module_name: str) -> bool:
    return module_name.endswith(".py") or "/" in module_name


def python_target(target: str) -> str:
    """``MODULE:FUNCTION`` unchanged, ``FILE.py:FUNCTION`` with the file made absolute (a
    saved spec must find the file from any folder)."""
    module_name, sep, fn_name = target.rpartition(":")
    if sep and _is_file(module_name):
        return f"{Path(module_name).expanduser().resolve()}:{fn_name}"
    return target


def load_function(target: str) -> Callable:
    """``MODULE:FUNCTION`` or ``PATH.py:FUNCTION`` -> the function."""
    module_name, sep, fn_name = target.rpartition(":")
    if not sep or not module_name or not fn_name:
        raise SimsError(f"python oracle needs MODULE:FUNCTION or FILE.py:FUNCTION, got {target!r}")
    if _is_file(module_name):
        path = Path(module_name)
        if not path.is_file():
            raise SimsError(f"python oracle file not found: {path}")
        spec = importlib.util.spec_from_file_location(f"simsteer_user_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        try:
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        except Exception as exc:  # the user's code may raise anything on import
            raise SimsError(f"cannot import {path}: {type(exc).__name__}: {exc}") from None
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise SimsError(f"cannot import module {module_name!r}: {exc}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise SimsError(f"{module_name} has no function {fn_name!r}")
    return fn


def is_ranker(fn: Callable) -> bool:
    params = list(inspect.signature(fn).parameters.values())
    if len(params) < 2:
        raise SimsError(f"{fn.__name__} must take (prompt, response) or (prompt, responses)")
    second = params[1]
    note = str(second.annotation).lower()
    return second.name == "responses" or any(w in note for w in ("list", "sequence"))


class PythonScoreOracle(ScoreOracle):
    """``fn(prompt, response) -> float`` as an oracle (Bradley-Terry over the scores)."""

    def __init__(self, fn: Callable[[str, str], float], name: str, temperature: float = 1.0) -> None:
        super().__init__(temperature)
        self.fn = fn
        self.name = name

    def score(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        out = []
        for p, r in zip(prompts, responses, strict=True):
            value = self.fn(p, r)
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise SimsError(f"{self.name} returned {value!r}; a score must be a number") from None
            if not math.isfinite(number):  # NaN would label nothing and poison every mean
                raise SimsError(f"{self.name} returned {value!r}; a score must be a finite number")
            out.append(number)
        return np.asarray(out, dtype=np.float64)


class PythonRankOracle(Oracle):
    """``fn(prompt, responses) -> indices best first`` as an oracle."""

    def __init__(self, fn: Callable[[str, list[str]], list[int] | None], name: str) -> None:
        self.fn = fn
        self.name = name

    def judge(self, prompts: list[str], responses: list[list[str]]) -> list[Judgment]:
        out = []
        for p, rs in zip(prompts, responses, strict=True):
            order = self.fn(p, list(rs))
            k = len(rs)
            if order is None:
                out.append(Judgment(np.full((k, k), 0.5), parsed=False))
                continue
            order = [int(i) for i in order]
            if sorted(order) != list(range(k)):
                raise SimsError(f"{self.name} returned {order}; a ranking lists each index 0..{k - 1} once")
            # Position in the ranking as a score: best gets k-1, worst 0.
            score = np.empty(k)
            score[order] = np.arange(k - 1, -1, -1)
            pref = np.where(score[:, None] > score[None, :], 1.0, 0.0)
            np.fill_diagonal(pref, 0.5)
            out.append(Judgment(pref, scores=score / (k - 1)))
        return out


def python_oracle(target: str, temperature: float = 1.0) -> Oracle:
    fn = load_function(target)
    name = f"python:{python_target(target)}"
    return PythonRankOracle(fn, name) if is_ranker(fn) else PythonScoreOracle(fn, name, temperature)


def _python_name_spec(name: str, options: dict[str, Any]) -> dict[str, Any]:
    return {"name": f"python:{python_target(name.partition(':')[2])}"}


@register_oracle("python", names=("python:MODULE:FUNCTION",), name_spec=_python_name_spec)
def _build_python(name: str, settings: dict[str, Any], device: str | None, lm: Any) -> Oracle:
    return python_oracle(name.partition(":")[2], **settings)
