#!/usr/bin/env bash
# The README's evaluation experiment: vanilla, MS, random split, best-of-N and SIMS on the
# embedded model (and SIMS-PR / SIMS-CS) with the same prompts, oracle (sentiment) and learner (CAA), then one
# evaluation per method and a comparison table. About 30 minutes on a busy 2-core CPU.
set -euo pipefail
OUT=${1:-runs/exp}
SIMS=${SIMS:-.venv/bin/sims}
RUN=(-T 3 -N 12 -K 4 --eval-prompts 24 --max-new-tokens 32 --fluency-budget off --quiet)
EVAL=(--judge readability --mc truthfulqa_mc1,arc_easy --mc-limit 50)

[ -f "$OUT/sims/summary.json" ] || $SIMS run "${RUN[@]}" --out "$OUT/sims" || $SIMS run --resume "$OUT/sims" --quiet
[ -f "$OUT/vanilla/config.json" ] || $SIMS baseline vanilla --like "$OUT/sims" -o "$OUT/vanilla"
[ -f "$OUT/best-of-4/config.json" ] || $SIMS baseline best-of-n --n 4 --like "$OUT/sims" -o "$OUT/best-of-4"
[ -f "$OUT/ms/config.json" ] || $SIMS baseline ms --like "$OUT/sims" -o "$OUT/ms" --pairs-limit 128 --max-response-tokens 64
# SIMS-PR (top/bottom answer per prompt) and SIMS-CS (response bank), same oracle and learner.
[ -f "$OUT/pr/summary.json" ] || $SIMS run "${RUN[@]}" --variant pr --oracle sentiment --out "$OUT/pr" || $SIMS run --resume "$OUT/pr" --quiet
[ -f "$OUT/cs/summary.json" ] || $SIMS run "${RUN[@]}" --variant cs --out "$OUT/cs" || $SIMS run --resume "$OUT/cs" --quiet
[ -f "$OUT/random/summary.json" ] || $SIMS baseline random --like "$OUT/sims" -o "$OUT/random" --quiet
for m in vanilla best-of-4 ms random sims pr cs; do
  [ -f "$OUT/$m/eval.json" ] || $SIMS eval "$OUT/$m" "${EVAL[@]}"
done
$SIMS compare "$OUT"/{vanilla,best-of-4,ms,random,sims,pr,cs} --judge readability -o "$OUT/compare"
