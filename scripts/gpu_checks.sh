#!/usr/bin/env bash
# The issue-9 checks against real CUDA on one GPU machine, in one run, logs under $OUT:
# `pytest -m cuda` (its two slow tests run the OpInfo and module-database sweeps whole; their JSON
# is kept under $OUT) and, beside it, the detection matrix and the held-out unseen-bugs check.
#
#   OUT=results-dir DEADLINE=330 bash scripts/gpu_checks.sh
#
# Give it the machine to itself: the two slow sweeps each run 14 worker processes and take most
# of the time. On an H100 machine (16 cores) the whole `pytest -m cuda` took 207 s beside a model
# synthesis and a llama.cpp build in session 7; in session 8 it ran past a 260 s deadline beside
# them, and past 185 s alone at -n 14. Start those after it, or give it DEADLINE=330 or more.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
DEADLINE=${DEADLINE:-330}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

run() {  # run NAME COMMAND...: log to $OUT/NAME.log, the exit status last
  local name=$1; shift
  (timeout "$DEADLINE" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$?" >> "$OUT/$name.log") &
}
HARNESS_SWEEP_RESULTS="$OUT" run pytest_cuda python3 -m pytest -m cuda --harness-require-cuda -q -n 6 \
  -p no:cacheprovider -rfE tests cases
run detection_matrix python3 scripts/detection_matrix.py --backend cuda \
  --out "$OUT/detection_matrix.h100.json"
run unseen_bugs python3 scripts/unseen_bugs.py --backend cuda --out "$OUT/unseen_bugs.h100.json"
wait
for f in "$OUT"/*.log; do echo "== $f"; tail -4 "$f"; done
