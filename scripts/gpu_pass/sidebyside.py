"""Providers timed side by side: each built and warmed up, its output checked, then all timed in interleaved
rounds (each round times every provider once: CUDA events around `reps` calls), so that clock or load changes
hit every provider alike."""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Tuple


def warm_and_check(builders: Dict[str, Callable[[], Callable]], reference, tolerance: float,
                   infos: Dict[str, dict], calls: int = 3) -> Dict[str, Callable]:
    """{provider: fn} for the providers that built and ran. Each builder returns fn (one call of the provider);
    fn runs `calls` times (compile, autotune, split-K choice, graph capture), and its output is checked against
    `reference` (None: the first provider's output) by max relative error. infos[provider] gets status ("ok",
    "wrong output" or "error"), rel_err or message, and warmup_s."""
    import torch

    fns = {}
    for provider, build in builders.items():
        info = infos.setdefault(provider, {})
        start = time.monotonic()
        try:
            fn = build()
            for _ in range(calls):
                out = fn()
            if out.is_cuda:
                torch.cuda.synchronize()  # an asynchronous failure is this provider's, not the next one's
        except Exception as exc:  # noqa: BLE001  recorded; the other providers run
            info.update(status="error", message=f"{type(exc).__name__}: {str(exc)[:300]}")
            print(f"{provider}: {info['message']}", flush=True)
            continue
        info["warmup_s"] = round(time.monotonic() - start, 2)
        reference = out.float() if reference is None else reference
        err = ((out.float() - reference).abs().max() / reference.abs().max().clamp_min(1e-12)).item()
        info.update(rel_err=err, status="ok" if err <= tolerance else "wrong output")
        fns[provider] = fn
    return fns


def interleaved(fns: Dict[str, Callable[[], object]], rounds: int, reps: Dict[str, int], device="cuda",
                deadline: float = float("inf"), clock=None) -> Dict[str, List[float]]:
    """{provider: [seconds per call, one per round]}; stops early (keeping whole rounds) past `deadline`."""
    from resnet_fused.benchmarking.timing import time_once

    clock = clock or time.time
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        if clock() > deadline and all(samples.values()):
            break
        for name, fn in fns.items():
            n = reps[name]
            samples[name].append(time_once(lambda: [fn() for _ in range(n)], device) / n)
    return samples


def reps_for(seconds_per_call: float, target_s: float = 2e-3, most: int = 100) -> int:
    """Calls per timed sample, so that a sample lasts about target_s (short kernels drown in event jitter)."""
    return max(1, min(most, int(target_s / max(seconds_per_call, 1e-7))))


def time_side_by_side(fns: Dict[str, Callable], rounds: int, deadline: Optional[float] = None,
                      device="cuda") -> Tuple[Dict[str, List[float]], Dict[str, int]]:
    """(samples, reps): one untimed-length probe per provider sets its reps, then interleaved rounds."""
    once = {name: interleaved({name: fn}, 1, {name: 1}, device)[name][0] for name, fn in fns.items()}
    reps = {name: reps_for(seconds) for name, seconds in once.items()}
    return interleaved(fns, rounds, reps, device, deadline=float("inf") if deadline is None else deadline), reps
