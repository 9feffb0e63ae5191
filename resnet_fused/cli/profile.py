"""`python -m resnet_fused profile`: where the time goes, eager vs fused.

Prints (1) whole-model images/s, (2) the top kernels of each path under torch.profiler (calls, total time),
(3) per distinct conv layer: eager (conv+BN+ReLU[+add+ReLU] modules) vs the fused op, their speedup and the
percent of the roofline bound max(FLOPs / peak FLOP/s, bytes / peak bandwidth) each reaches (peaks measured
once per device and dtype, cached; see roofline.py). Writes Chrome traces, a JSON of the numbers and a PNG bar
chart of the per-layer speedups into --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from .common import (DTYPE_NAMES, MODELS, build_model, check_fits, environment, image_size, make_images,
                     non_negative_int, output_dir, pick_backend, pick_device, pick_dtype, positive_int)
from .fusing import fuse_for_benchmark
from .layers import conv_layers
from .plotting import MISSING_MATPLOTLIB, bar_chart, have_matplotlib
from .roofline import bound_seconds, cache_file, device_peak
from .timing import side_by_side
from .units import conv_and_bn, eager_and_fused, layer_inputs


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


def _profile_path(name, fn, device, iters, out_dir: Path):
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()  # warm-up outside the trace
    with profile(activities=activities) as prof:
        for _ in range(iters):
            with record_function(f"{name}_forward"):
                fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    trace = out_dir / f"trace_{name}.json"
    prof.export_chrome_trace(str(trace))
    return prof, trace


def run(args) -> int:
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    on_gpu = device.type == "cuda"
    batch = args.batch or (64 if on_gpu else 2)
    iters = args.iters or (10 if on_gpu else 3)
    backend = pick_backend(args.backend, device, dtype)
    out_dir = output_dir(args.out or f"profile-{args.model}-{device.type}")
    env = environment(device)
    print(f"device: {env['device']}; torch {env['torch']}; triton {env['triton']}; backend {args.backend} -> "
          f"{backend!r}; {args.model} batch {batch} {DTYPE_NAMES[dtype]} {args.image_size}x{args.image_size}")

    torch.manual_seed(0)
    eager = build_model(args.model, None, device, dtype)
    check_fits(eager, batch, args.image_size, models_held=2)  # eager, fused

    print(f"device peaks (measured once, cached in {cache_file()}) ...", flush=True)
    peak_kwargs = {"matmul_size": args.peak_matmul} if args.peak_matmul else {}
    peak = device_peak(device, dtype, **peak_kwargs)
    print(f"  {peak.flops_per_s / 1e12:.2f} TFLOP/s matmul, {peak.bytes_per_s / 1e9:.1f} GB/s copy")

    fused, how = fuse_for_benchmark(eager, backend)
    print(f"fused with {how}")
    x = make_images(batch, args.image_size, device, dtype)
    summary = {"environment": env, "backend": backend, "fused_with": how, "batch": batch,
               "dtype": DTYPE_NAMES[dtype], "model": args.model, "image_size": args.image_size,
               "peak": peak.__dict__, "layers": []}

    with torch.inference_mode():
        times = side_by_side({"eager": lambda: eager(x), "fused": lambda: fused(x)}, device, warmup=1,
                             iters=iters)
        summary["model_images_per_s"] = {k: batch / v for k, v in times.items()}
        print(f"\nwhole model: eager {batch / times['eager']:.1f} images/s, fused {batch / times['fused']:.1f} "
              f"images/s ({times['eager'] / times['fused']:.2f}x)")

        for name, model in (("eager", eager), ("fused", fused)):
            prof, trace = _profile_path(name, lambda: model(x), device, min(iters, 3), out_dir)
            unit = "device" if on_gpu else "CPU self"
            print(f"\ntop kernels, {name} ({unit} time over {min(iters, 3)} forwards; trace: {trace})")
            print(f"  {'kernel':<60} {'calls':>6} {'total ms':>9}")
            for kernel, calls, total_us in kernel_table(prof, on_gpu, args.top):
                print(f"  {kernel[:60]:<60} {calls:>6} {total_us / 1e3:>9.2f}")

        layers = conv_layers(eager, image_size=args.image_size)
        element = torch.finfo(dtype).bits // 8
        print(f"\nper layer ({len(layers)} distinct convs; % = roofline bound / measured time)")
        print(f"  {'layer':<40} {'x':>2} {'eager ms':>9} {'fused ms':>9} {'speedup':>8} {'%roof e':>8} "
              f"{'%roof f':>8}")
        total_eager = total_fused = 0.0
        for layer in layers:
            conv, bn = conv_and_bn(eager, layer)
            eager_unit, fused_unit = eager_and_fused(conv, bn, layer, backend)
            lx, residual = layer_inputs(layer, batch, device, dtype)
            t = side_by_side({"eager": lambda: eager_unit(lx, residual), "fused": lambda: fused_unit(lx, residual)},
                             device, warmup=1, iters=iters)
            flops = layer.flops(batch)
            roof_e = bound_seconds(flops, layer.bytes_eager(batch, element), peak) / t["eager"] * 100
            roof_f = bound_seconds(flops, layer.bytes_fused(batch, element), peak) / t["fused"] * 100
            total_eager += layer.count * t["eager"]
            total_fused += layer.count * t["fused"]
            summary["layers"].append({"layer": layer.label, "name": layer.name, "count": layer.count,
                                      "eager_s": t["eager"], "fused_s": t["fused"],
                                      "speedup": t["eager"] / t["fused"], "flops": flops,
                                      "bytes_eager": layer.bytes_eager(batch, element),
                                      "bytes_fused": layer.bytes_fused(batch, element),
                                      "roofline_pct_eager": roof_e, "roofline_pct_fused": roof_f})
            print(f"  {layer.label:<40} {layer.count:>2} {t['eager'] * 1e3:>9.3f} {t['fused'] * 1e3:>9.3f} "
                  f"{t['eager'] / t['fused']:>7.2f}x {roof_e:>7.1f}% {roof_f:>7.1f}%", flush=True)
        print(f"  {'all convs (x count)':<43} {total_eager * 1e3:>9.3f} {total_fused * 1e3:>9.3f} "
              f"{total_eager / total_fused:>7.2f}x")

    (out_dir / "profile.json").write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {out_dir / 'profile.json'}, {out_dir / 'trace_eager.json'}, {out_dir / 'trace_fused.json'}")
    if have_matplotlib():
        png = out_dir / "layer_speedups.png"
        bar_chart(png, [r["layer"] for r in summary["layers"]], {backend: [r["speedup"] for r in summary["layers"]]},
                  title=f"{args.model} per-layer speedup, fused ({backend}) vs eager, batch {batch} "
                        f"{DTYPE_NAMES[dtype]}, {env['device']}")
        print(f"wrote {png}")
    else:
        print(MISSING_MATPLOTLIB)
    return 0
