// The fused elementwise epilogue on the CPU, one parallel, vectorized pass over channels_last memory:
//
//   out[r, c] = act( x[r, c] * scale[c] + shift[c] + residual[r, c] )      r = (n, h, w) row, c = channel
//
// where scale / shift / residual are each optional (nullptr = 1 / 0 / 0) and act is ReLU or identity.
// Arithmetic is fp32 whatever the storage type (bf16/fp16 are widened on load and rounded once on store).
// Offsets are int64_t: tensors may exceed 2^31 elements.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>

namespace resnet_fused::cpu {

using FVec = at::vec::Vectorized<float>;

// One fp32 vector of the epilogue: scale/shift come from `c`, x/residual are already widened.
inline FVec epilogue_vec(FVec v, const float* scale, const float* shift, const FVec* res, bool relu) {
  if (scale) v = v * FVec::loadu(scale);
  if (shift) v = v + FVec::loadu(shift);
  if (res) v = v + *res;
  if (relu) v = at::vec::clamp_min(v, FVec(0.f));
  return v;
}

// n contiguous elements starting at x/res/out; scale/shift (if given) are aligned with them element for element.
template <typename scalar_t>
void epilogue_span(const scalar_t* x, const float* scale, const float* shift, const scalar_t* res, scalar_t* out,
                   int64_t n, bool relu) {
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (; i + FVec::size() <= n; i += FVec::size()) {
      FVec r = res ? FVec::loadu(res + i) : FVec(0.f);
      FVec v = epilogue_vec(FVec::loadu(x + i), scale ? scale + i : nullptr, shift ? shift + i : nullptr,
                            res ? &r : nullptr, relu);
      v.store(out + i);
    }
  } else {
    using SVec = at::vec::Vectorized<scalar_t>;  // twice as many lanes as FVec
    constexpr int64_t kF = FVec::size();
    for (; i + SVec::size() <= n; i += SVec::size()) {
      auto [x0, x1] = at::vec::convert_to_float<scalar_t>(SVec::loadu(x + i));
      FVec r0(0.f), r1(0.f);
      if (res) std::tie(r0, r1) = at::vec::convert_to_float<scalar_t>(SVec::loadu(res + i));
      FVec y0 = epilogue_vec(x0, scale ? scale + i : nullptr, shift ? shift + i : nullptr, res ? &r0 : nullptr, relu);
      FVec y1 = epilogue_vec(x1, scale ? scale + i + kF : nullptr, shift ? shift + i + kF : nullptr,
                             res ? &r1 : nullptr, relu);
      at::vec::convert_from_float<scalar_t>(y0, y1).store(out + i);
    }
  }
  for (; i < n; ++i) {  // tail
    float v = static_cast<float>(x[i]);
    if (scale) v *= scale[i];
    if (shift) v += shift[i];
    if (res) v += static_cast<float>(res[i]);
    if (relu) v = std::max(v, 0.f);
    out[i] = static_cast<scalar_t>(v);
  }
}

// Rows of `channels` elements each (channels_last: one row per pixel), per-channel scale/shift.
template <typename scalar_t>
void epilogue_rows(const scalar_t* x, const float* scale, const float* shift, const scalar_t* res, scalar_t* out,
                   int64_t rows, int64_t channels, bool relu) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(channels, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t off = r * channels;
      epilogue_span<scalar_t>(x + off, scale, shift, res ? res + off : nullptr, out + off, channels, relu);
    }
  });
}

// A flat elementwise pass (no per-channel terms): out = act(x + residual).
template <typename scalar_t>
void epilogue_flat(const scalar_t* x, const scalar_t* res, scalar_t* out, int64_t numel, bool relu) {
  at::parallel_for(0, numel, 32768, [&](int64_t begin, int64_t end) {
    epilogue_span<scalar_t>(x + begin, nullptr, nullptr, res ? res + begin : nullptr, out + begin, end - begin,
                            relu);
  });
}

}  // namespace resnet_fused::cpu
