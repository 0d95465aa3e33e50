"""Multiple-choice tasks: records (a local file's layout) -> log-likelihood items.

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

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Record = dict[str, Any]

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


# Item builders: records (the local files' layout, or hub rows converted to it) -> items.


def _arc_items(records: list[Record]) -> list[MCItem]:
    return [
        _same_context(r["id"], f"Question: {r['question']}\nAnswer:", r["choices"], int(r["label"]))
        for r in records
    ]


def _truthfulqa_items(records: list[Record], variant: str) -> list[MCItem]:
    items = []
    for i, row in enumerate(records):
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


def _mmlu_items(records: list[Record]) -> list[MCItem]:
    items, seen = [], Counter()
    for r in records:
        subject, n = r["subject"], seen[r["subject"]]
        seen[subject] += 1
        topic = subject.replace("_", " ")
        body = "\n".join(f"{k}. {o}" for k, o in zip("ABCD", r["options"], strict=True))
        context = (
            f"The following are multiple choice questions (with answers) about {topic}.\n\n"
            f"{r['question'].strip()}\n{body}\nAnswer:"
        )
        label = "ABCD".index(r["answer"].strip())
        items.append(_same_context(f"{subject}_test-{n}", context, list("ABCD"), label))
    return items


def _hellaswag_items(records: list[Record]) -> list[MCItem]:
    return [_same_context(r["id"], r["query"], r["endings"], int(r["label"])) for r in records]


def _winogrande_items(records: list[Record]) -> list[MCItem]:
    items = []
    for r in records:
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


def _sst2_items(records: list[Record]) -> list[MCItem]:
    question = "\nQuestion: Is this sentence positive or negative?\nAnswer:"
    return [
        _same_context(r["id"], r["sentence"] + question, ["negative", "positive"], int(r["label"]))
        for r in records
    ]


#: task name -> (item builder from records, headline metric)
MC_TASKS: dict[str, tuple[Callable[[list[Record]], list[MCItem]], str]] = {
    "truthfulqa_mc1": (lambda r: _truthfulqa_items(r, "mc1"), "acc"),
    "truthfulqa_mc2": (lambda r: _truthfulqa_items(r, "mc2"), "mc2"),
    "arc_easy": (_arc_items, "acc"),
    "arc_challenge": (_arc_items, "acc_norm"),
    "mmlu": (_mmlu_items, "acc"),
    "hellaswag": (_hellaswag_items, "acc_norm"),
    "winogrande": (_winogrande_items, "acc"),
    "sst2": (_sst2_items, "acc"),
}
