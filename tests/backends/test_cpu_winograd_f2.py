"""The "cpu" backend's Winograd F(2x2, 3x3) path (csrc/cpu/winograd_f2.*) against the fp32 oracle.

The op over partial tiles (odd H, W), 1-pixel images, channel counts off the 16-lane block and past the GEMM's
256-deep K block, batch > 1, NCHW and channels_last inputs, residual and ReLU on and off; its results at every
thread count; the output in a donated residual's buffer; where a NaN input goes; one transform per pack, shared by the
input shapes; the packed path choosing it by the AVX2 rule's tile and work bounds (and never for other convs);
argument errors.
"""

import math

import pytest
import torch

import resnet_fused as rf
from resnet_fused import _C
from resnet_fused.ops.backends import cpu as cpu_backend
from resnet_fused.ops.backends.cpu import Winograd2Weight, WinogradWeight
from tests.backends.test_cpu_winograd import conv_inputs, on_a_fresh_thread
from tests.oracle import assert_matches, ref_conv_bn_act

pytestmark = [
    pytest.mark.skipif(rf.available_backends("cpu")["cpu"] is not None,
                       reason=f"the 'cpu' backend is unavailable: {rf.available_backends('cpu')['cpu']}"),
    pytest.mark.skipif(not _C.cpu_conv_gemm_available(),
                       reason="F(2x2, 3x3)'s products run the implicit GEMM's AVX2 + FMA kernel"),
]

CL = torch.channels_last
WINOGRAD2 = torch.ops.resnet_fused.conv3x3_winograd2.default
TRANSFORM2 = torch.ops.resnet_fused.winograd2_weight.default
# (N, C_in, H, W, C_out): whole and partial 2x2 tiles, 1-pixel images, channels on and off the 16-lane block, C_in at
# and past the GEMM's 256-deep K block, C_out across several panels
SHAPES = [(2, 16, 8, 8, 32), (1, 5, 7, 9, 7), (3, 33, 6, 5, 17), (1, 64, 1, 1, 16), (2, 24, 13, 4, 40),
          (1, 256, 14, 14, 48), (1, 300, 7, 7, 130), (2, 8, 23, 21, 12)]


def panels(weight):
    return cpu_backend._winograd_panels(TRANSFORM2(weight))


@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_winograd2_op_matches_oracle(shape, residual, relu, channels_last):
    x, weight, bias, res = conv_inputs(shape, residual, channels_last)
    y = WINOGRAD2(x, panels(weight), bias, res, relu, False)
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=CL)
    expected = ref_conv_bn_act(x, weight, torch.ones_like(bias), bias, res, 1, 1, relu)
    assert_matches(y, expected, torch.float32)


def test_winograd2_rounds_about_as_a_direct_convolution():
    # A, B and G hold only 0, +-1 and +-1/2: against float64, the error stays within a few times a direct fp32
    # convolution's (F(4x4)'s is about 20x)
    x, weight, bias, _ = conv_inputs((1, 256, 14, 14, 64), False, True)
    exact = torch.nn.functional.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    winograd2 = (WINOGRAD2(x, panels(weight), bias, None, False, False).double() - exact).abs().max()
    direct = (torch.nn.functional.conv2d(x, weight, bias, padding=1).double() - exact).abs().max()
    assert winograd2 <= 4 * direct, (winograd2.item(), direct.item())


def test_winograd2_results_do_not_depend_on_the_thread_count(set_threads):
    x, weight, bias, res = conv_inputs((2, 24, 13, 11, 40), True, True)
    u = panels(weight)
    outputs = []
    for count in (1, 2, 3):
        set_threads(count)
        outputs.append(WINOGRAD2(x, u, bias, res, True, False))
    assert all(torch.equal(outputs[0], y) for y in outputs[1:])


def test_into_residual_takes_the_residuals_buffer_but_never_the_inputs():
    x, weight, bias, res = conv_inputs((2, 16, 9, 7, 16), True, True)
    res = res.contiguous(memory_format=CL)
    u = panels(weight)
    expected = ref_conv_bn_act(x, weight, torch.ones_like(bias), bias, res, 1, 1, True)
    y = WINOGRAD2(x, u, bias, res, True, True)
    assert y.data_ptr() == res.data_ptr()
    assert_matches(y, expected, torch.float32)
    expected, before = ref_conv_bn_act(x, weight, torch.ones_like(bias), bias, x, 1, 1, True), x.clone()
    y = WINOGRAD2(x, u, bias, x, True, True)
    assert y.data_ptr() != x.data_ptr() and torch.equal(x, before)
    assert_matches(y, expected, torch.float32)


