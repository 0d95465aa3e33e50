"""Checks of what a command is given beyond its flags' types: learner options against
the learner's defaults, prompts against the model's context, and input files read with
one clear line when they are not what they should be."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..errors import SimsError
from ..schema import expected


# -- learners from options ----------------------------------------------------------------
def checked_learner(name: Any, options: dict[str, Any], where: str = "-L") -> Any:
    """The learner ``name`` with ``options``, each checked against the type of its default.

    A learner's config takes its options as given, so ``-L strength=abc`` or a hand-edited
    ``"coefficient": "abc"`` would only fail deep inside a fit (or never). Numbers must be
    finite numbers, integers integers, switches ``true``/``false``; text options keep
    what JSON gives (``-L layers=3`` reaches the layer parser as before).

    Args:
        name: the learner's registry name.
        options: its hyper-parameters.
        where: where the options come from, for the error (``-L``, a file's field).
    """
    from ..learners import get_learner
    from ..learners.base import learner_class

    if not isinstance(name, str):
        raise SimsError(f"{where}: the learner name must be text, got {name!r}")
    defaults = {f.name: f.default for f in fields(learner_class(name).config_class)}
    for key, value in options.items():
        if key not in defaults:
            continue  # the learner names its options in its own error
        problem = _option_problem(defaults[key], value)
        if problem:
            raise SimsError(f"{where} {key}={json.dumps(value)}: learner {name!r} expects {problem}")
    return get_learner(name, **options)


def _option_problem(default: Any, value: Any) -> str | None:
    """What is wrong with ``value`` for an option whose default is ``default`` (None: fine):
    a number, integer or switch default takes what :mod:`simsteer.schema` allows for its
    type; text options keep what JSON gives."""
    if isinstance(default, bool | int | float):
        return expected(type(default), value)
    if isinstance(default, str):
        return None if not isinstance(value, bool | float | dict) and value is not None else "text"
    return None


# -- prompts against the model ------------------------------------------------------------
def check_context(lm: Any, prompts: list[Any], max_new_tokens: int) -> None:
    """Refuse, in one line, a prompt that with its answer does not fit the model's context
    (positions past it index outside the position table or give garbage).

    Args:
        lm: the loaded model.
        prompts: :class:`~simsteer.prompts.Prompt` objects.
        max_new_tokens: the answer length each prompt needs room for.
    """
    from ..models import context_length
    from ..tokens import encode_prompt

    limit = context_length(lm.model)
    if limit is None:
        return
    for prompt in prompts:
        n = len(encode_prompt(lm.tokenizer, prompt.text))
        if n + max_new_tokens > limit:
            raise SimsError(
                f"prompt {prompt.id!r} has {n} tokens: with {max_new_tokens} new tokens it does not fit "
                f"the model's context of {limit} tokens (shorten it or lower --max-new-tokens)"
            )


# -- input files ------------------------------------------------------------------------
#: What a damaged or foreign input file raises while it is read and used.
_READ_ERRORS = (OSError, ValueError, csv.Error, KeyError, IndexError, TypeError, AttributeError, EOFError)


@contextmanager
def reading(path: str | Path, what: str) -> Iterator[None]:
    """Turn what a bad input file raises inside the block into one line naming it.

    Args:
        path: the file being read.
        what: what it should be (``AlpacaEval annotation file``, ``pairs file``, ...).
    """
    try:
        yield
    except SimsError:
        raise
    except FileNotFoundError:
        raise SimsError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise SimsError(f"{what} is a folder: {path}") from None
    except _READ_ERRORS as exc:  # csv.Error, JSONDecodeError, BadGzipFile are among these
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        raise SimsError(f"{path} is not a valid {what} ({detail})") from None


# -- output files ---------------------------------------------------------------------------
def check_output_file(path: str | Path, flag: str = "--output") -> None:
    """Refuse, before any work, an output file that cannot be written: a folder, or a path
    under a file (its folders are made when missing).

    Args:
        path: the file to write.
        flag: the option that named it, for the message.
    """
    path = Path(path)
    if path.is_dir():
        raise SimsError(f"{flag} {path} is a folder: name a file")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise SimsError(f"{flag} {path}: {parent} is not a folder, so nothing can be written under it")
