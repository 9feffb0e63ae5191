"""The CPU block cache of the fused modules (csrc/cpu/block_cache.cpp).

Every forward allocates the same activation-sized blocks and frees them soon after; glibc gives large freed blocks
back to the kernel, so the next forward page-faults the same memory in again. While a fused module runs (its forward,
its backward), the blocks of 256 KiB or more that its thread allocates come from a cache of freed blocks instead,
and go back to it when freed: no page faults for them after the first call. Everything else the process allocates
goes to torch's allocator as before. The cache keeps at most `limit_bytes` of freed blocks (1 GiB by default),
freeing the oldest beyond it; `empty_cpu_cache()` frees them all, `set_cpu_cache_limit(0)` turns caching off.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from .. import _extension


def _extension_module():
    """resnet_fused._C, or None where the extension is not built (then nothing is cached)."""
    if _extension.load() is not None:
        return None
    from .. import _C

    return _C


def block_cached(method: Callable) -> Callable:
    """`method` run with the CPU block cache on for the calling thread (restored after)."""
    module = _extension_module()
    if module is None:
        return method
    scope = module.cpu_cache_scope

    @functools.wraps(method)
    def run(*args, **kwargs):
        if torch.compiler.is_compiling():
            return method(*args, **kwargs)
        previous = scope(True)
        try:
            return method(*args, **kwargs)
        finally:
            scope(previous)
    return run


def cpu_cache_info() -> dict:
    """The cache's counters: cached_bytes (freed blocks kept), in_use_bytes (blocks handed out, not yet freed),
    limit_bytes, hits, misses, and installed (False until a fused module first runs, or where another CPU allocator
    outranks the cache: then nothing is cached)."""
    module = _extension_module()
    if module is None:
        return {"cached_bytes": 0, "in_use_bytes": 0, "limit_bytes": 0, "hits": 0, "misses": 0, "installed": False}
    return module.cpu_cache_info()


def set_cpu_cache_limit(limit_bytes: int) -> None:
    """Keep at most `limit_bytes` of freed blocks cached (the oldest are freed first); 0 turns caching off."""
    if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int) or limit_bytes < 0:
        raise ValueError(f"set_cpu_cache_limit: limit_bytes must be an int >= 0, got {limit_bytes!r}")
    module = _extension_module()
    if module is not None:
        module.cpu_cache_set_limit(limit_bytes)


def empty_cpu_cache() -> None:
    """Free every cached block (blocks in use are kept, and cached again when freed)."""
    module = _extension_module()
    if module is not None:
        module.cpu_cache_empty()
