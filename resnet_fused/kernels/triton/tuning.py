"""How the conv kernel (conv_bn_act.py) is tuned: its tile configs, the pruning of configs per problem, the
autotuner's timer, and whether to split K.

Split K: where one wave of output tiles would leave most SMs idle (batch 1, late stages), program (tile, s) sums
the s-th slice of the K steps into an fp32 workspace and a second kernel applies the epilogue to the sum. Whether
that is faster is measured once per shape on the GPU (CUDA graph replays of both), not guessed.
"""

from __future__ import annotations

import functools

import torch
import triton

from .runtime import INTERPRET

INT32_LIMIT = 2**31 - 1


def _config(block_m, block_n, block_k, warps, stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8},
                         num_warps=warps, num_stages=stages)


# Flat K (Cin < 16: the stem): 4 warps only (see the module docstring); K = 49*3 = 147 fits 5 steps of 32 or 10
# of 16. On sm_90, 128x128 with 4 warps spills 1 KB of registers per thread, and 128x64x32 spilled in the K loop
# with triton 3.6 (the GPU machine's): 128x64 takes steps of 16.
_FLAT_K_CONFIGS = [_config(64, 64, 32, 4, 3), _config(128, 64, 16, 4, 4)]
_PER_TAP_CONFIGS = [
    # small M (batch 1, late stages: M = 49..3136): narrow M tiles keep the SMs busy
    _config(32, 64, 64, 4, 4), _config(32, 128, 64, 4, 4), _config(64, 64, 64, 4, 4), _config(64, 128, 32, 4, 4),
    # mid to large M (batch 32..256)
    _config(128, 64, 32, 4, 4), _config(128, 128, 32, 8, 4), _config(128, 128, 64, 8, 3),
    # 256x128 spills in its epilogue only (once per tile; tests/test_triton_compile.py checks the K loop);
    # 128x256 spilled in every dtype on sm_90
    _config(256, 128, 32, 8, 3), _config(256, 64, 32, 8, 4),
]


def configs():
    if INTERPRET:  # autotune with several configs fails without a GPU driver; one mid-size tile is fastest here
        return [_config(64, 32, 16, 4, 1)]
    return _FLAT_K_CONFIGS + _PER_TAP_CONFIGS


def prune(candidates, named_args, **kwargs):
    """The configs of the call's K layout, without tiles larger than the problem in any GEMM dimension (keeping
    the smallest such tile). named_args: the positional kernel arguments; kwargs: the constexprs of the call."""
    flat = kwargs["FLAT_K"]
    kept = [c for c in candidates if (c in _FLAT_K_CONFIGS) == flat]
    k_extent = kwargs["KH"] * kwargs["KW"] * named_args["Cin"] if flat else named_args["Cin"]
    caps = {"BLOCK_M": named_args["M"], "BLOCK_N": named_args["Cout"], "BLOCK_K": k_extent}
    for key, size in caps.items():
        smallest = min(c.kwargs[key] for c in kept)
        cap = max(triton.next_power_of_2(size), smallest)
        kept = [c for c in kept if c.kwargs[key] <= cap]
    return kept


def quick_bench(kernel_call, quantiles):
    """Autotuning timer: a few ms per config instead of triton's default ~125 ms (dozens of shapes x configs
    are tuned on first use); kernel times here are 10 us .. 2 ms, so 20 ms of repetitions is plenty."""
    from triton.testing import do_bench  # explicit: `import triton` need not import its testing module

    return do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


SPLIT_K_TILE = 64        # the tile side the wave estimate assumes (the autotuner picks the real tile)
SPLIT_K_MAX = 16
SPLIT_K_MIN_STEPS = 4    # K steps (of 32) each slice keeps at least
split_choices: dict = {}  # (shape key) -> the measured choice


def split_k_candidate(m: int, c_out: int, k_rows: int, sm_count: int) -> int:
    """The split factor worth measuring against no split (1: none is): the largest power of two that keeps the
    tiles x slices within one wave of SMs and each slice at least SPLIT_K_MIN_STEPS steps of 32 K rows, when one
    unsplit wave would leave more than half the SMs idle."""
    tiles = triton.cdiv(m, SPLIT_K_TILE) * triton.cdiv(c_out, SPLIT_K_TILE)
    steps = triton.cdiv(k_rows, 32)
    if 2 * tiles > sm_count:
        return 1
    split = 1
    while (split * 2 <= SPLIT_K_MAX and tiles * split * 2 <= sm_count
           and steps // (split * 2) >= SPLIT_K_MIN_STEPS and split * 2 * m * c_out <= INT32_LIMIT):
        split *= 2
    return split


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def graph_replay_ms(fn, calls: int = 20, replays: int = 5) -> float:
    """GPU milliseconds per fn() call: one CUDA graph of `calls` calls, replayed `replays` times between two
    events (a few ms in all; fn must be warm: compiled, autotuned)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()  # first replay uploads the graph
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / (calls * replays)


def choose_split_k(key, candidate: int, launch) -> int:
    """1 or `candidate`, whichever `launch(split)` takes less GPU time, timed once per key (shape, dtype,
    epilogue). Timed as CUDA graph replays: split K pays off where launches are cheap (small batches run through
    rf.cuda_graphed), and timing launches one by one would measure the host instead. Not timed while a graph is
    being captured (then 1 unless already chosen), nor in the interpreter."""
    choice = split_choices.get(key)
    if choice is not None:
        return choice
    if candidate == 1:
        split_choices[key] = 1
        return 1
    if INTERPRET or torch.cuda.is_current_stream_capturing():
        return 1
    for split in (1, candidate):  # compiles and autotunes each variant outside the timing
        launch(split)
    times = {split: graph_replay_ms(lambda: launch(split)) for split in (1, candidate)}
    split_choices[key] = choice = min(times, key=times.get)
    return choice
