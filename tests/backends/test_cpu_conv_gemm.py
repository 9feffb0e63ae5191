"""The "cpu" backend's implicit-GEMM convolution (csrc/cpu/conv_gemm.h, isa/conv_gemm_avx2.cpp) against the fp32
oracle.

The op itself: A read straight from x, kernel row by kernel row, and the rows of pixels whose window crosses the
border gathered (padding, several images, no padding at all, rectangular kernels, K blocks that end inside a kernel
row), channel counts off the 16-column panel, pixel counts off the 6-row tile and past one row block, K past one
256-deep block (the partial sums kept out of the residual's buffer when the output goes there) or in one block where
B is streamed (30 pixels or fewer), batch 1, a 7x7 stem, residual and ReLU on and off, NCHW inputs, bitwise the same
on 1-5 threads; where NaN goes through the ReLU; the packed path choosing it by this CPU's rule (1x1 convs, from fewer
channels where the call adds a residual; strided larger kernels; stride-1 ones on few pixels where Winograd does not
take them; one packed weight per pack, other convs and dtypes left to oneDNN, fused bottlenecks against eager); an
empty batch; the rule per ATen CPU capability; argument errors.
"""

import copy
import math

import pytest
import torch

import resnet_fused as rf
from resnet_fused import _C
from resnet_fused.blocks import FusedBottleneck
from resnet_fused.models.resnet import Bottleneck
from resnet_fused.ops.backends import cpu as cpu_backend
from resnet_fused.ops.backends.cpu import ConvGemmRule, ConvGemmWeight
from tests.oracle import assert_matches, ref_conv_bn_act

pytestmark = pytest.mark.skipif(
    rf.available_backends("cpu")["cpu"] is not None or not _C.cpu_conv_gemm_available(),
    reason="the 'cpu' backend's implicit GEMM needs the extension on an x86-64 CPU with AVX2 and FMA")

CL = torch.channels_last
GEMM = torch.ops.resnet_fused.conv_gemm.default
PACK = torch.ops.resnet_fused.conv_gemm_weight.default
# (N, C_in, H, W, C_out, kernel (int or (kh, kw)), stride, padding)
SHAPES = [
    (1, 128, 7, 7, 64, 1, 1, 0),      # one row block, whole panels
    (3, 37, 9, 11, 43, 1, 1, 0),      # 297 pixels: several row blocks, the last short; 43 = 2 panels + 11 columns
    (2, 300, 5, 6, 17, 1, 2, 0),      # strided 1x1 on 18 pixels: B streamed, K = 300 in one block; a partial panel
    (1, 600, 4, 4, 40, 1, 1, 0),      # 16 pixels: B streamed, K = 600 in one block, over a partial panel
    (1, 16, 20, 20, 32, 1, 1, 0),     # batch 1, 400 pixels
    (2, 5, 13, 11, 24, 3, 2, 1),      # 3x3 stride 2, taps in the padding
    (1, 3, 23, 23, 16, 7, 2, 3),      # the stem's kernel, stride and padding
    (4, 64, 3, 2, 1, 3, 1, 2),        # padding 2 around a 3x2 image, one output channel
    (1, 1, 1, 1, 1, 1, 1, 0),         # one of everything
    (2, 40, 10, 9, 33, 3, 1, 1),      # K = 360 from taps: a K block ends inside a tap
    (1, 200, 4, 4, 16, 1, 1, 0),      # one 16-column task: its 16 rows split between the threads
    (2, 37, 14, 13, 20, 3, 1, 1),     # kernel rows of 111 taps: K block 1 ends inside the third, block 2 starts there
    (3, 8, 12, 10, 16, 5, 3, 2),      # 5x5 stride 3: border and inside pixels in every image of three
    (2, 16, 9, 9, 24, 3, 2, 0),       # a 3x3 without padding: no pixel gathered
    (2, 6, 8, 11, 16, (1, 3), 1, 1),  # a 1x3 kernel with padding 1: rows of padding above and below
    (1, 5, 9, 7, 16, (5, 2), 2, 1),   # a 5x2 kernel
    (1, 24, 28, 28, 40, 1, 1, 0),     # 784 pixels: row blocks of whole tiles, 54-60 rows, 14 or 15 of them
    (1, 300, 14, 14, 72, 1, 1, 0),    # 196 pixels: a row block per thread on 2 (96 rows or more each), else one
    (1, 600, 7, 7, 40, 1, 1, 0),      # 49 pixels: K = 600 in three blocks, the partial sums over a partial panel
]


