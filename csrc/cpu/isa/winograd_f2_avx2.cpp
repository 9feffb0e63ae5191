// The transforms of Winograd F(2x2, 3x3) (math and layout in ../winograd_f2.h), compiled with -mavx2 -mfma: lane
// loops over blocks of kBlock channels of channels_last tensors (../winograd_lanes.h), which the compiler turns into
// vector code. Both transforms only add and subtract (no multiply), so their results do not depend on contraction.
#include <algorithm>

#include "../winograd_f2.h"
#include "../winograd_lanes.h"

namespace resnet_fused::cpu::winograd_f2 {
namespace {

constexpr int64_t kIn = 4;  // input tile side

// r = B^T t over the lanes of four kBlock vectors.
inline void bt_lanes(const float* __restrict t0, const float* __restrict t1, const float* __restrict t2,
                     const float* __restrict t3, float* __restrict r0, float* __restrict r1, float* __restrict r2,
                     float* __restrict r3) {
  for (int64_t l = 0; l < kBlock; ++l) {
    r0[l] = t0[l] - t2[l];
    r1[l] = t1[l] + t2[l];
    r2[l] = t2[l] - t1[l];
    r3[l] = t1[l] - t3[l];
  }
}

// r = A^T t.
inline void at_lanes(const float* __restrict t0, const float* __restrict t1, const float* __restrict t2,
                     const float* __restrict t3, float* __restrict r0, float* __restrict r1) {
  for (int64_t l = 0; l < kBlock; ++l) {
    r0[l] = t0[l] + t1[l] + t2[l];
    r1[l] = t1[l] - t2[l] - t3[l];
  }
}

}  // namespace

void input_transform_avx2(const float* x, float* v, const Tiles& g, int64_t channels, int64_t begin, int64_t end) {
  alignas(64) float spare[kIn][kIn][kBlock];  // partial channel blocks, zero-padded
  alignas(64) float cols[kIn][kIn][kBlock];   // B^T d
  alignas(64) float out[kIn][kBlock];         // one row of (B^T d) B, for a partial block
  const float* d[kIn][kIn];
  const int64_t tiles = g.count(), position = tiles * channels;  // V's floats from position p to p + 1
  for (int64_t t = begin; t < end; ++t) {
    const int64_t n = t / (g.rows * g.cols), ty = t / g.cols % g.rows, tx = t % g.cols;
    const int64_t h0 = ty * kOut - 1, w0 = tx * kOut - 1;
    for (int64_t c0 = 0; c0 < channels; c0 += kBlock) {
      const int64_t width = std::min(kBlock, channels - c0);
      tile_lanes<kIn>(x, n, g.h, g.w, channels, h0, w0, c0, width, spare, d);
      for (int64_t j = 0; j < kIn; ++j)
        bt_lanes(d[0][j], d[1][j], d[2][j], d[3][j], cols[0][j], cols[1][j], cols[2][j], cols[3][j]);
      for (int64_t i = 0; i < kIn; ++i) {
        float* dst = v + i * kIn * position + t * channels + c0;  // positions (i, 0 .. 3)
        if (width == kBlock) {
          bt_lanes(cols[i][0], cols[i][1], cols[i][2], cols[i][3], dst, dst + position, dst + 2 * position,
                   dst + 3 * position);
          continue;
        }
        bt_lanes(cols[i][0], cols[i][1], cols[i][2], cols[i][3], out[0], out[1], out[2], out[3]);
        for (int64_t j = 0; j < kIn; ++j) std::copy(out[j], out[j] + width, dst + j * position);
      }
    }
  }
}

void output_transform_avx2(const float* m, const float* bias, const float* residual, float* y, const Tiles& g,
                           int64_t channels, bool relu, int64_t begin, int64_t end) {
  alignas(64) float spare[kPositions + 2][kBlock];  // partial channel blocks of M, bias and residual
  alignas(64) float rows[kOut][kIn][kBlock];        // A^T M
  alignas(64) float out[kOut][kBlock];              // one row of (A^T M) A
  const float* tile[kPositions];
  const int64_t position = g.count() * channels;  // M's floats from position p to p + 1
  for (int64_t t = begin; t < end; ++t) {
    const int64_t n = t / (g.rows * g.cols), ty = t / g.cols % g.rows, tx = t % g.cols;
    for (int64_t k0 = 0; k0 < channels; k0 += kBlock) {
      const int64_t width = std::min(kBlock, channels - k0);
      for (int64_t p = 0; p < kPositions; ++p) tile[p] = lanes(m + p * position + t * channels + k0, width, spare[p]);
      const float* b = lanes(bias + k0, width, spare[kPositions]);
      for (int64_t j = 0; j < kIn; ++j)
        at_lanes(tile[j], tile[kIn + j], tile[2 * kIn + j], tile[3 * kIn + j], rows[0][j], rows[1][j]);
      for (int64_t i = 0; i < kOut && ty * kOut + i < g.h; ++i) {
        at_lanes(rows[i][0], rows[i][1], rows[i][2], rows[i][3], out[0], out[1]);
        for (int64_t j = 0; j < kOut && tx * kOut + j < g.w; ++j) {
          const int64_t offset = ((n * g.h + ty * kOut + i) * g.w + tx * kOut + j) * channels + k0;
          const float* r = residual ? lanes(residual + offset, width, spare[kPositions + 1]) : kZeros;
          finish_lanes(out[j], b, r, relu, y + offset, width);
        }
      }
    }
  }
}

}  // namespace resnet_fused::cpu::winograd_f2
