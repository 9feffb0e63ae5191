// Which kernel runs a conv_bn_act call on the GPU, and with which tile: a pure function of the call's shape, dtype,
// alignment and the device, so that it is explained and tested without a GPU. Plain C++ (no CUDA headers): the
// CUDA dispatcher (conv_dispatch.cu) follows it, and the CPU build compiles it too for the tests
// (resnet_fused._C.cuda_conv_plan).
//
// Kernels:
//   Sm90  CUTLASS implicit GEMM for Hopper (csrc/cuda/sm90): TMA im2col loads, warp-specialized wgmma, fused
//         epilogue. Runs on compute capability 9.0 exactly (sm_90a code) when the extension was built with it,
//         for calls TMA can address: 16-byte-aligned tensors and channel counts (Cin and Cout multiples of 8 for
//         fp16/bf16, of 4 for fp32), M = N*Ho*Wo < 2^31, and the im2col box limits (padding, kernel, stride).
//   Wmma  the portable tensor-core kernel (conv_bn_act.cu, sm_80+): everything else, e.g. the 7x7 stem (Cin=3).
//
//   Sm90SplitK  for small M (batch 1, late stages) in fp16/bf16: the same conditions, and too few output tiles to
//         fill the SMs while K is long: a CUTLASS GEMM whose CTAs split K (choose_splits), over x itself for a 1x1
//         stride-1 conv, else over an im2col copy.
//
// Sm90 tile: among the tiles below, the one with the least estimated time, where a tile's time is its area
// divided by its relative throughput and the kernel's time is that times the number of waves it launches
// (one CTA per SM: ceil(tiles / SMs)). Big tiles reuse more operands from shared memory (fastest per element),
// small ones fill the SMs when M*Cout is small (batch 1, late stages) and waste less where Cout = 64 or M is
// not a multiple of 128. The relative throughputs are first-principles estimates (shared-memory operand traffic
// per wgmma) until the GPU pass measures them.
#pragma once

#include <cstdint>
#include <limits>

