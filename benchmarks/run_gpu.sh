#!/usr/bin/env bash
# The issue-10 measurements on one GPU machine, in one run: kernel tests, kernel speeds, the
# full-size Mixtral-8x7B Q4_K_M file beside llama.cpp's llama-bench, and the tracing overhead.
#
#   LLAMA_SRC=path/to/llama.cpp OUT=results-dir bash benchmarks/run_gpu.sh
#
# LLAMA_SRC: llama.cpp's source (the llama-cpp-python 0.3.36 sdist's vendor/llama.cpp), built
# into /tmp/lb while the model file is synthesized. Without it, no llama.cpp comparison.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
MODEL=${MODEL:-/tmp/m.gguf}
if [ ! -f "$MODEL" ]; then
  (python3 -m harness synth "$MODEL" --preset mixtral-8x7b --type Q4_K_M --quiet; echo "synth rc=$?") > /tmp/synth.log 2>&1 &
  SYNTH=$!
fi
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv
# Kernel tests and kernel speeds before llama.cpp's build takes every core (Triton compiles on
# the CPU; under the build the tests once ran past their time limit).
timeout 420 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_quant_fused.py 2>&1 | tee "$OUT/tests.log" | tail -3
timeout 180 python3 benchmarks/bench_fused.py --out "$OUT/fused.json" 2>&1 | tee "$OUT/fused.log"
timeout 60 python3 benchmarks/bench_host.py --out "$OUT/host.json" 2>&1 | tee "$OUT/host.log"
timeout 120 python3 benchmarks/sweep_matvec.py --out "$OUT/matvec_sweep.json" 2>&1 | tail -40 > "$OUT/matvec_sweep.log"
# the decode read with integer dot products against "vec", at each one's default setting
timeout 120 python3 benchmarks/sweep_matvec.py --compare --paths vec,int --out "$OUT/matvec_int.json" 2>&1 | tee "$OUT/matvec_int.log"
if [ -n "$LLAMA_SRC" ]; then
  (cmake -B /tmp/lb -S "$LLAMA_SRC" -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_CURL=OFF \
     -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
     -DLLAMA_OPENSSL=OFF && cmake --build /tmp/lb --target llama-bench -j "$(nproc)"
   echo "build rc=$?") > /tmp/lb.log 2>&1 &
fi
[ -n "$SYNTH" ] && wait "$SYNTH"; tail -2 /tmp/synth.log 2>/dev/null
timeout 200 python3 benchmarks/bench_trace.py --model "$MODEL" --device cuda --decode 128 --repeats 2 \
  --sample-every 16 --host-profile 40 --name mixtral-8x7b-Q4_K_M-cuda-d128 --out "$OUT/trace.json" 2>&1 | tee "$OUT/trace.log" | tail -25
COMPARE=()
if [ -n "$LLAMA_SRC" ]; then
  for _ in $(seq 120); do grep -q "build rc" /tmp/lb.log && break; sleep 2; done
  tail -2 /tmp/lb.log
  [ -x /tmp/lb/bin/llama-bench ] && COMPARE=(--compare-llamacpp /tmp/lb/bin/llama-bench)
fi
timeout 300 python3 benchmarks/bench_model.py --model "$MODEL" --repeats 3 "${COMPARE[@]}" \
  --out "$OUT/model.json" 2>&1 | tee "$OUT/model.log"
# the same decode with the integer-dot-product read (fused.matvec_path "int"), last: not yet the default
HARNESS_MATVEC=int timeout 300 python3 benchmarks/bench_model.py --model "$MODEL" --repeats 3 \
  --out "$OUT/model_int.json" 2>&1 | tee "$OUT/model_int.log"
