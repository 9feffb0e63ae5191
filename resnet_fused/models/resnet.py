"""The reference ResNet family: torchvision's models/resnet.py, module for module.

Structure, constructor signatures, initialization, parameter counts and state_dict keys equal torchvision's, so
its checkpoints load with strict=True. Two additions for the classic tutorials, off by default: `in_channels`
(e.g. 1 for grayscale) and `small_input=True`, a 3x3 stride-1 stem without max-pool for 32x32 images (CIFAR).
`ResNet(block, layers)` accepts any block class with `expansion` and the BasicBlock/Bottleneck constructor,
FusedBottleneck and FusedBasicBlock included.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Type, Union

import torch
from torch import Tensor, nn

__all__ = [
    "ResNet", "BasicBlock", "Bottleneck", "conv1x1", "conv3x3", "resnet18", "resnet34", "resnet50", "resnet101",
    "resnet152", "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding"""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, groups=groups,
                     bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution"""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    # ResNet V1.5: the stride is on the 3x3 conv (conv2), as in torchvision.
    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, block: Type[Union[BasicBlock, Bottleneck]], layers: List[int], num_classes: int = 1000,
                 zero_init_residual: bool = False, groups: int = 1, width_per_group: int = 64,
                 replace_stride_with_dilation: Optional[List[bool]] = None,
                 norm_layer: Optional[Callable[..., nn.Module]] = None, *, in_channels: int = 3,
                 small_input: bool = False) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        self._norm_layer = norm_layer
        if not hasattr(block, "expansion"):
            raise TypeError(f"block must be a residual block class with an `expansion` attribute, got {block!r}")
        if len(layers) != 4:
            raise ValueError(f"layers must list 4 stage depths, got {layers!r}")

        self.inplanes = 64
        self.dilation = 1
        if replace_stride_with_dilation is None:
            # each element in the tuple indicates if we should replace the 2x2 stride with a dilated convolution
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError("replace_stride_with_dilation should be None "
                             f"or a 3-element tuple, got {replace_stride_with_dilation}")
        self.groups = groups
        self.base_width = width_per_group
        if small_input:
            # CIFAR-style stem: keep the full 32x32 resolution into layer1.
            self.conv1 = nn.Conv2d(in_channels, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if small_input else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

        # Zero-initialize the last BN in each residual branch, so that the residual branch starts with zeros,
        # and each residual block behaves like an identity (https://arxiv.org/abs/1706.02677).
        if zero_init_residual:
            for m in self.modules():
                if getattr(m, "expansion", None) == 4 and getattr(m, "bn3", None) is not None:
                    nn.init.constant_(m.bn3.weight, 0)
                elif getattr(m, "expansion", None) == 1 and getattr(m, "bn2", None) is not None:
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1, dilate: bool = False) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                norm_layer(planes * block.expansion),
            )

        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width,
                        previous_dilation, norm_layer)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups, base_width=self.base_width,
                                dilation=self.dilation, norm_layer=norm_layer))
        return nn.Sequential(*layers)

    def _forward_impl(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self._forward_impl(x)


def _resnet(block, layers: List[int], weights: Optional[str], **kwargs) -> ResNet:
    model = ResNet(block, layers, **kwargs)
    if weights is not None:
        from .loading import load_checkpoint

        load_checkpoint(model, weights)
    return model


def _builder(block, layers, doc: str, **defaults):
    def build(*, weights: Optional[str] = None, block=block, **kwargs) -> ResNet:
        for key, value in defaults.items():
            kwargs.setdefault(key, value)
        return _resnet(block, layers, weights, **kwargs)

    build.__doc__ = (f"{doc}\n\n    weights: path to a torchvision-format checkpoint on local disk, or None for a "
                     f"random init.\n    block: the block class (e.g. FusedBottleneck); other kwargs go to ResNet.")
    return build


resnet18 = _builder(BasicBlock, [2, 2, 2, 2], "ResNet-18 (https://arxiv.org/abs/1512.03385).")
resnet34 = _builder(BasicBlock, [3, 4, 6, 3], "ResNet-34 (https://arxiv.org/abs/1512.03385).")
resnet50 = _builder(Bottleneck, [3, 4, 6, 3], "ResNet-50 v1.5 (https://arxiv.org/abs/1512.03385).")
resnet101 = _builder(Bottleneck, [3, 4, 23, 3], "ResNet-101 v1.5 (https://arxiv.org/abs/1512.03385).")
resnet152 = _builder(Bottleneck, [3, 8, 36, 3], "ResNet-152 v1.5 (https://arxiv.org/abs/1512.03385).")
resnext50_32x4d = _builder(Bottleneck, [3, 4, 6, 3], "ResNeXt-50 32x4d (https://arxiv.org/abs/1611.05431).",
                           groups=32, width_per_group=4)
resnext101_32x8d = _builder(Bottleneck, [3, 4, 23, 3], "ResNeXt-101 32x8d (https://arxiv.org/abs/1611.05431).",
                            groups=32, width_per_group=8)
resnext101_64x4d = _builder(Bottleneck, [3, 4, 23, 3], "ResNeXt-101 64x4d (https://arxiv.org/abs/1611.05431).",
                            groups=64, width_per_group=4)
wide_resnet50_2 = _builder(Bottleneck, [3, 4, 6, 3], "Wide ResNet-50-2 (https://arxiv.org/abs/1605.07146).",
                           width_per_group=64 * 2)
wide_resnet101_2 = _builder(Bottleneck, [3, 4, 23, 3], "Wide ResNet-101-2 (https://arxiv.org/abs/1605.07146).",
                            width_per_group=64 * 2)
for _name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
              "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2"):
    globals()[_name].__name__ = globals()[_name].__qualname__ = _name
