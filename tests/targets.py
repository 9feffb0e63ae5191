"""Where the op tests run: each backend on its device as a `Target`, and as a pytest param that skips with the
reason `resnet_fused.available_backends` gives where that backend cannot run here (CUDA devices are also marked
`gpu`, which tests/conftest.py skips without a GPU); the tolerance each target is held to; the dtypes every op
claims.

Triton runs on the GPU where there is one, else in the interpreter on the CPU (conftest sets TRITON_INTERPRET=1):
a parametrization that multiplies Triton runs stays on the small shapes (tests/oracle.py's CONV_CASES).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from types import MappingProxyType
from typing import NamedTuple

import pytest
import torch

import resnet_fused as rf

CL = torch.channels_last
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
# The elementwise ops' shapes (bn_act, add_relu): channel counts around the kernels' vector widths (16 fp32 / 32 bf16
# AVX-512 lanes on "cpu"; 16-byte vectors, their tails and the scalar path on "cuda"; channel = offset % C on
# "triton"), odd and size-one spatial dims.
ELEMENTWISE_SHAPES = [(2, 16, 8, 8), (2, 16, 5, 7), (1, 3, 5, 7), (3, 37, 3, 2), (3, 37, 4, 9), (1, 64, 1, 1),
                      (2, 1, 9, 9), (1, 3, 1, 1), (2, 12, 3, 3), (3, 5, 7, 5), (1, 1, 4, 3)]


def shape_ids(shapes) -> list:
    """pytest ids such as 2x16x8x8."""
    return ["x".join(map(str, s)) for s in shapes]


class Target(NamedTuple):
    backend: str
    device: str

    @property
    def library(self):
        """The torch.ops namespace of the backend's own torch.library ops (the "torch" backend has none)."""
        return torch.ops.resnet_fused_triton if self.backend == "triton" else torch.ops.resnet_fused

    @property
    def interpreted(self) -> bool:
        """Triton in the interpreter on the CPU, some 60 ms a small conv: the tests keep its sweeps small."""
        return self.backend == "triton" and self.device == "cpu"

    def tol(self, dtype: torch.dtype):
        """The tests/oracle.py TOLERANCES key for outputs of `dtype`: fp32 convolutions on a GPU go through TF32
        tensor cores (the cuda kernels always; Triton and cuDNN while torch.backends.cudnn.allow_tf32 is on)."""
        tf32 = self.backend == "cuda" or torch.backends.cudnn.allow_tf32
        return "tf32" if dtype == torch.float32 and self.device == "cuda" and tf32 else dtype


_TARGETS = {
    "torch": Target("torch", "cpu"),
    "cpu": Target("cpu", "cpu"),
    "triton": Target("triton", "cuda" if torch.cuda.is_available() else "cpu"),
    "cuda": Target("cuda", "cuda"),
    "torch_cuda": Target("torch", "cuda"),
}


def targets(*names: str, xfail: Mapping[str, str] = MappingProxyType({}), gpu: bool = False) -> list:
    """pytest params of the named targets (every one by default), each skipped with its backend's reason where it
    cannot run here; `xfail` maps a target's name to why it is known to fail (strict: a fix shows up); `gpu` marks
    every one `gpu`, for shapes too large for the Triton interpreter on the CPU."""
    params = []
    for name in names or _TARGETS:
        target = _TARGETS[name]
        reason = rf.available_backends(target.device).get(target.backend, "it is not registered")
        marks = [pytest.mark.skipif(reason is not None, reason=f"the {target.backend!r} backend cannot run on "
                                                               f"{target.device} here: {reason}")]
        if gpu or target.device == "cuda":
            marks.append(pytest.mark.gpu)
        if name in xfail:
            marks.append(pytest.mark.xfail(strict=True, reason=xfail[name]))
        params.append(pytest.param(target, id=name, marks=marks))
    return params


def module_marks(name: str) -> list:
    """The marks of target `name` for a module of tests that all run on it (its `pytestmark`)."""
    return list(targets(name)[0].marks)


# The targets whose backend registers torch.library ops of its own (what torch.library.opcheck checks).
LIBRARY_TARGETS = targets("cpu", "triton", "cuda")
# The targets on a GPU, for the large shapes (Triton in the interpreter is skipped with the CUDA devices).
GPU_TARGETS = targets("triton", "cuda", "torch_cuda", gpu=True)


def on_cpu(*tensors):
    """CPU copies, for the oracle: true fp32, whatever cuDNN's TF32 settings are."""
    return [None if t is None else t.cpu() for t in tensors]


def layout(t: torch.Tensor, name: str) -> torch.Tensor:
    """t in memory format `name` ("nchw" or "cl")."""
    return t.contiguous(memory_format=CL if name == "cl" else torch.contiguous_format)


def assert_output(y: torch.Tensor, target: Target, dtype: torch.dtype) -> None:
    """What every op returns: x's dtype, on the target's device, channels_last."""
    assert y.dtype == dtype and y.device.type == target.device, (y.dtype, y.device)
    assert y.is_contiguous(memory_format=CL), f"output is not channels_last: strides {y.stride()}"


@contextlib.contextmanager
def labelled(**values):
    """Prefix an assertion failure with the loop values it happened at (tests loop over cheap axes such as residual
    and ReLU rather than multiply their test ids)."""
    try:
        yield
    except AssertionError as error:
        label = " ".join(f"{key}={value}" for key, value in values.items())
        raise AssertionError(f"[{label}] {error}") from error


def assert_relu_backward_selects_as_eager(op, device: str) -> None:
    """op(x) = ReLU(x) through a fused op: its backward must select as eager's does. An inf gradient where y = 0
    gives 0 (not inf * 0 = NaN), and a NaN output passes its gradient through."""
    upstream = torch.tensor([float("inf"), 1.0, 3.0, float("inf")], device=device).view(1, 4, 1, 1)
    grads = []
    for relu in (op, torch.relu):
        x = torch.tensor([-1.0, 2.0, float("nan"), 0.0], device=device).view(1, 4, 1, 1).requires_grad_()
        relu(x).backward(upstream)
        grads.append(x.grad.flatten().tolist())
    ours, eager = grads
    assert eager == [0.0, 1.0, 3.0, 0.0]
    assert ours == eager, f"fused {ours} != eager {eager}"
