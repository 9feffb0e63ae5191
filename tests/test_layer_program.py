"""Fused blocks replayed in C++ (csrc/bound_program.cpp, fusion/binding.py): a block's eval forward as one
_C.BlockProgram, a FusedSequential's blocks as one _C.LayerProgram. These tests pin that the replay computes bitwise
what the Python steps compute, that it is used where it should be, and that it is never used once anything it was
made from changed: weights in place or swapped, module attributes, hooks, a replaced forward, the input's signature,
train mode, the default backend.
"""

import copy
import pickle

import pytest
import torch
from torch import nn

import resnet_fused as rf
from resnet_fused import _C
from resnet_fused.blocks import FusedSequential
from resnet_fused.fusion import binding
from resnet_fused.models import resnet18, resnet50
from tests.oracle import assert_matches
from tests.test_blocks import _randomize_bn

pytestmark = pytest.mark.skipif(rf.available_backends("cpu")["cpu"] is not None,
                                reason=f"the 'cpu' backend is unavailable: {rf.available_backends('cpu')['cpu']}")

CL = torch.channels_last


def _fused(make=resnet18):
    torch.manual_seed(0)
    model = _randomize_bn(make()).eval().to(memory_format=CL)
    fused, _ = rf.fuse_model(model, backend="cpu")
    return model, fused


def _input(batch=2, size=48):
    return torch.randn(batch, 3, size, size).contiguous(memory_format=CL)


def _programs(fused):
    runs = [stage.__dict__.get("_layer_run") for stage in fused.modules() if type(stage) is FusedSequential]
    return [None if run is None else run.program for run in runs]


@pytest.mark.parametrize("make", [resnet18, resnet50], ids=["resnet18", "resnet50"])
def test_the_replay_is_bitwise_the_python_steps(make, monkeypatch):
    model, fused = _fused(make)
    x = _input(batch=1)
    with torch.inference_mode():
        first = fused(x)  # decides, then makes the programs
        programs = _programs(fused)
        assert len(programs) == 4 and all(isinstance(program, _C.LayerProgram) for program in programs)
        replayed = fused(x)
        assert_matches(replayed, model(x), torch.float32)
    monkeypatch.setattr(binding, "_block_program", lambda *args: None)  # the Python steps only
    python_steps = copy.deepcopy(fused)
    with torch.inference_mode():
        expected = python_steps(x)
        assert _programs(python_steps) == [None] * 4
    assert torch.equal(first, expected) and torch.equal(replayed, expected)


def test_a_block_called_alone_runs_its_block_program():
    _, fused = _fused()
    t = torch.randn(1, 64, 12, 12).contiguous(memory_format=CL)
    block = fused.layer1[0]
    with torch.no_grad():
        expected = block.eager_forward(t)
        for _ in range(2):
            before = t.clone()
            assert_matches(block(t), expected, torch.float32)
            assert torch.equal(t, before)  # not donated: the caller's tensor
    (run,) = block._bindings.runs.values()
    assert isinstance(run.program, _C.BlockProgram)


def _edits():
    def in_place(f, m):
        with torch.no_grad():
            for model in (f, m):
                model.layer2[1].conv1.weight.mul_(-0.5)
                model.layer3[0].bn2.running_var.add_(2.0)

    def swapped(f, m):
        for model in (f, m):
            conv = model.layer4[1].conv2
            conv.weight.data = conv.weight.data * 0.25

    def bypassing_versions(f, m):  # invisible to version counters: clear_fold_cache says so
        for model in (f, m):
            model.layer1[0].conv2.weight.data.mul_(2.0)
        f.layer1[0].clear_fold_cache()

    def attribute(f, m):
        for model in (f, m):
            model.layer2[0].bn1.eps = 0.5

    def new_parameter(f, m):
        for model in (f, m):
            model.layer3[1].bn1.weight = nn.Parameter(torch.linspace(-1, 1, 256))

    def train_then_eval(f, m):
        f.train()
        with torch.no_grad():
            f(_input())  # batch statistics: updates the running statistics
        f.eval()
        m.load_state_dict(f.state_dict())

    return [in_place, swapped, bypassing_versions, attribute, new_parameter, train_then_eval]


@pytest.mark.parametrize("edit", _edits(), ids=lambda e: e.__name__)
def test_a_change_after_a_forward_is_seen_by_the_next(edit):
    model, fused = _fused()
    fused_model = copy.deepcopy(model)  # the eager twin the edits are mirrored on (fuse_model copied `model`)
    fused_model.load_state_dict(fused.state_dict())
    x = _input()
    with torch.no_grad():
        fused(x), fused(x)
    edit(fused, fused_model)
    with torch.no_grad():
        for _ in range(2):
            assert_matches(fused(x), fused_model(x), torch.float32)


