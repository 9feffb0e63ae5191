"""A fused model whose forward is a plain chain replayed as one _C.ChainProgram (resnet_fused/chained.py,
fusion/analysis.plain_chain). These tests pin that the replay computes bitwise what the model's own forward computes,
that it is used where it should be, that it is never used once anything it was made from changed (weights in place or
swapped, module attributes and forwards, children replaced, hooks, the input's signature and layout, the default
backend, train mode), and that the model stays its class's object: isinstance, state_dict, copies and pickles.
"""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import resnet_fused as rf
from resnet_fused import _C
from resnet_fused.chained import ChainedModel
from resnet_fused.fusion.analysis import plain_chain, trace_shallow
from resnet_fused.fusion.plan import ChainStep
from resnet_fused.models import ResNet, resnet18, resnet50
from tests.oracle import assert_matches
from tests.test_blocks import _randomize_bn

pytestmark = pytest.mark.skipif(rf.available_backends("cpu")["cpu"] is not None,
                                reason=f"the 'cpu' backend is unavailable: {rf.available_backends('cpu')['cpu']}")

CL = torch.channels_last
RESNET_STEPS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", None, "fc")


def _fused(make=resnet18, backend="cpu"):
    torch.manual_seed(0)
    model = _randomize_bn(make()).eval().to(memory_format=CL)
    fused, report = rf.fuse_model(model, backend=backend)
    return model, fused, report


def _input(batch=2, size=48):
    return torch.randn(batch, 3, size, size).contiguous(memory_format=CL)


def _replaying():
    """A fused resnet18, an input, and its output from the two inference forwards that made its program."""
    _, fused, _ = _fused()
    x = _input()
    with torch.inference_mode():
        expected = fused(x)
        fused(x)
    return fused, x, expected


def _program(model):
    run = model.__dict__.get("_chain_run")
    return None if run is None else run.program


def _unchained(fused):
    """The same fused model running its class's own forward: the stages called from Python."""
    plain = copy.deepcopy(fused)
    plain.__class__ = plain._chained_base
    return plain


@pytest.mark.parametrize("make,batch,size", [(resnet18, 2, 48), (resnet18, 1, 37), (resnet50, 1, 64)],
                         ids=["resnet18-b2", "resnet18-b1-odd", "resnet50-b1"])
def test_the_replay_is_bitwise_the_model_forward(make, batch, size):
    model, fused, report = _fused(make)
    assert report.chain == "conv1 -> bn1 -> relu -> maxpool -> layer1 -> layer2 -> layer3 -> layer4 -> avgpool -> " \
                           "flatten(1, -1) -> fc"
    assert "chain  <model> conv1 -> bn1" in report.summary()
    assert tuple(s.module for s in fused._chain_steps) == RESNET_STEPS
    plain = _unchained(fused)
    x = _input(batch, size)
    with torch.inference_mode():
        first = fused(x)  # runs the steps, then makes the program
        assert isinstance(_program(fused), _C.ChainProgram)
        replayed = fused(x)
        expected = plain(x)
        assert_matches(replayed, model(x), torch.float32)
    assert torch.equal(first, expected) and torch.equal(replayed, expected)


def test_a_program_made_in_one_grad_mode_replays_in_the_other():
    fused, x, expected = _replaying()
    with torch.no_grad():
        assert torch.equal(fused(x), expected)
        program = _program(fused)
        assert torch.equal(fused(x), expected) and _program(fused) is program
    with torch.inference_mode():
        out = fused(x)
    assert torch.equal(out, expected) and out.is_inference() and _program(fused) is program


def test_the_fused_model_stays_an_object_of_its_class():
    model, fused, _ = _fused()
    assert isinstance(fused, ResNet) and isinstance(fused, ChainedModel) and type(fused).__name__ == "ResNet"
    assert type(fused)._chained_base is ResNet and type(model) is ResNet
    assert list(fused.state_dict()) == list(model.state_dict())
    assert repr(fused).startswith("ResNet(")
    again, report = rf.fuse_model(fused, backend="cpu")  # fusing a fused model: the same class, the same chain
    assert type(again) is type(fused) and report.chain is not None
    x = _input()
    with torch.inference_mode():
        assert torch.equal(again(x), fused(x))


