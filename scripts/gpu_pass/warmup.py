"""Compile every Triton kernel the later steps launch, in parallel processes, without running any of them.

    python -m scripts.gpu_pass.warmup --out warmup.json [--workers N]

A Triton compile takes 1-3 s of one core and the pass needs hundreds (`--plan` counts them). The jobs are the
distinct compiles of the later steps' launches (compiles.distinct_compiles over workload.py's calls), each a
launch with its config and split forced; a pool of one process per core makes them with every Triton launch
switched to compile-only (KernelInterface.warmup: the binary and its launcher stub go to Triton's on-disk cache,
nothing runs on the GPU). The later steps then find every binary in the cache, and their autotuning only times.
Tensors are real (uninitialized) allocations of the launch's shapes, so the launch specializes exactly as it
will in the run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable, List


def _compile_instead_of_launch(kernel, grid):
    """KernelInterface.__getitem__ in compile-only mode: `kernel[grid](...)` compiles (or finds the binary in
    the cache) and returns without launching; an autotuner's warmup compiles each of its candidate configs.
    Each binary is also loaded, which builds its launcher stub (a C compile, cached on disk like the kernel)
    and checks that its shared memory fits the GPU."""
    def compile_(*args, **kwargs):
        compiled = kernel.warmup(*args, grid=grid, **kwargs)
        for binary in compiled if isinstance(compiled, list) else [compiled]:
            if hasattr(binary, "_init_handles"):
                binary._init_handles()
        return compiled
    return compile_


@contextlib.contextmanager
def compile_only():
    """Within: every Triton launch compiles instead of running."""
    from triton.runtime.jit import KernelInterface

    launch = KernelInterface.__getitem__
    KernelInterface.__getitem__ = _compile_instead_of_launch
    try:
        yield
    finally:
        KernelInterface.__getitem__ = launch


def jobs() -> list:
    """The distinct compiles of every later step, in the order the steps need them (the follow-up's train step
    last); the split-K epilogue, the statistics' combine and the BatchNorm backward's second and third kernels
    are compiled by the launch that uses them (compiles.SECONDARY), and get a job of their own only where no
    other job's launch makes them (a call whose main kernel another call's binary already is)."""
    from . import workload
    from .compiles import SECONDARY, call_compiles, distinct_compiles

    calls = workload.correctness_calls("triton", "cuda")  # the headline and per-conv calls are among these
    calls += workload.train_calls(256, workload.HEADLINE_DTYPE)
    distinct = distinct_compiles(calls)
    primary = [c for c in distinct if c.kernel not in SECONDARY]
    made = {(c.kernel, c.key) for job in primary for c in call_compiles(job.call) if c.kernel in SECONDARY}
    return primary + [c for c in distinct if c.kernel in SECONDARY and (c.kernel, c.key) not in made]


def launch(job, device: str = "cuda") -> None:
    """Make job's launch on fresh uninitialized tensors (compile-only within compile_only(); device "cpu": the
    Triton interpreter runs it, for tests)."""
    import torch

    from resnet_fused.benchmarking.environment import DTYPES
    from resnet_fused.kernels.triton import batch_norm, conv_bn_act as conv_kernel, elementwise

    from .compiles import candidate_configs, config_by_label, config_label
    from .workload import BatchNormCall

    call = job.call
    dtype = DTYPES[call.dtype]
    empty = lambda *shape, dtype=dtype: torch.empty(shape, dtype=dtype, device=device)  # noqa: E731
    cl = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731
    if isinstance(call, BatchNormCall):  # the BN's weight and bias; fp32 statistics
        c = call.shape[1]
        y, res = cl(empty(*call.shape)), cl(empty(*call.shape)) if call.residual else None
        vectors = [empty(c, dtype=torch.float32) for _ in range(4)]  # mean, invstd, weight, bias
        if call.op == "apply":
            batch_norm.batch_norm_apply(y, *vectors, res, call.relu, channels_last=True)
        else:
            batch_norm.batch_norm_backward(cl(empty(*call.shape)), y, *vectors, res, call.relu, channels_last=True)
        return
    if call.op != "conv_bn_act":
        x = cl(empty(*call.shape))
        if call.op == "add_relu":
            elementwise.add_relu(x, cl(empty(*call.shape)))
        else:
            c = call.shape[1]
            res = cl(empty(*call.shape)) if call.residual else None
            elementwise.bn_act(x, empty(c, dtype=torch.float32), empty(c, dtype=torch.float32), res, call.relu)
        return
    s = call.shape
    x = cl(empty(s.batch, s.cin, s.h, s.w))
    res = cl(empty(s.batch, s.cout, s.ho, s.wo)) if call.residual else None
    packed = empty(conv_kernel.packed_rows(s.cin, s.kernel, s.kernel), s.cout)
    scale, shift = empty(s.cout, dtype=torch.float32), empty(s.cout, dtype=torch.float32)
    # a job for a secondary kernel launches its call with any one config: the main binary is cached already
    label = job.config or call.config or config_label(candidate_configs(call)[0])
    if call.stats:
        conv_kernel.conv_batch_norm_stats(x, packed, shift, cl(empty(s.batch, s.cout, s.ho, s.wo)), s.kernel,
                                          s.kernel, s.stride, s.padding, config=config_by_label(label))
        return
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=call.precision != "ieee"):
        conv_kernel.conv_bn_act(x, packed, scale, shift, res, cl(empty(s.batch, s.cout, s.ho, s.wo)), s.kernel,
                                s.kernel, s.stride, s.padding, call.relu, split_k=job.split,
                                config=config_by_label(label))


def _worker_init() -> None:
    import torch
    from triton.runtime.jit import KernelInterface

    torch.cuda.init()
    KernelInterface.__getitem__ = _compile_instead_of_launch  # for the life of this worker process


def _run_job(job) -> dict:
    start = time.monotonic()
    try:
        launch(job)
        error = None
    except Exception as exc:  # noqa: BLE001  recorded; the step that launches it will meet it again
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    return {"kernel": job.kernel, "call": job.call.id, "config": job.config, "split": job.split,
            "seconds": round(time.monotonic() - start, 3), "error": error}


def run(job_list: list, workers: int, out: Path, run_job: Callable = _run_job,
        initializer: Callable = _worker_init) -> dict:
    """Run the jobs on `workers` processes, rewriting `out` as they finish; returns the final record."""
    import multiprocessing

    record = {"jobs": len(job_list), "workers": workers, "done": [], "finished": False}
    begin = time.monotonic()
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=initializer)
    try:
        futures = [pool.submit(run_job, job) for job in job_list]
        for future in as_completed(futures):
            record["done"].append(future.result())
            if len(record["done"]) % 25 == 0:
                _write(record, begin, out)
        record["finished"] = True
    except KeyboardInterrupt:
        print(f"interrupted after {len(record['done'])} of {len(job_list)} compiles", flush=True)
    except BrokenProcessPool as exc:  # a worker died (a crash in a compile): the steps compile the rest
        record["broken"] = str(exc)
        print(f"a worker process died after {len(record['done'])} compiles: {exc}", flush=True)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    _write(record, begin, out)
    return record


def _write(record: dict, begin: float, out: Path) -> None:
    record["seconds"] = round(time.monotonic() - begin, 2)
    record["errors"] = sum(1 for d in record["done"] if d["error"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    job_list = jobs()
    print(f"{len(job_list)} Triton compiles on {args.workers} processes", flush=True)
    record = run(job_list, args.workers, args.out)
    seconds = sum(d["seconds"] for d in record["done"])
    print(f"{len(record['done'])} compiled in {record['seconds']} s ({seconds:.0f} s of compile time), "
          f"{record['errors']} errors", flush=True)
    for done in record["done"]:
        if done["error"]:
            print(f"ERROR {done['kernel']} {done['call']} cfg={done['config']} split={done['split']}: "
                  f"{done['error']}", flush=True)
    return 1 if record["errors"] or not record["finished"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
