"""PackedConvBN: one conv -> eval BN (-> + residual) (-> ReLU) as a single conv_bn_act call on a weight packed once.

    y = relu?(conv2d(x, W) * scale[c] + shift[c] (+ residual)),  (scale, shift) = fold_bn(conv, bn)

A snapshot: the module keeps the pack made from the conv and BN it was built from, not the modules themselves
(later edits of them do not reach it). For a whole model, fuse_model keeps its packs current instead.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from . import ops
from .fusion.eligibility import kernel_unsupported_reason
from .ops.validation import check_flag


class PackedConvBN(nn.Module):
    """conv -> eval BN (-> + residual) (-> ReLU) as one conv_bn_act call on a weight packed once."""

    def __init__(self, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d], relu: bool, backend: Optional[str] = None):
        super().__init__()
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        # Only stride and padding reach the op: a dilated conv, or one with reflect padding, would otherwise run
        # as a plain one (a wrong answer, of the right shape for a 1x1 kernel or any kernel with reflect padding).
        reason = kernel_unsupported_reason(conv)
        if reason is not None:
            raise ValueError(f"PackedConvBN runs the fused conv kernels, which do not run this conv: {reason}")
        scale, shift = ops.fold_bn(conv, bn)
        weight = conv.weight.detach()
        self.pack = ops.pack_conv_bn(weight, scale.to(weight.device), shift.to(weight.device), stride=conv.stride,
                                     padding=conv.padding, backend=backend)
        self.relu = check_flag("relu", relu)

    def forward(self, x, residual=None):
        return ops.conv_bn_act_packed(x, self.pack, residual, relu=self.relu)

    def extra_repr(self) -> str:
        pack = self.pack
        return (f"{pack.in_channels}, {pack.out_channels}, kernel_size={pack.kernel_size}, stride={pack.stride}, "
                f"padding={pack.padding}, relu={self.relu}, backend={pack.backend!r}")
