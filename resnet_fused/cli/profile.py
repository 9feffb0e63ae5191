"""`python -m resnet_fused profile`: where the time goes, eager vs fused.

Prints (1) whole-model images/s, (2) the top kernels of each path under torch.profiler (calls, total time),
(3) per distinct conv layer: eager (conv+BN+ReLU[+add+ReLU] modules) vs the fused op, their speedup and the
percent of the roofline bound max(FLOPs / peak FLOP/s, bytes / peak bandwidth) each reaches (peaks measured
once per device and dtype, cached; see roofline.py). Writes Chrome traces, a JSON of the numbers and a PNG bar
chart of the per-layer speedups into --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Tuple

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from ..benchmarking.environment import DTYPE_NAMES, environment, load_average
from ..benchmarking.fusing import fuse_for_benchmark
from ..benchmarking.layers import conv_layers
from ..benchmarking.models import MODELS, make_images
from ..benchmarking.roofline import Peak, bound_seconds, cache_file, device_peak
from ..benchmarking.timing import NOISY, Timing, measure
from ..benchmarking.units import conv_and_bn, eager_and_fused, layer_inputs
from .common import (build_model, check_fits, image_size, non_negative_int, output_dir, pick_backend, pick_device,
                     pick_dtype, positive_int)
from .plotting import MISSING_MATPLOTLIB, bar_chart, have_matplotlib


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("profile", help="per-kernel and per-layer profile, eager vs fused, with roofline")
    p.add_argument("--model", choices=MODELS, default="resnet50", help="default resnet50")
    p.add_argument("--batch", type=positive_int, default=None, help="default 64 on GPU, 2 on CPU")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None, help="default bf16 GPU, fp32 CPU")
    p.add_argument("--backend", default="auto", help="fused backend: auto or a name from available_backends")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if present")
    p.add_argument("--out", default=None, help="output folder (default ./profile-<model>-<device>)")
    p.add_argument("--iters", type=positive_int, default=None,
                   help="timed iterations per measurement (default 10 GPU, 3 CPU)")
    p.add_argument("--top", type=non_negative_int, default=12, help="kernels listed per path")
    p.add_argument("--image-size", type=image_size, default=224, help=argparse.SUPPRESS)
    p.add_argument("--refresh-peaks", action="store_true",
                   help="measure the device peaks again (they are cached for a week; a busy machine measures low)")
    p.add_argument("--peak-matmul", type=positive_int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(run=run)


def _device_time(event) -> float:
    """Self time of a profiler average on the device (microseconds), across torch versions."""
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, attr, None)
        if value:
            return float(value)
    return 0.0


def kernel_table(prof, on_gpu: bool, top: int):
    """[(name, calls, total_us)] of the most expensive kernels (GPU kernels on a GPU, aten ops on the CPU)."""
    rows = []
    for event in prof.key_averages():
        if on_gpu:
            total = _device_time(event)
            is_kernel = getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA
            if not is_kernel or total <= 0:
                continue
        else:
            total = float(event.self_cpu_time_total)
            # every op namespace (aten::, mkldnn::, resnet_fused::...), not record_function labels
            if total <= 0 or "::" not in event.key:
                continue
        rows.append((event.key, int(event.count), total))
    rows.sort(key=lambda r: -r[2])
    return rows[:top]


@contextlib.contextmanager
def _without_profiler_chatter():
    """Kineto writes `USDT: ... profiler_start` / `profiler_stop` lines straight to file descriptor 2 when a
    profile starts and stops: let everything else written there through, after the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not line.startswith("USDT:")))


def _profile_path(name, fn, device, iters, out_dir: Path):
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()  # warm-up outside the trace
    with _without_profiler_chatter(), profile(activities=activities) as prof:
        for _ in range(iters):
            with record_function(f"{name}_forward"):
                fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    trace = out_dir / f"trace_{name}.json"
    prof.export_chrome_trace(str(trace))
    return prof, trace


EAGER_MODEL = "eager: the same model unfused, channels_last (the faster eager layout)"
EAGER_LAYER = "eager: conv -> BatchNorm (-> + residual) (-> ReLU) as separate modules, channels_last"


