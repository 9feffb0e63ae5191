"""Whole models on the CPU, every provider timed side by side with the providers interleaved round by round.

    python benchmarks/side_by_side.py [--models resnet50 resnet18] [--batches 1 8] [--dtypes fp32 bf16]
        [--providers eager-nchw eager cpu onnxruntime openvino] [--rounds 6] [--runs 2] [--json FILE]
    python benchmarks/side_by_side.py --train [--batches 8] [--providers eager-nchw eager cpu] ...

Inference: eval forwards at 224x224 under inference_mode. --train: benchmarks/test_bench_train.py's train step
(forward, backward, SGD; 128x128, fp32), the bytes autograd saves in extra_info.

pytest-benchmark times one provider after another; on a shared machine the load moves between them, and so do the
ratios. Here each round runs every provider `runs` times in turn, and each provider's figure is the median over all
its runs (its minimum, the least disturbed run, is kept too). Each provider's turn starts with one untimed run: an
engine's idle worker threads spin for a while after its run (ONNX Runtime's, OpenVINO's and torch's OpenMP pool
alike), and the provider that runs next would otherwise share the cores with them (measured: a fused resnet50 run
straight after ONNX Runtime's took 1.25-1.7x as long, ONNX Runtime's straight after a torch run 1.03-1.2x). Even so,
the later place in a round measured faster (fused resnet50 at batch 1 against ONNX Runtime, 10 rounds: 0.95x and 0.96x
when fused ran first, 1.04x and 1.02x when it ran second), so the order moves on by one provider each round. Each
provider's output is checked against eager before timing. The load average is recorded before and after each case.

--json writes the pytest-benchmark layout (one entry per case and provider, extra_info["provider"], stats in
seconds), so that `python -m resnet_fused report FILE --markdown` prints the speedup tables.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_harness import (BF16, F32, Setting, check_close, count_macs, cpu_convolves_bf16,  # noqa: E402
                           model_runner, reference_model, skip_reason)
from peers import PEERS  # noqa: E402
from resnet_fused.benchmarking.environment import DTYPE_NAMES, environment  # noqa: E402

IMAGE_SIZE = 224
DTYPES = {"fp32": F32, "bf16": BF16}
DEFAULT_PROVIDERS = ("eager-nchw", "eager", "cpu", "onnxruntime", "openvino")
TRAIN_PROVIDERS = ("eager-nchw", "eager", "cpu")
_TIMED_CONFIG = types.SimpleNamespace(getoption=lambda name, default=None: default)  # as a timed pytest run


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet50", "resnet18"], choices=["resnet50", "resnet18"])
    p.add_argument("--train", action="store_true", help="time the train step instead of the eval forward")
    p.add_argument("--batches", nargs="+", type=int, default=None, help="default: 1 8 (inference), 8 (--train)")
    p.add_argument("--dtypes", nargs="+", default=["fp32"], choices=sorted(DTYPES))
    p.add_argument("--providers", nargs="+", default=None,
                   help="any CPU provider of benchmarks/ (torch.compile too: it compiles for a minute or more); "
                        f"default: {' '.join(DEFAULT_PROVIDERS)} ({' '.join(TRAIN_PROVIDERS)} with --train)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--runs", type=int, default=2, help="runs of each provider per round")
    p.add_argument("--json", type=Path, default=None, help="write the timings here (pytest-benchmark layout)")
    args = p.parse_args(argv)
    args.batches = args.batches or ([8] if args.train else [1, 8])
    args.providers = args.providers or list(TRAIN_PROVIDERS if args.train else DEFAULT_PROVIDERS)
    if args.train and args.dtypes != ["fp32"]:
        p.error("--train times fp32 (the train step's CPU setting)")
    if min(args.batches) < 1 or args.rounds < 1 or args.runs < 1:
        p.error("--batches, --rounds and --runs must be at least 1")
    if "bf16" in args.dtypes and not cpu_convolves_bf16():
        p.error("--dtypes bf16: this CPU has no hardware bf16 convolution (AVX512-BF16/AMX), where it is compared")
    return args


def time_case(model_name: str, setting: Setting, providers, rounds: int, runs: int):
    """{provider: [seconds, ...]} for the runnable providers, {provider: reason} for the others, and the loads."""
    model = reference_model(model_name, setting)
    x = torch.randn(setting.batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    x = x.to(dtype=setting.dtype).contiguous(memory_format=torch.channels_last)
    runners, skipped, extras = {}, {}, {}
    with torch.inference_mode():
        expected = model(x)
    for provider in providers:
        reason = skip_reason(provider, setting, _TIMED_CONFIG, kind="model")
        if reason:
            skipped[provider] = reason
            continue
        runners[provider], extras[provider] = model_runner(provider, model, x)
    with torch.inference_mode():
        for provider, run in runners.items():  # warm-up (compilation, first-call caches) and the output check
            run()
            check_close(run(), expected, setting.dtype, "cpu", scale=2.0)
        times, loads = interleaved(runners, rounds, runs)
    return times, skipped, extras, loads


def time_train_case(model_name: str, setting: Setting, providers, rounds: int, runs: int):
    """time_case for the train step (its correctness is tests/test_train_step.py's)."""
    from test_bench_train import TRAIN_SIZE, _skip_reason, train_step

    runners, skipped, extras = {}, {}, {}
    for provider in providers:
        reason = ("an inference engine: no train step" if provider in PEERS
                  else _skip_reason(provider, setting, quick=False))
        if reason:
            skipped[provider] = reason
            continue
        runners[provider], _, extras[provider] = train_step(model_name, provider, setting, setting.batch,
                                                            TRAIN_SIZE["cpu"])
    for run in runners.values():  # warm-up: first-call caches, the optimizer's momentum buffers
        run()
        run()
    times, loads = interleaved(runners, rounds, runs)
    return times, skipped, extras, loads


def interleaved(runners: dict, rounds: int, runs: int):
    """({provider: [seconds, ...]}, (load average before, after)): each round runs every provider once untimed (the
    previous engine's spinning threads settle) and then `runs` times timed, in an order that moves on by one provider
    each round, so that every provider takes every place in the round equally often."""
    load_before = os.getloadavg()[0]
    times = {provider: [] for provider in runners}
    order = list(runners)
    for index in range(rounds):
        shift = index % len(order)
        for provider in order[shift:] + order[:shift]:
            run = runners[provider]
            run()
            for _ in range(runs):
                begin = time.perf_counter()
                run()
                times[provider].append(time.perf_counter() - begin)
    return times, (load_before, os.getloadavg()[0])


def entry(model_name, setting, provider, samples, extra, loads, env, train: bool):
    if train:
        from test_bench_train import TRAIN_SIZE, train_case

        kind, case, flops = "train", train_case(model_name, TRAIN_SIZE["cpu"]), {}
    else:
        kind, case = "model", f"{model_name} {IMAGE_SIZE}x{IMAGE_SIZE}"
        flops = {"flops": 2 * count_macs(reference_model(model_name, setting), setting.batch, IMAGE_SIZE)}
    group = f"{kind} {case} | {DTYPE_NAMES[setting.dtype]} b{setting.batch} cpu"
    return {
        "group": group, "name": f"side_by_side[{kind}-{model_name}-{setting.id}-{provider}]",
        "extra_info": {"provider": provider, "kind": kind, "case": case,
                       "dtype": DTYPE_NAMES[setting.dtype], "batch": setting.batch, **flops,
                       "device_name": env["device"], "machine": env["device"], "torch": env["torch"],
                       "threads": torch.get_num_threads(),
                       "interleaved": True, "order": "rotated", "settle_runs": 1, "load_before": loads[0], "load_after": loads[1], **extra},
        "stats": {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
                  "mean": statistics.fmean(samples), "rounds": len(samples), "data": samples},
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    env = environment("cpu")
    print(f"{env['device']}, torch {env['torch']}, {torch.get_num_threads()} threads for every provider")
    entries = []
    for model_name in args.models:
        for dtype_name in args.dtypes:
            for batch in args.batches:
                setting = Setting("cpu", DTYPES[dtype_name], batch)
                timer = time_train_case if args.train else time_case
                times, skipped, extras, loads = timer(model_name, setting, args.providers, args.rounds, args.runs)
                print(f"\n{model_name} {dtype_name} batch {batch}: load {loads[0]:.2f} -> {loads[1]:.2f}")
                baseline = "eager-nchw" if args.train else "eager"  # the train goal is against eager NCHW
                base = statistics.median(times[baseline]) if baseline in times else None
                for provider, samples in times.items():
                    median = statistics.median(samples)
                    ratio = f"  {base / median:5.2f}x {baseline}" if base else ""
                    print(f"  {provider:14s} median {median * 1e3:8.1f} ms  min {min(samples) * 1e3:8.1f} ms{ratio}")
                    entries.append(entry(model_name, setting, provider, samples, extras[provider], loads, env,
                                         args.train))
                for provider, reason in skipped.items():
                    print(f"  {provider:14s} skipped: {reason}")
    if args.json:
        args.json.write_text(json.dumps({
            "machine_info": {"node": platform.node(), "processor": platform.processor(), "machine": platform.machine(),
                             "cpu": {"brand_raw": env["device"], "count": os.cpu_count()},
                             "python_version": platform.python_version()},
            "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "version": "side_by_side", "benchmarks": entries}, indent=1))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
