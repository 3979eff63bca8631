#!/usr/bin/env bash
# The eager decode step's host time on one GPU machine, in one run (issue 10, "the tracer keeps
# up"): the CUDA tests of the fused ops and of harness.quant.launch's direct launches, then
# bench_host.py's per-call figures (each op with the direct launch and with Triton's own) and
# eager decode steps of a synthesized 4-layer Mixtral-8x7B Q4_K_M, both launches in turn; then
# bench_trace.py on that 4-layer model (64 decoded tokens: untraced, full trace, every 16th).
#
#   OUT=results-dir bash benchmarks/host_check.sh
#
# Prints the figures; the JSON is $OUT/host.json and $OUT/trace4.json, the test log
# $OUT/host_tests.log.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 300 python3 -m pytest -q -p no:cacheprovider -m cuda -rfE tests/test_quant_launch.py \
  tests/test_quant_fused.py tests/test_model_decode.py 2>&1 | tee "$OUT/host_tests.log" | tail -5
timeout 170 python3 benchmarks/bench_host.py --decode-step --layers 4 --steps 20 --calls 1000 \
  --out "$OUT/host.json" 2>&1 | tee "$OUT/host.log"
python3 - "$OUT/host.json" <<'PY'
import json, sys
step = json.load(open(sys.argv[1]))["decode_step"]
print("decode step, 4 layers, ms (median):", step["ms_per_step_by_launch"], "ops:", step["ops_per_step"])
PY
MODEL4=/tmp/host_check_4layers.gguf
python3 -c "import dataclasses, sys; from harness.gguf_file import PRESETS; from harness.synth import synthesize
synthesize(sys.argv[1], dataclasses.replace(PRESETS['mixtral-8x7b'], block_count=4), 'Q4_K_M')" "$MODEL4"
timeout 180 python3 benchmarks/bench_trace.py --model "$MODEL4" --device cuda --decode 64 --repeats 3 \
  --sample-every 16 --name mixtral-8x7b-4layers-Q4_K_M-cuda-d64 --out "$OUT/trace4.json" 2>&1 | tail -3
rm -f "$MODEL4"
