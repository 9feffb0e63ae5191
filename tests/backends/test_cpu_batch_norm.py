"""The "cpu" backend's training BatchNorm kernels (csrc/cpu/batch_norm*.{h,cpp}, csrc/cpu/isa) against the
plain-torch reference (ops/batch_norm_reference.py), float64 and eager nn.BatchNorm2d (+ add) (+ ReLU).

Every dtype, NCHW and channels_last, channel counts off the vector width (3, 17, 67: partial groups), batch 1,
1x1 spatial, planes larger than one reduction chunk, |mean| >> std; weight and bias None, residual, ReLU on and off.
apply (and the ReLU mask that backward recomputes) is bitwise the reference's. Where NaN and inf go, results that
do not depend on the thread count, argument errors (public door and the bare ops), and the narrower instruction
sets' builds (a fresh process with ATEN_CPU_CAPABILITY).
"""

import itertools
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import resnet_fused as rf
from resnet_fused import ops
from resnet_fused.ops import batch_norm_reference as reference
from resnet_fused.ops.backends.extension import EXTENSION_REASON

# Skipped only where the extension is not built; a built extension without these kernels fails the tests.
pytestmark = pytest.mark.skipif(EXTENSION_REASON["CPU"] is not None,
                                reason=f"the C++ extension is unavailable: {EXTENSION_REASON['CPU']}")

CL = torch.channels_last
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
# (N, C, H, W): partial vector groups; channels_last rows past one strip (128); batch 1; 1x1 spatial; a plane
# longer than one NCHW chunk (4096 values).
# channels_last chunks are 128 rows by 256 channels: (3, 259, 7, 9) has two of each, the last ones partial
SHAPES = [(2, 3, 5, 7), (2, 17, 9, 9), (1, 67, 4, 6), (5, 67, 1, 1), (1, 3, 65, 66), (3, 259, 7, 9)]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]
# Kernel vs reference, both computing in fp32 and rounding to the dtype once: relative to the output's max.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
EPS = 1e-5


def layout(t, channels_last):
    return t.contiguous(memory_format=CL) if channels_last else t.contiguous()


def activation(shape, dtype, channels_last, mean=0.0, std=1.0):
    return layout((torch.randn(shape, dtype=torch.float64) * std + mean).to(dtype), channels_last)


def statistics(y):
    """Exact (float64) statistics of y, and the fp32 invstd the passes take."""
    var, mean = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
    return mean.float(), torch.rsqrt(var + EPS).float()


def affine(channels, affine_params):
    if not affine_params:
        return None, None
    return torch.rand(channels) + 0.5, torch.randn(channels)


def assert_close_to(actual, expected, dtype):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert actual.stride() == expected.stride(), "layout differs"
    scale = expected.float().abs().max().item() if expected.numel() else 0.0
    err = (actual.float() - expected.float()).abs().max().item() if expected.numel() else 0.0
    assert err <= TOLERANCE[dtype] * max(scale, 1e-3), f"max error {err:.3g} vs max |expected| {scale:.3g}"


def test_cpu_backend_runs_the_kernels():
    y = torch.randn(2, 3, 4, 4)
    mean, invstd = statistics(y)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ops.batch_norm_stats(y, backend="cpu")
        ops.batch_norm_apply(y, mean, invstd, None, None, backend="cpu")
        ops.batch_norm_backward(y, y, mean, invstd, None, None, backend="cpu")
    names = {event.name for event in prof.events()}
    for op in ("batch_norm_stats", "batch_norm_apply", "batch_norm_backward"):
        assert f"resnet_fused::{op}" in names, op
    assert rf._C.cpu_batch_norm_isa() in ("avx512", "avx2", "default")


