"""The "cpu" backend: the C++ extension's CPU kernels (csrc/cpu): oneDNN convolution with the BN fold in the
weight and the epilogue as oneDNN post-ops.

    y = act(conv2d(x, weight * scale[c], stride, padding) + shift[c] (+ residual))

Its pack is the folded weight w * scale[c] (channels_last) and the folded shift as the conv bias, both in the
convolution's dtype (x's, or fp32 for bf16/fp16 on a CPU without native kernels for them), run by the internal op
conv_bias_act: nothing is re-laid-out per call.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..registry import register_backend
from ..validation import SUPPORTED_DTYPES
from .extension import EXTENSION_REASON, ExtensionBackend


def _onednn_reason() -> Optional[str]:
    """None if torch has oneDNN, which the convolution runs on."""
    if not torch.backends.mkldnn.is_available():
        return "torch was built without oneDNN (mkldnn), which the cpu backend's convolution runs on"
    return None


def onednn_conv_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the cpu backend convolves `dtype` inputs in: their own where this CPU convolves them in hardware
    (bf16: AVX512-BF16 or AMX-BF16; fp16: AVX512-FP16 or AMX-FP16), else fp32, rounding the output once. The C++
    kernels decide (csrc/cpu/conv_dtype.cpp); the pack folds into the same dtype once."""
    from ... import _C

    return _C.cpu_conv_dtype(dtype)


_ONEDNN_REASON = _onednn_reason()
_CONV_DTYPE = {dtype: onednn_conv_dtype(dtype) for dtype in SUPPORTED_DTYPES} \
    if _ONEDNN_REASON is None and EXTENSION_REASON["CPU"] is None else {}


class CpuConvPack(NamedTuple):
    """The BN fold applied once: weight * scale[c] (x's dtype, channels_last) and bias = shift (x's dtype).

    `onednn_weights` holds the same weight reordered into oneDNN's blocked layout (opaque mkldnn tensors), one
    per input shape, made on first use: without it oneDNN reorders the weight on every call, which dominates
    small-spatial layers (batch 1, late stages). The layout depends on the input shape: one chosen without it was
    measured 10-20x slower on some 1x1 convs at 14x14. Autograd and torch.compile take `weight` instead.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    onednn_weights: dict


_ONEDNN_SHAPES_PER_PACK = 4  # distinct input shapes kept per pack (bounds memory when shapes vary)


def _onednn_weight(pack, input_shape) -> torch.Tensor:
    """The pack's weight in oneDNN's layout for inputs of `input_shape`, reordered once per shape."""
    payload = pack.payload
    key = tuple(input_shape)
    weight = payload.onednn_weights.get(key)
    if weight is None:
        if len(payload.onednn_weights) >= _ONEDNN_SHAPES_PER_PACK:
            payload.onednn_weights.clear()
        weight = torch.ops.mkldnn._reorder_convolution_weight(payload.weight.contiguous(), [pack.padding] * 2,
                                                              [pack.stride] * 2, [1, 1], 1, list(key))
        payload.onednn_weights[key] = weight
    return weight


class CpuBackend(ExtensionBackend):
    name = "cpu"
    device_type = "cpu"
    dispatch_key = "CPU"

    def unsupported_reason(self, x, weight):
        # The elementwise kernels take every supported dtype; only the convolution depends on oneDNN.
        return super().unsupported_reason(x, weight) or (_ONEDNN_REASON if weight is not None else None)

    @torch.no_grad()
    def pack_conv(self, weight, scale, shift, stride, padding):
        dtype = _CONV_DTYPE[weight.dtype]  # fp32 for bf16/fp16 where this CPU has no native kernel
        folded = (weight.float() * scale.float().view(-1, 1, 1, 1)).to(dtype)
        return CpuConvPack(folded.contiguous(memory_format=torch.channels_last), shift.detach().to(dtype).contiguous(),
                           {})

    def conv_bn_act_packed(self, x, pack, residual, relu):
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and x.requires_grad):
            weight = pack.payload.weight
        else:
            weight = _onednn_weight(pack, x.shape)
        return torch.ops.resnet_fused.conv_bias_act.default(x, weight, pack.payload.bias, residual, pack.stride,
                                                            pack.padding, relu)

    def bind_conv(self, pack, input_shape, relu):
        op, weight, bias = torch.ops.resnet_fused.conv_bias_act.default, _onednn_weight(pack, input_shape), \
            pack.payload.bias
        stride, padding = pack.stride, pack.padding
        return lambda x, residual: op(x, weight, bias, residual, stride, padding, relu)


register_backend(CpuBackend())
