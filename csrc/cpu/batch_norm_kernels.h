// Training BatchNorm's three passes on the CPU, over raw pointers (resnet_fused/ops/batch_norm_reference.py has
// the math; batch_norm.cpp binds them to tensors). M = N*H*W values per channel c, arithmetic in fp32, chunk
// results combined in fp64:
//
//   stats:    mean[c] = sum y / M,  var[c] = sum (y - mean)^2 / M   (biased)
//   apply:    xhat = (y - mean[c]) * invstd[c];  z = xhat * weight[c] + bias[c] (+ residual);  out = relu?(z)
//   backward: g = grad_out, zeroed where z <= 0 if relu (NaN passes, as threshold_backward);  grad_residual = g;
//             grad_bias = sum g;  grad_weight = sum g * xhat;
//             grad_y = weight[c] * invstd[c] * (g - (grad_bias / M + xhat * (grad_weight / M)))
//
// Both layouts: NCHW (channel c is N planes of H*W contiguous values) and channels_last (M rows of C values).
// z is computed in the reference's order of operations, centered before scaled, without fused multiply-adds
// (setup.py compiles these files with -ffp-contract=off), so it is bitwise the reference's, and the ReLU mask that
// backward recomputes is the one the forward applied.
//
// Statistics read y once; backward reads its inputs twice (a reduction, then the elementwise grad_y; with a
// residual and ReLU the reduction writes g, which the second pass reads in place of grad_out and the residual).
// Reductions work per chunk, small enough to stay cached: in NCHW some planes (or a piece of one) of one channel, in
// channels_last a strip of rows up to kSpanChannels channels wide, read row by row (contiguous runs, which the
// hardware prefetcher follows; a strip one vector wide, 1 KiB apart per row, ran the backward's reduction at half
// eager's speed), summed into per-channel arrays. Statistics read a chunk twice while it is cached: first
// for a provisional mean m0, then for the centered sums s1 = sum (y - m0) and s2 = sum (y - m0)^2, which give the
// chunk's mean m0 + s1/n and M2 = s2 - s1^2/n even where |mean| >> std (a chunk whose fp32 sums are not finite is
// redone in fp64). Chunks are combined in a fixed order in fp64 (statistics: the count-weighted mean of chunk means,
// then M2 = sum of M2_k + n_k (mean_k - mean)^2; backward: sums), so results do not depend on the thread count.
// Accumulations run kChains independent vector sums, so that an add's latency does not bound them.
//
// This header is compiled once per instruction set (isa/batch_norm_{default,avx2,avx512}.cpp, each with its own
// CPU_CAPABILITY), everything in that capability's inline namespace as at::vec does, so the copies never meet at
// link time. Offsets are int64_t: tensors may exceed 2^31 elements.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "batch_norm_dispatch.h"
#include "vec_lanes.h"

