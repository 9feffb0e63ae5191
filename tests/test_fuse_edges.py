"""fuse_model on what users meet past the reference models: TorchScript modules, the common tutorial ResNet-50
(`identity = x.clone()`, one shared ReLU, `x += identity`), a stem's F.relu in the parent's forward; and reports
whose every reason names the node that blocks fusion."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resnet_fused as rf
from tests.oracle import assert_matches
from tests.test_blocks import _randomize_bn
from tests.test_fuse_model import SEBottleneck


def _left(report):
    return {item.name: item.reason for item in report.left}


def _assert_same(model, fused, x, train=False):
    model.train(train), fused.train(train)
    with torch.set_grad_enabled(train):
        assert_matches(fused(x.clone()), model(x.clone()), torch.float32)


# ------------------------------------------------------------------------------------------- TorchScript


@pytest.mark.filterwarnings("ignore:`torch.jit")
@pytest.mark.parametrize("how", ["script", "trace"])
def test_a_torchscript_model_is_left_as_it_is_and_the_report_says_why(how):
    model = _randomize_bn(rf.resnet18(num_classes=10)).eval()
    x = torch.randn(1, 3, 32, 32)
    scripted = torch.jit.script(model) if how == "script" else torch.jit.trace(model, x)
    fused, report = rf.fuse_model(scripted)
    assert not report.fused and "TorchScript" in _left(report)[""]
    with torch.no_grad():
        assert torch.equal(fused(x), scripted(x))


@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_a_torchscript_submodule_is_reported_and_the_rest_fuses():
    inner = torch.jit.script(nn.Sequential(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval())
    model = _randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), inner)).eval()
    fused, report = rf.fuse_model(model)
    assert [item.name for item in report.fused] == ["0"] and "TorchScript" in _left(report)["3"]
    _assert_same(model, fused, torch.randn(1, 3, 16, 16))


# ------------------------------------------------------------------------------------------- tutorial blocks


class CloneBottleneck(nn.Module):
    """The widespread "ResNet-50 from scratch" block: identity = x.clone(), one ReLU module called three times,
    `x += identity` (or `x = x + identity`), the projection named i_downsample."""

    expansion = 4

    def __init__(self, cin, planes, i_downsample=None, stride=1, clone=True, inplace_add=True):
        super().__init__()
        self.conv1, self.batch_norm1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.batch_norm2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.batch_norm3 = nn.BatchNorm2d(planes * 4)
        self.i_downsample, self.relu = i_downsample, nn.ReLU()
        self.clone, self.inplace_add = clone, inplace_add

    def forward(self, x):
        identity = x.clone() if self.clone else x
        x = self.relu(self.batch_norm1(self.conv1(x)))
        x = self.relu(self.batch_norm2(self.conv2(x)))
        x = self.conv3(x)
        x = self.batch_norm3(x)
        if self.i_downsample is not None:
            identity = self.i_downsample(identity)
        if self.inplace_add:
            x += identity
        else:
            x = x + identity
        x = self.relu(x)
        return x


def _clone_resnet(**kwargs):
    projection = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
    return _randomize_bn(nn.Sequential(CloneBottleneck(8, 4, projection, 2, **kwargs),
                                       CloneBottleneck(16, 4, **kwargs)))


@pytest.mark.parametrize("inplace_add", [True, False], ids=["iadd", "add"])
@pytest.mark.parametrize("clone", [True, False], ids=["clone", "no-clone"])
def test_the_tutorial_bottleneck_fuses_whole(clone, inplace_add):
    model = _clone_resnet(clone=clone, inplace_add=inplace_add)
    fused, report = rf.fuse_model(model)
    assert [item.name for item in report.blocks] == ["0", "1"] and not report.left, report
    x = torch.randn(2, 8, 8, 8)
    _assert_same(model, fused, x)
    _assert_same(model, fused, x, train=True)


class CloneIntoModule(nn.Module):
    """A copy of the input goes to a shortcut module run as is: that module may write into its input, and the
    fused block would hand it the input itself, so the block stays."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.conv2, self.bn2 = (nn.Conv2d(8, 8, 3, 1, 1), nn.BatchNorm2d(8),
                                                      nn.Conv2d(8, 8, 3, 1, 1), nn.BatchNorm2d(8))
        self.shortcut = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(8, 8, 1))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x.clone()))


