"""Per-call cost of a fused block where the convolutions cost almost nothing (batch 1, 2x2 spatial): what the
forward path itself adds on top of the kernels (checks, decisions, dispatch), beside eager's own per-call cost.
extra_info.python_calls counts the package's Python calls of one warm forward."""

import sys

import pytest
import torch
from torch import nn

import resnet_fused as rf
from bench_harness import NO_GPU, ON_GPU, benchmark_disabled
from resnet_fused.blocks import FusedBottleneck
from resnet_fused.benchmarking.environment import environment

PROVIDERS = ("eager", "torch", "cpu", "triton", "cuda")
PACKAGE = rf.__file__.rsplit("/", 1)[0]


def _package_calls(fn) -> int:
    calls = 0

    def profile(frame, event, arg):
        nonlocal calls
        calls += event == "call" and frame.f_code.co_filename.startswith(PACKAGE)

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("downsample", [False, True], ids=["identity", "downsample"])
def test_block_call_overhead(benchmark, request, downsample, provider):
    device = "cuda" if provider in ("triton", "cuda") else "cpu"
    if device == "cuda" and not ON_GPU:
        pytest.skip(NO_GPU)
    if provider != "eager" and rf.available_backends(device)[provider] is not None:
        pytest.skip(f"backend {provider!r}: {rf.available_backends(device)[provider]}")
    inplanes = 64 if downsample else 256
    projection = nn.Sequential(nn.Conv2d(64, 256, 1, bias=False), nn.BatchNorm2d(256)) if downsample else None
    eager = rf.Bottleneck(inplanes, 64, downsample=projection).eval()
    block = eager if provider == "eager" else FusedBottleneck.from_block(eager, backend=provider)
    block = block.to(device=device, memory_format=torch.channels_last)
    x = torch.randn(1, inplanes, 2, 2, device=device).contiguous(memory_format=torch.channels_last)
    case = f"Bottleneck {inplanes}->256 ({'downsample' if downsample else 'identity'}) 1x{inplanes}x2x2"
    benchmark.group = f"overhead {case} | fp32 b1 {device}"
    with torch.no_grad():
        block(x)
        calls = _package_calls(lambda: block(x))
        env = environment(device)
        benchmark.extra_info.update(provider=provider, kind="overhead", case=case, dtype="fp32", batch=1,
                                    python_calls=calls, device_name=env["device"], torch=env["torch"])
        if benchmark_disabled(request.config):
            benchmark.pedantic(lambda: block(x), rounds=1, iterations=1)
        else:
            benchmark(lambda: block(x))
