#!/usr/bin/env bash
# The issue-10 measurements on one GPU machine, in one run of at most BUDGET seconds (one call of
# the device tool): the full-size Mixtral-8x7B Q4_K_M file beside llama.cpp's llama-bench, the
# decode switches (SETTINGS: the defaults, the old defaults, ...), the tracing overhead.
#
#   LLAMA_SRC=.llama OUT=results-dir BUDGET=585 bash benchmarks/run_gpu.sh
#
# 1. From t=0 in the background: the file synthesized (MODEL, about 80 s), llama-bench built from
#    LLAMA_SRC (the llama-cpp-python 0.3.36 sdist's vendor/llama.cpp) into /tmp/lb (250-450 s).
#    Without LLAMA_SRC, no llama.cpp comparison.
# 2. The cuda tests of the decode forms behind switches (TESTS_K).
# 3. bench_model.py at the defaults and at each of SETTINGS (fused config overrides as JSON, through
#    benchmarks/with_config.py), each in its own process.
# 4. The fastest of them whose tests passed (a failed test whose name holds one of the setting's
#    words rules it out; tests that did not finish rule out every setting): bench_model.py beside
#    llama-bench (model.json), bench_trace.py (trace.json), profile_decode.py (profile.json).
# 5. Op level: qkv's one launch and the norm's router both ways (bench_fused.py), the eager decode
#    step's host time traced and untraced (bench_host.py).
# SETTINGS_FILE (lines `name|config JSON|test words`) replaces SETTINGS; TEST_FILES (spaces
# between) and TESTS_K choose the cuda tests; TEST_S and TEST_RESERVE
# bound the tests (200 s, cut to leave 400), SETTINGS_RESERVE the settings (cut to leave 280 s),
# TRACE_REPEATS the traced runs (5);
# EXTRAS=0 stops after step 4's bench_model beside
# llama-bench. Each step is cut to the time left. Logs and JSON go to OUT, with times.txt (when each step
# ended) and head.txt (each setting's figures, the one chosen); OUT/r.tgz holds them all, renewed
# after each step (the device tool brings back what is under $OUT even when a run is cut short).
set -o pipefail
export PYTHONUNBUFFERED=1
T0=$SECONDS
OUT=${OUT:-/tmp/out}
R="$OUT/run"
mkdir -p "$R"
MODEL=${MODEL:-/tmp/m.gguf}
left() { echo $((${BUDGET:-585} - (SECONDS - T0))); }
t() { # t MAX [RESERVE]: MAX seconds, or what is left after RESERVE (at least 1: `timeout 0` never ends)
  local a=$1 b
  b=$(($(left) - ${2:-0}))
  b=$((a < b ? a : b))
  echo $((b < 1 ? 1 : b))
}
at() { # (with the host's load: the eager and traced runs are host-bound)
  echo "$1 at $((SECONDS - T0)), load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$R/times.txt"
  tar czf "$OUT/r.tgz" -C "$OUT" run 2>/dev/null
}
# name|config JSON|words of the tests that must pass for it
SETTINGS=(
  'base|{}|interleave int_form qkv two_run route router prefetch'
  'gguf|{"PACK_CONFIG": {"q4_k_interleave": false}}|int_form qkv two_run route router prefetch'
  'old|{"PACK_CONFIG": {"q4_k_interleave": false}, "ATTENTION_CONFIG": {"int_out": false}, "NORM_CONFIG": {"int_out": false, "router": false}, "INT_MATVEC_CONFIG": {"Q6_K": {"prefetch": 0, "programs_per_sm": 8}}}|qkv two_run'
)
if [ -n "$SETTINGS_FILE" ]; then mapfile -t SETTINGS < <(grep -v '^ *$' "$SETTINGS_FILE"); fi
TESTS_K=${TESTS_K:-interleave or int_form or route or router or prefetch or qkv or one_launch or moe_ffn_fusions or decode_ops_refuse or fused_decode_at_device or direct_launches or device_error}

nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv | tee "$R/gpu.txt"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a "$R/gpu.txt"
grep -m1 "model name" /proc/cpuinfo >>"$R/gpu.txt"
git log --oneline -1 >>"$R/gpu.txt" 2>/dev/null
if [ ! -f "$MODEL" ]; then
  (python3 -m harness synth "$MODEL" --preset mixtral-8x7b --type Q4_K_M --quiet; echo "synth rc=$?") >"$R/synth.log" 2>&1 &
else
  echo "synth rc=0 (given)" >"$R/synth.log"
fi
if [ -n "$LLAMA_SRC" ]; then
  (cmake -B /tmp/lb -S "$LLAMA_SRC" -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_OPENSSL=OFF >/tmp/lbc.log 2>&1 && cmake --build /tmp/lb --target llama-bench -j 10 >/tmp/lbb.log 2>&1
  echo "build rc=$? at $((SECONDS - T0))" >>"$R/build.txt"; tail -3 /tmp/lbb.log >>"$R/build.txt") &
fi

