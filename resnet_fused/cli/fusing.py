"""The fused path the CLI and benchmarks run: resnet_fused.fuse_model when it exists, else an op-level
stand-in built here from the public ops (conv_bn_act over packed weights), so that both work either way.

The stand-in computes, per Bottleneck (BasicBlock alike, without conv3):
    a = conv_bn_act(x, conv1/bn1, relu)          b = conv_bn_act(a, conv2/bn2, relu)
    identity = conv_bn_act(x, downsample, no relu) or x
    y = conv_bn_act(b, conv3/bn3, residual=identity, relu)
"""

from __future__ import annotations

import copy
from typing import Optional, Tuple

import torch
from torch import nn

from .. import ops


def _square(value, what: str) -> int:
    value = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if value[0] != value[1]:
        raise ValueError(f"{what} must be square for the fused op, got {value}")
    return int(value[0])


class PackedConvBN(nn.Module):
    """conv -> eval BN (-> + residual) (-> ReLU) as one conv_bn_act call on a weight packed once."""

    def __init__(self, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d], relu: bool, backend: Optional[str]):
        super().__init__()
        scale, shift = ops.fold_bn(conv, bn)
        weight = conv.weight.detach()
        self.pack = ops.pack_conv_bn(weight, scale.to(weight.device), shift.to(weight.device), backend=backend)
        self.stride = _square(conv.stride, "stride")
        self.padding = _square(conv.padding, "padding")
        self.relu = relu

    def forward(self, x, residual=None):
        return ops.conv_bn_act_packed(x, self.pack, residual, stride=self.stride, padding=self.padding,
                                      relu=self.relu)


class OpLevelBlock(nn.Module):
    """A reference Bottleneck or BasicBlock (eval) run through the fused ops."""

    def __init__(self, block: nn.Module, backend: Optional[str]):
        super().__init__()
        self.conv1 = PackedConvBN(block.conv1, block.bn1, True, backend)
        bottleneck = hasattr(block, "conv3")
        self.conv2 = PackedConvBN(block.conv2, block.bn2, True, backend)  # BasicBlock: + residual, then ReLU
        self.conv3 = PackedConvBN(block.conv3, block.bn3, True, backend) if bottleneck else None
        self.downsample = None
        if block.downsample is not None:
            ds = block.downsample
            if isinstance(ds, nn.Sequential) and len(ds) == 2 and isinstance(ds[0], nn.Conv2d):
                self.downsample = PackedConvBN(ds[0], ds[1], False, backend)
            else:
                self.downsample = ds  # an unusual downsample runs as it is

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        if self.conv3 is None:
            return self.conv2(self.conv1(x), identity)
        return self.conv3(self.conv2(self.conv1(x)), identity)


class OpLevelResNet(nn.Module):
    """A reference ResNet (eval) with every conv+BN(+ReLU)(+add+ReLU) run as one fused op."""

    def __init__(self, model: nn.Module, backend: Optional[str]):
        super().__init__()
        self.stem = PackedConvBN(model.conv1, model.bn1, True, backend)
        self.maxpool = model.maxpool
        self.layers = nn.ModuleList(nn.Sequential(*(OpLevelBlock(b, backend) for b in getattr(model, f"layer{i}")))
                                    for i in range(1, 5))
        self.avgpool, self.fc = model.avgpool, model.fc

    def forward(self, x):
        x = self.maxpool(self.stem(x))
        for layer in self.layers:
            x = layer(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _public(name: str, module: str):
    """resnet_fused.<name>, or resnet_fused.<module>.<name> before it is exported; None while not written yet."""
    import importlib

    import resnet_fused

    found = getattr(resnet_fused, name, None)
    if found is None:
        try:
            found = getattr(importlib.import_module(f"resnet_fused.{module}"), name, None)
        except Exception:  # a module still being written must not break the CLI: fall back instead
            found = None
    return found


def has_fuse_model() -> bool:
    return callable(_public("fuse_model", "fuse"))


def fuse_for_benchmark(model: nn.Module, backend: Optional[str]) -> Tuple[nn.Module, str]:
    """(fused eval model, how it was fused). The input model is left untouched."""
    fuse_model = _public("fuse_model", "fuse")
    if callable(fuse_model):
        fused, report = fuse_model(model, backend=backend or "auto", inplace=False)
        return fused.eval(), f"resnet_fused.fuse_model ({_summarize(report)})"
    return OpLevelResNet(copy.deepcopy(model).eval(), backend).eval(), \
        "op-level stand-in (resnet_fused.fuse_model is not available yet)"


def fused_block(block: nn.Module, backend: Optional[str]) -> Tuple[nn.Module, str]:
    """The fused twin of a reference block: FusedBottleneck/FusedBasicBlock with the same weights when they
    exist, else the op-level stand-in."""
    twin_cls = _public("FusedBottleneck" if hasattr(block, "conv3") else "FusedBasicBlock", "blocks")
    if twin_cls is None:
        return OpLevelBlock(block, backend).eval(), "op-level stand-in"
    # Same constructor as the reference block (standard widths: planes == conv1's output channels).
    twin = twin_cls(block.conv1.in_channels, block.conv1.out_channels, stride=block.stride,
                    downsample=copy.deepcopy(block.downsample), backend=backend or "auto")
    twin.load_state_dict(block.state_dict())
    param = next(block.parameters())
    return twin.to(device=param.device, dtype=param.dtype).eval(), twin_cls.__name__


def _summarize(report) -> str:
    text = (report.summary() if callable(getattr(report, "summary", None)) else str(report)).strip().splitlines()
    return text[0] if text else type(report).__name__
