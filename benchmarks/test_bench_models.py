"""Whole models (ResNet-50, ResNet-18, eval, channels_last): eager vs torch.compile vs fuse_model on each backend,
and on the CPU vs ONNX Runtime and OpenVINO (when installed). benchmarks/side_by_side.py times the CPU model cases
with the providers interleaved round by round, for figures taken on a shared machine."""

import pytest
import torch

from bench_harness import (CPU_MODEL, GPU_SETTINGS, PROVIDERS, check_close, count_macs, model_bytes,
                           model_runner, reference_model, run_case, skip_reason)
from resnet_fused.benchmarking.layers import conv_layers

IMAGE_SIZE = 224


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("setting", GPU_SETTINGS + CPU_MODEL, ids=lambda s: s.id)
@pytest.mark.parametrize("model_name", ["resnet50", "resnet18"])
def test_model(benchmark, request, model_name, setting, provider):
    reason = skip_reason(provider, setting, request.config, kind="model")
    if reason:
        pytest.skip(reason)
    model = reference_model(model_name, setting)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(setting.batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    x = x.to(device=setting.device, dtype=setting.dtype).contiguous(memory_format=torch.channels_last)
    fn, extra = model_runner(provider, model, x)
    extra["image_size"] = IMAGE_SIZE
    layers = conv_layers(model, image_size=IMAGE_SIZE)
    element = x.element_size()
    out = run_case(benchmark, request, fn, provider=provider, setting=setting,
                   case=f"{model_name} {IMAGE_SIZE}x{IMAGE_SIZE}", kind="model",
                   flops=2 * count_macs(model, setting.batch, IMAGE_SIZE),
                   nbytes_fused=model_bytes(layers, setting.batch, element, fused=True),
                   nbytes_eager=model_bytes(layers, setting.batch, element, fused=False), extra=extra)
    if provider != "eager":
        with torch.inference_mode():
            check_close(out, model(x), setting.dtype, setting.device, scale=2.0)
