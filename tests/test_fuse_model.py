"""fuse_model on reference, user-written, torchvision and timm models: equal outputs, gradients, keys; report."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resnet_fused as rf
from resnet_fused.blocks import (AbsorbedBatchNorm2d, FusedBasicBlock, FusedBottleneck, FusedConvBNAct,
                                 FusedResidualBlock)
from tests.float64_step import one_sgd_step
from tests.oracle import TOLERANCES, assert_matches
from tests.test_blocks import BACKENDS, _randomize_bn, assert_no_worse_than_eager
from tests.third_party import require

MODELS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnext50_32x4d"]


def _model(name, **kwargs):
    return _randomize_bn(getattr(rf, name)(num_classes=10, **kwargs))


def _eval_both(model, fused, x):
    model.eval(), fused.eval()
    with torch.no_grad():
        return model(x), fused(x)


# ------------------------------------------------------------------------------------------- reference models


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", MODELS)
def test_reference_models_eval_fp32(name, backend):
    model = _model(name)
    fused, report = rf.fuse_model(model, backend=backend)
    expected_blocks = sum(len(getattr(model, f"layer{i}")) for i in range(1, 5))
    assert len(report.blocks) == expected_blocks and not report.left
    assert report.chains[0].name == "conv1" and report.chains[0].kind == "conv-bn-relu"
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    expected, out = _eval_both(model, fused, x)
    assert_matches(out, expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_reference_models_eval_half(name, dtype):
    model = _model(name).eval()
    fused, _ = rf.fuse_model(model)
    x = torch.randn(2, 3, 32, 32)
    truth = copy.deepcopy(model).to(dtype).float()
    with torch.no_grad():
        expected = truth(x.to(dtype).float())
        eager_half = model.to(dtype)(x.to(dtype))
        out = fused.to(dtype).eval()(x.to(dtype))
    assert out.dtype == dtype
    assert_no_worse_than_eager(out, eager_half, expected, dtype)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_train_one_sgd_step_of_full_width_models(name):
    """One training step of the reference models at full width, fused fp32 and eager fp32 against float64.

    At full width a few of the ~10^6 ReLU inputs always lie within fp32 rounding of zero, and each flips its
    element's gradient in one run and not the other (tests/float64_step.py): so here the whole gradient and the
    whole state after the step are compared by relative L2 error, which such flips move by ~1e-3. The exact
    per-tensor comparison runs on small models drawn without ties (tests/test_train_step.py).
    """
    model = _model(name, small_input=True).train()  # 32x32 in, 4x4 at layer4
    fused, _ = rf.fuse_model(model)
    x, target = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    runs = [one_sgd_step(m, x, target) for m in (copy.deepcopy(model).double(), model, fused)]
    truth, eager, result = ({kind: torch.cat([v.flatten().double() for k, v in run.items()
                                              if k.startswith(kind) and not k.endswith("num_batches_tracked")])
                             for kind in ("output", "grad", "after")} for run in runs)
    for kind, expected in truth.items():
        relative = lambda actual: ((actual - expected).norm() / expected.norm()).item()  # noqa: E731
        assert relative(result[kind]) <= max(1e-2, 10 * relative(eager[kind])), kind


# ------------------------------------------------------------------------------------------- identity of the model


def test_original_is_untouched_and_keys_round_trip():
    model = _model("resnet18")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types_before = [type(m) for m in model.modules()]
    fused, _ = rf.fuse_model(model)
    assert [type(m) for m in model.modules()] == types_before
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(fused.layer1[0], FusedBasicBlock)
    assert isinstance(fused.conv1, FusedConvBNAct) and isinstance(fused.bn1, AbsorbedBatchNorm2d)
    assert list(fused.state_dict()) == list(model.state_dict())
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in model.named_parameters()]
    other = _model("resnet18")
    fused.load_state_dict(other.state_dict())  # unfused -> fused
    model.load_state_dict(fused.state_dict())  # fused -> unfused
    x = torch.randn(2, 3, 32, 32)
    expected, out = _eval_both(other, fused, x)
    assert_matches(out, expected, torch.float32)
    assert_matches(model.eval()(x), expected, torch.float32)


def test_inplace_fuses_the_given_model():
    model = _model("resnet50")
    fused, _ = rf.fuse_model(model, inplace=True)
    assert fused is model and isinstance(model.layer1[0], FusedBottleneck)


def _forward_both(model, fused, x):
    # No .eval() here: it clears the fused model's cached folds, and these tests check that the cache itself sees
    # each change.
    with torch.no_grad():
        return model(x), fused(x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_changes_reach_the_fused_model(backend):
    torch.manual_seed(0)
    model = _model("resnet18").eval()
    fused, _ = rf.fuse_model(model, backend=backend)  # a copy: each change is made to both models
    x = torch.randn(2, 3, 32, 32)
    both = (model, fused)

    def in_place(m):
        m.conv1.weight.mul_(2)  # the stem (FusedConvBNAct) and a block conv
        m.bn1.running_var.mul_(3)
        m.layer2[0].conv2.weight.mul_(2)

    def fused_optimizer_step(m):  # updates parameters without bumping their version counters
        for p in m.parameters():
            p.grad = torch.full_like(p, 0.5)
        torch.optim.SGD(m.parameters(), lr=0.1, fused=True).step()

    def conv_attributes(m):
        m.layer1[0].conv2.padding_mode = "reflect"
        m.layer1[1].conv1.dilation, m.layer1[1].conv1.padding = (2, 2), (2, 2)

    def load_state_dict(m):
        m.load_state_dict(fresh_state)

    fresh_state = _model("resnet18").state_dict()
    _forward_both(model, fused, x)
    for change in (in_place, fused_optimizer_step, conv_attributes, load_state_dict):
        with torch.no_grad():
            for m in both:
                change(m)
        expected, out = _forward_both(model, fused, x)
        assert_matches(out, expected, torch.float32)


def test_a_weight_assigned_through_data_is_seen_even_at_a_reused_address():
    # `p.data = t` keeps p's version counter; without the cache holding the old tensor, the allocator handed the
    # new one the old address in 4-5 of 20 rounds here, and the stale fold matched.
    fused, _ = rf.fuse_model(_model("resnet18").eval())
    weight = fused.layer1[0].conv1.weight
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for _ in range(20):
            weight.data = torch.randn_like(weight)
            weight.data = torch.randn_like(weight)
            out = fused(x)
            fused.eval()  # drops the cache: the reference below folds from scratch
            assert_matches(out, fused(x), torch.float32)


def test_eager_training_of_a_shared_block_reaches_the_fused_one():
    # from_block shares the tensors; eager BatchNorm training updates running_mean/var without bumping their
    # version counters (num_batches_tracked does move).
    block = _randomize_bn(rf.BasicBlock(16, 16)).eval()
    fused = FusedBasicBlock.from_block(block)
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        fused(x)
        block.train()(torch.randn(4, 16, 8, 8) + 1)
        block.eval()  # the eager block's (and the shared BNs') flags; the fused block's cache is not cleared by it
        assert not fused.training
        assert_matches(fused(x), block(x), torch.float32)


def test_fusing_under_inference_mode_keeps_the_folds_cacheable():
    # Inference tensors carry no version counter, so a fold made from them could never be cached (re-packed on
    # every call, 3.6x slower on resnet50 here): fuse_model copies outside inference mode.
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        model = _model("resnet18").eval()
        fused, _ = rf.fuse_model(model)
        assert not any(t.is_inference() for t in [*fused.parameters(), *fused.buffers()])
        expected, out = model(x), fused(x)
    assert_matches(out, expected, torch.float32)
    assert fused.layer1[0].__dict__["_bindings"].packs  # the folds were kept


def test_a_block_of_inference_tensors_is_correct_and_says_it_cannot_cache():
    x = torch.randn(2, 16, 8, 8)
    with torch.inference_mode():
        block = _randomize_bn(rf.BasicBlock(16, 16)).eval()
        fused = FusedBasicBlock.from_block(block)
        with pytest.warns(RuntimeWarning, match="inference tensors .* rebuilt on every call"):
            assert_matches(fused(x), block(x), torch.float32)
            assert fused.__dict__.get("_bindings") is None
            block.bn2.running_mean.add_(1)  # no version counter sees this: re-folding on every call does
            assert_matches(fused(x), block(x), torch.float32)


def test_edits_through_data_are_seen_after_eval():
    # In-place edits through .data bypass every version counter; .eval() (or clear_fold_cache) re-reads weights.
    model = _model("resnet18").eval()
    fused, _ = rf.fuse_model(model)
    x = torch.randn(2, 3, 32, 32)
    _forward_both(model, fused, x)
    for m in (model, fused):
        m.layer1[0].bn1.running_var.data.mul_(4)
    expected, out = _eval_both(model, fused, x)
    assert_matches(out, expected, torch.float32)


def test_batchnorm_replaced_after_fusing_is_an_error_not_a_second_normalization():
    model = _model("resnet18").eval()
    fused, _ = rf.fuse_model(model)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(fused))
    with pytest.raises(RuntimeError, match="'bn1' is now a SyncBatchNorm: convert or replace modules"):
        synced(torch.randn(1, 3, 32, 32))
    fused.bn1 = nn.BatchNorm2d(64)
    with pytest.raises(RuntimeError, match="'bn1' is now a BatchNorm2d"):
        fused(torch.randn(1, 3, 32, 32))


def test_deepcopy_after_a_forward_with_a_parametrized_weight():
    # torch.nn.utils.parametrize deep-copies a module's __dict__ itself: the cached packs must not go with it.
    model = _model("resnet18").eval()
    fused, _ = rf.fuse_model(model)
    for m in (model, fused):
        torch.nn.utils.parametrizations.weight_norm(m.conv1)
    x = torch.randn(2, 3, 32, 32)
    _forward_both(model, fused, x)
    expected, out = _forward_both(model, copy.deepcopy(fused), x)
    assert_matches(out, expected, torch.float32)


def test_fused_model_keeps_the_training_flags():
    for train in (False, True):
        fused, _ = rf.fuse_model(_model("resnet18").train(train))
        assert {m.training for m in fused.modules()} == {train}


def test_torch_save_load_and_compile():
    model = _model("resnet18").eval()
    fused, _ = rf.fuse_model(model)
    x = torch.randn(2, 3, 32, 32)
    expected, _ = _eval_both(model, fused, x)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False).eval()
    assert loaded.bn1 is not fused.bn1 and loaded.conv1.absorbed_bn is loaded.bn1  # sharing survives pickling
    torch._dynamo.reset()
    compiled = torch.compile(loaded, backend="aot_eager")
    with torch.no_grad():
        assert_matches(loaded(x), expected, torch.float32)
        assert_matches(compiled(x), expected, torch.float32)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_torch_export_keeps_the_fused_ops(backend):
    # torch.export traces the fused ops as single nodes (their fake kernels give shapes), with the BN fold in the
    # graph, so the exported program computes what the eager model does and follows its weights.
    reason = rf.available_backends("cpu")[backend]
    if reason is not None:
        pytest.skip(f"backend {backend!r}: {reason}")
    model = _randomize_bn(NarrowResNet() if backend == "triton" else _model("resnet18")).eval()
    fused, _ = rf.fuse_model(model, backend=backend)
    x = torch.randn(1, 3, 33, 29)
    with torch.no_grad():
        program = torch.export.export(fused, (x,))
        targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
        namespace = "resnet_fused_triton" if backend == "triton" else "resnet_fused"
        n_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
        assert targets.count(f"{namespace}.conv_bn_act.default") == n_convs
        assert not any("convolution" in t or "batch_norm" in t for t in targets)
        assert_matches(program.module()(x), model(x), torch.float32)
        state = {k: v * 1.5 if k.endswith("running_var") else v for k, v in model.state_dict().items()}
        model.load_state_dict(state)
        exported = program.module()
        exported.load_state_dict(state)  # the fold is traced: new statistics reach the exported program
        assert_matches(exported(x), model(x), torch.float32)


def test_a_fused_model_runs_on_the_meta_device():
    # Shape inference without memory, as eager allows (meta has no autocast; the "torch" backend serves it).
    model = _model("resnet18")
    fused, _ = rf.fuse_model(model)
    fused = fused.to("meta")
    x = torch.randn(2, 3, 64, 64, device="meta")
    for train in (False, True):
        fused.train(train)
        with torch.no_grad():
            y = fused(x)
        assert y.device.type == "meta" and y.shape == (2, 10)


def test_bad_arguments():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        rf.fuse_model("resnet")
    with pytest.raises(ValueError, match="backend must be"):
        rf.fuse_model(nn.Sequential(), backend="fastest")
    with pytest.raises(TypeError, match="inplace must be a bool"):
        rf.fuse_model(nn.Sequential(), inplace=1)


# ------------------------------------------------------------------------------------------- user variants


class TutorialBlock(nn.Module):
    """The pytorch-cifar style block: `shortcut` (empty Sequential or conv+BN), F.relu in forward."""

    def __init__(self, cin, cout, stride=1, bias=False, projection_bn=True):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=bias)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=bias)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            layers = [nn.Conv2d(cin, cout, 1, stride, bias=bias or not projection_bn)]
            self.shortcut = nn.Sequential(*layers, *([nn.BatchNorm2d(cout)] if projection_bn else []))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return F.relu(out)


class LeftRightBlock(nn.Module):
    """Main path as one nn.Sequential, bias=True convs, ReLU built inside forward, add operands swapped."""

    def __init__(self, c):
        super().__init__()
        self.left = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=True), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                                  nn.Conv2d(c, c, 3, 1, 1, bias=True), nn.BatchNorm2d(c))

    def forward(self, x):
        return nn.ReLU()(x + self.left(x))


class SEBottleneck(nn.Module):
    def __init__(self, c, drop_path=False):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c // 2, 1, bias=False), nn.BatchNorm2d(c // 2)
        self.conv2, self.bn2 = nn.Conv2d(c // 2, c // 2, 3, 1, 1, bias=False), nn.BatchNorm2d(c // 2)
        self.conv3, self.bn3 = nn.Conv2d(c // 2, c, 1, bias=False), nn.BatchNorm2d(c)
        self.act1, self.act2, self.act3 = nn.ReLU(inplace=True), nn.ReLU(inplace=True), nn.ReLU(inplace=True)
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, 4, 1), nn.ReLU(), nn.Conv2d(4, c, 1),
                                nn.Sigmoid())
        self.drop_path = drop_path

    def forward(self, x):
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = out * self.se(out)
        if self.drop_path and self.training:
            out = out * (torch.rand_like(out[:, :1, :1, :1]) >= 0.0).float()  # keep-all drop-path: deterministic
        return self.act3(out + x)


class Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace it, its Sequential children still fuse."""

    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())

    def forward(self, x):
        if x.sum() > -1e9:
            return self.body(x)
        return x


