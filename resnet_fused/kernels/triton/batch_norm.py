"""Training BatchNorm's three passes as Triton kernels, over NHWC (channels_last) or NCHW (contiguous) data.
M = N*H*W values per channel c; every load is widened to fp32 and all arithmetic is fp32.

    stats:     mean[c] = sum y / M,  var[c] = sum (y - mean[c])^2 / M                                   (biased)
    apply:     xhat = (y - mean[c]) * invstd[c],  z = xhat * weight[c] + bias[c] (+ residual)
               out = relu(z) if relu else z                                       (rounded once to y's dtype)
    backward:  g = g_out where not z <= 0 (ReLU's backward: NaN passes) if relu else g_out
               sum_g[c] = sum g,  sum_gx[c] = sum g * xhat
               grad_y = weight[c] * invstd[c] * (g - (sum_g[c] + xhat * sum_gx[c]) / M),  grad_residual = g

weight and bias may be absent (1 and 0). The reductions run in two steps. A reduction program sums a chunk of
tiles of [BLOCK_R rows x BLOCK_C channels] into one partial per channel: for the statistics a (count, pivot, mean,
M2) record, where mean is taken of y - pivot and pivot is a value of y itself (here the channel's first; in the
conv epilogue the tile's first row). Each tile's moments are taken about its own mean and merged into the chunk's
with Chan et al.'s update

    n = n_a + n_b,  delta = mean_b - mean_a,  mean = mean_a + delta * n_b / n,  M2 = M2_a + M2_b + delta^2 n_a n_b / n

The combine then merges all partials in the parallel form of the same algebra, about K = the first partial's pivot:
d_p = (pivot_p - K) + mean_p,  d = sum n_p d_p / M,  M2 = sum M2_p + n_p (d_p - d)^2,  mean = K + d,  var = M2 / M.
Partials with n_p = 0 are skipped (a workspace may hold unwritten slots). No sum of squares and no sum of raw
values is formed: every rounding happens at the scale of the spread, so var stays exact when |mean| >> std
(pivot_p - K is exact there: two values within a factor of 2). The conv kernel's epilogue (conv_bn_act.py) writes
partials of this form per output tile, which `combine_stats` reads. The backward's partials are plain sums (xhat
is already centered). Offsets are 64-bit when a tensor has 2^31 elements or more.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import device_guard, relu_keep_nan

_INT32_LIMIT = 2**31 - 1
_TILE_ELEMENTS = 4096    # elements of one reduction tile (BLOCK_R * BLOCK_C)
_TARGET_PROGRAMS = 512   # reduction programs to aim for: a few waves on a large GPU
_PARTIAL_ROWS = 128      # partials the combine kernels read per step
_BLOCK = 1024            # elements per program of the elementwise kernels
_WARPS = 4


# --- tiles ------------------------------------------------------------------------------------------------------

@triton.jit
def _tile(t, M, C, HW, c_offs, c_mask, CHANNELS_LAST: tl.constexpr, BLOCK_R: tl.constexpr):
    """Offsets, mask and row count of reduction tile t. Channels_last: rows t*BLOCK_R.. of the (M, C) matrix,
    contiguous along channels. NCHW: image t // hw_tiles, pixels of its hw tile, contiguous along pixels."""
    if CHANNELS_LAST:
        first = t * BLOCK_R
        rows = first + tl.arange(0, BLOCK_R)
        offs = rows[:, None] * C + c_offs[None, :]
        count = tl.minimum(M - first, BLOCK_R)
        row_mask = rows < M
    else:
        hw_tiles = tl.cdiv(HW, BLOCK_R)
        image = t // hw_tiles
        first = (t - image * hw_tiles) * BLOCK_R
        pixels = first + tl.arange(0, BLOCK_R)
        offs = (image * C + c_offs[None, :]) * HW + pixels[:, None]
        count = tl.minimum(HW - first, BLOCK_R)
        row_mask = pixels < HW
    return offs, row_mask[:, None] & c_mask[None, :], count


@triton.jit
def _chunk(num_tiles, TILES_PER_PROGRAM: tl.constexpr, INDEX_64: tl.constexpr):
    """[first, last) of the tiles program_id(0) reduces."""
    first = tl.program_id(0) * TILES_PER_PROGRAM
    if INDEX_64:
        first = first.to(tl.int64)
    return first, tl.minimum(first + TILES_PER_PROGRAM, num_tiles)


@triton.jit
def _channels(BLOCK_C: tl.constexpr, C):
    c_offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return c_offs, c_offs < C