read -ra TEST_FILES <<<"${TEST_FILES:-tests/test_quant_fused.py tests/test_model_decode.py tests/test_quant_launch.py tests/test_q4_k_interleave.py}"
# In a process group of its own, killed whole after: xdist workers left running by the timeout
# would load the host and the GPU while the benchmarks run.
setsid timeout "$(t "${TEST_S:-200}" "${TEST_RESERVE:-400}")" python3 -m pytest -q -p no:cacheprovider -m cuda \
  -rfE "${TEST_FILES[@]}" -k "$TESTS_K" -n 4 >"$R/tests.log" 2>&1 &
TESTS_PID=$!
wait "$TESTS_PID"
kill -9 -- "-$TESTS_PID" 2>/dev/null
at tests
nvidia-smi --query-compute-apps=pid,name,used_memory --format=csv >>"$R/gpu.txt"
grep -E "^(FAILED|ERROR)|passed|failed" "$R/tests.log" | tail -12
for _ in $(seq 90); do grep -q "synth rc" "$R/synth.log" && break; sleep 2; done
cat "$R/synth.log"

M=(benchmarks/bench_model.py --model "$MODEL" --repeats 3)
for s in "${SETTINGS[@]}"; do
  IFS='|' read -r name cfg _ <<<"$s"
  timeout "$(t 50 "${SETTINGS_RESERVE:-280}")" env HARNESS_CONFIG="$cfg" python3 benchmarks/with_config.py "${M[@]}" \
    --out "$R/model_$name.json" >"$R/model_$name.log" 2>&1
  at "model_$name"
  [ -s "$R/model_$name.json" ] || tail -5 "$R/model_$name.log"
done
printf '%s\n' "${SETTINGS[@]}" >"$R/settings.txt"
python3 - "$R" >"$R/head.txt" <<'PY'
import json, sys
run = sys.argv[1]
log = open(f"{run}/tests.log").read()
failed = [line for line in log.splitlines() if line.startswith(("FAILED", "ERROR"))]
finished = " passed" in log
print(f"# tests: {'passed' if finished and not failed else 'INCOMPLETE OR FAILED'}; failed: {failed}")
best, speed = "base", 0.0
for line in open(f"{run}/settings.txt").read().splitlines():
    name, _, words = line.split("|")
    words = words.split()
    bad = bool(words) and (not finished or any(w in f for f in failed for w in words))
    try:
        d = json.load(open(f"{run}/model_{name}.json"))
    except (OSError, ValueError):
        continue
    v = d.get("decode_tokens_per_second_median") or 0
    print(f"# {name}: prefill {d.get('prefill_tokens_per_second_median')} decode {v} ruled_out={bad}")
    if v > speed and not bad:
        best, speed = name, v
print(best)
PY
cat "$R/head.txt"
HEAD=$(tail -1 "$R/head.txt")
CFG='{}'
for s in "${SETTINGS[@]}"; do
  IFS='|' read -r name cfg _ <<<"$s"
  [ "$name" = "$HEAD" ] && CFG=$cfg
done
echo "chosen: $HEAD $CFG" | tee -a "$R/times.txt"

COMPARE=()
if [ -n "$LLAMA_SRC" ]; then
  for _ in $(seq 200); do [ -s "$R/build.txt" ] && break; [ "$(left)" -lt 230 ] && break; sleep 2; done
  cat "$R/build.txt" 2>/dev/null
  [ -x /tmp/lb/bin/llama-bench ] && COMPARE=(--compare-llamacpp /tmp/lb/bin/llama-bench)
fi
timeout "$(t 120 150)" env HARNESS_CONFIG="$CFG" python3 benchmarks/with_config.py "${M[@]}" "${COMPARE[@]}" \
  --out "$R/model.json" >"$R/model.log" 2>&1
at model
grep -h "tokens_per_second_median\|ratio_\|tg128\|pp512\|peak_gpu" "$R/model.json"
[ "${EXTRAS:-1}" = 0 ] && exit 0
timeout "$(t $((40 + 20 * ${TRACE_REPEATS:-5})) 45)" env HARNESS_CONFIG="$CFG" python3 benchmarks/with_config.py benchmarks/bench_trace.py \
  --model "$MODEL" --device cuda --decode 128 --repeats "${TRACE_REPEATS:-5}" --sample-every 16 --host-profile 40 \
  --name mixtral-8x7b-Q4_K_M-cuda-d128 --out "$R/trace.json" >"$R/trace.log" 2>&1
at trace
tail -4 "$R/trace.log"
timeout "$(t 90 3)" env HARNESS_CONFIG="$CFG" python3 benchmarks/with_config.py benchmarks/profile_decode.py \
  --model "$MODEL" --steps 8 --top 40 --out "$R/profile.json" >"$R/profile.log" 2>&1
at profile
timeout "$(t 60)" python3 benchmarks/bench_fused.py --qkv-only --sweep-qkv --out "$R/qkv_one_launch.json" \
  >"$R/qkv_one_launch.log" 2>&1
at qkv_one_launch
timeout "$(t 50)" python3 benchmarks/bench_fused.py --norm-route-only --out "$R/norm_route.json" \
  >"$R/norm_route.log" 2>&1
at norm_route
timeout "$(t 60)" python3 benchmarks/bench_host.py --decode-step --layers 4 --trace --calls 200 \
  --out "$R/host_trace.json" >"$R/host_trace.log" 2>&1
at host_trace
