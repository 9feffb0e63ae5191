"""The "cpu" backend's elementwise library ops (torch.ops.resnet_fused.bn_act and add_relu) called directly: an
empty batch, a tensor large enough for the parallel split, the C++ checks; and "auto" picking the backend. The ops
themselves, on every backend, are in tests/ops/; the convolution's internals in tests/backends/test_cpu_conv.py.
"""

import pytest
import torch

import resnet_fused as rf
from tests.oracle import assert_matches, ref_add_relu, ref_bn_act

pytestmark = pytest.mark.skipif(rf.available_backends("cpu")["cpu"] is not None,
                                reason=f"the 'cpu' backend is unavailable: {rf.available_backends('cpu')['cpu']}")


def test_empty_batch():
    x = torch.randn(0, 16, 8, 8)
    assert torch.ops.resnet_fused.bn_act(x, torch.rand(16), torch.rand(16), None, True).shape == x.shape
    assert torch.ops.resnet_fused.add_relu(x, x).shape == x.shape


def test_auto_picks_cpu_backend():
    assert rf.ops.resolve_name("auto", "cpu") == "cpu"


# ---- the elementwise library ops on a large tensor -------------------------------------------------------------

def test_elementwise_large_parallel_tensor():
    # Many rows: the parallel split and its boundaries are exercised (shape is not a multiple of the grain).
    x = torch.randn(3, 33, 61, 67)
    scale, shift, res = torch.rand(33), torch.randn(33), torch.randn(3, 33, 61, 67)
    assert_matches(torch.ops.resnet_fused.bn_act(x, scale, shift, res, True), ref_bn_act(x, scale, shift, res, True),
                   torch.float32)
    assert_matches(torch.ops.resnet_fused.add_relu(x, res), ref_add_relu(x, res), torch.float32)


# ---- errors from the C++ checks (direct torch.ops calls bypass the Python validation) ----------------------------

def test_elementwise_errors():
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(RuntimeError, match=r"bn_act: scale must be a 1-D tensor of length 4"):
        torch.ops.resnet_fused.bn_act(x, torch.ones(3), torch.zeros(4), None, True)
    with pytest.raises(RuntimeError, match=r"bn_act: residual must have the output's shape"):
        torch.ops.resnet_fused.bn_act(x, torch.ones(4), torch.zeros(4), torch.randn(2, 4, 3, 2), True)
    with pytest.raises(RuntimeError, match=r"add_relu: residual must have x's dtype"):
        torch.ops.resnet_fused.add_relu(x, x.half())
    with pytest.raises(RuntimeError, match=r"add_relu: x must be a 4-D"):
        torch.ops.resnet_fused.add_relu(x[0], x[0])
    with pytest.raises(ValueError, match=r"scale is on meta but x is on cpu"):
        torch.ops.resnet_fused.bn_act(x, torch.ones(4, device="meta"), torch.zeros(4), None, True)
    with pytest.raises(ValueError, match=r"residual is on meta but x is on cpu"):
        torch.ops.resnet_fused.add_relu(x, x.to("meta"))
