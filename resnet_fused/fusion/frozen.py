"""Units in eval with autograd on (frozen BatchNorm: fine-tuning a backbone, or `model(x)` without no_grad): the
packed forward kernel, and a backward of its own, as apex's frozen-BN bottleneck does.

    out = act(conv(x, W) * scale[c] + shift[c] (+ residual))       (scale, shift: the BN folded, ops.folding)

Forward runs the bound packed kernel and keeps x, W, scale and out (out is the next unit's input: no new memory).
Backward, with g = grad_out where out > 0 (eager ReLU's threshold_backward) and W_f = W * scale[c]:

    d residual = g,  d shift = sum_{n,h,w} g
    d x, d W_f = conv backward of g at (x, W_f)        (one backend.conv_backward, as eager's conv)
    d W = d W_f * scale[c],  d scale[c] = sum_{ci,kh,kw} d W_f * W

so no activation-sized product g * scale is made; autograd carries d scale and d shift on to the BN's affine
parameters and the conv bias through the fold. A backward that must itself be differentiable recomputes the unit
with plain autograd ops and differentiates that.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..ops.conv_backward import convolution
from ..ops.cpu_cache import block_cached
from ..ops.folding import folded_scale_shift
from .vjp import differentiable_vjp

Kernel = Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def _per_out_channel(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


class _FrozenUnit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernel: Kernel, conv_backward, geometry: tuple, relu: bool, x, residual, weight, scale, shift):
        out = kernel(x, residual)
        ctx.conv_backward, ctx.geometry, ctx.relu = conv_backward, geometry, relu
        ctx.save_for_backward(x, weight, scale, shift, out, residual)
        return out

    @staticmethod
    @block_cached
    def backward(ctx, grad_out):
        x, weight, scale, shift, out, residual = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        needs_x, needs_residual, needs_weight, needs_scale, needs_shift = ctx.needs_input_grad[4:]
        if torch.is_grad_enabled():  # create_graph: differentiate the unit recomputed in plain ops
            def unit(x, residual, weight, scale, shift):
                return _plain(x, residual, weight, scale, shift, ctx.geometry, ctx.relu)
            return (None,) * 4 + differentiable_vjp(unit, (x, residual, weight, scale, shift), grad_out,
                                                    ctx.needs_input_grad[4:])
        g = torch.ops.aten.threshold_backward(grad_out, out, 0) if ctx.relu else grad_out
        grad_x = grad_weight = grad_scale = None
        if needs_x or needs_weight or needs_scale:
            folded = (weight.float() * _per_out_channel(scale)).to(weight.dtype)
            grad_x, grad_folded, _ = ctx.conv_backward(
                g.to(x.dtype), x, folded, None, stride, padding, dilation, False, [0, 0], groups,
                [needs_x, needs_weight or needs_scale, False])
            if needs_weight:
                grad_weight = (grad_folded.float() * _per_out_channel(scale)).to(weight.dtype)
            if needs_scale:
                grad_scale = (grad_folded.float() * weight.float()).sum(dim=(1, 2, 3))
        grad_shift = g.float().sum(dim=(0, 2, 3)) if needs_shift else None
        grad_residual = g if needs_residual else None
        return None, None, None, None, grad_x, grad_residual, grad_weight, grad_scale, grad_shift


def _plain(x, residual, weight, scale, shift, geometry, relu):
    stride, padding, dilation, groups = geometry
    z = convolution(x, weight, None, stride, padding, dilation, groups).float() * scale.view(1, -1, 1, 1)
    z = z + shift.view(1, -1, 1, 1)
    if residual is not None:
        z = z + residual.float()
    return (torch.relu(z) if relu else z).to(x.dtype)


def frozen_step(conv, bn, kernel: Kernel, relu: bool, dtype: torch.dtype, conv_backward) -> Kernel:
    """The unit's step f(x, residual) with the packed `kernel` (bound to the current weights) forward and the
    backward above, its convolution's by `conv_backward` (the backend's, aten.convolution_backward's signature).
    Only where a BN parameter or the conv bias wants a gradient is the fold recomputed per call (differentiably);
    otherwise it is taken once, here."""
    geometry = (tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups)
    live_fold = any(t is not None and t.requires_grad
                    for t in (conv.bias, None if bn is None else bn.weight, None if bn is None else bn.bias))
    if not live_fold:
        with torch.no_grad():
            fixed = folded_scale_shift(conv, bn)

    def frozen(x, residual):
        scale, shift = folded_scale_shift(conv, bn) if live_fold else fixed
        weight = conv.weight if conv.weight.dtype == dtype else conv.weight.to(dtype)
        return _FrozenUnit.apply(kernel, conv_backward, geometry, relu, x, residual, weight, scale, shift)
    return frozen
