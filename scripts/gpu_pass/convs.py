"""Each distinct ResNet-50 conv at bf16 batch 256, with its ReLU/residual role: eager modules, cuDNN's fused op,
triton and cuda, timed side by side, with each one's percent of the layer's roofline bound.

    python -m scripts.gpu_pass.convs --out convs.json --bench-out convs.bench.json

    bound = max(FLOPs / peak FLOP/s, fused bytes / peak bytes/s)      percent = 100 * bound / median time
with the peaks measured on this GPU (resnet_fused.benchmarking.roofline). Each provider's output is checked against
eager's first. Layers run in model order; the JSON files are rewritten after each layer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

BATCH = 256
ROUNDS = 7
PROVIDERS = ("eager", "cudnn", "triton", "cuda")


def layer_units(layer, provider: str, device: str):
    """The module computing `layer` for `provider` (random conv and BN of its shape, bf16)."""
    import torch

    from resnet_fused import PackedConvBN
    from resnet_fused.benchmarking.units import CudnnConvBNAct, EagerConvBNAct, random_conv_bn

    conv, bn = random_conv_bn(layer, device, torch.bfloat16)
    if provider == "eager":
        return EagerConvBNAct(conv, bn, layer.relu)
    if provider == "cudnn":
        return CudnnConvBNAct(conv, bn, layer.relu)
    return PackedConvBN(conv, bn, layer.relu, provider)


def draw_inputs(layer, batch: int, device: str):
    """(x, residual or None), drawn on the device (drawing batch-256 tensors on the CPU takes seconds)."""
    import torch

    def draw(*shape):
        return torch.randn(shape, device=device).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)

    residual = draw(batch, layer.cout, layer.ho, layer.wo) if layer.residual else None
    return draw(batch, layer.cin, layer.h, layer.w), residual


def time_layer(layer, providers, peak, env, deadline: float, batch: int = BATCH, device: str = "cuda"):
    """(table row, pytest-benchmark entries) of one layer: every provider warmed, checked against eager, timed."""
    import torch

    from resnet_fused.benchmarking.models import REL_TOL
    from resnet_fused.benchmarking.roofline import percent_of_roofline

    from .benchjson import entry, group_name
    from .sidebyside import time_side_by_side, warm_and_check

    flops, nbytes = layer.flops(batch), layer.bytes_fused(batch, 2)
    row = {"layer": layer.label, "count": layer.count, "relu": layer.relu, "residual": layer.residual,
           "flops": flops, "bytes_fused": nbytes, "providers": {}}
    x, residual = draw_inputs(layer, batch, device)

    def builder(provider):
        def build():
            unit = layer_units(layer, provider, device)
            return lambda: unit(x, residual)
        return build

    with torch.inference_mode():
        fns = warm_and_check({p: builder(p) for p in providers}, None, REL_TOL[torch.bfloat16], row["providers"])
        samples, reps = time_side_by_side(fns, ROUNDS, deadline, device)
    group, entries = group_name("conv", layer.label, "bf16", batch, device), []
    for provider, times in samples.items():
        info = row["providers"][provider]
        info.update(median_s=statistics.median(times))
        info["percent_of_roofline"] = percent_of_roofline(info["median_s"], flops, nbytes, peak)
        extra = dict(kind="conv", case=layer.label, dtype="bf16", batch=batch, flops=flops, bytes_fused=nbytes,
                     bytes_eager=layer.bytes_eager(batch, 2), device_name=env["device"], torch=env["torch"],
                     triton=env["triton"], cuda=env["cuda"], cudnn=env["cudnn"], cudnn_benchmark=True,
                     rel_err=info["rel_err"])
        entries.append(entry(group, provider, times, reps[provider], extra))
    return row, entries


def main(argv=None) -> int:
    import torch

    import resnet_fused as rf
    from resnet_fused.benchmarking.environment import environment
    from resnet_fused.benchmarking.roofline import device_peak

    from .benchjson import document
    from .workload import resnet50_layers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bench-out", type=Path, required=True)
    args = parser.parse_args(argv)
    deadline = float(os.environ.get("GPU_PASS_DEADLINE", time.time() + 3600)) - 5
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    env = environment("cuda")
    peak = device_peak("cuda", torch.bfloat16)
    unavailable = {p: why for p in ("triton", "cuda") if (why := rf.available_backends("cuda").get(p))}
    providers = [p for p in PROVIDERS if p not in unavailable]
    record = {"batch": BATCH, "dtype": "bf16", "peak": {"flops_per_s": peak.flops_per_s,
                                                        "bytes_per_s": peak.bytes_per_s},
              "unavailable": unavailable, "layers": []}
    benchmarks = []

    def write():
        for path, data in ((args.out, record), (args.bench_out, document(benchmarks, env))):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data, indent=1))

    try:
        for layer in resnet50_layers():
            row, entries = time_layer(layer, providers, peak, env, deadline)
            record["layers"].append(row)
            benchmarks += entries
            write()
            if time.time() > deadline:
                record["note"] = "stopped at the step's deadline"
                break
    except KeyboardInterrupt:
        record["note"] = "interrupted by the step's timeout"
    write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