def test_torchvision_resnet_is_chained():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = _randomize_bn(torchvision.models.resnet18()).eval()
    fused, report = rf.fuse_model(model, backend="cpu")
    assert isinstance(fused, torchvision.models.ResNet) and report.chain is not None
    x = _input(batch=1)
    with torch.inference_mode():
        for _ in range(2):
            assert_matches(fused(x), model(x), torch.float32)
    assert isinstance(_program(fused), _C.ChainProgram)


def test_timm_resnet_is_chained_through_its_pooling_module():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = _randomize_bn(timm.create_model("resnet18")).eval()
    fused, report = rf.fuse_model(model, backend="cpu")
    assert report.chain.endswith("layer4 -> global_pool.pool -> global_pool.flatten -> fc")  # its forward's steps
    plain = _unchained(fused)
    x = _input(batch=1)
    with torch.inference_mode():
        outs = [fused(x) for _ in range(2)]
        assert isinstance(_program(fused), _C.ChainProgram)
        assert torch.equal(outs[0], plain(x)) and torch.equal(outs[1], outs[0])
        assert_matches(outs[1], model(x), torch.float32)
        seen = []
        fused.global_pool.register_forward_hook(lambda m, args, out: seen.append(out.shape))
        assert torch.equal(fused(x), outs[0]) and seen == [(1, 512)]  # the container's hook runs: its forward does
        fused.global_pool.flatten = nn.Identity()  # a nested step replaced: (1, 512, 1, 1) to the classifier
        with pytest.raises(RuntimeError):
            fused(x)


def _edits():
    def stem_in_place(f, m):
        with torch.no_grad():
            for model in (f, m):
                model.conv1.weight.mul_(-0.5)
                model.bn1.running_var.add_(1.0)

    def block_in_place(f, m):
        with torch.no_grad():
            for model in (f, m):
                model.layer2[1].conv1.weight.mul_(-0.5)

    def classifier_in_place(f, m):
        with torch.no_grad():
            for model in (f, m):
                model.fc.weight.mul_(2.0)
                model.fc.bias.add_(1.0)

    def classifier_swapped(f, m):
        for model in (f, m):
            model.fc.weight.data = model.fc.weight.data * 0.25

    def classifier_replaced(f, m):
        torch.manual_seed(1)
        linear = nn.Linear(512, 10)
        f.fc, m.fc = copy.deepcopy(linear), linear

    def pooling_attribute(f, m):
        for model in (f, m):
            model.maxpool.padding = 0

    def pooling_forward_replaced(f, m):
        for model in (f, m):
            model.maxpool.forward = lambda t: nn.functional.avg_pool2d(t, 2)

    def stage_forward_replaced(f, m):
        for model in (f, m):
            stage = model.layer2
            stage.forward = lambda t: nn.Sequential.forward(stage, t) * 0.5

    def block_attribute(f, m):
        for model in (f, m):
            model.layer3[0].bn2.eps = 0.5

    def stage_replaced(f, m):
        stage = copy.deepcopy(m.layer4)
        with torch.no_grad():
            stage[0].conv1.weight.mul_(-1.0)
        m.layer4, (f.layer4, _) = stage, rf.fuse_model(stage, backend="cpu")  # a fused stage of other weights

    return [stem_in_place, block_in_place, classifier_in_place, classifier_swapped, classifier_replaced,
            pooling_attribute, pooling_forward_replaced, stage_forward_replaced, block_attribute, stage_replaced]


