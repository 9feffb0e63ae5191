"""A unit in training: BatchNorm with batch statistics, and its running statistics updated as eager does.

    c = conv2d(x, W) + bias;  mean, var = batch mean / biased variance of c per channel (fp32)
    y = relu?((c - mean) * gamma / sqrt(var + eps) + beta (+ residual))      (autograd through every term;
        centering first keeps the backward as exact as BatchNorm's)
    running_mean/var (unbiased var) and num_batches_tracked updated as nn.BatchNorm2d does
"""

from __future__ import annotations

import torch

from .. import ops
from .eligibility import CONV_IMPL


def train_unit(conv, bn, x, residual, relu: bool, dtype: torch.dtype, backend: str, eager) -> torch.Tensor:
    """relu?(bn(conv(x)) + residual?) with batch statistics; `eager` runs the unit as eager does where eager
    raises (one value per channel)."""
    x = x.to(dtype)
    residual = None if residual is None else residual.to(dtype)
    weight = conv.weight.to(dtype)
    bias = None if conv.bias is None else conv.bias.to(dtype)
    y = CONV_IMPL(conv, x, weight, bias)  # the bias stays in: it shifts the batch mean, hence running_mean
    per_channel = y.numel() // max(y.shape[1], 1)
    if per_channel <= 1:  # batch statistics of one value: eager raises (in eval too without running stats)
        return eager(x, residual)
    y32 = y.float()
    var, mean = torch.var_mean(y32, dim=(0, 2, 3), correction=0)
    # Normalize the centered values: autograd then reduces sum(g * (y - mean)), as BatchNorm's backward does,
    # instead of sum(g * y) - mean * sum(g), which cancels catastrophically when |mean| >> std.
    centered = y32 - mean.view(1, -1, 1, 1)
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = bn.weight.float() * scale
    shift = bn.bias.float() if bn.bias is not None else torch.zeros_like(scale)
    if bn.training and bn.track_running_stats:
        _update_running_stats(bn, mean.detach(), var.detach(), per_channel)
    residual = None if residual is None else residual.float()
    if not relu:
        # Without a ReLU the next module may modify this output in place (an inplace ReLU that could not be
        # absorbed), as eager BatchNorm's output allows; a fused op's autograd may save its output, so use plain
        # autograd here, which saves only its inputs.
        out = centered * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        return (out if residual is None else out + residual).to(y.dtype)
    return ops.bn_act(centered, scale, shift, residual, relu=relu, backend=backend).to(y.dtype)


@torch.no_grad()
def _update_running_stats(bn, mean, var, count: int) -> None:
    """As _BatchNorm.forward + F.batch_norm do: count the batch, then blend in mean and unbiased var."""
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    if bn.momentum is None:  # cumulative moving average
        factor = 1.0 / float(bn.num_batches_tracked)
    else:
        factor = bn.momentum
    if bn.running_mean is None or bn.running_var is None:
        return
    unbiased = var * (count / (count - 1))
    bn.running_mean.copy_(factor * mean + (1.0 - factor) * bn.running_mean.float())
    bn.running_var.copy_(factor * unbiased + (1.0 - factor) * bn.running_var.float())
