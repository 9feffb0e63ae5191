"""Fused conv + folded BatchNorm (+ residual) (+ ReLU) as one implicit-GEMM Triton kernel over NHWC data.

    y[n, ho, wo, co] = act( scale[co] * sum_{kh, kw, ci} x[n, ho*s - p + kh, wo*s - p + kw, ci] * w[co, ci, kh, kw]
                            + shift[co]  (+ residual[n, ho, wo, co]) )        act = ReLU or identity

read as a GEMM  Y[M, N] = A[M, K] @ B[K, N]  with  M = batch*Ho*Wo (output pixels), N = Cout, K = KH*KW*Cin.
A is never materialized: each program walks the KH*KW taps in static loops (the spatial bounds mask and base
pointer are computed once per tap; out-of-image taps read zeros, which is the zero padding) and runs a loop
over Cin blocks inside each tap. B is the weight prepacked once by `pack_weight` as [KH*KW*Cin_pad, Cout]
(Cin padded with zero rows to a multiple of 16, so every tap's rows start aligned; the 7x7 stem has Cin=3).

Accumulation is fp32. fp16/bf16 tiles go to the tensor cores as they are; fp32 tiles go through TF32 on the GPU
when torch.backends.cudnn.allow_tf32 is set (PyTorch's default for convolutions), else full-precision fp32.
The epilogue (scale, shift, residual, ReLU) runs on the fp32 accumulator and rounds once to the output dtype.
Offsets are 64-bit when any tensor of the call has 2^31 elements or more.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, check_device

CIN_ALIGN = 16  # packed Cin is a multiple of this (the smallest BLOCK_K the GPU's dot accepts)
_INT32_LIMIT = 2**31 - 1


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, KH, KW) -> contiguous (KH*KW*Cin_pad, Cout) in the weight's dtype, zero rows for padded Cin."""
    c_out, c_in, kh, kw = weight.shape
    c_in_pad = triton.cdiv(c_in, CIN_ALIGN) * CIN_ALIGN
    packed = weight.new_zeros((kh, kw, c_in_pad, c_out))
    packed[:, :, :c_in, :] = weight.permute(2, 3, 1, 0)
    return packed.reshape(kh * kw * c_in_pad, c_out)


def _config(block_m, block_n, block_k, warps, stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8},
                         num_warps=warps, num_stages=stages)


def _configs():
    if INTERPRET:  # autotune with several configs fails without a GPU driver; one mid-size tile is fastest here
        return [_config(64, 32, 16, 4, 1)]
    return [
        # Cin <= 16 (the stem, tiny layers): BLOCK_K = 16
        _config(64, 64, 16, 4, 4), _config(128, 64, 16, 4, 4), _config(128, 128, 16, 8, 4),
        # small M (batch 1, late stages: M = 49..784)
        _config(32, 64, 64, 4, 4), _config(32, 128, 64, 4, 4), _config(64, 64, 64, 4, 4),
        _config(64, 128, 32, 4, 4),
        # mid to large M (batch 32..256)
        _config(128, 64, 32, 4, 4), _config(128, 128, 32, 8, 4), _config(128, 128, 64, 8, 3),
        _config(128, 256, 32, 8, 3), _config(256, 128, 32, 8, 3), _config(256, 64, 32, 8, 4),
    ]


def _prune(configs, named_args, **kwargs):
    """Drop tiles larger than the problem in any GEMM dimension (keeping the smallest such tile)."""
    caps = {"BLOCK_M": named_args["M"], "BLOCK_N": named_args["Cout"], "BLOCK_K": named_args["Cin"]}
    kept = configs
    for key, size in caps.items():
        smallest = min(c.kwargs[key] for c in kept)
        cap = max(triton.next_power_of_2(size), smallest)
        kept = [c for c in kept if c.kwargs[key] <= cap]
    return kept


