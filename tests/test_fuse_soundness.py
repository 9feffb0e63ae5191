"""fuse_model leaves as it was what it cannot prove equivalent: forwards whose meaning fx does not see (a module
entered twice in a Sequential, in-place writes, call order, direct .forward calls, untraceable parents, child
training flags, grad mode and autocast, instance and __call__ overrides, global hooks). Each case is compared
against the eager model."""


import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import register_module_forward_hook

import resnet_fused as rf
from resnet_fused.blocks import FusedBasicBlock, FusedBottleneck, FusedResidualBlock
from tests.oracle import assert_matches
from tests.test_blocks import _randomize_bn

C = 8


def _conv(k=3):
    return nn.Conv2d(C, C, k, padding=k // 2, bias=False)


def _x():
    return torch.randn(2, C, 8, 8)


def _assert_eval_matches(model, fused, x):
    model.eval(), fused.eval()
    with torch.no_grad():
        assert_matches(fused(x.clone()), model(x.clone()), torch.float32)


def _left(report):
    return {item.name: item.reason for item in report.left}


class TwoConvBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.conv2, self.bn2 = _conv(), nn.BatchNorm2d(C), _conv(), nn.BatchNorm2d(C)
        self.relu = nn.ReLU()

    def main(self, x):
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))


# ------------------------------------------------------------------------------------------- 1. Sequential


class SharedInSequential(nn.Module):
    def __init__(self):
        super().__init__()
        relu, bn = nn.ReLU(), nn.BatchNorm2d(C)
        self.body = nn.Sequential(_conv(), nn.BatchNorm2d(C), relu, _conv(), nn.BatchNorm2d(C), relu)
        self.shortcut = nn.Sequential(_conv(1), bn, bn)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


def test_a_sequential_that_calls_one_module_twice_is_not_flattened():
    model = _randomize_bn(SharedInSequential())
    fused, report = rf.fuse_model(model.eval())
    assert not report.blocks
    assert "calls one module instance twice" in _left(report)[""]
    _assert_eval_matches(model, fused, _x())


# ------------------------------------------------------------------------------------------- 2. out + out