namespace resnet_fused::cpu::batch_norm {
inline namespace CPU_CAPABILITY {

using FVec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = FVec::size();
constexpr int64_t kMaxGroup = 2 * kLanes;
constexpr int64_t kChunkValues = 4096;     // values per NCHW chunk (16 KiB of fp32)
constexpr int64_t kStripRows = 128;        // rows per channels_last chunk
constexpr int64_t kSpanChannels = 256;     // channels per channels_last chunk (its sums: one L1-resident array each)
constexpr int64_t kTaskBytes = 64 * 1024;  // least input per parallel task
constexpr int kChains = 4;                 // independent accumulators per reduction

// Groups per unrolled step: kChains accumulators in all, kParts per group.
template <typename T>
constexpr int kUnroll = kChains / Lanes<T>::kParts;

// f(u, j) for j in [0, n), with u = j % kU a compile-time constant (so that acc[u] is a register) in the main body.
template <int kU, typename F>
inline void unrolled(int64_t n, const F& f) {
  int64_t j = 0;
  for (; j + kU <= n; j += kU) {
    [&]<int... u>(std::integer_sequence<int, u...>) {
      (f(std::integral_constant<int, u>{}, j + u), ...);
    }(std::make_integer_sequence<int, kU>{});
  }
  for (; j < n; ++j) f(std::integral_constant<int, 0>{}, j);
}

// Vectors of `kN` accumulators each `kParts` wide, all zero.
template <int kN>
struct Accumulators {
  FVec v[kN];
  Accumulators() { std::fill(v, v + kN, FVec(0.f)); }
  FVec& operator[](int i) { return v[i]; }
  // The sum of accumulators {part, part + kStep, ...}: one vector per part.
  FVec sum(int part, int step) const {
    FVec s = v[part];
    for (int i = part + step; i < kN; i += step) s = s + v[i];
    return s;
  }
};

inline FVec first_lanes(FVec v, int64_t count) {  // lanes from `count` on zeroed
  return count >= kLanes ? v : FVec::set(FVec(0.f), v, std::max<int64_t>(count, 0));
}
inline float lane_sum(FVec v) {
  return at::vec::vec_reduce_all<float>([](const FVec& a, const FVec& b) { return a + b; }, v);
}
inline void store_lanes(float* dst, int64_t count, FVec v) {
  if (count >= kLanes) {
    v.store(dst);
  } else if (count > 0) {
    v.store(dst, static_cast<int>(count));
  }
}

// ---- per-channel values ------------------------------------------------------------------------------------------

enum Row { kMean, kInvstd, kWeight, kBias, kCoef, kMeanGradBias, kMeanGradWeight, kRows };

// The kernels' per-channel fp32 vectors (one Row each), padded with zeros to whole groups so that a partial group
// of channels reads them with full-width loads.
class ChannelTable {
 public:
  ChannelTable(const ChannelParams& p, int64_t channels)
      : stride_((channels + kMaxGroup - 1) / kMaxGroup * kMaxGroup), values_(kRows * stride_, 0.f) {
    fill(kMean, p.mean, channels, 0.f);
    fill(kInvstd, p.invstd, channels, 0.f);
    fill(kWeight, p.weight, channels, 1.f);
    fill(kBias, p.bias, channels, 0.f);
  }
  float* row(Row r) { return values_.data() + r * stride_; }
  const float* row(Row r) const { return values_.data() + r * stride_; }
  int64_t stride() const { return stride_; }

 private:
  void fill(Row r, const float* src, int64_t channels, float fallback) {
    for (int64_t c = 0; c < channels; ++c) row(r)[c] = src ? src[c] : fallback;
  }
  int64_t stride_;
  std::vector<float> values_;
};

// What a group reads from the table: one channel's values, broadcast (NCHW), or one value per lane from channel c0
// on (channels_last). `lane` is the offset of the group's part, 0 or kLanes.
// (Broadcast on use: a pass reads 4-5 of the rows, and the compiler hoists the broadcasts out of its loops; building
// all of them per plane cost more than a 4x4 plane's own arithmetic.)
struct OneChannel {
  OneChannel(const ChannelTable& t, int64_t c) : base(t.row(kMean) + c), stride(t.stride()) {}
  FVec operator()(Row r, int64_t) const { return FVec(base[r * stride]); }
  const float* base;
  int64_t stride;
};
struct LaneChannels {
  LaneChannels(const ChannelTable& t, int64_t c0) : base(t.row(kMean) + c0), stride(t.stride()) {}
  FVec operator()(Row r, int64_t lane) const { return FVec::loadu(base + r * stride + lane); }
  const float* base;
  int64_t stride;
};

template <typename Sel>
inline FVec normalized(FVec y, const Sel& s, int64_t lane) {
  return (y - s(kMean, lane)) * s(kInvstd, lane);
}
template <typename Sel>
inline FVec scaled_shifted(FVec xhat, const Sel& s, int64_t lane) {
  return xhat * s(kWeight, lane) + s(kBias, lane);
}
inline FVec relu_keep_nan(FVec z) { return FVec::blendv(z, FVec(0.f), z < FVec(0.f)); }
// ReLU's backward as threshold_backward: the gradient passes where not (z <= 0), so a NaN z passes it.
inline FVec relu_grad(FVec z, FVec g) { return FVec::blendv(g, FVec(0.f), z <= FVec(0.f)); }

// ---- iteration ---------------------------------------------------------------------------------------------------

inline int64_t grain_for(int64_t bytes_per_item) {
  return std::max<int64_t>(1, kTaskBytes / std::max<int64_t>(bytes_per_item, 1));
}

// The elementwise passes: body(offset, count, select) over every group of every NCHW plane or channels_last row,
// in parallel; select reads the table for the group's channels.
template <typename T, typename Body>
void for_each_group(const Geometry& g, const ChannelTable& t, const Body& body) {
  const int64_t length = g.channels_last ? g.channels : g.plane;
  const int64_t spans = g.channels_last ? g.batch * g.plane : g.batch * g.channels;
  if (length == 0 || spans == 0) return;
  constexpr int64_t kGroup = Lanes<T>::kGroup;
  at::parallel_for(0, spans, grain_for(length * sizeof(T)), [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const int64_t offset = s * length;
      if (g.channels_last) {
        for (int64_t i = 0; i < length; i += kGroup) body(offset + i, std::min(kGroup, length - i), LaneChannels(t, i));
      } else {
        const OneChannel select(t, s % g.channels);
        for (int64_t i = 0; i < length; i += kGroup) body(offset + i, std::min(kGroup, length - i), select);
      }
    }
  });
}

// How the reductions cut a tensor into chunks, and the fixed order in which a channel's chunks combine.
// NCHW: a chunk is `planes` consecutive planes of one channel (or, for planes larger than a chunk, a piece of one),
// values [first, first + length) of each. channels_last: a chunk is a strip, kStripRows rows (fewer in the last
// block) by kSpanChannels channels (fewer in the last span); its results go to slot block * C + c.
struct Chunking {
  explicit Chunking(const Geometry& g) : g(g), group(kSpanChannels) {
    if (g.channels_last) {
      blocks = (g.batch * g.plane + kStripRows - 1) / kStripRows;
      strips = (g.channels + group - 1) / group;
    } else {
      pieces = std::max<int64_t>(1, (g.plane + kChunkValues - 1) / kChunkValues);
      planes = pieces > 1 ? 1 : std::max<int64_t>(1, kChunkValues / std::max<int64_t>(g.plane, 1));
      plane_blocks = (g.batch + planes - 1) / planes;
    }
  }
  int64_t chunks() const { return g.channels_last ? blocks * strips : g.channels * per_channel(); }
  int64_t per_channel() const { return g.channels_last ? blocks : plane_blocks * pieces; }
  int64_t slots() const { return g.channels_last ? blocks * g.channels : chunks(); }
  int64_t slot(int64_t c, int64_t k) const { return g.channels_last ? k * g.channels + c : c * per_channel() + k; }
  // Values of channel c in its k-th chunk.
  int64_t count(int64_t k) const {
    if (g.channels_last) return std::min(kStripRows, g.batch * g.plane - k * kStripRows);
    const int64_t n0 = (k / pieces) * planes, p = k % pieces;
    return std::min(planes, g.batch - n0) * std::min(kChunkValues, g.plane - p * kChunkValues);
  }

