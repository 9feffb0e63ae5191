"""The "cuda" backend (csrc/cuda kernels through torch.ops.resnet_fused) against the fp32 "torch" oracle.

Everything here needs a CUDA GPU and the extension built with its CUDA sources; elsewhere the module is skipped
with the reason `resnet_fused.available_backends("cuda")` gives. The oracle runs on CPU copies, so it is true
fp32 (cuDNN would use TF32 for an fp32 oracle on the GPU). fp32 inputs go through TF32 tensor cores in the
conv kernel: they are held to the "tf32" tolerance.
"""

from __future__ import annotations

import pytest
import torch

import resnet_fused as rf
from tests.oracle import (CONV_CASES, CONV_IDS, GPU_CONV_CASES, GPU_CONV_IDS, assert_matches, make_conv_inputs,
                          ref_add_relu, ref_bn_act, ref_conv_bn_act)


def _unavailable_reason():
    if not torch.cuda.is_available():
        return "needs a CUDA GPU; none is present on this machine"
    return rf.available_backends("cuda").get("cuda", "no 'cuda' backend is registered")


_REASON = _unavailable_reason()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(_REASON is not None, reason=f"the 'cuda' backend is unavailable: {_REASON}")]

DEVICE = "cuda"
CL = torch.channels_last
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
OPS = torch.ops.resnet_fused



def tol(dtype):
    return "tf32" if dtype == torch.float32 else dtype


def _cpu(*tensors):
    return [None if t is None else t.cpu() for t in tensors]


def check_conv(x, w, scale, shift, res, stride, padding, relu, y):
    expected = ref_conv_bn_act(*_cpu(x, w, scale, shift, res), stride, padding, relu)
    assert y.device.type == "cuda" and y.dtype == x.dtype
    assert y.is_contiguous(memory_format=CL), "the output must be channels_last"
    assert_matches(y.cpu(), expected, tol(x.dtype))


def run_conv(case, dtype, residual, relu, channels_last=False):
    x, w, scale, shift, res, stride, padding = make_conv_inputs(case, dtype, DEVICE, residual, channels_last)
    y = rf.conv_bn_act(x, w, scale, shift, res, stride=stride, padding=padding, relu=relu, backend="cuda")
    check_conv(x, w, scale, shift, res, stride, padding, relu, y)


def misaligned_channels_last(shape, dtype):
    """A channels_last tensor whose data starts one element past an allocation: never 16-byte aligned."""
    n, c, h, w = shape
    flat = torch.randn(n * c * h * w + 1, device=DEVICE).to(dtype)
    t = flat[1:].view(n, h, w, c).permute(0, 3, 1, 2)
    assert t.is_contiguous(memory_format=CL) and t.data_ptr() % 16 != 0
    return t


