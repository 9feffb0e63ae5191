// Winograd F(4x4, 3x3) convolution on the CPU (fp32, 3x3 kernel, stride 1, padding 1, channels_last), with the
// conv_bias_act epilogue fused into its output transform:
//
//   conv3x3_winograd(x, u, bias, residual, relu, position_major, into_residual):
//                        y = act(conv2d(x, w, stride=1, padding=1) + bias[k] (+ residual)), in the residual's buffer
//                        if into_residual (and that buffer is dense channels_last)
//   winograd_weight(w):  u = the transformed weight, made once per pack
//   winograd2_weight(w): F(2x2, 3x3)'s transform (16, C_in, C_out), for winograd_f2.cpp's conv3x3_winograd2; both
//                        transforms share kernel_transform
//
// Per 4x4 output tile, with d the 6x6 input tile around it (zero outside x) and w[k, c] the 3x3 kernel (Lavin and
// Gray, "Fast Algorithms for Convolutional Neural Networks", 2016, interpolation points 0, +-1, +-2, infinity):
//
//   Y[k] = A^T ( sum_c (G w[k, c] G^T) (.) (B^T d[c] B) ) A           (.) the elementwise product of 6x6 tiles
//
// The sum over c is 36 matrix products, one per tile position p = (i, j) of the 6x6 transformed tiles:
//   V[p]: (tiles, C) = (B^T d B)[i, j] of every input tile;  U[p]: (C, K) = (G w G^T)[i, j];  M[p] = V[p] @ U[p]
// run as one batched GEMM: at::bmm (MKL) with u = winograd_weight(w), or oneDNN where u is winograd_weight(w) as the
// (36 K, C, 1, 1) weight of a 1x1 convolution of 36 groups, reordered by mkldnn::_reorder_convolution_weight for it
// (an opaque mkldnn tensor; the "cpu" backend makes it once per input shape): with tile-major buffers the 36 products
// are that convolution over an image of `tiles` pixels whose channels are a tile's 36 positions x C. V and M are
// stored either position-major, (36, tiles, C), where the GEMMs read dense matrices and each tile's transform writes
// 36 runs of C values far apart, or tile-major, (tiles, 36, C), where the transform writes one dense run per tile and
// the GEMMs read strided views. Or, where u is winograd_weight(w) as the implicit GEMM's panels (a (36, C * K16)
// tensor, K16 = K rounded up to 16: position p's U[p] packed as conv_gemm_weight packs a (K, C, 1, 1) weight), all
// three stages run per block of 6 tiles, V's and M's blocks in L2, the products by the GEMM's AVX2 register tile
// (winograd_in_cache; position_major is not asked). Which is faster was measured to differ between CPUs and channel
// counts: the caller picks (`position_major`, and the products through u; the "cpu" backend's rule and its
// measurements are in resnet_fused/ops/backends/cpu.py). A 3x3 convolution costs 9 multiply-adds per output and input
// channel; here the GEMMs cost 36 / 16 = 2.25, and the transforms are linear passes over activation-sized buffers (or,
// per block of tiles, over buffers that stay in L2). Rounding: each output
// sums transformed terms whose magnitudes exceed the result's (A and B hold entries up to 8 and 5), so the fp32 error
// is about 20x a direct convolution's (measured 7e-6 of the output's largest magnitude, against 3e-7).
//
// The transforms read and write channel vectors (channels_last: a pixel's channels are contiguous), in blocks of
// kBlock channels, parallel over tiles; they are compiled for AVX-512, AVX2+FMA and baseline x86-64, chosen at load
// time (GCC/Clang target_clones), since the extension itself is built for baseline x86-64.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#include "conv_gemm.h"
#include "winograd_lanes.h"
#include "workspace.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__APPLE__)
#define RESNET_FUSED_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RESNET_FUSED_MULTIVERSION
#endif

