"""`python -m resnet_fused demo`: ResNet-50 eager vs fused on this machine: do they agree, and how fast is each.

Agreement: max relative error = max|fused - eager| / max|eager| over the logits, within a per-dtype tolerance,
and the top-5 classes of every image equal (classes whose eager logits tie with the 5th within the tolerance
may swap). The exit code is 1 when either fails.
"""

from __future__ import annotations

import argparse
import copy

import torch

from .. import ops
from ..graphs import cuda_graphed
from ..benchmarking.environment import DTYPE_NAMES, environment
from ..benchmarking.fusing import fuse_for_benchmark
from ..benchmarking.models import MODELS, REL_TOL, make_images
from ..benchmarking.timing import NOISY, measure
from .common import build_model, check_fits, image_size, pick_backend, pick_device, pick_dtype, positive_int


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="ResNet-50 eager vs fused: agreement and speed")
    p.add_argument("--weights", default=None, help="a local torchvision resnet50 checkpoint (default: random)")
    p.add_argument("--batch", type=positive_int, default=None, help="images per batch (default 4 on CPU, 64 on GPU)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if present")
    p.add_argument("--backend", default="auto", help="fused backend: auto or a name from available_backends")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                   help="default fp32 on CPU, bf16 on GPU")
    p.add_argument("--iters", type=positive_int, default=None,
                   help="timed iterations per path after 1 warm-up (default 10 on GPU, 3 on CPU)")
    # For fast tests: smaller images and other models.
    p.add_argument("--image-size", type=image_size, default=224, help=argparse.SUPPRESS)
    p.add_argument("--model", choices=MODELS, default="resnet50", help=argparse.SUPPRESS)
    p.set_defaults(run=run)


def top5_agreement(eager: torch.Tensor, fused: torch.Tensor, atol: float) -> str:
    """'yes', 'yes (up to near-ties)' or 'no' for the top-5 class sets of every row."""
    k = min(5, eager.shape[1])
    verdict = "yes"
    ref_top = eager.topk(k, dim=1)
    got_top = fused.topk(k, dim=1).indices
    for row in range(eager.shape[0]):
        ref_set, got_set = set(ref_top.indices[row].tolist()), set(got_top[row].tolist())
        if ref_set == got_set:
            continue
        kth = ref_top.values[row, -1].item()
        # Only classes whose eager logit is within atol of the k-th best may legitimately swap in or out.
        if all(abs(eager[row, c].item() - kth) <= atol for c in ref_set ^ got_set):
            verdict = "yes (up to near-ties)"
        else:
            return "no"
    return verdict


def run(args) -> int:
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    batch = args.batch or (64 if device.type == "cuda" else 4)
    iters = args.iters or (10 if device.type == "cuda" else 3)
    torch.manual_seed(0)
    backend = pick_backend(args.backend, device, dtype)
    env = environment(device)
    print(f"device: {env['device']} ({device.type}), torch {env['torch']}, triton {env['triton']}, "
          f"{torch.get_num_threads()} threads")
    unavailable = {k: v for k, v in ops.available_backends(device).items() if v}
    print(f"backend: {args.backend} -> {backend!r}" +
          "".join(f"\n  ({name} unavailable: {why})" for name, why in unavailable.items()))
    print(f"model: {args.model}, {'checkpoint ' + args.weights if args.weights else 'random weights'}; "
          f"batch {batch} x 3 x {args.image_size} x {args.image_size}, {DTYPE_NAMES[dtype]}, channels_last")

    eager = build_model(args.model, args.weights, device, dtype)
    check_fits(eager, batch, args.image_size, models_held=3)  # eager, eager NCHW, fused
    fused, how = fuse_for_benchmark(eager, backend)
    print(f"fused with {how}")
    x = make_images(batch, args.image_size, device, dtype)

    with torch.inference_mode():
        ref = eager(x).float()
        out = fused(x).float()
        rel_err = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
        tol = REL_TOL[dtype]
        top5 = top5_agreement(ref, out, atol=tol * ref.abs().max().item())
        ok = rel_err <= tol and top5 != "no" and bool(torch.isfinite(out).all())
        print(f"max relative error: {rel_err:.3e} (tolerance {tol:.0e})")
        print(f"top-5 classes agree: {top5}")

        # "eager NCHW" is `model(x)` as most users run it: default (contiguous) memory format throughout.
        eager_nchw = copy.deepcopy(eager).to(memory_format=torch.contiguous_format)
        x_nchw = x.contiguous()
        contenders = {"eager NCHW": lambda: eager_nchw(x_nchw), "eager": lambda: eager(x), "fused": lambda: fused(x)}
        if device.type == "cuda":  # one graph launch per forward: what small batches need on a GPU
            graphed = cuda_graphed(fused)
            contenders["fused+graph"] = lambda: graphed(x)
        timings = measure(contenders, device, warmup=1, iters=iters)
    times = {name: t.median for name, t in timings.items()}
    print(f"\n{'path':<11} {'ms/batch':>10} {'images/s':>10} {'vs eager':>9} {'vs NCHW':>8} {'spread':>7}")
    for name, seconds in times.items():
        print(f"{name:<11} {seconds * 1e3:>10.1f} {batch / seconds:>10.1f} {times['eager'] / seconds:>8.2f}x"
              f" {times['eager NCHW'] / seconds:>7.2f}x {timings[name].spread:>6.0%}")
    noisy = [name for name, t in timings.items() if t.spread > NOISY]
    if noisy:
        print(f"(! {', '.join(noisy)}: repeats spread by more than {NOISY:.0%}, the machine was busy; the speedups "
              f"say little)")
    print("(eager: channels_last, the faster eager layout; fused takes either layout"
          + ("; fused+graph: rf.cuda_graphed(fused))" if device.type == "cuda" else ")"))
    print("\nRESULT: " + ("outputs match" if ok else "OUTPUTS DO NOT MATCH"))
    return 0 if ok else 1