  Geometry g;
  int64_t group;
  int64_t blocks = 0, strips = 0;                   // channels_last
  int64_t pieces = 0, planes = 0, plane_blocks = 0;  // NCHW
};

// An NCHW chunk: `planes` segments of `length` values, `stride` apart, from `first` on; all of channel c.
struct PlaneChunk {
  int64_t channel, first, planes, length, stride;
};
// A channels_last chunk: `rows` rows `stride` apart from `first` on, `channels` channels from c0 on.
struct StripChunk {
  int64_t c0, channels, first, rows, stride;
};

// Calls plane(PlaneChunk, slot) or strip(StripChunk, slot of c0) for every chunk, in parallel.
template <typename T, typename Plane, typename Strip>
void for_each_chunk(const Chunking& ch, const Plane& plane, const Strip& strip) {
  const Geometry& g = ch.g;
  if (ch.chunks() == 0) return;
  if (g.channels_last) {
    at::parallel_for(0, ch.chunks(), grain_for(kStripRows * ch.group * sizeof(T)), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t block = t / ch.strips, c0 = (t % ch.strips) * ch.group;
        strip(StripChunk{c0, std::min(ch.group, g.channels - c0), block * kStripRows * g.channels + c0,
                         ch.count(block), g.channels},
              block * g.channels + c0);
      }
    });
  } else {
    const int64_t values = std::min(ch.planes * g.plane, kChunkValues);
    at::parallel_for(0, ch.chunks(), grain_for(values * sizeof(T)), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t c = t / ch.per_channel(), k = t % ch.per_channel();
        const int64_t n0 = (k / ch.pieces) * ch.planes, p = k % ch.pieces;
        const int64_t offset = p * kChunkValues;
        plane(PlaneChunk{c, (n0 * g.channels + c) * g.plane + offset, std::min(ch.planes, g.batch - n0),
                         std::min(kChunkValues, g.plane - offset), g.channels * g.plane},
              t);
      }
    });
  }
}

