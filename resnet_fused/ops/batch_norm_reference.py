"""Training BatchNorm's three passes, in plain torch: the oracle of every backend's kernels for them, and the
fallback of backends without kernels of their own. M = N*H*W values per channel c, fp32 arithmetic throughout.

    batch_norm_stats(y)            mean[c] = sum y / M,  var[c] = sum (y - mean)^2 / M          (biased)
    batch_norm_apply(y, ...)       xhat = (y - mean[c]) * invstd[c],  z = xhat * weight[c] + bias[c] (+ residual)
                                   out = relu(z) if relu else z                  (out in y's dtype and layout)
    batch_norm_backward(g_out, y, ...)
                                   g = g_out where not z <= 0 (ReLU's backward: NaN passes) if relu else g_out
                                   grad_bias = sum g,  grad_weight = sum g * xhat,  grad_residual = g
                                   grad_y = weight[c] * invstd[c] * (g - (grad_bias + xhat * grad_weight) / M)

The normalization is centered before it is scaled (never y * scale + shift with shift = bias - mean * scale),
and the backward reduces over centered values: both stay exact when |mean| >> std. weight and bias may be None
(1 and 0). "y's layout": channels_last in, channels_last out; anything else, contiguous NCHW out.
"""

from __future__ import annotations

import torch


def output_format(y: torch.Tensor) -> torch.memory_format:
    """The layout the training passes write: y's, where y is channels_last; contiguous otherwise."""
    channels_last = y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    return v.float().view(1, -1, 1, 1)


def stats(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    var, mean = torch.var_mean(y.float(), dim=(0, 2, 3), correction=0)
    return mean, var


def _normalized(y, mean, invstd):
    return (y.float() - _per_channel(mean)) * _per_channel(invstd)


def _pre_activation(xhat, weight, bias, residual):
    z = xhat if weight is None else xhat * _per_channel(weight)
    if bias is not None:
        z = z + _per_channel(bias)
    return z if residual is None else z + residual.float()


def apply(y, mean, invstd, weight, bias, residual, relu: bool) -> torch.Tensor:
    z = _pre_activation(_normalized(y, mean, invstd), weight, bias, residual)
    return (torch.relu(z) if relu else z).to(y.dtype).contiguous(memory_format=output_format(y))


def backward(grad_out, y, mean, invstd, weight, bias, residual, relu: bool):
    """(grad_y, grad_weight or None, grad_bias, grad_residual or None)."""
    xhat = _normalized(y, mean, invstd)
    g = grad_out.float()
    if relu:
        g = torch.where(_pre_activation(xhat, weight, bias, residual) <= 0, 0.0, g)
    grad_bias = g.sum(dim=(0, 2, 3))
    grad_weight = (g * xhat).sum(dim=(0, 2, 3))
    count = y.numel() // max(y.shape[1], 1)
    scale = _per_channel(invstd) if weight is None else _per_channel(weight) * _per_channel(invstd)
    grad_y = scale * (g - (_per_channel(grad_bias) + xhat * _per_channel(grad_weight)) / count)
    layout = output_format(y)
    return (grad_y.to(y.dtype).contiguous(memory_format=layout), None if weight is None else grad_weight, grad_bias,
            None if residual is None else g.to(residual.dtype).contiguous(memory_format=layout))
