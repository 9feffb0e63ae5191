"""The roofline bound of a layer and the device peaks it is measured against.

    bound_seconds = max(FLOPs / peak_flops_per_s, bytes / peak_bytes_per_s)
    percent_of_roofline = 100 * bound_seconds / measured_seconds     (100% = as fast as the device allows)

Peaks are measured once per (device model, dtype; on a CPU also the thread count) and cached in a JSON file
(~/.cache/resnet_fused/roofline.json, or $RESNET_FUSED_CACHE_DIR/roofline.json): FLOP/s from a big matmul (2*n^3
FLOPs), bytes/s from a big copy (it reads and writes every byte, so 2 * size bytes move). On a CPU, torch's matmul
runs below what oneDNN's convolutions reach, so the FLOP/s peak there is the best of the matmul and a
compute-bound 3x3 convolution. A busy machine measures low peaks: a measurement whose repeats spread by more than
NOISY is used once but not cached, entries expire after MAX_AGE_S, and an entry of the wrong shape (another
version's, hand-edited) is measured again.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch

from .environment import DTYPE_NAMES, device_name, load_average
from .timing import NOISY, measure


MAX_AGE_S = 7 * 24 * 3600


@dataclass(frozen=True)
class Peak:
    device: str
    dtype: str
    flops_per_s: float
    bytes_per_s: float
    measured_at: float = 0.0  # time.time()
    spread: float = 0.0  # the largest spread of the measurement's repeats (see NOISY)
    load: Optional[float] = None  # the 1-minute load average then, where the OS tells

    @property
    def noisy(self) -> bool:
        return self.spread > NOISY


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
        times = measure(paths, device, warmup=2, iters=iters)
    flops_per_s = 2.0 * n**3 / times["matmul"].median
    if "conv" in times:
        flops_per_s = max(flops_per_s, 2.0 * 8 * 56 * 56 * 64 * 64 * 9 / times["conv"].median)
    return Peak(device=device_name(device), dtype=DTYPE_NAMES.get(dtype, str(dtype)),
                flops_per_s=flops_per_s,
                bytes_per_s=2.0 * src.numel() * src.element_size() / times["copy"].median,
                measured_at=time.time(), spread=max(t.spread for t in times.values()), load=load_average())


def device_peak(device, dtype: torch.dtype, *, refresh: bool = False, **measure_kwargs) -> Peak:
    """The cached peak for (this device, dtype), measured and stored on first use, and again when the entry is
    missing, of the wrong shape, or older than MAX_AGE_S; a noisy measurement is returned but not stored."""
    path = cache_file()
    device = torch.device(device)
    dtype_name = DTYPE_NAMES.get(dtype, str(dtype))
    name = device_name(device)
    threads = f"|{torch.get_num_threads()} threads" if device.type == "cpu" else ""
    key = f"{name}|{device.type}|{dtype_name}{threads}"
    try:
        cache = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError, RecursionError):
        cache = {}  # a corrupt cache is re-measured, not fatal
    cache = cache if isinstance(cache, dict) else {}
    cached = None if refresh else _valid_entry(cache.get(key), name, dtype_name)
    if cached is not None:
        return cached
    peak = measure_peak(device, dtype, **measure_kwargs)
    if peak.noisy:
        return peak
    cache[key] = asdict(peak)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cache, indent=2))
    except OSError:
        pass  # a read-only home still gets the numbers, just not cached
    return peak


def _valid_entry(entry, device: str, dtype: str) -> Optional[Peak]:
    """The cached Peak if the entry is one this version wrote for this device and dtype, fresh and plausible."""
    if not isinstance(entry, dict) or set(entry) != {f.name for f in fields(Peak)}:
        return None
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    if entry["device"] != device or entry["dtype"] != dtype or not all(
            number(entry[k]) and entry[k] > 0 for k in ("flops_per_s", "bytes_per_s", "measured_at")):
        return None
    if not (number(entry["spread"]) and 0 <= entry["spread"] <= NOISY) or not (
            entry["load"] is None or number(entry["load"])):
        return None
    if not 0 <= time.time() - entry["measured_at"] <= MAX_AGE_S:
        return None
    return Peak(**entry)
