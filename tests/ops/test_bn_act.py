"""bn_act on every backend that runs here, against the fp32 oracle.

Every dtype over tests/targets.py's ELEMENTWISE_SHAPES (vector widths and their tails on "cpu" and "cuda", channel =
offset % C on "triton"), each with and without a residual and ReLU, x and the residual NCHW,
channels_last or one of each; scale/shift in any float dtype; gradients of every input; opcheck of each backend's
own op; NaN; the argument errors, which the public door raises. Backend internals (misaligned pointers, 64-bit
offsets, the C++ checks) are in tests/backends/ and the backend files beside them.
"""

import pytest
import torch

import resnet_fused as rf
from resnet_fused import ops
from tests.oracle import assert_matches, ref_bn_act
from tests.targets import (DTYPE_IDS, DTYPES, ELEMENTWISE_SHAPES, LIBRARY_TARGETS, assert_output,
                           assert_relu_backward_selects_as_eager, labelled, layout, on_cpu, shape_ids, targets)

ALL = targets()
# (x, residual) memory formats, residual None for none: the kernels read both layouts and mixes of them.
LAYOUTS = [("nchw", None), ("cl", None), ("nchw", "nchw"), ("nchw", "cl"), ("cl", "nchw")]


def _vectors(channels, device, dtype=torch.float32):
    """A folded BatchNorm's scale and shift (a scale of either sign: BN's weight may be negative)."""
    return torch.randn(channels, device=device).to(dtype), torch.randn(channels, device=device).to(dtype)


@pytest.mark.parametrize("shape", ELEMENTWISE_SHAPES, ids=shape_ids(ELEMENTWISE_SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("target", ALL)
def test_matches_oracle(target, dtype, shape):
    scale, shift = _vectors(shape[1], target.device)
    for x_layout, res_layout in LAYOUTS:
        x = layout(torch.randn(shape, device=target.device).to(dtype), x_layout)
        res = None if res_layout is None else layout(torch.randn(shape, device=target.device).to(dtype), res_layout)
        for relu in (True, False):
            with labelled(x=x_layout, residual=res_layout, relu=relu):
                y = rf.bn_act(x, scale, shift, res, relu=relu, backend=target.backend)
                assert_output(y, target, dtype)
                assert_matches(y.cpu(), ref_bn_act(*on_cpu(x, scale, shift, res), relu), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("target", ALL)
def test_scale_and_shift_in_any_float_dtype(target, dtype):
    # e.g. a half-precision model's BN parameters, or fp64 ones: the kernels read them as fp32
    x = torch.randn(2, 8, 3, 3, device=target.device).to(dtype)
    for scale_dtype, shift_dtype in ((torch.float16, torch.float16), (torch.float64, torch.float16),
                                     (torch.bfloat16, torch.float32)):
        with labelled(scale=scale_dtype, shift=shift_dtype):
            scale, _ = _vectors(8, target.device, scale_dtype)
            _, shift = _vectors(8, target.device, shift_dtype)
            y = rf.bn_act(x, scale, shift, backend=target.backend)
            assert_output(y, target, dtype)
            assert_matches(y.cpu(), ref_bn_act(*on_cpu(x, scale, shift), None, True), dtype)


@pytest.mark.parametrize("target", ALL)
def test_gradients_match_eager(target):
    for shape in ((2, 5, 4, 3), (2, 6, 5, 3)):
        channels = shape[1]
        x, res, grad_out = torch.randn(shape), torch.randn(shape), torch.randn(shape)
        scale, shift = _vectors(channels, "cpu")
        for residual in (False, True):
            for relu in (True, False):
                leaves = (x, scale, shift, res if residual else None)
                ours = [None if t is None else t.to(target.device, copy=True).requires_grad_() for t in leaves]
                theirs = [None if t is None else t.clone().requires_grad_() for t in leaves]
                rf.bn_act(*ours, relu=relu, backend=target.backend).backward(grad_out.to(target.device))
                ref_bn_act(*theirs, relu).backward(grad_out)
                for name, a, b in zip(("x", "scale", "shift", "residual"), ours, theirs):
                    if b is None:
                        continue
                    with labelled(shape=shape, residual=residual, relu=relu, grad=name):
                        assert a.grad is not None
                        assert_matches(a.grad.cpu(), b.grad, torch.float32)


# --- each backend's own torch.library op: opcheck (schema, fake kernel, autograd registration, AOT dispatch) ---

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("target", LIBRARY_TARGETS)
def test_opcheck(target, dtype):
    for residual in (False, True):
        for grad in (False, True) if dtype == torch.float32 else (False,):
            with labelled(residual=residual, grad=grad):
                x = torch.randn(2, 5, 4, 3, device=target.device).to(dtype).requires_grad_(grad)
                scale, shift = (t.requires_grad_(grad) for t in _vectors(5, target.device))
                res = torch.randn_like(x).requires_grad_(grad) if residual else None
                torch.library.opcheck(target.library.bn_act.default, (x, scale, shift, res, not residual))


# --- NaN in, NaN out, as eager (a max(x, 0) ReLU would silently turn it into 0) --------------------------------

@pytest.mark.parametrize("target", ALL)
def test_relu_keeps_nan(target):
    x = torch.tensor([float("nan"), -1.0, 2.0, 0.0], device=target.device).view(1, 4, 1, 1)
    scale, shift = torch.ones(4, device=target.device), torch.zeros(4, device=target.device)
    y = rf.bn_act(x, scale, shift, relu=True, backend=target.backend).flatten().cpu()
    assert torch.isnan(y[0]) and y[1:].tolist() == [0.0, 2.0, 0.0]


@pytest.mark.parametrize("target", ALL)
def test_relu_backward_selects_as_eager(target):
    ones, zeros = torch.ones(4, device=target.device), torch.zeros(4, device=target.device)
    assert_relu_backward_selects_as_eager(lambda x: rf.bn_act(x, ones, zeros, relu=True, backend=target.backend),
                                          target.device)


# --- argument errors: checked at the public door --------------------------------------------------------------

def test_bad_arguments():
    x = torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match="scale must be a 1-D tensor of length 4"):
        ops.bn_act(x, torch.ones(5), torch.zeros(4))
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        ops.bn_act(x, torch.ones(4), torch.zeros(4), torch.randn(2, 4, 5, 4))
    with pytest.raises(TypeError, match="relu must be a bool"):
        ops.bn_act(x, torch.ones(4), torch.zeros(4), relu=1, backend="torch")


def test_non_builtin_types_are_named_with_their_module():
    # numpy's bool scalar is called "bool" too: "relu must be a bool, got bool" would say nothing
    np = pytest.importorskip("numpy")
    with pytest.raises(TypeError, match=r"relu must be a bool, got numpy\.bool"):
        ops.bn_act(torch.randn(2, 4, 5, 5), torch.ones(4), torch.zeros(4), relu=np.bool_(True), backend="torch")
