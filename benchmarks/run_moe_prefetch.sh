#!/usr/bin/env bash
# benchmarks/moe_decode_analysis.md's measurements on one GPU machine in one call of at most
# about 9 minutes: the prefetch switches' bits (the cuda test), moe_ffn at op level at the
# defaults and under each setting (bench_fused.py through with_config.py, each in its own
# process, the defaults timed first and last), then the access-pattern probe. Logs and JSON go
# to OUT.
#
#   OUT=/tmp/out bash benchmarks/run_moe_prefetch.sh
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm --format=csv | tee "$OUT/gpu.txt"
git log --oneline -1 >>"$OUT/gpu.txt" 2>/dev/null
timeout 150 python3 -m pytest -q -p no:cacheprovider -m cuda -rfE tests/test_quant_fused.py -k prefetch \
  >"$OUT/tests.log" 2>&1
tail -3 "$OUT/tests.log"
Q4='"Q4_K": {"prefetch": 2, "programs_per_sm": 1}'
Q6='"Q6_K": {"prefetch": 1, "programs_per_sm": 4}'
SETTINGS=(
  'base|{}'
  'q4pf2|{"INT_MATVEC_CONFIG": {"Q4_K": {"prefetch": 2}}}'
  'q4pf2s1|{"INT_MATVEC_CONFIG": {'"$Q4"'}}'
  'q6s4|{"INT_MATVEC_CONFIG": {"Q6_K": {"programs_per_sm": 4}}}'
  'q6pf1s4|{"INT_MATVEC_CONFIG": {'"$Q6"'}}'
  'both|{"INT_MATVEC_CONFIG": {'"$Q4, $Q6"'}}'
  'base2|{}'
)
for s in "${SETTINGS[@]}"; do
  IFS='|' read -r name cfg <<<"$s"
  timeout 90 env HARNESS_CONFIG="$cfg" python3 benchmarks/with_config.py benchmarks/bench_fused.py \
    --moe-only --default-only --moe-fusions --out "$OUT/moe_$name.json" >"$OUT/moe_$name.log" 2>&1
  echo "== $name rc=$?"
  grep ' ms ' "$OUT/moe_$name.log" | head -8
done
timeout 200 python3 benchmarks/probe_read_pattern.py --grid 128x4,64x2 --out "$OUT/read_pattern.json" \
  >"$OUT/probe.log" 2>&1
tail -50 "$OUT/probe.log"
