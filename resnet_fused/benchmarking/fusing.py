"""The fused paths the CLI and benchmarks run: a whole model through fuse_model, one block as its fused twin,
and one conv layer as a single conv_bn_act over a weight packed once (resnet_fused.PackedConvBN)."""

from __future__ import annotations

import copy
from typing import Optional, Tuple

from torch import nn

from ..blocks import FusedBasicBlock, FusedBottleneck
from ..fuse import fuse_model


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
