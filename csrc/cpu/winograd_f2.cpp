// Winograd F(2x2, 3x3) as ops (math and layout in winograd_f2.h), its 16 products by the implicit GEMM's AVX2
// register tile (conv_gemm.h) and the conv_bias_act epilogue fused into its output transform:
//
//   conv3x3_winograd2(x, panels, bias, residual, relu, into_residual):
//                         y = act(conv2d(x, w, stride=1, padding=1) + bias[k] (+ residual)), channels_last, in the
//                         residual's buffer if into_residual (and that buffer is dense channels_last), where
//                         panels = winograd2_weight(w)'s U[p] (winograd.cpp: G w G^T as (16, C_in, C_out)), each
//                         packed as conv_gemm_weight packs a (C_out, C_in, 1, 1) weight
//
// fp32 only; runs where the implicit GEMM does (conv_gemm::available). Three passes, each parallel: the input
// transform over tiles, the 16 products (each a 1x1 convolution of a (1, C, 1, tiles) image by U[p], run as the GEMM's
// tasks, every thread moving on to the next position as soon as the current one has no task left), the output
// transform with the epilogue over tiles.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "conv_gemm.h"
#include "winograd_f2.h"
#include "workspace.h"

namespace resnet_fused::cpu {
namespace {

using winograd_f2::kPositions;

// Tiles per parallel chunk of a transform: about 64 KiB of transformed values each.
int64_t tile_grain(int64_t channels) {
  return std::max<int64_t>(1, 65536 / (kPositions * 4 * std::max<int64_t>(channels, 1)));
}

at::Tensor conv3x3_winograd2_cpu(const at::Tensor& x, const at::Tensor& panels, const at::Tensor& bias,
                                 const std::optional<at::Tensor>& residual, bool relu, bool into_residual) {
  TORCH_CHECK(conv_gemm::available(), "conv3x3_winograd2: needs the AVX2 + FMA kernels (a CPU with AVX2 and FMA, "
              "ATen's dispatch allowing AVX2); this one runs '", at::get_cpu_capability(), "'");
  check_activation("conv3x3_winograd2", "x", x);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "conv3x3_winograd2: x must be float32, got ", x.scalar_type());
  const int64_t n = x.size(0), c_in = x.size(1), h = x.size(2), w = x.size(3);
  TORCH_CHECK(c_in > 0 && h > 0 && w > 0, "conv3x3_winograd2: x must have non-zero C_in, height and width, got "
              "shape ", x.sizes());
  const int64_t c_out = bias.numel();  // checked against panels below
  check_channel_vector("conv3x3_winograd2", "bias", bias, c_out);
  TORCH_CHECK(c_out > 0, "conv3x3_winograd2: bias must have one value per output channel, and C_out > 0; got none");
  const int64_t panel_floats = conv_gemm::packed_weight_numel(c_out, c_in);  // one position's U, packed
  TORCH_CHECK(panels.dim() == 2 && panels.size(0) == kPositions && panels.size(1) == panel_floats &&
                  panels.scalar_type() == at::kFloat && panels.device().is_cpu() && panels.is_contiguous() &&
                  reinterpret_cast<uintptr_t>(panels.const_data_ptr()) % 32 == 0,
              "conv3x3_winograd2: panels must be a contiguous, 32-byte aligned float32 CPU tensor of shape (16, ",
              panel_floats, "): winograd2_weight's U[p] each packed as conv_gemm_weight packs a (", c_out, ", ", c_in,
              ", 1, 1) weight; got ", panels.scalar_type(), " of shape ", panels.sizes());
  check_residual("conv3x3_winograd2", residual, {n, c_out, h, w}, at::kFloat);
  at::Tensor y = output_buffer(x, residual, into_residual, {n, c_out, h, w});
  if (y.numel() == 0) return y;
#ifdef RESNET_FUSED_X86_KERNELS
  const winograd_f2::Tiles g{n, h, w, (h + winograd_f2::kOut - 1) / winograd_f2::kOut,
                             (w + winograd_f2::kOut - 1) / winograd_f2::kOut};
  const int64_t tiles = g.count();
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast), bc = bias.to(at::kFloat).contiguous();
  const at::Tensor rc = residual.has_value() ? residual->contiguous(at::MemoryFormat::ChannelsLast) : at::Tensor();
  const at::Tensor space = workspace(kPositions * tiles * (c_in + c_out));
  float* v = space.mutable_data_ptr<float>();
  float* m = v + kPositions * tiles * c_in;
  const float* x_ptr = xc.const_data_ptr<float>();
  at::parallel_for(0, tiles, tile_grain(c_in), [&](int64_t begin, int64_t end) {
    winograd_f2::input_transform_avx2(x_ptr, v, g, c_in, begin, end);
  });
  // M[p] = V[p] @ U[p]: a 1x1 convolution of V[p] seen as a (1, C_in, 1, tiles) image, with no bias (it comes in
  // the output transform) and no epilogue
  const conv_gemm::Geometry product{1, 1, tiles, c_in, 1, 1, 1, 0, 1, tiles, c_out};
  const conv_gemm::Blocking blocking = conv_gemm::blocking(product, at::get_num_threads());
  const int64_t lanes = std::min<int64_t>(at::get_num_threads(), blocking.tasks());
  std::vector<conv_gemm::TaskQueue> queues;
  queues.reserve(kPositions);
  for (int64_t p = 0; p < kPositions; ++p) queues.emplace_back(blocking.tasks(), lanes);
  const std::vector<float> zeros(static_cast<size_t>(c_out), 0.f);
  const float* u = panels.const_data_ptr<float>();
  at::parallel_for(0, lanes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t lane = begin; lane < end; ++lane)
      for (int64_t p = 0; p < kPositions; ++p)
        conv_gemm::run_tasks_avx2(v + p * tiles * c_in, product, conv_gemm::Border{nullptr, 0, nullptr},
                                  u + p * panel_floats, zeros.data(), nullptr, m + p * tiles * c_out, false, blocking,
                                  queues[p], lane);
  });
  const float* b_ptr = bc.const_data_ptr<float>();
  const float* r_ptr = rc.defined() ? rc.const_data_ptr<float>() : nullptr;
  float* y_ptr = y.mutable_data_ptr<float>();
  at::parallel_for(0, tiles, tile_grain(c_out), [&](int64_t begin, int64_t end) {
    winograd_f2::output_transform_avx2(m, b_ptr, r_ptr, y_ptr, g, c_out, relu, begin, end);
  });
#endif
  return y;
}

}  // namespace
}  // namespace resnet_fused::cpu

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("conv3x3_winograd2", &resnet_fused::cpu::conv3x3_winograd2_cpu);
}
