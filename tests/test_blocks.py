"""FusedBottleneck / FusedBasicBlock against the eager reference blocks: eval, train, caching, drop-in-ness."""

import copy
import inspect
import io

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import resnet_fused as rf
from resnet_fused import ops
from resnet_fused.blocks import FusedBasicBlock, FusedBottleneck
from resnet_fused.models.resnet import BasicBlock, Bottleneck, ResNet, conv1x1
from tests.oracle import TOLERANCES, assert_matches

BACKENDS = [pytest.param(name, marks=pytest.mark.skipif(rf.available_backends("cpu")[name] is not None,
                                                        reason=f"backend {name!r}: "
                                                               f"{rf.available_backends('cpu')[name]}"))
            for name in ("torch", "cpu")]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _downsample(inplanes, outplanes, stride):
    return nn.Sequential(conv1x1(inplanes, outplanes, stride), nn.BatchNorm2d(outplanes))


# (id, eager class, fused class, kwargs, input shape)
BLOCK_CASES = [
    ("bottleneck_identity", Bottleneck, FusedBottleneck, dict(inplanes=32, planes=8), (2, 32, 8, 8)),
    ("bottleneck_s2_odd_batch1", Bottleneck, FusedBottleneck,
     dict(inplanes=16, planes=8, stride=2, downsample=lambda: _downsample(16, 32, 2)), (1, 16, 9, 7)),
    ("basic_identity", BasicBlock, FusedBasicBlock, dict(inplanes=16, planes=16), (2, 16, 6, 6)),
    ("basic_s2_downsample", BasicBlock, FusedBasicBlock,
     dict(inplanes=8, planes=16, stride=2, downsample=lambda: _downsample(8, 16, 2)), (2, 8, 7, 7)),
    ("resnext_grouped", Bottleneck, FusedBottleneck, dict(inplanes=64, planes=16, groups=4, base_width=8),
     (2, 64, 6, 6)),
    ("dilated", Bottleneck, FusedBottleneck, dict(inplanes=32, planes=8, dilation=2), (2, 32, 8, 8)),
]
CASE_IDS = [c[0] for c in BLOCK_CASES]


