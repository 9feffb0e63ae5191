"""The fused blocks' constructors say which signature they take when a model passes another one."""

import pytest
import torch
from torch import nn

import resnet_fused as rf


class CifarResNet(nn.Module):
    """The pytorch-cifar ResNet: its blocks take (in_planes, planes, stride) and build their own shortcut."""

    def __init__(self, block):
        super().__init__()
        self.in_planes = 16
        self.layer1 = self._make_layer(block, 16, 1)
        self.layer2 = self._make_layer(block, 32, 2)

    def _make_layer(self, block, planes, stride):
        layer = block(self.in_planes, planes, stride)
        self.in_planes = planes * block.expansion
        return layer

    def forward(self, x):
        return self.layer2(self.layer1(x))


@pytest.mark.parametrize("block", [rf.FusedBasicBlock, rf.FusedBottleneck])
def test_a_block_without_the_downsample_its_shapes_need_says_which_signature_it_takes(block):
    with pytest.raises(ValueError, match=r"needs a downsample.*torchvision's (BasicBlock|Bottleneck) arguments "
                                         r"\(inplanes, planes, stride, downsample, ...\).*rf.fuse_model"):
        CifarResNet(block)


@pytest.mark.parametrize("block, inplanes, planes, stride", [
    (rf.FusedBasicBlock, 16, 16, 1), (rf.FusedBottleneck, 64, 16, 1),
])
def test_blocks_whose_identity_fits_need_no_downsample(block, inplanes, planes, stride):
    out = block(inplanes, planes, stride).eval()(torch.randn(1, inplanes, 8, 8))
    assert out.shape == (1, planes * block.expansion, 8, 8)


def test_torchvision_layout_models_still_build():
    assert sum(p.numel() for p in rf.models.ResNet(rf.FusedBottleneck, [3, 4, 6, 3]).parameters()) == 25_557_032
