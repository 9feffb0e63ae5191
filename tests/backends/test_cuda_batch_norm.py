"""The CUDA training BatchNorm kernels (csrc/cuda/batch_norm.cu, torch.ops.resnet_fused.batch_norm_* on CUDA
tensors) against their plain-torch reference (ops/batch_norm_reference.py), run on CPU copies: every dtype, both
layouts, odd channel counts, batch 1, 1x1 spatial, |mean| >> std, weight/bias absent, the vector and the scalar
path, the ReLU mask with NaN. Needs a GPU and an extension built with its CUDA sources; skipped elsewhere with
the reason. (tests/backends/test_cuda_batch_norm_compile.py checks the kernels compile, without a GPU.)
"""

from __future__ import annotations

import pytest
import torch

import resnet_fused as rf
from resnet_fused.ops import batch_norm_reference as reference
from tests.oracle import TOLERANCES, assert_matches


def _unavailable_reason():
    if not torch.cuda.is_available():
        return "needs a CUDA GPU; none is present on this machine"
    reason = rf.available_backends("cuda").get("cuda", "no 'cuda' backend is registered")
    if reason is None and not torch._C._dispatch_has_kernel_for_dispatch_key("resnet_fused::batch_norm_stats",
                                                                              "CUDA"):
        reason = "the extension has no CUDA batch_norm kernels (rebuild it)"
    return reason


_REASON = _unavailable_reason()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(_REASON is not None, reason=f"the cuda batch_norm kernels are unavailable: {_REASON}")]

OPS = torch.ops.resnet_fused
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
LAYOUT_IDS = ["nhwc", "nchw"]
# Odd C (scalar path in NHWC), C and HW multiples of 8 (vector path), batch 1, 1x1, ResNet-sized.
SHAPES = [(2, 5, 3, 7), (1, 16, 4, 4), (6, 3, 1, 1), (2, 72, 17, 13), (8, 64, 56, 56), (32, 256, 14, 14),
          (4, 2048, 7, 7)]
STATS_TOL = dict(atol=1e-6, rtol=1e-5)


def make_y(shape, dtype, channels_last, mean=0.0, std=1.0):
    y = (torch.randn(shape) * std + mean).to(dtype)
    return (y.contiguous(memory_format=torch.channels_last) if channels_last else y.contiguous()).cuda()


def make_params(y, affine=True, residual=False):
    mean, var = reference.stats(y.cpu())
    c = y.shape[1]
    params = [mean, torch.rsqrt(var + 1e-5), torch.rand(c) + 0.5 if affine else None,
              torch.randn(c) if affine else None,
              torch.randn(y.shape).to(y.dtype).contiguous(memory_format=reference.output_format(y)) if residual
              else None]
    return [None if t is None else t.cuda() for t in params]


def cpu(*tensors):
    return [None if t is None else t.cpu() for t in tensors]


@pytest.mark.parametrize("channels_last", [True, False], ids=LAYOUT_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_passes_match_reference(dtype, shape, channels_last):
    y = make_y(shape, dtype, channels_last, mean=3.0)
    mean, var = OPS.batch_norm_stats(y)
    expected_mean, expected_var = reference.stats(y.cpu())
    assert_matches(mean.cpu(), expected_mean, STATS_TOL)
    assert_matches(var.cpu(), expected_var, STATS_TOL)
    for residual, relu, affine in ((True, True, True), (False, False, False)):
        params = make_params(y, affine=affine, residual=residual)
        out = OPS.batch_norm_apply(y, *params, relu)
        assert out.dtype == dtype and out.is_contiguous(memory_format=reference.output_format(y))
        assert_matches(out.cpu(), reference.apply(*cpu(y, *params), relu).float(), dtype)
        grad_out = torch.randn(shape).to(dtype).cuda().contiguous(memory_format=reference.output_format(y))
        got = OPS.batch_norm_backward(grad_out, y, *params, relu)
        expected = reference.backward(*cpu(grad_out, y, *params), relu)
        assert_matches(got[0].cpu(), expected[0].float(), dtype)
        assert_matches(got[2].cpu(), expected[2], TOLERANCES[torch.float32])
        if affine:
            assert_matches(got[1].cpu(), expected[1], TOLERANCES[torch.float32])
        if residual:
            assert_matches(got[3].cpu(), expected[3].float(), dtype)
        else:
            assert got[3].numel() == 0


@pytest.mark.parametrize("channels_last", [True, False], ids=LAYOUT_IDS)
@pytest.mark.parametrize("offset", [1e2, 1e4, -3e4])
def test_stats_exact_when_mean_dwarfs_std(offset, channels_last):
    y = make_y((8, 64, 28, 28), torch.float32, channels_last, mean=offset, std=0.5)
    mean, var = OPS.batch_norm_stats(y)
    true_var, true_mean = torch.var_mean(y.cpu().double(), dim=(0, 2, 3), correction=0)
    assert ((mean.cpu().double() - true_mean).abs() <= 2e-7 * abs(offset)).all()
    assert ((var.cpu().double() - true_var).abs() <= 1e-5 * true_var).all()


def test_misaligned_tensors_take_the_scalar_path():
    base = torch.randn(2 * 16 * 4 * 4 + 1, device="cuda")
    y = base[1:].view(2, 4, 4, 16).permute(0, 3, 1, 2)  # channels_last, data 4 bytes past an allocation
    params = make_params(y, residual=True)
    out = OPS.batch_norm_apply(y, *params, True)
    assert_matches(out.cpu(), reference.apply(*cpu(y, *params), True), torch.float32)


def test_relu_mask_lets_nan_through():
    y = make_y((1, 2, 2, 4), torch.float32, True)
    mean, invstd, weight, bias, _ = make_params(y)
    y[0, 0, 0, 0] = float("nan")
    grad_out = torch.ones_like(y)
    got = OPS.batch_norm_backward(grad_out, y, mean, invstd, weight, bias, None, True)
    expected = reference.backward(*cpu(grad_out, y, mean, invstd, weight, bias), None, True)
    torch.testing.assert_close(got[1].cpu(), expected[1], equal_nan=True)
    torch.testing.assert_close(got[2].cpu(), expected[2])


def test_empty_batch():
    y = torch.empty((0, 3, 2, 2), device="cuda")
    mean, var = OPS.batch_norm_stats(y)
    assert mean.isnan().all() and var.isnan().all()
    ones = torch.ones(3, device="cuda")
    _, grad_weight, grad_bias, _ = OPS.batch_norm_backward(y, y, ones, ones, None, None, None, True)
    assert (grad_weight == 0).all() and (grad_bias == 0).all()