def test_results_survive_later_calls_of_either_winograd():
    # Both Winograd ops take their transformed buffers from one kept workspace per thread: an output must not alias
    # it, and a smaller call after a larger one must not read the larger one's leftovers. A fresh thread, so that the
    # buffer is made by its first call here.
    big, small = conv_inputs((2, 32, 20, 20, 48), True, True), conv_inputs((1, 8, 5, 7, 4), False, True)
    winograd4 = torch.ops.resnet_fused.conv3x3_winograd.default
    transform4 = torch.ops.resnet_fused.winograd_weight.default
    outputs = []

    def calls():
        for (x, weight, bias, res), also_f4 in ((big, True), (small, False), (big, False), (small, True)):
            outputs.append((WINOGRAD2(x, panels(weight), bias, res, True, False), x, weight, bias, res))
            if also_f4:
                outputs.append((winograd4(x, transform4(weight), bias, res, True, True), x, weight, bias, res))

    on_a_fresh_thread(calls)
    assert len(outputs) == 6
    for y, x, weight, bias, res in outputs:
        assert_matches(y, ref_conv_bn_act(x, weight, torch.ones_like(bias), bias, res, 1, 1, True), torch.float32)


def test_winograd2_nan_goes_where_a_direct_convolutions_does():
    # In one dimension y0 = m0 + m1 + m2 reads d0 .. d2 only and y1 = m1 - m2 - m3 reads d1 .. d3 only (B^T's columns
    # and A^T's rows hold exact zeros): each output reads exactly its 3x3 window, so a NaN input makes NaN of its 3x3
    # neighbourhood, as eager's convolution does (F(4x4)'s fills whole 4x4 tiles), and the ReLU keeps it.
    x, weight, bias, _ = conv_inputs((1, 16, 8, 8, 16), False, True)
    x[0, 3, 2, 2] = float("nan")
    x[0, 5, 7, 0] = float("nan")  # at the border: the zeros of the padding do not hide it
    y = WINOGRAD2(x, panels(weight), bias, None, True, False)
    eager = torch.relu(torch.nn.functional.conv2d(x, weight, bias, padding=1))
    assert torch.isnan(eager).sum() == 16 * (9 + 4)
    assert torch.equal(torch.isnan(y), torch.isnan(eager))
    # an infinite input stays within the same reach (there it may give NaN where eager gives +-inf)
    x[0, 3, 2, 2], x[0, 5, 7, 0] = float("inf"), 0.0
    y = WINOGRAD2(x, panels(weight), bias, None, False, False)
    eager = torch.nn.functional.conv2d(x, weight, bias, padding=1)
    assert torch.isinf(eager).sum() == 16 * 9
    assert torch.equal(torch.isfinite(y), torch.isfinite(eager))


@pytest.fixture
def avx2_rule(monkeypatch):
    monkeypatch.setattr(cpu_backend, "CONV_GEMM_RULE", cpu_backend.CONV_GEMM_RULES["AVX2"])


def _prepared(pack):
    return [w for k, w in pack.payload.onednn_weights.items() if k != "residual"]


# (C, size, batch, F(2x2)?): 144 channels (past the in-cache 128) at 16 F(4x4) tiles (14x14) and 20 (16x20 rounded up
# to 4x5 tiles); 300 channels at 9 tiles (2700 of work) and 16 (4800, past 4096); 512 channels at 4 tiles and at
# 4 x 4 = 16 tiles (batch 4: 8192)
RULE_CASES = [(144, (14, 14), 1, True), (144, (16, 20), 1, False), (300, (12, 12), 1, True),
              (300, (14, 14), 1, False), (512, (7, 7), 1, True), (512, (7, 7), 4, False)]


@pytest.mark.parametrize("channels,size,batch,winograd2", RULE_CASES,
                         ids=[f"{c}ch-{s[0]}x{s[1]}-b{b}" for c, s, b, _ in RULE_CASES])
def test_packed_path_takes_winograd2_within_the_rules_bounds(channels, size, batch, winograd2, avx2_rule):
    weight = torch.randn(channels, channels, 3, 3) / (3 * channels ** 0.5)
    scale, shift = torch.rand(channels) + 0.5, torch.randn(channels)
    pack = rf.ops.pack_conv_bn(weight, scale, shift, padding=1, backend="cpu")
    x = torch.randn(batch, channels, *size).contiguous(memory_format=CL)
    res = torch.randn(batch, channels, *size).contiguous(memory_format=CL)
    with torch.inference_mode():
        y = rf.ops.conv_bn_act_packed(x, pack, res, relu=True)
    tiles = batch * math.ceil(size[0] / 4) * math.ceil(size[1] / 4)
    assert cpu_backend._runs_winograd2(pack, x.shape) == winograd2
    assert winograd2 == (tiles <= 16 and tiles * channels <= 4096)
    (prepared,) = _prepared(pack)
    assert isinstance(prepared, Winograd2Weight) == winograd2
    if not winograd2:  # F(4x4) from 16 tiles, the direct GEMM below
        assert isinstance(prepared, WinogradWeight) == (tiles >= cpu_backend.WINOGRAD_RULE.min_tiles)
    assert_matches(y, ref_conv_bn_act(x, weight, scale, shift, res, 1, 1, True), torch.float32)


