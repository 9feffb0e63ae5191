"""The "cpu" backend's convolution inside: the fp32 path a CPU without native bf16/fp16 convolution takes, the
dtype a pack folds into, oneDNN's strides and its per-input-shape weight cache, the C++ checks of the
torch.library ops (direct torch.ops calls bypass the public door) and the internal conv_bias_act op. The op
itself, on every backend, is tested in tests/ops/test_conv_bn_act.py.
"""

import platform

import pytest
import torch

import resnet_fused as rf
from resnet_fused.ops.backends.cpu import onednn_conv_dtype
from tests.oracle import CONV_CASES, CONV_IDS, assert_matches, make_conv_inputs, ref_conv_bn_act

pytestmark = pytest.mark.skipif(rf.available_backends("cpu")["cpu"] is not None,
                                reason=f"the 'cpu' backend is unavailable: {rf.available_backends('cpu')['cpu']}")

CL = torch.channels_last
ALL_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def assert_output_layout(y, dtype):
    assert y.dtype == dtype
    assert y.is_contiguous(memory_format=CL), f"output is not channels_last: strides {y.stride()}"


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


def _leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


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


def test_one_pack_serves_many_input_shapes():
    # The pack keeps a oneDNN-layout weight per input shape (a bounded number; beside them at most one GEMM weight,
    # shared by the calls that add a residual where the rule gives those the GEMM); every shape stays correct.
    _, w, scale, shift, _, _, _ = make_conv_inputs(CONV_CASES[2], torch.float32)
    pack = rf.ops.pack_conv_bn(w, scale, shift, padding=1, backend="cpu")
    for batch, size in [(1, 8), (2, 8), (3, 5), (1, 9), (4, 6), (2, 8), (1, 3)]:
        x = torch.randn(batch, w.shape[1], size, size).contiguous(memory_format=CL)
        with torch.no_grad():
            y = rf.ops.conv_bn_act_packed(x, pack)
        assert_matches(y, ref_conv_bn_act(x, w, scale, shift, None, 1, 1, True), torch.float32)
        assert 1 <= sum(key != "residual" for key in pack.payload.onednn_weights) <= 4


# A stride-2 1x1, a padded 3x3 with odd sizes, the 7x7 stem, and odd channel counts.
OPCHECK_CASES = [CONV_CASES[1], CONV_CASES[3], CONV_CASES[4], CONV_CASES[6]]
OPCHECK_IDS = [CONV_IDS[1], CONV_IDS[3], CONV_IDS[4], CONV_IDS[6]]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=OPCHECK_IDS)
@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
def test_opcheck_conv_bias_act(case, residual, grad):
    # The internal op of the packed path (schema, fake kernel, autograd registration, AOT dispatch).
    x, w, _, shift, res, stride, padding = make_conv_inputs(case, torch.float32, residual=residual)
    if grad:
        x, w, shift, res = _leaves(x, w, shift, res)
    torch.library.opcheck(torch.ops.resnet_fused.conv_bias_act.default, (x, w, shift, res, stride, padding, False))
