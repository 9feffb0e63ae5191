"""The "triton" backend's training BatchNorm passes (kernels/triton/batch_norm.py) against their plain-torch
reference (ops/batch_norm_reference.py): statistics, apply (+ residual) (+ ReLU) and backward, in every dtype, both
layouts, odd channel counts, batch 1, 1x1 spatial, |mean| >> std, weight/bias absent.

Without a GPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on small
shapes; the @pytest.mark.gpu cases take ResNet-sized ones.
"""

from __future__ import annotations

import copy

import pytest
import torch

triton = pytest.importorskip("triton")

import resnet_fused as rf
from resnet_fused.ops import batch_norm_reference as reference
from tests.float64_step import assert_step_matches, one_sgd_step
from tests.oracle import TOLERANCES, assert_matches
from tests.test_train_step import _draw

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if rf.available_backends(DEVICE)["triton"] is not None:
    pytest.skip("the triton backend is unavailable here (triton not importable)", allow_module_level=True)

from resnet_fused.kernels.triton import batch_norm as kernels  # noqa: E402
from resnet_fused.kernels.triton import conv_bn_act as conv_kernel  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
LAYOUTS = [True, False]
LAYOUT_IDS = ["nhwc", "nchw"]
# (id, shape): odd channel counts, batch 1, 1x1 and tiny spatial sizes, one shape with several reduction tiles
SHAPES = [("odd_c", (2, 5, 3, 7)), ("batch1", (1, 12, 4, 4)), ("spatial_1x1", (6, 3, 1, 1)),
          ("wide_c", (2, 70, 2, 3)), ("tiles", (3, 4, 19, 23))]
SHAPE_IDS = [s[0] for s in SHAPES]
# Statistics are fp32 whatever y's dtype: compared as fp32, relative to the data's own spread.
STATS_TOL = dict(atol=1e-6, rtol=2e-6)


def make_y(shape, dtype, channels_last, mean=0.0, std=1.0):
    y = (torch.randn(shape) * std + mean).to(dtype)
    y = y.contiguous(memory_format=torch.channels_last) if channels_last else y.contiguous()
    return y.to(DEVICE)


def make_params(y, affine=True, residual=False):
    c = y.shape[1]
    mean, var = reference.stats(y.cpu())
    invstd = torch.rsqrt(var + 1e-5)
    weight = torch.rand(c) + 0.5 if affine else None
    bias = torch.randn(c) if affine else None
    res = torch.randn(y.shape).to(y.dtype).contiguous(memory_format=reference.output_format(y)) if residual else None
    return [None if t is None else t.to(DEVICE) for t in (mean, invstd, weight, bias, res)]


def cpu(*tensors):
    return [None if t is None else t.cpu() for t in tensors]


def check_layout(out, y):
    assert out.dtype == y.dtype and out.shape == y.shape
    assert out.is_contiguous(memory_format=reference.output_format(y))


# --- statistics ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels_last", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("shape", [s[1] for s in SHAPES], ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_stats_match_reference(dtype, shape, channels_last):
    y = make_y(shape, dtype, channels_last)
    mean, var = rf.ops.batch_norm_stats(y, backend="triton")
    expected_mean, expected_var = reference.stats(y.cpu())
    assert mean.dtype == var.dtype == torch.float32
    assert_matches(mean.cpu(), expected_mean, STATS_TOL)
    assert_matches(var.cpu(), expected_var, STATS_TOL)


