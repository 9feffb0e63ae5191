"""Reference models and inputs for measurements, and how far a fused model's logits may drift from eager's."""

from __future__ import annotations

from typing import Optional

import torch

MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")

# Max relative error of the logits allowed per dtype (fused and eager both run in this dtype).
REL_TOL = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def reference_model(name: str, weights: Optional[str] = None) -> torch.nn.Module:
    """One of MODELS from a local torchvision checkpoint, or with random weights and random BN statistics (see
    randomize_bn). What loading a checkpoint raises, it raises."""
    from .. import models

    if name not in MODELS:
        raise ValueError(f"model must be one of {list(MODELS)}, got {name!r}")
    model = getattr(models, name)(weights=weights)
    if weights is None:
        randomize_bn(model)
    return model


def for_inference(model: torch.nn.Module, device, dtype) -> torch.nn.Module:
    """The model in eval mode on `device` in `dtype`, channels_last (the faster eager layout)."""
    return model.eval().to(device=device, dtype=dtype, memory_format=torch.channels_last)


def make_images(batch: int, image_size: int, device, dtype, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, image_size, image_size, generator=generator)
    return x.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def randomize_bn(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial statistics and affine terms: a fresh init has mean 0, var 1, gamma 1,
    beta 0, which would let a wrong BN fold go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=generator) * 0.5 + 0.75)
            if module.weight is not None:
                module.weight.copy_(torch.rand(n, generator=generator) * 0.5 + 0.75)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
