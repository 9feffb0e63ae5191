"""Fake (meta) kernels and autograd for the C++ extension's ops, torch.ops.resnet_fused.* (their schemas and
kernels are in csrc/).

    conv_bn_act(x, w, scale, shift, residual, stride, padding, relu)
        y = act(conv2d(x, w, stride, padding) * scale[c] + shift[c] (+ residual))
    conv_bias_act(x, w, bias, residual, stride, padding, relu)      (internal: the "cpu" backend's packed path)
        y = act(conv2d(x, w, stride, padding) + bias[c] (+ residual))
    bn_act(x, scale, shift, residual, relu)   y = act(x * scale[c] + shift[c] (+ residual))
    add_relu(x, residual)                     y = max(x + residual, 0)
    batch_norm_stats, batch_norm_apply, batch_norm_backward
                                              training BatchNorm's passes (ops/batch_norm_reference.py)

Fake kernels give the output's shape (conv arithmetic), dtype (x's) and channels_last strides, so that
torch.compile, torch.export and torch.library.opcheck work; the batch_norm_* outputs keep y's dtype and layout
(batch_norm_reference.output_format) and have no autograd (the fused training units call them from their own
backward). Backward (plain torch, fp32 arithmetic):
with g = (grad where y > 0, else 0) if relu else grad (threshold_backward, as eager's ReLU),
    d residual = g,  d shift (or bias) = sum_{n,h,w} g,  d scale = sum_{n,h,w} g * conv(x, w)  (x for bn_act),
    d x = g * scale (bn_act),  d x, d w = conv backward of g * scale (of g for conv_bias_act).
The conv ops recompute conv(x, w) for d scale rather than keep it alive from the forward.
Call `register()` once the extension has loaded (the schemas must exist); it is idempotent.
"""

from __future__ import annotations

import torch

from ..batch_norm_reference import output_format
from ..autograd import (_channel_sum, _grad_or_none, _masked_grad, backward_add_relu, backward_bn_act,
                        setup_add_relu, setup_bn_act)
from ..conv_backward import convolution_backward
from ..geometry import conv_output_shape
from ..validation import check_same_device

_registered = False


def _empty_output(x, shape):
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


# ---- fake kernels ---------------------------------------------------------------------------------------------

def _same_device(x, **tensors):
    """A fake kernel also serves real calls with one meta argument (the Meta key outranks CPU and CUDA): there it
    must fail as the C++ checks would, not hand back an uninitialized tensor on x's device."""
    for name, t in tensors.items():
        if t is not None:
            check_same_device(name, t, x)


def _conv_output(x, weight, stride, padding):
    return _empty_output(x, conv_output_shape(x.shape, weight.shape[0], weight.shape[2:], stride, padding))


def _fake_conv_bn_act(x, weight, scale, shift, residual, stride, padding, relu):
    _same_device(x, weight=weight, scale=scale, shift=shift, residual=residual)
    return _conv_output(x, weight, stride, padding)


def _fake_conv_bias_act(x, weight, bias, residual, stride, padding, relu):
    _same_device(x, weight=weight, bias=bias, residual=residual)
    return _conv_output(x, weight, stride, padding)


def _fake_bn_act(x, scale, shift, residual, relu):
    _same_device(x, scale=scale, shift=shift, residual=residual)
    return _empty_output(x, x.shape)


def _fake_add_relu(x, residual):
    _same_device(x, residual=residual)
    return _empty_output(x, x.shape)


def _channel_stat(y):
    return torch.empty((y.shape[1],), dtype=torch.float32, device=y.device)


def _like_y(y):
    return torch.empty(y.shape, dtype=y.dtype, device=y.device, memory_format=output_format(y))


def _fake_batch_norm_stats(y):
    return _channel_stat(y), _channel_stat(y)


def _fake_batch_norm_apply(y, mean, invstd, weight, bias, residual, relu):
    _same_device(y, mean=mean, invstd=invstd, weight=weight, bias=bias, residual=residual)
    return _like_y(y)


def _fake_batch_norm_backward(grad_out, y, mean, invstd, weight, bias, residual, relu):
    _same_device(y, grad_out=grad_out, mean=mean, invstd=invstd, weight=weight, bias=bias, residual=residual)
    grad_residual = _like_y(y) if residual is not None else torch.empty((0,), dtype=y.dtype, device=y.device)
    return _like_y(y), _channel_stat(y), _channel_stat(y), grad_residual


# ---- autograd -------------------------------------------------------------------------------------------------

