"""Prompt files: JSONL with a ``prompt`` or ``instruction`` field, or plain text with one
prompt per line. The default pool ships inside the package (see ``data/README.md``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

from .errors import SimsError
from .schema import check

DEFAULT_PROMPTS = "everyday_prompts.jsonl"


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str

    @classmethod
    def from_json(cls, row: Any) -> Prompt:
        """A prompt row of a run directory (``{"id": ..., "prompt": ...}``); a row of
        another shape raises :class:`~simsteer.schema.SchemaError` naming the field.

        Args:
            row: the parsed JSON row.
        """
        check(PromptRow, row)
        return cls(row["id"], row["prompt"])


@dataclass(frozen=True)
class PromptRow:
    """A row of a run's prompt files, as :func:`simsteer.schema.check` reads it."""

    schema_open: ClassVar[bool] = True  # a file may carry other keys (a source's metadata)

    id: str
    prompt: str


def load_prompts(path: str | Path | None = None) -> list[Prompt]:
    """Read a prompt file; ``None`` loads the built-in everyday prompt set."""
    if path is None:
        text = resources.files("simsteer").joinpath("data", DEFAULT_PROMPTS).read_text("utf-8")
        return _parse(text, DEFAULT_PROMPTS, jsonl=True)
    path = Path(path)
    if not path.exists():
        raise SimsError(f"prompt file not found: {path}")
    if path.is_dir():
        raise SimsError(f"prompt file is a folder: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SimsError(f"prompt file {path} is not UTF-8 text") from None
    jsonl = path.suffix in (".jsonl", ".json") or text.lstrip().startswith("{")
    prompts = _parse(text, str(path), jsonl)
    if not prompts:
        raise SimsError(f"prompt file {path} has no prompts")
    return prompts


def _parse(text: str, source: str, jsonl: bool) -> list[Prompt]:
    prompts: list[Prompt] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if not jsonl:
            prompts.append(Prompt(id=str(len(prompts)), text=line.strip()))
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SimsError(f"{source}:{lineno}: not valid JSON ({exc.msg})") from None
        value = row.get("prompt", row.get("instruction")) if isinstance(row, dict) else None
        if not isinstance(value, str) or not value.strip():
            raise SimsError(f"{source}:{lineno}: needs a non-empty 'prompt' or 'instruction' field")
        pid = row.get("id", len(prompts))
        if not isinstance(pid, str | int) or isinstance(pid, bool):
            raise SimsError(f"{source}:{lineno}: 'id' must be text or an integer, got {pid!r}")
        prompts.append(Prompt(id=str(pid), text=value.strip()))
    return _unique(prompts, source)


def _unique(prompts: list[Prompt], source: str) -> list[Prompt]:
    """``prompts``, refused in one line when two share an id (rows, pairs and the
    evaluation are matched by id: a duplicate would silently mix two prompts)."""
    seen: set[str] = set()
    for prompt in prompts:
        if prompt.id in seen:
            raise SimsError(f"{source}: prompt id {prompt.id!r} appears more than once")
        seen.add(prompt.id)
    return prompts
