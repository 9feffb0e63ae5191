"""The CPU block cache (resnet_fused/ops/cpu_cache.py, csrc/cpu/block_cache.cpp): the large blocks a fused module
allocates come back from a cache of freed blocks on later calls. These tests pin that reuse never hands out a block
that is still in use, that repeated calls of one shape are served from the cache, that the limit and the public
controls hold, that blocks freed on another thread or outside any fused module return to it, and that memory the
allocator before it made (oneDNN's, freed through whatever allocator is current) is still freed correctly.
"""

import gc
import os
import subprocess
import sys
import threading

import pytest
import torch

import resnet_fused as rf
from resnet_fused.models import resnet18
from resnet_fused.ops.cpu_cache import block_cached
from tests.test_blocks import _randomize_bn

pytestmark = pytest.mark.skipif(rf.available_backends("cpu")["cpu"] is not None,
                                reason=f"the 'cpu' backend is unavailable: {rf.available_backends('cpu')['cpu']}")

CL = torch.channels_last
MIB = 1 << 20
DEFAULT_LIMIT = 1 << 30


@pytest.fixture(autouse=True)
def _default_limit():
    rf.set_cpu_cache_limit(DEFAULT_LIMIT)
    yield
    rf.set_cpu_cache_limit(DEFAULT_LIMIT)


def _fused_resnet18(train=False):
    torch.manual_seed(0)
    model = _randomize_bn(resnet18()).to(memory_format=CL)
    model.train(train)
    fused, _ = rf.fuse_model(model, backend="cpu")
    return model, fused


def _input(batch=2, size=64, seed=1):
    torch.manual_seed(seed)
    return torch.randn(batch, 3, size, size).contiguous(memory_format=CL)


def _empty_cache():
    gc.collect()  # blocks that earlier tests' reference cycles hold would otherwise come back mid-test
    rf.empty_cpu_cache()


