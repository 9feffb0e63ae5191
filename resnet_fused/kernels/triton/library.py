"""The Triton kernels as torch.library ops: torch.ops.resnet_fused_triton.{conv_bn_act, bn_act, add_relu}.

Same semantics as the public ops (DESIGN.md), except that conv_bn_act takes the weight prepacked by
`conv_bn_act.pack_weight` plus the kernel size. Registered with torch.library.custom_op (the namespace
"resnet_fused" belongs to the C++ extension) with fake kernels, so torch.compile(fullgraph=True), torch.export
and torch.library.opcheck see the output's shape, dtype and channels_last strides without running a kernel.
bn_act and add_relu have autograd (backward in plain PyTorch, fp32 math) for training; conv_bn_act is for
inference (eval-mode folded BN) and raises if differentiated (the backend's public conv_bn_act then runs
conv2d + bn_act instead).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ...ops.autograd import backward_add_relu, backward_bn_act, setup_add_relu, setup_bn_act
from . import conv_bn_act as _conv
from . import elementwise as _ew

NAMESPACE = "resnet_fused_triton"


@torch.library.custom_op(f"{NAMESPACE}::conv_bn_act", mutates_args=())
def conv_bn_act(x: Tensor, weight_packed: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor],
                kernel_h: int, kernel_w: int, stride: int, padding: int, relu: bool) -> Tensor:
    return _conv.conv_bn_act(x, weight_packed, scale, shift, residual, kernel_h, kernel_w, stride, padding, relu)


@conv_bn_act.register_fake
def _(x, weight_packed, scale, shift, residual, kernel_h, kernel_w, stride, padding, relu):
    return _conv.empty_output(x, weight_packed.shape[1], kernel_h, kernel_w, stride, padding)


@torch.library.custom_op(f"{NAMESPACE}::bn_act", mutates_args=())
def bn_act(x: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor], relu: bool) -> Tensor:
    return _ew.bn_act(x, scale, shift, residual, relu)


@bn_act.register_fake
def _(x, scale, shift, residual, relu):
    return _ew.empty_output(x)


@torch.library.custom_op(f"{NAMESPACE}::add_relu", mutates_args=())
def add_relu(x: Tensor, residual: Tensor) -> Tensor:
    return _ew.add_relu(x, residual)


@add_relu.register_fake
def _(x, residual):
    return _ew.empty_output(x)


# --- autograd: the formulas every backend's bn_act/add_relu share -------------------------------------------

bn_act.register_autograd(backward_bn_act, setup_context=setup_bn_act)
add_relu.register_autograd(backward_add_relu, setup_context=setup_add_relu)
