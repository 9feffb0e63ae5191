"""What the nvcc compile tests share (no GPU needed): finding nvcc and cuobjdump, and one timed compile."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Optional


def find_nvcc() -> Optional[str]:
    found = shutil.which("nvcc")
    if found:
        return found
    default = "/usr/local/cuda/bin/nvcc"
    return default if os.access(default, os.X_OK) else None


def find_cuobjdump() -> Optional[str]:
    """cuobjdump from PATH, else the copy triton ships in triton/backends/nvidia/bin."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if os.access(bundled, os.X_OK) else None


def run_compile(cmd: list, out: str, timeout_s: float) -> tuple[int, str, float]:
    """Run an nvcc command that writes `out`: (return code, the command and its output, seconds)."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        rc, log = proc.returncode, proc.stderr + proc.stdout
    except subprocess.TimeoutExpired:
        rc, log = -1, f"timed out after {timeout_s} s"
    elapsed = time.perf_counter() - start
    if rc == 0 and not os.path.getsize(out):
        rc, log = -1, f"nvcc exited 0 but wrote an empty object file {out}\n{log}"
    return rc, f"$ {' '.join(map(str, cmd))}\n{log}", elapsed


NVCC_MISSING = "nvcc is neither on PATH nor at /usr/local/cuda/bin/nvcc"