// f(u, offset, count) over the groups of a plane chunk, u a compile-time accumulator index.
template <typename T, typename F>
inline void plane_groups(const PlaneChunk& ch, const F& f) {
  constexpr int64_t kGroup = Lanes<T>::kGroup;
  const int64_t full = ch.length / kGroup, tail = ch.length % kGroup;
  for (int64_t n = 0; n < ch.planes; ++n) {
    const int64_t base = ch.first + n * ch.stride;
    unrolled<kUnroll<T>>(full, [&](auto u, int64_t j) { f(u, base + j * kGroup, kGroup); });
    if (tail) f(std::integral_constant<int, 0>{}, base + full * kGroup, tail);
  }
}
// f(j, offset, count) over the rows of a strip chunk, row by row, j the group's index in the strip (its place in
// the strip's per-channel arrays: channels j * kGroup on).
template <typename T, typename F>
inline void strip_groups(const StripChunk& ch, const F& f) {
  constexpr int64_t kGroup = Lanes<T>::kGroup;
  for (int64_t r = 0; r < ch.rows; ++r) {
    const int64_t base = ch.first + r * ch.stride;
    for (int64_t j = 0; j * kGroup < ch.channels; ++j) {
      f(j, base + j * kGroup, std::min(kGroup, ch.channels - j * kGroup));
    }
  }
}

// Per-channel fp32 sums of one strip (kSpanChannels wide), zeroed; `add` adds a group's parts at its index.
struct StripSums {
  alignas(64) float v[kSpanChannels] = {};
  template <int kParts>
  void add(int64_t j, const FVec* parts) {
    for (int k = 0; k < kParts; ++k) {
      float* at = v + (j * kParts + k) * kLanes;
      (FVec::loadu(at) + parts[k]).store(at);
    }
  }
};

// ---- stats -------------------------------------------------------------------------------------------------------

