"""The training path on the GPU: the BatchNorm training kernels against their reference, then the train step timed.

    python -m scripts.gpu_pass.train --out train.json --bench-out train.bench.json

1. tests: the GPU cases of tests/backends/test_cuda_batch_norm.py and tests/backends/test_triton_batch_norm.py
   (`-m gpu`: statistics, apply + add + ReLU and backward at ResNet sizes, every dtype, both layouts) under pytest,
   counted from its JUnit XML.
2. timing: benchmarks/test_bench_train.py's resnet50 train step (forward + backward + SGD, bf16 autocast, batch 256
   at 224x224) for eager NCHW, eager channels_last and the cuda backend, then the triton backend with the time left
   (its conv kernels with the statistics epilogue and its BatchNorm kernels are in the main command's warm-up,
   workload.train_calls; on a fresh machine they compile on first use);
   torch.compile is left to the compile step. Into pytest-benchmark JSON that the summary merges; the summary sets
   the fused ones against eager and the README's goal.
Each part runs under what is left of the step's deadline (GPU_PASS_DEADLINE, set by scripts/gpu_validate.sh), the
tests first; train.json is rewritten after each part, so a step cut short keeps what finished.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from .benchjson import merge

ROOT = Path(__file__).resolve().parents[2]
TEST_FILES = ("tests/backends/test_cuda_batch_norm.py", "tests/backends/test_triton_batch_norm.py")
BENCH_CASE = "benchmarks/test_bench_train.py::test_train_step[resnet50-cuda-bf16-b256-{}]"
BENCH_RUNS = (("eager-nchw", "eager", "cuda"), ("triton",))  # one pytest each, in this order
BENCH_NEEDS_S = 25  # pytest's start, the model builds and a few steps per provider at batch 256


def junit_counts(path: Path) -> dict:
    """passed / failed / errors / skipped and the failing test ids, from a JUnit XML file pytest wrote."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    if not path.is_file():
        return counts
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome == "failure":
            counts["failed"] += 1
            counts["failures"].append(test_id)
        elif outcome == "error":
            counts["errors"] += 1
            counts["failures"].append(test_id)
        elif outcome == "skipped":
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


def _run(args, seconds: float, log_name: str) -> dict:
    """Run one pytest under a timeout; its return code and time (a cut run says so)."""
    begin = time.monotonic()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=max(1.0, seconds))
        rc, output = run.returncode, run.stdout + run.stderr
    except subprocess.TimeoutExpired as expired:  # its output comes as bytes even with text=True
        out = expired.stdout or b""
        rc, output = "timeout", out.decode(errors="replace") if isinstance(out, bytes) else out
    print(f"--- {log_name}\n{output[-4000:]}")
    return {"rc": rc, "seconds": round(time.monotonic() - begin, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bench-out", type=Path, required=True)
    args = parser.parse_args(argv)
    deadline = float(os.environ.get("GPU_PASS_DEADLINE", time.time() + 120))
    record = {"finished": False}

    def write():
        args.out.write_text(json.dumps(record, indent=1))

    xml = args.out.with_suffix(".junit.xml")
    left = deadline - time.time() - BENCH_NEEDS_S - 5
    run = _run(["-m", "gpu", "-q", f"--junitxml={xml}", *TEST_FILES], left, "tests")
    record["tests"] = dict(junit_counts(xml), **run)
    write()
    record["bench"] = {"rc": "not run", "seconds": 0}
    documents = []
    for index, providers in enumerate(BENCH_RUNS):
        left = deadline - time.time() - 5
        if left < BENCH_NEEDS_S:
            record["bench"]["reason"] = f"{left:.0f} s left for {', '.join(providers)}, under {BENCH_NEEDS_S} s"
            break
        part = args.bench_out.with_suffix(f".{index}.json")
        run = _run(["-q", f"--benchmark-json={part}", *(BENCH_CASE.format(p) for p in providers)], left,
                   "train step: " + ", ".join(providers))
        record["bench"] = {"rc": run["rc"] if record["bench"]["rc"] in ("not run", 0) else record["bench"]["rc"],
                           "seconds": record["bench"]["seconds"] + run["seconds"]}
        if part.is_file():  # pytest-benchmark writes nothing when every case skipped
            documents.append(json.loads(part.read_text()))
            args.bench_out.write_text(json.dumps(merge(documents), indent=1))
        write()
    record["finished"] = True
    write()
    failed = record["tests"]["failed"] + record["tests"]["errors"]
    print(f"train: tests {record['tests']['passed']} passed, {failed} failed; bench rc {record['bench']['rc']}")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
