"""What the "cpu" and "cuda" backends share: loading the C++ extension (torch.ops.resnet_fused.*), and running
the public ops as its ops.

    conv_bn_act: y = conv2d(x, weight, stride, padding) * scale[c] + shift[c] (+ residual), ReLU if relu
    bn_act:      y = x * scale[c] + shift[c] (+ residual), ReLU if relu
    add_relu:    y = max(x + residual, 0)
    batch_norm_stats / batch_norm_apply / batch_norm_backward: training BatchNorm's passes
                 (ops/batch_norm_reference.py), where the extension has kernels for them on the backend's device
"""

from __future__ import annotations

from typing import Optional

import torch

from ... import _extension
from ..registry import Backend
from ..validation import SUPPORTED_DTYPES
from . import extension_library


def _extension_reason(dispatch_key: str) -> Optional[str]:
    """None if the extension loaded and has `dispatch_key` kernels for the public ops, else why not."""
    error = _extension.load()
    if error is not None:
        return error
    extension_library.register()
    if not all(_extension.has_kernel(op, dispatch_key) for op in ("conv_bn_act", "bn_act", "add_relu")):
        if dispatch_key == "CUDA":
            return "the extension was built without CUDA"
        return f"the extension has no {dispatch_key} kernels"
    from ... import _C

    if dispatch_key == "CPU" and not (_extension.has_kernel("conv_bias_act", "CPU") and hasattr(_C, "cpu_conv_dtype")):
        return "the extension is out of date (no resnet_fused::conv_bias_act or _C.cpu_conv_dtype); rebuild it " \
               "with `pip install --no-build-isolation -e .`"
    return None


# Computed once at import (the package loads the extension first): a plain dict, so that resolving a backend
# costs a lookup and torch.compile traces it as a constant.
EXTENSION_REASON = {key: _extension_reason(key) for key in ("CPU", "CUDA")}
_BATCH_NORM_OPS = ("batch_norm_stats", "batch_norm_apply", "batch_norm_backward")
# Whether the extension has the training BatchNorm kernels for a dispatch key (an older build may not: the
# reference's plain torch then runs them).
HAS_BATCH_NORM_KERNELS = {key: EXTENSION_REASON[key] is None and all(_extension.has_kernel(op, key)
                                                                     for op in _BATCH_NORM_OPS)
                          for key in ("CPU", "CUDA")}


class ExtensionBackend(Backend):
    """A backend whose ops are the extension's kernels for one device type."""

    device_type = "?"
    dispatch_key = "?"

    def unavailable_reason(self, device):
        device = torch.device(device)
        if device.type != self.device_type:
            return f"the {self.name!r} backend runs on {self.device_type} tensors, not {device.type}"
        return EXTENSION_REASON[self.dispatch_key]

    def unsupported_reason(self, x, weight):
        if x.dtype not in SUPPORTED_DTYPES:
            return f"no kernel for {x.dtype}"
        return None

    def conv_bn_act(self, x, weight, scale, shift, residual, stride, padding, relu):
        # The public op, with autograd for x, weight, scale, shift and residual (a pack would be detached).
        return torch.ops.resnet_fused.conv_bn_act.default(x, weight, scale.float(), shift.float(), residual, stride,
                                                          padding, relu)

    def bn_act(self, x, scale, shift, residual, relu):
        return torch.ops.resnet_fused.bn_act.default(x, scale, shift, residual, relu)

    def add_relu(self, x, residual):
        return torch.ops.resnet_fused.add_relu.default(x, residual)

    def batch_norm_stats(self, y):
        if not HAS_BATCH_NORM_KERNELS[self.dispatch_key]:
            return super().batch_norm_stats(y)
        return torch.ops.resnet_fused.batch_norm_stats.default(y)

    def batch_norm_apply(self, y, mean, invstd, weight, bias, residual, relu):
        if not HAS_BATCH_NORM_KERNELS[self.dispatch_key]:
            return super().batch_norm_apply(y, mean, invstd, weight, bias, residual, relu)
        return torch.ops.resnet_fused.batch_norm_apply.default(y, mean, invstd, weight, bias, residual, relu)

    def batch_norm_backward(self, grad_out, y, mean, invstd, weight, bias, residual, relu):
        # The kernels read grad_out in y's dtype (autograd hands it so); another dtype runs the reference, which
        # widens it without rounding it first.
        if not HAS_BATCH_NORM_KERNELS[self.dispatch_key] or grad_out.dtype != y.dtype:
            return super().batch_norm_backward(grad_out, y, mean, invstd, weight, bias, residual, relu)
        grad_y, grad_weight, grad_bias, grad_residual = torch.ops.resnet_fused.batch_norm_backward.default(
            grad_out, y, mean, invstd, weight, bias, residual, relu)
        return (grad_y, None if weight is None else grad_weight, grad_bias,
                None if residual is None else grad_residual)