@pytest.mark.parametrize("edit", _edits(), ids=lambda e: e.__name__)
def test_a_change_after_a_forward_is_seen_by_the_next(edit):
    model, fused, _ = _fused()
    twin = copy.deepcopy(model)  # the eager twin the edits are mirrored on (fuse_model copied `model`)
    twin.load_state_dict(fused.state_dict())
    x = _input()
    with torch.no_grad():
        fused(x), fused(x)
    assert isinstance(_program(fused), _C.ChainProgram)
    edit(fused, twin)
    with torch.no_grad():
        for _ in range(2):
            assert_matches(fused(x), twin(x), torch.float32)


def test_hooks_registered_after_the_program_was_made_are_called():
    fused, x, _ = _replaying()
    seen = []
    handles = [fused.fc.register_forward_hook(lambda m, args, out: seen.append("fc")),
               fused.register_forward_hook(lambda m, args, out: seen.append("model")),
               fused.layer3.register_forward_pre_hook(lambda m, args: seen.append("layer3"))]
    with torch.inference_mode():
        fused(x), fused(x)
    assert seen == ["layer3", "fc", "model"] * 2
    for handle in handles:
        handle.remove()


def test_other_inputs_layouts_and_backends_are_not_replayed_with_a_program_made_for_another():
    torch.manual_seed(0)
    model = _randomize_bn(resnet18()).eval().to(memory_format=CL)
    fused, _ = rf.fuse_model(model)  # backend "auto": the default backend at each call
    inputs = [_input(batch=2), _input(batch=1, size=40), _input(batch=2).contiguous(), _input(batch=2)]
    with torch.inference_mode(), rf.use_backend("cpu"):
        for x in inputs:
            programs = []
            for _ in range(2):
                assert_matches(fused(x), model(x), torch.float32)
                programs.append(_program(fused))
            assert programs[0] is programs[1] and isinstance(programs[0], _C.ChainProgram)
    with torch.inference_mode(), rf.use_backend("torch"):
        for _ in range(2):
            assert_matches(fused(x), model(x), torch.float32)
            assert _program(fused) is None  # the torch backend's steps bind no C++ calls
    with torch.inference_mode(), rf.use_backend("cpu"):
        assert_matches(fused(x), model(x), torch.float32)
        assert isinstance(_program(fused), _C.ChainProgram)


def test_autograd_and_tensor_subclasses_run_the_model_forward():
    model, fused, _ = _fused()
    x = _input()
    with torch.inference_mode():
        fused(x), fused(x)
    program = _program(fused)
    y = fused(x.clone().requires_grad_())  # grad mode: the model's own forward, which autograd records
    assert y.requires_grad and y.grad_fn is not None
    with torch.no_grad():
        assert_matches(y.detach(), model(x), torch.float32)

    class Tagged(torch.Tensor):
        pass

    with torch.inference_mode():
        out = fused(x.as_subclass(Tagged))
    assert type(out) is Tagged and _program(fused) is program


def test_copies_and_pickles_come_back_chained_without_a_program():
    fused, x, expected = _replaying()
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused)), torch.load(buffer, weights_only=False)):
        assert type(clone) is type(fused) and _program(clone) is None
        assert clone._chain_steps == fused._chain_steps
        with torch.inference_mode():
            assert torch.equal(clone(x), expected)
            assert torch.equal(clone(x), expected)
        assert isinstance(_program(clone), _C.ChainProgram) and _program(clone) is not _program(fused)


def test_train_mode_and_conversions_drop_the_program():
    _, fused, _ = _fused()
    x = _input()
    for change in (lambda: fused.train(), lambda: fused.float(), lambda: fused.to(memory_format=CL)):
        fused.eval()
        with torch.inference_mode():
            fused(x)
        assert isinstance(_program(fused), _C.ChainProgram)
        change()
        assert _program(fused) is None


# ------------------------------------------------------------------------------------------- the proof


