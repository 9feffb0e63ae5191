// The CPU kernels of a ResNet's edges, over raw channels_last pointers (edges.cpp binds them to tensors):
//
//   max_pool:  y[n, oh, ow, c] = max over the window's taps of x[n, oh * sh - ph + dy, ow * sw - pw + dx, c]
//              (taps outside x skipped), NaN propagating; ties keep the earlier tap, as ATen's
//   mean_pool: y[n, c] = (sum_p x[n, p, c]) / pixels, fp32 sums in pixel order, then one division
//   linear:    y[r, j] = sum_k x[r, k] * w[j, k] + bias[j], fp32
//
// Each is one parallel pass, vectorized across channels (pooling, in vec_lanes.h's groups) or along k (linear);
// bf16/fp16 values are widened to fp32 and rounded once on store. A max is exact in any dtype, so pooled bf16/fp16
// values are x's own.
// linear is for few rows (a classifier at small batch), where reading w once dominates: each task takes kRowsW rows
// of w and runs every row of x against them, kRowsX at a time, with kRowsW x kRowsX vector sums in registers.
//
// This header is compiled once per instruction set (isa/edges_{default,avx2,avx512}.cpp, each with its own
// CPU_CAPABILITY), everything in that capability's inline namespace as at::vec does. Offsets are int64_t.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "edges_dispatch.h"
#include "vec_lanes.h"

namespace resnet_fused::cpu::edges {
inline namespace CPU_CAPABILITY {

using FVec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = FVec::size();
constexpr int64_t kRowsW = 4;       // rows of w per linear register tile
constexpr int64_t kRowsX = 2;       // rows of x per linear register tile: 8 sums, 4 w vectors and x's in 16 ymm
constexpr int64_t kTaskBytes = 32 * 1024;  // least input per parallel task
constexpr int64_t kMeanSpan = 512;         // channels per mean_pool task (their sums: 2 KiB)
constexpr int64_t kMeanTaskBytes = 1 << 20;  // input per mean_pool thread: one image of 2048 x 7 x 7 runs on one

// max(acc, v) as ATen's max pooling takes it: v where v > acc or v is NaN, else acc
inline FVec max_step(const FVec& acc, const FVec& v) { return FVec::blendv(acc, v, (v > acc) | v.isnan()); }

// out[c, ...) = the max over `count` taps for GROUPS groups of stored values, whole but the last (`last` values).
// Whole spans take two groups per pass over the taps: fp32's groups are one vector, and two ran 1.1x faster.
template <typename T, int GROUPS>
inline void max_window(const T* const* taps, size_t count, int64_t c, int64_t last, T* out) {
  using L = Lanes<T>;
  FVec acc[GROUPS * L::kParts], v[GROUPS * L::kParts];
  auto width = [&](int group) { return group + 1 < GROUPS ? L::kGroup : last; };
  for (int group = 0; group < GROUPS; ++group)
    L::load(taps[0] + c + group * L::kGroup, width(group), acc + group * L::kParts);
  for (size_t t = 1; t < count; ++t) {
    for (int group = 0; group < GROUPS; ++group) L::load(taps[t] + c + group * L::kGroup, width(group),
                                                         v + group * L::kParts);
    for (int i = 0; i < GROUPS * L::kParts; ++i) acc[i] = max_step(acc[i], v[i]);
  }
  for (int group = 0; group < GROUPS; ++group)
    L::store(out + c + group * L::kGroup, width(group), acc + group * L::kParts);
}

template <typename T>
void max_pool(const T* x, T* y, const PoolGeometry& g) {
  constexpr int64_t kGroup = Lanes<T>::kGroup;
  const int64_t c_all = g.channels, out_row = g.out_w * c_all;
  const int64_t grain = std::max<int64_t>(1, kTaskBytes / std::max<int64_t>(1, out_row * int64_t(sizeof(T))));
  at::parallel_for(0, g.batch * g.out_h, grain, [&](int64_t begin, int64_t end) {
    std::vector<const T*> taps(static_cast<size_t>(g.kernel_h * g.kernel_w));  // the window's pixels inside x
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.out_h, oh = row % g.out_h;
      const int64_t ih0 = oh * g.stride_h - g.pad_h;
      const int64_t h_lo = std::max<int64_t>(ih0, 0), h_hi = std::min(ih0 + g.kernel_h, g.in_h);
      for (int64_t ow = 0; ow < g.out_w; ++ow) {
        const int64_t iw0 = ow * g.stride_w - g.pad_w;
        const int64_t w_lo = std::max<int64_t>(iw0, 0), w_hi = std::min(iw0 + g.kernel_w, g.in_w);
        size_t count = 0;  // in window order, row by row: ties keep the earlier tap
        for (int64_t ih = h_lo; ih < h_hi; ++ih)
          for (int64_t iw = w_lo; iw < w_hi; ++iw) taps[count++] = x + ((n * g.in_h + ih) * g.in_w + iw) * c_all;
        T* out = y + row * out_row + ow * c_all;
        int64_t c = 0;
        for (; c + 2 * kGroup <= c_all; c += 2 * kGroup) max_window<T, 2>(taps.data(), count, c, kGroup, out);
        for (; c < c_all; c += kGroup) max_window<T, 1>(taps.data(), count, c, std::min(kGroup, c_all - c), out);
      }
    }
  });
}

template <typename T>
void mean_pool(const T* x, T* y, int64_t batch, int64_t pixels, int64_t channels) {
  // a task: one image's span of up to kMeanSpan channels, summed row by row (contiguous runs) into an L1 array
  using L = Lanes<T>;
  const int64_t spans = (channels + kMeanSpan - 1) / kMeanSpan;
  const FVec count(static_cast<float>(pixels));
  const int64_t task_bytes = pixels * kMeanSpan * int64_t(sizeof(T));
  const int64_t grain = std::max<int64_t>(1, kMeanTaskBytes / std::max<int64_t>(1, task_bytes));
  at::parallel_for(0, batch * spans, grain, [&](int64_t begin, int64_t end) {
    FVec sums[kMeanSpan / kLanes], v[L::kParts];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / spans, c0 = task % spans * kMeanSpan, width = std::min(kMeanSpan, channels - c0);
      const int64_t groups = (width + L::kGroup - 1) / L::kGroup;
      std::fill(sums, sums + groups * L::kParts, FVec(0.f));
      for (int64_t p = 0; p < pixels; ++p) {
        const T* row = x + (n * pixels + p) * channels + c0;
        for (int64_t i = 0; i < groups; ++i) {
          L::load(row + i * L::kGroup, std::min(L::kGroup, width - i * L::kGroup), v);
          FVec* group = sums + i * L::kParts;
          for (int part = 0; part < L::kParts; ++part) group[part] = group[part] + v[part];
        }
      }
      for (int64_t i = 0; i < groups * L::kParts; ++i) sums[i] = sums[i] / count;
      for (int64_t i = 0; i < groups; ++i)
        L::store(y + n * channels + c0 + i * L::kGroup, std::min(L::kGroup, width - i * L::kGroup),
                 sums + i * L::kParts);
    }
  });
}