class AddToItself(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.relu = _conv(), nn.BatchNorm2d(C), nn.ReLU()

    def forward(self, x):
        out = self.bn1(self.conv1(x))
        return self.relu(out + out)


def test_adding_a_value_to_itself_is_not_a_residual_block():
    model = _randomize_bn(AddToItself())
    fused, report = rf.fuse_model(model.eval())
    assert not report.blocks and "same value" in _left(report)[""]
    model.train(), fused.train()
    x = _x()
    assert_matches(fused(x), model(x), torch.float32)
    assert fused.bn1.num_batches_tracked.item() == model.bn1.num_batches_tracked.item() == 1
    assert_matches(fused.bn1.running_mean, model.bn1.running_mean, torch.float32)
    _assert_eval_matches(model, fused, x)


# ------------------------------------------------------------------------------------------- 3. x += out


class AddIntoInput(TwoConvBlock):
    def __init__(self, how):
        super().__init__()
        self.how = how

    def forward(self, x):
        out = self.main(x)
        if self.how == "iadd":
            x += out
            return self.relu(x)
        if self.how == "add_":
            return self.relu(x.add_(out))
        identity = x
        identity += out
        return self.relu(identity)


class ReadsInputAfter(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.stem, self.block = nn.Conv2d(C, C, 1), block

    def forward(self, x):
        h = self.stem(x)
        return torch.cat([self.block(h), h], 1)


@pytest.mark.parametrize("how", ["iadd", "add_", "alias"])
def test_an_inplace_add_into_the_block_input_is_kept(how):
    model = _randomize_bn(ReadsInputAfter(AddIntoInput(how)))
    fused, report = rf.fuse_model(model.eval())
    assert not report.blocks and "in-place add writes into the shortcut" in _left(report)["block"]
    _assert_eval_matches(model, fused, _x())


def test_the_usual_inplace_add_into_the_main_branch_still_fuses():
    model = _randomize_bn(rf.resnet18(num_classes=10))
    fused, report = rf.fuse_model(model.eval())
    assert len(report.blocks) == 8 and not report.left
    assert isinstance(fused.layer2[0], FusedBasicBlock)


# ------------------------------------------------------------------------------------------- 4. shortcut order


class PreActShortcut(TwoConvBlock):
    """The main branch runs first; then the shortcut's ReLU(inplace=True) modifies x."""

    def __init__(self, one_unit=False):
        super().__init__()
        self.one_unit = one_unit
        self.shortcut = nn.Sequential(nn.ReLU(inplace=True), _conv(1), nn.BatchNorm2d(C))

    def forward(self, x):
        out = self.bn1(self.conv1(x)) if self.one_unit else self.main(x)
        return self.relu(out + self.shortcut(x))


def test_a_module_shortcut_runs_where_the_block_runs_it():
    model = _randomize_bn(PreActShortcut())
    fused, report = rf.fuse_model(model.eval())
    assert isinstance(fused, FusedResidualBlock) and fused.plan.shortcut.after == 1
    _assert_eval_matches(model, fused, _x())
    model.train(), fused.train()
    x = _x()
    assert_matches(fused(x.clone()), model(x.clone()), torch.float32)


def test_a_module_shortcut_after_a_one_unit_main_branch_is_refused():
    model = _randomize_bn(PreActShortcut(one_unit=True))
    fused, report = rf.fuse_model(model.eval())
    assert not report.blocks and "one-unit main branch" in _left(report)[""]
    _assert_eval_matches(model, fused, _x())


class AvgPoolDownsample(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.pool, self.conv, self.bn = nn.AvgPool2d(2), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn(self.conv(self.pool(x)))


def test_a_reference_bottleneck_with_a_module_downsample_stays_a_fused_bottleneck():
    block = _randomize_bn(rf.Bottleneck(16, 8, stride=2, downsample=AvgPoolDownsample(16, 32)))
    fused, report = rf.fuse_model(block.eval())
    assert isinstance(fused, FusedBottleneck) and report.blocks[0].kind == "bottleneck"
    _assert_eval_matches(block, fused, torch.randn(2, 16, 8, 8))


# ------------------------------------------------------------------------------------------- 5. .forward()


class ConvForward(nn.Module):
    def __init__(self, which):
        super().__init__()
        self.conv, self.bn, self.relu, self.which = _conv(), nn.BatchNorm2d(C), nn.ReLU(), which

    def forward(self, x):
        return self.relu(self.bn(self.conv(x))) + getattr(self, self.which).forward(x)


@pytest.mark.parametrize("which", ["conv", "relu"])
def test_a_module_also_called_through_forward_is_not_swapped(which):
    model = _randomize_bn(ConvForward(which))
    fused, report = rf.fuse_model(model.eval())
    assert type(getattr(fused, which)) is type(getattr(model, which))
    _assert_eval_matches(model, fused, _x())


# ------------------------------------------------------------------------------------------- 6. escapes


class ConvBNReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = _conv(), nn.BatchNorm2d(C), nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class UntraceableParent(nn.Module):
    def __init__(self):
        super().__init__()
        self.ch, self.other = ConvBNReLU(), ConvBNReLU()

    def forward(self, x):
        y = self.ch(x) + self.other(x)
        if x.sum() > -1e9:  # data-dependent: fx cannot trace this
            y = y + self.ch.conv(x) + self.ch.relu(x - 1)
        return y


def test_an_untraceable_parent_that_reaches_into_a_child_keeps_that_child():
    model = _randomize_bn(UntraceableParent())
    fused, report = rf.fuse_model(model.eval())
    assert [c.name for c in report.chains] == ["other.conv"]  # only the child it merely calls
    assert type(fused.ch.conv) is nn.Conv2d and type(fused.ch.relu) is nn.ReLU
    _assert_eval_matches(model, fused, _x())


class Holder(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.__dict__["held"] = [module]  # not registered: .train() does not reach it through here

    def forward(self, x):
        return self.held[0](x)


class HeldBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = _conv(), nn.BatchNorm2d(C), nn.ReLU()
        self.h = Holder(self.bn)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x))) + self.h(x)


def test_a_module_held_outside_the_registered_children_is_not_swapped():
    model = _randomize_bn(HeldBN())
    fused, report = rf.fuse_model(model.eval())
    assert fused.h.held[0] is fused.bn
    model.train(), fused.train()
    x = _x()
    assert_matches(fused(x), model(x), torch.float32)


# ------------------------------------------------------------------------------------------- 7. child flags


class ChildFlagChain(ConvBNReLU):
    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.bn.training:
            return self.relu(y) + y
        return self.relu(y)


class ChildFlagBlock(TwoConvBlock):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.0)

    def forward(self, x):
        out = self.main(x)
        if self.drop.training:
            return self.relu(out - x)
        return self.relu(out + x)


@pytest.mark.parametrize("cls", [ChildFlagChain, ChildFlagBlock])
def test_a_forward_branching_on_a_child_training_flag_is_proven_in_both_modes(cls):
    model = _randomize_bn(cls())
    fused, report = rf.fuse_model(model.eval())
    _assert_eval_matches(model, fused, _x())
    model.train(), fused.train()
    x = _x()
    assert_matches(fused(x), model(x), torch.float32)