def _randomize_bn(module):
    """Non-trivial BN statistics and affine terms, so a wrong fold cannot pass."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return module


def make_pair(case, backend="auto"):
    _, eager_cls, fused_cls, kwargs, shape = case
    kwargs = {k: (v() if callable(v) else v) for k, v in kwargs.items()}
    eager = _randomize_bn(eager_cls(**kwargs))
    fused = fused_cls(**copy.deepcopy(kwargs), backend=backend)
    fused.load_state_dict(eager.state_dict())
    return eager, fused, torch.randn(shape)


def assert_no_worse_than_eager(actual, eager, truth, dtype):
    """actual within dtype tolerance of the fp32 truth, or at most twice as far from it as eager in dtype is."""
    tol = TOLERANCES[dtype]
    bound = tol["atol"] + tol["rtol"] * truth.abs().max().item()
    truth = truth.double()
    eager_err = (eager.double() - truth).abs().max().item()
    err = (actual.double() - truth).abs().max().item()
    assert torch.isfinite(actual.float()).all()
    assert err <= max(bound, 2 * eager_err), f"error {err:.3g}: bound {bound:.3g}, eager's error {eager_err:.3g}"


# ------------------------------------------------------------------------------------------- drop-in


@pytest.mark.parametrize("eager_cls,fused_cls", [(Bottleneck, FusedBottleneck), (BasicBlock, FusedBasicBlock)])
def test_signature_expansion_and_keys_match_reference(eager_cls, fused_cls):
    eager_params = list(inspect.signature(eager_cls.__init__).parameters.values())
    fused_params = list(inspect.signature(fused_cls.__init__).parameters.values())
    assert [(p.name, p.default) for p in fused_params[:-1]] == [(p.name, p.default) for p in eager_params]
    assert fused_params[-1].name == "backend" and fused_params[-1].default == "auto"
    assert fused_params[-1].kind is inspect.Parameter.KEYWORD_ONLY
    assert fused_cls.expansion == eager_cls.expansion
    assert issubclass(fused_cls, eager_cls)
    eager = eager_cls(16, 16, 2, _downsample(16, 16 * eager_cls.expansion, 2))
    fused = fused_cls(16, 16, 2, _downsample(16, 16 * eager_cls.expansion, 2))
    assert list(eager.state_dict()) == list(fused.state_dict())
    assert [n for n, _ in eager.named_modules()] == [n for n, _ in fused.named_modules()]


def test_resnet_with_fused_blocks_loads_checkpoints_both_ways():
    eager = _randomize_bn(rf.resnet50())
    fused = ResNet(FusedBottleneck, [3, 4, 6, 3])
    assert sum(p.numel() for p in fused.parameters()) == 25_557_032
    fused.load_state_dict(eager.state_dict(), strict=True)
    back = rf.resnet50()
    back.load_state_dict(fused.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert_matches(fused.eval()(x), eager.eval()(x), torch.float32)
        assert_matches(back.eval()(x), eager(x), torch.float32)


@pytest.mark.parametrize("case", BLOCK_CASES[:4], ids=CASE_IDS[:4])
def test_from_block_shares_parameters_and_buffers(case):
    eager, _, x = make_pair(case)
    fused = case[2].from_block(eager, backend="torch")
    assert fused.backend == "torch"
    eager_state, fused_state = eager.state_dict(keep_vars=True), fused.state_dict(keep_vars=True)
    assert list(eager_state) == list(fused_state)
    assert all(eager_state[k] is fused_state[k] for k in eager_state)
    with torch.no_grad():
        eager.conv1.weight.mul_(-1)  # a change through the original shows in the fused block
        assert_matches(fused.eval()(x), eager.eval()(x), torch.float32)


def test_from_block_rejects_a_module_without_the_block_layout():
    with pytest.raises(TypeError, match="conv3"):
        FusedBottleneck.from_block(BasicBlock(8, 8))
    with pytest.raises(TypeError, match="nn.Module"):
        FusedBasicBlock.from_block("block")


def test_bad_backend_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        FusedBottleneck(16, 4, backend="nope")
    with pytest.raises(TypeError, match="backend must be a str"):
        FusedBasicBlock(16, 16, backend=3)


# ------------------------------------------------------------------------------------------- eval


def _reference_eval(eager, x, dtype):
    """Eager in fp32 on the dtype-rounded weights and input: isolates the fused compute error."""
    ref = copy.deepcopy(eager).to(dtype).float().eval()
    with torch.no_grad():
        return ref(x.to(dtype).float())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", BLOCK_CASES, ids=CASE_IDS)
def test_eval_matches_eager(case, channels_last, dtype, backend):
    eager, fused, x = make_pair(case, backend)
    expected = _reference_eval(eager, x, dtype)
    fused = fused.to(dtype).eval()
    x = x.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = fused(x)
        again = fused(x)  # second call: from the fold/pack cache
    assert out.dtype == dtype
    assert_matches(out, expected, dtype)
    assert torch.equal(out, again)


class _OpCalls(TorchDispatchMode):
    """The names of the ops a region dispatches."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_eval_is_three_or_four_fused_op_calls(backend):
    if ops.available_backends("cpu")[backend] is not None:
        pytest.skip(f"backend {backend!r}: {ops.available_backends('cpu')[backend]}")
    for case, expected in ((BLOCK_CASES[0], 3), (BLOCK_CASES[1], 4), (BLOCK_CASES[2], 2), (BLOCK_CASES[3], 3)):
        _, fused, x = make_pair(case, backend)
        fused.eval()
        with torch.no_grad():
            fused(x)
            with _OpCalls() as calls:
                fused(x)
        convs = [name for name in calls.names if "conv" in name]
        # The cpu backend's 3x3 convs run as Winograd (F(4x4) or F(2x2)), its strided convs and 1x1s with >= 128
        # input channels as the implicit GEMM, where this CPU's rules say it pays; a last unit whose residual is the
        # downsample's own output writes into it (oneDNN's in-place binary post-op).
        fused_convs = {"cpu": {"resnet_fused::conv_bias_act", "resnet_fused::conv3x3_winograd",
                               "resnet_fused::conv3x3_winograd2", "resnet_fused::conv_gemm",
                               "mkldnn::_convolution_pointwise_.binary"},
                       "torch": {"aten::convolution"}}[backend]
        assert len(convs) == expected and set(convs) <= fused_convs, (case[0], convs)
        assert not any("batch_norm" in name for name in calls.names), case[0]


@pytest.mark.parametrize("case", BLOCK_CASES, ids=CASE_IDS)
def test_eval_under_autocast_runs_in_the_autocast_dtype(case):
    eager, fused, x = make_pair(case)
    eager.eval(), fused.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = eager(x)
        out = fused(x)
    assert out.dtype == expected.dtype == torch.bfloat16
    assert_matches(out, expected.float(), torch.bfloat16)


