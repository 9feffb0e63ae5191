"""Where the op tests run: each backend on its device as a `Target`, and as a pytest param that skips with the
reason `resnet_fused.available_backends` gives where that backend cannot run here (CUDA devices are also marked
`gpu`, which tests/conftest.py skips without a GPU); the dtypes every op claims.

Triton runs on the GPU where there is one, else in the interpreter on the CPU (conftest sets TRITON_INTERPRET=1):
a parametrization that multiplies Triton runs stays on the small shapes (tests/oracle.py's CONV_CASES).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import pytest
import torch

import resnet_fused as rf

CL = torch.channels_last
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


class Target(NamedTuple):
    backend: str
    device: str

    @property
    def library(self):
        """The torch.ops namespace of the backend's own torch.library ops (the "torch" backend has none)."""
        return torch.ops.resnet_fused_triton if self.backend == "triton" else torch.ops.resnet_fused


_TARGETS = {
    "torch": Target("torch", "cpu"),
    "cpu": Target("cpu", "cpu"),
    "triton": Target("triton", "cuda" if torch.cuda.is_available() else "cpu"),
    "cuda": Target("cuda", "cuda"),
    "torch_cuda": Target("torch", "cuda"),
}


def targets(*names: str) -> list:
    """pytest params of the named targets (every one by default), each skipped with its backend's reason where it
    cannot run here."""
    params = []
    for name in names or _TARGETS:
        target = _TARGETS[name]
        reason = rf.available_backends(target.device).get(target.backend, "it is not registered")
        marks = [pytest.mark.skipif(reason is not None, reason=f"the {target.backend!r} backend cannot run on "
                                                               f"{target.device} here: {reason}")]
        if target.device == "cuda":
            marks.append(pytest.mark.gpu)
        params.append(pytest.param(target, id=name, marks=marks))
    return params


# The targets whose backend registers torch.library ops of its own (what torch.library.opcheck checks).
LIBRARY_TARGETS = targets("cpu", "triton", "cuda")


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
