#!/usr/bin/env bash
# Disaggregated vs colocated serving under a prefill-heavy load: starts `tandem serve` (one
# engine) and a disaggregated deployment (1 prefill + 1 decode worker) on the same model and
# engine flags, drives both with `tandem bench serve` (long prompts, short generations, several
# in flight), and prints TTFT and TPOT (the per-request mean inter-token latency) p50/p95 for
# both and the decode-latency ratio.
#
# MULTIHOST=1 (root): the disaggregated side runs across hosts made of network namespaces on a
# bridge: etcd, the router and each worker on a host of its own, found through etcd. It then
# also kills the prefill worker (kill -9) and reports how long until a long prompt is served
# again (retried elsewhere or prefilled on the decode worker) and until the registration is gone.
#
# Usage: [MULTIHOST=1] scripts/bench_pd.sh
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
PIDS=()
NETNS=()
TAG="tbp$(( $$ % 100000 ))"
cleanup() {
  kill "${PIDS[@]}" 2>/dev/null || true
  for ns in "${NETNS[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
  [ "${MULTIHOST:-0}" = 1 ] && ip link del "${TAG}br" 2>/dev/null || true
}
trap cleanup EXIT
"$TANDEM" serve --model "$MODEL" --port 0 --restful-api-port "$CP" \
  --deployment-name "bench-colocated-$$" >"$LOGS/colocated.log" 2>&1 &
PIDS+=($!)
CURL="http://127.0.0.1:$CP"

if [ "${MULTIHOST:-0}" = 1 ]; then
  command -v etcd >/dev/null || { echo "MULTIHOST=1 needs etcd (apt-get install etcd-server)" >&2; exit 1; }
  NET="10.232.$(( $$ % 250 ))"
  ip link add "${TAG}br" type bridge
  ip addr add "$NET.1/24" dev "${TAG}br"
  ip link set "${TAG}br" up
  host() {  # host <n>: a namespace with address $NET.<n> on the bridge
    local ns="${TAG}h$1"
    ip netns add "$ns"; NETNS+=("$ns")
    ip link add "${TAG}v$1" type veth peer name "${TAG}p$1"
    ip link set "${TAG}p$1" netns "$ns"
    ip link set "${TAG}v$1" master "${TAG}br" up
    ip -n "$ns" addr add "$NET.$1/24" dev "${TAG}p$1"
    ip -n "$ns" link set "${TAG}p$1" up
    ip -n "$ns" link set lo up
  }
  for n in 2 3 4 5; do host "$n"; done
  ip netns exec "${TAG}h2" etcd --data-dir "$LOGS/etcd" --listen-client-urls "http://$NET.2:2379" \
    --advertise-client-urls "http://$NET.2:2379" >"$LOGS/etcd.log" 2>&1 &
  PIDS+=($!)
  COMMON=(--model "$MODEL" --etcd "http://$NET.2:2379" --deployment-name "bench-multihost-$$"
    --auth-token "bench-$$")
  ip netns exec "${TAG}h3" "$TANDEM" serve "${COMMON[@]}" --host "$NET.3" --port 50050 \
    --restful-api-port 28080 >"$LOGS/router.log" 2>&1 &
  PIDS+=($!)
  ip netns exec "${TAG}h4" "$TANDEM" serve "${COMMON[@]}" --role prefill --host "$NET.4" \
    >"$LOGS/prefill.log" 2>&1 &
  PREFILL_PID=$!
  PIDS+=($PREFILL_PID)
  ip netns exec "${TAG}h5" "$TANDEM" serve "${COMMON[@]}" --role decode --host "$NET.5" \
    >"$LOGS/decode.log" 2>&1 &
  PIDS+=($!)
  DURL="http://$NET.3:28080"
  ready='"status":"ok"'
else
  "$TANDEM" serve --model "$MODEL" --port 0 --restful-api-port "$DP" \
    --deployment-name "bench-disaggregated-$$" --prefill-workers 1 --decode-workers 1 \
    >"$LOGS/disaggregated.log" 2>&1 &
  PIDS+=($!)
  DURL="http://127.0.0.1:$DP"
  ready='"status"'
fi
for url in "$CURL" "$DURL"; do
  ok=0
  for _ in $(seq 1 240); do curl -s "$url/healthz" 2>/dev/null | grep -q "$ready" && { ok=1; break; }; sleep 0.5; done
  [ "$ok" = 1 ] || { echo "server at $url did not come up; logs in $LOGS" >&2; exit 1; }
done

# bench <url> -> "throughput ttft_p50 ttft_p95 tpot_p50 tpot_p95"
bench() {
  "$TANDEM" bench serve --url "$1" --concurrency "$CONCURRENCY" \
    --requests "$REQUESTS" --prompt-len "$PROMPT_LEN" --gen-len "$GEN_LEN" | awk '
      # "TTFT  mean/p50/p95   6665 / 6625 / 8232 ms": mean is $3, p50 $5, p95 $7.
      /^throughput/ {t=$2} /^TTFT/ {f50=$5; f95=$7} /^TPOT/ {p50=$5; p95=$7}
      END {print t, f50, f95, p50, p95}'
}
read -r ct cf50 cf95 c50 c95 < <(bench "$CURL")
read -r dt df50 df95 d50 d95 < <(bench "$DURL")
side=disaggregated
[ "${MULTIHOST:-0}" = 1 ] && side="disagg. (hosts)"
printf 'prefill-heavy load: %s concurrent, %s requests, prompt %s / gen %s tokens\n' \
  "$CONCURRENCY" "$REQUESTS" "$PROMPT_LEN" "$GEN_LEN"
printf '%-16s %9s %12s %12s %12s %12s\n' "" "tok/s" "TTFT p50 ms" "TTFT p95 ms" "TPOT p50 ms" "TPOT p95 ms"
printf '%-16s %9s %12s %12s %12s %12s\n' colocated "$ct" "$cf50" "$cf95" "$c50" "$c95"
printf '%-16s %9s %12s %12s %12s %12s\n' "$side" "$dt" "$df50" "$df95" "$d50" "$d95"
awk -v c="$c95" -v d="$d95" 'BEGIN {printf "decode p95 inter-token latency, colocated / disaggregated: %.2fx\n", c / d}'

if [ "${MULTIHOST:-0}" = 1 ]; then
  # A long prompt (prefilled on the prefill worker while it lives), then kill -9 that worker.
  body=$(python3 -c "import json; print(json.dumps({'prompt': 'word ' * 200, 'max_tokens': 4, 'temperature': 0}))")
  kill -9 "$PREFILL_PID"
  t0=$(date +%s.%N)
  until curl -sf -H 'content-type: application/json' -d "$body" "$DURL/v1/completions" >/dev/null; do sleep 0.02; done
  t1=$(date +%s.%N)
  until curl -s "$DURL/healthz" | grep -q '"role":"prefill","up":0,"expected":0'; do sleep 0.05; done
  t2=$(date +%s.%N)
  awk -v a="$t0" -v b="$t1" -v c="$t2" 'BEGIN {
    printf "prefill worker killed: a long prompt served again after %.2f s; its registration gone after %.2f s\n", b - a, c - a }'
fi
