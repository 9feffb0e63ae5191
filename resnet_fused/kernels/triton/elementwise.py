"""The conv-free epilogues as vectorized elementwise Triton kernels over channels_last (NHWC) data.

    bn_act:   y[i] = act( x[i] * scale[c] + shift[c]  (+ residual[i]) ),  c = i % C,  act = ReLU or identity
    add_relu: y[i] = max(x[i] + residual[i], 0)

i runs over the N*H*W*C elements of the NHWC buffer, so the channel of element i is i % C. Arithmetic is fp32
and rounds once to the output dtype (x's). Offsets are 64-bit when the tensor has 2^31 elements or more.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import device_guard, relu_keep_nan

_INT32_LIMIT = 2**31 - 1
_BLOCK = 1024
_WARPS = 4


@triton.jit
def _offsets(BLOCK: tl.constexpr, INDEX_64: tl.constexpr):
    pid = tl.program_id(0)
    if INDEX_64:
        pid = pid.to(tl.int64)
    return pid * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _bn_act_kernel(x_ptr, scale_ptr, shift_ptr, res_ptr, y_ptr, total, C,
                   HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, INDEX_64: tl.constexpr, BLOCK: tl.constexpr):
    offs = _offsets(BLOCK, INDEX_64)
    mask = offs < total
    channel = offs % C
    out = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out = out * tl.load(scale_ptr + channel, mask=mask, other=0.0) + tl.load(shift_ptr + channel, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        out += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        out = relu_keep_nan(out)
    tl.store(y_ptr + offs, out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_relu_kernel(x_ptr, res_ptr, y_ptr, total, INDEX_64: tl.constexpr, BLOCK: tl.constexpr):
    offs = _offsets(BLOCK, INDEX_64)
    mask = offs < total
    out = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, relu_keep_nan(out).to(y_ptr.dtype.element_ty), mask=mask)


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _empty_output(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)

def _launch_args(y: torch.Tensor, index_64):
    total = y.numel()
    return (triton.cdiv(total, _BLOCK),), total, (total > _INT32_LIMIT if index_64 is None else index_64)


def bn_act(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, residual, relu: bool,
           index_64=None) -> torch.Tensor:
    """x (N, C, H, W) in any layout -> channels_last y of x's dtype. scale, shift: length-C float vectors;
    residual: None or x's shape and dtype (checked by the caller)."""
    x = _channels_last(x)
    y = _empty_output(x)
    if y.numel() == 0:
        return y
    residual = None if residual is None else _channels_last(residual)
    grid, total, index_64 = _launch_args(y, index_64)
    with device_guard(x):
        _bn_act_kernel[grid](x, scale.float().contiguous(), shift.float().contiguous(),
                             residual if residual is not None else x, y, total, x.shape[1],
                             HAS_RESIDUAL=residual is not None, RELU=relu, INDEX_64=index_64, BLOCK=_BLOCK,
                             num_warps=_WARPS)
    return y


def add_relu(x: torch.Tensor, residual: torch.Tensor, index_64=None) -> torch.Tensor:
    """relu(x + residual) for two (N, C, H, W) tensors of one shape and dtype, any layout -> channels_last y."""
    x = _channels_last(x)
    y = _empty_output(x)
    if y.numel() == 0:
        return y
    grid, total, index_64 = _launch_args(y, index_64)
    with device_guard(x):
        _add_relu_kernel[grid](x, _channels_last(residual), y, total, INDEX_64=index_64, BLOCK=_BLOCK,
                               num_warps=_WARPS)
    return y
