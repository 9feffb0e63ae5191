"""fold_bn: bn(conv(x)) == conv_nobias(x) * scale + shift in eval, without touching the modules; its argument
errors."""

import pytest
import torch
from torch import nn

from resnet_fused import ops
from tests.oracle import assert_matches


def _randomized_bn(channels, affine=True):
    bn = nn.BatchNorm2d(channels, affine=affine).eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        if affine:
            bn.weight.normal_()
            bn.bias.normal_()
    return bn


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_fold_matches_eager(bias, affine):
    conv = nn.Conv2d(6, 10, 3, padding=1, bias=bias)
    bn = _randomized_bn(10, affine)
    before = {k: v.clone() for k, v in {**dict(conv.state_dict()), **dict(bn.state_dict())}.items()}
    scale, shift = ops.fold_bn(conv, bn)
    assert scale.dtype == shift.dtype == torch.float32 and scale.shape == (10,)
    x = torch.randn(2, 6, 7, 7)
    expected = bn(conv(x))
    actual = ops.conv_bn_act(x, conv.weight.detach(), scale, shift, padding=1, relu=False, backend="torch")
    assert_matches(actual, expected, torch.float32)
    after = {**dict(conv.state_dict()), **dict(bn.state_dict())}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not scale.requires_grad and not shift.requires_grad


def test_conv_alone_and_errors():
    conv = nn.Conv2d(3, 4, 1, bias=True)
    scale, shift = ops.fold_bn(conv, None)
    assert torch.equal(scale, torch.ones(4)) and torch.equal(shift, conv.bias.detach())
    with pytest.raises(ValueError, match="track_running_stats=False"):
        ops.fold_bn(conv, nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="bn has 5 features but conv has 4"):
        ops.fold_bn(conv, nn.BatchNorm2d(5))
    with pytest.raises(TypeError, match="bn must be a BatchNorm"):
        ops.fold_bn(conv, nn.ReLU())


def test_fold_bn_bad_arguments():
    bn = torch.nn.BatchNorm2d(8)
    with pytest.raises(TypeError, match="conv must be an nn.Conv2d, got Linear"):
        ops.fold_bn(torch.nn.Linear(3, 8), bn)
    with pytest.raises(ValueError, match="bn is on cpu but conv is on meta"):
        ops.fold_bn(torch.nn.Conv2d(3, 8, 3).to("meta"), bn)