# ---- stats ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("offset", [False, True], ids=["centered", "offset"])
def test_stats_match_float64(shape, channels_last, dtype, offset):
    # |mean| >> std = 1 (1e4 in fp32; where the dtype still resolves std 1 in bf16 and fp16): a one-pass sum of
    # squares would lose every digit of the fp32 variance.
    offset = {torch.float32: 1e4, torch.bfloat16: 50.0, torch.float16: 300.0}[dtype] if offset else 0.0
    y = activation(shape, dtype, channels_last, mean=offset)
    if shape[0] * shape[2] * shape[3] == 1:
        pytest.skip("one value per channel: no batch statistics")
    mean, var = ops.batch_norm_stats(y, backend="cpu")
    var64, mean64 = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == var.shape == (shape[1],)
    eps32 = torch.finfo(torch.float32).eps
    assert (mean.double() - mean64).abs().max() <= 2 * eps32 * (mean64.abs().max() + 1)
    assert ((var.double() - var64).abs() / var64).max() <= 1e-5
    ref_mean, ref_var = reference.stats(y)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-6, atol=1e-6 * (1 + offset))
    torch.testing.assert_close(var, ref_var, rtol=1e-4, atol=0)


@pytest.mark.parametrize("shape", [(4, 67, 33, 35), (2, 300, 15, 13)], ids=["67ch", "300ch"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_stats_do_not_depend_on_the_thread_count(channels_last, shape):
    y = activation(shape, torch.float32, channels_last, mean=3.0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.batch_norm_stats(y, backend="cpu")
        torch.set_num_threads(max(threads, 2))
        many = ops.batch_norm_stats(y, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_stats_nonfinite_values_as_eager(channels_last, dtype):
    # Channel 1 holds +inf (eager's batch mean: inf, var: NaN), channel 2 a NaN, channel 3 the dtype's largest
    # finite value everywhere (in fp32 and bf16 its fp32 sum overflows; the mean is finite). Channel 0 is untouched.
    y = torch.randn(3, 4, 70, 70, dtype=dtype)
    y[2, 1, 69, 5] = float("inf")
    y[0, 2, 3, 3] = float("nan")
    y[:, 3] = torch.finfo(dtype).max
    y = layout(y, channels_last)
    mean, var = ops.batch_norm_stats(y, backend="cpu")
    running_mean, running_var = torch.zeros(4), torch.ones(4)
    torch.batch_norm(y.float(), None, None, running_mean, running_var, True, 1.0, EPS, False)  # momentum 1
    assert mean[1].item() == float("inf") and running_mean[1].item() == float("inf")
    assert torch.isnan(var[1]) and torch.isnan(mean[2]) and torch.isnan(var[2])
    assert torch.isfinite(mean[[0, 3]]).all()
    torch.testing.assert_close(mean[3], torch.tensor(torch.finfo(dtype).max, dtype=torch.float32), rtol=1e-6, atol=0)
    assert var[3].item() == 0.0
    torch.testing.assert_close(mean[0], y[:, 0].double().mean().float())


# ---- apply ---------------------------------------------------------------------------------------------------------

CASES = list(itertools.product([False, True], [False, True], [False, True]))
CASE_IDS = [f"{'res' if r else 'nores'}-{'relu' if a else 'norelu'}-{'affine' if w else 'noaffine'}"
            for r, a, w in CASES]


def every_case(test):
    """test(case, shape, channels_last, dtype) over every combination."""
    for name, values, ids in (("case", CASES, CASE_IDS), ("shape", SHAPES, SHAPE_IDS),
                              ("channels_last", [False, True], ["nchw", "cl"]), ("dtype", DTYPES, DTYPE_IDS)):
        test = pytest.mark.parametrize(name, values, ids=ids)(test)
    return test


def apply_inputs(shape, dtype, channels_last, residual, affine_params, offset=0.0):
    y = activation(shape, dtype, channels_last, mean=offset, std=2.0)
    mean, invstd = statistics(y)
    weight, bias = affine(shape[1], affine_params)
    res = activation(shape, dtype, channels_last) if residual else None
    return y, mean, invstd, weight, bias, res


@every_case
def test_apply_is_bitwise_the_reference(case, shape, channels_last, dtype):
    residual, relu, affine_params = case
    args = apply_inputs(shape, dtype, channels_last, residual, affine_params, offset=50.0)
    out = ops.batch_norm_apply(*args, relu=relu, backend="cpu")
    expected = reference.apply(*args, relu)
    assert out.dtype == dtype and out.stride() == expected.stride()
    assert torch.equal(out, expected)


def test_apply_reads_any_layout_and_writes_ys():
    y, mean, invstd, weight, bias, res = apply_inputs((2, 17, 6, 5), torch.float32, True, True, True)
    res_nchw = res.contiguous()
    sliced = torch.randn(2, 34, 6, 5)[:, ::2]  # neither contiguous nor channels_last: NCHW out
    for args in ((y, mean, invstd, weight, bias, res_nchw), (sliced, mean, invstd, weight, bias, res)):
        out = ops.batch_norm_apply(*args, relu=True, backend="cpu")
        assert torch.equal(out, reference.apply(*args, True))
    assert ops.batch_norm_apply(sliced, mean, invstd, weight, bias, relu=True, backend="cpu").is_contiguous()


# ---- backward ------------------------------------------------------------------------------------------------------

@every_case
def test_backward_matches_the_reference(case, shape, channels_last, dtype):
    residual, relu, affine_params = case
    y, mean, invstd, weight, bias, res = apply_inputs(shape, dtype, channels_last, residual, affine_params,
                                                      offset=50.0)
    grad_out = activation(shape, dtype, channels_last)
    got = ops.batch_norm_backward(grad_out, y, mean, invstd, weight, bias, res, relu=relu, backend="cpu")
    expected = reference.backward(grad_out, y, mean, invstd, weight, bias, res, relu)
    grad_y, grad_weight, grad_bias, grad_residual = got
    assert_close_to(grad_y, expected[0], dtype)
    assert (grad_weight is None) == (weight is None) and (grad_residual is None) == (res is None)
    if weight is not None:
        assert_close_to(grad_weight, expected[1], torch.float32)
    assert_close_to(grad_bias, expected[2], torch.float32)
    if res is not None:  # g itself: the same mask, the same bits
        assert grad_residual.stride() == expected[3].stride() and torch.equal(grad_residual, expected[3])


def test_backward_mask_is_the_forwards_at_zero():
    # z = 0 exactly, then the residual moves it by one denormal either way: backward lets the gradient through
    # exactly where the forward's ReLU let the value through.
    y = torch.full((2, 1, 3, 4), 0.5)
    mean, invstd = torch.tensor([0.5]), torch.tensor([2.0])
    res = torch.tensor([0.0, 1e-45, -1e-45]).repeat(8).view(2, 1, 3, 4)
    out = ops.batch_norm_apply(y, mean, invstd, None, None, res, relu=True, backend="cpu")
    *_, grad_residual = ops.batch_norm_backward(torch.ones_like(y), y, mean, invstd, None, None, res, relu=True,
                                                backend="cpu")
    assert (out > 0).sum() == 8 and torch.equal(grad_residual, (out > 0).float())


# ---- against eager nn.BatchNorm2d (+ add) (+ ReLU) -------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_forward_and_backward_match_eager(case, channels_last, dtype):
    # Eager runs on fp32 copies: in bf16/fp16 it rounds bn(y) before the add and the ReLU, which moves the mask;
    # the kernels compute in fp32 and round once, as eager fp32 followed by one cast.
    residual, relu, affine_params = case
    shape = (3, 17, 7, 5)
    y = activation(shape, dtype, channels_last, mean=-3.0, std=2.0)
    res = activation(shape, dtype, channels_last) if residual else None
    grad_out = activation(shape, dtype, channels_last)
    bn = nn.BatchNorm2d(shape[1], eps=EPS, affine=affine_params)
    if affine_params:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    y_eager = y.detach().float().requires_grad_(True)
    res_eager = None if res is None else res.detach().float().requires_grad_(True)
    out_eager = bn(y_eager)
    if res_eager is not None:
        out_eager = out_eager + res_eager
    if relu:
        out_eager = torch.relu(out_eager)
    out_eager.backward(grad_out.float())

    weight, bias = (bn.weight.detach(), bn.bias.detach()) if affine_params else (None, None)
    mean, var = ops.batch_norm_stats(y, backend="cpu")
    invstd = torch.rsqrt(var + EPS)
    out = ops.batch_norm_apply(y, mean, invstd, weight, bias, res, relu=relu, backend="cpu")
    assert_close_to(out, out_eager.detach().to(dtype), dtype)
    grad_y, grad_weight, grad_bias, grad_residual = ops.batch_norm_backward(
        grad_out, y, mean, invstd, weight, bias, res, relu=relu, backend="cpu")
    assert_close_to(grad_y, y_eager.grad.to(dtype), dtype)
    if affine_params:
        assert_close_to(grad_weight, bn.weight.grad, dtype)
        assert_close_to(grad_bias, bn.bias.grad, dtype)
    if residual:
        assert_close_to(grad_residual, res_eager.grad.to(dtype), dtype)


# ---- NaN and inf -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_nan_and_inf_propagate_as_in_the_reference(channels_last, dtype):
    y, mean, invstd, weight, bias, res = apply_inputs((2, 17, 5, 6), dtype, channels_last, True, True)
    y[1, 4, 2, 3] = float("nan")  # a NaN z passes ReLU forward and its gradient backward
    res[0, 9, 1, 1] = float("inf")
    out = ops.batch_norm_apply(y, mean, invstd, weight, bias, res, relu=True, backend="cpu")
    grad_out = activation(y.shape, dtype, channels_last)
    n, h, w = (out[:, 2] > 0).nonzero()[0].tolist()
    grad_out[n, 2, h, w] = float("nan")  # where ReLU passes: poisons channel 2's sums, hence its whole grad_y
    torch.testing.assert_close(out, reference.apply(y, mean, invstd, weight, bias, res, True), rtol=0, atol=0,
                               equal_nan=True)
    assert torch.isnan(out[1, 4, 2, 3]) and out[0, 9, 1, 1].item() == float("inf")
    got = ops.batch_norm_backward(grad_out, y, mean, invstd, weight, bias, res, relu=True, backend="cpu")
    expected = reference.backward(grad_out, y, mean, invstd, weight, bias, res, True)
    for actual, wanted in zip(got, expected):
        assert torch.equal(torch.isnan(actual), torch.isnan(wanted))
    assert torch.isnan(got[0][:, 2]).all() and torch.isnan(got[0][:, 4]).all()
    assert got[3][1, 4, 2, 3] == grad_out[1, 4, 2, 3]  # NaN z: the gradient passes


# ---- edges and errors ------------------------------------------------------------------------------------------------

def test_empty_batch():
    y = torch.randn(0, 5, 3, 3)
    mean, var = ops.batch_norm_stats(y, backend="cpu")
    assert torch.isnan(mean).all() and torch.isnan(var).all()
    stat = torch.zeros(5)
    assert ops.batch_norm_apply(y, stat, stat + 1, None, None, backend="cpu").shape == y.shape
    grad_y, _, grad_bias, _ = ops.batch_norm_backward(y, y, stat, stat + 1, None, None, backend="cpu")
    assert grad_y.shape == y.shape and torch.equal(grad_bias, torch.zeros(5))


def _bad_calls():
    y = torch.randn(2, 3, 4, 4)
    stat = torch.zeros(3)
    return [
        (lambda: ops.batch_norm_stats(y[0], backend="cpu"), ValueError, "y must be a 4-D"),
        (lambda: ops.batch_norm_stats(y.double(), backend="cpu"), TypeError, "y must be float32"),
        (lambda: ops.batch_norm_apply(y, torch.zeros(4), stat, None, None, backend="cpu"), ValueError,
         "mean must be a 1-D tensor of length 3"),
        (lambda: ops.batch_norm_apply(y, stat, stat.double(), None, None, backend="cpu"), TypeError,
         "invstd must be float32"),
        (lambda: ops.batch_norm_apply(y, stat, stat, torch.ones(2), None, backend="cpu"), ValueError,
         "weight must be a 1-D tensor of length 3"),
        (lambda: ops.batch_norm_apply(y, stat, stat, None, None, y.half(), backend="cpu"), TypeError,
         "residual must have y's dtype"),
        (lambda: ops.batch_norm_apply(y, stat, stat, None, None, y[:1], backend="cpu"), ValueError,
         "residual must have y's shape"),
        (lambda: ops.batch_norm_apply(y, stat, stat, None, None, relu=1, backend="cpu"), TypeError,
         "relu must be a bool"),
        (lambda: ops.batch_norm_backward(y[:1], y, stat, stat, None, None, backend="cpu"), ValueError,
         "grad_out must have y's shape"),
        (lambda: ops.batch_norm_backward(y.int(), y, stat, stat, None, None, backend="cpu"), TypeError,
         "grad_out must be float32"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_public_door_rejects_bad_arguments(index):
    call, error, message = _bad_calls()[index]
    with pytest.raises(error, match=message):
        call()


def test_bare_ops_reject_bad_arguments():
    # What the public door checks, the kernels check again (a direct torch.ops call must not read out of bounds).
    y = torch.randn(2, 3, 4, 4)
    stat = torch.zeros(3)
    bn_ops = torch.ops.resnet_fused
    with pytest.raises(RuntimeError, match="mean must be a 1-D tensor of length 3"):
        bn_ops.batch_norm_apply(y, torch.zeros(2), stat, None, None, None, True)
    with pytest.raises(TypeError, match="invstd must be float32"):
        bn_ops.batch_norm_apply(y, stat, stat.double(), None, None, None, True)
    with pytest.raises(RuntimeError, match="residual must have y's shape"):
        bn_ops.batch_norm_apply(y, stat, stat, None, None, y[:1], True)
    with pytest.raises(TypeError, match="grad_out must have y's dtype"):
        bn_ops.batch_norm_backward(y.half(), y, stat, stat, None, None, None, True)
    with pytest.raises(RuntimeError, match="y must be a 4-D"):
        bn_ops.batch_norm_stats(y[0])


# ---- every instruction set's build -----------------------------------------------------------------------------------

_OTHER_ISA_CHECK = """
import torch, resnet_fused
from resnet_fused import ops
from resnet_fused.ops import batch_norm_reference as reference
assert resnet_fused._C.cpu_batch_norm_isa() == {isa!r}, resnet_fused._C.cpu_batch_norm_isa()
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    for memory_format in (torch.contiguous_format, torch.channels_last):
        y = (torch.randn(2, 67, 9, 7) * 2 + 50).to(dtype).contiguous(memory_format=memory_format)
        res, grad = torch.randn_like(y), torch.randn_like(y)
        weight, bias = torch.rand(67) + 0.5, torch.randn(67)
        mean, var = ops.batch_norm_stats(y, backend="cpu")
        ref_mean, ref_var = reference.stats(y)
        torch.testing.assert_close(mean, ref_mean, rtol=1e-6, atol=1e-4)
        torch.testing.assert_close(var, ref_var, rtol=1e-4, atol=0)
        invstd = torch.rsqrt(ref_var + 1e-5)
        args = (y, ref_mean, invstd, weight, bias, res)
        assert torch.equal(ops.batch_norm_apply(*args, relu=True, backend="cpu"), reference.apply(*args, True))
        got = ops.batch_norm_backward(grad, *args, relu=True, backend="cpu")
        for actual, expected in zip(got, reference.backward(grad, *args, True)):
            torch.testing.assert_close(actual, expected, rtol=2e-2, atol=2e-2 * expected.float().abs().max().item())
"""


@pytest.mark.parametrize("isa", ["default", "avx2"])
def test_every_instruction_set_build_matches_the_reference(isa):
    # This process runs the widest build; ATEN_CPU_CAPABILITY makes a fresh one pick the narrower ones.
    order = ["default", "avx2", "avx512"]
    if order.index(isa) >= order.index(rf._C.cpu_batch_norm_isa()):
        pytest.skip(f"this process already runs the {rf._C.cpu_batch_norm_isa()} build")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=isa)
    proc = subprocess.run([sys.executable, "-c", _OTHER_ISA_CHECK.format(isa=isa)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
