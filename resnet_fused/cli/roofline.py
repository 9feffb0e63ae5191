"""The roofline bound of a layer and the device peaks it is measured against.

    bound_seconds = max(FLOPs / peak_flops_per_s, bytes / peak_bytes_per_s)
    percent_of_roofline = 100 * bound_seconds / measured_seconds     (100% = as fast as the device allows)

Peaks are measured once per (device, dtype) and cached in a JSON file (~/.cache/resnet_fused/roofline.json, or
$RESNET_FUSED_CACHE_DIR/roofline.json): FLOP/s from a big matmul (2*n^3 FLOPs), bytes/s from a big copy (it
reads and writes every byte, so 2 * size bytes move). On a CPU, torch's matmul runs below what oneDNN's
convolutions reach, so the FLOP/s peak there is the best of the matmul and a compute-bound 3x3 convolution.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from .common import DTYPE_NAMES, device_name
from .timing import side_by_side


@dataclass(frozen=True)
class Peak:
    device: str
    dtype: str
    flops_per_s: float
    bytes_per_s: float


def bound_seconds(flops: float, nbytes: float, peak: Peak) -> float:
    return max(flops / peak.flops_per_s, nbytes / peak.bytes_per_s)


def percent_of_roofline(measured_seconds: float, flops: float, nbytes: float, peak: Peak) -> float:
    if measured_seconds <= 0:
        raise ValueError(f"measured_seconds must be > 0, got {measured_seconds}")
    return 100.0 * bound_seconds(flops, nbytes, peak) / measured_seconds


def cache_file() -> Path:
    root = os.environ.get("RESNET_FUSED_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                    "resnet_fused")
    return Path(root) / "roofline.json"


def measure_peak(device, dtype: torch.dtype, *, matmul_size: Optional[int] = None,
                 copy_mib: Optional[int] = None, iters: int = 5) -> Peak:
    """Measure this device's matmul FLOP/s and copy bandwidth in `dtype` (a few seconds at most)."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    n = matmul_size or (8192 if on_gpu else 2048)
    numel = (copy_mib or (1024 if on_gpu else 128)) * 2**20 // torch.finfo(dtype).bits * 8
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    src = torch.empty(numel, device=device, dtype=dtype).fill_(1)
    dst = torch.empty_like(src)
    paths = {"matmul": lambda: torch.mm(a, b), "copy": lambda: dst.copy_(src)}
    if not on_gpu:
        x = torch.randn(8, 64, 56, 56).to(dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(64, 64, 3, 3).to(dtype).contiguous(memory_format=torch.channels_last)
        paths["conv"] = lambda: torch.nn.functional.conv2d(x, w, padding=1)
    with torch.inference_mode():
        times = side_by_side(paths, device, warmup=2, iters=iters)
    flops_per_s = 2.0 * n**3 / times["matmul"]
    if "conv" in times:
        flops_per_s = max(flops_per_s, 2.0 * 8 * 56 * 56 * 64 * 64 * 9 / times["conv"])
    return Peak(device=device_name(device), dtype=DTYPE_NAMES.get(dtype, str(dtype)),
                flops_per_s=flops_per_s,
                bytes_per_s=2.0 * src.numel() * src.element_size() / times["copy"])


def device_peak(device, dtype: torch.dtype, *, refresh: bool = False, **measure_kwargs) -> Peak:
    """The cached peak for (this device, dtype), measured and stored on first use."""
    path = cache_file()
    key = f"{device_name(device)}|{torch.device(device).type}|{DTYPE_NAMES.get(dtype, str(dtype))}"
    cache = {}
    if path.is_file():
        try:
            cache = json.loads(path.read_text())
        except (OSError, ValueError):
            cache = {}  # a corrupt cache is re-measured, not fatal
    if not refresh and key in cache:
        return Peak(**cache[key])
    peak = measure_peak(device, dtype, **measure_kwargs)
    cache[key] = asdict(peak)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cache, indent=2))
    except OSError:
        pass  # a read-only home still gets the numbers, just not cached
    return peak
