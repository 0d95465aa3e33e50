"""Where the evaluation data comes from: a local folder or the Hugging Face hub.

``sims eval``, ``sims judge-check`` and ``sims baseline ms`` read their data sets from
the folder ``--data-dir DIR`` (alias ``--data``), else ``$SIMSTEER_DATA``, else by name
through the ``datasets`` library (:mod:`.hub`; its cache serves offline). The folder's
layout is that of ``tests/data`` (:data:`LOCAL_FILES`); ``sims run`` needs none of it.
Both paths give the same records, which :mod:`.mc_tasks` turns into items.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SimsError
from ..io import read_jsonl
from .hub import HUB_SOURCES, HubUnavailable, Record, hub_records
from .mc_tasks import MC_TASKS, MCItem

DATA_ENV = "SIMSTEER_DATA"


def local_data_dir(path: str | Path | None = None) -> Path | None:
    """The local evaluation data folder: ``path`` (``--data-dir``), else ``$SIMSTEER_DATA``,
    else ``None`` (the data sets are then read from the Hugging Face hub)."""
    value = path or os.environ.get(DATA_ENV)
    if not value:
        return None
    folder = Path(value)
    if not folder.is_dir():
        raise SimsError(f"evaluation data folder not found: {folder} (--data-dir DIR or ${DATA_ENV})")
    return folder


def data_dir(path: str | Path | None = None) -> Path:
    """The local evaluation data folder (``path`` or ``$SIMSTEER_DATA``); one is required."""
    folder = local_data_dir(path)
    if folder is None:
        raise SimsError(f"no evaluation data folder: pass --data-dir DIR or set ${DATA_ENV}")
    return folder


def _file(root: Path, relative: str) -> Path:
    path = root / relative
    if not path.is_file():
        raise SimsError(f"data file not found: {path} (the layout is that of tests/data: {relative})")
    return path


# Local readers: a data folder -> records.


def _read_mmlu(root: Path, split: str = "test") -> list[Record]:
    folder = root / "mmlu" / "mmlu" / split
    files = sorted(folder.glob(f"*_{split}.csv"))
    if not files:
        raise SimsError(
            f"no MMLU files in {folder} (the layout is that of tests/data: {LOCAL_FILES['mmlu']})"
        )
    records = []
    for path in files:
        subject = path.name[: -len(f"_{split}.csv")]
        with path.open(encoding="utf-8", newline="") as fh:
            for row in csv.reader(fh):
                records.append(
                    {"subject": subject, "question": row[0], "options": row[1:5], "answer": row[5]}
                )
    return records


def _reader(relative: str) -> Callable[[Path], list[Record]]:
    def read(root: Path) -> list[Record]:
        path = _file(root, relative)
        if path.suffix == ".json":
            return json.loads(path.read_text(encoding="utf-8"))
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                return [json.loads(line) for line in fh if line.strip()]
        return read_jsonl(path)

    return read


#: data set name -> its file (or folder) inside a local data folder
LOCAL_FILES: dict[str, str] = {
    "arc_easy": "arc/arc_easy_test_normalized.jsonl",
    "arc_challenge": "arc/arc_challenge_test_normalized.jsonl",
    "truthfulqa_mc1": "truthfulqa/data/v0/mc_task.json",
    "truthfulqa_mc2": "truthfulqa/data/v0/mc_task.json",
    "mmlu": "mmlu/mmlu/test/<subject>_test.csv",
    "hellaswag": "hellaswag/hellaswag_val_normalized.jsonl",
    "winogrande": "winogrande/winogrande_dev_normalized.jsonl",
    "sst2": "sst2/sst2_validation_normalized.jsonl",
    "alpaca_eval": "alpaca_eval/alpaca_eval_normalized.jsonl",
    "hh_rlhf": "hh_rlhf/harmless-base/test.jsonl.gz",
    "ultrafeedback": "ultrafeedback/data/processed/train_clean.jsonl",
}


def _local_records(name: str, root: Path) -> list[Record]:
    return _read_mmlu(root) if name == "mmlu" else _reader(LOCAL_FILES[name])(root)


def _from_hub(name: str, limit: int | None = None) -> tuple[list[Record], str]:
    source = HUB_SOURCES[name][0]
    try:
        return hub_records(name, limit), source.describe()
    except HubUnavailable as exc:
        raise SimsError(
            f"no data for {name}: put {LOCAL_FILES[name]} in a folder given by --data-dir DIR or "
            f"${DATA_ENV} (layout: tests/data), or let the datasets library reach {source.describe()} "
            f"({exc})"
        ) from None


def load_records(name: str, root: str | Path | None = None) -> tuple[list[Record], str]:
    """The records of data set ``name``: from the local folder when one is given
    (``root``, else ``$SIMSTEER_DATA``), else through the ``datasets`` library.

    Args:
        name: a key of :data:`LOCAL_FILES`.
        root: the local data folder (``--data-dir``).

    Returns:
        (records in the local file layout, where they came from).

    Raises:
        SimsError: the local folder lacks the file, or there is no local folder and the
            hub (or the ``datasets`` cache) cannot give the data set.
    """
    folder = local_data_dir(root)
    if folder is None:
        return _from_hub(name)
    return _local_records(name, folder), str(folder / LOCAL_FILES[name])


def load_mc_task(
    name: str, root: str | Path | None = None, limit: int | None = None, seed: int = 0
) -> list[MCItem]:
    """Items of a multiple-choice task, from the local data folder or the hub.

    Args:
        name: a key of :data:`MC_TASKS`.
        root: the local data folder (``--data-dir``; default ``$SIMSTEER_DATA``, then
            the hub through ``datasets``).
        limit: a seeded random subset of this size (the same subset for every policy
            and run with the same seed).
        seed: the subset's seed.
    """
    if name not in MC_TASKS:
        raise SimsError(f"unknown task {name!r}; tasks: {', '.join(MC_TASKS)}")
    items = MC_TASKS[name][0](load_records(name, root)[0])
    if limit is not None and limit < len(items):
        rng = random.Random(seed)
        items = [items[i] for i in sorted(rng.sample(range(len(items)), limit))]
    return items


@dataclass(frozen=True)
class AlpacaItem:
    instruction: str
    output: str
    generator: str | None = None
    dataset: str | None = None


def _alpaca_item(r: Record, where: str | Path) -> AlpacaItem:
    output = r.get("output", r.get("reference_output"))
    if "instruction" not in r or output is None:
        raise SimsError(f"{where}: each record needs instruction and output")
    return AlpacaItem(
        r["instruction"], output, r.get("generator", r.get("reference_generator")), r.get("dataset")
    )


def load_alpaca_outputs(path: str | Path) -> list[AlpacaItem]:
    """AlpacaEval ``model_outputs.json`` (a JSON list) or JSONL with ``instruction`` and
    ``output`` (or ``reference_output``) fields."""
    path = Path(path)
    if not path.is_file():
        raise SimsError(f"AlpacaEval file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else read_jsonl(path)
    except json.JSONDecodeError as exc:
        raise SimsError(f"{path} is not valid JSON ({exc.msg})") from None
    return [_alpaca_item(r, path) for r in rows]


def load_alpaca_reference(root: str | Path | None = None, limit: int | None = None) -> list[AlpacaItem]:
    """The AlpacaEval 2 instructions with the reference (gpt4_1106_preview) answers.

    Args:
        root: the local data folder (``--data-dir``; default ``$SIMSTEER_DATA``, then
            the hub through ``datasets``).
        limit: the first N instructions only.
    """
    folder = local_data_dir(root)
    if folder is not None:
        return load_alpaca_outputs(_file(folder, LOCAL_FILES["alpaca_eval"]))[:limit]
    records, where = _from_hub("alpaca_eval", limit)
    return [_alpaca_item(r, where) for r in records]


def load_alpaca_annotations(path: str | Path) -> list[dict[str, Any]]:
    """AlpacaEval annotations as ``{"preference": P(output_2 > output_1), "len_1", "len_2"}``.

    AlpacaEval codes preferences as 1 (output_1 better) .. 2 (output_2 better); 0 or 1.5
    is a tie; weighted annotators give floats in between. Missing verdicts give ``nan``.
    """
    rows = json.loads(Path(path).read_text(encoding="utf-8"))
    out = []
    for r in rows:
        pref = r.get("preference")
        p = float("nan") if pref is None else (0.5 if float(pref) == 0 else float(pref) - 1.0)
        out.append(
            {
                "preference": p,
                "len_1": len(r["output_1"]),
                "len_2": len(r["output_2"]),
                "generator_2": r.get("generator_2"),
            }
        )
    return out


@dataclass(frozen=True)
class PreferencePair:
    """A human preference: ``chosen`` was preferred to ``rejected`` for ``prompt``."""

    prompt: str
    chosen: str
    rejected: str


def _split_dialogue(text: str) -> tuple[str, str]:
    marker = "\n\nAssistant:"
    cut = text.rfind(marker)
    if cut < 0:
        raise SimsError("an HH-RLHF dialogue has no Assistant turn")
    return text[: cut + len(marker)].strip(), text[cut + len(marker) :].strip()


def _pair(r: Record, where: str) -> PreferencePair:
    if "chosen" not in r or "rejected" not in r:
        raise SimsError(f"{where}: a pair needs chosen and rejected")
    if "prompt" in r:
        return PreferencePair(r["prompt"], r["chosen"], r["rejected"])
    prompt, chosen = _split_dialogue(r["chosen"])
    _, rejected = _split_dialogue(r["rejected"])
    return PreferencePair(prompt, chosen, rejected)


def load_pairs(path: str | Path, limit: int | None = None) -> list[PreferencePair]:
    """Preference pairs from JSONL(.gz): HH-RLHF (``chosen`` / ``rejected`` dialogues; the
    prompt is the dialogue before the last Assistant turn) or ``prompt`` / ``chosen`` /
    ``rejected`` records (UltraFeedback)."""
    path = Path(path)
    if not path.is_file():
        raise SimsError(f"pairs file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    pairs = []
    with opener(path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            pairs.append(_pair(json.loads(line), f"{path}:{lineno}"))
            if limit is not None and len(pairs) >= limit:
                break
    return pairs


#: named sets of preference pairs (keys of :data:`LOCAL_FILES`)
PAIR_SETS = ("hh_rlhf", "ultrafeedback")


def load_pair_set(
    name: str, root: str | Path | None = None, limit: int | None = None
) -> tuple[list[PreferencePair], str]:
    """A named set of preference pairs: ``hh_rlhf`` (HH-RLHF harmless-base test) or
    ``ultrafeedback`` (UltraFeedback binarized, train).

    Args:
        name: one of :data:`PAIR_SETS`.
        root: the local data folder (``--data-dir``; default ``$SIMSTEER_DATA``, then
            the hub through ``datasets``).
        limit: the first N pairs only.

    Returns:
        (the pairs, where they came from: a file or a hub data set).
    """
    if name not in PAIR_SETS:
        raise SimsError(f"unknown pair set {name!r}; sets: {', '.join(PAIR_SETS)}")
    folder = local_data_dir(root)
    if folder is not None:
        path = _file(folder, LOCAL_FILES[name])
        return load_pairs(path, limit), str(path)
    records, where = _from_hub(name, limit)
    return [_pair(r, where) for r in records], where
