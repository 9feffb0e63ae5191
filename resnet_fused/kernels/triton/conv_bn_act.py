"""Fused conv + folded BatchNorm (+ residual) (+ ReLU) as one implicit-GEMM Triton kernel over NHWC data.

    y[n, ho, wo, co] = act( scale[co] * sum_{kh, kw, ci} x[n, ho*s - p + kh, wo*s - p + kw, ci] * w[co, ci, kh, kw]
                            + shift[co]  (+ residual[n, ho, wo, co]) )        act = ReLU or identity

read as a GEMM  Y[M, N] = A[M, K] @ B[K, N]  with  M = batch*Ho*Wo (output pixels), N = Cout, K = KH*KW*Cin.
A is never materialized. B is the weight prepacked once by `pack_weight`, in one of two layouts:

  per tap (Cin >= 16)   [KH*KW*Cin_pad, Cout], Cin padded with zero rows to a multiple of 16. The K loop is ONE
                        runtime loop over (tap, Cin block) steps: each step decodes its tap with scalar
                        arithmetic, masks the rows whose input pixel falls outside the image (the zero padding)
                        and loads a [BLOCK_M, BLOCK_K] slice of contiguous channels. One loop, so the compiler
                        pipelines loads across taps, and compile time does not grow with KH*KW (statically
                        unrolled tap loops took 138 s to compile the 7x7 stem for sm_90, measured).
  flat K (Cin < 16)     [KH*KW*Cin rounded up to 16, Cout] with no per-tap padding: the 7x7 stem (Cin=3) would
                        otherwise spend 81% of its MMAs on zeros. Each K column decodes its own (kh, kw, ci).
                        4 warps only: PyTorch Inductor's conv template miscomputed such per-element decodes with
                        8 warps (pytorch issue 173068).

Split K (small M x N, long K: batch 1, late stages): with SPLIT_K > 1 program (tile, s) sums only the s-th slice
of the K steps and stores its fp32 partial P_s[M, N] to a workspace; `_split_k_epilogue_kernel` then computes
y = act(scale * sum_s P_s + shift (+ residual)). Whether to split is measured, not guessed (`choose_split_k`).

Accumulation is fp32. fp16/bf16 tiles go to the tensor cores as they are; fp32 tiles go through TF32 on the GPU
when torch.backends.cudnn.allow_tf32 is set (PyTorch's default for convolutions), else full-precision fp32.
The epilogue (scale, shift, residual, ReLU) runs on the fp32 accumulator and rounds once to the output dtype.
Offsets are 64-bit when any tensor of the call has 2^31 elements or more.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ...ops.validation import check_conv_prepacked
from .common import INTERPRET, check_device, device_guard, relu_keep_nan

CIN_ALIGN = 16  # packed K rows come in multiples of this (the smallest BLOCK_K the GPU's dot accepts)
_INT32_LIMIT = 2**31 - 1


def uses_flat_k(c_in: int) -> bool:
    """Below 16 input channels a per-tap padded K would be mostly zeros: flatten K instead."""
    return c_in < CIN_ALIGN


def packed_rows(c_in: int, kernel_h: int, kernel_w: int) -> int:
    """Rows of the packed weight for this Cin and kernel size (see pack_weight)."""
    if uses_flat_k(c_in):
        return triton.cdiv(kernel_h * kernel_w * c_in, CIN_ALIGN) * CIN_ALIGN
    return kernel_h * kernel_w * triton.cdiv(c_in, CIN_ALIGN) * CIN_ALIGN


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, KH, KW) -> contiguous (rows, Cout) in the weight's dtype, K row = (kh*KW + kw)*Cin_pad + ci
    with Cin_pad = Cin rounded up to 16 (per tap), or = Cin (flat K, Cin < 16); padding rows are zeros."""
    c_out, c_in, kh, kw = weight.shape
    packed = weight.new_zeros((packed_rows(c_in, kh, kw), c_out))
    taps = weight.permute(2, 3, 1, 0)  # (KH, KW, Cin, Cout)
    if uses_flat_k(c_in):
        packed[:kh * kw * c_in] = taps.reshape(kh * kw * c_in, c_out)
    else:
        packed.view(kh, kw, -1, c_out)[:, :, :c_in, :] = taps
    return packed


def unpack_weight(packed: torch.Tensor, c_in: int, kernel_h: int, kernel_w: int) -> torch.Tensor:
    """pack_weight's inverse: (rows, Cout) -> a (Cout, Cin, KH, KW) view of the packed rows (padding left out)."""
    c_out = packed.shape[1]
    if uses_flat_k(c_in):
        taps = packed[:kernel_h * kernel_w * c_in].view(kernel_h, kernel_w, c_in, c_out)
    else:
        taps = packed.view(kernel_h, kernel_w, -1, c_out)[:, :, :c_in, :]
    return taps.permute(3, 2, 0, 1)


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


