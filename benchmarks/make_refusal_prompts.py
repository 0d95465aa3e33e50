"""Cut the refusal use case's prompt files from the shared data sets (provenance script).

Writes ``src/simsteer/data/harmful_prompts.jsonl`` and ``benign_prompts.jsonl``; the
package ships its output, so users never run this. Deterministic: the same data give
byte-identical files.

- harmful: the first human turn of each Anthropic HH-RLHF harmless-base test dialogue
  (red-team requests), kept when it asks for something (a request pattern) about a harmful
  topic (a keyword list below), is not defensive (preventing, reporting, legality), is one
  line of 20-200 characters and holds no URL; case/punctuation twins are kept once; then
  sorted by a SHA-256 of its text. The first ``--heldout`` become ``harmful-test-NNN``,
  the next ``--train`` ``harmful-train-NNN``: the split is in the id.
- benign: AlpacaEval 2.0 instructions from its ``helpful_base`` subset (Anthropic HH-RLHF
  helpful-base prompts, MIT, unlike the rest of AlpacaEval's data, CC BY-NC 4.0), of
  15-240 characters on one line, sorted by a SHA-256 of their text, the first ``--benign``
  kept as ``benign-NNN``.

Usage: python benchmarks/make_refusal_prompts.py --data ../shared/data
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "simsteer" / "data"

# A request: the speaker wants instructions, help or content.
REQUEST = re.compile(
    r"(^|[.?!]\s+)(how (do|can|could|would|should) (i|you|we|someone|one)|how to|"
    r"what('s| is| are) (the )?(best|easiest|quickest|simplest|good|some)|"
    r"can you|could you|would you|will you|help me|tell me|teach me|show me|"
    r"give me|i want to|i need to|i'd like to|i would like to|where (can|could|do) i|is there a way|"
    r"what should i|what can i|what would be|which)\b",
    re.I,
)
# Harmful topics (crime, violence, weapons, drugs, abuse, harassment, fraud, privacy).
HARM = re.compile(
    r"\b(steal\w*|stole|rob\w*|shoplift\w*|burglar\w*|break into|pickpocket\w*|kill\w*|murder\w*|"
    r"poison\w*|hurt\w*|harm\w*|injur\w*|beat (up|him|her|them|someone)|punch\w*|stab\w*|shoot\w*|"
    r"torture\w*|kidnap\w*|hostage|bomb\w*|explosive\w*|gun\w*|weapon\w*|drug\w*|cocaine|heroin|meth\w*|"
    r"crack|weed|marijuana|lsd|hack\w*|scam\w*|fraud\w*|counterfeit\w*|forge\w*|fake id|launder\w*|"
    r"blackmail\w*|extort\w*|bully\w*|cyberbull\w*|harass\w*|stalk\w*|spy on|insult\w*|slur\w*|"
    r"revenge|cheat\w*|lie to|arson|burn down|set fire|vandal\w*|smuggl\w*|sneak\w*|illegal\w*|"
    r"get away with|without getting caught|without anyone knowing|home address|social security|"
    r"credit card number|password|prank\w*|racist|embarrass\w*|humiliat\w*|trespass\w*|"
    r"evade|tax evasion|bribe\w*|dox\w*|abuse\w*|rape|sex\w*|nude\w*|porn\w*)\b",
    re.I,
)
# Defensive or curious questions about those topics (how to prevent theft, is it legal).
DEFENSIVE = re.compile(
    r"\b(prevent\w*|protect\w*|avoid\w*|stop \w+ from|safe\w*|report\w*|legal(ly)?|defend\w*)\b", re.I
)


def _key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def harmful_requests(path: Path) -> list[str]:
    """Distinct first human turns of HH-RLHF dialogues that read as harmful requests."""
    seen: dict[str, str] = {}  # normalised text -> first spelling (case/punctuation twins)
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            match = re.match(r"\s*Human: (.*?)\n\nAssistant:", json.loads(line)["chosen"], re.S)
            if match is None or "\n" in match.group(1).strip():
                continue
            text = " ".join(match.group(1).split())
            if (
                20 <= len(text) <= 200
                and "http" not in text
                and REQUEST.search(text)
                and HARM.search(text)
                and not DEFENSIVE.search(text)
            ):
                seen.setdefault(re.sub(r"\W+", " ", text.lower()).strip(), text)
    return sorted(seen.values(), key=_key)


def benign_instructions(path: Path) -> list[str]:
    """Distinct one-line AlpacaEval ``helpful_base`` instructions of 15-240 characters (the
    subset that comes from HH-RLHF and keeps its MIT license)."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if r.get("dataset") == "helpful_base"]
    keep = {r["instruction"].strip() for r in rows if "\n" not in r["instruction"].strip()}
    return sorted((t for t in keep if 15 <= len(t) <= 240), key=_key)


def _write(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data", help="folder holding hh_rlhf/ and alpaca_eval/")
    parser.add_argument("--train", type=int, default=200, help="harmful training prompts")
    parser.add_argument("--heldout", type=int, default=100, help="harmful held-out prompts")
    parser.add_argument("--benign", type=int, default=200, help="benign instructions")
    args = parser.parse_args()
    data = Path(args.data)
    harmful = harmful_requests(data / "hh_rlhf" / "harmless-base" / "test.jsonl.gz")
    if len(harmful) < args.train + args.heldout:
        raise SystemExit(f"only {len(harmful)} harmful requests pass the filter")
    rows = [{"id": f"harmful-test-{i:03d}", "prompt": t} for i, t in enumerate(harmful[: args.heldout])]
    train = harmful[args.heldout : args.heldout + args.train]
    rows += [{"id": f"harmful-train-{i:03d}", "prompt": t} for i, t in enumerate(train)]
    _write(OUT / "harmful_prompts.jsonl", rows)
    benign = benign_instructions(data / "alpaca_eval" / "alpaca_eval_normalized.jsonl")[: args.benign]
    _write(
        OUT / "benign_prompts.jsonl", [{"id": f"benign-{i:03d}", "prompt": t} for i, t in enumerate(benign)]
    )
    print(
        f"{len(harmful)} harmful requests passed the filter; wrote {len(rows)} harmful, {len(benign)} benign"
    )


if __name__ == "__main__":
    main()
