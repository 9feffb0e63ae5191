"""Convolution output sizes, in one place for every Python caller (validation, fake kernels, fusion decisions).

    out = floor((size + 2 * padding - dilation * (kernel - 1) - 1) / stride) + 1
"""

from __future__ import annotations


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv_output_shape(input_shape, out_channels: int, kernel_size, stride, padding, dilation=(1, 1)) -> tuple:
    """(N, C_out, H_out, W_out) of a conv of an (N, C, H, W) input; sizes are ints or (h, w) pairs."""
    pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = map(pair, (kernel_size, stride, padding, dilation))
    return (input_shape[0], out_channels, conv_output_size(input_shape[2], kh, sh, ph, dh),
            conv_output_size(input_shape[3], kw, sw, pw, dw))
