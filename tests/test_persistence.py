"""Nothing is lost: a fused model keeps computing what its eager original computes through the changes a model
goes through after fusing (conversions, hooks, module surgery), or says clearly why it cannot."""

import copy
import re

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import resnet_fused as rf
from resnet_fused.blocks import FusedBasicBlock, FusedConvBNAct, FusedResidualBlock
from tests.oracle import assert_matches
from tests.test_blocks import BACKENDS, _randomize_bn


class TutorialBlock(nn.Module):
    """A residual block written as tutorials write it: fuse_model makes a FusedResidualBlock of it."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.act = nn.ReLU()

    def forward(self, x):
        out = self.act(self.b1(self.c1(x)))
        return self.act(self.b2(self.c2(out)) + self.shortcut(x))


class Net(nn.Module):
    """A stem chain (FusedConvBNAct), a FusedBasicBlock, a FusedResidualBlock and a FusedBottleneck."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU(inplace=True)
        self.layer1 = rf.BasicBlock(8, 8)
        self.layer2 = TutorialBlock(8, 16, 2)
        self.layer3 = rf.Bottleneck(16, 4)

    def forward(self, x):
        return self.layer3(self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x))))))


def _pair(backend="auto"):
    model = _randomize_bn(Net()).eval()
    fused, report = rf.fuse_model(model, backend=backend)
    assert len(report.blocks) == 3 and [c.name for c in report.chains] == ["conv1"]
    assert isinstance(fused.layer2, FusedResidualBlock) and isinstance(fused.conv1, FusedConvBNAct)
    return model, fused, torch.randn(2, 3, 8, 8)