def test_hooks_and_a_replaced_forward_are_called_after_the_programs_were_made():
    _, fused = _fused()
    x = _input()
    with torch.inference_mode():
        fused(x), fused(x)
    seen = []
    handle = fused.layer2[1].register_forward_hook(lambda m, args, out: seen.append("hook"))
    with torch.inference_mode():
        fused(x)
    assert seen == ["hook"]
    handle.remove()
    original = fused.layer3[0].forward
    fused.layer3[0].forward = lambda t: seen.append("forward") or original(t)
    with torch.inference_mode():
        fused(x)
    assert seen == ["hook", "forward"]


def test_other_inputs_and_backends_are_not_replayed_with_a_program_made_for_another():
    torch.manual_seed(0)
    model = _randomize_bn(resnet18()).eval().to(memory_format=CL)
    fused, _ = rf.fuse_model(model)  # backend "auto": the default backend at each call
    with torch.inference_mode(), rf.use_backend("cpu"):
        for x in (_input(batch=2), _input(batch=1, size=40), _input(batch=2)):
            assert_matches(fused(x), model(x), torch.float32)
        assert all(isinstance(p, _C.LayerProgram) for p in _programs(fused))
    with torch.inference_mode(), rf.use_backend("torch"):
        assert_matches(fused(x), model(x), torch.float32)
        assert _programs(fused) == [None] * 4  # the torch backend's steps have no BoundCalls
        runs = [stage.__dict__["_layer_run"] for stage in (fused.layer1, fused.layer4)]
        assert_matches(fused(x), model(x), torch.float32)
        assert [fused.layer1.__dict__["_layer_run"], fused.layer4.__dict__["_layer_run"]] == runs  # not made again
    with torch.inference_mode(), rf.use_backend("cpu"):
        assert_matches(fused(x), model(x), torch.float32)
        assert all(isinstance(p, _C.LayerProgram) for p in _programs(fused))


def test_copies_and_pickles_carry_no_program_and_make_their_own():
    model, fused = _fused()
    x = _input()
    with torch.inference_mode():
        expected = fused(x)
        fused(x)
    for clone in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        assert _programs(clone) == [None] * 4
        with torch.inference_mode():
            assert torch.equal(clone(x), expected)
            assert all(isinstance(p, _C.LayerProgram) for p in _programs(clone))


def test_bound_calls_reject_what_their_op_does_not_take():
    with pytest.raises(RuntimeError, match="no_such_op"):
        _C.BoundCall("resnet_fused::no_such_op", "", (), 0, 0, -1)
    w = torch.randn(8, 8, 1, 1)
    args = (torch.empty(0), w, torch.zeros(8), None, 1, 0, False)
    with pytest.raises(RuntimeError, match="positions out of range"):
        _C.BoundCall("resnet_fused::conv_bias_act", "", args, 0, 9, -1)
    with pytest.raises(RuntimeError, match="stride"):  # a string where the schema has an int
        _C.BoundCall("resnet_fused::conv_bias_act", "", args[:4] + ("one", 0, False), 0, 3, -1)
    call = _C.BoundCall("resnet_fused::conv_bias_act", "", args, 0, 3, -1)
    x = torch.randn(1, 8, 5, 5).contiguous(memory_format=CL)
    assert_matches(call(x, None), torch.nn.functional.conv2d(x, w), torch.float32)
    with pytest.raises(RuntimeError, match="x must be a 4-D"):  # the op's own checks still run
        call(torch.randn(8, 5, 5), None)
    with pytest.raises(RuntimeError, match="at least one call"):
        _C.BlockProgram([], [])


def test_train_mode_and_conversions_drop_the_programs_and_their_packs():
    _, fused = _fused()
    x = _input()
    for change in (lambda: fused.train(), lambda: fused.float(), lambda: fused.to(memory_format=CL)):
        fused.eval()
        with torch.inference_mode():
            fused(x)
        assert all(isinstance(p, _C.LayerProgram) for p in _programs(fused))
        change()
        assert _programs(fused) == [None] * 4


class _Counted(torch.Tensor):
    calls = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if isinstance(func, torch._ops.OpOverload) and func.namespace in ("resnet_fused", "mkldnn"):
            cls.calls += 1  # a conv
        return super().__torch_function__(func, types, args, kwargs or {})


def test_a_tensor_subclass_input_takes_the_python_steps_where_its_torch_function_sees_the_ops():
    _, fused = _fused()
    t = torch.randn(2, 64, 12, 12).contiguous(memory_format=CL)
    with torch.inference_mode():
        fused.layer1(t), fused.layer1(t)  # programs made for plain tensors of this signature
        expected = fused.layer1(t)
        _Counted.calls = 0
        out = fused.layer1(t.as_subclass(_Counted))
        block = fused.layer2[0]
        block(t), block(t)
        seen = _Counted.calls
        block_out = block(t.as_subclass(_Counted))
    assert seen == 4 and _Counted.calls == seen + 3  # the stage's four convs, then the block's three
    assert torch.equal(out.as_subclass(torch.Tensor), expected)
    assert_matches(block_out.as_subclass(torch.Tensor), block.eager_forward(t), torch.float32)
