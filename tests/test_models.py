"""The reference ResNet family matches torchvision: parameter counts, state_dict keys, constructor options."""

import pytest
import torch
from torch import nn

import resnet_fused
from resnet_fused import models
from tests.third_party import require

# torchvision's published parameter counts (torchvision.models weights tables).
PARAMETER_COUNTS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnext50_32x4d": 25_028_904,
    "wide_resnet50_2": 68_883_240,
}
SLOW_COUNTS = {
    "resnet152": 60_192_808,
    "resnext101_32x8d": 88_791_336,
    "resnext101_64x4d": 83_455_272,
    "wide_resnet101_2": 126_886_696,
}


def _count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(PARAMETER_COUNTS))
def test_parameter_counts_equal_torchvision(name):
    assert _count(getattr(models, name)()) == PARAMETER_COUNTS[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_COUNTS))
def test_parameter_counts_equal_torchvision_large(name):
    # Count on the meta device: the same modules without allocating 100M+ parameters.
    with torch.device("meta"):
        model = getattr(models, name)()
    assert _count(model) == SLOW_COUNTS[name]


def test_resnet50_state_dict_keys_are_torchvision_keys():
    keys = list(models.resnet50().state_dict())
    assert len(keys) == 320
    assert keys[:6] == ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
                        "bn1.num_batches_tracked"]
    for key in ["layer1.0.downsample.0.weight", "layer1.0.downsample.1.running_var", "layer4.2.conv3.weight",
                "layer4.2.bn3.num_batches_tracked", "fc.weight", "fc.bias"]:
        assert key in keys
    assert keys[-2:] == ["fc.weight", "fc.bias"]


def test_resnet18_block_structure():
    m = models.resnet18()
    assert isinstance(m.layer1[0], models.BasicBlock) and m.layer1[0].downsample is None
    assert isinstance(m.layer2[0].downsample[0], nn.Conv2d) and m.layer2[0].downsample[0].stride == (2, 2)
    assert m.layer2[0].conv1.stride == (2, 2)
    b = models.resnet50().layer2[0]
    assert b.conv1.stride == (1, 1) and b.conv2.stride == (2, 2)  # v1.5: stride on the 3x3


def test_forward_shapes_and_options():
    x = torch.randn(2, 3, 64, 64)
    assert models.resnet18(num_classes=7)(x).shape == (2, 7)
    gray = models.resnet18(in_channels=1, num_classes=10)
    assert gray.conv1.in_channels == 1 and gray(torch.randn(1, 1, 64, 64)).shape == (1, 10)
    cifar = models.resnet18(small_input=True, num_classes=10)
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, nn.Identity)
    feats = {}
    cifar.layer1.register_forward_hook(lambda m, i, o: feats.update(layer1=o.shape))
    assert cifar(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert feats["layer1"][-2:] == (32, 32)


def test_zero_init_residual_and_dilation():
    m = models.resnet50(zero_init_residual=True)
    assert all(torch.count_nonzero(b.bn3.weight) == 0 for b in m.modules() if isinstance(b, models.Bottleneck))
    m = models.resnet18(zero_init_residual=True)
    assert all(torch.count_nonzero(b.bn2.weight) == 0 for b in m.modules() if isinstance(b, models.BasicBlock))
    d = models.resnet50(replace_stride_with_dilation=[False, True, True])
    assert d.layer4[1].conv2.dilation == (4, 4)
    assert d(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    with pytest.raises(ValueError, match="replace_stride_with_dilation"):
        models.resnet50(replace_stride_with_dilation=[True])
    with pytest.raises(ValueError, match="BasicBlock only supports groups=1"):
        models.resnet18(groups=2)


def test_custom_block_class_accepted():
    class MyBlock(models.BasicBlock):
        pass

    assert isinstance(models.ResNet(MyBlock, [1, 1, 1, 1]).layer3[0], MyBlock)
    with pytest.raises(TypeError, match="expansion"):
        models.ResNet(nn.Identity, [1, 1, 1, 1])


def test_exports_at_top_level():
    assert resnet_fused.resnet50 is models.resnet50 and resnet_fused.Bottleneck is models.Bottleneck


def test_checkpoint_round_trip_and_wrapped_formats(tmp_path):
    src = models.resnet18()
    path = tmp_path / "r18.pth"
    torch.save(src.state_dict(), path)
    dst = models.resnet18(weights=str(path))
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, wrapped)
    models.load_checkpoint(models.resnet18(), wrapped)


def test_checkpoint_mismatch_lists_every_problem(tmp_path):
    state = models.resnet18().state_dict()
    state.pop("fc.bias")
    state["extra.weight"] = torch.zeros(1)
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(models.CheckpointMismatchError) as info:
        models.resnet18(weights=str(path))
    message = str(info.value)
    assert "missing keys (1): fc.bias" in message
    assert "unexpected keys (1): extra.weight" in message
    assert "conv1.weight: checkpoint (64, 3, 3, 3) vs model (64, 3, 7, 7)" in message


def test_checkpoint_loader_is_weights_only(tmp_path):
    path = tmp_path / "pickle.pth"
    torch.save({"state_dict": {"fc.weight": torch.zeros(1)}, "obj": _Unsafe()}, path)
    with pytest.raises(Exception, match="(?i)weights.only|unsupported global|_Unsafe"):
        models.load_checkpoint(models.resnet18(), path)
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        models.load_checkpoint(models.resnet18(), tmp_path / "missing.pth")


class _Unsafe:
    pass


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2"])
def test_torchvision_checkpoint_loads_strict_and_matches(name):
    tv = require("torchvision")
    theirs = getattr(tv.models, name)().eval()
    ours = getattr(models, name)().eval()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(ours(x), theirs(x))
