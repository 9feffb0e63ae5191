"""Training BatchNorm's passes on ResNet-50's train shapes (batch 8 at 128x128, fp32, CPU): the "cpu" backend's
C++ kernels vs the plain-torch reference (every backend's default) vs eager nn.BatchNorm2d + ReLU.

    forward:  batch statistics, then normalize + affine + ReLU (cpu / reference: batch_norm_stats then
              batch_norm_apply; eager: torch.batch_norm in training mode, then relu)
    backward: the gradient of that forward for y, weight and bias at the batch statistics (cpu / reference:
              batch_norm_backward with the ReLU mask recomputed; eager: threshold_backward on the output, then
              native_batch_norm_backward, what autograd runs for BatchNorm2d + ReLU)
"""

import pytest
import torch

from bench_harness import benchmark_disabled
from resnet_fused import ops
from resnet_fused.benchmarking.environment import environment
from resnet_fused.ops import batch_norm_reference as reference
from resnet_fused.ops.backends.extension import HAS_BATCH_NORM_KERNELS

BATCH, EPS, MOMENTUM = 8, 1e-5, 0.1
# (C, H = W) of ResNet-50's BatchNorms at 128x128 input: the stem's and stage 1's widths, stages 2-4's outputs.
SHAPES = [(64, 32), (256, 32), (512, 16), (2048, 4)]
PROVIDERS = ("cpu", "reference", "eager")


def _forward(provider, y, weight, bias):
    if provider == "eager":
        running_mean, running_var = torch.zeros_like(weight), torch.ones_like(weight)
        return lambda: torch.relu(torch.batch_norm(y, weight, bias, running_mean, running_var, True, MOMENTUM, EPS,
                                                   False))
    stats, apply = ((ops.batch_norm_stats, ops.batch_norm_apply) if provider == "cpu" else
                    (reference.stats, reference.apply))
    keywords = {"backend": "cpu"} if provider == "cpu" else {}

    def run():
        mean, var = stats(y, **keywords)
        invstd = torch.rsqrt(var + EPS)
        if provider == "cpu":
            return apply(y, mean, invstd, weight, bias, None, relu=True, backend="cpu")
        return apply(y, mean, invstd, weight, bias, None, True)

    return run


def _backward(provider, y, weight, bias):
    mean, var = reference.stats(y)
    invstd = torch.rsqrt(var + EPS)
    grad_out = torch.randn_like(y)
    if provider == "eager":
        out = reference.apply(y, mean, invstd, weight, bias, None, True)
        running_mean, running_var = torch.zeros_like(weight), torch.ones_like(weight)

        def run():
            grad = torch.ops.aten.threshold_backward(grad_out, out, 0)
            return torch.ops.aten.native_batch_norm_backward(grad, y, weight, running_mean, running_var, mean,
                                                             invstd, True, EPS, [True, True, True])

        return run
    if provider == "cpu":
        return lambda: ops.batch_norm_backward(grad_out, y, mean, invstd, weight, bias, relu=True, backend="cpu")
    return lambda: reference.backward(grad_out, y, mean, invstd, weight, bias, None, True)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{c}x{h}x{h}" for c, h in SHAPES])
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_batch_norm_pass(benchmark, request, direction, shape, channels_last, provider):
    if provider == "cpu" and not HAS_BATCH_NORM_KERNELS["CPU"]:
        pytest.skip("the extension has no CPU BatchNorm kernels (not built, or built before them)")
    channels, size = shape
    y = torch.randn(BATCH, channels, size, size) * 2 + 0.5
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.rand(channels) + 0.5, torch.randn(channels)
    fn = (_forward if direction == "forward" else _backward)(provider, y, weight, bias)
    layout = "channels_last" if channels_last else "nchw"
    case = f"BatchNorm2d+ReLU {direction} {BATCH}x{channels}x{size}x{size} {layout}"
    benchmark.group = f"batch_norm {case} | fp32 b{BATCH} cpu"
    benchmark.extra_info.update(provider=provider, kind="batch_norm", case=case, dtype="fp32", batch=BATCH,
                                threads=torch.get_num_threads(), device_name=environment("cpu")["device"],
                                torch=torch.__version__)
    with torch.no_grad():
        if benchmark_disabled(request.config):
            benchmark.pedantic(fn, rounds=1, iterations=1)
        else:
            fn()
            benchmark.pedantic(fn, rounds=15, iterations=1, warmup_rounds=2)