def _user_model():
    relu = nn.ReLU(inplace=True)
    return _randomize_bn(nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), relu),  # stem in a Sequential
        TutorialBlock(8, 8),                                   # empty-Sequential identity shortcut
        TutorialBlock(8, 16, stride=2),                         # conv+BN projection named `shortcut`
        TutorialBlock(16, 16, bias=True),                       # bias=True convs
        TutorialBlock(16, 24, stride=2, projection_bn=False),   # 1x1 projection without BN
        LeftRightBlock(24),
        nn.Sequential(nn.Conv2d(24, 24, 1), nn.BatchNorm2d(24), relu),  # the shared ReLU module stays
        SEBottleneck(24),
        Untraceable(24),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5)))


def test_user_variants_fuse_and_match_eval_and_train():
    model = _user_model()
    fused, report = rf.fuse_model(model)
    for index in ("1", "2", "3", "4", "5"):
        assert isinstance(fused.get_submodule(index), FusedResidualBlock), index
    assert "shortcut.0+shortcut.1" in [f for f in report.blocks if f.name == "2"][0].detail
    assert "[left.0+left.1+relu -> left.3+left.4] + [identity]" in [f for f in report.blocks if f.name == "5"][0].detail
    assert isinstance(fused[0][0], FusedConvBNAct) and isinstance(fused[6][0], FusedConvBNAct)
    assert type(fused[0][2]) is nn.ReLU, "a ReLU module used twice is not replaced"
    # SE block: chains fused, the add+ReLU left, and the report says why
    assert isinstance(fused[7], SEBottleneck)
    assert isinstance(fused[7].conv1, FusedConvBNAct) and fused[7].conv1.fused_relu
    assert isinstance(fused[7].conv3, FusedConvBNAct) and not fused[7].conv3.fused_relu
    left = {item.name: item.reason for item in report.left}
    assert "not fused as a whole" in left["7"] and "7.se" in left
    assert "not traceable" in left["8"]
    assert isinstance(fused[8].body[0], FusedConvBNAct)
    assert list(fused.state_dict()) == list(model.state_dict())
    text = str(report)
    assert "fused" in text and "7.se" in text and report.summary() == text

    x = torch.randn(2, 3, 16, 16)
    expected, out = _eval_both(model, fused, x)
    assert_matches(out, expected, torch.float32)
    model.train(), fused.train()
    xe, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_e, out_f = model(xe), fused(xf)
    assert_matches(out_f, out_e, torch.float32)
    out_e.square().sum().backward(), out_f.square().sum().backward()
    assert_matches(xf.grad, xe.grad, TOLERANCES["tf32"])
    for (name, pe), (_, pf) in zip(model.named_parameters(), fused.named_parameters()):
        assert_matches(pf.grad, pe.grad, TOLERANCES["tf32"])
    for (name, be), (_, bf) in zip(model.named_buffers(), fused.named_buffers()):
        assert_matches(bf, be, torch.float32)


