"""One conv layer, three ways: eager modules (conv -> BN -> [+ residual] -> [ReLU]), cuDNN's own fused ops on
the folded weight, and the fused op.

Used by `profile` (per-layer speedups), the benchmarks (per-conv suites) and the GPU pass.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .. import ops
from ..packed_conv import PackedConvBN
from .layers import ConvLayer


class EagerConvBNAct(nn.Module):
    """What eager ResNet runs for one conv: separate conv, BN, add and ReLU kernels (in place, as eager does)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool):
        super().__init__()
        self.conv, self.bn, self.relu = conv, bn, relu

    def forward(self, x, residual: Optional[torch.Tensor] = None):
        y = self.bn(self.conv(x))
        if residual is not None:
            y += residual
        return torch.relu_(y) if self.relu else y


class CudnnConvBNAct(nn.Module):
    """The same layer as cuDNN's fused inference ops on the BN-folded weight (GPU): conv + bias + ReLU
    (torch.cudnn_convolution_relu), conv + bias + residual + ReLU (torch.cudnn_convolution_add_relu). cuDNN has
    no such op without the ReLU: there F.conv2d with the folded bias (a downsample's conv + BN)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool):
        super().__init__()
        scale, shift = ops.fold_bn(conv, bn)
        weight = conv.weight.detach().float() * scale.view(-1, 1, 1, 1)
        self.register_buffer("weight", weight.to(conv.weight.dtype).contiguous(memory_format=torch.channels_last))
        self.register_buffer("bias", shift.to(conv.weight.dtype))
        self.relu = relu
        self.conv_args = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)

    def forward(self, x, residual: Optional[torch.Tensor] = None):
        if not self.relu:
            y = nn.functional.conv2d(x, self.weight, self.bias, *self.conv_args)
            return y if residual is None else y + residual
        if residual is not None:
            return torch.cudnn_convolution_add_relu(x, self.weight, residual, 1.0, self.bias, *self.conv_args)
        return torch.cudnn_convolution_relu(x, self.weight, self.bias, *self.conv_args)


def conv_and_bn(model: nn.Module, layer: ConvLayer) -> Tuple[nn.Conv2d, nn.BatchNorm2d]:
    """The conv named by `layer` in `model` and the BatchNorm that follows it (conv1 -> bn1, downsample.0 -> .1)."""
    parent_name, _, leaf = layer.name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if leaf.isdigit():  # a downsample Sequential(conv, bn)
        return parent[int(leaf)], parent[int(leaf) + 1]
    return getattr(parent, leaf), getattr(parent, "bn" + leaf[len("conv"):])


def random_conv_bn(layer: ConvLayer, device, dtype, seed: int = 0) -> Tuple[nn.Conv2d, nn.BatchNorm2d]:
    """Fresh eval modules of the layer's shape with non-trivial BN statistics (so folding is exercised)."""
    generator = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(layer.cin, layer.cout, layer.kernel, layer.stride, layer.padding, groups=layer.groups,
                     bias=False)
    bn = nn.BatchNorm2d(layer.cout)
    with torch.no_grad():
        fan_in = layer.cin // layer.groups * layer.kernel**2
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) / fan_in**0.5)
        bn.weight.copy_(torch.rand(layer.cout, generator=generator) + 0.5)
        bn.bias.copy_(torch.randn(layer.cout, generator=generator) * 0.1)
        bn.running_mean.copy_(torch.randn(layer.cout, generator=generator) * 0.1)
        bn.running_var.copy_(torch.rand(layer.cout, generator=generator) + 0.5)
    conv, bn = (m.eval().to(device=device, dtype=dtype, memory_format=torch.channels_last) for m in (conv, bn))
    return conv, bn


def layer_inputs(layer: ConvLayer, batch: int, device, dtype, seed: int = 0):
    """(x, residual or None) for the layer, channels_last."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, layer.cin, layer.h, layer.w, generator=generator)
    residual = torch.randn(batch, layer.cout, layer.ho, layer.wo, generator=generator) if layer.residual else None
    as_device = lambda t: None if t is None else t.to(device=device, dtype=dtype).contiguous(  # noqa: E731
        memory_format=torch.channels_last)
    return as_device(x), as_device(residual)


def eager_and_fused(conv: nn.Conv2d, bn: nn.BatchNorm2d, layer: ConvLayer, backend: Optional[str]):
    """(eager module, fused module) computing the same layer; call both as m(x, residual)."""
    return EagerConvBNAct(conv, bn, layer.relu), PackedConvBN(conv, bn, layer.relu, backend)
