"""The Triton kernels as torch.library ops: torch.ops.resnet_fused_triton.{conv_bn_act, bn_act, add_relu} and
training BatchNorm's passes {conv_batch_norm_stats (the conv with the statistics from its epilogue),
batch_norm_stats, batch_norm_apply, batch_norm_backward}.

Same semantics as the public ops, except that conv_bn_act takes the weight prepacked by the kernel's
`pack_weight` plus the kernel size. Registered with torch.library.custom_op (the namespace "resnet_fused" belongs
to the C++ extension) with fake kernels, so torch.compile(fullgraph=True), torch.export and
torch.library.opcheck see the output's shape, dtype and channels_last strides without running a kernel.
bn_act and add_relu have autograd (backward in plain PyTorch, fp32 math) for training; conv_bn_act is for
inference (eval-mode folded BN) and raises if differentiated (the backend then runs conv2d + bn_act instead).
The batch_norm_* ops (math in ops/batch_norm_reference.py) keep y's dtype and layout and have no autograd: the
fused training units call them from their own backward. batch_norm_backward returns grad_weight even without a
weight, and a grad_residual of shape [0] without a residual (an op returns a fixed number of tensors).
The launchers trust their arguments: the public ops check them; what a direct call of these ops could get
wrong about memory (lengths, shapes) is checked here with torch._check, which the fake kernels share.
Importing this module imports triton.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ...kernels.triton import INTERPRET
from ...kernels.triton import batch_norm as _bn
from ...kernels.triton import conv_bn_act as _conv
from ...kernels.triton import elementwise as _ew
from ..autograd import backward_add_relu, backward_bn_act, setup_add_relu, setup_bn_act
from ..batch_norm_reference import output_format
from ..geometry import conv_output_shape

NAMESPACE = "resnet_fused_triton"


def _check_device(x: Tensor) -> None:
    """Triton reads CUDA memory, or CPU memory only in the interpreter: say so instead of a pointer error."""
    torch._check(x.device.type == "cuda" or INTERPRET,
                 lambda: f"x is on {x.device}: Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 set before "
                         f"triton is imported, for tests on CPU)")


def _check_like(name: str, t: Optional[Tensor], shape, dtype) -> None:
    if t is not None:
        torch._check(tuple(t.shape) == tuple(shape) and t.dtype == dtype,
                     lambda: f"{name} must be {dtype} of shape {tuple(shape)}, got {t.dtype} {tuple(t.shape)}")


def _check_vectors(scale: Tensor, shift: Tensor, channels: int) -> None:
    for name, t in (("scale", scale), ("shift", shift)):
        torch._check(t.dim() == 1 and t.numel() == channels,
                     lambda: f"{name} must have one value per channel ({channels}), got shape {tuple(t.shape)}")


def _conv_output_shape(x, weight_packed, kernel_h, kernel_w, stride, padding):
    rows = _conv.packed_rows(x.shape[1], kernel_h, kernel_w)
    torch._check(weight_packed.dim() == 2 and weight_packed.shape[0] == rows and weight_packed.dtype == x.dtype,
                 lambda: f"weight_packed must be pack_weight's ({rows}, Cout) {x.dtype} tensor, got "
                         f"{weight_packed.dtype} {tuple(weight_packed.shape)}")
    return conv_output_shape(x.shape, weight_packed.shape[1], (kernel_h, kernel_w), stride, padding)


def _empty(x: Tensor, shape) -> Tensor:
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


@torch.library.custom_op(f"{NAMESPACE}::conv_bn_act", mutates_args=())
def conv_bn_act(x: Tensor, weight_packed: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor],
                kernel_h: int, kernel_w: int, stride: int, padding: int, relu: bool) -> Tensor:
    _check_device(x)
    shape = _conv_output_shape(x, weight_packed, kernel_h, kernel_w, stride, padding)
    _check_vectors(scale, shift, shape[1])
    _check_like("residual", residual, shape, x.dtype)
    return _conv.conv_bn_act(x, weight_packed, scale.float().contiguous(), shift.float().contiguous(), residual,
                             _empty(x, shape), kernel_h, kernel_w, stride, padding, relu)


@conv_bn_act.register_fake
def _(x, weight_packed, scale, shift, residual, kernel_h, kernel_w, stride, padding, relu):
    return _empty(x, _conv_output_shape(x, weight_packed, kernel_h, kernel_w, stride, padding))


@torch.library.custom_op(f"{NAMESPACE}::conv_batch_norm_stats", mutates_args=())
def conv_batch_norm_stats(x: Tensor, weight_packed: Tensor, bias: Tensor, kernel_h: int, kernel_w: int, stride: int,
                          padding: int) -> tuple[Tensor, Tensor, Tensor]:
    _check_device(x)
    shape = _conv_output_shape(x, weight_packed, kernel_h, kernel_w, stride, padding)
    torch._check(bias.dim() == 1 and bias.numel() == shape[1],
                 lambda: f"bias must have one value per channel ({shape[1]}), got shape {tuple(bias.shape)}")
    return _conv.conv_batch_norm_stats(x, weight_packed, bias.float().contiguous(), _empty(x, shape), kernel_h,
                                       kernel_w, stride, padding)


@conv_batch_norm_stats.register_fake
def _(x, weight_packed, bias, kernel_h, kernel_w, stride, padding):
    shape = _conv_output_shape(x, weight_packed, kernel_h, kernel_w, stride, padding)
    stat = torch.empty((shape[1],), dtype=torch.float32, device=x.device)
    return _empty(x, shape), stat, torch.empty_like(stat)


@torch.library.custom_op(f"{NAMESPACE}::bn_act", mutates_args=())
def bn_act(x: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor], relu: bool) -> Tensor:
    _check_device(x)
    _check_vectors(scale, shift, x.shape[1])
    _check_like("residual", residual, x.shape, x.dtype)
    return _ew.bn_act(x, scale, shift, residual, relu)


@bn_act.register_fake
def _(x, scale, shift, residual, relu):
    return _empty(x, x.shape)


@torch.library.custom_op(f"{NAMESPACE}::add_relu", mutates_args=())
def add_relu(x: Tensor, residual: Tensor) -> Tensor:
    _check_device(x)
    _check_like("residual", residual, x.shape, x.dtype)
    return _ew.add_relu(x, residual)


@add_relu.register_fake
def _(x, residual):
    return _empty(x, x.shape)


def _channels_last(y: Tensor) -> bool:
    return output_format(y) == torch.channels_last


def _channel_stat(y: Tensor) -> Tensor:
    return torch.empty((y.shape[1],), dtype=torch.float32, device=y.device)


def _like_y(y: Tensor) -> Tensor:
    return torch.empty(y.shape, dtype=y.dtype, device=y.device, memory_format=output_format(y))


def _check_channel_vectors(y: Tensor, **vectors) -> None:
    for name, t in vectors.items():
        if t is not None:
            torch._check(t.dim() == 1 and t.numel() == y.shape[1],
                         lambda: f"{name} must have one value per channel ({y.shape[1]}), got shape {tuple(t.shape)}")


@torch.library.custom_op(f"{NAMESPACE}::batch_norm_stats", mutates_args=())
def batch_norm_stats(y: Tensor) -> tuple[Tensor, Tensor]:
    _check_device(y)
    return _bn.batch_norm_stats(y, _channels_last(y))


@batch_norm_stats.register_fake
def _(y):
    return _channel_stat(y), _channel_stat(y)


@torch.library.custom_op(f"{NAMESPACE}::batch_norm_apply", mutates_args=())
def batch_norm_apply(y: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                     residual: Optional[Tensor], relu: bool) -> Tensor:
    _check_device(y)
    _check_channel_vectors(y, mean=mean, invstd=invstd, weight=weight, bias=bias)
    _check_like("residual", residual, y.shape, y.dtype)
    return _bn.batch_norm_apply(y, mean, invstd, weight, bias, residual, relu, _channels_last(y))


@batch_norm_apply.register_fake
def _(y, mean, invstd, weight, bias, residual, relu):
    return _like_y(y)


@torch.library.custom_op(f"{NAMESPACE}::batch_norm_backward", mutates_args=())
def batch_norm_backward(grad_out: Tensor, y: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
                        bias: Optional[Tensor], residual: Optional[Tensor],
                        relu: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_device(y)
    _check_channel_vectors(y, mean=mean, invstd=invstd, weight=weight, bias=bias)
    _check_like("residual", residual, y.shape, y.dtype)
    torch._check(tuple(grad_out.shape) == tuple(y.shape),
                 lambda: f"grad_out must have y's shape {tuple(y.shape)}, got {tuple(grad_out.shape)}")
    grad_y, grad_weight, grad_bias, grad_residual = _bn.batch_norm_backward(
        grad_out, y, mean, invstd, weight, bias, residual, relu, _channels_last(y))
    return grad_y, grad_weight, grad_bias, grad_residual if residual is not None else y.new_empty((0,))


@batch_norm_backward.register_fake
def _(grad_out, y, mean, invstd, weight, bias, residual, relu):
    grad_residual = _like_y(y) if residual is not None else y.new_empty((0,))
    return _like_y(y), _channel_stat(y), _channel_stat(y), grad_residual


# --- autograd: the formulas every backend's bn_act/add_relu share -------------------------------------------

bn_act.register_autograd(backward_bn_act, setup_context=setup_bn_act)
add_relu.register_autograd(backward_add_relu, setup_context=setup_add_relu)