def test_a_copy_into_a_shortcut_module_is_refused_naming_the_copy():
    model = _randomize_bn(CloneIntoModule()).eval()
    fused, report = rf.fuse_model(model)
    reason = _left(report)[""]
    assert not report.blocks and "shortcut (Sequential)" in reason and ".clone()" in reason, reason
    _assert_same(model, fused, torch.randn(2, 8, 8, 8))


# ------------------------------------------------------------------------------------------- reasons


class TwoOperandMain(nn.Module):
    """out * scale(x): the main branch is no chain, and the node that makes it so is the multiplication."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.gate = nn.Conv2d(8, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.Sigmoid()

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)) * self.gate(x) + x)


class PreActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, 1, 1)

    def forward(self, x):
        return self.conv1(F.relu(self.bn1(x))) + x


class ConvCalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn_a, self.bn_b = nn.Conv2d(8, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn_a(self.conv(x)) + self.bn_b(self.conv(x))


def _hooked_bn():
    model = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
    model[1].register_forward_hook(lambda *args: None)
    return model


@pytest.mark.parametrize("model, name, expected", [
    (SEBottleneck(16), "", "the operator * also takes se (Sequential)"),
    (TwoOperandMain(), "", "the operator * also takes gate (Sigmoid)"),
    (SEBottleneck(16), "se.3", "se.4 (Sigmoid)"),
    (PreActivation(), "", "the output comes from the operator +, not from a ReLU"),
    (PreActivation(), "bn1", "what it normalizes comes from the forward's input, not from a conv"),
    (PreActivation(), "conv1", "its output goes to the operator +"),
    (ConvCalledTwice(), "conv", "conv (Conv2d) is called 2 times in forward"),
    (ConvCalledTwice(), "bn_b", "it follows conv (Conv2d), which stays unfused"),
    (_hooked_bn(), "0", "goes to 1 (BatchNorm2d), which cannot be absorbed: 1 (BatchNorm2d) has hooks"),
    (_hooked_bn(), "1", "1 (BatchNorm2d) has hooks"),
    (nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Tanh()), "0", None),
], ids=["se-block", "gated-main", "conv-into-sigmoid", "preact-output", "preact-bn", "preact-conv",
        "conv-twice", "bn-after-conv-twice", "conv-into-hooked-bn", "hooked-bn", "bn-then-tanh"])
def test_every_reason_names_the_node_that_blocks(model, name, expected):
    fused, report = rf.fuse_model(_randomize_bn(model).eval())
    if expected is None:  # conv -> BN fuses, and nothing is said of the Tanh that ends the chain
        assert [item.kind for item in report.fused] == ["conv-bn"] and not report.left
        return
    assert expected in _left(report)[name], _left(report)


class SharedReLUStem(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.conv2, self.bn2 = (nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3),
                                                      nn.BatchNorm2d(8))
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))


def test_a_shared_relu_module_is_named_as_what_stays_apart():
    model = _randomize_bn(SharedReLUStem()).eval()
    fused, report = rf.fuse_model(model)
    assert [item.kind for item in report.fused] == ["conv-bn", "conv-bn"]
    assert all("relu (ReLU) is called 2 times in forward" in item.detail for item in report.fused), report
    _assert_same(model, fused, torch.randn(1, 3, 12, 12))


class FunctionalStem(nn.Module):
    """The CIFAR tutorials' stem: out = F.relu(self.bn1(self.conv1(x))) in the parent's forward."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.fc = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.Linear(8, 2)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def test_a_functional_relu_after_a_stem_is_explained():
    model = _randomize_bn(FunctionalStem()).eval()
    fused, report = rf.fuse_model(model)
    (item,) = report.fused
    assert item.kind == "conv-bn" and "torch.nn.functional.relu() in FunctionalStem.forward" in item.detail
    assert "does not rewrite forward" in item.detail
    _assert_same(model, fused, torch.randn(2, 3, 8, 8))


class ConstantInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) * torch.ones(1)


def test_tracing_stores_nothing_on_the_model():
    model = ConstantInForward().eval()
    names = set(vars(model))
    rf.fuse_model(model, inplace=True)
    assert set(vars(model)) == names  # fx's own tracer stored the constant on it as `_tensor_constant0`