// Mean and M2 of `segments` runs of `length` values, `stride` apart from `first` on, in fp64: the path of a chunk
// whose fp32 sums are not finite (values near fp32's limit, inf or NaN), where it gives eager's mean (inf for a
// channel holding +inf, a finite mean for finite values whose fp32 sum overflows).
template <typename T>
void exact_moments(const T* y, int64_t first, int64_t segments, int64_t length, int64_t stride, double* mean,
                   double* m2) {
  double sum = 0, squares = 0;
  for (int64_t n = 0; n < segments; ++n) {
    for (int64_t i = 0; i < length; ++i) sum += static_cast<double>(y[first + n * stride + i]);
  }
  const double mu = sum / static_cast<double>(segments * length);
  for (int64_t n = 0; n < segments; ++n) {
    for (int64_t i = 0; i < length; ++i) {
      const double d = static_cast<double>(y[first + n * stride + i]) - mu;
      squares += d * d;
    }
  }
  *mean = mu;
  *m2 = squares;
}

// Mean and M2 of one NCHW chunk.
template <typename T>
void plane_moments(const T* y, const PlaneChunk& ch, double* mean, double* m2) {
  using L = Lanes<T>;
  constexpr int kN = kUnroll<T> * L::kParts;
  Accumulators<kN> sum, s1, s2;
  plane_groups<T>(ch, [&](auto u, int64_t at, int64_t count) {
    FVec v[L::kParts];
    L::load(y + at, count, v);  // missing lanes load 0: they add nothing
    for (int k = 0; k < L::kParts; ++k) sum[u * L::kParts + k] = sum[u * L::kParts + k] + v[k];
  });
  const double n = static_cast<double>(ch.planes * ch.length);
  const float m0 = static_cast<float>(lane_sum(sum.sum(0, 1)) / n);
  const FVec m0v(m0);
  plane_groups<T>(ch, [&](auto u, int64_t at, int64_t count) {
    FVec v[L::kParts];
    L::load(y + at, count, v);
    for (int k = 0; k < L::kParts; ++k) {
      const FVec d = first_lanes(v[k] - m0v, count - k * kLanes);
      const int a = u * L::kParts + k;
      s1[a] = s1[a] + d;
      s2[a] = at::vec::fmadd(d, d, s2[a]);
    }
  });
  const double c1 = lane_sum(s1.sum(0, 1)), c2 = lane_sum(s2.sum(0, 1));
  if (!std::isfinite(m0) || !std::isfinite(c2)) {
    return exact_moments(y, ch.first, ch.planes, ch.length, ch.stride, mean, m2);
  }
  *mean = m0 + c1 / n;
  *m2 = c2 - c1 * c1 / n;
}

// Mean and M2 per channel of one channels_last chunk.
template <typename T>
void strip_moments(const T* y, const StripChunk& ch, double* mean, double* m2) {
  using L = Lanes<T>;
  StripSums sum, s1, s2;
  strip_groups<T>(ch, [&](int64_t j, int64_t at, int64_t count) {
    FVec v[L::kParts];
    L::load(y + at, count, v);
    sum.add<L::kParts>(j, v);
  });
  alignas(64) float m0[kSpanChannels];
  const FVec n(static_cast<float>(ch.rows));
  for (int64_t i = 0; i < kSpanChannels; i += kLanes) (FVec::loadu(sum.v + i) / n).store(m0 + i);
  strip_groups<T>(ch, [&](int64_t j, int64_t at, int64_t count) {
    FVec v[L::kParts], d[L::kParts], dd[L::kParts];
    L::load(y + at, count, v);  // missing lanes: v = 0 = m0
    for (int k = 0; k < L::kParts; ++k) {
      d[k] = v[k] - FVec::loadu(m0 + (j * L::kParts + k) * kLanes);
      dd[k] = d[k] * d[k];
    }
    s1.add<L::kParts>(j, d);
    s2.add<L::kParts>(j, dd);
  });
  const double rows = static_cast<double>(ch.rows);
  for (int64_t j = 0; j < ch.channels; ++j) {
    if (!std::isfinite(m0[j]) || !std::isfinite(s2.v[j])) {
      exact_moments(y, ch.first + j, ch.rows, 1, ch.stride, mean + j, m2 + j);
    } else {
      const double c1 = s1.v[j];
      mean[j] = m0[j] + c1 / rows;
      m2[j] = s2.v[j] - c1 * c1 / rows;
    }
  }
}

