"""Cut the small data slices in tests/data from a full data folder (same layout).

Usage: python tests/data/cut_slices.py /work/shared/data
Each slice is the first N records of the file, kept in the file's own format.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
N = 24

JSONL = [
    "arc/arc_easy_test_normalized.jsonl",
    "arc/arc_challenge_test_normalized.jsonl",
    "hellaswag/hellaswag_val_normalized.jsonl",
    "winogrande/winogrande_dev_normalized.jsonl",
    "sst2/sst2_validation_normalized.jsonl",
]
SHORT_JSONL = [  # long records: fewer of them
    "alpaca_eval/alpaca_eval_normalized.jsonl",
    "ultrafeedback/data/processed/train_clean.jsonl",
]
MMLU_SUBJECTS = ["abstract_algebra", "anatomy", "high_school_geography"]


def _lines(src: Path, n: int) -> list[str]:
    opener = gzip.open if src.suffix == ".gz" else open
    with opener(src, "rt", encoding="utf-8", newline="") as fh:
        return [line for _, line in zip(range(n), fh, strict=False)]


def _write(relative: str, text: str) -> None:
    dest = HERE / relative
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.suffix == ".gz":
        # mtime=0: the same bytes on every cut
        with gzip.GzipFile(dest, "wb", mtime=0) as fh:
            fh.write(text.encode("utf-8"))
    else:
        dest.write_text(text, encoding="utf-8", newline="")


def main(root: Path) -> None:
    for rel in JSONL:
        _write(rel, "".join(_lines(root / rel, N)))
    for rel in SHORT_JSONL:
        _write(rel, "".join(_lines(root / rel, N // 2)))
    rel = "hh_rlhf/harmless-base/test.jsonl.gz"
    _write(rel, "".join(_lines(root / rel, N)))
    rel = "truthfulqa/data/v0/mc_task.json"
    rows = json.loads((root / rel).read_text(encoding="utf-8"))[:N]
    _write(rel, json.dumps(rows, indent=1, ensure_ascii=False) + "\n")
    for subject in MMLU_SUBJECTS:
        rel = f"mmlu/mmlu/test/{subject}_test.csv"
        _write(rel, "".join(_lines(root / rel, N // len(MMLU_SUBJECTS))))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
