"""The fused paths the CLI and benchmarks run: a whole model through fuse_model, one block as its fused twin,
and one conv layer as a single conv_bn_act over a weight packed once (PackedConvBN)."""

from __future__ import annotations

import copy
from typing import Optional, Tuple

from torch import nn

from .. import ops
from ..blocks import FusedBasicBlock, FusedBottleneck
from ..fuse import fuse_model
from ..fusion.conv_bn import kernel_unsupported_reason


class PackedConvBN(nn.Module):
    """conv -> eval BN (-> + residual) (-> ReLU) as one conv_bn_act call on a weight packed once."""

    def __init__(self, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d], relu: bool, backend: Optional[str]):
        super().__init__()
        # Only stride and padding reach the op: a dilated conv, or one with reflect padding, would otherwise run
        # as a plain one (a wrong answer, of the right shape for a 1x1 kernel or any kernel with reflect padding).
        reason = kernel_unsupported_reason(conv)
        if reason is not None:
            raise ValueError(f"PackedConvBN runs the fused conv kernels, which do not run this conv: {reason}")
        scale, shift = ops.fold_bn(conv, bn)
        weight = conv.weight.detach()
        self.pack = ops.pack_conv_bn(weight, scale.to(weight.device), shift.to(weight.device), backend=backend)
        self.stride = conv.stride[0]
        self.padding = conv.padding[0]
        self.relu = relu

    def forward(self, x, residual=None):
        return ops.conv_bn_act_packed(x, self.pack, residual, stride=self.stride, padding=self.padding,
                                      relu=self.relu)


def fuse_for_benchmark(model: nn.Module, backend: Optional[str]) -> Tuple[nn.Module, str]:
    """(fused eval model, how it was fused). The input model is left untouched."""
    fused, report = fuse_model(model, backend=backend or "auto", inplace=False)
    return fused.eval(), f"resnet_fused.fuse_model ({_summarize(report)})"


def fused_block(block: nn.Module, backend: Optional[str]) -> Tuple[nn.Module, str]:
    """The fused twin of a reference block: FusedBottleneck/FusedBasicBlock with the same weights."""
    twin_cls = FusedBottleneck if hasattr(block, "conv3") else FusedBasicBlock
    # Same constructor as the reference block (standard widths: planes == conv1's output channels).
    twin = twin_cls(block.conv1.in_channels, block.conv1.out_channels, stride=block.stride,
                    downsample=copy.deepcopy(block.downsample), backend=backend or "auto")
    twin.load_state_dict(block.state_dict())
    param = next(block.parameters())
    return twin.to(device=param.device, dtype=param.dtype).eval(), twin_cls.__name__


def _summarize(report) -> str:
    text = (report.summary() if callable(getattr(report, "summary", None)) else str(report)).strip().splitlines()
    return text[0] if text else type(report).__name__