# ------------------------------------------------------------------------------------------- 8. contexts


class NoGradShortcut(TwoConvBlock):
    def __init__(self):
        super().__init__()
        self.downsample = nn.Sequential(_conv(1), nn.BatchNorm2d(C))

    def forward(self, x):
        with torch.no_grad():
            identity = self.downsample(x)
        return self.relu(self.main(x) + identity)


class AutocastMain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.relu = _conv(), nn.BatchNorm2d(C), nn.ReLU()

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = self.bn1(self.conv1(x))
        return self.relu(out + x)


class NoGradBetweenConvAndBN(ConvBNReLU):
    def forward(self, x):
        with torch.no_grad():
            y = self.conv(x)
        return self.relu(self.bn(y))


def test_no_grad_inside_a_block_is_kept():
    model = _randomize_bn(NoGradShortcut())
    fused, report = rf.fuse_model(model.eval())
    assert "changes grad mode or autocast" in _left(report)[""]
    model.train(), fused.train()
    xe = _x().requires_grad_()
    xf = xe.detach().clone().requires_grad_()
    model(xe).sum().backward(), fused(xf).sum().backward()
    assert fused.downsample[0].weight.grad is None and model.downsample[0].weight.grad is None
    assert_matches(xf.grad, xe.grad, torch.float32)


def test_autocast_inside_a_block_is_kept():
    model = _randomize_bn(AutocastMain())
    fused, report = rf.fuse_model(model.eval(), backend="torch")
    assert not report.blocks and "changes grad mode or autocast" in _left(report)[""]
    _assert_eval_matches(model, fused, _x())


def test_a_chain_split_by_no_grad_is_not_fused():
    model = _randomize_bn(NoGradBetweenConvAndBN())
    fused, report = rf.fuse_model(model.eval())
    assert not report.chains
    model.train(), fused.train()
    x = _x()
    model(x).sum().backward(), fused(x).sum().backward()
    assert_matches(fused.bn.weight.grad, model.bn.weight.grad, torch.float32)


# ------------------------------------------------------------------------------------------- 9./10. overrides


def test_an_instance_forward_on_a_relu_or_a_block_is_respected():
    model = _randomize_bn(ConvBNReLU())
    model.relu.forward = lambda t: torch.relu(t) * 0.5
    fused, report = rf.fuse_model(model.eval())
    assert type(fused.relu) is nn.ReLU
    _assert_eval_matches(model, fused, _x())

    block = _randomize_bn(rf.BasicBlock(C, C))
    original = block.forward
    block.forward = lambda t: original(t) * 0.5
    fused, report = rf.fuse_model(block.eval())
    assert not report.blocks and "replaced on the instance" in _left(report)[""]
    _assert_eval_matches(block, fused, _x())


class CallOverride(TwoConvBlock):
    def forward(self, x):
        return self.relu(self.main(x) + x)

    def __call__(self, x):
        return super().__call__(x) * 0.5


def test_a_block_overriding_call_is_not_replaced():
    model = _randomize_bn(nn.Sequential(CallOverride()))
    fused, report = rf.fuse_model(model.eval())
    assert type(fused[0]) is CallOverride and "overrides nn.Module.__call__" in _left(report)["0"]
    _assert_eval_matches(model, fused, _x())


# ------------------------------------------------------------------------------------------- 11. global hooks


def _clamp_bn(module, inputs, output):
    return output.clamp(-1, 1) if isinstance(module, nn.BatchNorm2d) else None


def test_global_hooks_at_fuse_time_leave_the_model_as_it_was():
    model = _randomize_bn(rf.resnet18(num_classes=10)).eval()
    handle = register_module_forward_hook(_clamp_bn)
    try:
        fused, report = rf.fuse_model(model)
        assert not report.fused and "hooks for all modules" in _left(report)[""]
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert_matches(fused(x), model(x), torch.float32)
    finally:
        handle.remove()


def test_global_hooks_registered_after_fusing_see_the_blocks_modules():
    block = _randomize_bn(rf.Bottleneck(16, 4)).eval()
    residual = _randomize_bn(nn.Sequential(TwoConvBlockAdd())).eval()
    for model, channels in ((block, 16), (residual, C)):
        fused, report = rf.fuse_model(model)
        assert len(report.blocks) == 1
        x = torch.randn(2, channels, 6, 6)
        handle = register_module_forward_hook(_clamp_bn)
        try:
            _assert_eval_matches(model, fused, x)
        finally:
            handle.remove()
        _assert_eval_matches(model, fused, x)


class TwoConvBlockAdd(TwoConvBlock):
    def forward(self, x):
        return F.relu(self.main(x) + x)