@triton.jit
def _per_channel(ptr, c_offs, c_mask, PRESENT: tl.constexpr, absent: tl.constexpr):
    if PRESENT:
        return tl.load(ptr + c_offs, mask=c_mask, other=absent)
    return tl.full(c_offs.shape, absent, tl.float32)


@triton.jit
def _normalized(y, mean, invstd):
    return (y - mean) * invstd


@triton.jit
def _pre_activation(xhat, weight, bias, res_ptr, offs, mask, HAS_RESIDUAL: tl.constexpr):
    """z = xhat * weight + bias (+ residual), in the reference's order of operations."""
    z = xhat * weight + bias
    if HAS_RESIDUAL:
        z += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return z


# --- statistics ------------------------------------------------------------------------------------------------

@triton.jit
def merge_moments(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s merge of two (count, mean, M2) summaries; n_a + n_b > 0. Shared with the conv epilogue."""
    n = n_a + n_b
    delta = mean_b - mean_a
    return n, mean_a + delta * (n_b / n), m2_a + m2_b + delta * delta * (n_a * n_b / n)


@triton.jit
def tile_moments(v, mask, count, pivot):
    """(mean of v - pivot, M2) per column of tile v over its `count` valid rows (mask: which entries are data)."""
    shifted = tl.where(mask, v - pivot[None, :], 0.0)
    mean = tl.sum(shifted, axis=0) / count
    centered = tl.where(mask, shifted - mean[None, :], 0.0)
    return mean, tl.sum(centered * centered, axis=0)


@triton.jit
def _stats_partials_kernel(y_ptr, count_ptr, pivot_ptr, mean_ptr, m2_ptr, M, C, HW, num_tiles,
                           CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr, TILES_PER_PROGRAM: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    c_offs, c_mask = _channels(BLOCK_C, C)
    first, last = _chunk(num_tiles, TILES_PER_PROGRAM, INDEX_64)
    pivot = tl.load(y_ptr + c_offs * (1 if CHANNELS_LAST else HW), mask=c_mask, other=0.0).to(tl.float32)
    n_a = 0.0
    mean_a = tl.zeros((BLOCK_C,), tl.float32)
    m2_a = tl.zeros((BLOCK_C,), tl.float32)
    for t in range(first, last):
        offs, mask, count = _tile(t, M, C, HW, c_offs, c_mask, CHANNELS_LAST, BLOCK_R)
        v = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        n_b = count.to(tl.float32)
        mean_b, m2_b = tile_moments(v, mask, n_b, pivot)
        n_a, mean_a, m2_a = merge_moments(n_a, mean_a, m2_a, n_b, mean_b, m2_b)
    p = tl.program_id(0)
    tl.store(pivot_ptr + p * C + c_offs, pivot, mask=c_mask)
    tl.store(mean_ptr + p * C + c_offs, mean_a, mask=c_mask)
    tl.store(m2_ptr + p * C + c_offs, m2_a, mask=c_mask)
    if tl.program_id(1) == 0:
        tl.store(count_ptr + p, n_a)


@triton.jit
def _stats_combine_kernel(count_ptr, pivot_ptr, mean_ptr, m2_ptr, out_mean_ptr, out_var_ptr, P, C, total,
                          BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program per channel block: the partials' parallel merge about K = partial 0's pivot."""
    c_offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    anchor = tl.load(pivot_ptr + c_offs, mask=c_mask, other=0.0)
    weighted = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    for p0 in range(0, P, BLOCK_P):
        n, offset, _, _ = _partial_block(count_ptr, pivot_ptr, mean_ptr, m2_ptr, p0, P, C, c_offs, c_mask, anchor,
                                         BLOCK_P)
        weighted += n * offset
    shift = tl.sum(weighted, axis=0) / total
    spread = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    for p0 in range(0, P, BLOCK_P):
        n, offset, m2, mask = _partial_block(count_ptr, pivot_ptr, mean_ptr, m2_ptr, p0, P, C, c_offs, c_mask, anchor,
                                             BLOCK_P)
        delta = offset - shift[None, :]
        spread += tl.where(mask, m2 + n * delta * delta, 0.0)
    tl.store(out_mean_ptr + c_offs, anchor + shift, mask=c_mask)
    tl.store(out_var_ptr + c_offs, tl.sum(spread, axis=0) / total, mask=c_mask)


@triton.jit
def _partial_block(count_ptr, pivot_ptr, mean_ptr, m2_ptr, p0, P, C, c_offs, c_mask, anchor, BLOCK_P: tl.constexpr):
    """Partials p0.. as (n [BLOCK_P, 1], mean - anchor, M2, mask); 0 where a partial is absent or empty."""
    p = p0 + tl.arange(0, BLOCK_P)
    n = tl.load(count_ptr + p, mask=p < P, other=0.0)
    mask = (n > 0.0)[:, None] & c_mask[None, :]
    offs = p[:, None] * C + c_offs[None, :]
    pivot = tl.load(pivot_ptr + offs, mask=mask, other=0.0)
    offset = tl.where(mask, (pivot - anchor[None, :]) + tl.load(mean_ptr + offs, mask=mask, other=0.0), 0.0)
    return n[:, None], offset, tl.load(m2_ptr + offs, mask=mask, other=0.0), mask


# --- apply -----------------------------------------------------------------------------------------------------

@triton.jit
def _elementwise_offsets(total, C, HW, CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if INDEX_64:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    channel = offs % C if CHANNELS_LAST else (offs // HW) % C
    return offs, offs < total, channel


@triton.jit
def _apply_kernel(y_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, res_ptr, out_ptr, total, C, HW,
                  HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
                  CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask, channel = _elementwise_offsets(total, C, HW, CHANNELS_LAST, INDEX_64, BLOCK)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    xhat = _normalized(y, tl.load(mean_ptr + channel, mask=mask, other=0.0),
                       tl.load(invstd_ptr + channel, mask=mask, other=0.0))
    z = _pre_activation(xhat, _per_channel(weight_ptr, channel, mask, HAS_WEIGHT, 1.0),
                        _per_channel(bias_ptr, channel, mask, HAS_BIAS, 0.0), res_ptr, offs, mask, HAS_RESIDUAL)
    if RELU:
        z = relu_keep_nan(z)
    tl.store(out_ptr + offs, z.to(out_ptr.dtype.element_ty), mask=mask)


# --- backward --------------------------------------------------------------------------------------------------

@triton.jit
def _passed_gradient(g_out, xhat, weight, bias, res_ptr, offs, mask, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr):
    """The gradient that passes the ReLU: zero where z <= 0 (z recomputed as apply computes it; NaN passes)."""
    if RELU:
        z = _pre_activation(xhat, weight, bias, res_ptr, offs, mask, HAS_RESIDUAL)
        g_out = tl.where(z <= 0.0, 0.0, g_out)
    return g_out


@triton.jit
def _backward_partials_kernel(g_ptr, y_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, res_ptr,
                              sum_g_ptr, sum_gx_ptr, M, C, HW, num_tiles,
                              HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                              RELU: tl.constexpr, CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr,
                              TILES_PER_PROGRAM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    c_offs, c_mask = _channels(BLOCK_C, C)
    first, last = _chunk(num_tiles, TILES_PER_PROGRAM, INDEX_64)
    mean = tl.load(mean_ptr + c_offs, mask=c_mask, other=0.0)[None, :]
    invstd = tl.load(invstd_ptr + c_offs, mask=c_mask, other=0.0)[None, :]
    weight = _per_channel(weight_ptr, c_offs, c_mask, HAS_WEIGHT, 1.0)[None, :]
    bias = _per_channel(bias_ptr, c_offs, c_mask, HAS_BIAS, 0.0)[None, :]
    sum_g = tl.zeros((BLOCK_C,), tl.float32)
    sum_gx = tl.zeros((BLOCK_C,), tl.float32)
    for t in range(first, last):
        offs, mask, _ = _tile(t, M, C, HW, c_offs, c_mask, CHANNELS_LAST, BLOCK_R)
        xhat = _normalized(tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32), mean, invstd)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # 0 off the tile: adds nothing below
        g = _passed_gradient(g, xhat, weight, bias, res_ptr, offs, mask, HAS_RESIDUAL, RELU)
        sum_g += tl.sum(g, axis=0)
        sum_gx += tl.sum(g * xhat, axis=0)
    p = tl.program_id(0)
    tl.store(sum_g_ptr + p * C + c_offs, sum_g, mask=c_mask)
    tl.store(sum_gx_ptr + p * C + c_offs, sum_gx, mask=c_mask)


@triton.jit
def _sum_partials_kernel(sum_g_ptr, sum_gx_ptr, out_g_ptr, out_gx_ptr, P, C,
                         BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    c_offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    acc_g = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    acc_gx = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < P)[:, None] & c_mask[None, :]
        offs = p[:, None] * C + c_offs[None, :]
        acc_g += tl.load(sum_g_ptr + offs, mask=mask, other=0.0)
        acc_gx += tl.load(sum_gx_ptr + offs, mask=mask, other=0.0)
    tl.store(out_g_ptr + c_offs, tl.sum(acc_g, axis=0), mask=c_mask)
    tl.store(out_gx_ptr + c_offs, tl.sum(acc_gx, axis=0), mask=c_mask)


@triton.jit
def _grad_input_kernel(g_ptr, y_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, res_ptr, sum_g_ptr, sum_gx_ptr,
                       grad_y_ptr, grad_res_ptr, total, C, HW, count,
                       HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                       RELU: tl.constexpr, CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr,
                       BLOCK: tl.constexpr):
    offs, mask, channel = _elementwise_offsets(total, C, HW, CHANNELS_LAST, INDEX_64, BLOCK)
    invstd = tl.load(invstd_ptr + channel, mask=mask, other=0.0)
    weight = _per_channel(weight_ptr, channel, mask, HAS_WEIGHT, 1.0)
    xhat = _normalized(tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32),
                       tl.load(mean_ptr + channel, mask=mask, other=0.0), invstd)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = _passed_gradient(g, xhat, weight, _per_channel(bias_ptr, channel, mask, HAS_BIAS, 0.0), res_ptr, offs,
                         mask, HAS_RESIDUAL, RELU)
    sum_g = tl.load(sum_g_ptr + channel, mask=mask, other=0.0)
    sum_gx = tl.load(sum_gx_ptr + channel, mask=mask, other=0.0)
    grad_y = weight * invstd * (g - (sum_g + xhat * sum_gx) / count)
    tl.store(grad_y_ptr + offs, grad_y.to(grad_y_ptr.dtype.element_ty), mask=mask)
    if HAS_RESIDUAL:
        tl.store(grad_res_ptr + offs, g.to(grad_res_ptr.dtype.element_ty), mask=mask)


# --- launchers -------------------------------------------------------------------------------------------------

def _layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _vector(t):
    return None if t is None else t.float().contiguous()


def _index_64(y: torch.Tensor, forced) -> bool:
    return y.numel() > _INT32_LIMIT if forced is None else forced


class ReductionGrid:
    """How a reduction over y's rows is split: tiles of BLOCK_R x BLOCK_C, TILES_PER_PROGRAM tiles per program,
    a grid of (partials, channel blocks). Channels_last tiles run along channels, NCHW tiles along pixels."""

    def __init__(self, shape, channels_last: bool, tiles_per_program=None):
        n, c, h, w = shape
        if channels_last:
            self.block_c = min(triton.next_power_of_2(c), 64)
            self.block_r = _TILE_ELEMENTS // self.block_c
            self.tiles = triton.cdiv(n * h * w, self.block_r)
        else:
            self.block_r = min(triton.next_power_of_2(h * w), 1024)
            self.block_c = min(triton.next_power_of_2(c), _TILE_ELEMENTS // self.block_r)
            self.tiles = n * triton.cdiv(h * w, self.block_r)
        self.channel_blocks = triton.cdiv(c, self.block_c)
        self.tiles_per_program = tiles_per_program or triton.next_power_of_2(
            max(1, triton.cdiv(self.tiles * self.channel_blocks, _TARGET_PROGRAMS)))
        self.partials = triton.cdiv(self.tiles, self.tiles_per_program)
        self.grid = (self.partials, self.channel_blocks)

    def constants(self) -> dict:
        return dict(TILES_PER_PROGRAM=self.tiles_per_program, BLOCK_R=self.block_r, BLOCK_C=self.block_c)


def _combine_grid(c: int) -> tuple:
    block_c = min(triton.next_power_of_2(c), 64)
    return (triton.cdiv(c, block_c),), dict(BLOCK_P=_PARTIAL_ROWS // 2 if block_c > 32 else _PARTIAL_ROWS,
                                            BLOCK_C=block_c)


def stats_workspace(partials: int, channels: int, device) -> tuple:
    """(counts [P], pivots [P, C], means [P, C], M2 [P, C]) fp32 for `partials` partials; counts start at 0
    (unwritten slots are skipped by the combine; slot 0 must be written)."""
    matrix = lambda: torch.empty((partials, channels), dtype=torch.float32, device=device)  # noqa: E731
    return torch.zeros((partials,), dtype=torch.float32, device=device), matrix(), matrix(), matrix()


def combine_stats(workspace: tuple, total: int) -> tuple:
    """(mean, var) fp32 per channel from partials (stats_workspace's layout) covering `total` values per channel."""
    means = workspace[2]
    c = means.shape[1]
    mean = torch.empty((c,), dtype=torch.float32, device=means.device)
    var = torch.empty_like(mean)
    grid, blocks = _combine_grid(c)
    with device_guard(means):
        _stats_combine_kernel[grid](*workspace, mean, var, means.shape[0], c, float(total), **blocks,
                                    num_warps=_WARPS)
    return mean, var


def batch_norm_stats(y: torch.Tensor, channels_last: bool, index_64=None, tiles_per_program=None) -> tuple:
    """(mean, var) of y (N, C, H, W) per channel, fp32, var biased. channels_last: read y as NHWC (else as
    contiguous NCHW); y is made so if it is not. index_64 and tiles_per_program (a power of 2) override the
    launcher's choices (for tests)."""
    n, c, h, w = y.shape
    if y.numel() == 0:  # no values: NaN, as torch.var_mean
        nan = torch.full((c,), float("nan"), dtype=torch.float32, device=y.device)
        return nan, nan.clone()
    y = _layout(y, channels_last)
    grid = ReductionGrid(y.shape, channels_last, tiles_per_program)
    workspace = stats_workspace(grid.partials, c, y.device)
    with device_guard(y):
        _stats_partials_kernel[grid.grid](y, *workspace, n * h * w, c, h * w, grid.tiles,
                                          CHANNELS_LAST=channels_last, INDEX_64=_index_64(y, index_64),
                                          **grid.constants(),
                                          num_warps=_WARPS)
    return combine_stats(workspace, n * h * w)


def _elementwise_grid(total: int) -> tuple:
    return (triton.cdiv(total, _BLOCK),)


def batch_norm_apply(y, mean, invstd, weight, bias, residual, relu: bool, channels_last: bool,
                     index_64=None) -> torch.Tensor:
    """act((y - mean) * invstd * weight + bias (+ residual)) in y's dtype, channels_last or contiguous NCHW."""
    y = _layout(y, channels_last)
    out = torch.empty_like(y)
    if y.numel() == 0:
        return out
    residual = None if residual is None else _layout(residual, channels_last)
    with device_guard(y):
        _apply_kernel[_elementwise_grid(y.numel())](
            y, _vector(mean), _vector(invstd), _vector(weight), _vector(bias), residual, out, y.numel(), y.shape[1],
            y.shape[2] * y.shape[3], HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            HAS_RESIDUAL=residual is not None, RELU=relu, CHANNELS_LAST=channels_last,
            INDEX_64=_index_64(y, index_64), BLOCK=_BLOCK, num_warps=_WARPS)
    return out


def batch_norm_backward(grad_out, y, mean, invstd, weight, bias, residual, relu: bool, channels_last: bool,
                        index_64=None, tiles_per_program=None):
    """(grad_y, grad_weight, grad_bias, grad_residual or None) of batch_norm_apply at fixed mean and invstd:
    grad_weight = sum g * xhat and grad_bias = sum g (fp32, per channel, returned even without a weight), grad_y
    in y's dtype and grad_residual (= g) in the residual's, both in the layout `channels_last` says."""
    n, c, h, w = y.shape
    y = _layout(y, channels_last)
    grad_out = _layout(grad_out, channels_last)
    residual = None if residual is None else _layout(residual, channels_last)
    grad_y = torch.empty_like(y)
    grad_residual = None if residual is None else torch.empty_like(residual)
    sum_g = torch.zeros((c,), dtype=torch.float32, device=y.device)
    sum_gx = torch.zeros_like(sum_g)
    if y.numel() == 0:
        return grad_y, sum_gx, sum_g, grad_residual
    mean, invstd, weight, bias = _vector(mean), _vector(invstd), _vector(weight), _vector(bias)
    flags = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
                 RELU=relu, CHANNELS_LAST=channels_last, INDEX_64=_index_64(y, index_64))
    grid = ReductionGrid(y.shape, channels_last, tiles_per_program)
    partial_g = torch.empty((grid.partials, c), dtype=torch.float32, device=y.device)
    partial_gx = torch.empty_like(partial_g)
    combine_grid, blocks = _combine_grid(c)
    with device_guard(y):
        _backward_partials_kernel[grid.grid](grad_out, y, mean, invstd, weight, bias, residual, partial_g, partial_gx,
                                             n * h * w, c, h * w, grid.tiles, **flags, **grid.constants(),
                                             num_warps=_WARPS)
        _sum_partials_kernel[combine_grid](partial_g, partial_gx, sum_g, sum_gx, grid.partials, c, **blocks,
                                           num_warps=_WARPS)
        _grad_input_kernel[_elementwise_grid(y.numel())](
            grad_out, y, mean, invstd, weight, bias, residual, sum_g, sum_gx, grad_y, grad_residual, y.numel(), c,
            h * w, float(n * h * w), **flags, BLOCK=_BLOCK, num_warps=_WARPS)
    return grad_y, sum_gx, sum_g, grad_residual