// The ROWS_X x ROWS_W outputs y[i, r] of x's rows i and w's rows r (pointers at their first element).
template <int ROWS_X, int ROWS_W>
void linear_tile(const float* x, const float* w, const float* bias, float* y, int64_t k_all, int64_t ld_y) {
  FVec acc[ROWS_X][ROWS_W];
#pragma GCC unroll 8
  for (int i = 0; i < ROWS_X; ++i)
#pragma GCC unroll 8
    for (int r = 0; r < ROWS_W; ++r) acc[i][r] = FVec(0.f);
  int64_t k = 0;
  for (; k + kLanes <= k_all; k += kLanes) {
    FVec wv[ROWS_W];
#pragma GCC unroll 8
    for (int r = 0; r < ROWS_W; ++r) wv[r] = FVec::loadu(w + r * k_all + k);
#pragma GCC unroll 8
    for (int i = 0; i < ROWS_X; ++i) {
      const FVec xv = FVec::loadu(x + i * k_all + k);
#pragma GCC unroll 8
      for (int r = 0; r < ROWS_W; ++r) acc[i][r] = at::vec::fmadd(xv, wv[r], acc[i][r]);
    }
  }
  for (int i = 0; i < ROWS_X; ++i)
    for (int r = 0; r < ROWS_W; ++r) {
      float s = at::vec::vec_reduce_all<float>([](FVec& a, FVec& b) { return a + b; }, acc[i][r]);
      for (int64_t t = k; t < k_all; ++t) s += x[i * k_all + t] * w[r * k_all + t];
      y[i * ld_y + r] = bias ? s + bias[r] : s;
    }
}

template <int ROWS_W>
void linear_rows_w(const float* x, const float* w, const float* bias, float* y, int64_t rows, int64_t k_all,
                   int64_t ld_y) {
  int64_t i = 0;
  for (; i + kRowsX <= rows; i += kRowsX)
    linear_tile<kRowsX, ROWS_W>(x + i * k_all, w, bias, y + i * ld_y, k_all, ld_y);
  for (; i < rows; ++i) linear_tile<1, ROWS_W>(x + i * k_all, w, bias, y + i * ld_y, k_all, ld_y);
}

inline void linear(const float* x, const float* w, const float* bias, float* y, int64_t rows, int64_t in_features,
                   int64_t out_features) {
  const int64_t blocks = (out_features + kRowsW - 1) / kRowsW;
  const int64_t grain = std::max<int64_t>(1, kTaskBytes / std::max<int64_t>(1, kRowsW * in_features * 4));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t j = block * kRowsW, left = std::min(kRowsW, out_features - j);
      const float* wj = w + j * in_features;
      const float* bj = bias ? bias + j : nullptr;
      switch (left) {
        case 4: linear_rows_w<4>(x, wj, bj, y + j, rows, in_features, out_features); break;
        case 3: linear_rows_w<3>(x, wj, bj, y + j, rows, in_features, out_features); break;
        case 2: linear_rows_w<2>(x, wj, bj, y + j, rows, in_features, out_features); break;
        default: linear_rows_w<1>(x, wj, bj, y + j, rows, in_features, out_features); break;
      }
    }
  });
}

template <typename F>
void with_dtype(c10::ScalarType dtype, F&& f) {
  switch (dtype) {
    case c10::ScalarType::BFloat16: return f(c10::BFloat16());
    case c10::ScalarType::Half: return f(c10::Half());
    default: return f(float());
  }
}

inline Kernels capability_kernels() {
  Kernels k;
  k.max_pool = [](c10::ScalarType dtype, const void* x, void* y, const PoolGeometry& g) {
    with_dtype(dtype, [&](auto tag) {
      using T = decltype(tag);
      max_pool(static_cast<const T*>(x), static_cast<T*>(y), g);
    });
  };
  k.mean_pool = [](c10::ScalarType dtype, const void* x, void* y, int64_t batch, int64_t pixels, int64_t channels) {
    with_dtype(dtype, [&](auto tag) {
      using T = decltype(tag);
      mean_pool(static_cast<const T*>(x), static_cast<T*>(y), batch, pixels, channels);
    });
  };
  k.linear = &linear;
  return k;
}

}  // namespace CPU_CAPABILITY
}  // namespace resnet_fused::cpu::edges
