"""What the Triton kernels share: whether they run in the interpreter, the launchers' device guard, and the
NaN-keeping ReLU."""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl


def _interpreting() -> bool:
    try:
        from triton import knobs
        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # triton < 3.4 has no knobs
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# Fixed when the kernels are defined (triton.jit reads it at decoration time), so it is read once here.
INTERPRET = _interpreting()


def device_guard(x: torch.Tensor):
    """Triton launches on the current CUDA device: make that x's for the launch (a model moved to cuda:1 while
    cuda:0 is current would otherwise run its kernels on the wrong GPU)."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


@triton.jit
def relu_keep_nan(x):
    """ReLU as torch.relu computes it: NaN stays NaN (tl.maximum(x, 0) would return 0 for NaN)."""
    return tl.where(x < 0.0, 0.0, x)
