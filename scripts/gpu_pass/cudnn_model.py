"""A ResNet run through cuDNN's own fused inference ops: eager's best without resnet_fused, for the headline.

Every conv + BN (+ residual) + ReLU becomes one cuDNN call on the BN-folded weight (cli.units.CudnnConvBNAct:
torch.cudnn_convolution_relu, or torch.cudnn_convolution_add_relu for a block's last conv with its shortcut);
a downsample (conv + BN, no ReLU) runs as one conv with the folded bias. Pooling and the classifier stay as
they were. For torchvision-style ResNets (layer1..layer4 of Bottleneck or BasicBlock blocks).
"""

from __future__ import annotations

import copy

from torch import nn

from resnet_fused.benchmarking.units import CudnnConvBNAct

STAGES = ("layer1", "layer2", "layer3", "layer4")


class CudnnBlock(nn.Module):
    """A Bottleneck or BasicBlock as two or three cuDNN calls (the last one adds the shortcut)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        names = ["1", "2", "3"] if hasattr(block, "conv3") else ["1", "2"]
        self.body = nn.ModuleList(CudnnConvBNAct(getattr(block, "conv" + n), getattr(block, "bn" + n), relu=True)
                                  for n in names)
        downsample = block.downsample
        self.downsample = None if downsample is None else CudnnConvBNAct(downsample[0], downsample[1], relu=False)

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        for unit in self.body[:-1]:
            x = unit(x)
        return self.body[-1](x, shortcut)


def cudnn_resnet(model: nn.Module) -> nn.Module:
    """A copy of an eval-mode ResNet whose stem and blocks run as cuDNN fused ops."""
    twin = copy.deepcopy(model).eval()
    twin.conv1, twin.bn1, twin.relu = CudnnConvBNAct(model.conv1, model.bn1, relu=True), nn.Identity(), nn.Identity()
    for stage in STAGES:
        layer = getattr(twin, stage)
        for i, block in enumerate(layer):
            layer[i] = CudnnBlock(block)
    return twin