template <typename T>
void stats(const T* y, const Geometry& g, float* mean, float* var) {
  if (g.per_channel() == 0) {  // as torch.var_mean over no values
    std::fill(mean, mean + g.channels, std::numeric_limits<float>::quiet_NaN());
    std::fill(var, var + g.channels, std::numeric_limits<float>::quiet_NaN());
    return;
  }
  const Chunking ch(g);
  std::vector<double> chunk_mean(ch.slots()), chunk_m2(ch.slots());
  for_each_chunk<T>(
      ch, [&](const PlaneChunk& c, int64_t slot) { plane_moments(y, c, &chunk_mean[slot], &chunk_m2[slot]); },
      [&](const StripChunk& c, int64_t slot) { strip_moments(y, c, &chunk_mean[slot], &chunk_m2[slot]); });
  // Per channel: the mean of the chunk means weighted by their counts, then M2 = sum over chunks of
  // M2_k + n_k * (mean_k - mean)^2 (exact), in fp64 and in chunk order.
  at::parallel_for(0, g.channels, grain_for(ch.per_channel() * 64), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double sum = 0;
      for (int64_t k = 0; k < ch.per_channel(); ++k) sum += chunk_mean[ch.slot(c, k)] * ch.count(k);
      const double count = static_cast<double>(g.per_channel()), mu = sum / count;
      double m2 = 0;
      for (int64_t k = 0; k < ch.per_channel(); ++k) {
        const double d = chunk_mean[ch.slot(c, k)] - mu;
        m2 += chunk_m2[ch.slot(c, k)] + d * d * ch.count(k);
      }
      mean[c] = static_cast<float>(mu);
      var[c] = static_cast<float>(std::max(m2, 0.0) / count);
    }
  });
}

// ---- apply -------------------------------------------------------------------------------------------------------

template <typename T, bool kResidual, bool kRelu>
void apply_kernel(const T* y, const T* residual, T* out, const Geometry& g, const ChannelTable& t) {
  using L = Lanes<T>;
  for_each_group<T>(g, t, [&](int64_t at, int64_t count, const auto& s) {
    FVec v[L::kParts], r[L::kParts];
    L::load(y + at, count, v);
    if constexpr (kResidual) L::load(residual + at, count, r);
    for (int k = 0; k < L::kParts; ++k) {
      FVec z = scaled_shifted(normalized(v[k], s, k * kLanes), s, k * kLanes);
      if constexpr (kResidual) z = z + r[k];
      v[k] = kRelu ? relu_keep_nan(z) : z;
    }
    L::store(out + at, count, v);
  });
}

template <typename T>
void apply(const T* y, const T* residual, T* out, const Geometry& g, const ChannelParams& p, bool relu) {
  const ChannelTable t(p, g.channels);
  if (residual) {
    relu ? apply_kernel<T, true, true>(y, residual, out, g, t) : apply_kernel<T, true, false>(y, residual, out, g, t);
  } else {
    relu ? apply_kernel<T, false, true>(y, nullptr, out, g, t) : apply_kernel<T, false, false>(y, nullptr, out, g, t);
  }
}

// ---- backward ----------------------------------------------------------------------------------------------------

// g (zeroed where z <= 0 if kRelu; z includes the residual if kResidual) and xhat of the group at `at`; g is
// stored to grad_residual when that is given.
template <typename T, bool kRelu, bool kResidual, typename Sel>
inline void grad_terms(const T* grad_out, const T* y, const T* residual, T* grad_residual, int64_t at, int64_t count,
                       const Sel& s, FVec* g, FVec* xhat) {
  using L = Lanes<T>;
  FVec v[L::kParts], r[L::kParts];
  L::load(grad_out + at, count, g);
  L::load(y + at, count, v);
  if constexpr (kResidual) L::load(residual + at, count, r);
  for (int k = 0; k < L::kParts; ++k) {
    xhat[k] = normalized(v[k], s, k * kLanes);
    if constexpr (kRelu) {
      FVec z = scaled_shifted(xhat[k], s, k * kLanes);
      if constexpr (kResidual) z = z + r[k];
      g[k] = relu_grad(z, g[k]);
    }
  }
  if (grad_residual) L::store(grad_residual + at, count, g);
}

