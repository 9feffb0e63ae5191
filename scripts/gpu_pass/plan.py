"""`scripts/gpu_validate.sh --plan`: the pass's steps with their budgets, the Triton compiles each step triggers,
and the files it returns, computed without a GPU. The last line reads `budget <S> s, <F> files`; the exit
status is non-zero when S exceeds the window (780 s), a command its limit, F the 8 files that come back, or
when some autotune config would be forced on fewer shapes than promised.

Compile counts come from workload.py's launches through compiles.py (the kernel's own prune over the
autotuner's configs, Triton's int specialization): for each step, the distinct compiles its launches trigger,
and how many of them the warm-up has not already made (0 when the warm-up covers the run).
"""

from __future__ import annotations

import sys
from typing import Dict, List, Tuple

from . import compiles, workload
from .steps import COMMAND_LIMITS, MAX_FILES, OUTPUTS, STEPS, WINDOW_S, command_budget

COMPILE_SECONDS = 2.0  # a Triton compile of these kernels takes 1-3 s of one core
CORES = 16             # the H100/H200 machines' CPU cores


def step_calls() -> Dict[str, list]:
    """The Triton launches of each step that makes any (the follow-up's triton provider on a warm machine)."""
    headline = workload.model_calls(256, workload.HEADLINE_DTYPE) + workload.model_calls(1, workload.HEADLINE_DTYPE)
    return {
        "correctness": workload.correctness_calls("triton", "cuda"),
        "memcheck": workload.sanitizer_calls("triton", "memcheck"),
        "racecheck": workload.sanitizer_calls("triton", "racecheck"),
        "headline": headline,
        "convs": workload.model_calls(256, workload.HEADLINE_DTYPE),
        "train": workload.train_calls(256, workload.HEADLINE_DTYPE),
        "compile": workload.model_calls(256, workload.HEADLINE_DTYPE),
    }


def _counts(compile_list) -> str:
    by_kernel = compiles.count_by_kernel(compile_list)
    return ", ".join(f"{kernel} {n}" for kernel, n in by_kernel.most_common())


def render() -> Tuple[List[str], bool]:
    """The plan's lines, and whether it fits."""
    calls = step_calls()
    warm = []
    for step_calls_ in calls.values():
        warm = warm + compiles.distinct_compiles(step_calls_, already=warm)
    lines = [f"GPU pass plan: one {WINDOW_S} s window on an H100/H200 ({CORES} cores, {compiles.SM_COUNT} SMs "
             f"assumed for split K); scripts/gpu_validate.sh [main|followup]", "",
             f"{'command':<9} {'step':<12} {'budget s':>8}  {'Triton compiles (new after warm-up)':<38} what"]
    for step in STEPS:
        if step.name == "warmup":
            count = f"{len(warm)} ({_counts(warm)})"
        elif step.name in calls:
            own = compiles.distinct_compiles(calls[step.name])
            count = f"{len(own)} ({len(compiles.distinct_compiles(calls[step.name], already=warm))} new)"
        else:
            count = "-"
        budget = f"{step.budget_s}" + ("+" if step.elastic else "") + ("*" if step.parallel_with else "")
        lines.append(f"{step.command:<9} {step.name:<12} {budget:>8}  {count:<38} {step.what}")
    lines += ["", "* runs at the same time as the step it names (parallel_with): its phase costs the longer budget",
              "+ elastic: may also use what the earlier steps of its command left unused", ""]
    ok = True
    for command, limit in COMMAND_LIMITS.items():
        budget = command_budget(command)
        ok &= budget <= limit
        lines.append(f"{command}: {budget} s of its {limit} s limit" + ("" if budget <= limit else "  OVER"))
    estimate = len(warm) * COMPILE_SECONDS / CORES
    lines.append(f"warm-up: {len(warm)} compiles x ~{COMPILE_SECONDS:.0f} s / {CORES} cores = ~{estimate:.0f} s of "
                 f"the build's phase")
    coverage = compiles.config_coverage(workload.forced_triton_calls("cuda"))
    expected = {(dtype, compiles.config_label(c)) for dtype in workload.DTYPES for c in compiles.gpu_configs()}
    fewest = min(coverage.get(key, 0) for key in expected)
    ok &= fewest >= compiles.MIN_SHAPES_PER_CONFIG
    lines.append(f"Triton configs forced: {len(compiles.gpu_configs())} configs x {len(workload.DTYPES)} dtypes, "
                 f"each on at least {fewest} shapes (promised: {compiles.MIN_SHAPES_PER_CONFIG})")
    lines += ["", "files returned from $OUT:"] + [f"  {name:<14} {what}" for name, what in OUTPUTS.items()]
    total = sum(command_budget(command) for command in COMMAND_LIMITS)
    ok &= total <= WINDOW_S and len(OUTPUTS) <= MAX_FILES
    lines.append(f"budget {total} s, {len(OUTPUTS)} files")
    return lines, ok


def main() -> int:
    lines, ok = render()
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