def _flag(*timings: Timing) -> str:
    """'!' where a repeat spread says the machine, not the code, set the time."""
    return "!" if max(t.spread for t in timings) > NOISY else " "


def _describe_peak(peak: Peak, cached_in: Path) -> str:
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(peak.measured_at))
    load = f", load average {peak.load:.1f}" if peak.load is not None else ""
    text = (f"  {peak.flops_per_s / 1e12:.2f} TFLOP/s matmul, {peak.bytes_per_s / 1e9:.1f} GB/s copy (measured "
            f"{when}{load}, repeats within {peak.spread:.0%})")
    if peak.noisy:
        text += (f"\n  ! the repeats spread by {peak.spread:.0%}: the machine is busy, so these peaks are low and "
                 f"not cached; the roofline percentages below overstate")
    return text + f"\n  (cached in {cached_in}; --refresh-peaks measures again)" * (not peak.noisy)


def _layer_table(eager, layers, backend, batch, device, dtype, iters, peak, summary) -> Tuple[int, float]:
    """Print and record each distinct conv: eager vs fused, speedup, spread, percent of the roofline bound.
    Returns (noisy rows, the highest percent of the roofline)."""
    element = torch.finfo(dtype).bits // 8
    print(f"\nper layer ({len(layers)} distinct convs; % = roofline bound / measured time; {EAGER_LAYER})")
    print(f"  {'layer (first of its shape)':<48} {'x':>2} {'eager ms':>9} {'fused ms':>9} {'speedup':>9} "
          f"{'spread':>7} {'%roof e':>8} {'%roof f':>8}")
    total_eager = total_fused = highest = 0.0
    noisy = 0
    for layer in layers:
        conv, bn = conv_and_bn(eager, layer)
        eager_unit, fused_unit = eager_and_fused(conv, bn, layer, backend)
        lx, residual = layer_inputs(layer, batch, device, dtype)
        t = measure({"eager": lambda: eager_unit(lx, residual), "fused": lambda: fused_unit(lx, residual)},
                    device, warmup=1, iters=iters)
        e, f = t["eager"], t["fused"]
        flops = layer.flops(batch)
        roof_e = bound_seconds(flops, layer.bytes_eager(batch, element), peak) / e.median * 100
        roof_f = bound_seconds(flops, layer.bytes_fused(batch, element), peak) / f.median * 100
        total_eager += layer.count * e.median
        total_fused += layer.count * f.median
        highest = max(highest, roof_e, roof_f)
        flag = _flag(e, f)
        noisy += flag == "!"
        summary["layers"].append({"layer": layer.label, "name": layer.name, "count": layer.count,
                                  "eager_s": e.median, "fused_s": f.median, "speedup": e.median / f.median,
                                  "spread": max(e.spread, f.spread), "noisy": flag == "!", "flops": flops,
                                  "bytes_eager": layer.bytes_eager(batch, element),
                                  "bytes_fused": layer.bytes_fused(batch, element),
                                  "roofline_pct_eager": roof_e, "roofline_pct_fused": roof_f})
        print(f"  {layer.label:<48} {layer.count:>2} {e.median * 1e3:>9.3f} {f.median * 1e3:>9.3f} "
              f"{e.median / f.median:>7.2f}x{flag} {max(e.spread, f.spread):>6.0%} {roof_e:>7.1f}% {roof_f:>7.1f}%",
              flush=True)
    print(f"  {'all convs (x count)':<51} {total_eager * 1e3:>9.3f} {total_fused * 1e3:>9.3f} "
          f"{total_eager / total_fused:>7.2f}x")
    return noisy, highest


def _notes(noisy: int, rows: int, iters: int, highest: float) -> None:
    if iters == 1:
        print("\nnote: one timed repeat (--iters 1): how noisy the timings are is unknown")
    if noisy:
        load = load_average()
        print(f"\nnote: {noisy} of {rows} measurements (marked !) spread by more than {NOISY:.0%} between repeats"
              + (f" (load average {load:.1f} on {os.cpu_count()} cores)" if load is not None else "")
              + ": the machine was busy, so those speedups say little; rerun on an idle machine")
    if highest > 100:
        print(f"\nnote: a layer reached {highest:.0f}% of the roofline bound, which no layer can: the peaks were "
              f"measured low (on a busy machine?); rerun with --refresh-peaks on an idle one")


