"""Record the machine the pass runs on: GPU, driver, versions, tools, and which carried wheels were installed.

    python -m scripts.gpu_pass.env --out env.json [--wheels-installed NAME ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path


def _first_line(command) -> str:
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({type(exc).__name__})"
    lines = [line for line in (run.stdout or run.stderr).splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"no output (exit {run.returncode})"


def collect(wheels_installed, sanitizer: str) -> dict:
    import torch

    from resnet_fused.benchmarking.environment import environment

    device = "cuda" if torch.cuda.is_available() else "cpu"
    info = dict(environment(device), python=platform.python_version(), cpu_count=os.cpu_count(),
                wheels_installed=list(wheels_installed),
                cutlass_package=importlib.util.find_spec("cutlass_library") is not None,
                nvcc=_first_line(["nvcc", "--version"]) if shutil.which("nvcc") else "not on PATH")
    info["compute_sanitizer"] = _first_line([sanitizer, "--version"]) if sanitizer else "not found"
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1),
                    driver=_first_line(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,"
                                        "temperature.gpu,power.draw", "--format=csv,noheader"]))
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--wheels-installed", nargs="*", default=[])
    parser.add_argument("--sanitizer", default="", help="the compute-sanitizer the script found (empty: none)")
    args = parser.parse_args(argv)
    info = collect(args.wheels_installed, args.sanitizer)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1))
    print(f"{info['device']}: torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
