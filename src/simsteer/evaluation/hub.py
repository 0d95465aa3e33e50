"""Evaluation data sets by name through the Hugging Face ``datasets`` library.

Each data set simsteer evaluates on has a :class:`HubSource` (dataset id, config, split)
and a converter from the hub's rows to the records of the local file layout
(``tests/data`` shows it), so both paths build the very same items from the records.
``datasets.load_dataset`` reads its local cache when the hub cannot be reached (or with
``HF_HUB_OFFLINE=1``), so a data set fetched once keeps working offline.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

Record = dict[str, Any]


@dataclass(frozen=True)
class HubSource:
    """Where a data set lives on the Hugging Face hub.

    Attributes:
        path: the dataset id (``owner/name``), or a packaged builder (``json``) when the
            repository can only be read file by file.
        name: the configuration (``None``: the default one).
        split: the split evaluated on.
        data_dir: a sub-folder of the repository (HH-RLHF's ``harmless-base``).
        data_files: the file read by a packaged builder.
    """

    path: str
    name: str | None
    split: str
    data_dir: str | None = None
    data_files: str | None = None

    def describe(self) -> str:
        """A short label such as ``hf:allenai/ai2_arc (ARC-Easy, test)``."""
        where = self.data_files or self.path
        parts = ", ".join(p for p in (self.name, self.data_dir, self.split) if p)
        return f"hf:{where.removeprefix('hf://datasets/')} ({parts})"


class HubUnavailable(Exception):
    """The hub could not give the data set (no ``datasets``, no network and no cache, ...)."""


def _letters(n: int) -> str:
    return "ABCDEFGHIJ"[:n]


def _arc(rows: list[Record]) -> list[Record]:
    return [
        {
            "id": r["id"],
            "question": r["question"],
            "choices": list(r["choices"]["text"]),
            "label": list(r["choices"]["label"]).index(r["answerKey"]),
        }
        for r in rows
    ]


def _truthfulqa(rows: list[Record]) -> list[Record]:
    # the local mc_task.json maps each choice to its 0/1 label
    def targets(t: Record) -> dict[str, int]:
        return dict(zip(t["choices"], (int(v) for v in t["labels"]), strict=True))

    return [
        {
            "question": r["question"],
            "mc1_targets": targets(r["mc1_targets"]),
            "mc2_targets": targets(r["mc2_targets"]),
        }
        for r in rows
    ]


def _mmlu(rows: list[Record]) -> list[Record]:
    return [
        {
            "subject": r["subject"],
            "question": r["question"],
            "options": list(r["choices"]),
            "answer": _letters(len(r["choices"]))[int(r["answer"])],
        }
        for r in rows
    ]


def _hellaswag_text(text: str) -> str:
    # WikiHow contexts carry markers such as "[header]" and "[step]"; the local file has
    # them removed, a "[title]" becoming the end of a sentence.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(rows: list[Record]) -> list[Record]:
    return [
        {
            "id": r.get("ind", i),
            "query": _hellaswag_text(f"{r['activity_label']}: {r['ctx']}"),
            "endings": [_hellaswag_text(e) for e in r["endings"]],
            "label": int(r["label"]),
        }
        for i, r in enumerate(rows)
    ]


def _winogrande(rows: list[Record]) -> list[Record]:
    keys = ("sentence", "option1", "option2", "answer")
    return [{"id": i, **{k: r[k] for k in keys}} for i, r in enumerate(rows)]


def _sst2(rows: list[Record]) -> list[Record]:
    # GLUE's sentences end in a space the local file does not have
    return [
        {"id": r.get("idx", i), "sentence": r["sentence"].strip(), "label": int(r["label"])}
        for i, r in enumerate(rows)
    ]


def _alpaca(rows: list[Record]) -> list[Record]:
    return [
        {
            "instruction": r["instruction"],
            "reference_output": r["output"],
            "reference_generator": r.get("generator"),
            "dataset": r.get("dataset"),
        }
        for r in rows
    ]


def _last_turns(messages: list[Record]) -> tuple[str, str]:
    """(the last user message, the last message) of a conversation."""
    users = [m["content"] for m in messages[:-1] if m.get("role") == "user"]
    return (users[-1] if users else ""), messages[-1]["content"]


def _pairs(rows: list[Record]) -> list[Record]:
    out = []
    for r in rows:
        chosen, rejected = r["chosen"], r["rejected"]
        if isinstance(chosen, list):  # conversational (trl-lib/ultrafeedback_binarized)
            prompt, chosen = _last_turns(chosen)
            rejected = _last_turns(rejected)[1]
            out.append({"prompt": r.get("prompt") or prompt, "chosen": chosen, "rejected": rejected})
        else:  # HH-RLHF: whole dialogues, split by the local reader
            out.append({"chosen": chosen, "rejected": rejected})
    return out


_ARC = "allenai/ai2_arc"
_TRUTHFULQA = HubSource("truthfulqa/truthful_qa", "multiple_choice", "validation")

#: data set name -> (hub source, converter from hub rows to local records)
HUB_SOURCES: dict[str, tuple[HubSource, Callable[[list[Record]], list[Record]]]] = {
    "arc_easy": (HubSource(_ARC, "ARC-Easy", "test"), _arc),
    "arc_challenge": (HubSource(_ARC, "ARC-Challenge", "test"), _arc),
    "truthfulqa_mc1": (_TRUTHFULQA, _truthfulqa),
    "truthfulqa_mc2": (_TRUTHFULQA, _truthfulqa),
    "mmlu": (HubSource("cais/mmlu", "all", "test"), _mmlu),
    "hellaswag": (HubSource("Rowan/hellaswag", None, "validation"), _hellaswag),
    "winogrande": (HubSource("allenai/winogrande", "winogrande_xl", "validation"), _winogrande),
    "sst2": (HubSource("nyu-mll/glue", "sst2", "validation"), _sst2),
    # The repository's loading script is refused by datasets >= 4, so its JSON file is
    # read directly: the AlpacaEval 2 reference (gpt4_1106_preview) outputs.
    "alpaca_eval": (
        HubSource(
            "json",
            None,
            "train",
            data_files="hf://datasets/tatsu-lab/alpaca_eval/alpaca_eval_gpt4_baseline.json",
        ),
        _alpaca,
    ),
    "hh_rlhf": (HubSource("Anthropic/hh-rlhf", None, "test", data_dir="harmless-base"), _pairs),
    "ultrafeedback": (HubSource("trl-lib/ultrafeedback_binarized", None, "train"), _pairs),
}


@contextmanager
def _quiet_retries() -> Iterator[None]:
    # Without a network huggingface_hub warns on each of its retries; the caller prints
    # one line instead.
    log = logging.getLogger("huggingface_hub")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def hub_records(name: str, limit: int | None = None) -> list[Record]:
    """The records of data set ``name`` read through ``datasets.load_dataset``.

    Args:
        name: a key of :data:`HUB_SOURCES`.
        limit: first N rows only (``None``: all).

    Returns:
        records in the local file layout (what the local readers return).

    Raises:
        HubUnavailable: ``datasets`` is not installed, or neither the hub nor the local
            ``datasets`` cache has the data set; the message says why, in one line.
    """
    source, convert = HUB_SOURCES[name]
    try:
        import datasets
    except ImportError:
        raise HubUnavailable("the datasets library is not installed: pip install 'simsteer[data]'") from None
    options = {k: v for k, v in (("data_dir", source.data_dir), ("data_files", source.data_files)) if v}
    try:
        with _quiet_retries():
            rows = datasets.load_dataset(source.path, source.name, split=source.split, **options)
    except Exception as exc:  # unreachable hub, not cached, gated, renamed: said in one line
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise HubUnavailable(f"{type(exc).__name__}: {detail}"[:200]) from None
    if limit is not None and limit < len(rows):
        rows = rows.select(range(limit))
    return convert(list(rows))