namespace resnet_fused {
namespace cuda_kernels {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

inline constexpr int dtype_bytes(DType dtype) { return dtype == DType::Float32 ? 4 : 2; }

enum class ConvKernelKind : int { Wmma = 0, Sm90 = 1, Sm90SplitK = 2 };

// Tiles of the Sm90 kernel (M x N x K elements; K spans 128 bytes of channels).
enum class Sm90Tile : int { Large = 0, Narrow = 1, Small = 2 };
constexpr int kSm90TileCount = 3;

struct Sm90TileShape {
  int m, n, k;
};

inline constexpr Sm90TileShape sm90_tile_shape(Sm90Tile tile, DType dtype) {
  const int k = 128 / dtype_bytes(dtype);
  switch (tile) {
    case Sm90Tile::Large: return {128, 128, k};
    case Sm90Tile::Narrow: return {128, 64, k};
    case Sm90Tile::Small: return {64, 64, k};
  }
  return {0, 0, 0};
}

// Estimated throughput of each tile relative to the large one. A wgmma m64nNk16 reads (64 + N) x 16 operands from
// shared memory for 64 x N x 16 MACs: at N = 128 the tensor cores are the bound, at N = 64 shared memory about
// matches them (so less headroom); a 64-row tile also keeps one wgmma per K step in flight instead of two.
inline constexpr double sm90_tile_rate(Sm90Tile tile) {
  switch (tile) {
    case Sm90Tile::Large: return 1.0;
    case Sm90Tile::Narrow: return 0.85;
    case Sm90Tile::Small: return 0.6;
  }
  return 1.0;
}

inline const char* sm90_tile_name(Sm90Tile tile) {
  switch (tile) {
    case Sm90Tile::Large: return "128x128";
    case Sm90Tile::Narrow: return "128x64";
    case Sm90Tile::Small: return "64x64";
  }
  return "?";
}

struct ConvCall {
  DType dtype;
  int64_t n, h, w, c_in, c_out, kh, kw, stride, padding, h_out, w_out;
  bool aligned16;  // x, weight, y, residual (if any), scale and shift all start on 16-byte boundaries
};

struct GpuInfo {
  int cc_major, cc_minor, sm_count;
  bool sm90_built;  // the extension holds the sm_90a kernels
};

struct ConvPlan {
  ConvKernelKind kind;
  Sm90Tile tile;       // Sm90: the conv kernel's tile
  int splits;          // Sm90SplitK: CTAs per output tile, each over 1/splits of K
  const char* reason;  // why this kind: what the Sm90 path lacked, or "sm90" / "sm90 split-K"
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The Sm90 tile with the least estimated time for an M x Cout output on `sm_count` SMs.
inline Sm90Tile choose_sm90_tile(int64_t m, int64_t c_out, int sm_count, DType dtype) {
  const int64_t sms = sm_count > 0 ? sm_count : 1;
  Sm90Tile best = Sm90Tile::Large;
  double best_cost = 0.0;
  for (int t = 0; t < kSm90TileCount; ++t) {
    const Sm90Tile tile = static_cast<Sm90Tile>(t);
    const Sm90TileShape s = sm90_tile_shape(tile, dtype);
    const int64_t waves = ceil_div(ceil_div(m, s.m) * ceil_div(c_out, s.n), sms);
    const double cost = static_cast<double>(waves) * s.m * s.n / sm90_tile_rate(tile);
    if (t == 0 || cost < best_cost) {
      best = tile;
      best_cost = cost;
    }
  }
  return best;
}

// Why the Sm90 kernel cannot take this call on this GPU, or nullptr if it can.
inline const char* sm90_unsupported_reason(const ConvCall& c, const GpuInfo& gpu) {
  if (!gpu.sm90_built) return "the extension was built without the sm_90a kernels";
  if (gpu.cc_major != 9 || gpu.cc_minor != 0) return "the GPU is not compute capability 9.0";
  const int64_t vec = 16 / dtype_bytes(c.dtype);  // TMA moves 16-byte rows of channels
  if (c.c_in % vec != 0) return "C_in is not a multiple of 16 bytes";
  if (c.c_out % vec != 0) return "C_out is not a multiple of 16 bytes";
  if (!c.aligned16) return "a tensor is not 16-byte aligned";
  if (c.n * c.h_out * c.w_out > std::numeric_limits<int32_t>::max()) return "N*H_out*W_out exceeds 2^31 - 1";
  // TMA im2col box: corners in [-128, 127] (2-D), filter offsets below 255, traversal stride at most 8.
  const int64_t k_max = c.kh > c.kw ? c.kh : c.kw;
  if (c.padding > 128 || k_max - 1 - c.padding > 128) return "padding is outside the TMA im2col box limits";
  if (k_max > 255) return "the kernel is larger than TMA im2col offsets reach";
  if (c.stride > 8) return "stride exceeds TMA's traversal stride limit of 8";
  return nullptr;
}

// Split-K GEMM (sm90/gemm_sm90.cuh, fp16/bf16): 128x64 output tiles, each reduced by `splits` CTAs.
constexpr Sm90TileShape kSplitKTile{128, 64, 64};
constexpr int kSplitKMaxSplits = 16;
constexpr int64_t kSplitKMaxIm2colBytes = int64_t(64) << 20;  // the im2col copy of A a non-1x1 conv needs

// How many ways to split K, or 1 for none. Split where even the conv kernel's smallest tile leaves more than half
// of the SMs idle and K holds at least 8 blocks of 64: then enough splits to fill the SMs once, each keeping at
// least 4 K blocks (fewer would be mostly prologue and reduction), at most 16.
inline int choose_splits(const ConvCall& c, int sm_count) {
  if (c.dtype == DType::Float32) return 1;
  const int64_t m = c.n * c.h_out * c.w_out, k = c.kh * c.kw * c.c_in;
  const Sm90TileShape small = sm90_tile_shape(Sm90Tile::Small, c.dtype);
  const int64_t k_blocks = ceil_div(k, kSplitKTile.k);
  if (2 * ceil_div(m, small.m) * ceil_div(c.c_out, small.n) > sm_count || k_blocks < 8) return 1;
  const bool im2col = !(c.kh == 1 && c.kw == 1 && c.stride == 1 && c.padding == 0);
  if (im2col && m * k * dtype_bytes(c.dtype) > kSplitKMaxIm2colBytes) return 1;
  const int64_t tiles = ceil_div(m, kSplitKTile.m) * ceil_div(c.c_out, kSplitKTile.n);
  int64_t splits = sm_count / tiles;
  if (splits > k_blocks / 4) splits = k_blocks / 4;
  if (splits > kSplitKMaxSplits) splits = kSplitKMaxSplits;
  return splits >= 2 ? static_cast<int>(splits) : 1;
}

inline ConvPlan plan_conv(const ConvCall& c, const GpuInfo& gpu) {
  if (const char* reason = sm90_unsupported_reason(c, gpu)) {
    return {ConvKernelKind::Wmma, Sm90Tile::Large, 1, reason};
  }
  const Sm90Tile tile = choose_sm90_tile(c.n * c.h_out * c.w_out, c.c_out, gpu.sm_count, c.dtype);
  const int splits = choose_splits(c, gpu.sm_count);
  if (splits > 1) return {ConvKernelKind::Sm90SplitK, tile, splits, "sm90 split-K"};
  return {ConvKernelKind::Sm90, tile, 1, "sm90"};
}

}  // namespace cuda_kernels
}  // namespace resnet_fused