def test_in_place_changes_after_an_eval_forward_show_in_the_next_output():
    eager, fused, x = make_pair(BLOCK_CASES[1])
    eager.eval(), fused.eval()

    def check():
        with torch.no_grad():
            expected, out = eager(x), fused(x)
        assert_matches(out, expected, torch.float32)
        return out

    first = check()
    with torch.no_grad():
        eager.conv1.weight.mul_(2), fused.conv1.weight.mul_(2)
    assert not torch.allclose(check(), first)
    with torch.no_grad():
        for block in (eager, fused):
            block.bn3.running_var.mul_(3)
            block.downsample[1].running_mean.add_(1)
            block.bn2.weight.neg_()
    check()
    state = _randomize_bn(copy.deepcopy(eager)).state_dict()
    eager.load_state_dict(state), fused.load_state_dict(state)
    check()
    for block in (eager, fused):  # a fresh Parameter object replaces the old one
        block.conv3.weight = nn.Parameter(torch.randn_like(block.conv3.weight))
    fused.conv3.weight = eager.conv3.weight
    check()
    eager.double(), fused.double()  # float64 is not a kernel dtype: the fused block runs eagerly
    x = x.double()
    check()
    eager.bfloat16(), fused.bfloat16()
    x = x.bfloat16()
    with torch.no_grad():
        assert_matches(fused(x), eager(x).float(), torch.bfloat16)


def test_eval_with_grad_enabled_gives_eager_gradients():
    """model.eval() fine-tuning (frozen BN statistics) backpropagates through the fused block."""
    eager, fused, x = make_pair(BLOCK_CASES[1])
    eager.eval(), fused.eval()
    xe, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    fused(xf).square().sum().backward()
    eager(xe).square().sum().backward()
    assert_matches(xf.grad, xe.grad, TOLERANCES["tf32"])
    for (name, pe), (_, pf) in zip(eager.named_parameters(), fused.named_parameters()):
        assert pf.grad is not None, name
        assert_matches(pf.grad, pe.grad, TOLERANCES["tf32"])


# ------------------------------------------------------------------------------------------- train


def _train_step(block, x, target):
    out = block(x)
    loss = (out.float() - target).square().mean()
    loss.backward()
    return out


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", BLOCK_CASES, ids=CASE_IDS)
def test_train_matches_eager(case, channels_last, momentum):
    eager, fused, x = make_pair(case)
    for block in (eager, fused):
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = momentum
        block.train()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for step in range(2):
        xe, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        target = torch.randn(_train_step(copy.deepcopy(eager), x, 0).shape)
        eager.zero_grad(), fused.zero_grad()
        out_e, out_f = _train_step(eager, xe, target), _train_step(fused, xf, target)
        assert_matches(out_f, out_e, torch.float32)
        assert_matches(xf.grad, xe.grad, TOLERANCES["tf32"])
        for (name, pe), (_, pf) in zip(eager.named_parameters(), fused.named_parameters()):
            assert_matches(pf.grad, pe.grad, TOLERANCES["tf32"])
        for (name, be), (_, bf) in zip(eager.named_buffers(), fused.named_buffers()):
            if name.endswith("num_batches_tracked"):
                assert torch.equal(bf, be), name
            else:
                assert_matches(bf, be, torch.float32)
        x = x + 0.5 * torch.randn_like(x)


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16_module", "autocast"])
def test_train_bf16_matches_fp32_eager(autocast):
    """bf16 training (module in bf16, or fp32 module under autocast) against fp32 eager on the same weights.

    Both eager bf16 and fused bf16 are compared with the fp32 truth (eager bf16's own gradient error is of the
    same size, so comparing the two bf16 runs with each other would test eager's rounding, not ours).
    """
    eager, fused, x = make_pair(BLOCK_CASES[1])
    if not autocast:
        eager.bfloat16(), fused.bfloat16()
    reference = copy.deepcopy(eager).float().train()
    x_in = x if autocast else x.bfloat16()
    eager.train(), fused.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out_e, out_f = eager(x_in), fused(x_in)
    out_r = reference(x_in.float())
    assert out_f.dtype == out_e.dtype == torch.bfloat16
    assert_matches(out_f, out_r, torch.bfloat16)
    for out in (out_r, out_e, out_f):
        out.float().square().mean().backward()
    for (name, pr), (_, pe), (_, pf) in zip(reference.named_parameters(), eager.named_parameters(),
                                            fused.named_parameters()):
        assert pf.grad.dtype == pe.grad.dtype, name
        assert_no_worse_than_eager(pf.grad, pe.grad, pr.grad, torch.bfloat16)
    for (name, br), (_, bf) in zip(reference.named_buffers(), fused.named_buffers()):
        assert_matches(bf, br, torch.bfloat16)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_empty_batch_behaves_as_eager(training):
    eager, fused, _ = make_pair(BLOCK_CASES[1])
    eager.train(training), fused.train(training)
    x = torch.randn(0, 16, 9, 7)
    out_e, out_f = eager(x), fused(x)
    assert out_f.shape == out_e.shape == (0, 32, 5, 4)
    for (name, be), (_, bf) in zip(eager.named_buffers(), fused.named_buffers()):
        assert torch.equal(bf, be), name


