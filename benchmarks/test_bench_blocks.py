"""Each distinct residual block: ResNet-50's Bottleneck (first and later block of every stage) and ResNet-18's
BasicBlock, eager vs torch.compile vs FusedBottleneck/FusedBasicBlock on each backend."""

import pytest
import torch

from bench_harness import (BLOCK_CASES, CPU_SMALL, GPU_SETTINGS, PROVIDERS, check_close, compiled, fused_block,
                           reference_model, run_case, skip_reason)
from resnet_fused.benchmarking.layers import conv_layers


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("setting", GPU_SETTINGS + CPU_SMALL, ids=lambda s: s.id)
@pytest.mark.parametrize("case", BLOCK_CASES, ids=[f"{model}.{name}" for model, name, _ in BLOCK_CASES])
def test_block(benchmark, request, case, setting, provider):
    reason = skip_reason(provider, setting, request.config, kind="block")
    if reason:
        pytest.skip(reason)
    model_name, block_name, (channels, height, width) = case
    block = reference_model(model_name, setting, block_name)
    x = torch.randn(setting.batch, channels, height, width).to(device=setting.device, dtype=setting.dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    extra = {}
    if provider == "eager":
        module = block
    elif provider.startswith("torch.compile"):
        module = compiled(block, provider)
    else:
        module, extra["fused_with"] = fused_block(block, provider)
    layers = conv_layers(block, image_size=height, in_channels=channels)
    element = x.element_size()
    out = run_case(benchmark, request, lambda: module(x), provider=provider, setting=setting,
                   case=f"{model_name}.{block_name} {type(block).__name__} {channels}x{height}x{width}",
                   kind="block", flops=sum(layer.count * layer.flops(setting.batch) for layer in layers),
                   nbytes_fused=sum(layer.count * layer.bytes_fused(setting.batch, element) for layer in layers),
                   nbytes_eager=sum(layer.count * layer.bytes_eager(setting.batch, element) for layer in layers),
                   extra=extra)
    if provider != "eager":
        with torch.inference_mode():
            check_close(out, block(x), setting.dtype, setting.device)
