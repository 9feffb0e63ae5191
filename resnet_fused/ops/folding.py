"""Folding an eval-mode BatchNorm (and the conv bias) into a per-channel fp32 scale and shift.

    bn(conv(x) + b) = conv(x) * scale + shift,
    scale = gamma / sqrt(running_var + eps),   shift = beta + (b - running_mean) * scale
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


@torch.no_grad()
def fold_bn(conv: Optional[nn.Conv2d], bn: Optional[nn.BatchNorm2d]) -> tuple[torch.Tensor, torch.Tensor]:
    """Return fp32 (scale, shift) such that bn(conv(x)) == conv_nobias(x) * scale + shift in eval mode.

    `bn` may be None (a conv alone, its bias becomes the shift); the modules are never modified.
    """
    if conv is None and bn is None:
        raise ValueError("fold_bn needs a conv, a bn or both, got neither")
    if conv is not None and not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
    if bn is not None:
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            raise TypeError(f"bn must be a BatchNorm module, got {type(bn).__name__}")
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("bn has no running statistics (track_running_stats=False): it cannot be folded, "
                             "its eval output depends on the batch")
    channels = bn.num_features if bn is not None else conv.out_channels
    device = (bn.running_mean if bn is not None else conv.weight).device
    if conv is not None and bn is not None:
        if conv.out_channels != bn.num_features:
            raise ValueError(f"bn has {bn.num_features} features but conv has {conv.out_channels} output channels")
        if conv.weight.device != device:
            raise ValueError(f"bn is on {device} but conv is on {conv.weight.device}; both must be on one device")

    bias = torch.zeros(channels, device=device, dtype=torch.float32)
    if conv is not None and conv.bias is not None:
        bias = conv.bias.detach().float()
    if bn is None:
        return torch.ones(channels, device=device, dtype=torch.float32), bias.clone()

    gamma = bn.weight.detach().float() if bn.weight is not None else torch.ones_like(bias)
    beta = bn.bias.detach().float() if bn.bias is not None else torch.zeros_like(bias)
    scale = gamma * torch.rsqrt(bn.running_var.detach().float() + bn.eps)
    shift = beta + (bias - bn.running_mean.detach().float()) * scale
    return scale, shift
