"""aten.convolution_backward, and a differentiable aten.convolution, for the fused units, around a oneDNN fault on
the CPU.

On an AMD EPYC (Zen 3, AVX2; torch 2.14.1) aten.convolution_backward gives a wrong weight gradient (relative error
0.1-1) for an fp32 1x1 convolution of stride 2 over a channels_last input with 2-5 or 7 input channels, and may
corrupt the heap doing it (glibc then aborts: "malloc(): smallbin double linked list corrupted"); NCHW inputs, stride
1, 8 or more channels, bf16 and fp16 are right (and 6 was, in the probes: every count below 8 takes the way round).
The fused modules hand channels_last tensors on, so such a unit (a tiny model's projection shortcut) would reach it.
There a 1x1 convolution of stride s is computed as what it is, the stride-1 convolution of the subsampled input
x[:, :, ::s, ::s], whose input gradient goes back to those positions (0 elsewhere): the same sums, in a form oneDNN
computes right.

The same holds for the double backward of the convolution itself (a gradient penalty, create_graph=True): autograd's
backward of aten.convolution_backward for such a convolution gave weight gradients 1.5-7600% off (6 channels
included), and with one thread corrupted the heap (then glibc aborted, or the process hung). `convolution` is the
forward that the fused modules differentiate there, in the stride-1 form, whose first and second derivatives oneDNN
computes right.
"""

from __future__ import annotations

import torch

_FEW_CHANNELS = 8  # from here on oneDNN's kernels were right


def _strided_pointwise_with_few_channels(x, weight, stride, padding, dilation, transposed, groups) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not transposed and groups == 1
            and x.dim() == 4 and tuple(weight.shape[2:]) == (1, 1) and tuple(padding) == (0, 0)
            and tuple(dilation) == (1, 1) and tuple(stride) != (1, 1) and x.shape[1] < _FEW_CHANNELS)


def _subsampled(x, stride) -> torch.Tensor:
    """The input positions a 1x1 convolution of `stride` reads, as a dense channels_last tensor."""
    rows, cols = stride
    return x[:, :, ::rows, ::cols].contiguous(memory_format=torch.channels_last)


def convolution(x, weight, bias, stride, padding, dilation, groups) -> torch.Tensor:
    """aten.convolution(x, weight, bias, stride, padding, dilation, False, [0, 0], groups), differentiable to any
    order, in the stride-1 form where oneDNN's derivatives of the strided one are wrong."""
    if not _strided_pointwise_with_few_channels(x, weight, stride, padding, dilation, False, groups):
        return torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, False, [0, 0], groups)
    return torch.ops.aten.convolution(_subsampled(x, stride), weight, bias, [1, 1], padding, dilation, False, [0, 0],
                                      groups)


def convolution_backward(grad, x, weight, bias_sizes, stride, padding, dilation, transposed, output_padding, groups,
                         output_mask) -> tuple:
    """(dx, dW, d bias) as aten.convolution_backward computes them (same signature)."""
    if not _strided_pointwise_with_few_channels(x, weight, stride, padding, dilation, transposed, groups):
        return torch.ops.aten.convolution_backward(grad, x, weight, bias_sizes, stride, padding, dilation, transposed,
                                                   output_padding, groups, output_mask)
    grad_x_s, grad_w, grad_bias = torch.ops.aten.convolution_backward(
        grad, _subsampled(x, stride), weight, bias_sizes, [1, 1], padding, dilation, False, [0, 0], groups,
        output_mask)
    grad_x = None
    if grad_x_s is not None:
        rows, cols = stride
        grad_x = torch.zeros_like(x)
        grad_x[:, :, ::rows, ::cols] = grad_x_s
    return grad_x, grad_w, grad_bias