@triton.autotune(configs=_configs(), key=["M", "Cout", "Cin", "KH", "KW", "STRIDE"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _conv_bn_act_kernel(
    x_ptr, w_ptr, scale_ptr, shift_ptr, res_ptr, y_ptr,
    M, H, W, Cin, Ho, Wo, Cout, Cin_pad,
    KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, INDEX_64: tl.constexpr,
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

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kh in tl.static_range(KH):
        for kw in tl.static_range(KW):
            h_in = h_top + kh
            w_in = w_left + kw
            in_image = m_mask & (h_in >= 0) & (h_in < H) & (w_in >= 0) & (w_in < W)
            a_ptrs = x_ptr + (((image * H + h_in) * W + w_in) * Cin)[:, None] + offs_k[None, :]
            b_ptrs = w_ptr + ((kh * KW + kw) * Cin_pad + offs_k)[:, None] * Cout + offs_n[None, :]
            for c0 in range(0, Cin, BLOCK_K):
                k_mask = offs_k < Cin - c0
                a = tl.load(a_ptrs, mask=in_image[:, None] & k_mask[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                if DOT_IN_FP32:  # the interpreter's bf16 dot is broken
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
                a_ptrs += BLOCK_K
                b_ptrs += BLOCK_K * Cout

    # Epilogue in fp32 on the accumulator, one store. y (and the residual) are (M, Cout) row-major = NHWC.
    scale = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)
    shift = tl.load(shift_ptr + offs_n, mask=n_mask, other=0.0)
    out = acc * scale[None, :] + shift[None, :]
    y_offs = offs_m[:, None] * Cout + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if HAS_RESIDUAL:
        out += tl.load(res_ptr + y_offs, mask=out_mask, other=0.0).to(tl.float32)
    if RELU:
        out = tl.maximum(out, 0.0)
    tl.store(y_ptr + y_offs, out.to(y_ptr.dtype.element_ty), mask=out_mask)


def empty_output(x: torch.Tensor, c_out: int, kernel_h: int, kernel_w: int, stride: int, padding: int):
    """The output buffer: (N, Cout, Ho, Wo) channels_last in x's dtype (the fake kernel uses the same)."""
    h_out = (x.shape[2] + 2 * padding - kernel_h) // stride + 1
    w_out = (x.shape[3] + 2 * padding - kernel_w) // stride + 1
    return torch.empty((x.shape[0], c_out, h_out, w_out), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


def conv_bn_act(x: torch.Tensor, weight_packed: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                residual, kernel_h: int, kernel_w: int, stride: int, padding: int, relu: bool,
                index_64=None) -> torch.Tensor:
    """Launch the kernel. x: logical NCHW (any layout; made channels_last once), weight_packed from pack_weight.

    Returns a channels_last tensor of x's dtype. index_64=None picks 64-bit offsets only where needed.
    """
    check_device(x)
    n, c_in, h, w = x.shape
    k_rows, c_out = weight_packed.shape
    taps = kernel_h * kernel_w
    if k_rows % taps or k_rows // taps < c_in:
        raise ValueError(f"weight_packed must be (KH*KW*Cin_pad, Cout) with Cin_pad >= {c_in} for a "
                         f"{kernel_h}x{kernel_w} kernel, got shape {tuple(weight_packed.shape)}")
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
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(c_out, meta["BLOCK_N"]),)  # noqa: E731
    _conv_bn_act_kernel[grid](
        x, weight_packed, scale.float().contiguous(), shift.float().contiguous(),
        residual if residual is not None else y, y,
        m, h, w, c_in, h_out, w_out, c_out, k_rows // taps,
        KH=kernel_h, KW=kernel_w, STRIDE=stride, PAD=padding,
        HAS_RESIDUAL=residual is not None, RELU=relu, INDEX_64=index_64,
        DOT_IN_FP32=INTERPRET and x.dtype == torch.bfloat16, INPUT_PRECISION=precision,
    )
    return y
