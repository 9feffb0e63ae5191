"""Whole models (ResNet-50, ResNet-18, eval, channels_last): eager vs torch.compile vs fuse_model on each backend.
On the CPU this is the issue's case:
fused resnet50 eval fp32 batch 8 at 224x224 vs eager and vs torch.compile."""

import copy

import pytest
import torch

import resnet_fused as rf
from bench_harness import (CPU_MODEL, GPU_SETTINGS, PROVIDERS, check_close, compiled, count_macs,
                           fuse_for_benchmark, model_bytes, reference_model, run_case, skip_reason,
                           split_graphed)
from resnet_fused.cli.layers import conv_layers

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
    extra = {"image_size": IMAGE_SIZE}
    base, graphed = split_graphed(provider)
    if base == "eager":
        module = model
    elif provider == "eager-nchw":  # what `model(x)` runs for a user who never asked for channels_last
        module = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
        x = x.contiguous()
    elif provider.startswith("torch.compile"):
        module = compiled(model, provider)
    else:
        module, extra["fused_with"] = fuse_for_benchmark(model, base)
    if graphed:  # captured during run_case's warm-ups
        module, extra["cuda_graphs"] = rf.cuda_graphed(module), True
    layers = conv_layers(model, image_size=IMAGE_SIZE)
    element = x.element_size()
    out = run_case(benchmark, request, lambda: module(x), provider=provider, setting=setting,
                   case=f"{model_name} {IMAGE_SIZE}x{IMAGE_SIZE}", kind="model",
                   flops=2 * count_macs(model, setting.batch, IMAGE_SIZE),
                   nbytes_fused=model_bytes(layers, setting.batch, element, fused=True),
                   nbytes_eager=model_bytes(layers, setting.batch, element, fused=False), extra=extra)
    if provider != "eager":
        with torch.inference_mode():
            check_close(out, model(x), setting.dtype, setting.device, scale=2.0)
