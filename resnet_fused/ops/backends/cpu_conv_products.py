"""Convolutions of the "cpu" backend's training and frozen-BN units as matrix products (MKL through at::mm/bmm)
where oneDNN's (aten.convolution and convolution_backward) were measured slower with weights that change every
step; oneDNN everywhere else. (Inference convolves pre-packed weights: ops/backends/cpu.py.)

With g = dL/dy, P = N * Ho * Wo output positions, W read as (Co, kh, kw, Ci), x_s = x[:, :, ::s, ::s] for a 1x1
conv of stride s (padding 0), and rows(t) a (N, C, H, W) tensor as its (N * H * W, C) matrix (a view of a
channels_last tensor):

    channels_last:
        rows(y) = rows(x_s) W^T (+ bias)           (P, Co)        1x1
        dx[:, :, ::s, ::s] = rows(g) W, 0 elsewhere                1x1
        dW = rows(g)^T rows(x_s)                   (Co, Ci)       1x1
    NCHW (x[n] and g[n] are (C, H * W) matrices in place), where an image has enough output pixels:
        y[n] = W x_s[n] (+ bias)                   (Co, Ho * Wo)  1x1
        dx[n][:, ::s, ::s] = W^T g[n], 0 elsewhere                 1x1
    either layout, kh x kw, any stride and padding (weight only), where the output has few positions:
        dW = rows(g)^T im2col(x)                   (Co, kh * kw * Ci): W's channels_last layout
        im2col(x): (P, kh * kw * Ci), each output position's receptive field in x (zero padded), (kh, kw, Ci) order

Every product sums in fp32 over Ci (y), Co (dx) or P (dW), as oneDNN's kernels do; results agree with them to fp32
rounding. An NCHW 1x1 weight gradient stays with oneDNN: as a product it needs transposing copies of g and x, and
a resnet50 step measured no faster with them.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..conv_backward import convolution_backward
from .cpu_info import cpu_vendor

CL = torch.channels_last
NCHW = torch.contiguous_format


class GemmRule(NamedTuple):
    """Which parts of an fp32 convolution run as matrix products."""

    pointwise: bool            # 1x1 convolutions (padding 0): y, dx and (channels_last) dW
    min_nchw_pixels: int       # ... on NCHW tensors from this many output pixels per image
    max_im2col_rows: int       # other kernels: dW through im2col when the output has at most this many positions
    max_pointwise_rows: float = math.inf  # 1x1 on channels_last tensors: up to this many output positions


# Measured on 2 cores (Intel Xeon with AVX-512, fp32), each candidate beside oneDNN in one process, resnet50's shapes
# at batch 1 and 8, 128x128 and 224x224:
#   1x1 channels_last: y 0.9-1.8x faster (weights in the layout autograd trains them in, which oneDNN reorders per
#     call), in sum 73 -> 60 ms per resnet50 batch 8 128x128 forward; dW 1.0-6.6x faster (batch 1 and the late,
#     wide layers most: 2048 -> 512 at 7x7 batch 1 3.82 -> 0.58 ms); dx 0.9-2.4x (1024 -> 2048 stride 2 at 14x14
#     batch 8 17.0 -> 10.2 ms).
#   1x1 NCHW, batch 8 128x128: y and dx 1.0-6.2x faster from 8x8 pixels up (64 -> 256 at 32x32: y 7.67 -> 1.25 ms;
#     256 -> 64: dx 7.45 -> 1.25 ms), in sum 89 -> 54 ms (y) and 100 -> 62 ms (dx) per step; 0.6-0.9x at 4x4.
#   3x3 dW: im2col + one product 1.3-2.3x faster at 64-128 output positions with 128-512 channels (512 channels at
#     batch 2 8x8: 3.91 -> 2.22 ms), level at 512 positions, 1.5-2x slower from 2048 on.
#   AMD EPYC (Zen 4, AVX-512), the same way at batch 8 128x128, channels_last: MKL's products 0.8-0.9x oneDNN's speed
#     from 1024 output positions up (256 -> 128 at 32x32: y 2.48 -> 2.93 ms, dx 2.58 -> 2.97, dW 2.87 -> 3.29), level
#     at 512, 1.1-2.1x faster at 128 (1024 -> 2048 stride 2 at 8x8: y 5.75 -> 3.37, dW 6.58 -> 3.11; 2048 -> 512 at
#     4x4: y 2.87 -> 1.52, dW 3.01 -> 1.48); NCHW level (0.7-1.6x per conv, in sum 36.2 -> 31.0 ms y, 42.7 -> 41.7 dx).
GEMM_RULES = {"GenuineIntel": GemmRule(pointwise=True, min_nchw_pixels=64, max_im2col_rows=256),
              "AuthenticAMD": GemmRule(pointwise=True, min_nchw_pixels=64, max_im2col_rows=256, max_pointwise_rows=512)}
GEMM_RULE = GEMM_RULES.get(cpu_vendor(), GEMM_RULES["GenuineIntel"])


def _layout(x: torch.Tensor, weight: torch.Tensor, dilation, groups: int):
    """channels_last or NCHW where products may run (CPU, fp32, groups 1, no dilation, a dense layout), else None."""
    if not (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and groups == 1
            and tuple(dilation) == (1, 1)):
        return None
    if x.is_contiguous(memory_format=CL):
        return CL
    return NCHW if x.is_contiguous() else None


def _pointwise(layout, weight: torch.Tensor, padding, batch: int, out_pixels: int, rule: GemmRule) -> bool:
    if not (rule.pointwise and tuple(weight.shape[2:]) == (1, 1) and tuple(padding) == (0, 0)):
        return False
    return batch * out_pixels <= rule.max_pointwise_rows if layout == CL else out_pixels >= rule.min_nchw_pixels


def pointwise_conv(x, weight, bias, stride, padding, dilation, groups) -> Optional[torch.Tensor]:
    """aten.convolution(x, weight, bias, ...) as one product, in x's layout, or None where oneDNN runs it."""
    layout = _layout(x, weight, dilation, groups)
    if layout is None:
        return None
    x_s = x[:, :, ::stride[0], ::stride[1]]
    n, _, h_out, w_out = x_s.shape
    if not _pointwise(layout, weight, padding, n, h_out * w_out, GEMM_RULE):
        return None
    c_out = weight.shape[0]
    weight = weight.reshape(c_out, -1)
    if layout == CL:
        rows = torch.mm(_rows(x_s), weight.t()) if bias is None else torch.addmm(bias, _rows(x_s), weight.t())
        return rows.view(n, h_out, w_out, c_out).permute(0, 3, 1, 2)
    weights, images = weight.expand(n, *weight.shape), x_s.reshape(n, x.shape[1], h_out * w_out)
    y = torch.bmm(weights, images) if bias is None else torch.baddbmm(bias.view(1, c_out, 1), weights, images)
    return y.view(n, c_out, h_out, w_out)