def _setup_conv(ctx, inputs, output):
    x, weight, scale_or_bias, shift, residual, stride, padding, relu = inputs
    ctx.stride, ctx.padding, ctx.relu = stride, padding, relu
    ctx.save_for_backward(x, weight, scale_or_bias, output if relu else None)
    ctx.shift_dtype = None if shift is None else shift.dtype
    ctx.has_residual = residual is not None


def _in_conv_dtype(x, weight):
    """x and weight in the forward's convolution dtype: x's, or fp32 for an fp32 weight (which the cpu kernels
    accept with bf16/fp16 x)."""
    dtype = torch.promote_types(x.dtype, weight.dtype)
    return x.to(dtype), weight.to(dtype)


def _conv_grads(ctx, g, grad_conv, need_x, need_w):
    """d x and d weight of conv2d(x, weight) given the gradient at its output, computed in the forward's
    convolution dtype and each returned in its input's."""
    x, weight = ctx.saved_tensors[:2]
    if not (need_x or need_w):
        return None, None
    conv_x, conv_w = _in_conv_dtype(x, weight)
    grad_x, grad_w, _ = convolution_backward(
        grad_conv.to(conv_x.dtype), conv_x, conv_w, None, [ctx.stride] * 2, [ctx.padding] * 2, [1, 1],
        False, [0, 0], 1, [need_x, need_w, False])
    return (None if grad_x is None else grad_x.to(x.dtype)), (None if grad_w is None else grad_w.to(weight.dtype))


def _backward_conv_bn_act(ctx, grad):
    x, weight, scale, out = ctx.saved_tensors
    g = _masked_grad(grad, out, ctx.relu)
    need = ctx.needs_input_grad
    grad_x, grad_w = _conv_grads(ctx, g, g * scale.float().view(1, -1, 1, 1), need[0], need[1])

    def grad_scale():
        conv = torch.nn.functional.conv2d(*_in_conv_dtype(x, weight), None, ctx.stride, ctx.padding)
        return _channel_sum(g * conv.float()).to(scale.dtype)

    grad_scale = _grad_or_none(need[2], grad_scale)
    grad_shift = _grad_or_none(need[3], lambda: _channel_sum(g).to(ctx.shift_dtype))
    grad_res = _grad_or_none(ctx.has_residual and need[4], lambda: g.to(x.dtype))
    return grad_x, grad_w, grad_scale, grad_shift, grad_res, None, None, None


def _setup_conv_bias_act(ctx, inputs, output):
    x, weight, bias, residual, stride, padding, relu = inputs
    _setup_conv(ctx, (x, weight, bias, None, residual, stride, padding, relu), output)


def _backward_conv_bias_act(ctx, grad):
    x, weight, bias, out = ctx.saved_tensors
    g = _masked_grad(grad, out, ctx.relu)
    need = ctx.needs_input_grad
    grad_x, grad_w = _conv_grads(ctx, g, g, need[0], need[1])
    grad_bias = _grad_or_none(need[2], lambda: _channel_sum(g).to(bias.dtype))
    grad_res = _grad_or_none(ctx.has_residual and need[3], lambda: g.to(x.dtype))
    return grad_x, grad_w, grad_bias, grad_res, None, None, None


_OPS = {
    "conv_bn_act": (_fake_conv_bn_act, _backward_conv_bn_act, _setup_conv),
    "conv_bias_act": (_fake_conv_bias_act, _backward_conv_bias_act, _setup_conv_bias_act),
    "bn_act": (_fake_bn_act, backward_bn_act, setup_bn_act),
    "add_relu": (_fake_add_relu, backward_add_relu, setup_add_relu),
}
_FAKE_ONLY = {
    "batch_norm_stats": _fake_batch_norm_stats,
    "batch_norm_apply": _fake_batch_norm_apply,
    "batch_norm_backward": _fake_batch_norm_backward,
}


def register() -> None:
    """Register the fake kernels for every op in the extension's schema block, and autograd formulas for those of
    the inference ops."""
    global _registered
    if _registered:
        return
    _registered = True
    for name, (fake, backward, setup) in _OPS.items():
        if not hasattr(torch.ops.resnet_fused, name):  # an extension built before this op was added
            continue
        qualname = f"resnet_fused::{name}"
        torch.library.register_fake(qualname, fake)
        torch.library.register_autograd(qualname, backward, setup_context=setup)
    for name, fake in _FAKE_ONLY.items():
        if hasattr(torch.ops.resnet_fused, name):
            torch.library.register_fake(f"resnet_fused::{name}", fake)
