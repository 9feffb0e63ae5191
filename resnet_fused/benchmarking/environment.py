"""The facts recorded beside every measurement: the device's name and the library versions."""

from __future__ import annotations

import os
import platform
from typing import Optional

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def device_name(device) -> str:
    """The GPU's name, or the CPU's model (not platform.machine(): every x86 machine is "x86_64")."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def environment(device) -> dict:
    """Versions and device facts recorded with every benchmark and profile."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # triton absent or broken: recorded, not fatal
        triton_version = None
    return {
        "device": device_name(device),
        "device_type": torch.device(device).type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
    }


def load_average() -> Optional[float]:
    """The machine's 1-minute load, recorded beside CPU timings (they mean little on a busy machine)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
