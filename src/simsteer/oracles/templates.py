"""Prompt templates of the model-based oracles, stored as replaceable text files.

The defaults ship in ``simsteer/oracles/templates/``; any oracle that takes a template
accepts a path to your own file instead. Placeholders are written ``{name}`` and
replaced literally (no ``str.format``) in one pass, so JSON braces in a template need no
escaping and an answer holding ``{response_b}`` is sent as written:

- ``{prompt}``: the user request;
- ``{response}``: one answer (pointwise templates);
- ``{response_a}``, ``{response_b}``: two answers (pairwise templates);
- ``{responses}``: all answers as numbered blocks, ``{num_responses}``: how many.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import SimsError

BUILTIN = ("rank", "pointwise", "pairwise", "judge_pairwise", "judge_rank")


@dataclass(frozen=True)
class Template:
    """A template's text and where it came from (its hash keys judgment caches)."""

    name: str
    text: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]

    def render(self, **fields: str) -> str:
        """Fill the placeholders in one pass over the template: a value is inserted
        verbatim, so an answer that itself contains ``{response_b}`` (or any placeholder)
        reaches the judge as written, never filled in turn."""
        if not fields:
            return self.text
        pattern = re.compile("|".join(re.escape("{" + key + "}") for key in fields))
        return pattern.sub(lambda found: fields[found.group(0)[1:-1]], self.text)

    def require(self, *names: str) -> Template:
        missing = [n for n in names if "{" + n + "}" not in self.text]
        if missing:
            raise SimsError(
                f"template {self.name} lacks the placeholder(s) " + ", ".join("{" + n + "}" for n in missing)
            )
        return self


def load_template(name_or_path: str) -> Template:
    """A built-in template by name (see :data:`BUILTIN`) or a text file by path.

    Example:
        >>> load_template("rank").render(prompt="Hi", responses="...", num_responses="2")
    """
    if name_or_path in BUILTIN:
        text = resources.files("simsteer.oracles").joinpath("templates", f"{name_or_path}.txt")
        return Template(name_or_path, text.read_text("utf-8"))
    path = Path(name_or_path)
    if not path.is_file():
        raise SimsError(
            f"template not found: {name_or_path} (give a file path or one of {', '.join(BUILTIN)})"
        )
    try:
        return Template(template_ref(name_or_path), path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise SimsError(f"cannot read template {path}: {exc}") from None


def template_ref(name_or_path: str) -> str:
    """How a spec names a template: a built-in's name, or a file's absolute path (so the
    spec still finds the file from another folder)."""
    if name_or_path in BUILTIN:
        return name_or_path
    return str(Path(name_or_path).expanduser().resolve())


def numbered_responses(responses: list[str], label: str = "Answer") -> str:
    """Responses as ``Answer 1:`` ... blocks, the format the ranking parser reads back."""
    return "\n\n".join(f"{label} {i}:\n{r.strip()}" for i, r in enumerate(responses, 1))
