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
y = act(scale * sum_s P_s + shift (+ residual)). Whether to split is measured, not guessed (tuning.py).

Batch statistics (the training path: scale 1, shift the conv bias, no residual, no ReLU): with STATS the unsplit
kernel also writes, per output tile of BLOCK_M rows, each channel's (count, pivot, mean about the pivot, M2) of the
values it stored (rounded to y's dtype) into the partials of batch_norm.py, whose `combine_stats` turns them into
the batch mean and var: y and its statistics in one pass over y. Such calls never split K.

Accumulation is fp32. fp16/bf16 tiles go to the tensor cores as they are; fp32 tiles go through TF32 on the GPU
when torch.backends.cudnn.allow_tf32 is set (PyTorch's default for convolutions), else full-precision fp32.
The epilogue (scale, shift, residual, ReLU) runs on the fp32 accumulator and rounds once to the output dtype.
Offsets are 64-bit when any tensor of the call has 2^31 elements or more.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tuning
from .batch_norm import combine_stats, stats_workspace, tile_moments
from .runtime import INTERPRET, device_guard, relu_keep_nan

CIN_ALIGN = 16  # packed K rows come in multiples of this (the smallest BLOCK_K the GPU's dot accepts)


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


# reset_to_zero: the statistics' partial counts, after each tile candidate ran (a smaller BLOCK_M writes more
# partials, which the winner's run would leave behind as stale)
@triton.autotune(configs=tuning.configs(), key=["M", "Cout", "Cin", "KH", "KW", "STRIDE", "SPLIT_K"],
                 prune_configs_by={"early_config_prune": tuning.prune}, do_bench=tuning.quick_bench,
                 reset_to_zero=["count_ptr"])
@triton.jit
def _conv_bn_act_kernel(
    x_ptr, w_ptr, scale_ptr, shift_ptr, res_ptr, y_ptr, ws_ptr,
    M, H, W, Cin, Ho, Wo, Cout, Cin_pad,
    SPLIT_K,  # a runtime int: Triton specializes the value 1 as a constant, so the unsplit kernel is unchanged
    KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, INDEX_64: tl.constexpr, FLAT_K: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    count_ptr=None, pivot_ptr=None, mean_ptr=None, m2_ptr=None, STATS: tl.constexpr = False,
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
        stored = _store_epilogue(acc, scale_ptr, shift_ptr, res_ptr, y_ptr, offs_n, y_offs, n_mask, out_mask,
                                 HAS_RESIDUAL, RELU)
        if STATS:
            _store_moments(stored, offs_m, offs_n, out_mask, n_mask, pid_m, pid_n, M, Cout, count_ptr, pivot_ptr,
                           mean_ptr, m2_ptr, BLOCK_M)


@triton.jit
def _store_moments(stored, offs_m, offs_n, out_mask, n_mask, pid_m, pid_n, M, Cout, count_ptr, pivot_ptr, mean_ptr,
                   m2_ptr, BLOCK_M: tl.constexpr):
    """This tile's partial of the batch statistics: (count, pivot = its first row, mean about it, M2) per channel,
    at partial pid_m (batch_norm.py's layout)."""
    first = pid_m * BLOCK_M
    count = tl.minimum(M - first, BLOCK_M)
    pivot = tl.sum(tl.where((offs_m == first)[:, None], stored, 0.0), axis=0)
    mean, m2 = tile_moments(stored, out_mask, count.to(tl.float32), pivot)
    partial = pid_m * Cout + offs_n
    tl.store(pivot_ptr + partial, pivot, mask=n_mask)
    tl.store(mean_ptr + partial, mean, mask=n_mask)
    tl.store(m2_ptr + partial, m2, mask=n_mask)
    if pid_n == 0:
        tl.store(count_ptr + pid_m, count.to(tl.float32))


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
    """y = act(acc * scale[n] + shift[n] (+ residual)) in fp32, rounded once to y's dtype; returns the stored
    values (as fp32)."""
    scale = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)
    shift = tl.load(shift_ptr + offs_n, mask=n_mask, other=0.0)
    out = acc * scale[None, :] + shift[None, :]
    if HAS_RESIDUAL:
        out += tl.load(res_ptr + y_offs, mask=out_mask, other=0.0).to(tl.float32)
    if RELU:
        out = relu_keep_nan(out)
    stored = out.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + y_offs, stored, mask=out_mask)
    return stored.to(tl.float32)


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


def conv_bn_act(x: torch.Tensor, weight_packed: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                residual, out: torch.Tensor, kernel_h: int, kernel_w: int, stride: int, padding: int, relu: bool,
                index_64=None, split_k=None, config=None, statistics=None) -> torch.Tensor:
    """Launch the kernel into `out` and return it. x: logical NCHW (any layout; made channels_last once),
    weight_packed from pack_weight, out: the (N, Cout, Ho, Wo) channels_last output of x's dtype, scale and shift
    fp32 vectors; every shape already checked by the caller.

    index_64=None picks 64-bit offsets only where needed; split_k=None splits K where that measured faster on this
    GPU (tuning.choose_split_k), an int forces a split; config=None autotunes, a triton.Config launches that tile
    instead (to check every candidate, not only the autotuner's winner). statistics: None, or a
    batch_norm.stats_workspace of `statistics_partials(M)` partials that the epilogue fills (K is then not split).
    """
    n, c_in, h, w = x.shape
    k_rows, c_out = weight_packed.shape
    h_out, w_out = out.shape[2:]
    m = n * h_out * w_out
    if m == 0:
        return out
    x = x.contiguous(memory_format=torch.channels_last)
    residual = None if residual is None else residual.contiguous(memory_format=torch.channels_last)
    if index_64 is None:
        index_64 = max(x.numel(), out.numel()) > tuning.INT32_LIMIT
    # Only fp32 tiles care: TF32 tensor cores unless the user turned TF32 off for convolutions.
    precision = "ieee" if x.dtype == torch.float32 and not torch.backends.cudnn.allow_tf32 else "tf32"
    res = residual if residual is not None else out
    stats_args = dict(zip(("count_ptr", "pivot_ptr", "mean_ptr", "m2_ptr"), statistics or (None,) * 4),
                      STATS=statistics is not None)
    if statistics is not None:
        split_k = 1

    def launch(split: int) -> None:
        workspace = scale if split == 1 else torch.empty((split, m, c_out), dtype=torch.float32, device=x.device)
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(c_out, meta["BLOCK_N"]), split)  # noqa
        kernel = _conv_bn_act_kernel if config is None else _conv_bn_act_kernel.fn  # .fn: the un-autotuned kernel
        kernel[grid](
            x, weight_packed, scale, shift, res, out, workspace,
            m, h, w, c_in, h_out, w_out, c_out, k_rows // (kernel_h * kernel_w), split,
            KH=kernel_h, KW=kernel_w, STRIDE=stride, PAD=padding,
            HAS_RESIDUAL=residual is not None, RELU=relu, INDEX_64=index_64, FLAT_K=uses_flat_k(c_in),
            DOT_IN_FP32=INTERPRET and x.dtype == torch.bfloat16, INPUT_PRECISION=precision,
            **stats_args, **({} if config is None else config.all_kwargs()),
        )
        if split > 1:
            block_m, block_n = 32, 64
            _split_k_epilogue_kernel[(triton.cdiv(m, block_m), triton.cdiv(c_out, block_n))](
                workspace, scale, shift, res, out, m, c_out, split,
                HAS_RESIDUAL=residual is not None, RELU=relu, BLOCK_M=block_m, BLOCK_N=block_n)

    if split_k is not None and (split_k < 1 or (split_k > 1 and split_k * m * c_out > tuning.INT32_LIMIT)):
        raise ValueError(f"split_k must be >= 1 with split_k * M * Cout < 2^31, got {split_k} for M={m}, "
                         f"Cout={c_out}")
    with device_guard(x):
        if split_k is None:  # the cached choice first: this runs on every call
            key = (m, h, w, c_in, c_out, kernel_h, kernel_w, stride, padding, x.dtype, residual is not None, relu,
                   precision, x.device.index)
            split_k = tuning.split_choices.get(key)
            if split_k is None:
                candidate = 1 if INTERPRET or index_64 else tuning.split_k_candidate(
                    m, c_out, k_rows, tuning.sm_count(x.device.index))
                split_k = tuning.choose_split_k(key, candidate, launch)
        launch(split_k)
    return out


