#!/usr/bin/env bash
# README's experiment: every method on the embedded model, 3 seeds, the same 100 held-out
# prompts, pooled by benchmarks/experiment_table.py (mean and 95% interval across seeds and
# prompts of the oracle's score, an untrained attribute, perplexity, and cost).
#
#   vanilla     the unsteered model
#   ms          CAA on labelled pairs (UltraFeedback; needs DATA, see below)
#   random      the loop with random preferences (same sampling, no oracle signal)
#   best-of-4   4 samples per prompt at answer time, the oracle picks (the loop's K)
#   dpo         LoRA + DPO on exactly the pairs the sims-caa run's oracle labelled
#   sims-caa    SIMS with CAA; sims-bipo / sims-pca: the same loop, other learners
#   sims-cs     SIMS-CS (response bank), CAA
#
# The loop scores its policies on the first LOOP_EVAL held-out prompts (default 16; it picks
# the final policy with them); `sims eval` then answers all HELD_OUT prompts for the table.
#
# Usage: benchmarks/eval_experiment.sh [OUT] (resumable: finished steps are skipped).
# Smaller, to check the commands: SEEDS=0 HELD_OUT=6 T=1 N=2 K=2 TOKENS=8 benchmarks/eval_experiment.sh /tmp/exp
# DATA: the folder holding ultrafeedback/ for ms (default ../shared/data; ms is skipped
# when it is missing). Several hours on a 2-core CPU; run it alone.
set -euo pipefail
OUT=${1:-runs/experiment}
SIMS=${SIMS:-.venv/bin/sims}
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data}
SEEDS=${SEEDS:-"0 1 2"}
HELD_OUT=${HELD_OUT:-100}
RUN=(-T "${T:-2}" -N "${N:-12}" -K "${K:-4}" --max-new-tokens "${TOKENS:-48}" --quiet)
DPO=(--dpo-epochs "${DPO_EPOCHS:-2}")  # one epoch barely moves the DPO loss on a few hundred pairs

mkdir -p "$OUT"
# One split for every seed: the first HELD_OUT prompts of a fixed shuffle are held out.
if [ ! -f "$OUT/pool.jsonl" ]; then
  "$PY" - "$OUT" "$HELD_OUT" <<'EOF'
import json, random, sys
from pathlib import Path
from simsteer.prompts import load_prompts
out, n = Path(sys.argv[1]), int(sys.argv[2])
rows = [{"id": p.id, "prompt": p.text} for p in load_prompts()]
random.Random(12345).shuffle(rows)
(out / "held_out.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:n]))
(out / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[n:]))
EOF
fi
head -n "${LOOP_EVAL:-16}" "$OUT/held_out.jsonl" >"$OUT/held_out_loop.jsonl"
PROMPTS=(--prompts "$OUT/pool.jsonl" --eval-prompts-file "$OUT/held_out_loop.jsonl")

run() {  # run DIR [sims run options]: start or resume one loop
  local dir=$1; shift
  [ -f "$dir/summary.json" ] || $SIMS run "${RUN[@]}" "${PROMPTS[@]}" "$@" --out "$dir" \
    || $SIMS run --resume "$dir" --quiet
}

for S in $SEEDS; do
  D="$OUT/seed_$S"
  run "$D/sims-caa" --seed "$S"
  run "$D/sims-bipo" --seed "$S" --learner bipo
  run "$D/sims-pca" --seed "$S" --learner pca
  run "$D/sims-cs" --seed "$S" --variant cs
  [ -f "$D/vanilla/config.json" ] || $SIMS baseline vanilla --like "$D/sims-caa" -o "$D/vanilla"
  [ -f "$D/best-of-4/config.json" ] || $SIMS baseline best-of-n --n 4 --like "$D/sims-caa" -o "$D/best-of-4"
  [ -f "$D/random/summary.json" ] || $SIMS baseline random --like "$D/sims-caa" -o "$D/random" --quiet
  [ -f "$D/dpo/config.json" ] || $SIMS baseline dpo --like "$D/sims-caa" -o "$D/dpo" "${DPO[@]}" --quiet
  if [ -d "$DATA/ultrafeedback" ]; then
    [ -f "$D/ms/config.json" ] || $SIMS baseline ms --like "$D/sims-caa" -o "$D/ms" --data "$DATA" \
      --pairs-limit 128 --max-response-tokens 64
  fi
  for m in "$D"/*/; do
    [ -f "$m/eval.json" ] || $SIMS eval "$m" --judge readability --prompts "$OUT/held_out.jsonl"
  done
done
"$PY" benchmarks/experiment_table.py "$OUT" --json "$OUT/table.json" | tee "$OUT/table.md"
