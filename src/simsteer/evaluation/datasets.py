"""Readers for the evaluation data: multiple-choice tasks, AlpacaEval files and
preference pairs. Nothing here is needed by ``sims run``; these files are read only by
``sims eval`` / ``sims judge-check`` from a data folder (``--data``, default
``$SIMSTEER_DATA`` or ``../shared/data``; layout in ``shared/data/README.md``).

Multiple-choice prompts follow lm-evaluation-harness's zero-shot task definitions (plain
text, no chat template; each choice is a continuation after a single space):

- ``arc_easy`` / ``arc_challenge``: ``"Question: {q}\\nAnswer:"`` -> ``" {choice}"``;
- ``truthfulqa_mc1`` / ``truthfulqa_mc2`` (the v0 ``mc_task.json`` = HF ``truthful_qa``):
  the six-shot QA primer, then ``"\\n\\nQ: {q}\\nA:"`` -> ``" {answer}"``;
- ``mmlu``: ``"The following are multiple choice questions (with answers) about
  {subject}.\\n\\n{q}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:"`` -> ``" A"`` .. ``" D"``;
- ``hellaswag``: ``"{activity}: {context}"`` -> ``" {ending}"`` (the shared file's
  preprocessing; lm-eval also capitalises the second context sentence, which this file
  cannot recover);
- ``winogrande``: partial scoring: contexts ``sentence[:blank] + option``, the shared
  continuation ``" " + sentence[blank + 1:]``;
- ``sst2``: ``"{sentence}\\nQuestion: Is this sentence positive or negative?\\nAnswer:"``
  -> ``" negative"`` / ``" positive"``.
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

# The TruthfulQA paper's QA primer (the "QA" prompt lm-eval uses for truthfulqa_mc*).
TRUTHFULQA_PRIMER = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)


def data_dir(path: str | Path | None = None) -> Path:
    """The evaluation data folder: ``path``, ``$SIMSTEER_DATA`` or ``../shared/data``."""
    folder = Path(path or os.environ.get("SIMSTEER_DATA") or "../shared/data")
    if not folder.is_dir():
        raise SimsError(f"evaluation data folder not found: {folder} (pass --data DIR)")
    return folder


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question as log-likelihood requests.

    Attributes:
        contexts: one context per choice (equal except for partial scoring).
        continuations: the text scored after each context.
        label: index of the correct choice.
        true_choices: for MC2, which choices are true (the metric is their
            normalised probability mass).
    """

    id: str
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    label: int
    true_choices: tuple[bool, ...] | None = None


def _same_context(item_id: Any, context: str, choices: list[str], label: int) -> MCItem:
    return MCItem(
        id=str(item_id),
        contexts=tuple(context for _ in choices),
        continuations=tuple(" " + c for c in choices),
        label=label,
    )


def _file(root: Path, relative: str) -> Path:
    path = root / relative
    if not path.is_file():
        raise SimsError(f"task file not found: {path}")
    return path


def load_arc(root: Path, subset: str = "easy") -> list[MCItem]:
    path = _file(root, f"arc/arc_{subset}_test_normalized.jsonl")
    return [
        _same_context(r["id"], f"Question: {r['question']}\nAnswer:", r["choices"], int(r["label"]))
        for r in read_jsonl(path)
    ]


def load_truthfulqa(root: Path, variant: str = "mc1") -> list[MCItem]:
    path = _file(root, "truthfulqa/data/v0/mc_task.json")
    rows = json.loads(path.read_text(encoding="utf-8"))
    items = []
    for i, row in enumerate(rows):
        targets: dict[str, int] = row[f"{variant}_targets"]
        choices, labels = list(targets), [int(v) for v in targets.values()]
        context = f"{TRUTHFULQA_PRIMER}\n\nQ: {row['question']}\nA:"
        item = _same_context(i, context, choices, labels.index(1))
        if variant == "mc2":
            item = MCItem(
                item.id, item.contexts, item.continuations, item.label, tuple(bool(v) for v in labels)
            )
        items.append(item)
    return items


