"""Folding an eval-mode BatchNorm (and the conv bias) into a per-channel fp32 scale and shift.

    bn(conv(x) + b) = conv(x) * scale + shift,
    scale = gamma / sqrt(running_var + eps),   shift = beta + (b - running_mean) * scale
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def fold_bn(conv: Optional[nn.Conv2d], bn: Optional[nn.BatchNorm2d]) -> tuple[torch.Tensor, torch.Tensor]:
    """Return fp32 (scale, shift) such that bn(conv(x)) == conv_nobias(x) * scale + shift in eval mode.

    `bn` may be None (a conv alone, its bias becomes the shift); the modules are never modified, and the result
    is detached from them (see `folded_scale_shift` for the differentiable fold).
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
    if conv is not None and bn is not None:
        if conv.out_channels != bn.num_features:
            raise ValueError(f"bn has {bn.num_features} features but conv has {conv.out_channels} output channels")
        if conv.weight.device != bn.running_mean.device:
            raise ValueError(f"bn is on {bn.running_mean.device} but conv is on {conv.weight.device}; both must be "
                             f"on one device")
    with torch.no_grad():
        return folded_scale_shift(conv, bn)


def folded_scale_shift(conv: Optional[nn.Conv2d], bn) -> tuple[torch.Tensor, torch.Tensor]:
    """fold_bn's arithmetic without its checks, differentiable: gradients reach the conv bias and the BN's affine
    parameters (fine-tuning with frozen statistics). New tensors, even where one term is missing."""
    channels = bn.num_features if bn is not None else conv.out_channels
    device = (bn.running_mean if bn is not None else conv.weight).device
    bias = conv.bias.float() if conv is not None and conv.bias is not None else None
    if bn is None:
        scale = torch.ones(channels, device=device, dtype=torch.float32)
        return scale, (bias + 0.0 if bias is not None else torch.zeros_like(scale))
    scale = torch.rsqrt(bn.running_var.float() + bn.eps)
    if bn.weight is not None:
        scale = bn.weight.float() * scale
    centered = -bn.running_mean.float() if bias is None else bias - bn.running_mean.float()
    shift = centered * scale
    if bn.bias is not None:
        shift = bn.bias.float() + shift
    return scale, shift