@block_cached
def _allocate(nbytes):
    return torch.empty(nbytes // 4, dtype=torch.float32)


def test_a_fused_forward_installs_the_cache_and_repeats_from_it():
    model, fused = _fused_resnet18()
    x = _input()
    with torch.inference_mode():
        fused(x)
        fused(x)  # the first calls prepare weights and workspaces, kept after
        before = rf.cpu_cache_info()
        fused(x)
        fused(x)
        after = rf.cpu_cache_info()
    assert after["installed"]
    assert after["misses"] == before["misses"], "a repeated forward of one shape allocated new blocks"
    assert after["hits"] > before["hits"]


def test_outputs_survive_later_calls_that_reuse_freed_blocks():
    model, fused = _fused_resnet18()
    xs = [_input(seed=s) for s in range(3)]
    with torch.inference_mode():
        expected = [model(x) for x in xs]
        outs = [fused(x) for x in xs]  # each later call reuses the blocks the earlier ones freed
        outs += [fused(x) for x in xs]
    for out, ref in zip(outs, expected + expected):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # live tensors from the cache are never handed out again
    kept = [_allocate(4 * MIB).fill_(float(i)) for i in range(6)]
    _allocate(4 * MIB).fill_(-1.0)
    assert all(bool((t == i).all()) for i, t in enumerate(kept))


def test_training_steps_give_the_same_gradients_with_and_without_the_cache():
    grads = []
    for limit in (DEFAULT_LIMIT, 0, DEFAULT_LIMIT):
        rf.set_cpu_cache_limit(limit)
        _, fused = _fused_resnet18(train=True)
        x = _input()
        for _ in range(2):  # the second step reuses the first step's freed blocks
            fused.zero_grad(set_to_none=True)
            fused(x).square().mean().backward()
        grads.append([p.grad.clone() for p in fused.parameters()])
    for with_cache, without in ((grads[0], grads[1]), (grads[2], grads[1])):
        for a, b in zip(with_cache, without):
            assert torch.equal(a, b)


def test_a_freed_block_is_cached_and_reused_for_a_size_within_twice():
    _empty_cache()
    t = _allocate(8 * MIB)
    address = t.data_ptr()
    del t
    assert rf.cpu_cache_info()["cached_bytes"] == 8 * MIB
    hits = rf.cpu_cache_info()["hits"]
    u = _allocate(5 * MIB)  # fits in the cached 8 MiB block
    assert u.data_ptr() == address and rf.cpu_cache_info()["hits"] == hits + 1
    del u
    v = _allocate(3 * MIB)  # more than twice smaller: a new block
    assert v.data_ptr() != address


def test_small_blocks_and_blocks_outside_fused_modules_are_not_cached():
    _empty_cache()
    small = _allocate(64 << 10)
    outside = torch.empty(4 * MIB // 4)
    in_use = rf.cpu_cache_info()["in_use_bytes"]
    del small, outside
    info = rf.cpu_cache_info()
    assert info["cached_bytes"] == 0 and info["in_use_bytes"] == in_use


def test_the_limit_evicts_the_oldest_and_zero_turns_caching_off():
    _empty_cache()
    rf.set_cpu_cache_limit(10 * MIB)
    blocks = [_allocate(4 * MIB) for _ in range(3)]
    middle, last = blocks[1].data_ptr(), blocks[2].data_ptr()
    for _ in range(3):  # 12 MiB freed in order into a 10 MiB cache: the first one freed goes
        del blocks[0]
    assert rf.cpu_cache_info()["cached_bytes"] == 8 * MIB
    info = rf.cpu_cache_info()
    again = [_allocate(4 * MIB) for _ in range(3)]
    assert [t.data_ptr() for t in again[:2]] == [last, middle]  # of equal sizes, the one freed last first
    assert rf.cpu_cache_info()["hits"] == info["hits"] + 2 and rf.cpu_cache_info()["misses"] == info["misses"] + 1
    del again
    rf.set_cpu_cache_limit(0)
    assert rf.cpu_cache_info()["cached_bytes"] == 0
    hits = rf.cpu_cache_info()["hits"]
    t = _allocate(4 * MIB)
    del t
    assert rf.cpu_cache_info()["cached_bytes"] == 0 and rf.cpu_cache_info()["hits"] == hits


def test_empty_cpu_cache_frees_what_is_cached_and_keeps_what_is_in_use():
    _empty_cache()
    kept, freed = _allocate(4 * MIB), _allocate(4 * MIB)
    kept.fill_(3.0)
    del freed
    assert rf.cpu_cache_info()["cached_bytes"] == 4 * MIB
    rf.empty_cpu_cache()
    assert rf.cpu_cache_info()["cached_bytes"] == 0
    assert bool((kept == 3.0).all())
    del kept
    assert rf.cpu_cache_info()["cached_bytes"] == 4 * MIB


def test_a_block_freed_on_another_thread_returns_to_the_cache():
    _empty_cache()
    t = [_allocate(4 * MIB)]
    worker = threading.Thread(target=t.clear)
    worker.start()
    worker.join()
    assert rf.cpu_cache_info()["cached_bytes"] == 4 * MIB


def test_the_switch_is_per_thread_and_restored():
    from resnet_fused import _C

    assert _C.cpu_cache_scope(False) is False  # off outside fused modules
    _empty_cache()
    seen = []

    def other_thread():
        seen.append(_C.cpu_cache_scope(False))

    @block_cached
    def inside():
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
        return _C.cpu_cache_scope(True)

    assert inside() is True and seen == [False]
    assert _C.cpu_cache_scope(False) is False


def test_the_switch_is_restored_when_the_method_raises():
    from resnet_fused import _C

    @block_cached
    def fails():
        raise KeyError("inside")

    with pytest.raises(KeyError, match="inside"):
        fails()
    assert _C.cpu_cache_scope(False) is False


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() here")
def test_a_forked_child_allocates_and_frees_through_the_cache():
    _, fused = _fused_resnet18()
    x = _input()
    with torch.inference_mode():
        expected = fused(x)
    pid = os.fork()
    if pid == 0:  # the child: any failure is its exit status
        try:
            torch.set_num_threads(1)  # as DataLoader workers do: OpenMP's pool does not survive fork (eager too)
            with torch.inference_mode():
                ok = torch.allclose(fused(x), expected) and torch.allclose(fused(x), expected)
            os._exit(0 if ok else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


@pytest.mark.parametrize("limit", [-1, 1.5, "1", True, None])
def test_a_bad_limit_names_the_argument(limit):
    with pytest.raises(ValueError, match="limit_bytes"):
        rf.set_cpu_cache_limit(limit)


def test_memory_from_the_previous_allocator_is_freed_through_the_cache():
    # oneDNN tensors free through whatever CPU allocator is current when they die: ones made before the cache was
    # installed are then freed through it, and must go back to the allocator that made them. A fresh process, so
    # that the cache is installed between the allocation and the free.
    code = """
import torch, resnet_fused as rf
from resnet_fused.models import resnet18
before = [torch.randn(512, 512).to_mkldnn() for _ in range(8)]
assert not rf.cpu_cache_info()["installed"]
fused, _ = rf.fuse_model(resnet18().eval().to(memory_format=torch.channels_last), backend="cpu")
with torch.inference_mode():
    fused(torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last))
assert rf.cpu_cache_info()["installed"]
sums = [float(t.to_dense().sum()) for t in before]
del before
after = [torch.randn(512, 512).to_mkldnn() for _ in range(8)]
del after
from resnet_fused.ops.cpu_cache import block_cached
in_use = rf.cpu_cache_info()["in_use_bytes"]
inside = block_cached(lambda: [torch.randn(512, 512).to_mkldnn() for _ in range(8)])()  # oneDNN's, from the cache
assert rf.cpu_cache_info()["in_use_bytes"] >= in_use + 8 * 512 * 512 * 4, rf.cpu_cache_info()
sums += [float(t.to_dense().sum()) for t in inside]
del inside
assert rf.cpu_cache_info()["in_use_bytes"] == in_use, rf.cpu_cache_info()
print("ok", len(sums))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok 16"