class Net(nn.Module):
    """A user's model: a stem chain, a stage of fused blocks, a head written with a method flatten."""

    def __init__(self, flatten="method"):
        super().__init__()
        self.flatten = flatten
        self.conv, self.bn, self.act = nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        self.stage = nn.Sequential(rf.BasicBlock(16, 16), rf.BasicBlock(16, 16))
        self.pool, self.head = nn.AdaptiveAvgPool2d(1), nn.Linear(16, 5)

    def forward(self, x):
        x = self.stage(self.act(self.bn(self.conv(x))))
        x = self.pool(x)
        x = x.flatten(1) if self.flatten == "method" else torch.flatten(x, start_dim=1, end_dim=-1)
        return self.head(x)


@pytest.mark.parametrize("flatten", ["method", "function"])
def test_a_user_model_of_a_plain_chain_is_replayed(flatten):
    torch.manual_seed(0)
    model = _randomize_bn(Net(flatten)).eval()
    fused, report = rf.fuse_model(model, backend="cpu")
    assert report.chain == "conv -> bn -> act -> stage -> pool -> flatten(1, -1) -> head"
    assert isinstance(fused, Net)
    x = torch.randn(3, 3, 21, 19).contiguous(memory_format=CL)
    with torch.inference_mode():
        outs = [fused(x) for _ in range(3)]
        assert_matches(outs[0], model(x), torch.float32)
    assert isinstance(_program(fused), _C.ChainProgram)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


class Shared(nn.Module):
    """A ReLU module called twice (so no conv absorbs it), an in-place one, and a head as an nn.Sequential."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8)
        self.act, self.act_ = nn.ReLU(), nn.ReLU(inplace=True)
        self.stage = nn.Sequential(rf.BasicBlock(8, 8), rf.BasicBlock(8, 8))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(8, 3))

    def forward(self, x):
        x = self.act(self.bn1(self.conv1(x)))
        x = self.act_(self.act(self.bn2(self.conv2(x))))
        return self.head(self.stage(x))


def test_relu_dropout_and_sequential_children_are_steps_too():
    torch.manual_seed(0)
    model = _randomize_bn(Shared()).eval()
    fused, report = rf.fuse_model(model, backend="cpu")
    assert report.chain == "conv1 -> bn1 -> act -> conv2 -> bn2 -> act -> act_ -> stage -> head.0 -> head.1 -> " \
                           "head.2 -> head.3"
    plain = _unchained(fused)
    x = torch.randn(2, 3, 15, 13).contiguous(memory_format=CL)
    with torch.inference_mode():
        outs = [fused(x) for _ in range(3)]
        assert isinstance(_program(fused), _C.ChainProgram)
        assert torch.equal(outs[0], plain(x)) and torch.equal(outs[1], outs[0]) and torch.equal(outs[2], outs[0])
        assert_matches(outs[2], model(x), torch.float32)
        fused.head[2].train(), model.head[2].train()  # dropout active again: never replayed as the identity
        torch.manual_seed(1)
        dropped = fused(x)
        torch.manual_seed(1)
        assert_matches(dropped, model(x), torch.float32)  # the same mask: the same seed, no other draws
        assert not torch.equal(dropped, outs[0])


class Flagged(Net):
    """A forward that branches on a plain attribute: the proof holds for the value it had when fused."""

    def __init__(self):
        super().__init__()
        self.halve = False

    def forward(self, x):
        x = self.pool(self.stage(self.act(self.bn(self.conv(x)))))
        if self.halve:
            x = x * 0.5
        return self.head(x.flatten(1))


def test_a_plain_attribute_the_forward_branches_on_is_seen():
    torch.manual_seed(0)
    model = _randomize_bn(Flagged()).eval()
    fused, report = rf.fuse_model(model, backend="cpu")
    assert report.chain == "conv -> bn -> act -> stage -> pool -> flatten(1, -1) -> head"
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        fused(x), fused(x)
        assert isinstance(_program(fused), _C.ChainProgram)
        for halve in (True, False, True):
            fused.halve = model.halve = halve
            for _ in range(2):
                assert_matches(fused(x), model(x), torch.float32)  # halved: the model's own forward runs
            assert isinstance(_program(fused), _C.ChainProgram)  # the one made before, replayed again once False


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1)
        self.inner = nn.Sequential(nn.ReLU())

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def _steps(forward):
    """plain_chain's steps of a Branchy whose forward is `forward`."""
    module = type("Probe", (Branchy,), {"forward": forward})()
    graph, error, _ = trace_shallow(module)
    assert graph is not None, error
    return plain_chain(module, graph)