def test_one_transform_per_pack(monkeypatch, avx2_rule):
    # Made once; every input shape the rule gives F(2x2) shares it, and each matches the oracle.
    made = []

    class Counting:
        default = staticmethod(lambda weight: made.append(1) or TRANSFORM2(weight))

    monkeypatch.setattr(torch.ops.resnet_fused, "winograd2_weight", Counting)
    weight = torch.randn(136, 136, 3, 3) / 36
    scale, shift = torch.rand(136) + 0.5, torch.randn(136)
    pack = rf.ops.pack_conv_bn(weight, scale, shift, padding=1, backend="cpu")
    with torch.inference_mode():
        for size in ((7, 7), (9, 5), (12, 12)):
            x = torch.randn(1, 136, *size)
            expected = ref_conv_bn_act(x, weight, scale, shift, None, 1, 1, True)
            assert_matches(rf.ops.conv_bn_act_packed(x, pack), expected, torch.float32)
    prepared = _prepared(pack)
    assert len(made) == 1 and len(prepared) == 3 and all(isinstance(w, Winograd2Weight) for w in prepared)
    assert all(w.panels is prepared[0].panels for w in prepared)


@pytest.mark.parametrize("dtype,stride,padding,channels", [(torch.bfloat16, 1, 1, 144), (torch.float32, 2, 1, 144),
                                                           (torch.float32, 1, 0, 144), (torch.float32, 1, 1, 128)],
                         ids=["bf16", "stride2", "padding0", "in-cache-channels"])
def test_other_convs_never_take_winograd2(dtype, stride, padding, channels, avx2_rule):
    weight = (torch.randn(channels, channels, 3, 3) / 36).to(dtype)
    pack = rf.ops.pack_conv_bn(weight, torch.rand(channels) + 0.5, torch.randn(channels), stride=stride,
                              padding=padding, backend="cpu")
    with torch.inference_mode():
        rf.ops.conv_bn_act_packed(torch.randn(1, channels, 8, 8).to(dtype), pack)
    assert not any(isinstance(w, Winograd2Weight) for w in _prepared(pack))


def test_winograd2_rule_per_capability():
    # Measured on an AVX2-only CPU (cpu.py); elsewhere no GEMM, so no F(2x2).
    rule = cpu_backend.CONV_GEMM_RULES["AVX2"]
    assert (rule.max_winograd2_tiles, rule.max_winograd2_work) == (16, 4096)
    assert (cpu_backend.NO_CONV_GEMM.max_winograd2_tiles, cpu_backend.NO_CONV_GEMM.max_winograd2_work) == (0, 0)


def test_winograd2_argument_errors():
    x, weight, bias, _ = conv_inputs((1, 16, 8, 8, 20), False, True)
    u = panels(weight)
    assert u.shape == (16, 16 * 32)
    with pytest.raises(RuntimeError, match="x must be float32"):
        WINOGRAD2(x.bfloat16(), u, bias, None, True, False)
    with pytest.raises(RuntimeError, match=r"panels must be .* of shape \(16, 512\)"):
        WINOGRAD2(x, u[:, :-16].contiguous(), bias, None, True, False)
    with pytest.raises(RuntimeError, match=r"panels must be .* of shape \(16, 256\)"):
        WINOGRAD2(x[:, :8], u, bias, None, True, False)
    with pytest.raises(RuntimeError, match="bias must be a 1-D tensor"):
        WINOGRAD2(x, u, bias.view(4, 5), None, True, False)
    with pytest.raises(RuntimeError, match="residual must have the output's shape"):
        WINOGRAD2(x, u, bias, torch.randn(1, 20, 4, 4), True, False)
    with pytest.raises(RuntimeError, match="x must be a 4-D"):
        WINOGRAD2(x[0], u, bias, None, True, False)
    with pytest.raises(RuntimeError, match=r"weight must be a \(C_out, C_in, 3, 3\) tensor"):
        TRANSFORM2(torch.randn(16, 16, 1, 1))
    with pytest.raises(RuntimeError, match="x must have non-zero C_in, height and width"):
        WINOGRAD2(torch.randn(1, 16, 0, 8), u, bias, None, True, False)
