"""Timings in pytest-benchmark's JSON format, so that `python -m resnet_fused report` reads the pass's results
beside any `pytest benchmarks --benchmark-json` run, with the GPU named in machine_info.

Groups are named as the benchmark suites name them ("<kind> <case> | <dtype> b<batch> <device>"), providers in
extra_info["provider"]; every round's time is kept (stats.data). No torch here: the summary merges these files.
"""

from __future__ import annotations

import datetime
import platform
from typing import List


def group_name(kind: str, case: str, dtype: str, batch: int, device: str = "cuda") -> str:
    return f"{kind} {case} | {dtype} b{batch} {device}"


def entry(group: str, provider: str, samples: List[float], reps: int, extra_info: dict) -> dict:
    """One benchmark as pytest-benchmark writes it (stats over the per-call seconds of each round)."""
    from pytest_benchmark.stats import Stats

    stats = Stats()
    for seconds in samples:
        stats.update(seconds)
    name = f"{group} [{provider}]"
    return {"group": group, "name": name, "fullname": f"scripts/gpu_pass::{name}", "params": {"provider": provider},
            "param": provider, "extra_info": dict(extra_info, provider=provider),
            "options": {"timer": "cuda events", "interleaved": True, "rounds": len(samples)},
            "stats": dict(stats.as_dict(), data=list(samples), iterations=reps)}


def document(benchmarks: List[dict], env: dict) -> dict:
    """The whole JSON: pytest-benchmark's machine_info with the GPU and versions added."""
    import pytest_benchmark
    from pytest_benchmark.plugin import pytest_benchmark_generate_machine_info
    from pytest_benchmark.utils import get_commit_info

    machine = pytest_benchmark_generate_machine_info()
    machine.update(gpu=env.get("device"), torch=env.get("torch"), triton=env.get("triton"),
                   cuda=env.get("cuda"), cudnn=env.get("cudnn"), node=platform.node())
    return {"machine_info": machine, "commit_info": get_commit_info(), "benchmarks": benchmarks,
            "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "version": pytest_benchmark.__version__}


def merge(documents: List[dict]) -> dict:
    """Several documents as one: the first one's machine and commit, every benchmark (a later provider's
    timing of the same group replacing an earlier one's, as `report` merges files)."""
    merged, index = dict(documents[0], benchmarks=[]), {}
    for doc in documents:
        for bench in doc["benchmarks"]:
            key = (bench["group"], bench["extra_info"].get("provider"))
            if key in index:
                merged["benchmarks"][index[key]] = bench
            else:
                index[key] = len(merged["benchmarks"])
                merged["benchmarks"].append(bench)
    return merged
