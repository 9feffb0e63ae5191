"""Backward formulas shared by every backend's bn_act and add_relu ops (plain torch, fp32 arithmetic).

    bn_act:   y = act(x * scale[c] + shift[c] (+ residual)),  g = (grad where y > 0, else 0) if relu else grad
              d x = g * scale[c],  d scale = sum_{n,h,w} g * x,  d shift = sum_{n,h,w} g,  d residual = g
    add_relu: y = max(x + residual, 0),  d x = d residual = (grad where y > 0, else 0)

Use with torch.library.register_autograd(op, backward_*, setup_context=setup_*).
"""

from __future__ import annotations

import torch


def _masked_grad(grad, out, relu):
    """grad where the ReLU passed its input, in fp32. threshold_backward, as eager's ReLU backward: it selects
    (an infinite grad where y = 0 gives 0, not inf * 0 = NaN), passes NaN outputs' grads through, and stays
    differentiable through `out` (double backward then reaches every input, as eager's does)."""
    g = grad.float()
    return torch.ops.aten.threshold_backward(g, out.float(), 0) if relu else g


def _channel_sum(t):
    return t.sum(dim=(0, 2, 3))


def _grad_or_none(needed, make):
    return make() if needed else None


def setup_bn_act(ctx, inputs, output):
    x, scale, shift, residual, relu = inputs
    ctx.relu = relu
    # The output is needed only for the ReLU mask; saving it otherwise would forbid in-place ops on it.
    ctx.save_for_backward(x, scale, output if relu else None)
    ctx.shift_dtype = shift.dtype
    ctx.has_residual = residual is not None


def backward_bn_act(ctx, grad):
    x, scale, out = ctx.saved_tensors
    g = _masked_grad(grad, out, ctx.relu)
    need = ctx.needs_input_grad
    grad_x = _grad_or_none(need[0], lambda: (g * scale.float().view(1, -1, 1, 1)).to(x.dtype))
    grad_scale = _grad_or_none(need[1], lambda: _channel_sum(g * x.float()).to(scale.dtype))
    grad_shift = _grad_or_none(need[2], lambda: _channel_sum(g).to(ctx.shift_dtype))
    grad_res = _grad_or_none(ctx.has_residual and need[3], lambda: g.to(x.dtype))
    return grad_x, grad_scale, grad_shift, grad_res, None


def setup_add_relu(ctx, inputs, output):
    ctx.save_for_backward(output)


def backward_add_relu(ctx, grad):
    (out,) = ctx.saved_tensors
    g = _masked_grad(grad, out, True).to(out.dtype)
    return g, g