def _ids(shapes):
    return ["x".join(str(v) if isinstance(v, int) else "by".join(map(str, v)) for v in s) for s in shapes]


def _kernel(shape):
    k = shape[5]
    return (k, k) if isinstance(k, int) else k


def conv_inputs(shape, residual, channels_last=True):
    n, cin, h, w, cout, k, stride, padding = shape
    kh, kw = _kernel(shape)
    x = torch.randn(n, cin, h, w)
    x = x.contiguous(memory_format=CL) if channels_last else x
    weight = torch.randn(cout, cin, kh, kw) / (kh * kw * cin) ** 0.5
    bias = torch.randn(cout)
    out_h, out_w = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    res = torch.randn(n, cout, out_h, out_w).contiguous(memory_format=CL) if residual else None
    return x, weight, bias, res


@pytest.mark.parametrize("shape", SHAPES, ids=_ids(SHAPES))
@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
def test_conv_gemm_matches_oracle(shape, residual, relu):
    x, weight, bias, res = conv_inputs(shape, residual)
    stride, padding = shape[6:]
    y = GEMM(x, PACK(weight), bias, res, list(_kernel(shape)), stride, padding, relu)
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=CL)
    expected = ref_conv_bn_act(x, weight, torch.ones_like(bias), bias, res, stride, padding, relu)
    assert_matches(y, expected, torch.float32)


NCHW = [SHAPES[1], SHAPES[3], SHAPES[5]]


@pytest.mark.parametrize("shape", NCHW, ids=_ids(NCHW))
def test_nchw_input(shape):
    x, weight, bias, res = conv_inputs(shape, True, channels_last=False)
    stride, padding = shape[6:]
    y = GEMM(x, PACK(weight), bias, res, list(_kernel(shape)), stride, padding, True)
    expected = ref_conv_bn_act(x, weight, torch.ones_like(bias), bias, res, stride, padding, True)
    assert_matches(y, expected, torch.float32)


INTO = [SHAPES[0], SHAPES[3], SHAPES[9], SHAPES[12], SHAPES[18]]


@pytest.mark.parametrize("shape", INTO, ids=_ids(INTO))
def test_into_residual_writes_the_residuals_buffer(shape):
    # With K past one block the partial sums must not go through y: here y is the residual, read in the last block.
    x, weight, bias, res = conv_inputs(shape, True)
    stride, padding = shape[6:]
    expected = ref_conv_bn_act(x, weight, torch.ones_like(bias), bias, res, stride, padding, True)
    y = GEMM(x, PACK(weight), bias, res, list(_kernel(shape)), stride, padding, True, True)
    assert y.data_ptr() == res.data_ptr()
    assert_matches(y, expected, torch.float32)


def test_into_residual_never_takes_the_inputs_own_buffer():
    # A 1x1 conv whose residual is x itself: writing y there would change x under the threads still reading it.
    x, weight, bias, _ = conv_inputs((1, 64, 9, 7, 64, 1, 1, 0), False)
    expected = ref_conv_bn_act(x, weight, torch.ones_like(bias), bias, x, 1, 0, True)
    before = x.clone()
    y = GEMM(x, PACK(weight), bias, x, [1, 1], 1, 0, True, True)
    assert y.data_ptr() != x.data_ptr() and torch.equal(x, before)
    assert_matches(y, expected, torch.float32)


