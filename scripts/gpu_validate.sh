#!/usr/bin/env bash
# The GPU validation pass, sized for one 15-minute window on a lent H100/H200 (no network, 16 cores): one main
# command of at most 540 s, then one follow-up of at most 240 s while the machine is still warm (it is released
# 30 s after a command). Steps run in priority order, each under its own timeout, so a run cut short still
# returns what matters most; the output files are refreshed after every step.
#
#   bash scripts/gpu_validate.sh --plan     no GPU needed: steps, budgets, Triton compiles per step, output files
#   bash scripts/gpu_validate.sh            main: env, build || warmup, correctness, memcheck, racecheck,
#                                           headline, convs, finalize
#   bash scripts/gpu_validate.sh followup   env, train (BatchNorm training kernels' GPU tests, resnet50 bf16
#                                           train step), torch.compile max-autotune (then default) beside eager
#                                           at bf16 batch 256, finalize
#
# With the device tool, from the session's checkout (carry the nvidia-cutlass wheel for the CUDA backend's
# Hopper path: benchmarks/results/README.md gives the `pip download` into .whl/; without it the pass says so
# and builds without that path):
#   run(command="bash scripts/gpu_validate.sh", carry=[".whl"], timeout_s=560)
#   run(command="bash scripts/gpu_validate.sh followup", carry=[".whl"], timeout_s=250)   # at once after
# Both return at most 5 files from $OUT: summary.md, bench.json, bench.png, results.json, logs.tar.gz. The
# follow-up's files include the main command's results when the machine was still warm. With less device time
# left than a command's limit, prefix GPU_PASS_LIMIT_S=<seconds> (the last steps shrink first) and give the call
# a timeout_s 20 s above it.
# Environment: GPU_PASS_LIMIT_S (default 540 / 240), OUT (default ./gpu_out), GPU_PASS_STATE (default
# /tmp/gpu_pass: logs and step results, kept between the two commands), PYTHON (default: the checkout's .venv made
# by `make setup` where there is one, else python3), MAX_JOBS
# (default: the core count), TORCH_CUDA_ARCH_LIST (default 9.0a: H100/H200 only, wgmma and TMA allowed).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
PY=${PYTHON:-python3}
MODE=${1:-main}

if [ "$MODE" = --plan ]; then
  # The plan counts compiles for the GPU's config lists: Triton must not be in interpreter mode.
  exec env -u TRITON_INTERPRET "$PY" -m scripts.gpu_pass.plan
fi
case $MODE in
  main | followup) ;;
  *) echo "usage: $0 [--plan | main | followup]" >&2; exit 2 ;;
esac

OUT=${OUT:-gpu_out}
STATE=${GPU_PASS_STATE:-/tmp/gpu_pass}
LOGS=$STATE/logs
BEGIN=$SECONDS
SHELL_VARS=$("$PY" -m scripts.gpu_pass.steps --shell "$MODE") || exit 2
eval "$SHELL_VARS"   # LIMIT, MAX_FILES, STEPS, BUDGET_<step>, AFTER_<step>, ELASTIC_<step>
LIMIT=${GPU_PASS_LIMIT_S:-$LIMIT}
if [ "$MODE" = main ]; then rm -rf "$STATE"; fi
mkdir -p "$OUT" "$LOGS"
NPROC=$(nproc)
export MAX_JOBS=${MAX_JOBS:-$NPROC} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} RESNET_FUSED_CUDA=1
export PYTHONUNBUFFERED=1 TRITON_CACHE_AUTOTUNING=1   # autotune choices shared by every step through the disk
unset TRITON_INTERPRET
SANITIZER=$(command -v compute-sanitizer)
for candidate in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
  if [ -z "$SANITIZER" ] && [ -x "$candidate" ]; then SANITIZER=$candidate; fi
done

step_timeout() {  # name: the step's budget, cut to what is left of the command's limit less finalize's budget
  # (so with a lower GPU_PASS_LIMIT_S the last steps shrink first); an elastic step may also take what the later
  # steps' budgets leave
  local name=$1 budget_var=BUDGET_$1 after_var=AFTER_$1 elastic_var=ELASTIC_$1 final_var=BUDGET_finalize
  local left=$((LIMIT - (SECONDS - BEGIN))) t=${!budget_var}
  if [ "$name" != finalize ]; then left=$((left - ${!final_var})); fi
  if ((left < t)); then t=$left; fi
  if [ "${!elastic_var}" = 1 ] && ((LIMIT - (SECONDS - BEGIN) - ${!after_var} > t)); then
    t=$((LIMIT - (SECONDS - BEGIN) - ${!after_var}))
  fi
  echo "$t"
}

record() {  # name status seconds rc timeout
  printf '{"command": "%s", "step": "%s", "status": "%s", "seconds": %d, "rc": %d, "timeout": %d}\n' \
    "$MODE" "$1" "$2" "$3" "$4" "$5" >> "$STATE/steps.jsonl"
}

