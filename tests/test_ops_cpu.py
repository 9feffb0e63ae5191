"""The "cpu" backend (the C++ extension's CPU kernels) against the fp32 oracle.

Every op, in every dtype (on every CPU: bf16/fp16 convolutions run natively where the CPU has hardware for them,
else in fp32, and both ways are tested here whatever this CPU has), over CONV_CASES, with residual and ReLU on and off, NCHW and
channels_last inputs; the packed path against the unpacked one; argument errors from the C++ checks; conv_bn_act
gradients against autograd through the oracle. bn_act and add_relu are in tests/ops/.
"""

import platform

import pytest
import torch

import resnet_fused as rf
from resnet_fused.ops.backends.cpu import onednn_conv_dtype
from tests.oracle import (CONV_CASES, CONV_IDS, assert_matches, make_conv_inputs, ref_add_relu,
                          ref_bn_act, ref_conv_bn_act)

pytestmark = pytest.mark.skipif(rf.available_backends("cpu")["cpu"] is not None,
                                reason=f"the 'cpu' backend is unavailable: {rf.available_backends('cpu')['cpu']}")

CL = torch.channels_last
ALL_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


def assert_output_layout(y, dtype):
    assert y.dtype == dtype
    assert y.is_contiguous(memory_format=CL), f"output is not channels_last: strides {y.stride()}"


