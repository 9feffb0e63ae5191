"""Each distinct conv of ResNet-50 (stem; conv1/conv2/conv3/downsample of every stage, read off the model),
with its BN, ReLU and residual add: eager modules vs torch.compile vs cuDNN's fused op vs the fused backends."""

import pytest
import torch

from bench_harness import (CPU_SMALL, GPU_SETTINGS, PROVIDERS, RESNET50_CONVS, EagerConvBNAct, PackedConvBN,
                           check_close, compiled, cudnn_conv_fn, layer_inputs, random_conv_bn, run_case,
                           skip_reason)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("setting", GPU_SETTINGS + CPU_SMALL, ids=lambda s: s.id)
@pytest.mark.parametrize("layer", RESNET50_CONVS, ids=[layer.name for layer in RESNET50_CONVS])
def test_conv(benchmark, request, layer, setting, provider):
    reason = skip_reason(provider, setting, request.config, kind="conv")
    if reason:
        pytest.skip(reason)
    conv, bn = random_conv_bn(layer, setting.device, setting.dtype)
    x, residual = layer_inputs(layer, setting.batch, setting.device, setting.dtype)
    eager = EagerConvBNAct(conv, bn, layer.relu)
    if provider == "eager":
        fn = lambda: eager(x, residual)  # noqa: E731
    elif provider.startswith("torch.compile"):
        module = compiled(eager, provider)
        fn = lambda: module(x, residual)  # noqa: E731
    elif provider == "cudnn":
        fn = cudnn_conv_fn(conv, bn, layer, x, residual)
        if fn is None:
            pytest.skip("cuDNN has no fused conv+bias op without ReLU (the downsample)")
    else:
        fused = PackedConvBN(conv, bn, layer.relu, provider)
        fn = lambda: fused(x, residual)  # noqa: E731
    out = run_case(benchmark, request, fn, provider=provider, setting=setting, case=layer.label, kind="conv",
                   flops=layer.flops(setting.batch),
                   nbytes_fused=layer.bytes_fused(setting.batch, x.element_size()),
                   nbytes_eager=layer.bytes_eager(setting.batch, x.element_size()))
    if provider != "eager":
        with torch.inference_mode():
            check_close(out, eager(x, residual), setting.dtype, setting.device)
