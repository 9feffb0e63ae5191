"""The "cuda" backend: the C++ extension's CUDA kernels (csrc/cuda), resnet_fused::conv_bn_act on CUDA tensors.

    y = act(conv2d(x, weight, stride, padding) * scale[c] + shift[c] (+ residual))

Its pack is (weight in channels_last, fp32 scale, fp32 shift). The op runs CUTLASS's TMA + wgmma kernels on compute
capability 9.0 where the extension was built with them (csrc/cuda/sm90), else the WMMA kernel; `kernel_path`
says which.
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


def conv_kernel_path(capability: tuple[int, int], sm90_built: bool) -> str:
    """Which kernels the "cuda" backend's conv runs on a GPU of `capability`: "sm90: ..." (CUTLASS, TMA + wgmma,
    csrc/cuda/sm90) or "sm80: ..." (the portable WMMA kernel), with why. On sm90 the calls TMA cannot address
    (C_in or C_out not a multiple of 16 bytes, such as the 7x7 stem's C_in=3; misaligned tensors) still run on the
    WMMA kernel: resnet_fused._C.cuda_conv_plan says so per call."""
    if sm90_built and tuple(capability) == (9, 0):
        return "sm90: CUTLASS implicit GEMM (TMA + wgmma, fused epilogue); WMMA where TMA cannot address the call"
    if not sm90_built:
        return "sm80: WMMA implicit GEMM (the extension was built without the sm_90a CUTLASS kernels)"
    return f"sm80: WMMA implicit GEMM (the CUTLASS kernels need compute capability 9.0, this GPU has " \
           f"{capability[0]}.{capability[1]})"


class CudaBackend(ExtensionBackend):
    name = "cuda"
    device_type = "cuda"
    dispatch_key = "CUDA"

    def unavailable_reason(self, device):
        reason = super().unavailable_reason(device)
        if reason is None and not torch.cuda.is_available():
            return "no CUDA device is available"
        return reason or _capability_reason(torch.device(device).index)

    def kernel_path(self, device) -> str:
        """Which conv kernels run on `device` (see conv_kernel_path); the reason instead where none can."""
        reason = self.unavailable_reason(device)
        if reason is not None:
            return f"unavailable: {reason}"
        from ... import _C

        return conv_kernel_path(torch.cuda.get_device_capability(torch.device(device)),
                                getattr(_C, "cuda_sm90_built", False))

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