def test_into_residual_takes_only_a_dense_channels_last_buffer():
    x, weight, bias, res = conv_inputs(SHAPES[0], True)
    nchw = res.contiguous()
    before = nchw.clone()
    y = GEMM(x, PACK(weight), bias, nchw, [1, 1], 1, 0, True, True)
    assert y.data_ptr() != nchw.data_ptr() and torch.equal(nchw, before)
    assert_matches(y, ref_conv_bn_act(x, weight, torch.ones_like(bias), bias, res, 1, 0, True), torch.float32)


THREADED = [SHAPES[1], SHAPES[3], SHAPES[10], SHAPES[12], SHAPES[16], SHAPES[17], SHAPES[18]]


@pytest.mark.parametrize("shape", THREADED, ids=_ids(THREADED))
def test_results_do_not_depend_on_the_thread_count(shape):
    # Each output is summed by one thread over all of K in order, however the tasks split and whichever thread takes
    # a task over from another (5 threads on fewer cores: the OS holds some up while the others take their tasks).
    x, weight, bias, res = conv_inputs(shape, True)
    k, stride, padding = _kernel(shape), *shape[6:]
    packed, threads = PACK(weight), torch.get_num_threads()
    outputs = []
    try:
        for count in (1, 2, 3, 5):
            torch.set_num_threads(count)
            outputs.append(GEMM(x, packed, bias, res, list(k), stride, padding, True))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outputs[0], y) for y in outputs[1:])


def test_nan_goes_through_the_relu():
    # Eager: conv(NaN) is NaN in every output channel of that pixel, and ReLU keeps NaN. Columns 0-31 come from
    # whole 16-column panels, 32-42 from the partial one.
    x, weight, bias, _ = conv_inputs(SHAPES[1], False)
    x[1, 3, 4, 5] = float("nan")
    y = GEMM(x, PACK(weight), bias, None, [1, 1], 1, 0, True)
    expected = torch.zeros_like(y, dtype=torch.bool)
    expected[1, :, 4, 5] = True
    assert torch.equal(torch.isnan(y), expected)


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[9]], ids=_ids([SHAPES[0], SHAPES[9]]))
def test_empty_batch_gives_an_empty_channels_last_output(shape):
    # (Restrided to row-major, as a non-empty tensor contiguous in both layouts is, it would not count as
    # channels_last.)
    x, weight, bias, res = conv_inputs(shape, True)
    k, stride, padding = _kernel(shape), shape[6], shape[7]
    for residual in (None, res[:0]):
        y = GEMM(x[:0], PACK(weight), bias, residual, list(k), stride, padding, True)
        assert y.shape == (0,) + res.shape[1:] and y.is_contiguous(memory_format=CL), (y.shape, y.stride())


def _prepared(pack):
    return list(pack.payload.onednn_weights.values())


@pytest.fixture
def gemm_everywhere(monkeypatch):
    monkeypatch.setattr(cpu_backend, "CONV_GEMM_RULE", ConvGemmRule(1, strided_kernels=True))