def test_one_value_per_channel_in_training_raises_as_eager():
    eager, fused, _ = make_pair(BLOCK_CASES[0])
    eager.train(), fused.train()
    x = torch.randn(1, 32, 1, 1)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        eager(x)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fused(x)


def test_one_value_per_channel_without_running_stats_raises_as_eager():
    # track_running_stats=False: batch statistics in eval too, so eager raises there as well
    eager, fused, _ = make_pair(BLOCK_CASES[0])
    for block in (eager, fused):
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.track_running_stats, m.running_mean, m.running_var = False, None, None
        block.eval()
    for block in (eager, fused):
        with torch.no_grad(), pytest.raises(ValueError, match="more than 1 value per channel"):
            block(torch.randn(1, 32, 1, 1))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_infinite_gradient_where_the_relu_output_is_zero(backend, training):
    # d sqrt(y) / dy is inf at y = 0: eager's ReLU backward selects 0 there; a multiply by the mask gave NaN
    eager, fused, x = make_pair(BLOCK_CASES[1], backend)
    eager.train(training), fused.train(training)
    xe, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    for block, xin in ((eager, xe), (fused, xf)):
        out = block(xin)
        assert (out == 0).any()
        out.sqrt().sum().backward()
    assert torch.isfinite(xe.grad).all()
    assert_matches(xf.grad, xe.grad, TOLERANCES["tf32"])
    for (name, pe), (_, pf) in zip(eager.named_parameters(), fused.named_parameters()):
        assert_matches(pf.grad, pe.grad, TOLERANCES["tf32"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_penalty_reaches_every_parameter_eager_does(backend):
    # A penalty on d out / d x (R1, WGAN-GP) differentiates the backward itself. Eager gives all-zero grads to
    # some BN biases; None instead would make an optimizer skip them (no weight decay, no momentum).
    eager, fused, x = make_pair(BLOCK_CASES[1], backend)
    eager.train(), fused.train()
    for block in (eager, fused):
        xin = x.clone().requires_grad_()
        (grad_x,) = torch.autograd.grad(block(xin).sum(), xin, create_graph=True)
        grad_x.square().sum().backward()
    for (name, pe), (_, pf) in zip(eager.named_parameters(), fused.named_parameters()):
        assert (pf.grad is None) == (pe.grad is None), name
        if pe.grad is not None:
            assert_matches(pf.grad, pe.grad, TOLERANCES["tf32"])


# ------------------------------------------------------------------------------------------- plumbing


def test_pickle_and_deepcopy_after_a_forward_drop_the_cache():
    eager, fused, x = make_pair(BLOCK_CASES[1])
    fused.eval()
    with torch.no_grad():
        expected = fused(x)
    assert fused.__dict__["_bindings"].packs
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    copied = copy.deepcopy(fused)
    for clone in (loaded, copied):
        assert clone.__dict__.get("_bindings") is None
        assert type(clone) is FusedBottleneck and clone.backend == fused.backend
        with torch.no_grad():
            assert torch.equal(clone(x), expected)
    with torch.no_grad():
        copied.conv1.weight.zero_()  # the copy owns its tensors
        assert torch.equal(fused(x), expected)


def test_torch_compile_eval_matches_eager():
    eager, fused, x = make_pair(BLOCK_CASES[1])
    eager.eval(), fused.eval()
    torch._dynamo.reset()
    compiled = torch.compile(fused, backend="aot_eager")
    with torch.no_grad():
        assert_matches(compiled(x), eager(x), torch.float32)
        with torch.no_grad():
            fused.conv1.weight.mul_(0.5), eager.conv1.weight.mul_(0.5)
        assert_matches(compiled(x), eager(x), torch.float32)


@pytest.mark.skipif(rf.available_backends("cpu")["triton"] is not None,
                    reason=f"triton backend: {rf.available_backends('cpu')['triton']}")
def test_triton_interpreter_on_one_tiny_block():
    case = ("tiny", BasicBlock, FusedBasicBlock, dict(inplanes=16, planes=16), (1, 16, 4, 4))
    eager, fused, x = make_pair(case, backend="triton")
    eager.eval(), fused.eval()
    with torch.no_grad():
        assert_matches(fused(x), eager(x), torch.float32)
