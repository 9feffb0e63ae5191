"""Loads the compiled extension resnet_fused._C once; the package works without it ("torch" backend)."""

from __future__ import annotations

import importlib
import warnings
from typing import Optional

_loaded = False
_error: Optional[str] = None


def load() -> Optional[str]:
    """Import resnet_fused._C (registering torch.ops.resnet_fused.*). Return None on success, else why not."""
    global _loaded, _error
    if not _loaded:
        _loaded = True
        import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

        try:
            importlib.import_module("resnet_fused._C")
        except Exception as exc:  # ImportError, or an undefined symbol from a torch-version mismatch
            _error = f"resnet_fused._C failed to load ({type(exc).__name__}: {exc}); build it with " \
                     f"`pip install --no-build-isolation -e .`"
            warnings.warn(_error + ". The 'cpu' and 'cuda' backends are unavailable; 'torch' serves.",
                          RuntimeWarning, stacklevel=3)
    return _error


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether torch.ops.resnet_fused.<op> has a kernel for `dispatch_key` ("CPU", "CUDA")."""
    import torch

    if load() is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"resnet_fused::{op}", dispatch_key)


def bound_call(name: str, overload: str, args: tuple, x_at: int = 0, residual_at: int = -1, donate_at: int = -1):
    """The op call `args` as a _C.BoundCall (x at x_at, the residual at residual_at, the donation flag at donate_at;
    -1: none), whatever the args hold there is replaced on every call; None where the extension did not load or was
    built without it."""
    if load() is not None:
        return None
    from . import _C

    bound = getattr(_C, "BoundCall", None)
    return None if bound is None else bound(name, overload, args, x_at, residual_at, donate_at)