@pytest.mark.parametrize("stride", [1, 2])
def test_packed_path_takes_the_gemm_for_1x1_convs(stride, gemm_everywhere):
    weight = torch.randn(24, 40, 1, 1) / 7
    scale, shift = torch.rand(24) + 0.5, torch.randn(24)
    pack = rf.ops.pack_conv_bn(weight, scale, shift, stride=stride, backend="cpu")
    with torch.inference_mode():
        for batch in (1, 3):
            x = torch.randn(batch, 40, 9, 7).contiguous(memory_format=CL)
            res = torch.randn(batch, 24, 9 // stride + 9 % stride, 7 // stride + 7 % stride)
            y = rf.ops.conv_bn_act_packed(x, pack, res, relu=True)
            assert_matches(y, ref_conv_bn_act(x, weight, scale, shift, res, stride, 0, True), torch.float32)
    prepared = _prepared(pack)
    assert len(prepared) == 2 and all(isinstance(w, ConvGemmWeight) for w in prepared)
    assert prepared[0] is prepared[1]  # packed once, shared by the input shapes


@pytest.mark.parametrize("kernel,stride,padding", [(3, 2, 1), (7, 2, 3), (3, 3, 0)], ids=["3x3s2", "stem", "3x3s3"])
def test_packed_path_takes_the_gemm_for_strided_kernels(kernel, stride, padding, gemm_everywhere):
    weight = torch.randn(24, 5, kernel, kernel) / (5 * kernel * kernel) ** 0.5
    scale, shift = torch.rand(24) + 0.5, torch.randn(24)
    pack = rf.ops.pack_conv_bn(weight, scale, shift, stride=stride, padding=padding, backend="cpu")
    x = torch.randn(2, 5, 17, 15).contiguous(memory_format=CL)
    with torch.inference_mode():
        y = rf.ops.conv_bn_act_packed(x, pack, relu=True)
    assert_matches(y, ref_conv_bn_act(x, weight, scale, shift, None, stride, padding, True), torch.float32)
    assert isinstance(_prepared(pack)[0], ConvGemmWeight)


def test_strided_kernels_stay_on_onednn_unless_the_rule_says(monkeypatch):
    monkeypatch.setattr(cpu_backend, "CONV_GEMM_RULE", ConvGemmRule(1, strided_kernels=False))
    pack = rf.ops.pack_conv_bn(torch.randn(16, 8, 3, 3), torch.rand(16) + 0.5, torch.randn(16), stride=2, padding=1,
                               backend="cpu")
    with torch.inference_mode():
        rf.ops.conv_bn_act_packed(torch.randn(1, 8, 9, 9), pack)
    assert not isinstance(_prepared(pack)[0], ConvGemmWeight)


@pytest.mark.parametrize("dtype,kernel,padding", [(torch.bfloat16, 1, 0), (torch.float32, 3, 1),
                                                  (torch.float32, 1, 1), (torch.bfloat16, 3, 1)],
                         ids=["bf16", "3x3s1", "padded_1x1", "bf16_3x3s2"])
def test_other_convs_stay_where_they_were(dtype, kernel, padding, gemm_everywhere):
    weight = (torch.randn(16, 16, kernel, kernel) / 12).to(dtype)
    stride = 2 if dtype == torch.bfloat16 and kernel == 3 else 1
    pack = rf.ops.pack_conv_bn(weight, torch.rand(16) + 0.5, torch.randn(16), stride=stride, padding=padding,
                               backend="cpu")
    with torch.inference_mode():
        rf.ops.conv_bn_act_packed(torch.randn(2, 16, 8, 8).to(dtype), pack)
    assert not any(isinstance(w, ConvGemmWeight) for w in _prepared(pack))


def test_below_the_rules_channel_count_stays_on_onednn(monkeypatch):
    monkeypatch.setattr(cpu_backend, "CONV_GEMM_RULE", ConvGemmRule(64))
    packs = {cin: rf.ops.pack_conv_bn(torch.randn(16, cin, 1, 1), torch.rand(16) + 0.5, torch.randn(16),
                                      backend="cpu") for cin in (63, 64)}
    with torch.inference_mode():
        for cin, pack in packs.items():
            rf.ops.conv_bn_act_packed(torch.randn(1, cin, 5, 5), pack)
    assert [isinstance(_prepared(packs[c])[0], ConvGemmWeight) for c in (63, 64)] == [False, True]


def _with_and_without_a_residual(weight, x, padding):
    """One pack called on x with a residual and without one, both against the oracle; its prepared weights: the
    shape's, and the calls' with a residual where the rule gives those the GEMM."""
    c_out = weight.shape[0]
    scale, shift = torch.rand(c_out) + 0.5, torch.randn(c_out)
    pack = rf.ops.pack_conv_bn(weight, scale, shift, stride=1, padding=padding, backend="cpu")
    res = torch.randn(x.shape[0], c_out, *x.shape[2:]).contiguous(memory_format=CL)
    with torch.inference_mode():
        with_residual = rf.ops.conv_bn_act_packed(x, pack, res, relu=True)
        without = rf.ops.conv_bn_act_packed(x, pack, relu=True)
    assert_matches(with_residual, ref_conv_bn_act(x, weight, scale, shift, res, 1, padding, True), torch.float32)
    assert_matches(without, ref_conv_bn_act(x, weight, scale, shift, None, 1, padding, True), torch.float32)
    weights = pack.payload.onednn_weights
    return weights[tuple(x.shape)], weights.get("residual")


def test_calls_with_a_residual_take_the_gemm_from_the_residual_rules_channel_count(monkeypatch):
    # The same pack: with a residual through the GEMM (64 channels, not 63), without one through oneDNN.
    monkeypatch.setattr(cpu_backend, "CONV_GEMM_RULE", ConvGemmRule(128, min_residual_pointwise_in_channels=64))
    for cin in (63, 64):
        x = torch.randn(2, cin, 7, 5).contiguous(memory_format=CL)
        plain, with_residual = _with_and_without_a_residual(torch.randn(40, cin, 1, 1) / 8, x, 0)
        assert not isinstance(plain, ConvGemmWeight)
        assert isinstance(with_residual, ConvGemmWeight) == (cin == 64)


@pytest.mark.parametrize("size,winograd_tiles,gemm", [(7, 16, True), (5, 16, True), (16, 16, False),
                                                       (17, math.inf, False)],
                         ids=["7x7", "5x5", "16x16_winograd", "17x17_too_many_pixels"])
def test_stride1_kernels_take_the_gemm_where_few_pixels_and_no_winograd(size, winograd_tiles, gemm, monkeypatch):
    # 7x7 and 5x5 outputs (49 and 25 pixels, too few tiles for Winograd): the GEMM, with a residual or without (the
    # shape's own weight, no separate one for residual calls); 16x16 (256 pixels, 16 tiles): Winograd's either way;
    # 17x17 (289 pixels, Winograd off): past the rule, oneDNN.
    monkeypatch.setattr(cpu_backend, "CONV_GEMM_RULE", ConvGemmRule(math.inf, max_kernel_pixels=256))
    monkeypatch.setattr(cpu_backend, "WINOGRAD_RULE", cpu_backend.WinogradRule(winograd_tiles, 0, True))
    x = torch.randn(1, 20, size, size).contiguous(memory_format=CL)
    plain, with_residual = _with_and_without_a_residual(torch.randn(24, 20, 3, 3) / 13, x, 1)
    assert isinstance(plain, ConvGemmWeight) == gemm
    assert with_residual is None
    assert isinstance(plain, cpu_backend.WinogradWeight) == (size == 16)


def test_fused_bottleneck_matches_eager_with_the_avx2_rule(monkeypatch):
    # layer1's shape: the 64 -> 256 expansion adds the residual through the GEMM, the 256 -> 64 reduction takes it by
    # its channel count, the 3x3 and the 64 -> 256 projection (no residual) stay where they were.
    monkeypatch.setattr(cpu_backend, "CONV_GEMM_RULE", cpu_backend.CONV_GEMM_RULES["AVX2"])
    torch.manual_seed(0)
    for inplanes, downsample in ((256, None), (64, torch.nn.Sequential(torch.nn.Conv2d(64, 256, 1, bias=False),
                                                                       torch.nn.BatchNorm2d(256)))):
        block = Bottleneck(inplanes, 64, downsample=downsample).eval()
        for bn in (m for m in block.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
        fused = FusedBottleneck.from_block(copy.deepcopy(block), backend="cpu")
        x = torch.randn(2, inplanes, 9, 10).contiguous(memory_format=CL)
        with torch.inference_mode():
            expected, y = block(x), fused(x)
        assert_matches(y, expected, torch.float32)


def test_fused_bottleneck_matches_eager_with_the_gemm(gemm_everywhere):
    # Every conv of the block (reduce, the stride-2 3x3, expand with the residual, the strided projection) through
    # the GEMM.
    torch.manual_seed(0)
    downsample = torch.nn.Sequential(torch.nn.Conv2d(48, 64, 1, stride=2, bias=False), torch.nn.BatchNorm2d(64))
    block = Bottleneck(48, 16, stride=2, downsample=downsample).eval()
    for bn in (m for m in block.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    fused = FusedBottleneck.from_block(copy.deepcopy(block), backend="cpu")
    x = torch.randn(2, 48, 11, 9).contiguous(memory_format=CL)
    with torch.inference_mode():
        expected, y = block(x), fused(x)
        y_again = fused(x)
    assert_matches(y, expected, torch.float32)
    assert torch.equal(y, y_again)


@pytest.mark.parametrize("capability,expected", [("AVX2", ConvGemmRule(64, strided_kernels=True,
                                                                      max_kernel_pixels=256,
                                                                      max_in_cache_winograd_channels=128,
                                                                      max_winograd2_tiles=16,
                                                                      max_winograd2_work=4096)),
                                                 ("AVX512", cpu_backend.NO_CONV_GEMM),
                                                 ("DEFAULT", cpu_backend.NO_CONV_GEMM)])
def test_rule_per_capability(capability, expected, monkeypatch):
    # Measured on an AVX2-only CPU (cpu.py); AVX-512 CPUs keep oneDNN's AVX-512 kernels.
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert cpu_backend._conv_gemm_rule() == expected


def test_argument_errors():
    x, weight, bias, res = conv_inputs(SHAPES[0], True)
    packed = PACK(weight)
    with pytest.raises(RuntimeError, match="x must be float32"):
        GEMM(x.double(), packed, bias, None, [1, 1], 1, 0, True)
    with pytest.raises(RuntimeError, match="x must be a 4-D"):
        GEMM(x[0], packed, bias, None, [1, 1], 1, 0, True)
    with pytest.raises(RuntimeError, match="packed must be conv_gemm_weight's"):
        GEMM(x, packed[:-16], bias, None, [1, 1], 1, 0, True)
    with pytest.raises(RuntimeError, match="packed must be conv_gemm_weight's"):
        GEMM(x, packed, bias, None, [3, 3], 1, 1, True)  # packed for a 1x1 weight
    with pytest.raises(RuntimeError, match="32-byte aligned"):
        GEMM(x, torch.empty(packed.numel() + 1)[1:], bias, None, [1, 1], 1, 0, True)
    with pytest.raises(RuntimeError, match="bias must be float32"):
        GEMM(x, packed, bias.double(), None, [1, 1], 1, 0, True)
    with pytest.raises(RuntimeError, match="kernel_size must be two positive sizes"):
        GEMM(x, packed, bias, None, [0, 1], 1, 0, True)
    with pytest.raises(RuntimeError, match="stride must be positive"):
        GEMM(x, packed, bias, None, [1, 1], 0, 0, True)
    with pytest.raises(RuntimeError, match="residual must have the output's shape"):
        GEMM(x, packed, bias, res[:, :, :3], [1, 1], 1, 0, True)
    with pytest.raises(RuntimeError, match="smaller than the kernel"):
        GEMM(x[:, :, :2, :2], PACK(torch.randn(64, 128, 3, 3)), bias, None, [3, 3], 1, 0, True)
    with pytest.raises(RuntimeError, match="weight must be a 4-D"):
        PACK(weight.double())