# --- conv_bn_act --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("residual", [False, True], ids=["no_res", "res"])
@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_conv_bn_act_shape_classes(dtype, case, residual, relu):
    run_conv(case, dtype, residual, relu)


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("residual", [False, True], ids=["no_res", "res"])
@pytest.mark.parametrize("case", GPU_CONV_CASES, ids=GPU_CONV_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_conv_bn_act_resnet50_layers(dtype, case, residual, relu):
    run_conv(case, dtype, residual, relu)


@pytest.mark.parametrize("case", CONV_CASES[:4] + GPU_CONV_CASES[:1], ids=CONV_IDS[:4] + GPU_CONV_IDS[:1])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_conv_bn_act_channels_last_input(dtype, case):
    run_conv(case, dtype, residual=True, relu=True, channels_last=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_conv_bn_act_op_accepts_any_layout(dtype):
    """The op itself: NCHW weight, strided x, fp16 scale/shift and an NCHW residual are converted, not refused."""
    base = torch.randn(2, 32, 9, 11, device=DEVICE).to(dtype)
    x = base[:, ::2]  # non-contiguous in every format
    w = (torch.randn(24, 16, 3, 3, device=DEVICE) / 12).to(dtype)  # NCHW-contiguous, not channels_last
    scale = (torch.rand(24, device=DEVICE) + 0.5).half()
    shift = torch.randn(24, device=DEVICE).half()
    res = torch.randn(2, 24, 5, 6, device=DEVICE).to(dtype)
    y = OPS.conv_bn_act(x, w, scale, shift, res, 2, 1, True)
    check_conv(x, w, scale.float(), shift.float(), res, 2, 1, True, y)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_conv_bn_act_misaligned_input(dtype):
    """Cin is a multiple of the vector width but x is not 16-byte aligned: the scalar-load path must serve."""
    x = misaligned_channels_last((2, 16, 8, 8), dtype)
    w = (torch.randn(32, 16, 3, 3, device=DEVICE) / 12).to(dtype)
    scale, shift = torch.rand(32, device=DEVICE) + 0.5, torch.randn(32, device=DEVICE)
    res = misaligned_channels_last((2, 32, 8, 8), dtype)
    y = OPS.conv_bn_act(x, w, scale, shift, res, 1, 1, True)
    check_conv(x, w, scale, shift, res, 1, 1, True, y)


def test_conv_bn_act_empty_batch():
    x = torch.randn(0, 16, 8, 8, device=DEVICE)
    w = torch.randn(8, 16, 3, 3, device=DEVICE)
    y = OPS.conv_bn_act(x, w, torch.ones(8, device=DEVICE), torch.zeros(8, device=DEVICE), None, 1, 1, True)
    assert y.shape == (0, 8, 8, 8) and y.is_contiguous(memory_format=CL)


def test_ops_launch_on_the_current_stream():
    """Captured into a CUDA graph (which fails if a kernel goes to any stream but the capturing one) and replayed
    on new input data: the kernels use the current stream and read their inputs at replay time."""
    x, w, scale, shift, res, stride, padding = make_conv_inputs(CONV_CASES[2], torch.float16, DEVICE, True)
    x = x.contiguous(memory_format=CL)
    assert x.shape[1] == w.shape[0]  # so scale/shift also fit bn_act on x

    def fused(inp):
        y = OPS.conv_bn_act(inp, w, scale, shift, res, stride, padding, False)
        return OPS.add_relu(OPS.bn_act(y, scale, shift, None, False), res), OPS.bn_act(inp, scale, shift, None, True)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fused(x)  # warm-up outside the capture, as torch.cuda.graph recommends
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, out_bn = fused(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    y = ref_conv_bn_act(*_cpu(x, w, scale, shift, None), stride, padding, False)
    expected = ref_add_relu(ref_bn_act(y, scale.cpu(), shift.cpu(), None, False), res.cpu())
    assert_matches(out.cpu(), expected, torch.float16)
    assert_matches(out_bn.cpu(), ref_bn_act(*_cpu(x, scale, shift, None), True), torch.float16)


# --- the elementwise ops' pointer paths: misaligned, NCHW, a tail past the last vector -----------------------

@pytest.mark.parametrize("shape", [(2, 16, 5, 7), (3, 5, 7, 5)], ids=["c16", "c5_odd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_elementwise_misaligned(dtype, shape):
    """Tensors starting off a 16-byte boundary take the scalar path, with and without a vector-friendly C."""
    x = misaligned_channels_last(shape, dtype)
    res = misaligned_channels_last(shape, dtype)
    scale, shift = torch.randn(shape[1], device=DEVICE), torch.randn(shape[1], device=DEVICE)
    y = OPS.bn_act(x, scale, shift, res, True)
    assert_matches(y.cpu(), ref_bn_act(*_cpu(x, scale, shift, res), True), dtype)
    y = OPS.add_relu(x, res)
    assert_matches(y.cpu(), ref_add_relu(*_cpu(x, res)), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_elementwise_nchw_and_tail(dtype):
    """NCHW-contiguous inputs are converted; 3*7*11*13 elements leave a tail past the last 16-byte vector."""
    x = torch.randn(3, 7, 11, 13, device=DEVICE).to(dtype)
    res = torch.randn(3, 7, 11, 13, device=DEVICE).to(dtype)
    assert_matches(OPS.add_relu(x, res).cpu(), ref_add_relu(*_cpu(x, res)), dtype)
    scale, shift = torch.randn(7, device=DEVICE), torch.randn(7, device=DEVICE)
    assert_matches(OPS.bn_act(x, scale, shift, res, False).cpu(),
                   ref_bn_act(*_cpu(x, scale, shift, res), False), dtype)


# --- argument checks in the binding (reached when the op is called directly) ---------------------------------

def _conv_op_args():
    x, w, scale, shift, res, stride, padding = make_conv_inputs(CONV_CASES[2], torch.float16, DEVICE, True)
    return [x, w, scale, shift, res, stride, padding, True]


@pytest.mark.parametrize("index,value,error,match", [
    (2, lambda a: a[2].cpu(), RuntimeError, "scale is on cpu"),
    (1, lambda a: a[1].float(), TypeError, "weight must have x's dtype"),
    (4, lambda a: a[4][:, :, :-1], RuntimeError, "residual must have the output's shape"),
    (3, lambda a: a[3][:-1], RuntimeError, "shift must be a 1-D tensor of length 16"),
    (5, lambda a: 0, RuntimeError, "stride must be >= 1"),
    (1, lambda a: a[1][:, :8], RuntimeError, "weight expects C_in=8"),
], ids=["scale_device", "weight_dtype", "residual_shape", "shift_length", "stride", "c_in"])
def test_conv_op_rejects_bad_arguments(index, value, error, match):
    args = _conv_op_args()
    args[index] = value(args)
    with pytest.raises(error, match=match):
        OPS.conv_bn_act(*args)


def test_elementwise_op_rejects_bad_arguments():
    x = torch.randn(2, 4, 3, 3, device=DEVICE)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        OPS.add_relu(x.double(), x.double())
    with pytest.raises(TypeError, match="residual must have x's dtype"):
        OPS.add_relu(x, x.half())
    with pytest.raises(RuntimeError, match="scale must be a 1-D tensor of length 4"):
        OPS.bn_act(x, torch.ones(3, device=DEVICE), torch.zeros(4, device=DEVICE), None, True)


# --- torch.library.opcheck -----------------------------------------------------------------------------------

@pytest.mark.parametrize("residual", [False, True], ids=["no_res", "res"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_opcheck_conv_bn_act(dtype, residual):
    for case in (CONV_CASES[1], CONV_CASES[4]):  # a vector-path 1x1 with stride 2, the scalar-path stem
        x, w, scale, shift, res, stride, padding = make_conv_inputs(case, dtype, DEVICE, residual)
        torch.library.opcheck(OPS.conv_bn_act.default, (x, w, scale, shift, res, stride, padding, True))


# --- 64-bit indexing ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_elementwise_past_2_pow_31_elements():
    """bf16 tensors of 8 * 16385^2 = 2,147,745,800 > 2^31 elements: indices past 2^31 must not wrap."""
    shape = (1, 8, 16385, 16385)
    free, _ = torch.cuda.mem_get_info()
    if free < 20 * 2**30:
        pytest.skip(f"needs 20 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    numel = 8 * 16385 * 16385
    assert numel > 2**31
    x = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16).contiguous(memory_format=CL)
    res = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16).contiguous(memory_format=CL)
    scale = torch.rand(8, device=DEVICE) + 0.5
    shift = torch.randn(8, device=DEVICE)
    xf, rf_ = x.permute(0, 2, 3, 1).reshape(-1), res.permute(0, 2, 3, 1).reshape(-1)  # NHWC storage order
    chunk = 2**26

    y = OPS.add_relu(x, res).permute(0, 2, 3, 1).reshape(-1)
    for start in list(range(0, numel, chunk)):
        sl = slice(start, min(start + chunk, numel))
        # torch adds bf16 in fp32 and rounds once, as the kernel does: the results are bitwise equal.
        assert torch.equal(y[sl], torch.relu(xf[sl] + rf_[sl])), f"add_relu differs in elements {sl}"
    del y

    y = OPS.bn_act(x, scale, shift, res, True).permute(0, 2, 3, 1).reshape(-1)
    channel_scale, channel_shift = scale.repeat(chunk // 8), shift.repeat(chunk // 8)
    for start in list(range(0, numel, chunk)):  # chunk and numel are multiples of C = 8: channel = index % 8
        stop = min(start + chunk, numel)
        sl = slice(start, stop)
        n = stop - start
        expected = torch.relu(xf[sl].float() * channel_scale[:n] + channel_shift[:n] + rf_[sl].float())
        assert_matches(y[sl], expected, torch.bfloat16)