namespace resnet_fused::cpu {
namespace {

constexpr auto kCL = at::MemoryFormat::ChannelsLast;
constexpr int64_t kOut = 4;          // output tile side
constexpr int64_t kIn = 6;           // input tile side: kOut + 3 - 1
constexpr int64_t kPositions = 36;   // kIn * kIn

// The tile grid over (N, H, W) and the strides of the transformed buffers.
struct Tiles {
  int64_t n, h, w, rows, cols;  // rows x cols tiles per image
  int64_t count() const { return n * rows * cols; }
};

// Where V[p, t, c] (or M) lies in its buffer: p * position + t * tile + c.
struct Layout {
  int64_t position, tile;
  static Layout of(bool position_major, int64_t tiles, int64_t channels) {
    return position_major ? Layout{tiles * channels, channels} : Layout{channels, kPositions * channels};
  }
};

// Lane-wise over a block of kBlock channels (arrays contiguous over the lanes, so the loops vectorize):
// r = B^T t for the 6-vectors t = (t0 .. t5), written out since B^T is sparse.
inline void bt_lanes(const float* __restrict t0, const float* __restrict t1, const float* __restrict t2,
                     const float* __restrict t3, const float* __restrict t4, const float* __restrict t5,
                     float* __restrict r0, float* __restrict r1, float* __restrict r2, float* __restrict r3,
                     float* __restrict r4, float* __restrict r5) {
  for (int64_t l = 0; l < kBlock; ++l) {
    r0[l] = 4.f * t0[l] - 5.f * t2[l] + t4[l];
    r1[l] = -4.f * (t1[l] + t2[l]) + t3[l] + t4[l];
    r2[l] = 4.f * (t1[l] - t2[l]) - t3[l] + t4[l];
    r3[l] = 2.f * (t3[l] - t1[l]) - t2[l] + t4[l];
    r4[l] = 2.f * (t1[l] - t3[l]) - t2[l] + t4[l];
    r5[l] = 4.f * t1[l] - 5.f * t3[l] + t5[l];
  }
}

// r = A^T t.
inline void at_lanes(const float* __restrict t0, const float* __restrict t1, const float* __restrict t2,
                     const float* __restrict t3, const float* __restrict t4, const float* __restrict t5,
                     float* __restrict r0, float* __restrict r1, float* __restrict r2, float* __restrict r3) {
  for (int64_t l = 0; l < kBlock; ++l) {
    const float sum12 = t1[l] + t2[l], diff12 = t1[l] - t2[l], sum34 = t3[l] + t4[l], diff34 = t3[l] - t4[l];
    r0[l] = t0[l] + sum12 + sum34;
    r1[l] = diff12 + 2.f * diff34;
    r2[l] = sum12 + 4.f * sum34;
    r3[l] = diff12 + 8.f * diff34 + t5[l];
  }
}

// V[p, t - first, c] = (B^T d B)[p] for tiles [begin, end) (padding 1: tile (ty, tx) reads rows 4 ty - 1 .. 4 ty + 4);
// `first` is the tile at the start of v (0: v holds every tile).
RESNET_FUSED_MULTIVERSION
void input_transform(const float* x, float* v, const Tiles& g, const Layout& layout, int64_t channels,
                     int64_t begin, int64_t end, int64_t first) {
  alignas(64) float spare[kIn][kIn][kBlock];  // partial channel blocks, zero-padded
  alignas(64) float cols[kIn][kIn][kBlock];   // B^T d
  alignas(64) float out[kIn][kBlock];         // one row of (B^T d) B, for a partial block
  const float* d[kIn][kIn];
  for (int64_t t = begin; t < end; ++t) {
    const int64_t n = t / (g.rows * g.cols), ty = t / g.cols % g.rows, tx = t % g.cols;
    const int64_t h0 = ty * kOut - 1, w0 = tx * kOut - 1;
    for (int64_t c0 = 0; c0 < channels; c0 += kBlock) {
      const int64_t width = std::min(kBlock, channels - c0);
      tile_lanes<kIn>(x, n, g.h, g.w, channels, h0, w0, c0, width, spare, d);
      for (int64_t j = 0; j < kIn; ++j) {
        bt_lanes(d[0][j], d[1][j], d[2][j], d[3][j], d[4][j], d[5][j], cols[0][j], cols[1][j], cols[2][j],
                 cols[3][j], cols[4][j], cols[5][j]);
      }
      const int64_t step = layout.position;  // from position p to p + 1
      for (int64_t i = 0; i < kIn; ++i) {
        float* dst = v + i * kIn * layout.position + (t - first) * layout.tile + c0;  // positions (i, 0 .. 5)
        if (width == kBlock) {
          bt_lanes(cols[i][0], cols[i][1], cols[i][2], cols[i][3], cols[i][4], cols[i][5], dst, dst + step,
                   dst + 2 * step, dst + 3 * step, dst + 4 * step, dst + 5 * step);
          continue;
        }
        bt_lanes(cols[i][0], cols[i][1], cols[i][2], cols[i][3], cols[i][4], cols[i][5], out[0], out[1], out[2],
                 out[3], out[4], out[5]);
        for (int64_t j = 0; j < kIn; ++j) std::copy(out[j], out[j] + width, dst + j * step);
      }
    }
  }
}

// y = act(A^T M A + bias (+ residual)) for tiles [begin, end), stored where the tile lies inside y; M's tile `first`
// at the start of m.
RESNET_FUSED_MULTIVERSION
void output_transform(const float* m, const float* bias, const float* residual, float* y, const Tiles& g,
                      const Layout& layout, int64_t channels, bool relu, int64_t begin, int64_t end, int64_t first) {
  alignas(64) float spare[kPositions + 2][kBlock];  // partial channel blocks of M, bias and residual
  alignas(64) float rows[kOut][kIn][kBlock];        // A^T M
  alignas(64) float out[kOut][kBlock];              // one row of (A^T M) A
  const float* tile[kPositions];
  for (int64_t t = begin; t < end; ++t) {
    const int64_t n = t / (g.rows * g.cols), ty = t / g.cols % g.rows, tx = t % g.cols;
    for (int64_t k0 = 0; k0 < channels; k0 += kBlock) {
      const int64_t width = std::min(kBlock, channels - k0);
      for (int64_t p = 0; p < kPositions; ++p) {
        tile[p] = lanes(m + p * layout.position + (t - first) * layout.tile + k0, width, spare[p]);
      }
      const float* b = lanes(bias + k0, width, spare[kPositions]);
      for (int64_t j = 0; j < kIn; ++j) {
        at_lanes(tile[j], tile[kIn + j], tile[2 * kIn + j], tile[3 * kIn + j], tile[4 * kIn + j], tile[5 * kIn + j],
                 rows[0][j], rows[1][j], rows[2][j], rows[3][j]);
      }
      for (int64_t i = 0; i < kOut && ty * kOut + i < g.h; ++i) {
        at_lanes(rows[i][0], rows[i][1], rows[i][2], rows[i][3], rows[i][4], rows[i][5], out[0], out[1], out[2],
                 out[3]);
        for (int64_t j = 0; j < kOut && tx * kOut + j < g.w; ++j) {
          const int64_t offset = ((n * g.h + ty * kOut + i) * g.w + tx * kOut + j) * channels + k0;
          const float* r = residual ? lanes(residual + offset, width, spare[kPositions + 1]) : kZeros;
          finish_lanes(out[j], b, r, relu, y + offset, width);
        }
      }
    }
  }
}

// Tiles per parallel chunk: about 64 KiB of transformed values each.
int64_t tile_grain(int64_t channels) {
  return std::max<int64_t>(1, 65536 / (kPositions * 4 * std::max<int64_t>(channels, 1)));
}

// G w G^T per 3x3 kernel of weight (C_out, C_in, 3, 3), in float64 rounded once to fp32, as (positions, C_in, C_out)
// for g (side x 3, positions = side^2): one product, (G (x) G)[(a, b), (i, j)] = G[a, i] G[b, j] against the weight
// as (3 * 3, C_in * C_out).
at::Tensor kernel_transform(const char* op, const at::Tensor& weight, const at::Tensor& g) {
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3, op, ": weight must be a (C_out, C_in, "
              "3, 3) tensor, got shape ", weight.sizes());
  TORCH_CHECK(weight.device().is_cpu() && weight.is_floating_point(), op, ": weight must be a floating-point CPU "
              "tensor, got ", weight.scalar_type(), " on ", weight.device());
  const at::Tensor taps = weight.to(at::kDouble).permute({2, 3, 1, 0}).reshape({9, weight.size(1) * weight.size(0)});
  return at::mm(at::kron(g, g), taps).view({-1, weight.size(1), weight.size(0)}).to(at::kFloat).contiguous();
}

// F(4x4, 3x3)'s transform, (36, C_in, C_out).
at::Tensor winograd_weight_cpu(const at::Tensor& weight) {
  const at::Tensor g = at::tensor({1.0 / 4, 0.0, 0.0,                     //
                                   -1.0 / 6, -1.0 / 6, -1.0 / 6,          //
                                   -1.0 / 6, 1.0 / 6, -1.0 / 6,           //
                                   1.0 / 24, 1.0 / 12, 1.0 / 6,           //
                                   1.0 / 24, -1.0 / 12, 1.0 / 6,          //
                                   0.0, 0.0, 1.0},
                                  at::kDouble)
                           .view({kIn, 3});
  return kernel_transform("winograd_weight", weight, g);
}

// F(2x2, 3x3)'s transform (winograd_f2.h), (16, C_in, C_out).
at::Tensor winograd2_weight_cpu(const at::Tensor& weight) {
  const at::Tensor g = at::tensor({1.0, 0.0, 0.0,    //
                                   0.5, 0.5, 0.5,    //
                                   0.5, -0.5, 0.5,   //
                                   0.0, 0.0, 1.0},
                                  at::kDouble)
                           .view({4, 3});
  return kernel_transform("winograd2_weight", weight, g);
}

// V and M come from workspace() (workspace.h), kept per thread between calls.

// M = the 36 products of tile-major V by oneDNN: a 1x1 convolution of 36 groups over a (1, 36 C, 1, tiles)
// channels_last image (V's memory as it lies), whose channels_last output (1, 36 K, 1, tiles) is tile-major M.
at::Tensor onednn_products(const at::Tensor& v_buffer, const at::Tensor& u, int64_t tiles, int64_t c_in) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mkldnn::_convolution_pointwise", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                               at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t,
                                               c10::string_view, c10::List<std::optional<at::Scalar>>,
                                               std::optional<c10::string_view>)>();
  const int64_t channels = kPositions * c_in;
  const at::Tensor image = v_buffer.as_strided({1, channels, 1, tiles}, {tiles * channels, 1, tiles * channels,
                                                                         channels});
  const std::vector<int64_t> zeros{0, 0}, ones{1, 1};
  const c10::List<std::optional<at::Scalar>> no_scalars;
  at::Tensor m = op.call(image, u, std::nullopt, zeros, ones, ones, kPositions, "none", no_scalars, std::nullopt);
  return m.is_contiguous(kCL) ? m : m.contiguous(kCL);
}

