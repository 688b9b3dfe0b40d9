#!/usr/bin/env bash
# Disaggregated vs colocated serving under a prefill-heavy load: starts `tandem serve` (one
# engine) and `tandem serve --prefill-workers 1 --decode-workers 1` on the same model and
# engine flags, drives both with `tandem bench serve` (long prompts, short generations, several
# in flight), and prints TTFT and TPOT (the per-request mean inter-token latency) for both and
# the decode-latency ratio.
#
# Usage: scripts/bench_pd.sh
# Env: CONCURRENCY (4), REQUESTS (12), PROMPT_LEN (512), GEN_LEN (64)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
HOME_DIR=${TANDEM_HOME:-$HOME/.cache/tandem}
CONCURRENCY=${CONCURRENCY:-4}
REQUESTS=${REQUESTS:-12}
PROMPT_LEN=${PROMPT_LEN:-512}
GEN_LEN=${GEN_LEN:-64}

cargo build --release -q --bin tandem --manifest-path "$ROOT/Cargo.toml"
TANDEM="$ROOT/target/release/tandem"
"$TANDEM" generate --prompt warmup --max-new-tokens 1 --greedy >/dev/null   # fetches the model
MODEL="$HOME_DIR/models/SmolLM2-135M-Instruct.Q4_1.gguf"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
CP=$(free_port); DP=$(free_port)
LOGS=$(mktemp -d)
"$TANDEM" serve --model "$MODEL" --port 0 --restful-api-port "$CP" \
  --deployment-name "bench-colocated-$$" >"$LOGS/colocated.log" 2>&1 &
CPID=$!
"$TANDEM" serve --model "$MODEL" --port 0 --restful-api-port "$DP" \
  --deployment-name "bench-disaggregated-$$" --prefill-workers 1 --decode-workers 1 \
  >"$LOGS/disaggregated.log" 2>&1 &
DPID=$!
trap 'kill $CPID $DPID 2>/dev/null || true' EXIT
for port in "$CP" "$DP"; do
  ok=0
  for _ in $(seq 1 240); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && { ok=1; break; }; sleep 0.5; done
  [ "$ok" = 1 ] || { echo "server on $port did not come up; logs in $LOGS" >&2; exit 1; }
done

# bench <port> -> "throughput ttft_mean tpot_p50 tpot_p95"
bench() {
  "$TANDEM" bench serve --url "http://127.0.0.1:$1" --concurrency "$CONCURRENCY" \
    --requests "$REQUESTS" --prompt-len "$PROMPT_LEN" --gen-len "$GEN_LEN" | awk '
      # "TTFT  mean/p50/p95   6665 / 6625 / 8232 ms": mean is $3, p50 $5, p95 $7.
      /^throughput/ {t=$2} /^TTFT/ {ttft=$3} /^TPOT/ {p50=$5; p95=$7}
      END {print t, ttft, p50, p95}'
}
read -r ct cf c50 c95 < <(bench "$CP")
read -r dt df d50 d95 < <(bench "$DP")
printf 'prefill-heavy load: %s concurrent, %s requests, prompt %s / gen %s tokens\n' \
  "$CONCURRENCY" "$REQUESTS" "$PROMPT_LEN" "$GEN_LEN"
printf '%-16s %12s %14s %14s %14s\n' "" "tok/s" "TTFT mean ms" "TPOT p50 ms" "TPOT p95 ms"
printf '%-16s %12s %14s %14s %14s\n' colocated "$ct" "$cf" "$c50" "$c95"
printf '%-16s %12s %14s %14s %14s\n' disaggregated "$dt" "$df" "$d50" "$d95"
awk -v c="$c95" -v d="$d95" 'BEGIN {printf "decode p95 inter-token latency, colocated / disaggregated: %.2fx\n", c / d}'
