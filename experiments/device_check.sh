#!/usr/bin/env bash
# GPU/TPU readiness check for the game engine, in one call of under 8 minutes:
#   1. the engine benchmark at 2^16 .. 2^22 games (N=3, K=16, T=20, expected mode) with the
#      memory-traffic bound of each batch at the device's bandwidth (PEAK_GBPS, default H200 4800),
#      against vectorized NumPy (up to 2^14 games on the host CPU) and the Python loop (16 games);
#   2. the sorted engine on the N x K grid up to N*K = 2048 (growth exponent);
#   3. `align-jax simulate configs/quick_sweep.yaml` (7 points x 20k games) sharded over all devices;
#   4. the engine's reference tests (engine == Python reference) on the device.
# Results go to $OUT (default ./device_check_out): JSON, logs, and summary.txt with the columns to
# copy into the README. Usage:  bash experiments/device_check.sh
set -uo pipefail
OUT=${OUT:-device_check_out}
PEAK_GBPS=${PEAK_GBPS:-4800}
mkdir -p "$OUT"
export ALIGN_JAX_DATA_DIR=${ALIGN_JAX_DATA_DIR:-../shared/data}
status=0
step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local start=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc, $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"
  [ $rc -eq 0 ] || status=1
}
: > "$OUT/summary.txt"
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi") >> "$OUT/summary.txt"
python -c "import jax; print('jax', jax.__version__, jax.devices())" >> "$OUT/summary.txt" 2>&1
step bench_game 210 python experiments/bench_game.py --log2-min 16 --log2-max 22 --chunk-log2 20 \
  --numpy-max-log2 14 --numpy-budget-s 20 --python-games 16 --repeats 2 --memory-games 4096 \
  --peak-gbps "$PEAK_GBPS" --out "$OUT/bench_game.json"
step bench_scaling 120 python experiments/bench_game.py --scaling --grid-agents 2 8 32 --grid-candidates 4 16 64 \
  --chunk-log2 18 --grid-budget 4294967296 --repeats 2 --numpy-max-slots 128 --python-max-slots 64 \
  --memory-log2 14 --out "$OUT/bench_scaling.json"
step quick_sweep 90 python -m align_jax.cli simulate configs/quick_sweep.yaml --output-dir "$OUT/runs" --quiet --no-figures
step reference_tests 60 python -m pytest tests/game/test_reference.py tests/game/test_feedback.py -q -p no:cacheprovider
grep -E "^2\^|fitted exponent" "$OUT/bench_game.log" "$OUT/bench_scaling.log" >> "$OUT/summary.txt" 2>/dev/null
cat "$OUT/summary.txt"
exit $status
