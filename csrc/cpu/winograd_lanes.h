// Lane blocks shared by the Winograd transforms (winograd.cpp's F(4x4), isa/winograd_f2_avx2.cpp's F(2x2)): loops
// over kBlock channels of channels_last tensors, which the compiler turns into vector code. The two files are built
// with different target flags (target_clones and -mavx2), so everything here has internal linkage: each file keeps
// its own copy, and the linker can never hand one file's AVX2 code to the other's baseline build.
#pragma once

#include <algorithm>
#include <cstdint>

namespace resnet_fused::cpu {
namespace {  // NOLINT(build/namespaces): internal linkage on purpose, see above

constexpr int64_t kBlock = 16;  // channels per lane block

alignas(64) constexpr float kZeros[kBlock] = {};

// A block of kBlock lanes at src: src itself when the block is whole, else its first `width` lanes copied into
// `spare` and zero-padded. (Whole blocks are read in place: copy loops would become memcpy calls.)
inline const float* lanes(const float* src, int64_t width, float* spare) {
  if (width == kBlock) return src;
  std::fill(spare, spare + kBlock, 0.f);
  std::copy(src, src + width, spare);
  return spare;
}

// d[i][j] = the kBlock lanes from channel c0 of pixel (h0 + i, w0 + j) of image n of channels_last x (N, h, w,
// channels), or kZeros outside the image: an input tile of side kSide, partial blocks through `spare`.
template <int64_t kSide>
inline void tile_lanes(const float* x, int64_t n, int64_t h, int64_t w, int64_t channels, int64_t h0, int64_t w0,
                       int64_t c0, int64_t width, float (*spare)[kSide][kBlock], const float* (*d)[kSide]) {
  for (int64_t i = 0; i < kSide; ++i) {
    const int64_t hi = h0 + i;
    for (int64_t j = 0; j < kSide; ++j) {
      const int64_t wj = w0 + j;
      const bool inside = hi >= 0 && hi < h && wj >= 0 && wj < w;
      d[i][j] = inside ? lanes(x + ((n * h + hi) * w + wj) * channels + c0, width, spare[i][j]) : kZeros;
    }
  }
}

// dst[0:width] = act(o + bias (+ residual)) for one output pixel's block of kBlock lanes (o is overwritten).
inline void finish_lanes(float* o, const float* bias, const float* residual, bool relu, float* dst, int64_t width) {
  for (int64_t l = 0; l < kBlock; ++l) {
    const float value = o[l] + bias[l] + residual[l];
    o[l] = relu ? (value < 0.f ? 0.f : value) : value;  // a NaN stays NaN, as in eager's ReLU
  }
  if (width == kBlock) {
    for (int64_t l = 0; l < kBlock; ++l) dst[l] = o[l] + 0.f;  // (+ 0: a store, not a memcpy call)
  } else {
    std::copy(o, o + width, dst);
  }
}

}  // namespace
}  // namespace resnet_fused::cpu
