"""The "triton" backend: the fused ops as Triton kernels (resnet_fused/kernels/triton), through the torch.library
ops that triton_library.py registers (torch.ops.resnet_fused_triton.*).

Runs on CUDA tensors, and on CPU tensors only under the Triton interpreter (TRITON_INTERPRET=1, for tests).
Triton is imported on first use, not when resnet_fused is imported: the package works without it, and tests
can set TRITON_INTERPRET before triton reads it.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch

from ..registry import Backend, register_backend

_ops = None               # torch.ops.resnet_fused_triton once loaded
_load_error: Optional[str] = None


def _load():
    """Import the kernels (registering the ops). Return the ops namespace, or None (see _load_error)."""
    global _ops, _load_error
    if _ops is None and _load_error is None:
        try:
            from . import triton_library  # noqa: F401  (registers torch.ops.resnet_fused_triton.*)
            _ops = torch.ops.resnet_fused_triton
        except Exception as exc:  # ImportError, or a triton too old for the kernels
            _load_error = f"triton is not importable ({type(exc).__name__}: {exc})"
    return _ops


def _interpreting() -> bool:
    if _ops is not None:  # what the kernels were defined with
        from ...kernels.triton import INTERPRET
        return INTERPRET
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


class TritonConvPack(NamedTuple):
    """A conv weight laid out for the kernel once per BN fold: (KH*KW*Cin_pad, Cout), plus fp32 scale/shift."""

    weight: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    kernel_h: int
    kernel_w: int


def _wants_grad(*tensors) -> bool:
    """The kernels have no backward: with autograd wanted through any of these, run conv2d + the bn_act kernel."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class TritonBackend(Backend):
    name = "triton"

    def unavailable_reason(self, device):
        device = torch.device(device)
        if device.type == "cpu" and not _interpreting():
            return "Triton needs a CUDA GPU (or TRITON_INTERPRET=1 for tests)"
        if device.type not in ("cpu", "cuda"):
            return f"Triton needs a CUDA GPU, not {device.type}"
        if device.type == "cuda" and not torch.cuda.is_available():
            return "no CUDA device is available"
        if _load() is None:
            return _load_error
        return None

    def pack_conv(self, weight, scale, shift, stride, padding):
        from ...kernels.triton.conv_bn_act import pack_weight

        return TritonConvPack(pack_weight(weight), scale.float().contiguous(), shift.float().contiguous(),
                              int(weight.shape[2]), int(weight.shape[3]))

    def conv_bn_act(self, x, weight, scale, shift, residual, stride, padding, relu):
        if _wants_grad(x, weight, scale, shift, residual):
            conv = torch.nn.functional.conv2d(x, weight, None, stride, padding)
            return self.bn_act(conv, scale, shift, residual, relu)
        return super().conv_bn_act(x, weight, scale, shift, residual, stride, padding, relu)

    def conv_bn_act_packed(self, x, pack, residual, relu):
        payload = pack.payload
        if _wants_grad(x, residual):
            # x and residual get gradients, as on the other backends; the pack is a constant, so conv2d reads its
            # weight back out of it
            from ...kernels.triton.conv_bn_act import unpack_weight

            weight = unpack_weight(payload.weight, x.shape[1], payload.kernel_h, payload.kernel_w)
            conv = torch.nn.functional.conv2d(x, weight, None, pack.stride, pack.padding)
            return self.bn_act(conv, payload.scale, payload.shift, residual, relu)
        return (_ops or _load()).conv_bn_act(x, payload.weight, payload.scale, payload.shift, residual,
                                             payload.kernel_h, payload.kernel_w, pack.stride, pack.padding, relu)

    def bind_conv(self, pack, input_shape, relu):
        op, payload, stride, padding = (_ops or _load()).conv_bn_act.default, pack.payload, pack.stride, pack.padding
        weight, scale, shift, kernel_h, kernel_w = payload
        return lambda x, residual: op(x, weight, scale, shift, residual, kernel_h, kernel_w, stride, padding, relu)

    def bn_act(self, x, scale, shift, residual, relu):
        return (_ops or _load()).bn_act(x, scale, shift, residual, relu)

    def add_relu(self, x, residual):
        return (_ops or _load()).add_relu(x, residual)

    def conv_batch_norm_stats(self, x, weight, bias, stride, padding, dilation, groups):
        # The kernel: square stride and padding, no dilation or groups, channels_last in (and out, as aten's conv
        # would give); anything else is aten's conv and the statistics kernel.
        if (groups != 1 or tuple(dilation) != (1, 1) or stride[0] != stride[1] or padding[0] != padding[1]
                or x.dtype != weight.dtype or not x.is_contiguous(memory_format=torch.channels_last)):
            return super().conv_batch_norm_stats(x, weight, bias, stride, padding, dilation, groups)
        from ...kernels.triton.conv_bn_act import pack_weight

        if bias is None:
            bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=x.device)
        return (_ops or _load()).conv_batch_norm_stats(x, pack_weight(weight), bias, int(weight.shape[2]),
                                                       int(weight.shape[3]), stride[0], padding[0])

    def batch_norm_stats(self, y):
        return (_ops or _load()).batch_norm_stats(y)

    def batch_norm_apply(self, y, mean, invstd, weight, bias, residual, relu):
        return (_ops or _load()).batch_norm_apply(y, mean, invstd, weight, bias, residual, relu)

    def batch_norm_backward(self, grad_out, y, mean, invstd, weight, bias, residual, relu):
        grad_y, grad_weight, grad_bias, grad_residual = (_ops or _load()).batch_norm_backward(
            grad_out, y, mean, invstd, weight, bias, residual, relu)
        return grad_y, None if weight is None else grad_weight, grad_bias, None if residual is None else grad_residual


register_backend(TritonBackend())