// Winograd with its three stages run per block of kRows tiles (one register tile's rows), so that V and M stay in
// L2 instead of making a pass each over activation-sized buffers in memory: per block the input transform, the 36
// products by the implicit GEMM's register tile (conv_gemm::winograd_products_avx2, u as its panels), then the output
// transform with the epilogue. Each block (at most 6 tiles) reads all of u: this pays where u is small (64 and 128
// channels: 0.6 and 2.4 MB; measured in resnet_fused/ops/backends/cpu.py, where blocks of 12-36 tiles ran 5-45% slower
// than 6).
void winograd_in_cache(const float* x, const float* panels, const float* bias, const float* residual, float* y,
                       const Tiles& g, int64_t c_in, int64_t c_out, int64_t width, bool relu) {
#ifdef RESNET_FUSED_X86_KERNELS
  constexpr int64_t block = conv_gemm::kRows;
  const int64_t tiles = g.count(), threads = at::get_num_threads();
  // As many blocks as kRows tiles each would make, rounded up to a multiple of the threads, the tiles spread evenly
  // over them: no thread reads u more often than before, and the threads get equal shares of tiles (49 tiles on 2
  // threads: 25 and 24, not 30 and 19 in blocks of 6). Per conv, 2 Zen 3 cores: 1.06x at 128 channels 28x28, 1.11x at
  // 14x14, level at 64 channels 56x56 (33 -> 34 blocks).
  const int64_t blocks = std::min(tiles, ((tiles + block - 1) / block + threads - 1) / threads * threads);
  const Layout v_layout{block * c_in, c_in}, m_layout{block * width, width};
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> scratch;  // V's and M's blocks, kept: at most 221 KiB (128 channels)
    scratch.resize(static_cast<size_t>(block * kPositions * (c_in + width)));
    float* v = scratch.data();
    float* m = v + block * kPositions * c_in;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t t0 = b * tiles / blocks, t1 = (b + 1) * tiles / blocks;
      input_transform(x, v, g, v_layout, c_in, t0, t1, t0);
      conv_gemm::winograd_products_avx2(v, v_layout.position, t1 - t0, c_in, panels, width, m, m_layout.position);
      output_transform(m, bias, residual, y, g, m_layout, c_out, relu, t0, t1, t0);
    }
  });
