"""Residual buffers handed on without a copy (resnet_fused/ops/donation.py, blocks.FusedSequential): without autograd,
a fused block inside a fused stage may write its result into its input's buffer, which only it reads; and a block's
last unit into its own downsample's output. These tests pin that it computes exactly what the undonated model
computes, that it happens where it should, and that no tensor anyone else can still read is ever overwritten:
the stage's input, a block called directly, a tensor a hook kept, anything while autograd records.
"""

import copy
import pickle

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import resnet_fused as rf
from resnet_fused.blocks import FusedSequential
from resnet_fused.models import resnet18, resnet50
from resnet_fused.ops.donation import donated, donating
from tests.oracle import assert_matches, ref_conv_bn_act
from tests.test_blocks import _randomize_bn

pytestmark = pytest.mark.skipif(rf.available_backends("cpu")["cpu"] is not None,
                                reason=f"the 'cpu' backend is unavailable: {rf.available_backends('cpu')['cpu']}")

CL = torch.channels_last
# ops that write their output into the residual (argument 3) when told to and its buffer takes it
INTO_RESIDUAL = {"resnet_fused::conv_gemm", "resnet_fused::conv3x3_winograd", "resnet_fused::conv3x3_winograd2"}
IN_PLACE = {"mkldnn::_convolution_pointwise_.binary", *(f"{name} into residual" for name in INTO_RESIDUAL)}


class _OpCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        wrote_residual = func.name() in INTO_RESIDUAL and args[3] is not None and out.data_ptr() == args[3].data_ptr()
        self.calls.append((func.name() if not wrote_residual else f"{func.name()} into residual", args))
        return out


def _models(make, dtype=torch.float32):
    torch.manual_seed(0)
    model = _randomize_bn(make()).eval().to(dtype=dtype, memory_format=CL)
    fused, _ = rf.fuse_model(model, backend="cpu")
    undonated = copy.deepcopy(fused)
    for module in undonated.modules():
        if type(module) is FusedSequential:
            module.__class__ = nn.Sequential
    return model, fused, undonated


def _input(dtype=torch.float32, batch=2, size=64):
    return torch.randn(batch, 3, size, size, dtype=dtype).contiguous(memory_format=CL)


def test_stages_become_fused_sequentials_with_the_same_keys():
    model, fused, _ = _models(resnet18)
    for name in ("layer1", "layer2", "layer3", "layer4"):
        stage = fused.get_submodule(name)
        assert type(stage) is FusedSequential and isinstance(stage, nn.Sequential)
    assert fused.state_dict().keys() == model.state_dict().keys()
    assert type(model.layer1) is nn.Sequential  # the original is untouched
    for clone in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        assert type(clone.layer1) is FusedSequential