def gemm_plan(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, padding, dilation, groups: int,
              output_mask, rule: Optional[GemmRule] = None) -> Optional[tuple]:
    """(dx as product, dW as product) for this convolution's backward under `rule` (GEMM_RULE if None), or None
    where oneDNN runs all of it."""
    rule = GEMM_RULE if rule is None else rule
    layout = _layout(x, weight, dilation, groups)
    if layout is None or grad.dtype != x.dtype or not grad.is_contiguous(memory_format=layout):
        return None
    one_by_one = tuple(weight.shape[2:]) == (1, 1) and tuple(padding) == (0, 0)
    pointwise = _pointwise(layout, weight, padding, grad.shape[0], grad.shape[2] * grad.shape[3], rule)
    rows = grad.shape[0] * grad.shape[2] * grad.shape[3]
    dx = bool(output_mask[0]) and pointwise
    dw = bool(output_mask[1]) and ((pointwise and layout == CL) or (not one_by_one and rows <= rule.max_im2col_rows))
    return (dx, dw) if dx or dw else None


def conv_backward(grad, x, weight, bias_sizes, stride, padding, dilation, transposed, output_padding, groups,
                  output_mask):
    """aten.convolution_backward's signature and results: (dx, dW, d bias), each None where not asked for."""
    plan = None if transposed else gemm_plan(grad, x, weight, padding, dilation, groups, output_mask)
    if plan is None:
        return convolution_backward(grad, x, weight, bias_sizes, stride, padding, dilation, transposed, output_padding,
                                    groups, output_mask)
    by_gemm_x, by_gemm_w = plan
    rest = [output_mask[0] and not by_gemm_x, output_mask[1] and not by_gemm_w, False]
    grad_x, grad_w, _ = convolution_backward(
        grad, x, weight, None, stride, padding, dilation, False, [0, 0], 1, rest) if any(rest) else (None, None, None)
    if by_gemm_x:
        grad_x = _pointwise_grad_input(grad, x, weight, stride)
    if by_gemm_w:
        grad_w = _grad_weight(grad, x, weight, stride, padding)
    grad_bias = grad.sum(dim=(0, 2, 3)) if output_mask[2] else None
    return grad_x, grad_w, grad_bias


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _pointwise_grad_input(grad, x, weight, stride):
    n, c_out, h_out, w_out = grad.shape
    weight = weight.reshape(c_out, -1)
    if x.is_contiguous(memory_format=CL):
        products = torch.mm(_rows(grad), weight).view(n, h_out, w_out, -1).permute(0, 3, 1, 2)
    else:
        products = torch.bmm(weight.t().expand(n, *weight.t().shape), grad.reshape(n, c_out, h_out * w_out))
        products = products.view(n, -1, h_out, w_out)
    if tuple(stride) == (1, 1):
        return products
    grad_x = torch.zeros_like(x)
    grad_x[:, :, ::stride[0], ::stride[1]] = products
    return grad_x


def _im2col(x: torch.Tensor, kernel_size: tuple, stride, padding, out_hw: tuple) -> torch.Tensor:
    kh, kw = kernel_size
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, padding[1], padding[1], padding[0], padding[0]))
    n_stride, h_stride, w_stride, c_stride = padded.stride()
    windows = padded.as_strided((x.shape[0], out_hw[0], out_hw[1], kh, kw, x.shape[1]),
                                (n_stride, h_stride * stride[0], w_stride * stride[1], h_stride, w_stride, c_stride))
    return windows.reshape(-1, kh * kw * x.shape[1])


def _grad_weight(grad, x, weight, stride, padding):
    c_out, _, kh, kw = weight.shape
    if (kh, kw) == (1, 1) and tuple(padding) == (0, 0):  # channels_last only (gemm_plan)
        return torch.mm(_rows(grad).t(), _rows(x[:, :, ::stride[0], ::stride[1]])).view(c_out, -1, 1, 1)
    columns = _im2col(x, (kh, kw), stride, padding, grad.shape[2:])
    grad_w = torch.mm(_rows(grad).t(), columns).view(c_out, kh, kw, -1).permute(0, 3, 1, 2)
    # in the weight's own layout, so that autograd accumulates it without another copy
    return grad_w.contiguous(memory_format=CL if weight.is_contiguous(memory_format=CL) else torch.contiguous_format)