def _check(model, fused, x):
    # No .eval() here: it would clear the cached folds, and what is tested is that the cache sees each change.
    with torch.no_grad():
        assert_matches(fused(x), model(x), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conversions_after_a_forward_under_each_conversion_mode(backend):
    # Module._apply assigns through .data by default, makes new Parameters with overwrite_module_params_on_conversion,
    # and swaps the tensors' contents (same Python objects) with swap_module_params_on_conversion.
    modes = [torch.__future__.set_overwrite_module_params_on_conversion,
             torch.__future__.set_swap_module_params_on_conversion]
    for set_mode in [None] + modes:
        model, fused, x = _pair(backend)
        _check(model, fused, x)
        try:
            if set_mode is not None:
                set_mode(True)
            fresh = _randomize_bn(Net()).state_dict()
            for m in (model, fused):
                m.bfloat16().float().load_state_dict(fresh)
            _check(model, fused, x)
        finally:
            for mode in modes:
                mode(False)


def test_hooks_on_a_fused_chain_after_fusing_raise_instead_of_running_mid_chain():
    # The BatchNorm's pre-hook (here pruning's) ran after the fused conv had used its weight: one call stale,
    # 13% off after the pruned weight's original changed.
    model, fused, x = _pair()
    _check(model, fused, x)
    prune.l1_unstructured(fused.conv1, "weight", 0.5)  # a pre-hook of the conv itself sees what eager's sees
    prune.l1_unstructured(model.conv1, "weight", 0.5)
    _check(model, fused, x)
    for m in (model, fused):
        prune.l1_unstructured(m.bn1, "weight", 0.5)
    with pytest.raises(RuntimeError, match="'bn1' got hooks after fuse_model"):
        fused(x)
    for m in (model, fused):
        prune.remove(m.bn1, "weight")
    _check(model, fused, x)
    handle = fused.conv1.register_forward_hook(lambda module, args, out: out * 2)  # eager: before BN and ReLU
    with pytest.raises(RuntimeError, match="'conv1' got hooks after fuse_model"):
        fused(x)
    handle.remove()
    _check(model, fused, x)


def test_replacing_part_of_a_fused_chain_raises_instead_of_dropping_the_absorbed_modules():
    model, fused, x = _pair()
    surgery = copy.deepcopy(fused)
    surgery.conv1 = nn.Conv2d(3, 8, 3, 1, 1)  # was: conv only, no BatchNorm, no ReLU (the placeholders pass through)
    with pytest.raises(RuntimeError, match="'conv1' is now a Conv2d, but fuse_model had absorbed 'bn1' and 'relu'"):
        surgery(x)
    surgery = copy.deepcopy(fused)
    surgery.relu = nn.SiLU()  # was: SiLU after the fused ReLU
    with pytest.raises(RuntimeError, match="'relu' is now a SiLU"):
        surgery(x)
    _check(model, fused, x)


def test_a_replaced_or_hooked_relu_of_a_fused_reference_block_runs_as_eager():
    # The plan applies ReLU itself: a replaced `relu` module (or its hooks) was silently ignored, 25% off.
    model, fused, x = _pair()
    seen = {}
    for m in (model, fused):
        m.layer1.relu = nn.SiLU()
        m.layer3.relu.register_forward_hook(lambda module, args, out, m=m: seen.setdefault(id(m), []).append(out))
    _check(model, fused, x)
    assert len(seen[id(fused)]) == len(seen[id(model)]) == 3
    block = FusedBasicBlock.from_block(_randomize_bn(rf.BasicBlock(8, 8)).eval())
    reference = copy.deepcopy(block)
    block.relu = reference.relu = nn.GELU()
    y = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        assert_matches(block(y), rf.BasicBlock.forward(reference, y), torch.float32)


def test_modules_changed_inside_a_fused_residual_block():
    model, fused, x = _pair()
    _check(model, fused, x)
    for m in (model, fused):  # a unit's conv wrapped: run as is (this raised AttributeError)
        m.layer2.c2 = nn.Sequential(m.layer2.c2, nn.Dropout(0.0))
    _check(model, fused, x)
    for m in (model, fused):  # the plan runs shortcut.0 and shortcut.1 only: a third module was silently skipped
        m.layer2.shortcut.append(nn.Tanh())
    with pytest.raises(RuntimeError, match="added, removed, replaced or hooked after it was fused"):
        with torch.no_grad():
            fused(x)
    surgery = copy.deepcopy(fused)
    surgery.layer2.shortcut = surgery.layer2.shortcut[:2]
    surgery.layer2.act = nn.SiLU()  # was: ReLU regardless
    with pytest.raises(RuntimeError, match="added, removed, replaced or hooked after it was fused"):
        surgery(x)


def test_code_looking_for_relu_modules_after_fusing_finds_the_absorbed_one():
    # The absorbed stem ReLU used to be an nn.Identity: a loop over nn.ReLU modules skipped it, so an activation
    # swap after fusing silently kept the stem's ReLU (5.8% off on torchvision resnet18), and hooks on every ReLU
    # (guided backprop) silently missed it. Now the loop finds it, and the forward says the change came too late.
    def relus(m):
        return [name for name, module in m.named_modules() if isinstance(module, nn.ReLU)]

    model, fused, x = _pair()
    assert relus(fused) == relus(model) == ["relu", "layer1.relu", "layer2.act", "layer3.relu"]
    hooked = copy.deepcopy(fused)
    for name in relus(hooked):
        hooked.get_submodule(name).register_forward_hook(lambda module, args, out: out)
    with pytest.raises(RuntimeError, match="'relu' got hooks after fuse_model"):
        hooked(x)
    for name in relus(fused):
        parent, _, attr = name.rpartition(".")
        setattr(fused.get_submodule(parent), attr, nn.SiLU())
    with pytest.raises(RuntimeError, match="'relu' is now a SiLU"):
        fused(x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_a_batchnorm_of_another_dtype_raises_as_eager(dtype):
    # Eager BatchNorm rejects tensors of another dtype than its input (fp32 ones excepted for fp16/bf16 input);
    # the fused conv folded them anyway and returned a result.
    model, fused, x = _pair()
    for m in (model, fused):
        m.bn1.to(dtype), m.layer1.bn2.to(dtype)
    with pytest.raises(RuntimeError) as expected:
        model(x)
    with pytest.raises(RuntimeError, match=re.escape(str(expected.value).splitlines()[0])):
        fused(x)


def test_fp32_batchnorms_under_a_half_model_stay_fused_as_eager_accepts_them():
    model, fused, x = _pair()
    for m in (model, fused):
        m.half()
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.float()
    with torch.no_grad():
        expected, out = model(x.half()), fused(x.half())
    assert out.dtype == torch.float16
    assert_matches(out.float(), expected.float(), torch.float16)
    assert fused.conv1.__dict__["_bindings"].packs  # fused, not run eagerly