@pytest.mark.parametrize("make", [resnet18, resnet50], ids=["resnet18", "resnet50"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_donated_forward_is_the_undonated_one(make, dtype, mode):
    # The same kernels, only the output buffer differs: bitwise equal, and as eager within the dtype's tolerance.
    model, fused, undonated = _models(make, dtype)
    x = _input(dtype)
    context = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    with context():
        expected, reference = undonated(x), model(x)
        for _ in range(2):  # the second forward replays the bound calls
            x_before = x.clone()
            out = fused(x)
            assert torch.equal(x, x_before)  # the model's input is the caller's: never written
            assert torch.equal(out, expected)
    # eager in bf16 rounds after every op, the fused model after every unit: they part by a few percent
    assert_matches(out, reference, torch.float32 if dtype == torch.float32 else dict(atol=0.0, rtol=0.1))


def test_blocks_after_the_first_of_a_stage_write_in_place():
    # resnet50's stages: every block's last unit writes in place (the first into its downsample's output, the
    # others into their input); that input is the previous block's output.
    _, fused, _ = _models(resnet50)
    x = _input()
    with torch.inference_mode():
        fused(x)
        with _OpCalls() as recorded:
            fused(x)
    in_place = [args for name, args in recorded.calls if name in IN_PLACE]
    assert len(in_place) == sum(len(fused.get_submodule(f"layer{i}")) for i in range(1, 5))


def test_a_stage_never_writes_into_its_input_or_a_directly_called_blocks_input():
    _, fused, undonated = _models(resnet18)
    t = torch.randn(2, 64, 16, 16).contiguous(memory_format=CL)
    with torch.inference_mode():
        for run in (lambda: fused.layer1(t), lambda: fused.layer1[1](t), lambda: fused.layer1[0](t)):
            before = t.clone()
            run()
            assert torch.equal(t, before)
        assert torch.equal(fused.layer1(t), undonated.layer1(t))


def test_a_hooked_block_neither_gives_nor_takes():
    # A hook may keep the tensors it sees: the block's input (pre-hook) and output (hook).
    _, fused, undonated = _models(resnet18)
    kept = {}
    fused.layer1[0].register_forward_hook(lambda m, args, out: kept.update(out=(out, out.clone())))
    fused.layer1[1].register_forward_pre_hook(lambda m, args: kept.update(inp=(args[0], args[0].clone())))
    t = torch.randn(2, 64, 16, 16).contiguous(memory_format=CL)
    with torch.inference_mode():
        out = fused.layer1(t)
    for tensor, copy_then in kept.values():
        assert torch.equal(tensor, copy_then)
    with torch.inference_mode():
        assert torch.equal(out, undonated.layer1(t))


def test_no_donation_while_autograd_records():
    model, fused, _ = _models(resnet18)
    x = _input().requires_grad_()
    with _OpCalls() as recorded:
        out = fused(x)
    assert not any(name in IN_PLACE for name, _ in recorded.calls)
    out.sum().backward()  # would fail on a tensor autograd saved and a donation overwrote
    reference = x.detach().clone().requires_grad_()
    model(reference).sum().backward()
    assert_matches(x.grad, reference.grad, dict(atol=1e-4, rtol=1e-3))
    t = torch.zeros(1)
    with donating(t):
        assert not donated(t)  # grad mode is on here
    with torch.no_grad(), donating(t):
        assert donated(t) and not donated(t.clone()) and not donated(None)
    assert not donated(t)


@pytest.mark.parametrize("into", [True, False], ids=["into", "fresh"])
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_winograd_writes_into_a_dense_channels_last_residual_only(into, layout):
    x = torch.randn(2, 16, 9, 10).contiguous(memory_format=CL)
    weight, bias = torch.randn(24, 16, 3, 3) / 12, torch.randn(24)
    residual = torch.randn(2, 24, 9, 10)
    residual = residual.contiguous(memory_format=CL) if layout == "channels_last" else residual
    residual_before = residual.clone()
    expected = ref_conv_bn_act(x, weight, torch.ones_like(bias), bias, residual, 1, 1, True)
    u = torch.ops.resnet_fused.winograd_weight(weight)
    y = torch.ops.resnet_fused.conv3x3_winograd(x, u, bias, residual, True, True, into)
    assert_matches(y, expected, torch.float32)
    in_place = into and layout == "channels_last"
    assert (y.data_ptr() == residual.data_ptr()) == in_place
    if not in_place:
        assert torch.equal(residual, residual_before)


class _KeepsInput(nn.Module):
    """A shortcut the plan cannot see into, which returns its input and keeps it."""

    def forward(self, x):
        self.kept = (x, x.clone())
        return x


def test_an_opaque_shortcuts_output_is_never_overwritten():
    from resnet_fused.models.resnet import Bottleneck
    torch.manual_seed(0)
    stage = nn.Sequential(Bottleneck(64, 16), Bottleneck(64, 16, downsample=_KeepsInput()), Bottleneck(64, 16))
    stage = _randomize_bn(stage).eval().to(memory_format=CL)
    fused, _ = rf.fuse_model(stage, backend="cpu")
    assert type(fused) is FusedSequential
    t = torch.randn(2, 64, 8, 8).contiguous(memory_format=CL)
    with torch.inference_mode():
        for _ in range(2):
            out = fused(t)
            kept, then = fused[1].downsample.kept
            assert torch.equal(kept, then)
        assert_matches(out, stage(t), torch.float32)