// Pass 1: per-chunk sums of g and g * xhat (grad_residual = g on the way), combined per channel in a fixed order.
template <typename T, bool kRelu, bool kResidual>
void grad_sums(const T* grad_out, const T* y, const T* residual, T* grad_residual, const Geometry& g,
               const ChannelTable& t, float* grad_weight, float* grad_bias) {
  using L = Lanes<T>;
  constexpr int kN = kUnroll<T> * L::kParts;
  const Chunking ch(g);
  std::vector<double> sum_g(ch.slots()), sum_gx(ch.slots());
  auto accumulate = [&](const auto& select, Accumulators<kN>& acc_g, Accumulators<kN>& acc_gx, auto u, int64_t at,
                        int64_t count) {
    FVec gv[L::kParts], xhat[L::kParts];
    grad_terms<T, kRelu, kResidual>(grad_out, y, residual, grad_residual, at, count, select, gv, xhat);
    for (int k = 0; k < L::kParts; ++k) {  // missing lanes: g = 0, but xhat = -mean * invstd: mask g * xhat
      const int a = u * L::kParts + k;
      acc_g[a] = acc_g[a] + gv[k];
      acc_gx[a] = acc_gx[a] + first_lanes(gv[k] * xhat[k], count - k * kLanes);
    }
  };
  for_each_chunk<T>(
      ch,
      [&](const PlaneChunk& c, int64_t slot) {
        const OneChannel select(t, c.channel);
        Accumulators<kN> acc_g, acc_gx;
        plane_groups<T>(c, [&](auto u, int64_t at, int64_t count) { accumulate(select, acc_g, acc_gx, u, at, count); });
        sum_g[slot] = lane_sum(acc_g.sum(0, 1));
        sum_gx[slot] = lane_sum(acc_gx.sum(0, 1));
      },
      [&](const StripChunk& c, int64_t slot) {
        StripSums acc_g, acc_gx;
        strip_groups<T>(c, [&](int64_t j, int64_t at, int64_t count) {
          const LaneChannels select(t, c.c0 + j * L::kGroup);
          FVec gv[L::kParts], xhat[L::kParts];
          grad_terms<T, kRelu, kResidual>(grad_out, y, residual, grad_residual, at, count, select, gv, xhat);
          for (int k = 0; k < L::kParts; ++k) xhat[k] = gv[k] * xhat[k];  // lanes past the strip: never read
          acc_g.add<L::kParts>(j, gv);
          acc_gx.add<L::kParts>(j, xhat);
        });
        for (int64_t j = 0; j < c.channels; ++j) sum_g[slot + j] = acc_g.v[j], sum_gx[slot + j] = acc_gx.v[j];
      });
  at::parallel_for(0, g.channels, grain_for(ch.per_channel() * 32), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double a = 0, b = 0;
      for (int64_t k = 0; k < ch.per_channel(); ++k) a += sum_g[ch.slot(c, k)], b += sum_gx[ch.slot(c, k)];
      grad_bias[c] = static_cast<float>(a);
      grad_weight[c] = static_cast<float>(b);
    }
  });
}

