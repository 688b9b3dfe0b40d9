#!/usr/bin/env bash
# The cost of constrained decoding: one `tandem serve`, driven by `tandem bench serve` on the
# same prompts with and without a JSON-schema `response_format`, alternating A B B A, at 1 and
# 8 concurrent; prints generated tokens/s and TPOT p50 for both and the throughput ratio.
#
# Usage: scripts/bench_structured.sh
# Env: ROUNDS (2, each A B B A), PROMPT_LEN (128), GEN_LEN (128)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=${ROUNDS:-2}
PROMPT_LEN=${PROMPT_LEN:-128}
GEN_LEN=${GEN_LEN:-128}
# A list of records too long to finish within GEN_LEN tokens: both sides generate the same
# number of tokens, so the difference is the cost of the constraint (masks every token, the
# structure closing and opening every few tokens).
SCHEMA='{"type": "json_schema", "json_schema": {"name": "items", "schema": {"type": "array", "minItems": 60, "items": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "count": {"type": "integer"}}, "required": ["name", "count"], "additionalProperties": false}}}}'

cargo build --release -q --bin tandem --manifest-path "$ROOT/Cargo.toml"
TANDEM="$ROOT/target/release/tandem"
"$TANDEM" generate --prompt warmup --max-new-tokens 1 --greedy >/dev/null   # fetches the model
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
LOG=$(mktemp)
"$TANDEM" serve --port 0 --restful-api-port "$PORT" --deployment-name "bench-structured-$$" >"$LOG" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
for _ in $(seq 1 240); do curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.5; done

# run <concurrency> <requests> <seed> [response_format] -> "tok/s tpot_p50". A new seed per
# run: prompts repeated from an earlier run would be served from the prefix cache.
run() {
  local extra=()
  [ $# -ge 4 ] && extra=(--response-format "$4")
  "$TANDEM" bench serve --url "http://127.0.0.1:$PORT" --concurrency "$1" --requests "$2" \
    --prompt-len "$PROMPT_LEN" --gen-len "$GEN_LEN" --seed "$3" "${extra[@]}" |
    awk '/^throughput/ {t=$2} /^TPOT/ {p50=$5} END {print t, p50}'
}
median() { sort -g | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2}'; }

printf '%-12s %-14s %10s %12s\n' concurrency mode "tok/s" "TPOT p50 ms"
seed=0
for c in 1 8; do
  n=$((c == 1 ? 6 : 24))
  free=(); json=(); free_tpot=(); json_tpot=()
  for _ in $(seq 1 "$ROUNDS"); do
    for order in free json json free; do
      seed=$((seed + 1))
      if [ "$order" = free ]; then read -r t p < <(run "$c" "$n" "$seed"); free+=("$t"); free_tpot+=("$p")
      else read -r t p < <(run "$c" "$n" "$seed" "$SCHEMA"); json+=("$t"); json_tpot+=("$p"); fi
    done
  done
  ft=$(printf '%s\n' "${free[@]}" | median); jt=$(printf '%s\n' "${json[@]}" | median)
  fp=$(printf '%s\n' "${free_tpot[@]}" | median); jp=$(printf '%s\n' "${json_tpot[@]}" | median)
  printf '%-12s %-14s %10s %12s\n' "$c" unconstrained "$ft" "$fp"
  printf '%-12s %-14s %10s %12s\n' "$c" json_schema "$jt" "$jp"
  awk -v f="$ft" -v j="$jt" -v c="$c" 'BEGIN {printf "%-12s throughput json_schema / unconstrained: %.3f\n", c, j / f}'
done