def statistics_partials(m: int, config=None) -> int:
    """Partials the epilogue's statistics may write for M output rows: one per tile of the smallest BLOCK_M the
    launch may use (the autotuner's configs, and a forced config, which may come from another set)."""
    configs = tuning.configs() + ([] if config is None else [config])
    return triton.cdiv(m, min(c.kwargs["BLOCK_M"] for c in configs))


def conv_batch_norm_stats(x: torch.Tensor, weight_packed: torch.Tensor, bias: torch.Tensor, out: torch.Tensor,
                          kernel_h: int, kernel_w: int, stride: int, padding: int, config=None) -> tuple:
    """y = conv2d(x, w) + bias[c] into `out` (channels_last, x's dtype) and y's batch statistics (mean, var), fp32
    and biased, from the partials the conv's epilogue wrote: training BatchNorm's first pass fused into its conv.
    bias: an fp32 vector (zeros for a conv without bias); arguments as conv_bn_act's."""
    c_out = weight_packed.shape[1]
    m = out.shape[0] * out.shape[2] * out.shape[3]
    if m == 0:  # no values: NaN, as torch.var_mean
        nan = torch.full((c_out,), float("nan"), dtype=torch.float32, device=x.device)
        return out, nan, nan.clone()
    workspace = stats_workspace(statistics_partials(m, config), c_out, x.device)
    ones = torch.ones((c_out,), dtype=torch.float32, device=x.device)
    conv_bn_act(x, weight_packed, ones, bias, None, out, kernel_h, kernel_w, stride, padding, False, config=config,
                statistics=workspace)
    return (out, *combine_stats(workspace, m))
