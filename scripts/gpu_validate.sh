#!/usr/bin/env bash
# The GPU validation pass in one command, for a machine with torch+CUDA and triton installed and no network:
#   scripts/gpu_validate.sh [build] [test] [sanitize] [headline] [bench] [profile]   (default: all, in order)
# Logs and results go to $OUT (default ./gpu_out): build.log, tests.log, sanitize.log, headline.json +
# headline_autotune.json + headline.png (the issue's goals), bench.json, bench.log, report.log + bench.png (the
# speedup summary), profile.log and the profile's PNG. A failing step is reported and the next ones still run;
# the exit code is the number of failed steps.
# headline: resnet50 bf16 at batch 256 (eager, torch.compile, triton, cuda) and batch 1 (eager, triton, cuda, each
# also through CUDA graphs), then torch.compile(mode="max-autotune") at batch 256 in a run of its own, last,
# since it compiles for minutes. HEADLINE_BUDGET_S (default 240), AUTOTUNE_BUDGET_S (default 300) and
# BENCH_BUDGET_S (default 540) stop those runs early, keeping what ran.
# With the device tool's 10-minute calls on a machine that goes cold between them, split it:
#   call 1: scripts/gpu_validate.sh build test sanitize     call 2: scripts/gpu_validate.sh build headline
#   call 3: BENCH_BUDGET_S=420 scripts/gpu_validate.sh build bench profile
# Triton's autotuning choices are printed into the logs (TRITON_PRINT_AUTOTUNING=1), slowest tests last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1
export TRITON_PRINT_AUTOTUNING=${TRITON_PRINT_AUTOTUNING:-1}
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(build test sanitize headline bench profile)
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
    # SIGINT (not KILL) at the budget lets pytest-benchmark write the JSON of what ran.
    headline) run_step headline timeout -s INT "${HEADLINE_BUDGET_S:-240}" python3 -m pytest -q \
                benchmarks/test_bench_models.py -k "resnet50 and (bf16-b256 or bf16-b1-) and not max-autotune" \
                --benchmark-group-by=group --benchmark-json "$OUT/headline.json"
              run_step headline_autotune env RESNET_FUSED_BENCH_AUTOTUNE=1 timeout -s INT "${AUTOTUNE_BUDGET_S:-300}" \
                python3 -m pytest -q benchmarks/test_bench_models.py -k "resnet50 and bf16-b256 and max-autotune" \
                --benchmark-group-by=group --benchmark-json "$OUT/headline_autotune.json"
              files=(); for f in "$OUT/headline.json" "$OUT/headline_autotune.json"; do [ -s "$f" ] && files+=("$f"); done
              [ ${#files[@]} -gt 0 ] && run_step headline_report python3 -m resnet_fused report "${files[@]}" \
                --out "$OUT/headline.png" --markdown ;;
    # Models first, so a run cut short still has the whole-model numbers.
    bench) run_step bench timeout -s INT "${BENCH_BUDGET_S:-540}" python3 -m pytest -q \
             benchmarks/test_bench_models.py benchmarks/test_bench_blocks.py benchmarks/test_bench_convs.py \
             --benchmark-group-by=group --benchmark-json "$OUT/bench.json" --durations=15
           [ -s "$OUT/bench.json" ] && run_step report python3 -m resnet_fused report "$OUT/bench.json" \
             --out "$OUT/bench.png" --markdown ;;
    profile) run_step profile python3 -m resnet_fused profile --model resnet50 --batch 64 --dtype bf16 \
               --out "$OUT/profile" ;;
    *) echo "unknown step: $step (expected build, test, sanitize, headline, bench, profile)"; failed=$((failed + 1)) ;;
  esac
done
python3 -c "import torch; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
exit $failed
