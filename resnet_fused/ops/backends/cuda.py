"""The "cuda" backend: the C++ extension's CUDA kernels (csrc/cuda), resnet_fused::conv_bn_act on CUDA tensors.

    y = act(conv2d(x, weight, stride, padding) * scale[c] + shift[c] (+ residual))

Its pack is (weight in channels_last, fp32 scale, fp32 shift).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from ..registry import register_backend
from .extension import ExtensionBackend


@functools.lru_cache(maxsize=None)
def _capability_reason(index: Optional[int]) -> Optional[str]:
    """The CUDA kernels use cp.async and bf16 tensor cores: compute capability 8.0 (Ampere) or newer."""
    major, minor = torch.cuda.get_device_capability(index)
    if major < 8:
        return f"the cuda kernels need compute capability 8.0 or newer, this GPU has {major}.{minor}"
    return None


class CudaBackend(ExtensionBackend):
    name = "cuda"
    device_type = "cuda"
    dispatch_key = "CUDA"

    def unavailable_reason(self, device):
        reason = super().unavailable_reason(device)
        if reason is None and not torch.cuda.is_available():
            return "no CUDA device is available"
        return reason or _capability_reason(torch.device(device).index)

    @torch.no_grad()
    def pack_conv(self, weight, scale, shift, stride, padding):
        return (weight.contiguous(memory_format=torch.channels_last), scale.float().contiguous(),
                shift.float().contiguous())

    def conv_bn_act_packed(self, x, pack, residual, relu):
        weight, scale, shift = pack.payload
        return torch.ops.resnet_fused.conv_bn_act.default(x, weight, scale, shift, residual, pack.stride,
                                                          pack.padding, relu)

    def bind_conv(self, pack, input_shape, relu):
        op, (weight, scale, shift), stride, padding = torch.ops.resnet_fused.conv_bn_act.default, pack.payload, \
            pack.stride, pack.padding
        return lambda x, residual: op(x, weight, scale, shift, residual, stride, padding, relu)


register_backend(CudaBackend())
