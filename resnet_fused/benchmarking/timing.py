"""Wall-clock timing that is honest on both devices: CUDA events (after a sync) on a GPU, perf_counter on CPU."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, NamedTuple

import torch


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device) -> float:
    """Seconds one call of fn takes, including the device work it queued."""
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        synchronize(device)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


NOISY = 0.25  # a spread of repeats past which a timing says more about the machine's load than about the code


class Timing(NamedTuple):
    median: float  # seconds per call
    spread: float  # (slowest - fastest) / median over the repeats: 0 with one repeat


def measure(fns: Dict[str, Callable[[], object]], device, *, warmup: int = 1, iters: int = 5,
            progress: Callable[[str], None] = None) -> Dict[str, Timing]:
    """Median seconds per call of each fn and the spread of its repeats, measured interleaved (a, b, a, b, ...)
    so that load on a shared machine hits every contender alike. Each fn runs `warmup` times first, untimed."""
    if warmup < 0 or iters < 1:
        raise ValueError(f"need warmup >= 0 and iters >= 1, got warmup={warmup}, iters={iters}")
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        synchronize(device)
        if progress:
            progress(f"warmed up {name}")
    samples = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            samples[name].append(time_once(fn, device))
    timings = {}
    for name, times in samples.items():
        median = statistics.median(times)
        timings[name] = Timing(median, (max(times) - min(times)) / median if median > 0 else 0.0)
    return timings


def side_by_side(fns: Dict[str, Callable[[], object]], device, *, warmup: int = 1, iters: int = 5,
                 progress: Callable[[str], None] = None) -> Dict[str, float]:
    """measure's medians alone."""
    return {name: t.median for name, t in measure(fns, device, warmup=warmup, iters=iters, progress=progress).items()}