#else
  TORCH_CHECK(false, "conv3x3_winograd: u as panels needs the x86-64 build's AVX2 kernels");
#endif
}

at::Tensor conv3x3_winograd_cpu(const at::Tensor& x, const at::Tensor& u, const at::Tensor& bias,
                                const std::optional<at::Tensor>& residual, bool relu, bool position_major,
                                bool into_residual) {
  check_activation("conv3x3_winograd", "x", x);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "conv3x3_winograd: x must be float32, got ", x.scalar_type());
  const bool onednn = u.is_mkldnn();
  // u as the GEMM's panels, (36, C_in * C_out rounded up to 16): the in-cache path
  const bool panels = !onednn && u.dim() == 2;
  const int64_t width = bias.dim() == 1 ? (bias.size(0) + conv_gemm::kCols - 1) / conv_gemm::kCols * conv_gemm::kCols
                                        : 0;
  if (panels) {
    TORCH_CHECK(conv_gemm::available(), "conv3x3_winograd: u as panels needs the AVX2 + FMA kernels, which this "
                "CPU or build does not have");
    TORCH_CHECK(u.size(0) == kPositions && u.size(1) == x.size(1) * width && u.scalar_type() == at::kFloat &&
                    u.device().is_cpu() && u.is_contiguous() && x.size(1) <= conv_gemm::kDepth &&
                    reinterpret_cast<uintptr_t>(u.const_data_ptr()) % 32 == 0,
                "conv3x3_winograd: u as panels must be a contiguous, 32-byte aligned float32 CPU tensor of shape (36, ",
                x.size(1), " * ", width, ") (C_in * C_out rounded up to 16, C_in at most ", conv_gemm::kDepth,
                "), got ", u.scalar_type(), " of shape ", u.sizes());
  } else if (onednn) {
    TORCH_CHECK(u.dim() == 4 && u.size(0) % kPositions == 0 && u.size(1) == x.size(1) && u.size(2) == 1 &&
                    u.size(3) == 1 && u.scalar_type() == at::kFloat && !position_major,
                "conv3x3_winograd: a oneDNN u must be a grouped 1x1 weight (36 C_out, ", x.size(1),
                ", 1, 1), with tile-major buffers (position_major false); got shape ", u.sizes(),
                ", position_major ", position_major);
  } else {
    TORCH_CHECK(u.dim() == 3 && u.size(0) == kPositions && u.size(1) == x.size(1) && u.scalar_type() == at::kFloat &&
                    u.device().is_cpu(),
                "conv3x3_winograd: u must be a float32 CPU tensor of shape (36, ", x.size(1), ", C_out) from "
                "winograd_weight, got ", u.scalar_type(), " of shape ", u.sizes());
  }
  const int64_t n = x.size(0), h = x.size(2), w = x.size(3), c_in = x.size(1);
  const int64_t c_out = panels ? bias.size(0) : onednn ? u.size(0) / kPositions : u.size(2);
  check_channel_vector("conv3x3_winograd", "bias", bias, c_out);
  check_residual("conv3x3_winograd", residual, {n, c_out, h, w}, at::kFloat);
  TORCH_CHECK(c_in > 0 && h > 0 && w > 0, "conv3x3_winograd: x must have non-zero C_in, height and width, got shape ",
              x.sizes());
  at::Tensor y = output_buffer(x, residual, into_residual, {n, c_out, h, w});
  if (y.numel() == 0) return y;
  const Tiles g{n, h, w, (h + kOut - 1) / kOut, (w + kOut - 1) / kOut};
  const at::Tensor xc = x.contiguous(kCL);
  const at::Tensor bc = bias.to(at::kFloat).contiguous();
  const at::Tensor rc = residual.has_value() ? residual->contiguous(kCL) : at::Tensor();
  if (panels) {
    winograd_in_cache(xc.const_data_ptr<float>(), u.const_data_ptr<float>(), bc.const_data_ptr<float>(),
                      rc.defined() ? rc.const_data_ptr<float>() : nullptr, y.mutable_data_ptr<float>(), g, c_in, c_out,
                      width, relu);
    return y;
  }
  const int64_t tiles = g.count();
  const Layout v_layout = Layout::of(position_major, tiles, c_in), m_layout = Layout::of(position_major, tiles, c_out);
  // oneDNN makes M itself; the bmm writes it into the workspace beside V
  const at::Tensor space = workspace(kPositions * tiles * (c_in + (onednn ? 0 : c_out)));
  const at::Tensor v_buffer = space.narrow(0, 0, kPositions * tiles * c_in);
  const float* x_ptr = xc.const_data_ptr<float>();
  float* v_ptr = v_buffer.mutable_data_ptr<float>();
  at::parallel_for(0, tiles, tile_grain(c_in), [&](int64_t begin, int64_t end) {
    input_transform(x_ptr, v_ptr, g, v_layout, c_in, begin, end, 0);
  });
  at::Tensor m_buffer;
  if (onednn) {
    m_buffer = onednn_products(v_buffer, u, tiles, c_in);
  } else {
    m_buffer = space.narrow(0, kPositions * tiles * c_in, kPositions * tiles * c_out);
    at::Tensor m = m_buffer.as_strided({kPositions, tiles, c_out}, {m_layout.position, m_layout.tile, 1});
    at::bmm_out(m, v_buffer.as_strided({kPositions, tiles, c_in}, {v_layout.position, v_layout.tile, 1}), u);
  }
  const float* m_ptr = m_buffer.const_data_ptr<float>();
  const float* b_ptr = bc.const_data_ptr<float>();
  const float* r_ptr = rc.defined() ? rc.const_data_ptr<float>() : nullptr;
  float* y_ptr = y.mutable_data_ptr<float>();
  at::parallel_for(0, tiles, tile_grain(c_out), [&](int64_t begin, int64_t end) {
    output_transform(m_ptr, b_ptr, r_ptr, y_ptr, g, m_layout, c_out, relu, begin, end, 0);
  });
  return y;
}

}  // namespace
}  // namespace resnet_fused::cpu

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("winograd_weight", &resnet_fused::cpu::winograd_weight_cpu);
  m.impl("winograd2_weight", &resnet_fused::cpu::winograd2_weight_cpu);
  m.impl("conv3x3_winograd", &resnet_fused::cpu::conv3x3_winograd_cpu);
}

// u packed for oneDNN (an opaque mkldnn tensor) dispatches here
TORCH_LIBRARY_IMPL(resnet_fused, MkldnnCPU, m) {
  m.impl("conv3x3_winograd", &resnet_fused::cpu::conv3x3_winograd_cpu);
}