def _configs():
    if INTERPRET:  # autotune with several configs fails without a GPU driver; one mid-size tile is fastest here
        return [_config(64, 32, 16, 4, 1)]
    return _FLAT_K_CONFIGS + _PER_TAP_CONFIGS


def _prune(configs, named_args, **kwargs):
    """The configs of the call's K layout, without tiles larger than the problem in any GEMM dimension (keeping
    the smallest such tile). named_args: the positional kernel arguments; kwargs: the constexprs of the call."""
    flat = kwargs["FLAT_K"]
    kept = [c for c in configs if (c in _FLAT_K_CONFIGS) == flat]
    k_extent = kwargs["KH"] * kwargs["KW"] * named_args["Cin"] if flat else named_args["Cin"]
    caps = {"BLOCK_M": named_args["M"], "BLOCK_N": named_args["Cout"], "BLOCK_K": k_extent}
    for key, size in caps.items():
        smallest = min(c.kwargs[key] for c in kept)
        cap = max(triton.next_power_of_2(size), smallest)
        kept = [c for c in kept if c.kwargs[key] <= cap]
    return kept


def _quick_bench(kernel_call, quantiles):
    """Autotuning timer: a few ms per config instead of triton's default ~125 ms (dozens of shapes x configs
    are tuned on first use); kernel times here are 10 us .. 2 ms, so 20 ms of repetitions is plenty."""
    from triton.testing import do_bench  # explicit: `import triton` need not import its testing module

    return do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


@triton.autotune(configs=_configs(), key=["M", "Cout", "Cin", "KH", "KW", "STRIDE", "SPLIT_K"],
                 prune_configs_by={"early_config_prune": _prune}, do_bench=_quick_bench)