def run(args) -> int:
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    on_gpu = device.type == "cuda"
    batch = args.batch or (64 if on_gpu else 2)
    iters = args.iters or (10 if on_gpu else 3)
    backend = pick_backend(args.backend, device, dtype)
    out_dir = output_dir(args.out or f"profile-{args.model}-{device.type}")
    env = environment(device)
    load = load_average()
    print(f"device: {env['device']}; torch {env['torch']}; triton {env['triton']}; backend {args.backend} -> "
          f"{backend!r}; {args.model} batch {batch} {DTYPE_NAMES[dtype]} {args.image_size}x{args.image_size}"
          + (f"; load average {load:.1f} on {os.cpu_count()} cores" if load is not None else ""))

    torch.manual_seed(0)
    eager = build_model(args.model, None, device, dtype)
    check_fits(eager, batch, args.image_size, models_held=2)  # eager, fused

    print("device peaks ...", flush=True)
    peak_kwargs = {"matmul_size": args.peak_matmul} if args.peak_matmul else {}
    peak = device_peak(device, dtype, refresh=args.refresh_peaks, **peak_kwargs)
    print(_describe_peak(peak, cache_file()))

    fused, how = fuse_for_benchmark(eager, backend)
    print(f"fused with {how}")
    x = make_images(batch, args.image_size, device, dtype)
    summary = {"environment": env, "backend": backend, "fused_with": how, "batch": batch,
               "dtype": DTYPE_NAMES[dtype], "model": args.model, "image_size": args.image_size,
               "peak": asdict(peak), "load_average": load, "layers": []}

    with torch.inference_mode():
        t = measure({"eager": lambda: eager(x), "fused": lambda: fused(x)}, device, warmup=1, iters=iters)
        summary["model_images_per_s"] = {k: batch / v.median for k, v in t.items()}
        model_flag = _flag(t["eager"], t["fused"])
        eager_s, fused_s = t["eager"].median, t["fused"].median
        print(f"\nwhole model: eager {batch / eager_s:.1f} images/s, fused {batch / fused_s:.1f} images/s "
              f"({eager_s / fused_s:.2f}x{model_flag.strip()}; repeats spread by "
              f"{max(v.spread for v in t.values()):.0%}; {EAGER_MODEL})")

        for name, model in (("eager", eager), ("fused", fused)):
            prof, trace = _profile_path(name, lambda: model(x), device, min(iters, 3), out_dir)
            unit = "device" if on_gpu else "CPU self"
            print(f"\ntop kernels, {name} ({unit} time over {min(iters, 3)} forwards; trace: {trace})")
            print(f"  {'kernel':<60} {'calls':>6} {'total ms':>9}")
            for kernel, calls, total_us in kernel_table(prof, on_gpu, args.top):
                print(f"  {kernel[:60]:<60} {calls:>6} {total_us / 1e3:>9.2f}")

        layers = conv_layers(eager, image_size=args.image_size)
        noisy, highest = _layer_table(eager, layers, backend, batch, device, dtype, iters, peak, summary)
    _notes(noisy + (model_flag == "!"), len(layers) + 1, iters, highest)

    (out_dir / "profile.json").write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {out_dir / 'profile.json'}, {out_dir / 'trace_eager.json'}, {out_dir / 'trace_fused.json'}")
    if have_matplotlib():
        png = out_dir / "layer_speedups.png"
        rows = summary["layers"]
        bar_chart(png, [r["layer"] + " (noisy!)" * r["noisy"] for r in rows],
                  {f"fused, {backend} backend": [r["speedup"] for r in rows]},
                  title=f"{args.model} per layer, batch {batch} {DTYPE_NAMES[dtype]}, {env['device']}\n"
                        f"fused ({backend} backend) vs eager PyTorch: conv, BatchNorm, add, ReLU as separate "
                        f"modules, channels_last",
                  xlabel="speedup vs eager (x)")
        print(f"wrote {png}")
    else:
        print(MISSING_MATPLOTLIB)
    return 0