class ShortcutBlock(nn.Module):
    """conv-BN-ReLU, conv-BN, then `+ shortcut(x)` out of place or in place, then ReLU."""

    def __init__(self, c, shortcut, inplace_add):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.shortcut, self.inplace_add = shortcut, inplace_add

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.inplace_add:
            out += self.shortcut(x)
        else:
            out = out + self.shortcut(x)
        return F.relu(out)


class ToDouble(nn.Module):
    def forward(self, x):
        return x.double()


@pytest.mark.parametrize("inplace_add", [False, True], ids=["add", "iadd"])
def test_a_broadcasting_shortcut_adds_as_eager(inplace_add):
    model = _randomize_bn(ShortcutBlock(8, nn.AdaptiveAvgPool2d(1), inplace_add))
    fused, report = rf.fuse_model(model)
    assert isinstance(fused, FusedResidualBlock)
    x = torch.randn(2, 8, 6, 6)
    expected, out = _eval_both(model, fused, x)
    assert_matches(out, expected, torch.float32)
    model.train(), fused.train()
    assert_matches(fused(x), model(x), torch.float32)


@pytest.mark.parametrize("inplace_add", [False, True], ids=["add", "iadd"])
def test_the_sum_takes_the_dtype_eager_gives_it(inplace_add):
    # `out + identity` promotes (an fp32 identity under bf16 autocast, a float64 shortcut); `out += identity`
    # keeps out's dtype
    x = torch.randn(2, 8, 6, 6)
    for shortcut, autocast in ((nn.Identity(), True), (ToDouble(), False)):
        model = _randomize_bn(ShortcutBlock(8, shortcut, inplace_add)).eval()
        fused, _ = rf.fuse_model(model)
        assert isinstance(fused, FusedResidualBlock)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            expected, out = model(x), fused(x)
        assert out.dtype == expected.dtype
        assert_matches(out, expected.float(), torch.bfloat16 if autocast else torch.float32)


