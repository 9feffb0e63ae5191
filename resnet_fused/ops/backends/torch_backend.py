"""The "torch" backend: the fused ops as a plain PyTorch composition.

    conv_bn_act: y = conv2d(x, weight, stride, padding) * scale[c] + shift[c] (+ residual), then max(y, 0) if relu
    bn_act:      y = x * scale[c] + shift[c] (+ residual), then max(y, 0) if relu
    add_relu:    y = max(x + residual, 0)

It is the oracle every test compares against (called on fp32 inputs) and the fallback that works everywhere,
with autograd. The convolution runs in the input dtype (cuDNN/oneDNN accumulate in fp32); the epilogue runs in
fp32 and rounds once to the input dtype, as the fused kernels do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import Backend, register_backend


def _epilogue(y, scale, shift, residual, relu: bool, out_dtype):
    y = y.float() * scale.float().view(1, -1, 1, 1) + shift.float().view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual.float()
    if relu:
        y = torch.relu(y)
    return y.to(out_dtype).contiguous(memory_format=torch.channels_last)


class TorchBackend(Backend):
    name = "torch"

    def unavailable_reason(self, device):
        return None

    def conv_bn_act_packed(self, x, pack, residual, relu):
        weight, scale, shift = pack.payload
        y = F.conv2d(x.contiguous(memory_format=torch.channels_last), weight, None, pack.stride, pack.padding)
        return _epilogue(y, scale, shift, residual, relu, x.dtype)

    def bn_act(self, x, scale, shift, residual, relu):
        return _epilogue(x, scale, shift, residual, relu, x.dtype)

    def add_relu(self, x, residual):
        return torch.relu(x.float() + residual.float()).to(x.dtype).contiguous(memory_format=torch.channels_last)


register_backend(TorchBackend())