@pytest.mark.parametrize("channels_last", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("offset", [1e2, 1e4, -3e4])
def test_stats_exact_when_mean_dwarfs_std(offset, channels_last):
    # A sum of squares (E[y^2] - E[y]^2) loses every digit here: at 1e4, fp32 spacing is 1e-3 and var is 0.25.
    y = make_y((3, 6, 9, 11), torch.float32, channels_last, mean=offset, std=0.5)
    mean, var = rf.ops.batch_norm_stats(y, backend="triton")
    true_var, true_mean = torch.var_mean(y.cpu().double(), dim=(0, 2, 3), correction=0)
    assert ((mean.cpu().double() - true_mean).abs() <= 2e-7 * abs(offset)).all()
    assert ((var.cpu().double() - true_var).abs() <= 2e-6 * true_var).all(), (var.cpu(), true_var)


@pytest.mark.parametrize("channels_last", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("tiles_per_program", [1, 2, 4])
def test_stats_merge_tiles_within_and_across_programs(tiles_per_program, channels_last):
    # (3, 4, 19, 23): 3 NHWC tiles of 1024 rows, 3 NCHW tiles (one per image): merged in a program (Chan's
    # update) or across partials (the combine), and a last tile that is short.
    y = make_y((3, 4, 19, 23), torch.float32, channels_last, mean=50.0)
    mean, var = kernels.batch_norm_stats(y, channels_last, tiles_per_program=tiles_per_program)
    expected_mean, expected_var = reference.stats(y.cpu())
    assert_matches(mean.cpu(), expected_mean, STATS_TOL)
    assert_matches(var.cpu(), expected_var, dict(atol=1e-6, rtol=1e-5))


def test_combine_reads_many_partials_and_skips_empty_slots():
    # The conv epilogue's contract: per-tile (count, pivot, mean about the pivot, M2); slots it did not write keep
    # count 0 and garbage, which must not reach the result. 300 partials: several steps of the combine's loop.
    c, rows = 5, 7
    data = torch.randn(300 * rows, c, dtype=torch.float64) * 3 + 1e3
    counts, pivots, means, m2 = kernels.stats_workspace(310, c, DEVICE)
    for p in range(300):
        tile = data[p * rows:(p + 1) * rows] if p < 299 else data[p * rows:p * rows + 3]  # a short last tile
        pivot = tile[0].float().double()
        counts[p] = tile.shape[0]
        pivots[p] = pivot.float()
        means[p] = (tile - pivot).mean(0).float()
        m2[p] = ((tile - tile.mean(0)) ** 2).sum(0).float()
    means[300:], m2[300:] = float("nan"), float("inf")
    used = data[:299 * rows + 3].float().double()
    mean, var = kernels.combine_stats((counts, pivots, means, m2), used.shape[0])
    true_var, true_mean = torch.var_mean(used, dim=0, correction=0)
    assert ((mean.cpu().double() - true_mean).abs() <= 1e-4).all()
    assert ((var.cpu().double() - true_var).abs() <= 1e-5 * true_var).all()


def test_stats_of_an_empty_batch_are_nan_as_torch():
    y = torch.empty((0, 3, 4, 4), device=DEVICE)
    mean, var = rf.ops.batch_norm_stats(y, backend="triton")
    assert mean.shape == var.shape == (3,) and mean.isnan().all() and var.isnan().all()


# --- apply --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("residual", [False, True], ids=["no_res", "res"])
@pytest.mark.parametrize("channels_last", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_apply_matches_reference(dtype, channels_last, residual, relu):
    y = make_y((2, 5, 3, 7), dtype, channels_last, mean=2.0)
    mean, invstd, weight, bias, res = make_params(y, residual=residual)
    out = rf.ops.batch_norm_apply(y, mean, invstd, weight, bias, res, relu=relu, backend="triton")
    check_layout(out, y)
    expected = reference.apply(*cpu(y, mean, invstd, weight, bias, res), relu)
    assert_matches(out.cpu(), expected.float(), dtype)


@pytest.mark.parametrize("channels_last", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("shape", [s[1] for s in SHAPES], ids=SHAPE_IDS)
def test_apply_shapes_without_weight_and_bias(shape, channels_last):
    y = make_y(shape, torch.float32, channels_last)
    mean, invstd, _, _, _ = make_params(y)
    out = rf.ops.batch_norm_apply(y, mean, invstd, None, None, None, relu=True, backend="triton")
    check_layout(out, y)
    assert_matches(out.cpu(), reference.apply(*cpu(y, mean, invstd), None, None, None, True), torch.float32)


def test_apply_keeps_nan_through_relu_and_64bit_offsets():
    y = make_y((2, 3, 4, 5), torch.float32, True)
    y[0, 1, 2, 3] = float("nan")
    mean, invstd, weight, bias, res = make_params(y, residual=True)
    expected = reference.apply(*cpu(y, mean, invstd, weight, bias, res), True)
    for index_64 in (False, True):
        out = kernels.batch_norm_apply(y, mean, invstd, weight, bias, res, True, True, index_64=index_64)
        assert out[0, 1, 2, 3].isnan()
        torch.testing.assert_close(out.cpu(), expected, equal_nan=True)


def test_apply_reads_a_residual_of_the_other_layout():
    y = make_y((2, 5, 3, 3), torch.float32, True)
    mean, invstd, weight, bias, _ = make_params(y)
    res = torch.randn(y.shape, device=DEVICE)  # contiguous NCHW beside a channels_last y
    out = rf.ops.batch_norm_apply(y, mean, invstd, weight, bias, res, relu=False, backend="triton")
    check_layout(out, y)
    assert_matches(out.cpu(), reference.apply(*cpu(y, mean, invstd, weight, bias, res), False), torch.float32)


# --- backward -----------------------------------------------------------------------------------------------

def grad_tol(dtype):
    """grad_y in y's dtype; grad_weight / grad_bias are fp32 sums (of rounded inputs: exact up to fp32)."""
    return TOLERANCES[dtype]


def check_backward(y, params, relu, grad_dtype=None, **launch):
    mean, invstd, weight, bias, res = params
    grad_out = torch.randn(y.shape).to(grad_dtype or y.dtype).to(DEVICE)
    if launch:
        got = kernels.batch_norm_backward(grad_out, y, mean, invstd, weight, bias, res, relu,
                                          reference.output_format(y) == torch.channels_last, **launch)
        got = (got[0], None if weight is None else got[1], got[2], got[3])
    else:
        got = rf.ops.batch_norm_backward(grad_out, y, mean, invstd, weight, bias, res, relu=relu, backend="triton")
    expected = reference.backward(*cpu(grad_out, y, mean, invstd, weight, bias, res), relu)
    names = ("grad_y", "grad_weight", "grad_bias", "grad_residual")
    for name, actual, wanted in zip(names, got, expected):
        assert (actual is None) == (wanted is None), name
        if actual is None:
            continue
        if name in ("grad_y", "grad_residual"):
            check_layout(actual, y)
        tol = TOLERANCES[torch.float32] if name in ("grad_weight", "grad_bias") else grad_tol(y.dtype)
        assert_matches(actual.cpu(), wanted.float(), tol)
    return got


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("residual", [False, True], ids=["no_res", "res"])
@pytest.mark.parametrize("channels_last", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_backward_matches_reference(dtype, channels_last, residual, relu):
    y = make_y((2, 5, 3, 7), dtype, channels_last, mean=1.0)
    check_backward(y, make_params(y, residual=residual), relu)


@pytest.mark.parametrize("channels_last", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("shape", [s[1] for s in SHAPES], ids=SHAPE_IDS)
def test_backward_shapes_without_weight_and_bias(shape, channels_last):
    y = make_y(shape, torch.float32, channels_last)
    check_backward(y, make_params(y, affine=False, residual=True), True)


@pytest.mark.parametrize("tiles_per_program", [1, 2])
def test_backward_large_mean_and_merged_tiles(tiles_per_program):
    y = make_y((3, 4, 19, 23), torch.float32, True, mean=1e3, std=0.5)
    check_backward(y, make_params(y, residual=True), True, tiles_per_program=tiles_per_program, index_64=True)


def test_backward_relu_mask_as_reference_nan_passes():
    # z <= 0 blocks the gradient, z = NaN lets it through (as eager's ReLU backward); z exactly 0 blocks it.
    y = make_y((1, 2, 2, 3), torch.float32, True)
    mean, invstd, weight, bias, _ = make_params(y)
    y[0, 0, 0, 0] = float("nan")
    y[0, 1, 0, 0] = mean[1]  # xhat = 0 and, with bias 0 there, z = 0
    bias[1] = 0.0
    grad_out = torch.ones(y.shape, device=DEVICE)
    _, grad_weight, grad_bias, _ = rf.ops.batch_norm_backward(grad_out, y, mean, invstd, weight, bias, relu=True,
                                                              backend="triton")
    _, expected_weight, expected_bias, _ = reference.backward(*cpu(grad_out, y, mean, invstd, weight, bias), None,
                                                              True)
    torch.testing.assert_close(grad_weight.cpu(), expected_weight, equal_nan=True)
    torch.testing.assert_close(grad_bias.cpu(), expected_bias)
    assert grad_weight[0].isnan() and grad_bias[1] < 6  # the NaN's gradient passed; the z = 0 one did not


def test_backward_takes_an_fp32_gradient_for_half_y():
    y = make_y((2, 5, 3, 3), torch.bfloat16, False)
    check_backward(y, make_params(y, residual=True), True, grad_dtype=torch.float32)


def test_backward_of_an_empty_batch():
    y = torch.empty((0, 3, 2, 2), device=DEVICE)
    mean = torch.zeros(3, device=DEVICE)
    grad_y, grad_weight, grad_bias, _ = rf.ops.batch_norm_backward(torch.empty_like(y), y, mean, mean + 1,
                                                                   mean + 1, mean, backend="triton")
    assert grad_y.shape == y.shape and (grad_weight == 0).all() and (grad_bias == 0).all()


# --- statistics from the conv's epilogue ----------------------------------------------------------------------

# (N, Cin, H, W, Cout, k, stride, padding): per tap and flat K (the stem), odd sizes, a last M tile that is short
CONV_STATS_CASES = [(2, 16, 8, 8, 32, 1, 1, 0), (1, 3, 15, 15, 16, 7, 2, 3), (3, 5, 7, 5, 7, 3, 1, 1)]


def conv_with_stats(case, dtype, bias_offset, config=None):
    n, cin, h, w, cout, k, stride, padding = case
    x = torch.randn(n, cin, h, w).to(dtype).to(DEVICE)
    weight = (torch.randn(cout, cin, k, k) / (cin * k * k) ** 0.5).to(dtype).to(DEVICE)
    bias = (torch.randn(cout) + bias_offset).to(DEVICE)
    out = torch.empty(rf.ops.conv_output_shape(x.shape, cout, (k, k), stride, padding), dtype=dtype, device=DEVICE,
                      memory_format=torch.channels_last)
    y, mean, var = conv_kernel.conv_batch_norm_stats(x, conv_kernel.pack_weight(weight), bias, out, k, k, stride,
                                                     padding, config=config)
    expected = torch.nn.functional.conv2d(x.cpu().float(), weight.cpu().float(), bias.cpu(), stride, padding)
    return y, mean, var, expected


@pytest.mark.parametrize("case", CONV_STATS_CASES, ids=["1x1", "stem", "odd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_conv_epilogue_statistics_match_the_stored_output(dtype, case):
    # The statistics are those of y as stored (rounded to its dtype): what apply and backward read after.
    y, mean, var, expected = conv_with_stats(case, dtype, bias_offset=30.0)
    assert_matches(y.cpu(), expected, "tf32" if dtype == torch.float32 and DEVICE == "cuda" else dtype)
    expected_mean, expected_var = reference.stats(y.cpu())
    assert_matches(mean.cpu(), expected_mean, STATS_TOL)
    assert_matches(var.cpu(), expected_var, dict(atol=1e-6, rtol=1e-5))


def test_conv_epilogue_statistics_with_a_forced_tile_smaller_than_the_autotuners():
    # A forced config (the GPU pass forces every GPU config; the interpreter autotunes over a 64-row tile only)
    # writes one partial per tile of its own BLOCK_M: the workspace must hold them all (it held one per 64 rows,
    # and a 16-row tile wrote four times as many: out of bounds, a heap corruption in the interpreter).
    config = triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 8}, num_warps=4, num_stages=1)
    m = 2 * 17 * 17
    assert conv_kernel.statistics_partials(m, config) >= triton.cdiv(m, 16)
    y, mean, var, _ = conv_with_stats((2, 16, 17, 17, 24, 3, 1, 1), torch.float32, 1.0, config=config)
    true_var, true_mean = torch.var_mean(y.cpu().double(), dim=(0, 2, 3), correction=0)
    assert_matches(mean.cpu(), true_mean.float(), dict(atol=1e-6, rtol=1e-5))
    assert_matches(var.cpu(), true_var.float(), dict(atol=1e-6, rtol=1e-5))


def test_conv_epilogue_statistics_with_fewer_tiles_than_slots(monkeypatch):
    # A tile larger than the smallest candidate's writes fewer partials than the workspace holds: the rest stay
    # empty (count 0, NaN here) and must be skipped. Large mean: the partials' pivots keep var exact.
    def poisoned(partials, channels, device):
        counts, *matrices = kernels.stats_workspace(partials, channels, device)
        return (counts, *(m.fill_(float("nan")) for m in matrices))

    monkeypatch.setattr(conv_kernel, "stats_workspace", poisoned)
    config = triton.Config({"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 8}, num_warps=4, num_stages=1)
    assert conv_kernel.statistics_partials(2 * 17 * 17) > triton.cdiv(2 * 17 * 17, 128)
    y, mean, var, _ = conv_with_stats((2, 16, 17, 17, 24, 3, 1, 1), torch.float32, 1e3, config=config)
    true_var, true_mean = torch.var_mean(y.cpu().double(), dim=(0, 2, 3), correction=0)
    assert ((mean.cpu().double() - true_mean).abs() <= 2e-7 * 1e3).all()
    assert ((var.cpu().double() - true_var).abs() <= 2e-6 * true_var).all()


# --- in a fused training step -------------------------------------------------------------------------------

@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_fused_training_step_on_triton_matches_float64(monkeypatch, channels_last):
    # The tutorial ResNet of tests/test_train_step.py fused with backend="triton": its units' BatchNorm passes run
    # these kernels, and the step stays within the float64 bound eager fp32 sets. On channels_last activations the
    # convs run the conv kernel with the statistics from its epilogue (NCHW: aten's conv, then the stats kernel).
    calls = []
    for module, name in ((kernels, "batch_norm_stats"), (kernels, "batch_norm_apply"),
                         (kernels, "batch_norm_backward"), (conv_kernel, "conv_batch_norm_stats")):
        launcher = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=launcher, _n=name, **k: calls.append(_n) or _f(*a, **k))
    model, x, target = _draw("tutorial")
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    fused, _ = rf.fuse_model(model, backend="triton")
    truth = one_sgd_step(copy.deepcopy(model).double(), x, target)
    eager = one_sgd_step(copy.deepcopy(model), x, target)
    assert_step_matches(one_sgd_step(fused, x, target), eager, truth)
    first_pass = "conv_batch_norm_stats" if channels_last else "batch_norm_stats"
    assert {first_pass, "batch_norm_apply", "batch_norm_backward"} <= set(calls), calls
    if channels_last:  # every unit's conv: its input is channels_last from the stem on
        assert "batch_norm_stats" not in calls, calls


# --- torch.library ------------------------------------------------------------------------------------------

def test_opcheck_batch_norm_ops():
    ops = torch.ops.resnet_fused_triton
    y = make_y((2, 3, 2, 2), torch.float32, True)
    mean, invstd, weight, bias, res = make_params(y, residual=True)
    torch.library.opcheck(ops.batch_norm_stats, (y,), test_utils=("test_schema", "test_faketensor"))
    x = make_y((2, 3, 5, 5), torch.float32, True)
    packed = conv_kernel.pack_weight(torch.randn(4, 3, 3, 3, device=DEVICE))
    torch.library.opcheck(ops.conv_batch_norm_stats, (x, packed, torch.zeros(4, device=DEVICE), 3, 3, 2, 1),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ops.batch_norm_apply, (y, mean, invstd, weight, None, res, True),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ops.batch_norm_backward, (torch.randn_like(y), y, mean, invstd, None, bias, None, True),
                          test_utils=("test_schema", "test_faketensor"))


# --- GPU: ResNet-sized shapes -------------------------------------------------------------------------------

GPU_SHAPES = [(8, 64, 56, 56), (32, 256, 14, 14), (4, 2048, 7, 7), (3, 72, 17, 13), (256, 64, 1, 1)]


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gpu_passes_match_reference(dtype, shape, channels_last):
    y = make_y(shape, dtype, channels_last, mean=3.0)
    mean, var = rf.ops.batch_norm_stats(y, backend="triton")
    expected_mean, expected_var = reference.stats(y.cpu())
    assert_matches(mean.cpu(), expected_mean, STATS_TOL)
    assert_matches(var.cpu(), expected_var, dict(atol=1e-6, rtol=1e-5))
    params = make_params(y, residual=True)
    out = rf.ops.batch_norm_apply(y, *params, relu=True, backend="triton")
    assert_matches(out.cpu(), reference.apply(*cpu(y, *params), True).float(), dtype)
    check_backward(y, params, True)
