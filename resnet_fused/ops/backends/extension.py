"""The "cpu" and "cuda" backends: the fused ops as the C++ extension's kernels, torch.ops.resnet_fused.*.

    conv_bn_act: y = conv2d(x, weight, stride, padding) * scale[c] + shift[c] (+ residual), ReLU if relu
    bn_act:      y = x * scale[c] + shift[c] (+ residual), ReLU if relu
    add_relu:    y = max(x + residual, 0)

"cpu" (csrc/cpu): oneDNN convolution with the BN fold in the weight and the epilogue as oneDNN post-ops. Its pack
is the folded weight w * scale[c] (channels_last) and the folded shift as the conv bias, both in the convolution's
dtype (x's, or fp32 for bf16/fp16 on a CPU without native kernels for them), run by the internal op conv_bias_act:
nothing is re-laid-out per call.
"cuda" (csrc/cuda): its pack is (weight in channels_last, fp32 scale, fp32 shift) for resnet_fused::conv_bn_act.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch

from ... import _extension
from ..registry import Backend, register_backend
from ..validation import SUPPORTED_DTYPES

CL = torch.channels_last


def _extension_reason(dispatch_key: str) -> Optional[str]:
    """None if the extension loaded and has `dispatch_key` kernels for the public ops, else why not."""
    error = _extension.load()
    if error is not None:
        return error
    from .. import extension_ops

    extension_ops.register()
    if not all(_extension.has_kernel(op, dispatch_key) for op in ("conv_bn_act", "bn_act", "add_relu")):
        if dispatch_key == "CUDA":
            return "the extension was built without CUDA"
        return f"the extension has no {dispatch_key} kernels"
    from ... import _C

    if dispatch_key == "CPU" and not (_extension.has_kernel("conv_bias_act", "CPU") and hasattr(_C, "cpu_conv_dtype")):
        return "the extension is out of date (no resnet_fused::conv_bias_act or _C.cpu_conv_dtype); rebuild it " \
               "with `pip install --no-build-isolation -e .`"
    return None


def _onednn_reason() -> Optional[str]:
    """None if torch has oneDNN, which the cpu backend's convolution runs on."""
    if not torch.backends.mkldnn.is_available():
        return "torch was built without oneDNN (mkldnn), which the cpu backend's convolution runs on"
    return None


def onednn_conv_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the cpu backend convolves `dtype` inputs in: their own where this CPU convolves them in hardware
    (bf16: AVX512-BF16 or AMX-BF16; fp16: AVX512-FP16 or AMX-FP16), else fp32, rounding the output once. The C++
    kernels decide (csrc/cpu/conv_dtype.cpp); the pack folds into the same dtype once."""
    from ... import _C

    return _C.cpu_conv_dtype(dtype)


# Computed once at import (the package loads the extension first): plain dicts, so that resolving a backend costs
# a lookup and torch.compile traces it as a constant.
_EXTENSION_REASON = {key: _extension_reason(key) for key in ("CPU", "CUDA")}
_ONEDNN_REASON = _onednn_reason()
_CONV_DTYPE = {dtype: onednn_conv_dtype(dtype) for dtype in SUPPORTED_DTYPES} \
    if _ONEDNN_REASON is None and _EXTENSION_REASON["CPU"] is None else {}


@functools.lru_cache(maxsize=None)
def _capability_reason(index: Optional[int]) -> Optional[str]:
    """The CUDA kernels use cp.async and bf16 tensor cores: compute capability 8.0 (Ampere) or newer."""
    major, minor = torch.cuda.get_device_capability(index)
    if major < 8:
        return f"the cuda kernels need compute capability 8.0 or newer, this GPU has {major}.{minor}"
    return None


class CpuConvPack(NamedTuple):
    """The BN fold applied once: weight * scale[c] (x's dtype, channels_last) and bias = shift (x's dtype).

    `onednn_weights` holds the same weight reordered into oneDNN's blocked layout (opaque mkldnn tensors), one
    per input shape, made on first use (or, for convs that run as Winograd, its transform): without it oneDNN reorders the weight on every call, which dominates
    small-spatial layers (batch 1, late stages). The layout depends on the input shape: one chosen without it was
    measured 10-20x slower on some 1x1 convs at 14x14. Autograd and torch.compile take `weight` instead.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    onednn_weights: dict


class CpuUnfoldedPack(NamedTuple):
    """The pack of a fold that is not finite (an infinite or NaN scale, or w * scale overflowing the convolution's
    dtype): folded, an infinite scale would put inf into the weight and give NaN across its channel where eager
    gives +-inf. It runs as the public conv_bn_act, which convolves the unfolded weight and applies scale, shift,
    residual and ReLU after it, as eager does."""

    weight: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor


