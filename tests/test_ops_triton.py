"""The "triton" backend around its kernels: the elementwise kernels' 64-bit offsets path, when the backend can run,
the device guard around launches, CPU tensors refused outside the interpreter, and on a GPU the elementwise ops
on a ResNet-sized tensor. The ops themselves, on every backend, are tested in tests/ops/; the convolution's
internals in tests/backends/test_triton_conv.py.

Without a GPU everything runs in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import pytest
import torch

import resnet_fused as rf
from tests.oracle import assert_matches, ref_add_relu, ref_bn_act
from tests.targets import DTYPE_IDS, DTYPES

if rf.available_backends("cpu" if not torch.cuda.is_available() else "cuda")["triton"] is not None:
    pytest.skip("the triton backend is unavailable here (triton not importable)", allow_module_level=True)

from resnet_fused.kernels.triton import elementwise, runtime  # noqa: E402
from resnet_fused.ops.backends import triton_library  # noqa: E402  (registers torch.ops.resnet_fused_triton)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OPS = torch.ops.resnet_fused_triton
CL = torch.channels_last


# --- the elementwise kernels' 64-bit offsets path -----------------------------------------------------------

def test_elementwise_64bit_offsets_path():
    x, res = torch.randn(2, 5, 7, 3, device=DEVICE), torch.randn(2, 5, 7, 3, device=DEVICE)
    scale, shift = torch.randn(5, device=DEVICE), torch.randn(5, device=DEVICE)
    for index_64 in (False, True):
        assert_matches(elementwise.bn_act(x, scale, shift, res, True, index_64=index_64),
                       ref_bn_act(x, scale, shift, res, True), torch.float32)
        assert_matches(elementwise.add_relu(x, res, index_64=index_64), ref_add_relu(x, res), torch.float32)


# --- backend availability -----------------------------------------------------------------------------------

def test_backend_availability(monkeypatch):
    backend = rf.ops.registry._BACKENDS["triton"]
    assert backend.unavailable_reason(torch.device(DEVICE)) is None
    assert "CUDA GPU" in backend.unavailable_reason(torch.device("meta"))
    import resnet_fused.kernels.triton as kernels

    monkeypatch.setattr(kernels, "INTERPRET", False)
    assert backend.unavailable_reason(torch.device("cpu")) == \
        "Triton needs a CUDA GPU (or TRITON_INTERPRET=1 for tests)"


def test_launches_are_guarded_to_the_tensors_device():
    from types import SimpleNamespace

    guard = runtime.device_guard(SimpleNamespace(device=torch.device("cuda", 1)))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1  # entered around every launch
    assert not isinstance(runtime.device_guard(torch.ones(1)), torch.cuda.device)


def test_ops_reject_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.setattr(triton_library, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="Triton kernels need a CUDA tensor"):
        OPS.add_relu(torch.ones(1, 1, 1, 1), torch.ones(1, 1, 1, 1))


# --- GPU: a ResNet-sized tensor -------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gpu_elementwise_large(dtype):
    x = torch.randn(8, 256, 56, 56, device="cuda").to(dtype).contiguous(memory_format=CL)
    res = torch.randn_like(x)
    scale, shift = torch.randn(256, device="cuda"), torch.randn(256, device="cuda")
    assert_matches(rf.bn_act(x, scale, shift, res, backend="triton"), ref_bn_act(x, scale, shift, res, True), dtype)
    assert_matches(rf.add_relu(x, res, backend="triton"), ref_add_relu(x, res), dtype)
