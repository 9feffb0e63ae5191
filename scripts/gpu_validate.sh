#!/usr/bin/env bash
# The GPU validation pass in one command, for a machine with torch+CUDA and triton installed and no network:
#   scripts/gpu_validate.sh [build] [test] [sanitize] [bench] [profile]     (default: all of them, in order)
# Logs and results go to $OUT (default ./gpu_out): build.log, tests.log, sanitize.log, bench.json, bench.log,
# report.log + bench.png (the speedup summary), profile.log and the profile's PNG. A failing step is reported
# and the next ones still run; the exit code is the number of failed steps.
# BENCH_BUDGET_S (default 540) stops the benchmarks early, keeping what ran.
# With the device tool's 10-minute calls on a machine that goes cold between them, split it:
#   call 1: scripts/gpu_validate.sh build test sanitize     call 2: scripts/gpu_validate.sh build bench
#   call 3: scripts/gpu_validate.sh build profile
# Triton's autotuning choices are printed into the logs (TRITON_PRINT_AUTOTUNING=1), slowest tests last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1
export TRITON_PRINT_AUTOTUNING=${TRITON_PRINT_AUTOTUNING:-1}
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(build test sanitize bench profile)
failed=0

run_step() {  # name, command...
  local name=$1; shift
  local start=$SECONDS
  echo "== $name: $*"
  if "$@" > "$OUT/$name.log" 2>&1; then
    echo "   ok ($((SECONDS - start)) s)"
  else
    echo "   FAILED ($((SECONDS - start)) s); last lines:"; tail -n 25 "$OUT/$name.log"
    failed=$((failed + 1))
  fi
}

for step in "${steps[@]}"; do
  case $step in
    build) run_step build python3 -m pip install --no-build-isolation --no-deps -e . ;;
    test) run_step tests python3 -m pytest tests -q -ra --durations=15 ;;
    sanitize) run_step sanitize compute-sanitizer --tool memcheck --error-exitcode 1 \
                python3 -m pytest tests/test_ops_cuda.py tests/test_ops_triton.py -q -m "gpu and not slow" ;;
    # Models first, so a run cut short still has the headline; SIGINT lets pytest-benchmark write the JSON.
    bench) run_step bench timeout -s INT "${BENCH_BUDGET_S:-540}" python3 -m pytest -q \
             benchmarks/test_bench_models.py benchmarks/test_bench_blocks.py benchmarks/test_bench_convs.py \
             --benchmark-group-by=group --benchmark-json "$OUT/bench.json" --durations=15
           [ -s "$OUT/bench.json" ] && run_step report python3 -m resnet_fused report "$OUT/bench.json" \
             --out "$OUT/bench.png" --markdown ;;
    profile) run_step profile python3 -m resnet_fused profile --model resnet50 --batch 64 --dtype bf16 \
               --out "$OUT/profile" ;;
    *) echo "unknown step: $step (expected build, test, sanitize, bench, profile)"; failed=$((failed + 1)) ;;
  esac
done
python3 -c "import torch; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
exit $failed