def test_drop_path_in_a_bottleneck_converts_partially():
    model = _randomize_bn(nn.Sequential(SEBottleneck(16, drop_path=True)))
    fused, report = rf.fuse_model(model)
    assert not report.blocks
    assert [c.name for c in report.chains] == ["0.conv1", "0.conv2", "0.conv3", "0.se.1"]
    assert any(item.name == "0" and "not fused as a whole" in item.reason for item in report.left)
    x = torch.randn(2, 16, 8, 8)
    expected, out = _eval_both(model, fused, x)
    assert_matches(out, expected, torch.float32)
    model.train(), fused.train()
    assert_matches(fused(x), model(x), torch.float32)


def test_a_single_block_as_the_model():
    block = _randomize_bn(TutorialBlock(8, 16, stride=2))
    fused, report = rf.fuse_model(block)
    assert isinstance(fused, FusedResidualBlock) and report.blocks[0].name == ""
    x = torch.randn(1, 8, 9, 9)
    expected, out = _eval_both(block, fused, x)
    assert_matches(out, expected, torch.float32)


# ------------------------------------------------------------------------------------------- torchvision / timm


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2"])
def test_torchvision_models(name):
    models = require("torchvision.models")
    model = _randomize_bn(getattr(models, name)(num_classes=10))
    fused, report = rf.fuse_model(model)
    assert len(report.blocks) == sum(len(getattr(model, f"layer{i}")) for i in range(1, 5))
    x = torch.randn(2, 3, 64, 64)
    expected, out = _eval_both(model, fused, x)
    assert_matches(out, expected, torch.float32)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet50d", "seresnet50", "resnet26t"])
