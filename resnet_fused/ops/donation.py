"""Which tensor a fused call may overwrite: a residual whose buffer nobody reads after the call.

A block's last unit computes relu(conv(x) + shift + residual). Where the residual is dead after that call (the
block's input inside a run of fused blocks, which only the next block reads; the output of the block's own
downsample), a backend may write the result into the residual's buffer instead of a fresh one: no new allocation,
no page faults for it, and memory that is already in the cache. Only the caller can know that the residual is dead,
so it says so for one tensor at a time (thread-local, restored on exit) and never while autograd records:

    with donating(t):          # t's buffer may be overwritten by a call inside
        out = block(x)
    donated(residual)          # a backend's question: is this the donated tensor?
"""

from __future__ import annotations

import threading
from typing import Optional

import torch

_state = threading.local()


def donated(t: Optional[torch.Tensor]) -> bool:
    """Whether t is the tensor whose buffer the current call may overwrite."""
    return t is not None and t is getattr(_state, "tensor", None)


class donating:
    """Inside the block, calls may overwrite t's buffer (None: no tensor may be overwritten). A no-op while
    autograd records, where t may be saved for backward. (A class, not a generator: it runs between two fused
    blocks of every forward, where the caches are cold and every interpreter step counts.)"""

    __slots__ = ("_tensor", "_previous")

    def __init__(self, t: Optional[torch.Tensor]):
        self._tensor = t

    def __enter__(self) -> None:
        self._previous = getattr(_state, "tensor", None)
        _state.tensor = self._tensor if not torch.is_grad_enabled() else None

    def __exit__(self, *exc) -> bool:
        _state.tensor = self._previous
        return False
