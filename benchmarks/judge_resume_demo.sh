#!/usr/bin/env bash
# Demonstration (issue acceptance): the LLM-judge oracle runs an iteration against a real
# `sims serve` process on loopback; killing the server mid-iteration gives a clear one-line
# error, and `--resume` after restarting it finishes without re-asking cached judgments.
#
# 1. start `sims serve` (embedded model, unsteered) on a free loopback port;
# 2. start a tiny `sims run --oracle judge` against it (-T 1 -N 4 -K 2: 8 pairwise
#    judgments per iteration) with its own judgment cache;
# 3. once the cache holds a judgment, kill the server (SIGKILL) and show the run's error
#    and exit code;
# 4. restart the server on the same port, `sims run --resume`, and print each iteration's
#    judge requests vs cache hits from summary.json.
# A few minutes on a busy 2-core CPU.
#
# Usage: OMP_NUM_THREADS=1 benchmarks/judge_resume_demo.sh [WORK_DIR]
set -uo pipefail
SIMS=${SIMS:-.venv/bin/sims}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
WORK=${1:-$(mktemp -d /tmp/judge_resume_demo.XXXXXX)}
mkdir -p "$WORK"
PORT=${PORT:-$($PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
URL=http://127.0.0.1:$PORT/v1
CACHE=$WORK/judgments.sqlite
OUT=$WORK/run
RUN=(--oracle judge --judge-model simsteer --judge-base-url "$URL" --judge-cache "$CACHE"
     --judge-retries 2 -T 1 -N 4 -K 2 --eval-prompts 2 --fluency-budget off
     --max-new-tokens 24 --quiet -o "$OUT")
SERVER= RUN_PID=
trap '[ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null; [ -n "$RUN_PID" ] && kill "$RUN_PID" 2>/dev/null' EXIT

start_server() {
  $SIMS serve --port "$PORT" >>"$WORK/serve.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && { echo "server pid $SERVER healthy on $URL"; return 0; }
    kill -0 "$SERVER" 2>/dev/null || { echo "server died:"; tail -5 "$WORK/serve.log"; exit 1; }
    sleep 0.5
  done
  echo "server did not come up"; exit 1
}

cached() {  # judgments in the cache file (0 before it exists)
  $PY - "$CACHE" <<'EOF'
import sqlite3, sys
try:
    print(sqlite3.connect(sys.argv[1], timeout=30).execute("SELECT COUNT(*) FROM answers").fetchone()[0])
except sqlite3.Error:
    print(0)
EOF
}

echo "== 1. sims serve (work dir $WORK)"
start_server

echo "== 2. sims run ${RUN[*]}"
$SIMS run "${RUN[@]}" >"$WORK/run1.out" 2>"$WORK/run1.err" &
RUN_PID=$!
while kill -0 "$RUN_PID" 2>/dev/null && [ "$(cached)" -lt 1 ]; do sleep 0.5; done
BEFORE=$(cached)
echo "== 3. $BEFORE judgment(s) cached: kill -9 the server mid-iteration"
kill -9 "$SERVER"; wait "$SERVER" 2>/dev/null; SERVER=
wait "$RUN_PID"; RC=$?; RUN_PID=
echo "sims run exit code: $RC; its stderr ($(wc -l <"$WORK/run1.err") line(s)):"
cat "$WORK/run1.err"
AFTER_KILL=$(cached)
echo "judgments cached when the run stopped: $AFTER_KILL"

echo "== 4. restart the server, then sims run --resume $OUT"
start_server
$SIMS run --resume "$OUT" --quiet >"$WORK/run2.out" 2>"$WORK/run2.err"
RC2=$?
echo "sims run --resume exit code: $RC2"
cat "$WORK/run2.err"
cat "$WORK/run2.out"
kill "$SERVER"; wait "$SERVER" 2>/dev/null; SERVER=

echo "== 5. judge traffic per iteration (summary.json)"
$PY - "$OUT/summary.json" "$AFTER_KILL" "$(cached)" <<'EOF'
import json, sys
rows = json.load(open(sys.argv[1]))
rows = rows.get("history", rows) if isinstance(rows, dict) else rows
print(f"{'iteration':>9} {'judge_requests':>14} {'judge_cache_hits':>16} {'parse_failures':>14}")
for r in rows:
    print(f"{r['iteration']:>9} {r.get('judge_requests', '-'):>14} {r.get('judge_cache_hits', '-'):>16} "
          f"{r.get('judge_parse_failures', '-'):>14}")
hits = rows[0].get("judge_cache_hits", 0)
print(f"cached before the kill: {sys.argv[2]}; iteration 0 cache hits on resume: {hits}; "
      f"cache now holds {sys.argv[3]} judgments")
ok = hits == int(sys.argv[2])
print("OK: no cached judgment was asked again" if ok else "MISMATCH: cached judgments were re-asked")
sys.exit(0 if ok else 1)
EOF
