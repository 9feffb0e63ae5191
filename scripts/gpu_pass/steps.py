"""The steps of the GPU pass, their time budgets, and the files it returns: one table that the shell script reads
(`--shell`), the plan prints and the summary reports against. No torch here: the script reads it in 50 ms.

A lent GPU comes as one window of 15 minutes of machine time: a cold start (1-2 minutes), then one main command
of at most 540 s and, right after it while the machine is warm, one follow-up of at most 240 s. The steps run in
priority order, each under its own timeout (its budget, cut to what is left of its command's limit), so a run cut
short still returns what matters most. Steps that name `parallel_with` run at the same time as that step; their
phase costs the longer of the two budgets. An elastic step may also use what the earlier steps left unused: its
timeout is what remains of the command's limit less the budgets of the steps after it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import List

WINDOW_S = 780            # the 15-minute window less a cold start and the transfers
COMMAND_LIMITS = {"main": 540, "followup": 240}
MAX_FILES = 8             # files the device tool returns from $OUT


@dataclass(frozen=True)
class Step:
    command: str
    name: str
    budget_s: int
    what: str
    parallel_with: str = ""
    elastic: bool = False


STEPS: List[Step] = [
    Step("main", "env", 15, "install carried wheels (.whl/*.whl: nvidia-cutlass), record device and versions"),
    Step("main", "build", 215, "the extension with its CUDA kernels (setup.py build_ext --inplace, MAX_JOBS=cores)"),
    Step("main", "warmup", 215, "compile every Triton kernel the later steps launch, one process per core, "
                                "without running them", parallel_with="build"),
    Step("main", "correctness", 80, "triton and cuda vs the fp32 oracle: every dtype, ResNet-50 conv and edge "
                                    "shape, every autotune config forced on >= 3 shapes, split K, elementwise"),
    Step("main", "memcheck", 65, "compute-sanitizer memcheck (PYTORCH_NO_CUDA_MEMORY_CACHING=1) over both "
                                 "backends' kernels: every config and split once, every small shape on cuda"),
    Step("main", "racecheck", 25, "compute-sanitizer racecheck, two launches per backend"),
    Step("main", "headline", 70, "resnet50 bf16: batch 256 (eager, cuDNN fused ops, triton, cuda; torch.compile "
                                 "when time remains) and batch 1 through CUDA graphs", elastic=True),
    Step("main", "convs", 40, "each distinct ResNet-50 conv at bf16 batch 256: eager, cuDNN, triton, cuda, with "
                              "percent of the roofline bound"),
    Step("main", "finalize", 20, "summary.md, bench.json, bench.png, results.json, logs.tar.gz"),
    Step("followup", "env", 15, "record device and versions (again: the machine may be a fresh one)"),
    Step("followup", "train", 80, "training path: the BatchNorm training kernels' GPU tests (triton, cuda), then "
                                  "the resnet50 bf16 batch 256 train step: eager NCHW and channels_last, cuda, then "
                                  "triton with the time left (its compiles are in the main command's warm-up: "
                                  "made already when the machine is still warm)"),
    Step("followup", "compile", 110, "torch.compile(mode='max-autotune') beside eager and cuDNN (triton, cuda too "
                                     "when the machine is still warm) at bf16 batch 256, then default torch.compile "
                                     "as time allows", elastic=True),
    Step("followup", "finalize", 20, "the same five files, merged with the main command's results"),
]

OUTPUTS = {
    "summary.md": "what ran, pass/fail counts per backend x dtype, the headline against the goals",
    "bench.json": "pytest-benchmark JSON (device in machine_info): `python -m resnet_fused report bench.json`",
    "bench.png": "speedups vs eager (resnet_fused report's chart)",
    "results.json": "every step's record: statuses, each correctness case, sanitizer summaries, tables",
    "logs.tar.gz": "every step's log",
}


def steps_of(command: str) -> List[Step]:
    if command not in COMMAND_LIMITS:
        raise ValueError(f"command must be one of {sorted(COMMAND_LIMITS)}, got {command!r}")
    return [step for step in STEPS if step.command == command]


def _phase_costs(steps: List[Step]) -> List[int]:
    """What each step adds to its command's time: a parallel step only what it runs past its partner."""
    budgets = {step.name: step.budget_s for step in steps}
    return [max(0, step.budget_s - budgets[step.parallel_with]) if step.parallel_with else step.budget_s
            for step in steps]


def command_budget(command: str) -> int:
    """Seconds the command's steps may take."""
    return sum(_phase_costs(steps_of(command)))


def shell(command: str) -> str:
    """Bash assignments for the script, for one command: LIMIT, MAX_FILES, STEPS, and per step
    BUDGET_<step>, AFTER_<step> (the budgets of the steps after it) and ELASTIC_<step>."""
    steps = steps_of(command)
    costs = _phase_costs(steps)
    lines = [f"LIMIT={COMMAND_LIMITS[command]}", f"MAX_FILES={MAX_FILES}",
             f"STEPS=\"{' '.join(step.name for step in steps)}\""]
    for i, step in enumerate(steps):
        lines += [f"BUDGET_{step.name}={step.budget_s}", f"AFTER_{step.name}={sum(costs[i + 1:])}",
                  f"ELASTIC_{step.name}={int(step.elastic)}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shell", metavar="COMMAND", choices=sorted(COMMAND_LIMITS), required=True,
                        help="print the budgets of COMMAND as bash assignments")
    print(shell(parser.parse_args().shell))


if __name__ == "__main__":
    main()
