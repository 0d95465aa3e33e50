"""The preference pairs a run's oracle labelled, as DPO trains on them.

The DPO baseline (:mod:`.dpo`) must spend the same oracle budget as the run it mirrors,
so it trains on exactly the judgments the run made, nothing more:

- variants ``sims`` and ``pr``: in every iteration, for every prompt, each answer labelled
  D+ (``positive``) is paired with each answer of the same prompt and iteration labelled
  D- (``negative``): a prompt with a D+ and b D- answers gives a * b pairs. Ties, unused
  and skipped answers give none.
- variant ``cs``: the (best, worst) pairs of ``iter_<t>/train_pairs.jsonl``, which the
  loop trained on; a bank entry picked again in a later iteration counts once.

Order: iteration, then the prompts and answers in the order the run wrote them, so the
same run always gives the same list. A cap keeps an evenly spaced subset (every
iteration stays represented). Pairs whose two answers are the same text, or where either
answer has no token, teach nothing and are left out.

A pair is tokenised the way the model saw it when sampling: the prompt in the model's
chat template (:func:`~simsteer.tokens.encode_prompt`), the answer's tokens after it, and
the end-of-sequence token only when the model emitted it (``finished``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import SimsError
from ..loop.records import SampleRecord
from ..loop.rundir import RunDir
from ..tokens import encode_prompt, encode_response


@dataclass(frozen=True)
class DPOPair:
    """One (prompt, preferred, dispreferred) triple the run's oracle decided.

    Attributes:
        iteration: the iteration whose judgment it is.
        prompt_id: the prompt's id in the run.
        prompt: the user's text (no chat template).
        chosen, rejected: the D+ and the D- answer.
        chosen_finished, rejected_finished: whether the model ended the answer itself
            (then the end-of-sequence token is trained on too).
    """

    iteration: int
    prompt_id: str
    prompt: str
    chosen: str
    rejected: str
    chosen_finished: bool = True
    rejected_finished: bool = True

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _iterations(run: RunDir) -> list[int]:
    t, out = 0, []
    while run.iteration(t).is_dir():
        out.append(t)
        t += 1
    return out


def run_pairs(path: str | Path, max_pairs: int | None = None) -> list[DPOPair]:
    """Every preference pair the run's oracle labelled (the module docstring has the rule).

    Args:
        path: the run directory.
        max_pairs: keep at most this many, evenly spaced over the ordered list.

    Example:
        >>> pairs = run_pairs("runs/sims", max_pairs=256)
    """
    run = RunDir(Path(path))
    if not run.is_run():
        raise SimsError(f"{path} is not a run directory (no config.json)")
    if max_pairs is not None and max_pairs < 1:
        raise SimsError(f"--max-pairs must be >= 1, got {max_pairs}")
    samples: dict[tuple[int, str, int], SampleRecord] = {}
    pairs: list[DPOPair] = []
    seen: set[tuple[int, str, int, int]] = set()
    for t in _iterations(run):
        rows = run.read_samples(t) if run.samples(t).is_file() else []
        samples.update({(r.iteration, r.prompt_id, r.sample): r for r in rows})
        bank_pairs = run.read_pairs(t)
        if bank_pairs is not None:  # SIMS-CS: the pairs the loop trained on
            for pos, neg in zip(bank_pairs[::2], bank_pairs[1::2], strict=True):
                key = (pos.iteration, pos.prompt_id, pos.sample, neg.sample)
                if key in seen or (pos.label, neg.label) != ("positive", "negative"):
                    continue
                seen.add(key)
                p_row = samples.get((pos.iteration, pos.prompt_id, pos.sample))
                n_row = samples.get((neg.iteration, neg.prompt_id, neg.sample))
                pairs.append(
                    DPOPair(
                        pos.iteration,
                        pos.prompt_id,
                        pos.prompt,
                        pos.response,
                        neg.response,
                        p_row.finished if p_row else True,
                        n_row.finished if n_row else True,
                    )
                )
            continue
        groups: dict[str, list[SampleRecord]] = {}
        for r in rows:  # dicts keep insertion order: prompts as the run wrote them
            groups.setdefault(r.prompt_id, []).append(r)
        for group in groups.values():
            positive = [r for r in group if r.label == "positive"]
            negative = [r for r in group if r.label == "negative"]
            for p in positive:
                for n in negative:
                    pairs.append(
                        DPOPair(t, p.prompt_id, p.prompt, p.response, n.response, p.finished, n.finished)
                    )
    pairs = [p for p in pairs if p.chosen != p.rejected]
    if max_pairs is not None and len(pairs) > max_pairs:
        step = len(pairs) / max_pairs
        pairs = [pairs[int(i * step)] for i in range(max_pairs)]
    return pairs


def end_token_id(tokenizer: Any, model: Any = None) -> int | None:
    """The end-of-sequence id appended to answers the model finished itself: the
    tokenizer's, else the generation config's first."""
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    gen = getattr(model, "generation_config", None)
    value = getattr(gen, "eos_token_id", None)
    value = value[0] if isinstance(value, list) and value else value
    return int(value) if value is not None else None


def encode_dpo_pair(tokenizer: Any, pair: DPOPair, eos_id: int | None) -> dict[str, list[int]]:
    """Token ids of a pair: ``prompt_ids`` (chat template applied), ``chosen_ids`` and
    ``rejected_ids`` (the answer, then ``eos_id`` when the model finished it).

    Args:
        tokenizer: the model's tokenizer.
        pair: the pair.
        eos_id: the end-of-sequence id (``None``: never appended).
    """

    def answer(text: str, finished: bool) -> list[int]:
        ids = encode_response(tokenizer, text)
        return [*ids, eos_id] if finished and eos_id is not None else ids

    return {
        "prompt_ids": encode_prompt(tokenizer, pair.prompt),
        "chosen_ids": answer(pair.chosen, pair.chosen_finished),
        "rejected_ids": answer(pair.rejected, pair.rejected_finished),
    }


def encode_dpo_pairs(
    tokenizer: Any, pairs: list[DPOPair], eos_id: int | None
) -> tuple[list[dict[str, list[int]]], list[DPOPair]]:
    """Encode ``pairs``, leaving out those whose two answers have the same tokens or where
    either answer has none; returns the rows and the pairs they came from."""
    rows, kept = [], []
    for pair in pairs:
        row = encode_dpo_pair(tokenizer, pair, eos_id)
        if row["chosen_ids"] and row["rejected_ids"] and row["chosen_ids"] != row["rejected_ids"]:
            rows.append(row)
            kept.append(pair)
    return rows, kept