// Pass 2: grad_y = coef * (g - (mean_grad_bias + xhat * mean_grad_weight)), g read from `g_source` (grad_out, or
// pass 1's masked g) and masked here if kMask.
template <typename T, bool kMask>
void grad_input(const T* g_source, const T* y, T* grad_y, const Geometry& g, const ChannelTable& t) {
  using L = Lanes<T>;
  for_each_group<T>(g, t, [&](int64_t at, int64_t count, const auto& s) {
    FVec gv[L::kParts], xhat[L::kParts];
    grad_terms<T, kMask, false>(g_source, y, nullptr, nullptr, at, count, s, gv, xhat);
    for (int k = 0; k < L::kParts; ++k) {
      const int64_t lane = k * kLanes;
      gv[k] = s(kCoef, lane) * (gv[k] - (s(kMeanGradBias, lane) + xhat[k] * s(kMeanGradWeight, lane)));
    }
    L::store(grad_y + at, count, gv);
  });
}

template <typename T>
void backward(const T* grad_out, const T* y, const T* residual, T* grad_y, T* grad_residual, const Geometry& g,
              const ChannelParams& p, bool relu, float* grad_weight, float* grad_bias) {
  ChannelTable t(p, g.channels);
  const bool masked_residual = relu && residual;
  if (masked_residual) {
    grad_sums<T, true, true>(grad_out, y, residual, grad_residual, g, t, grad_weight, grad_bias);
  } else if (relu) {
    grad_sums<T, true, false>(grad_out, y, nullptr, nullptr, g, t, grad_weight, grad_bias);
  } else {
    grad_sums<T, false, false>(grad_out, y, nullptr, grad_residual, g, t, grad_weight, grad_bias);
  }
  const float inv_m = g.per_channel() > 0 ? 1.f / static_cast<float>(g.per_channel()) : 0.f;
  for (int64_t c = 0; c < g.channels; ++c) {
    t.row(kCoef)[c] = t.row(kWeight)[c] * t.row(kInvstd)[c];
    t.row(kMeanGradBias)[c] = grad_bias[c] * inv_m;
    t.row(kMeanGradWeight)[c] = grad_weight[c] * inv_m;
  }
  if (masked_residual) {
    grad_input<T, false>(grad_residual, y, grad_y, g, t);  // g, already masked
  } else if (relu) {
    grad_input<T, true>(grad_out, y, grad_y, g, t);
  } else {
    grad_input<T, false>(grad_out, y, grad_y, g, t);
  }
}

// ---- entry points ------------------------------------------------------------------------------------------------

template <typename Fn>
void with_storage(Storage storage, const Fn& fn) {
  switch (storage) {
    case Storage::Float32: return fn(float{});
    case Storage::BFloat16: return fn(c10::BFloat16{});
    case Storage::Float16: return fn(c10::Half{});
  }
}

inline Kernels capability_kernels() {
  Kernels k;
  k.stats = [](Storage storage, const void* y, const Geometry& g, float* mean, float* var) {
    with_storage(storage, [&](auto tag) {
      using T = decltype(tag);
      stats(static_cast<const T*>(y), g, mean, var);
    });
  };
  k.apply = [](Storage storage, const void* y, const void* residual, void* out, const Geometry& g,
               const ChannelParams& p, bool relu) {
    with_storage(storage, [&](auto tag) {
      using T = decltype(tag);
      apply(static_cast<const T*>(y), static_cast<const T*>(residual), static_cast<T*>(out), g, p, relu);
    });
  };
  k.backward = [](Storage storage, const void* grad_out, const void* y, const void* residual, void* grad_y,
                  void* grad_residual, const Geometry& g, const ChannelParams& p, bool relu, float* grad_weight,
                  float* grad_bias) {
    with_storage(storage, [&](auto tag) {
      using T = decltype(tag);
      backward(static_cast<const T*>(grad_out), static_cast<const T*>(y), static_cast<const T*>(residual),
               static_cast<T*>(grad_y), static_cast<T*>(grad_residual), g, p, relu, grad_weight, grad_bias);
    });
  };
  return k;
}

}  // namespace CPU_CAPABILITY
}  // namespace resnet_fused::cpu::batch_norm