def test_timm_models(name):
    timm = require("timm")
    model = _randomize_bn(timm.create_model(name, pretrained=False, num_classes=10))
    fused, report = rf.fuse_model(model)
    assert report.fused
    assert list(fused.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    expected, out = _eval_both(model, fused, x)
    assert_matches(out, expected, torch.float32)
    if not name.startswith("se"):
        assert len(report.blocks) == sum(len(getattr(model, f"layer{i}")) for i in range(1, 5))


# ------------------------------------------------------------------------------------------- triton, whole model

class NarrowResNet(nn.Module):
    """torchvision's ResNet structure at small widths, so that a whole model runs through the Triton interpreter
    in seconds: the 7x7 stem (flat-K layout) and max-pool, Bottlenecks with and without a projection, a stride-2
    BasicBlock with a strided 1x1 downsample, pooling and the classifier."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(rf.Bottleneck(16, 8, downsample=_projection(16, 32, 1)), rf.Bottleneck(32, 8))
        self.layer2 = nn.Sequential(rf.BasicBlock(32, 48, stride=2, downsample=_projection(32, 48, 2)))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(48, 10)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _projection(inplanes, outplanes, stride):
    return nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride, bias=False), nn.BatchNorm2d(outplanes))


@pytest.mark.skipif(rf.available_backends("cpu")["triton"] is not None,
                    reason=f"triton backend: {rf.available_backends('cpu')['triton']}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_whole_model_through_the_triton_backend(dtype):
    # The path a GPU takes (fuse_model -> triton packs -> both K layouts, residual epilogues, downsample), run by
    # the Triton interpreter on CPU tensors; odd input size and batch 1.
    model = _randomize_bn(NarrowResNet()).eval()
    fused, report = rf.fuse_model(model, backend="triton")
    assert len(report.blocks) == 3 and [c.name for c in report.chains] == ["conv1"] and not report.left
    x = torch.randn(1, 3, 37, 29)
    with torch.no_grad():
        truth = model(x.to(dtype).float())
        eager = copy.deepcopy(model).to(dtype)(x.to(dtype))
        out = fused.to(dtype)(x.to(dtype))
    assert out.dtype == dtype
    assert_no_worse_than_eager(out, eager, truth, dtype)