def test_plain_chain_proves_only_a_chain():
    chains = {
        (ChainStep("a"), ChainStep("b"), ChainStep("c")): lambda self, x: self.c(self.b(self.a(x))),
        (ChainStep("a"), ChainStep(None, (2, -1))): lambda self, x: torch.flatten(self.a(x), 2),
        (ChainStep("a"), ChainStep(None, (1, 3))): lambda self, x: self.a(x).flatten(1, self.c.out_channels - 1),
    }
    for steps, forward in chains.items():
        assert _steps(forward) == steps
    not_chains = [
        lambda self, x: self.a(x) + self.a(x),                # a value read twice
        lambda self, x: self.c(self.a(x)) + x,                # the input read twice
        lambda self, x: self.a(x) * 2,                        # an operation that is no step
        lambda self, x: self.inner[0](self.a(x)),             # a grandchild
        lambda self, x: self.a(x).flatten(1, x.dim() - 1),    # dims computed from a value
        lambda self, x: x,                                    # no step
        lambda self, x: (self.a(x), self.c(self.a(x))),       # a tuple out
    ]
    assert [_steps(forward) for forward in not_chains] == [None] * len(not_chains)


class TwoInputs(Net):
    def forward(self, x, scale=1.0):
        return super().forward(x) * scale


class Renamed(Net):
    def forward(self, inputs):
        return super().forward(inputs)


class Dropping(Net):
    def forward(self, x):
        x = self.pool(self.stage(self.act(self.bn(self.conv(x)))))
        if self.training:
            x = nn.functional.dropout(x, 0.5)
        return self.head(x.flatten(1))


@pytest.mark.parametrize("cls", [TwoInputs, Renamed, Dropping])
def test_models_that_are_no_plain_chain_are_fused_but_not_chained(cls):
    torch.manual_seed(0)
    model = _randomize_bn(cls()).eval()
    fused, report = rf.fuse_model(model, backend="cpu")
    assert report.chain is None and type(fused) is cls and len(report.blocks) == 2
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        assert_matches(fused(x), model(x), torch.float32)


def test_other_backends_are_not_chained():
    _, fused, report = _fused(backend="torch")
    assert report.chain is None and type(fused) is ResNet


def test_chain_programs_reject_what_they_cannot_run():
    with pytest.raises(RuntimeError, match="at least one step"):
        _C.ChainProgram([], [])
    with pytest.raises(RuntimeError, match="a step must be"):
        _C.ChainProgram(["flatten"], [])
    with pytest.raises(RuntimeError, match="watches must be"):
        _C.ChainProgram([(1, -1)], [object()])
    program = _C.ChainProgram([(1, -1)], [])
    x = torch.randn(2, 3, 4, 5)
    assert torch.equal(program(x), x.flatten(1))
    pool = _C.BoundCall("resnet_fused::mean_pool_cl", "", (torch.empty(0),), 0, -1, -1)  # no residual argument
    t = torch.randn(2, 8, 3, 3).contiguous(memory_format=CL)
    assert torch.equal(_C.ChainProgram([pool, (1, -1)], [])(t), torch.ops.resnet_fused.mean_pool_cl(t).flatten(1))
    with pytest.raises(RuntimeError, match="positions out of range"):  # a donation flag needs a residual
        _C.BoundCall("resnet_fused::mean_pool_cl", "", (torch.empty(0),), 0, -1, 0)
