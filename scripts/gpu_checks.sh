#!/usr/bin/env bash
# The issue-9 checks against real CUDA on one GPU machine, in one run, logs under $OUT:
# `pytest -m cuda`, the module-database and OpInfo sweeps, the detection matrix and the held-out
# models and bugs (scripts/unseen_bugs.py).
#
#   OUT=results-dir DEADLINE=300 bash scripts/gpu_checks.sh
#
# All five run side by side (the machine has 16 cores), each bounded by DEADLINE seconds; the
# sweeps write what they finished by then.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
DEADLINE=${DEADLINE:-300}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

run() {  # run NAME COMMAND...: log to $OUT/NAME.log, the exit status last
  local name=$1; shift
  (timeout "$DEADLINE" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$?" >> "$OUT/$name.log") &
}
run pytest_cuda python3 -m pytest -m cuda --harness-require-cuda -q -n 5 -p no:cacheprovider \
  --timeout 120 -rfE tests cases
run sweep_device_rules python3 scripts/sweep_device_rules.py --workers 5 --deadline $((DEADLINE - 25)) \
  --out "$OUT/sweep_device_rules.h100.json"
run sweep_modules python3 scripts/sweep_modules.py --workers 3 --deadline $((DEADLINE - 25)) \
  --out "$OUT/sweep_modules.h100.json"
run detection_matrix python3 scripts/detection_matrix.py --backend cuda \
  --out "$OUT/detection_matrix.h100.json"
run unseen_bugs python3 scripts/unseen_bugs.py --backend cuda --out "$OUT/unseen_bugs.h100.json"
wait
for f in "$OUT"/*.log; do echo "== $f"; tail -4 "$f"; done