_ONEDNN_SHAPES_PER_PACK = 4  # distinct input shapes kept per pack (bounds memory when shapes vary)
# fp32 3x3 convs with stride 1 and padding 1 run as Winograd F(4x4, 3x3) (csrc/cpu/winograd.cpp) from this many
# output pixels per image up: measured on 2 EPYC cores (1 thread, resnet50's shapes, fp32), 1.7-2.3x faster than
# oneDNN's direct convolution at 56x56 and 28x28, 1.6x at 14x14 (batch 1 and 8), 2.4x slower at 7x7 (its four tiles
# per image leave the GEMMs too short).
_WINOGRAD_MIN_TILES = 48


def _runs_winograd(pack: CpuConvPack, x: torch.Tensor, stride: int, padding: int) -> bool:
    tiles = x.shape[0] * -(-x.shape[2] // 4) * -(-x.shape[3] // 4)
    return (stride == 1 and padding == 1 and pack.weight.dtype == torch.float32 and x.dtype == torch.float32
            and pack.weight.shape[2:] == (3, 3) and tiles >= _WINOGRAD_MIN_TILES)


def _onednn_weight(pack: CpuConvPack, x: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
    """The weight prepared for this input shape: oneDNN's blocked layout (an mkldnn tensor), or for a Winograd conv
    the transformed weight (a dense (36, C_in, C_out) tensor, one per pack, shared by its input shapes)."""
    key = (tuple(x.shape), x.dtype, stride, padding)
    weight = pack.onednn_weights.get(key)
    if weight is None:
        cached = pack.onednn_weights.values()
        if _runs_winograd(pack, x, stride, padding):
            weight = next((w for w in cached if not w.is_mkldnn), None)
            if weight is None:
                weight = torch.ops.resnet_fused.winograd_weight.default(pack.weight)
        else:
            weight = torch.ops.mkldnn._reorder_convolution_weight(pack.weight.contiguous(), [padding] * 2,
                                                                  [stride] * 2, [1, 1], 1, list(x.shape))
        if len(pack.onednn_weights) >= _ONEDNN_SHAPES_PER_PACK:
            pack.onednn_weights.clear()
        pack.onednn_weights[key] = weight
    return weight


class _ExtensionBackend(Backend):
    device_type = "?"
    dispatch_key = "?"

    def unavailable_reason(self, device):
        device = torch.device(device)
        if device.type != self.device_type:
            return f"the {self.name!r} backend runs on {self.device_type} tensors, not {device.type}"
        return _EXTENSION_REASON[self.dispatch_key]

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


class CpuBackend(_ExtensionBackend):
    name = "cpu"
    device_type = "cpu"
    dispatch_key = "CPU"

    def unsupported_reason(self, x, weight):
        # The elementwise kernels take every supported dtype; only the convolution depends on oneDNN.
        return super().unsupported_reason(x, weight) or (_ONEDNN_REASON if weight is not None else None)

    @torch.no_grad()
    def pack_conv(self, weight, scale, shift):
        dtype = _CONV_DTYPE[weight.dtype]  # fp32 for bf16/fp16 where this CPU has no native kernel
        folded = (weight.float() * scale.float().view(-1, 1, 1, 1)).to(dtype)
        if not torch.isfinite(folded).all():
            return CpuUnfoldedPack(weight.contiguous(memory_format=CL), scale.float().contiguous(),
                                   shift.float().contiguous())
        return CpuConvPack(folded.contiguous(memory_format=CL), shift.detach().to(dtype).contiguous(), {})

    def conv_bn_act_packed(self, x, pack, residual, stride, padding, relu):
        if isinstance(pack, CpuUnfoldedPack):
            return torch.ops.resnet_fused.conv_bn_act.default(x, *pack, residual, stride, padding, relu)
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and x.requires_grad):
            weight = pack.weight
        else:
            weight = _onednn_weight(pack, x, stride, padding)
            if not weight.is_mkldnn:
                return torch.ops.resnet_fused.conv3x3_winograd.default(x, weight, pack.bias, residual, relu)
        return torch.ops.resnet_fused.conv_bias_act.default(x, weight, pack.bias, residual, stride, padding, relu)


class CudaBackend(_ExtensionBackend):
    name = "cuda"
    device_type = "cuda"
    dispatch_key = "CUDA"

    def unavailable_reason(self, device):
        reason = super().unavailable_reason(device)
        if reason is None and not torch.cuda.is_available():
            return "no CUDA device is available"
        return reason or _capability_reason(torch.device(device).index)

    @torch.no_grad()
    def pack_conv(self, weight, scale, shift):
        return (weight.contiguous(memory_format=CL), scale.float().contiguous(), shift.float().contiguous())

    def conv_bn_act_packed(self, x, pack, residual, stride, padding, relu):
        weight, scale, shift = pack
        return torch.ops.resnet_fused.conv_bn_act.default(x, weight, scale, shift, residual, stride, padding, relu)


register_backend(CpuBackend())
register_backend(CudaBackend())
