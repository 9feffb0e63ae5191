"""The "cuda" backend's elementwise ops called directly (torch.ops.resnet_fused.bn_act and add_relu): their pointer
paths (misaligned, NCHW, a tail past the last vector), the binding's argument checks, 64-bit indexing. The ops
themselves, on every backend, are tested in tests/ops/; the convolution's internals in
tests/backends/test_cuda_conv.py.

Everything here needs a CUDA GPU and the extension built with its CUDA sources; elsewhere the module is skipped
with the reason `resnet_fused.available_backends("cuda")` gives. The oracle runs on CPU copies.
"""

from __future__ import annotations

import pytest
import torch

from tests.backends.test_cuda_conv import misaligned_channels_last
from tests.oracle import assert_matches, ref_add_relu, ref_bn_act
from tests.targets import DTYPE_IDS, DTYPES, module_marks, on_cpu


pytestmark = module_marks("cuda")

DEVICE = "cuda"
CL = torch.channels_last
OPS = torch.ops.resnet_fused


# --- the elementwise ops' pointer paths: misaligned, NCHW, a tail past the last vector -----------------------

@pytest.mark.parametrize("shape", [(2, 16, 5, 7), (3, 5, 7, 5)], ids=["c16", "c5_odd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_elementwise_misaligned(dtype, shape):
    """Tensors starting off a 16-byte boundary take the scalar path, with and without a vector-friendly C."""
    x = misaligned_channels_last(shape, dtype)
    res = misaligned_channels_last(shape, dtype)
    scale, shift = torch.randn(shape[1], device=DEVICE), torch.randn(shape[1], device=DEVICE)
    y = OPS.bn_act(x, scale, shift, res, True)
    assert_matches(y.cpu(), ref_bn_act(*on_cpu(x, scale, shift, res), True), dtype)
    y = OPS.add_relu(x, res)
    assert_matches(y.cpu(), ref_add_relu(*on_cpu(x, res)), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_elementwise_nchw_and_tail(dtype):
    """NCHW-contiguous inputs are converted; 3*7*11*13 elements leave a tail past the last 16-byte vector."""
    x = torch.randn(3, 7, 11, 13, device=DEVICE).to(dtype)
    res = torch.randn(3, 7, 11, 13, device=DEVICE).to(dtype)
    assert_matches(OPS.add_relu(x, res).cpu(), ref_add_relu(*on_cpu(x, res)), dtype)
    scale, shift = torch.randn(7, device=DEVICE), torch.randn(7, device=DEVICE)
    assert_matches(OPS.bn_act(x, scale, shift, res, False).cpu(),
                   ref_bn_act(*on_cpu(x, scale, shift, res), False), dtype)


# --- argument checks in the binding (reached when the op is called directly) ---------------------------------

def test_elementwise_op_rejects_bad_arguments():
    x = torch.randn(2, 4, 3, 3, device=DEVICE)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        OPS.add_relu(x.double(), x.double())
    with pytest.raises(TypeError, match="residual must have x's dtype"):
        OPS.add_relu(x, x.half())
    with pytest.raises(RuntimeError, match="scale must be a 1-D tensor of length 4"):
        OPS.bn_act(x, torch.ones(3, device=DEVICE), torch.zeros(4, device=DEVICE), None, True)


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
