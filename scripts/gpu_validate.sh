#!/usr/bin/env bash
# The GPU validation pass in one command, for a machine with torch+CUDA and triton installed and no network:
#   scripts/gpu_validate.sh [build] [test] [sanitize] [headline] [autotune] [bench] [profile]  (default: all)
# Logs and results go to $OUT (default ./gpu_out). A failing step is reported and the next ones still run; the
# exit code is the number of failed steps. Runs that a budget stops (SIGINT) keep the JSON of what ran.
#   build      pip install -e . (the CUDA extension for TORCH_CUDA_ARCH_LIST, default 9.0)      build.log
#              The Hopper kernels need CUTLASS's headers and the machine has no network: carry the wheel as
#              .whl/nvidia_cutlass-4.2.0.0-py3-none-any.whl (or set RESNET_FUSED_CUTLASS_DIR); the step prints
#              which conv kernels the GPU gets (sm90 CUTLASS or sm80 WMMA, and why)
#   test       pytest tests, every backend and dtype on the GPU                                  tests.log
#   sanitize   compute-sanitizer memcheck over the Triton and CUDA op tests                      sanitize.log
#   headline   the issue's goals, resnet50 bf16: batch 256 first (eager, torch.compile, triton, cuda;
#              HEADLINE_BUDGET_S, default 200), then batch 1 (eager, triton, cuda, each also through CUDA graphs;
#              HEADLINE_B1_BUDGET_S, default 120)          headline_b256.json, headline_b1.json, headline.png
#   autotune   torch.compile(mode="max-autotune") beside eager at batch 256 bf16 (compiles for minutes;
#              AUTOTUNE_BUDGET_S, default 480)                                  headline_autotune.json
#   bench      every suite (models first; BENCH_BUDGET_S, default 540)         bench.json, bench.png, report.log
#   profile    python -m resnet_fused profile, resnet50 batch 64 bf16          profile.log, profile/
# headline and autotune each end with a report of the headline JSONs present in $OUT; JSONs of several calls merge
# afterwards with `python -m resnet_fused report A.json B.json ... --markdown`.
# With the device tool's 10-minute calls (a warm machine keeps the build between calls), in order of priority:
#   1: build test sanitize   2: build headline profile   3: build autotune   4: build bench
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1
export TRITON_PRINT_AUTOTUNING=${TRITON_PRINT_AUTOTUNING:-1}
steps=("$@")
if [ -z "${RESNET_FUSED_CUTLASS_DIR:-}" ] && compgen -G ".whl/nvidia_cutlass-*.whl" > /dev/null; then
  RESNET_FUSED_CUTLASS_DIR=$(ls .whl/nvidia_cutlass-*.whl | tail -n 1)
  export RESNET_FUSED_CUTLASS_DIR="$PWD/$RESNET_FUSED_CUTLASS_DIR"
fi
[ ${#steps[@]} -eq 0 ] && steps=(build test sanitize headline autotune bench profile)
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

report_headline() {  # the headline JSONs this call wrote, as one report
  local files=() f
  for f in "$OUT"/headline_b256.json "$OUT"/headline_b1.json "$OUT"/headline_autotune.json; do
    [ -s "$f" ] && files+=("$f")
  done
  [ ${#files[@]} -gt 0 ] && run_step headline_report python3 -m resnet_fused report "${files[@]}" \
    --out "$OUT/headline.png" --markdown
  return 0
}

for step in "${steps[@]}"; do
  case $step in
    build) run_step build python3 -m pip install --no-build-isolation --no-deps -e .
           python3 -c "import resnet_fused as rf; print('   conv kernels:', rf.ops.registry._BACKENDS['cuda'].kernel_path('cuda'))" ;;
    test) run_step tests python3 -m pytest tests -q -ra --durations=15 ;;
    sanitize) run_step sanitize compute-sanitizer --tool memcheck --error-exitcode 1 \
                python3 -m pytest tests/test_ops_cuda.py tests/test_ops_triton.py -q -m "gpu and not slow" ;;
    # SIGINT (not KILL) at a budget lets pytest-benchmark write the JSON of what ran.
    headline) run_step headline_b256 timeout -s INT "${HEADLINE_BUDGET_S:-200}" python3 -m pytest -q \
                benchmarks/test_bench_models.py -k "resnet50 and bf16-b256 and not max-autotune" \
                --benchmark-group-by=group --benchmark-json "$OUT/headline_b256.json"
              run_step headline_b1 timeout -s INT "${HEADLINE_B1_BUDGET_S:-120}" python3 -m pytest -q \
                benchmarks/test_bench_models.py -k "resnet50 and bf16-b1-" \
                --benchmark-group-by=group --benchmark-json "$OUT/headline_b1.json"
              report_headline ;;
    autotune) run_step autotune env RESNET_FUSED_BENCH_AUTOTUNE=1 timeout -s INT "${AUTOTUNE_BUDGET_S:-480}" \
                python3 -m pytest -q benchmarks/test_bench_models.py \
                -k "resnet50 and bf16-b256 and (max-autotune or eager) and not eager-nchw" \
                --benchmark-group-by=group --benchmark-json "$OUT/headline_autotune.json"
              report_headline ;;
    # Models first, so a run cut short still has the whole-model numbers.
    bench) run_step bench timeout -s INT "${BENCH_BUDGET_S:-540}" python3 -m pytest -q \
             benchmarks/test_bench_models.py benchmarks/test_bench_blocks.py benchmarks/test_bench_convs.py \
             --benchmark-group-by=group --benchmark-json "$OUT/bench.json" --durations=15
           [ -s "$OUT/bench.json" ] && run_step report python3 -m resnet_fused report "$OUT/bench.json" \
             --out "$OUT/bench.png" --markdown ;;
    profile) run_step profile python3 -m resnet_fused profile --model resnet50 --batch 64 --dtype bf16 \
               --out "$OUT/profile" ;;
    *) echo "unknown step: $step (expected build, test, sanitize, headline, autotune, bench, profile)"
       failed=$((failed + 1)) ;;
  esac
done
python3 -c "import torch; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
exit $failed
