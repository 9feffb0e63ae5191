"""add_relu on every backend that runs here, against the fp32 oracle.

Every dtype over channel counts around the kernels' vector widths (16 fp32 / 32 bf16 AVX-512 lanes on the "cpu"
backend; 16-byte vectors, their tails and the scalar path on "cuda"; channel = offset % C on "triton"), with x and
the residual NCHW, channels_last, or one of each; gradients; opcheck of each backend's own op; NaN; the argument
errors, which the public door raises. Backend internals (misaligned pointers, 64-bit offsets, the C++ checks) are in
tests/backends/ and the backend files beside them.
"""

import pytest
import torch

import resnet_fused as rf
from resnet_fused import ops
from tests.oracle import assert_matches, ref_add_relu
from tests.targets import (DTYPE_IDS, DTYPES, ELEMENTWISE_SHAPES, LIBRARY_TARGETS, assert_output,
                           assert_relu_backward_selects_as_eager, labelled, layout, on_cpu, shape_ids, targets)

ALL = targets()
# (x, residual) memory formats: the kernels read both layouts and mixes of them.
LAYOUTS = [("nchw", "nchw"), ("cl", "cl"), ("cl", "nchw")]


@pytest.mark.parametrize("shape", ELEMENTWISE_SHAPES, ids=shape_ids(ELEMENTWISE_SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("target", ALL)
def test_matches_oracle(target, dtype, shape):
    for x_layout, res_layout in LAYOUTS:
        with labelled(x=x_layout, residual=res_layout):
            x = layout(torch.randn(shape, device=target.device).to(dtype), x_layout)
            res = layout(torch.randn(shape, device=target.device).to(dtype), res_layout)
            y = rf.add_relu(x, res, backend=target.backend)
            assert_output(y, target, dtype)
            # an add and a max: exact in fp32 on every device (no TF32 involved)
            assert_matches(y.cpu(), ref_add_relu(*on_cpu(x, res)), dtype)


@pytest.mark.parametrize("target", ALL)
def test_gradients_match_eager(target):
    for shape in ((2, 6, 3, 3), (2, 4, 3, 3)):
        with labelled(shape=shape):
            x, res = torch.randn(shape), torch.randn(shape)
            ours = [t.to(target.device, copy=True).requires_grad_() for t in (x, res)]
            theirs = [t.clone().requires_grad_() for t in (x, res)]
            grad_out = torch.randn(shape)
            rf.add_relu(*ours, backend=target.backend).backward(grad_out.to(target.device))
            ref_add_relu(*theirs).backward(grad_out)
            expected = grad_out * ((x + res) > 0)
            for name, a, b in zip(("x", "residual"), ours, theirs):
                with labelled(grad=name):
                    assert a.grad is not None
                    assert_matches(a.grad.cpu(), b.grad, torch.float32)
                    assert_matches(a.grad.cpu(), expected, torch.float32)


# --- each backend's own torch.library op: opcheck (schema, fake kernel, autograd registration, AOT dispatch) ---

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("target", LIBRARY_TARGETS)
def test_opcheck(target, dtype):
    for shape in ((2, 5, 4, 3), (2, 5, 3, 4)):
        for grad in (False, True) if dtype == torch.float32 else (False,):
            with labelled(shape=shape, grad=grad):
                x = torch.randn(shape, device=target.device).to(dtype).requires_grad_(grad)
                res = torch.randn(shape, device=target.device).to(dtype).requires_grad_(grad)
                torch.library.opcheck(target.library.add_relu.default, (x, res))


# --- NaN in, NaN out, as eager (a max(x, 0) ReLU would silently turn it into 0) --------------------------------

@pytest.mark.parametrize("target", ALL)
def test_relu_keeps_nan(target):
    x = torch.tensor([float("nan"), -1.0, 2.0, 0.0], device=target.device).view(1, 4, 1, 1)
    y = rf.add_relu(x, torch.zeros_like(x), backend=target.backend).flatten().cpu()
    assert torch.isnan(y[0]) and y[1:].tolist() == [0.0, 2.0, 0.0]


@pytest.mark.parametrize("target", ALL)
def test_relu_backward_selects_as_eager(target):
    assert_relu_backward_selects_as_eager(lambda x: rf.add_relu(x, torch.zeros_like(x), backend=target.backend),
                                          target.device)


# --- argument errors: checked at the public door --------------------------------------------------------------

def test_bad_arguments():
    x = torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        ops.add_relu(x, torch.randn(1, 4, 5, 5))
    with pytest.raises(TypeError, match="residual must be a torch.Tensor"):
        ops.add_relu(x, None)
    with pytest.raises(TypeError, match="x must be float32"):
        ops.add_relu(x.double(), x.double())
