"""The "cuda" backend's convolution op called directly (torch.ops.resnet_fused.conv_bn_act): any input layout is
converted, misaligned tensors take the scalar path, launches go to the current stream (a CUDA graph captures and
replays them), and the binding's own argument checks. The op itself, on every backend, is tested in
tests/ops/test_conv_bn_act.py.

Everything here needs a CUDA GPU and the extension built with its CUDA sources. The oracle runs on CPU copies, so
it is true fp32; fp32 inputs go through TF32 tensor cores in the conv kernel: they are held to "tf32".
"""

from __future__ import annotations

import pytest
import torch

from tests.oracle import CONV_CASES, assert_matches, make_conv_inputs, ref_add_relu, ref_bn_act, ref_conv_bn_act
from tests.targets import DTYPE_IDS, DTYPES, Target, module_marks, on_cpu

pytestmark = module_marks("cuda")

DEVICE = "cuda"
CL = torch.channels_last
OPS = torch.ops.resnet_fused
tol = Target("cuda", DEVICE).tol


def check_conv(x, w, scale, shift, res, stride, padding, relu, y):
    expected = ref_conv_bn_act(*on_cpu(x, w, scale, shift, res), stride, padding, relu)
    assert y.device.type == "cuda" and y.dtype == x.dtype
    assert y.is_contiguous(memory_format=CL), "the output must be channels_last"
    assert_matches(y.cpu(), expected, tol(x.dtype))


def misaligned_channels_last(shape, dtype):
    """A channels_last tensor whose data starts one element past an allocation: never 16-byte aligned."""
    n, c, h, w = shape
    flat = torch.randn(n * c * h * w + 1, device=DEVICE).to(dtype)
    t = flat[1:].view(n, h, w, c).permute(0, 3, 1, 2)
    assert t.is_contiguous(memory_format=CL) and t.data_ptr() % 16 != 0
    return t


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
    y = ref_conv_bn_act(*on_cpu(x, w, scale, shift, None), stride, padding, False)
    expected = ref_add_relu(ref_bn_act(y, scale.cpu(), shift.cpu(), None, False), res.cpu())
    assert_matches(out.cpu(), expected, torch.float16)
    assert_matches(out_bn.cpu(), ref_bn_act(*on_cpu(x, scale, shift, None), True), torch.float16)


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