@triton.jit
def _conv_bn_act_kernel(
    x_ptr, w_ptr, scale_ptr, shift_ptr, res_ptr, y_ptr, ws_ptr,
    M, H, W, Cin, Ho, Wo, Cout, Cin_pad,
    SPLIT_K,  # a runtime int: Triton specializes the value 1 as a constant, so the unsplit kernel is unchanged
    KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, INDEX_64: tl.constexpr, FLAT_K: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # The interpreter accepts smaller dots; the GPU does not.
    tl.static_assert(BLOCK_M >= 16, "BLOCK_M must be >= 16")
    tl.static_assert(BLOCK_N >= 16, "BLOCK_N must be >= 16")
    tl.static_assert(BLOCK_K >= 16, "BLOCK_K must be >= 16")
    # Grouped program order: GROUP_M row blocks in a row share the same weight columns while they are in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(Cout, BLOCK_N)
    group_size = GROUP_M * num_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group
    if INDEX_64:
        pid_m = pid_m.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < Cout

    # Output pixel of each GEMM row, decoded once per program (never inside the K loop).
    image = offs_m // (Ho * Wo)
    pixel = offs_m % (Ho * Wo)
    h_top = (pixel // Wo) * STRIDE - PAD
    w_left = (pixel % Wo) * STRIDE - PAD
    corner = (image * H + h_top) * W + w_left  # input pixel under tap (0, 0); may lie in the padding

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FLAT_K:
        k_total = KH * KW * Cin
        first, last = _k_range(k_total, BLOCK_K, SPLIT_K)
        for k0 in range(first, last, BLOCK_K):
            k = k0 + offs_k
            tap = k // Cin
            kh = tap // KW
            kw = tap % KW
            h_in = h_top[:, None] + kh[None, :]
            w_in = w_left[:, None] + kw[None, :]
            a_mask = (m_mask[:, None] & (k < k_total)[None, :]
                      & (h_in >= 0) & (h_in < H) & (w_in >= 0) & (w_in < W))
            a_offs = (corner[:, None] + (kh * W + kw)[None, :]) * Cin + (k % Cin)[None, :]
            a = tl.load(x_ptr + a_offs, mask=a_mask, other=0.0)
            b = tl.load(w_ptr + k[:, None] * Cout + offs_n[None, :],
                        mask=(k < k_total)[:, None] & n_mask[None, :], other=0.0)
            if DOT_IN_FP32:  # the interpreter's bf16 dot is broken
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    else:
        cin_blocks = tl.cdiv(Cin, BLOCK_K)
        first, last = _k_range(KH * KW * cin_blocks, 1, SPLIT_K)
        for step in range(first, last):
            tap = step // cin_blocks  # scalar decode, once per step for the whole tile
            c0 = (step - tap * cin_blocks) * BLOCK_K
            kh = tap // KW
            kw = tap - kh * KW
            h_in = h_top + kh
            w_in = w_left + kw
            in_image = m_mask & (h_in >= 0) & (h_in < H) & (w_in >= 0) & (w_in < W)
            k_mask = offs_k < Cin - c0
            a_ptrs = x_ptr + ((corner + kh * W + kw) * Cin + c0)[:, None] + offs_k[None, :]
            b_ptrs = w_ptr + (tap * Cin_pad + c0 + offs_k)[:, None] * Cout + offs_n[None, :]
            a = tl.load(a_ptrs, mask=in_image[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if DOT_IN_FP32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    y_offs = offs_m[:, None] * Cout + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K > 1:  # this slice's partial sum; _split_k_epilogue_kernel adds the slices and applies the epilogue
        partial = tl.program_id(1).to(tl.int64) * M * Cout
        tl.store(ws_ptr + partial + y_offs, acc, mask=out_mask)
    else:
        # Epilogue in fp32 on the accumulator, one store. y (and the residual) are (M, Cout) row-major = NHWC.
        _store_epilogue(acc, scale_ptr, shift_ptr, res_ptr, y_ptr, offs_n, y_offs, n_mask, out_mask,
                        HAS_RESIDUAL, RELU)


@triton.jit
def _k_range(total, BLOCK: tl.constexpr, SPLIT_K):
    """[first, last) of range(0, total, BLOCK) that program_id(1) sums: all of it (the bounds the unsplit kernel
    always had, constant 0 included) unless K is split, else a slice of whole blocks (the last short or empty)."""
    per_slice = tl.cdiv(tl.cdiv(total, BLOCK), SPLIT_K) * BLOCK
    first = tl.program_id(1) * per_slice if SPLIT_K > 1 else 0
    last = tl.minimum(first + per_slice, total) if SPLIT_K > 1 else total
    return first, last


@triton.jit
def _store_epilogue(acc, scale_ptr, shift_ptr, res_ptr, y_ptr, offs_n, y_offs, n_mask, out_mask,
                    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr):
    """y = act(acc * scale[n] + shift[n] (+ residual)) in fp32, rounded once to y's dtype."""
    scale = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)
    shift = tl.load(shift_ptr + offs_n, mask=n_mask, other=0.0)
    out = acc * scale[None, :] + shift[None, :]
    if HAS_RESIDUAL:
        out += tl.load(res_ptr + y_offs, mask=out_mask, other=0.0).to(tl.float32)
    if RELU:
        out = relu_keep_nan(out)
    tl.store(y_ptr + y_offs, out.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _split_k_epilogue_kernel(ws_ptr, scale_ptr, shift_ptr, res_ptr, y_ptr, M, Cout, SPLIT_K,
                             HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y[m, n] = act(scale[n] * sum_s ws[s, m, n] + shift[n] (+ residual[m, n])), summed in slice order."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < Cout
    out_mask = (offs_m < M)[:, None] & n_mask[None, :]
    y_offs = offs_m[:, None] * Cout + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(0, SPLIT_K):
        acc += tl.load(ws_ptr + (offs_m[:, None] + s * M) * Cout + offs_n[None, :], mask=out_mask, other=0.0)
    _store_epilogue(acc, scale_ptr, shift_ptr, res_ptr, y_ptr, offs_n, y_offs, n_mask, out_mask,
                    HAS_RESIDUAL, RELU)


def empty_output(x: torch.Tensor, c_out: int, kernel_h: int, kernel_w: int, stride: int, padding: int):
    """The output buffer: (N, Cout, Ho, Wo) channels_last in x's dtype (the fake kernel uses the same)."""
    h_out = (x.shape[2] + 2 * padding - kernel_h) // stride + 1
    w_out = (x.shape[3] + 2 * padding - kernel_w) // stride + 1
    return torch.empty((x.shape[0], c_out, h_out, w_out), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


# ---- split K: when and by how much ------------------------------------------------------------------------

SPLIT_K_TILE = 64        # the tile side the wave estimate assumes (the autotuner picks the real tile)
SPLIT_K_MAX = 16
SPLIT_K_MIN_STEPS = 4    # K steps (of 32) each slice keeps at least
_split_choices: dict = {}  # (shape key) -> the measured choice


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
           and steps // (split * 2) >= SPLIT_K_MIN_STEPS and split * 2 * m * c_out <= _INT32_LIMIT):
        split *= 2
    return split


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
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
    choice = _split_choices.get(key)
    if choice is not None:
        return choice
    if candidate == 1:
        _split_choices[key] = 1
        return 1
    if INTERPRET or torch.cuda.is_current_stream_capturing():
        return 1
    for split in (1, candidate):  # compiles and autotunes each variant outside the timing
        launch(split)
    times = {split: graph_replay_ms(lambda: launch(split)) for split in (1, candidate)}
    _split_choices[key] = choice = min(times, key=times.get)
    return choice


def conv_bn_act(x: torch.Tensor, weight_packed: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                residual, kernel_h: int, kernel_w: int, stride: int, padding: int, relu: bool,
                index_64=None, split_k=None, config=None) -> torch.Tensor:
    """Launch the kernel. x: logical NCHW (any layout; made channels_last once), weight_packed from pack_weight.

    Returns a channels_last tensor of x's dtype. index_64=None picks 64-bit offsets only where needed;
    split_k=None splits K where that measured faster on this GPU (choose_split_k), an int forces a split;
    config=None autotunes, a triton.Config launches that tile instead (to check every candidate, not only the
    autotuner's winner).
    """
    # The kernel trusts every length and shape: check before it reads.
    stride, padding = check_conv_prepacked(x, weight_packed, scale, shift, residual, (kernel_h, kernel_w), stride,
                                           padding)
    check_device(x)
    n, c_in, h, w = x.shape
    k_rows, c_out = weight_packed.shape
    if k_rows != packed_rows(c_in, kernel_h, kernel_w):
        raise ValueError(f"weight_packed must be pack_weight's ({packed_rows(c_in, kernel_h, kernel_w)}, Cout) for "
                         f"Cin={c_in} and a {kernel_h}x{kernel_w} kernel, got shape {tuple(weight_packed.shape)}")
    y = empty_output(x, c_out, kernel_h, kernel_w, stride, padding)
    h_out, w_out = y.shape[2:]
    m = n * h_out * w_out
    if m == 0:
        return y
    x = x.contiguous(memory_format=torch.channels_last)
    residual = None if residual is None else residual.contiguous(memory_format=torch.channels_last)
    if index_64 is None:
        index_64 = max(x.numel(), y.numel()) > _INT32_LIMIT
    # Only fp32 tiles care: TF32 tensor cores unless the user turned TF32 off for convolutions.
    precision = "ieee" if x.dtype == torch.float32 and not torch.backends.cudnn.allow_tf32 else "tf32"
    scale, shift = scale.float().contiguous(), shift.float().contiguous()
    res = residual if residual is not None else y

    def launch(split: int) -> None:
        workspace = scale if split == 1 else torch.empty((split, m, c_out), dtype=torch.float32, device=x.device)
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(c_out, meta["BLOCK_N"]), split)  # noqa
        kernel = _conv_bn_act_kernel if config is None else _conv_bn_act_kernel.fn  # .fn: the un-autotuned kernel
        kernel[grid](
            x, weight_packed, scale, shift, res, y, workspace,
            m, h, w, c_in, h_out, w_out, c_out, k_rows // (kernel_h * kernel_w), split,
            KH=kernel_h, KW=kernel_w, STRIDE=stride, PAD=padding,
            HAS_RESIDUAL=residual is not None, RELU=relu, INDEX_64=index_64, FLAT_K=uses_flat_k(c_in),
            DOT_IN_FP32=INTERPRET and x.dtype == torch.bfloat16, INPUT_PRECISION=precision,
            **({} if config is None else config.all_kwargs()),
        )
        if split > 1:
            block_m, block_n = 32, 64
            _split_k_epilogue_kernel[(triton.cdiv(m, block_m), triton.cdiv(c_out, block_n))](
                workspace, scale, shift, res, y, m, c_out, split,
                HAS_RESIDUAL=residual is not None, RELU=relu, BLOCK_M=block_m, BLOCK_N=block_n)

    if split_k is not None and (split_k < 1 or (split_k > 1 and split_k * m * c_out > _INT32_LIMIT)):
        raise ValueError(f"split_k must be >= 1 with split_k * M * Cout < 2^31, got {split_k} for M={m}, "
                         f"Cout={c_out}")
    with device_guard(x):
        if split_k is None:  # the cached choice first: this runs on every call
            key = (m, h, w, c_in, c_out, kernel_h, kernel_w, stride, padding, x.dtype, residual is not None, relu,
                   precision, x.device.index)
            split_k = _split_choices.get(key)
            if split_k is None:
                candidate = 1 if INTERPRET or index_64 else split_k_candidate(m, c_out, k_rows,
                                                                              _sm_count(x.device.index))
                split_k = choose_split_k(key, candidate, launch)
        launch(split_k)
    return y