run_step() {  # name command...: run under the step's timeout (SIGINT first, so drivers write what they have)
  local name=$1; shift
  local t begin rc status
  t=$(step_timeout "$name")
  if ((t < 5)); then
    echo "== $name: skipped, no time left"; record "$name" skipped 0 0 0; return 0
  fi
  echo "== $name (timeout ${t} s)"
  begin=$SECONDS
  GPU_PASS_DEADLINE=$(($(date +%s) + t)) timeout -s INT -k 15 "$t" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  status=ok
  if ((rc == 124 || rc == 137)); then status=timeout; elif ((rc != 0)); then status=failed; fi
  record "$name" "$status" $((SECONDS - begin)) "$rc" "$t"
  echo "   $status after $((SECONDS - begin)) s (rc $rc); $(tail -n 1 "$LOGS/$name.log")"
}

refresh() {  # the output files, from whatever the steps have recorded so far
  "$PY" -m scripts.gpu_pass.summary --state "$STATE" --out "$OUT" --command "$MODE" >> "$LOGS/summary.log" 2>&1
}

install_wheels() {  # carried wheels (.whl/*.whl, e.g. nvidia-cutlass): the machine has no network
  local wheels=(.whl/*.whl)
  [ -e "${wheels[0]}" ] || return 0
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$STATE/site" \
    "${wheels[@]}" > "$LOGS/wheels.log" 2>&1 || {
    echo "   wheel install failed: $(tail -n 1 "$LOGS/wheels.log")"; return 0; }
  export PYTHONPATH="$STATE/site${PYTHONPATH:+:$PYTHONPATH}"
  if [ -d "$STATE/site/cutlass_library/source" ]; then
    export RESNET_FUSED_CUTLASS_DIR="$STATE/site/cutlass_library/source"
  fi
  WHEELS=("${wheels[@]##*/}")
}

# compute-sanitizer over the correctness driver's subset for a tool, the oracle on the CPU (cuDNN left unchecked)
if [ -n "$SANITIZER" ]; then
  SANITIZE=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --report-api-errors no --print-limit 50 --tool)
else
  SANITIZE=(sh -c 'echo "compute-sanitizer not found (PATH, /usr/local/cuda)"; exit 3' no-sanitizer)
fi
SANITIZED=("$PY" -m scripts.gpu_pass.correctness --device cuda --backends "triton,cuda" --reference cpu)

WHEELS=()
install_wheels
run_step env "$PY" -m scripts.gpu_pass.env --out "$STATE/env.json" --sanitizer "$SANITIZER" \
  --wheels-installed ${WHEELS[@]+"${WHEELS[@]}"}
refresh
if [ "$MODE" = main ]; then
  # The build and the Triton warm-up share the cores: neither needs the other. The warm-up yields to the build.
  run_step build "$PY" setup.py build_ext --inplace &
  run_step warmup nice -n 5 "$PY" -m scripts.gpu_pass.warmup --out "$STATE/warmup.json" --workers "$NPROC" &
  wait
  "$PY" -c "import resnet_fused as rf; print('conv kernels:', rf.ops.registry._BACKENDS['cuda'].kernel_path('cuda'))" \
    >> "$LOGS/build.log" 2>&1
  refresh
  run_step correctness "$PY" -m scripts.gpu_pass.correctness --device cuda --backends triton,cuda \
    --out "$STATE/correctness.json"
  refresh
  run_step memcheck "${SANITIZE[@]}" memcheck "${SANITIZED[@]}" --set memcheck --out "$STATE/memcheck.json"
  refresh
  run_step racecheck "${SANITIZE[@]}" racecheck "${SANITIZED[@]}" --set racecheck --out "$STATE/racecheck.json"
  refresh
  run_step headline "$PY" -m scripts.gpu_pass.headline --mode main --out "$STATE/headline.json" \
    --bench-out "$STATE/headline.bench.json"
  refresh
  run_step convs "$PY" -m scripts.gpu_pass.convs --out "$STATE/convs.json" --bench-out "$STATE/convs.bench.json"
else
  with_fused=()
  if [ -s "$STATE/warmup.json" ]; then with_fused=(--with-fused); fi   # still warm: build and caches are here
  run_step train "$PY" -m scripts.gpu_pass.train --out "$STATE/train.json" --bench-out "$STATE/train.bench.json"
  refresh
  run_step compile "$PY" -m scripts.gpu_pass.headline --mode followup ${with_fused[@]+"${with_fused[@]}"} \
    --out "$STATE/compile.json" --bench-out "$STATE/compile.bench.json"
fi
run_step finalize "$PY" -m scripts.gpu_pass.summary --state "$STATE" --out "$OUT" --command "$MODE" --png
refresh   # once more, with finalize's own status
files=$(find "$OUT" -type f | wc -l)
echo "== $MODE done in $((SECONDS - BEGIN)) s; $files files in $OUT (at most $MAX_FILES come back)"
head -n 60 "$OUT/summary.md" 2>/dev/null
((files <= MAX_FILES))