# ---- conv_bn_act ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_conv_bn_act(dtype, case, residual, relu, channels_last):
    x, w, scale, shift, res, stride, padding = make_conv_inputs(case, dtype, residual=residual,
                                                                channels_last=channels_last)
    y = rf.conv_bn_act(x, w, scale, shift, res, stride=stride, padding=padding, relu=relu, backend="cpu")
    assert_output_layout(y, dtype)
    assert_matches(y, ref_conv_bn_act(x, w, scale, shift, res, stride, padding, relu), dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_packed_equals_unpacked(dtype, case):
    x, w, scale, shift, res, stride, padding = make_conv_inputs(case, dtype, residual=True)
    pack = rf.ops.pack_conv_bn(w, scale, shift, stride=stride, padding=padding, backend="cpu")
    assert pack.backend == "cpu"
    for r in (None, res):
        packed = rf.ops.conv_bn_act_packed(x, pack, r, relu=True)
        unpacked = rf.conv_bn_act(x, w, scale, shift, r, stride=stride, padding=padding, backend="cpu")
        direct = torch.ops.resnet_fused.conv_bn_act(x, w, scale, shift, r, stride, padding, True)
        assert_output_layout(packed, dtype)
        # The pack's weight is in oneDNN's blocked layout, whose kernels may sum in another order: not bitwise.
        assert_matches(packed, unpacked.float(), dtype)
        torch.testing.assert_close(direct, unpacked, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
def test_fp32_weight_convolves_low_precision_x_in_fp32(dtype, case, residual):
    # The path a CPU without native bf16/fp16 convolution takes (the pack folds into fp32): x, bias and residual
    # widened exactly, one fp32 convolution, the output rounded once to x's dtype. An fp32 weight selects it on any
    # CPU, so it is tested here whatever this CPU has.
    x, w, scale, shift, res, stride, padding = make_conv_inputs(case, dtype, residual=residual)
    folded = (w.float() * scale.view(-1, 1, 1, 1)).contiguous(memory_format=CL)
    y = torch.ops.resnet_fused.conv_bias_act(x, folded, shift, res, stride, padding, True)
    assert_output_layout(y, dtype)
    want = ref_conv_bn_act(x, w, scale, shift, res, stride, padding, True)
    # One rounding of the fp32 result: within half a ulp of x's dtype of the fp32 oracle, tighter than native.
    torch.testing.assert_close(y, want.to(dtype), rtol=2 ** -7 if dtype == torch.bfloat16 else 2 ** -10, atol=1e-5)


def test_pack_folds_into_the_convolution_dtype():
    for dtype in ALL_DTYPES:
        _, w, scale, shift, _, _, _ = make_conv_inputs(CONV_CASES[2], dtype)
        pack = rf.ops.pack_conv_bn(w, scale, shift, backend="cpu").payload
        assert pack.weight.dtype == pack.bias.dtype == onednn_conv_dtype(dtype)
    assert onednn_conv_dtype(torch.float32) == torch.float32


@pytest.mark.skipif(not hasattr(torch.cpu, "get_capabilities"), reason="this torch has no torch.cpu.get_capabilities")
def test_convolution_dtype_follows_the_cpus_hardware():
    # The extension reads CPUID itself; torch's cpuinfo must agree. bf16 runs as bf16 only with hardware bf16 dot
    # products (on other AVX-512 cores oneDNN emulates them, slower than fp32); fp16 wherever oneDNN has it.
    caps = torch.cpu.get_capabilities()
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    bf16_dot = not x86 or bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    want_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported() and bf16_dot
    assert onednn_conv_dtype(torch.bfloat16) == (torch.bfloat16 if want_bf16 else torch.float32)
    want_fp16 = torch.ops.mkldnn._is_mkldnn_fp16_supported()
    assert onednn_conv_dtype(torch.float16) == (torch.float16 if want_fp16 else torch.float32)


# Inputs or outputs whose NCHW and channels_last layouts coincide (1x1 spatial, C_in=1, C_out=1): oneDNN's fused
# residual add is not taken for them, and the kernel adds the residual in its own pass.
AMBIGUOUS_CASES = [("1x1_spatial", 2, 16, 1, 1, 8, 1, 1, 0), ("1x1_spatial_pad", 1, 16, 1, 1, 8, 3, 1, 1),
                   ("cin1_3x3", 2, 1, 5, 5, 8, 3, 1, 1),
                   # x unambiguous, the output not (torch 2.11's oneDNN rejected these with a fused residual)
                   ("3x3_valid_to_1x1", 2, 16, 3, 3, 8, 3, 1, 0), ("1x1_s2_to_1x1", 2, 16, 2, 2, 8, 1, 2, 0),
                   ("cout1", 2, 16, 5, 5, 1, 3, 1, 1)]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", AMBIGUOUS_CASES, ids=[c[0] for c in AMBIGUOUS_CASES])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
def test_conv_bn_act_ambiguous_layout_with_residual(dtype, case, relu):
    x, w, scale, shift, res, stride, padding = make_conv_inputs(case, dtype, residual=True)
    y = rf.conv_bn_act(x, w, scale, shift, res, stride=stride, padding=padding, relu=relu, backend="cpu")
    assert_output_layout(y, dtype)
    assert_matches(y, ref_conv_bn_act(x, w, scale, shift, res, stride, padding, relu), dtype)


@pytest.mark.parametrize("kernel,padding", [(1, 0), (3, 1)], ids=["1x1", "3x3"])
@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_size_one_dims_with_any_strides(kernel, padding, packed):
    # (1, C, 1, 1) is contiguous in both layouts whatever the strides of its size-1 dims; oneDNN's own outputs come
    # with strides like (C, 1, C, C), which torch 2.11's oneDNN rejected as inputs ("could not create a memory").
    c = 16
    x = torch.randn(1, c, 1, 1).as_strided((1, c, 1, 1), (c, 1, c, c))
    res = torch.randn(1, c, 1, 1).as_strided((1, c, 1, 1), (7 * c, 1, 3, 5))
    w, scale, shift = torch.randn(c, c, kernel, kernel) / c, torch.rand(c) + 0.5, torch.randn(c)
    with torch.no_grad():
        if packed:
            pack = rf.ops.pack_conv_bn(w, scale, shift, padding=padding, backend="cpu")
            y = rf.ops.conv_bn_act_packed(x, pack, res)
        else:
            y = torch.ops.resnet_fused.conv_bn_act(x, w, scale, shift, res, 1, padding, True)
    assert y.stride() == (c, 1, 1, 1)  # the strides every oneDNN version takes back as the next layer's input
    assert_matches(y, ref_conv_bn_act(x, w, scale, shift, res, 1, padding, True), torch.float32)


def test_empty_batch():
    x, w, scale, shift, res, stride, padding = make_conv_inputs(("empty", 0, 16, 8, 8, 8, 3, 1, 1), torch.float32,
                                                                residual=True)
    y = torch.ops.resnet_fused.conv_bn_act(x, w, scale, shift, res, stride, padding, True)
    assert y.shape == (0, 8, 8, 8)
    assert torch.ops.resnet_fused.bn_act(x, torch.rand(16), torch.rand(16), None, True).shape == x.shape
    assert torch.ops.resnet_fused.add_relu(x, x).shape == x.shape


def test_residual_in_other_layout_than_x():
    x, w, scale, shift, res, stride, padding = make_conv_inputs(CONV_CASES[2], torch.float32, residual=True,
                                                                channels_last=True)
    y = rf.conv_bn_act(x, w, scale, shift, res.contiguous(), stride=stride, padding=padding, backend="cpu")
    assert_matches(y, ref_conv_bn_act(x, w, scale, shift, res, stride, padding, True), torch.float32)


def test_auto_picks_cpu_backend():
    assert rf.ops.resolve_name("auto", "cpu") == "cpu"


# ---- the elementwise library ops on a large tensor -------------------------------------------------------------

def test_elementwise_large_parallel_tensor():
    # Many rows: the parallel split and its boundaries are exercised (shape is not a multiple of the grain).
    x = torch.randn(3, 33, 61, 67)
    scale, shift, res = torch.rand(33), torch.randn(33), torch.randn(3, 33, 61, 67)
    assert_matches(torch.ops.resnet_fused.bn_act(x, scale, shift, res, True), ref_bn_act(x, scale, shift, res, True),
                   torch.float32)
    assert_matches(torch.ops.resnet_fused.add_relu(x, res), ref_add_relu(x, res), torch.float32)


# ---- errors from the C++ checks (direct torch.ops calls bypass the Python validation) ----------------------------

def _conv_args(**overrides):
    x, w, scale, shift, res, stride, padding = make_conv_inputs(CONV_CASES[2], torch.float32, residual=True)
    args = dict(x=x, weight=w, scale=scale, shift=shift, residual=res, stride=stride, padding=padding, relu=True)
    args.update(overrides)
    return args


def _call_conv(args):
    return torch.ops.resnet_fused.conv_bn_act(args["x"], args["weight"], args["scale"], args["shift"],
                                              args["residual"], args["stride"], args["padding"], args["relu"])


@pytest.mark.parametrize("overrides, message", [
    (dict(x=torch.randn(2, 16, 8)), r"x must be a 4-D"),
    (dict(x=torch.randn(2, 16, 8, 8, dtype=torch.float64)), r"x must be float32, bfloat16 or float16"),
    (dict(weight=torch.randn(16, 16, 3)), r"weight must be a 4-D"),
    (dict(weight=torch.randn(16, 16, 3, 3).half()), r"weight must have x's dtype Float \(or float32\)"),
    (dict(weight=torch.randn(16, 8, 3, 3)), r"weight expects C_in=8 input channels but x has 16"),
    (dict(scale=torch.rand(15)), r"scale must be a 1-D tensor of length 16"),
    (dict(shift=torch.ones(16, dtype=torch.int32)), r"shift must be a floating-point tensor"),
    (dict(residual=torch.randn(2, 16, 4, 4)), r"residual must have the output's shape"),
    (dict(residual=torch.randn(2, 16, 8, 8).bfloat16()), r"residual must have x's dtype"),
    (dict(stride=0), r"stride must be in \[1, 2\^31 - 1\], got 0"),
    (dict(padding=-1), r"padding must be in \[0, 2\^31 - 1\], got -1"),
    (dict(padding=2**62), r"padding must be in \[0, 2\^31 - 1\]"),  # (would overflow the output size)
    (dict(x=torch.randn(2, 16, 1, 1), padding=0), r"too small for a 3x3 kernel"),
    (dict(x=torch.randn(2, 16, 0, 8)), r"x must have non-zero height and width"),
    (dict(x=torch.randn(2, 0, 8, 8), weight=torch.randn(16, 0, 3, 3)), r"non-zero C_out, C_in, KH and KW"),
    (dict(scale=torch.rand(16, device="meta")), r"scale is on meta but x is on cpu"),
    (dict(residual=torch.randn(2, 16, 8, 8, device="meta")), r"residual is on meta but x is on cpu"),
], ids=["x_rank", "x_dtype", "w_rank", "w_dtype", "cin", "scale_len", "shift_dtype", "res_shape", "res_dtype",
        "stride", "padding", "padding_huge", "too_small", "empty_spatial", "cin_0", "scale_meta", "res_meta"])
def test_conv_bn_act_errors(overrides, message):
    # RuntimeError from the C++ checks; ValueError from the fake kernel, which a meta argument dispatches to.
    with pytest.raises((RuntimeError, ValueError), match=message):
        _call_conv(_conv_args(**overrides))


def test_conv_bias_act_errors():
    x, w, _, shift, _, stride, padding = make_conv_inputs(CONV_CASES[0], torch.float32)
    with pytest.raises(RuntimeError, match=r"bias must be a 1-D tensor of length 32"):
        torch.ops.resnet_fused.conv_bias_act(x, w, shift[:5], None, stride, padding, True)


def test_elementwise_errors():
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(RuntimeError, match=r"bn_act: scale must be a 1-D tensor of length 4"):
        torch.ops.resnet_fused.bn_act(x, torch.ones(3), torch.zeros(4), None, True)
    with pytest.raises(RuntimeError, match=r"bn_act: residual must have the output's shape"):
        torch.ops.resnet_fused.bn_act(x, torch.ones(4), torch.zeros(4), torch.randn(2, 4, 3, 2), True)
    with pytest.raises(RuntimeError, match=r"add_relu: residual must have x's dtype"):
        torch.ops.resnet_fused.add_relu(x, x.half())
    with pytest.raises(RuntimeError, match=r"add_relu: x must be a 4-D"):
        torch.ops.resnet_fused.add_relu(x[0], x[0])
    with pytest.raises(ValueError, match=r"scale is on meta but x is on cpu"):
        torch.ops.resnet_fused.bn_act(x, torch.ones(4, device="meta"), torch.zeros(4), None, True)
    with pytest.raises(ValueError, match=r"residual is on meta but x is on cpu"):
        torch.ops.resnet_fused.add_relu(x, x.to("meta"))


# ---- gradients, compared in fp32 with autograd through the oracle -----------------------------------------------

def _leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


def _assert_same_grads(ours, theirs, out_ours, out_theirs):
    grad = torch.randn_like(out_theirs)
    got = torch.autograd.grad(out_ours, [t for t in ours if t is not None], grad)
    want = torch.autograd.grad(out_theirs, [t for t in theirs if t is not None], grad)
    for g, w in zip(got, want):
        assert_matches(g, w, torch.float32)


@pytest.mark.parametrize("case", [CONV_CASES[1], CONV_CASES[3], CONV_CASES[6]], ids=[CONV_IDS[1], CONV_IDS[3],
                                                                                     CONV_IDS[6]])
@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
def test_conv_bn_act_grad(case, residual):
    x, w, scale, shift, res, stride, padding = make_conv_inputs(case, torch.float32, residual=residual)
    ours, theirs = _leaves(x, w, scale, shift, res), _leaves(x, w, scale, shift, res)
    out = torch.ops.resnet_fused.conv_bn_act(*ours, stride, padding, True)
    _assert_same_grads(ours, theirs, out, ref_conv_bn_act(*theirs, stride, padding, True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_conv_bn_act_grad_with_fp32_weight_and_low_precision_x(dtype):
    # The kernels take an fp32 weight with bf16/fp16 x (convolving in fp32); backward does the same.
    x, w, scale, shift, res, stride, padding = make_conv_inputs(CONV_CASES[3], torch.float32, residual=True)
    ours = [x.to(dtype).requires_grad_(), w.requires_grad_(), scale.requires_grad_(), shift.requires_grad_(),
            res.to(dtype).requires_grad_()]
    theirs = _leaves(ours[0].float(), w, scale, shift, ours[4].float())
    out = torch.ops.resnet_fused.conv_bn_act(*ours, stride, padding, True)
    assert out.dtype == dtype
    grad = torch.randn_like(out, dtype=torch.float32)
    got = torch.autograd.grad(out, ours, grad.to(dtype))
    want = torch.autograd.grad(ref_conv_bn_act(*theirs, stride, padding, True), theirs, grad.to(dtype).float())
    for g, t, w_ in zip(got, ours, want):
        assert g.dtype == t.dtype
        assert_matches(g, w_, dtype)


def test_packed_path_grad_reaches_x():
    # The internal conv_bias_act op (the pack path) is differentiable in x too, e.g. for saliency in eval mode.
    x, w, scale, shift, _, stride, padding = make_conv_inputs(CONV_CASES[2], torch.float32)
    pack = rf.ops.pack_conv_bn(w, scale, shift, stride=stride, padding=padding, backend="cpu")
    (xo,), (xt,) = _leaves(x), _leaves(x)
    _assert_same_grads([xo], [xt], rf.ops.conv_bn_act_packed(xo, pack),
                       ref_conv_bn_act(xt, w, scale, shift, None, stride, padding, True))


@pytest.mark.parametrize("case", [CONV_CASES[3], CONV_CASES[4]], ids=[CONV_IDS[3], CONV_IDS[4]])
def test_public_op_grads_reach_weight_scale_and_shift(case):
    # rf.conv_bn_act must not differentiate through a detached pack: every input gets its gradient.
    x, w, scale, shift, res, stride, padding = make_conv_inputs(case, torch.float32, residual=True)
    ours, theirs = _leaves(x, w, scale, shift, res), _leaves(x, w, scale, shift, res)
    out = rf.conv_bn_act(*ours, stride=stride, padding=padding, backend="cpu")
    _assert_same_grads(ours, theirs, out, ref_conv_bn_act(*theirs, stride, padding, True))


def test_one_pack_serves_many_input_shapes():
    # The pack keeps a oneDNN-layout weight per input shape (a bounded number); every shape stays correct.
    _, w, scale, shift, _, _, _ = make_conv_inputs(CONV_CASES[2], torch.float32)
    pack = rf.ops.pack_conv_bn(w, scale, shift, padding=1, backend="cpu")
    for batch, size in [(1, 8), (2, 8), (3, 5), (1, 9), (4, 6), (2, 8), (1, 3)]:
        x = torch.randn(batch, w.shape[1], size, size).contiguous(memory_format=CL)
        with torch.no_grad():
            y = rf.ops.conv_bn_act_packed(x, pack)
        assert_matches(y, ref_conv_bn_act(x, w, scale, shift, None, 1, 1, True), torch.float32)
        assert 1 <= len(pack.payload.onednn_weights) <= 4