def load_mmlu(root: Path, split: str = "test") -> list[MCItem]:
    folder = root / "mmlu" / "mmlu" / split
    files = sorted(folder.glob(f"*_{split}.csv"))
    if not files:
        raise SimsError(f"no MMLU files in {folder}")
    items = []
    for path in files:
        subject = path.name[: -len(f"_{split}.csv")].replace("_", " ")
        with path.open(encoding="utf-8", newline="") as fh:
            for n, row in enumerate(csv.reader(fh)):
                question, options, answer = row[0], row[1:5], row[5].strip()
                body = "\n".join(f"{k}. {o}" for k, o in zip("ABCD", options, strict=True))
                context = (
                    f"The following are multiple choice questions (with answers) about {subject}.\n\n"
                    f"{question.strip()}\n{body}\nAnswer:"
                )
                items.append(_same_context(f"{path.stem}-{n}", context, list("ABCD"), "ABCD".index(answer)))
    return items


def load_hellaswag(root: Path) -> list[MCItem]:
    path = _file(root, "hellaswag/hellaswag_val_normalized.jsonl")
    return [_same_context(r["id"], r["query"], r["endings"], int(r["label"])) for r in read_jsonl(path)]


def load_winogrande(root: Path) -> list[MCItem]:
    path = _file(root, "winogrande/winogrande_dev_normalized.jsonl")
    items = []
    for r in read_jsonl(path):
        sentence = r["sentence"]
        blank = sentence.index("_")
        rest = " " + sentence[blank + 1 :].strip()
        options = [r["option1"], r["option2"]]
        items.append(
            MCItem(
                id=str(r["id"]),
                contexts=tuple(sentence[:blank] + o for o in options),
                continuations=(rest, rest),
                label=int(r["answer"]) - 1,
            )
        )
    return items


def load_sst2(root: Path) -> list[MCItem]:
    path = _file(root, "sst2/sst2_validation_normalized.jsonl")
    question = "\nQuestion: Is this sentence positive or negative?\nAnswer:"
    return [
        _same_context(r["id"], r["sentence"] + question, ["negative", "positive"], int(r["label"]))
        for r in read_jsonl(path)
    ]


#: task name -> (loader, headline metric)
MC_TASKS: dict[str, tuple[Callable[[Path], list[MCItem]], str]] = {
    "truthfulqa_mc1": (lambda r: load_truthfulqa(r, "mc1"), "acc"),
    "truthfulqa_mc2": (lambda r: load_truthfulqa(r, "mc2"), "mc2"),
    "arc_easy": (lambda r: load_arc(r, "easy"), "acc"),
    "arc_challenge": (lambda r: load_arc(r, "challenge"), "acc_norm"),
    "mmlu": (load_mmlu, "acc"),
    "hellaswag": (load_hellaswag, "acc_norm"),
    "winogrande": (load_winogrande, "acc"),
    "sst2": (load_sst2, "acc"),
}


def load_mc_task(
    name: str, root: str | Path | None = None, limit: int | None = None, seed: int = 0
) -> list[MCItem]:
    """Items of a multiple-choice task; ``limit`` takes a seeded random subset (the same
    subset for every policy and run with the same seed)."""
    if name not in MC_TASKS:
        raise SimsError(f"unknown task {name!r}; tasks: {', '.join(MC_TASKS)}")
    items = MC_TASKS[name][0](data_dir(root))
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
    out = []
    for r in rows:
        output = r.get("output", r.get("reference_output"))
        if "instruction" not in r or output is None:
            raise SimsError(f"{path}: each record needs instruction and output")
        out.append(
            AlpacaItem(
                r["instruction"], output, r.get("generator", r.get("reference_generator")), r.get("dataset")
            )
        )
    return out


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
            r = json.loads(line)
            if "chosen" not in r or "rejected" not in r:
                raise SimsError(f"{path}:{lineno}: a pair needs chosen and rejected")
            if "prompt" in r:
                pairs.append(PreferencePair(r["prompt"], r["chosen"], r["rejected"]))
            else:
                prompt, chosen = _split_dialogue(r["chosen"])
                _, rejected = _split_dialogue(r["rejected"])
                pairs.append(PreferencePair(prompt, chosen, rejected))
            if limit is not None and len(pairs) >= limit:
                break
    return pairs
