"""Prototype: what a fused model would gain on the "cpu" backend if the fusion layer ran its conv units as one flat
plan, checked once per forward, instead of unit by unit.

    python benchmarks/cpu_plan_prototype.py [--model resnet50] [--batch 1] [--rounds 15]

A fused model spends its time in three places: oneDNN (or Winograd) convolutions, ATen's dispatch of each conv
(~26 us: oneDNN primitive descriptor and scratchpad per call), and Python per conv unit (the fused block's fold-cache
and hook checks, the public op's argument validation, the backend call). This script records the model's conv units
once (the backend's packed calls, with which earlier output each input and residual is), then times, interleaved:

    model   the fused model's forward
    plan    the same units replayed from a list through CpuBackend.conv_bn_act_packed, with the stem's max-pool and
            the head (avgpool, fc) called directly: no per-unit checks
    convs   the recorded torch.ops calls alone (what is left without any Python between convs)

The difference model - plan is what a fusion-layer plan would save (its staleness and hook checks done once per
forward for the whole model); plan - convs is the backend's own per-call cost.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import resnet_fused as rf  # noqa: E402
from resnet_fused.cli.common import randomize_bn  # noqa: E402
from resnet_fused.ops.backends import extension  # noqa: E402


def record_units(fused, x):
    """[(input, pack, residual, stride, padding, relu)] per conv unit, in call order; inputs and residuals are
    ("unit", i) for unit i's output, ("pool", None) for the stem max-pool's, ("x", None) for the model input."""
    units, outputs = [], {}
    real = extension.CpuBackend.conv_bn_act_packed

    def source(t):
        if t is None:
            return None
        if t.data_ptr() == x.data_ptr():
            return ("x", None)
        return ("unit", outputs[t.data_ptr()]) if t.data_ptr() in outputs else ("pool", None)

    def recording(self, inp, pack, residual, stride, padding, relu):
        y = real(self, inp, pack, residual, stride, padding, relu)
        units.append((source(inp), pack, source(residual), stride, padding, relu))
        outputs[y.data_ptr()] = len(units) - 1
        return y

    extension.CpuBackend.conv_bn_act_packed = recording
    try:
        with torch.inference_mode():
            reference = fused(x)
    finally:
        extension.CpuBackend.conv_bn_act_packed = real
    return units, reference


def plan_runner(fused, units, x):
    backend = extension.CpuBackend()
    # Each output is dropped after its last reader, as the model's forward drops it (else every activation stays
    # alive and the allocator hands out fresh, page-faulting memory for each).
    last_reader = {}
    for k, (inp, _, res, *_rest) in enumerate(units):
        for src in (inp, res):
            if src is not None and src[0] == "unit":
                last_reader[src[1]] = k
    dead_after = {k: [i for i, last in last_reader.items() if last == k] for k in range(len(units))}

    def run():
        values, pooled = [], None

        def get(src):
            kind, index = src
            return x if kind == "x" else pooled if kind == "pool" else values[index]

        for i, (inp, pack, res, stride, padding, relu) in enumerate(units):
            if inp[0] == "pool" and pooled is None:
                pooled = fused.maxpool(values[-1])
            values.append(backend.conv_bn_act_packed(get(inp), pack, None if res is None else get(res), stride,
                                                     padding, relu))
            for dead in dead_after[i]:
                values[dead] = None
        return fused.fc(torch.flatten(fused.avgpool(values[-1]), 1))
    return run


def conv_runner(units, x, fused):
    """The bare torch.ops calls of the recorded units, on the recorded tensors (no data flow, no Python layers)."""
    calls = []
    backend = extension.CpuBackend()
    with torch.inference_mode():
        values, pooled = [], None
        for inp, pack, res, stride, padding, relu in units:
            if inp[0] == "pool" and pooled is None:
                pooled = fused.maxpool(values[-1])
            get = {"x": lambda i: x, "pool": lambda i: pooled, "unit": lambda i: values[i]}
            a = get[inp[0]](inp[1])
            r = None if res is None else get[res[0]](res[1])
            weight = extension._onednn_weight(pack, a, stride, padding)
            if weight.is_mkldnn:
                call = (torch.ops.resnet_fused.conv_bias_act.default, (a, weight, pack.bias, r, stride, padding, relu))
            else:
                call = (torch.ops.resnet_fused.conv3x3_winograd.default, (a, weight, pack.bias, r, relu))
            calls.append(call)
            values.append(backend.conv_bn_act_packed(a, pack, r, stride, padding, relu))

    def run():
        for op, args in calls:
            op(*args)
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50", choices=["resnet50", "resnet18"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = getattr(rf, args.model)().eval()
    randomize_bn(model)
    fused, _ = rf.fuse_model(model, backend="cpu")
    x = torch.randn(args.batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    units, reference = record_units(fused, x)
    runners = {"model": lambda: fused(x), "plan": plan_runner(fused, units, x), "convs": conv_runner(units, x, fused)}
    times = {name: [] for name in runners}
    with torch.inference_mode():
        out = runners["plan"]()
        assert torch.equal(out, reference), "the plan does not reproduce the model's output"
        for run in runners.values():
            run()
        for _ in range(args.rounds):
            for name, run in runners.items():
                begin = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - begin)
    print(f"{args.model} batch {args.batch}, {len(units)} conv units, {torch.get_num_threads()} threads, "
          f"load {os.getloadavg()[0]:.2f}")
    for name, samples in times.items():
        print(f"  {name:6s} median {statistics.median(samples) * 1e3:7.2f} ms  min {min(samples) * 1e3:7.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
